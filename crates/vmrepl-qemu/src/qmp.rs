//! QMP client (QEMU and qemu-storage-daemon monitors) and a small guest-agent client.
//!
//! QMP framing: one JSON object per line in each direction. The server greets with
//! `{"QMP":...}`; the client must send `qmp_capabilities` before anything else. Every
//! command this client sends carries an `id`, so any number of tasks can call
//! [`QmpClient::execute`] at once; a reader task routes replies by id and events to a
//! broadcast channel. When QEMU exits the socket closes: pending calls fail with
//! [`QmpError::Closed`] and [`QmpClient::closed`] resolves.
//!
//! A QMP socket (`server=on`) serves one client at a time: a second client waits until
//! the first disconnects. Drop the old client before reattaching.

use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};

/// Longest line accepted from the guest agent: a reply, or the stale bytes skipped before
/// the sync sentinel. The agent runs inside the guest and is not trusted; its real replies
/// are a few KiB.
pub const MAX_AGENT_LINE: usize = 1 << 20;

/// Longest line accepted from QMP (QEMU itself; `query-block` of many disks is the largest
/// real reply, well under this).
pub const MAX_QMP_LINE: usize = 16 << 20;

/// Default time a QMP command may take before [`QmpError::Timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// QMP and QGA failures.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QmpError {
    #[error("could not connect to the QMP socket {path} within {secs} s (last error: {last}); check that QEMU is running and that no other client holds the monitor")]
    ConnectTimeout {
        path: PathBuf,
        secs: u64,
        last: String,
    },
    #[error("the monitor at {path} did not behave like QMP: {detail}")]
    Handshake { path: PathBuf, detail: String },
    #[error("QMP command {cmd} failed: {class}: {desc}")]
    Command {
        cmd: String,
        /// QEMU's error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        desc: String,
    },
    #[error("the QMP connection to {path} closed (QEMU exited or another client took over) while running {cmd}")]
    Closed { path: PathBuf, cmd: String },
    #[error("QMP command {cmd} got no answer within {secs} s from {path}; QEMU may be stuck")]
    Timeout {
        path: PathBuf,
        cmd: String,
        secs: u64,
    },
    #[error("I/O error on the QMP socket {path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error("no matching QMP event {what} arrived within {secs} s")]
    EventTimeout { what: String, secs: u64 },
    #[error("guest agent at {path} answered out of protocol: {detail}; the agent may be restarting, retry later")]
    Agent { path: PathBuf, detail: String },
    #[error("{peer} at {path} sent a line longer than the limit of {limit} bytes; it was refused and the rest of the line is not read (a misbehaving or hostile guest agent does this; restart the agent or the VM)")]
    LineTooLong {
        /// "the guest agent" or "QMP".
        peer: &'static str,
        path: PathBuf,
        limit: usize,
    },
}

/// The error a capped line read returns (inside an `io::Error` of kind `InvalidData`).
#[derive(Debug)]
struct LineTooLong {
    limit: usize,
}

impl std::fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a line is longer than the limit of {} bytes", self.limit)
    }
}

impl std::error::Error for LineTooLong {}

/// Reads up to and including `delim` into `buf`, like `read_until`, but fails with
/// [`LineTooLong`] once more than `limit` bytes (plus the delimiter) arrive without it.
/// Memory stays bounded by `limit` plus one read buffer. Returns the bytes read (0 at EOF).
async fn read_until_capped<R: AsyncBufRead + Unpin>(
    r: &mut R,
    delim: u8,
    buf: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<usize> {
    let start = buf.len();
    loop {
        let (found, used) = {
            let avail = r.fill_buf().await?;
            if avail.is_empty() {
                return Ok(buf.len() - start);
            }
            match avail.iter().position(|b| *b == delim) {
                Some(i) => {
                    buf.extend_from_slice(&avail[..=i]);
                    (true, i + 1)
                }
                None => {
                    buf.extend_from_slice(avail);
                    (false, avail.len())
                }
            }
        };
        r.consume(used);
        let n = buf.len() - start;
        if n > limit + usize::from(found) {
            buf.truncate(start);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                LineTooLong { limit },
            ));
        }
        if found {
            return Ok(n);
        }
    }
}

/// One `\n`-terminated line of at most `limit` bytes, without the line end; `None` at EOF.
async fn next_line_capped<R: AsyncBufRead + Unpin>(
    r: &mut R,
    limit: usize,
) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    if read_until_capped(r, b'\n', &mut buf, limit).await? == 0 {
        return Ok(None);
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Maps a read error, keeping a refused over-long line typed.
fn read_err(peer: &'static str, path: &Path, e: std::io::Error) -> QmpError {
    match e.get_ref().and_then(|i| i.downcast_ref::<LineTooLong>()) {
        Some(t) => QmpError::LineTooLong {
            peer,
            path: path.to_path_buf(),
            limit: t.limit,
        },
        None => io_err(path, e),
    }
}

impl QmpError {
    /// QEMU's error class when QEMU rejected the command.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// Timestamp QEMU attaches to an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub struct QmpTimestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

/// One asynchronous QMP event, e.g. `BLOCK_JOB_COMPLETED`, `SHUTDOWN`.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
    pub timestamp: QmpTimestamp,
}

type Reply = Result<Value, (String, String)>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

struct Inner {
    path: PathBuf,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    greeting: Value,
    reader: tokio::task::JoinHandle<()>,
    timeout: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A connected QMP client. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.inner.path)
            .finish()
    }
}

async fn connect_retry(path: &Path, timeout: Duration) -> Result<UnixStream, QmpError> {
    let deadline = Instant::now() + timeout;
    // A freshly started QEMU opens its socket within tens of milliseconds: retry quickly at
    // first, then back off, so a start-up costs what it takes and not a fixed poll period.
    let mut pause = Duration::from_millis(1);
    loop {
        let err = match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(QmpError::ConnectTimeout {
                path: path.to_path_buf(),
                secs: timeout.as_secs(),
                last: err.to_string(),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> QmpError {
    QmpError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Parses one QMP reply object into its id and result.
fn parse_reply(v: &Map<String, Value>) -> Option<Reply> {
    if let Some(r) = v.get("return") {
        return Some(Ok(r.clone()));
    }
    let e = v.get("error")?;
    let class = e
        .get("class")
        .and_then(Value::as_str)
        .unwrap_or("GenericError")
        .to_string();
    let desc = e
        .get("desc")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    Some(Err((class, desc)))
}

fn parse_event(v: &Map<String, Value>) -> Option<QmpEvent> {
    let event = v.get("event")?.as_str()?.to_string();
    let timestamp = v
        .get("timestamp")
        .and_then(|t| serde_json::from_value(t.clone()).ok())
        .unwrap_or_default();
    Some(QmpEvent {
        event,
        data: v.get("data").cloned().unwrap_or(Value::Null),
        timestamp,
    })
}

/// What one line from a QMP monitor (after the greeting) is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum QmpLine {
    /// An asynchronous event.
    Event(QmpEvent),
    /// The answer to the command with this id.
    Reply { id: u64, reply: Reply },
    /// A JSON object that is neither an event nor a reply carrying an id.
    Unrouted,
    /// Not a JSON object at all.
    NotAnObject,
}

/// Classifies one line the monitor sent (without its line end).
pub(crate) fn classify_line(line: &str) -> QmpLine {
    let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(line) else {
        return QmpLine::NotAnObject;
    };
    if let Some(ev) = parse_event(&obj) {
        return QmpLine::Event(ev);
    }
    let id = obj.get("id").and_then(Value::as_u64);
    match (id, parse_reply(&obj)) {
        (Some(id), Some(reply)) => QmpLine::Reply { id, reply },
        _ => QmpLine::Unrouted,
    }
}

/// The `QMP` part of a monitor's greeting line, or why the line is not one.
pub(crate) fn parse_greeting(line: &str) -> Result<Value, String> {
    let greeting: Value =
        serde_json::from_str(line).map_err(|e| format!("greeting is not JSON ({e}): {line}"))?;
    greeting
        .get("QMP")
        .cloned()
        .ok_or_else(|| format!("greeting has no \"QMP\" key: {greeting}"))
}

async fn read_loop(
    mut lines: BufReader<OwnedReadHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
    path: PathBuf,
) {
    loop {
        let line = match next_line_capped(&mut lines, MAX_QMP_LINE).await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                let e = read_err("QMP", &path, e);
                tracing::warn!(target: "vmrepl::qemu", path = %path.display(), error = %e, "QMP read failed");
                break;
            }
        };
        match classify_line(&line) {
            QmpLine::NotAnObject => {
                tracing::warn!(target: "vmrepl::qemu", path = %path.display(), line = %line, "QMP sent a line that is not a JSON object");
            }
            QmpLine::Event(ev) => {
                tracing::debug!(target: "vmrepl::qemu", event = %ev.event, data = %ev.data, "QMP event");
                let _ = events.send(ev);
            }
            QmpLine::Reply { id, reply } => {
                let tx = pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                if let Some(tx) = tx {
                    let _ = tx.send(reply);
                }
            }
            QmpLine::Unrouted => {
                tracing::warn!(target: "vmrepl::qemu", path = %path.display(), line = %line, "QMP reply without a known id");
            }
        }
    }
    // Fail everything still waiting; dropping the senders wakes the callers.
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let _ = closed.send(true);
}

impl QmpClient {
    /// Connects to the QMP socket at `path` (retrying until `timeout`, as QEMU may still be
    /// creating it), reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, QmpError> {
        let start = Instant::now();
        let stream = connect_retry(path, timeout).await?;
        let (rd, wr) = stream.into_split();
        let mut lines = BufReader::new(rd);
        let remaining = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        let greeting =
            match tokio::time::timeout(remaining, next_line_capped(&mut lines, MAX_QMP_LINE)).await
            {
                Err(_) => return Err(QmpError::ConnectTimeout {
                    path: path.to_path_buf(),
                    secs: timeout.as_secs(),
                    last:
                        "connected but got no greeting: another client probably holds the monitor"
                            .into(),
                }),
                Ok(Err(e)) => return Err(read_err("QMP", path, e)),
                Ok(Ok(None)) => {
                    return Err(QmpError::Handshake {
                        path: path.to_path_buf(),
                        detail: "the socket closed before the greeting".into(),
                    })
                }
                Ok(Ok(Some(l))) => l,
            };
        let g = parse_greeting(&greeting).map_err(|detail| QmpError::Handshake {
            path: path.to_path_buf(),
            detail,
        })?;
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(1024);
        let (closed_tx, closed) = watch::channel(false);
        let reader = tokio::spawn(read_loop(
            lines,
            pending.clone(),
            events.clone(),
            closed_tx,
            path.to_path_buf(),
        ));
        let client = QmpClient {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                writer: tokio::sync::Mutex::new(wr),
                pending,
                next_id: AtomicU64::new(1),
                events,
                closed,
                greeting: g,
                reader,
                timeout: DEFAULT_COMMAND_TIMEOUT,
            }),
        };
        client.execute("qmp_capabilities", Value::Null).await?;
        tracing::info!(target: "vmrepl::qemu", path = %path.display(), ms = start.elapsed().as_millis() as u64, "QMP connected");
        Ok(client)
    }

    /// The `QMP` part of the greeting (version, capabilities).
    pub fn greeting(&self) -> &Value {
        &self.inner.greeting
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `cmd` with `args` (`Value::Null` for none) with the default timeout.
    pub async fn execute(&self, cmd: &str, args: Value) -> Result<Value, QmpError> {
        self.execute_timeout(cmd, args, self.inner.timeout).await
    }

    /// Runs `cmd` with `args`, failing with [`QmpError::Timeout`] after `timeout`.
    pub async fn execute_timeout(
        &self,
        cmd: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let inner = &self.inner;
        let closed = |cmd: &str| QmpError::Closed {
            path: inner.path.clone(),
            cmd: cmd.to_string(),
        };
        if *inner.closed.borrow() {
            return Err(closed(cmd));
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": cmd, "id": id });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let (tx, rx) = oneshot::channel();
        inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let start = Instant::now();
        {
            let mut w = inner.writer.lock().await;
            if let Err(e) = w.write_all(line.as_bytes()).await {
                inner
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return Err(if e.kind() == std::io::ErrorKind::BrokenPipe {
                    closed(cmd)
                } else {
                    io_err(&inner.path, e)
                });
            }
        }
        let res = tokio::time::timeout(timeout, rx).await;
        let ms = start.elapsed().as_millis() as u64;
        let out = match res {
            Err(_) => {
                inner
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(QmpError::Timeout {
                    path: inner.path.clone(),
                    cmd: cmd.to_string(),
                    secs: timeout.as_secs(),
                })
            }
            Ok(Err(_)) => Err(closed(cmd)),
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                cmd: cmd.to_string(),
                class,
                desc,
            }),
        };
        match &out {
            Ok(_) => tracing::info!(target: "vmrepl::qemu", cmd, ms, "QMP command done"),
            Err(e) => {
                tracing::info!(target: "vmrepl::qemu", cmd, ms, error = %e, "QMP command failed")
            }
        }
        out
    }

    /// A new receiver of events. Subscribe *before* sending the command whose events you
    /// wait for, or an early event can be missed.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.inner.events.subscribe()
    }

    /// Whether the connection has closed (QEMU exited).
    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    /// Resolves when the connection closes.
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Waits for the first event on `rx` that satisfies `pred`, until `deadline`. Fails
    /// with [`QmpError::Closed`] if the connection closes first.
    pub async fn wait_event<F>(
        &self,
        rx: &mut broadcast::Receiver<QmpEvent>,
        mut pred: F,
        deadline: Instant,
    ) -> Result<QmpEvent, QmpError>
    where
        F: FnMut(&QmpEvent) -> bool,
    {
        let start = Instant::now();
        let sleep = tokio::time::sleep_until(deadline.into());
        tokio::pin!(sleep);
        let closed_err = || QmpError::Closed {
            path: self.inner.path.clone(),
            cmd: "(waiting for an event)".into(),
        };
        loop {
            tokio::select! {
                biased;
                r = rx.recv() => match r {
                    Ok(ev) if pred(&ev) => return Ok(ev),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(target: "vmrepl::qemu", skipped = n, "QMP event receiver lagged");
                    }
                    Err(broadcast::error::RecvError::Closed) => return Err(closed_err()),
                },
                _ = self.closed() => {
                    // Events that arrived just before the close are still in the channel.
                    loop {
                        match rx.try_recv() {
                            Ok(ev) if pred(&ev) => return Ok(ev),
                            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                            Err(_) => return Err(closed_err()),
                        }
                    }
                }
                _ = &mut sleep => {
                    let ms = start.elapsed().as_millis() as u64;
                    tracing::info!(target: "vmrepl::qemu", ms, "QMP event wait timed out");
                    return Err(QmpError::EventTimeout {
                        what: "(matching the caller's predicate)".into(),
                        secs: ms / 1000,
                    });
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Guest agent
// ---------------------------------------------------------------------------------------------

/// Default time a guest-agent command may take. Windows VSS freezes and agents that just
/// started can be slow, so this is long.
pub const QGA_TIMEOUT: Duration = Duration::from_secs(60);

/// Client of the QEMU guest agent over the host-side virtio-serial socket.
///
/// The channel is a byte stream with no ids and may hold stale replies from an earlier
/// client, so every use starts with `guest-sync-delimited`: the agent answers with a 0xFF
/// byte and then the reply, and everything before the 0xFF is dropped. Commands run one at a
/// time.
pub struct Qga {
    path: PathBuf,
    conn: tokio::sync::Mutex<(BufReader<OwnedReadHalf>, OwnedWriteHalf)>,
    timeout: Duration,
    sync_id: AtomicU64,
}

/// One network interface of a guest, as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInterface {
    pub name: String,
    /// Lowercase, colon-separated.
    pub mac: String,
    /// `ADDRESS/PREFIX` each.
    pub addresses: Vec<String>,
}

/// The interfaces in a `guest-network-get-interfaces` reply (entries without a name skipped).
pub fn parse_interfaces(v: &Value) -> Vec<GuestInterface> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| {
                    Some(GuestInterface {
                        name: i.get("name")?.as_str()?.to_string(),
                        mac: i
                            .get("hardware-address")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_ascii_lowercase(),
                        addresses: i
                            .get("ip-addresses")
                            .and_then(Value::as_array)
                            .map(|xs| {
                                xs.iter()
                                    .filter_map(|x| {
                                        Some(format!(
                                            "{}/{}",
                                            x.get("ip-address")?.as_str()?,
                                            x.get("prefix")?.as_u64()?
                                        ))
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Drops bytes up to and including the first 0xFF; returns what follows, or None.
pub fn after_sentinel(buf: &[u8]) -> Option<&[u8]> {
    buf.iter().position(|b| *b == 0xFF).map(|i| &buf[i + 1..])
}

/// Whether a line the agent sent after the 0xFF sentinel answers `guest-sync-delimited` `id`.
pub(crate) fn is_sync_reply(line: &str, id: u64) -> bool {
    let v: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
    v.get("return").and_then(Value::as_u64) == Some(id)
}

/// A line from the agent without surrounding blanks and sentinel bytes; None when nothing is
/// left (the agent sends blank lines and stray sentinels, which are skipped).
pub(crate) fn agent_reply_text(line: &str) -> Option<&str> {
    let t = line.trim_matches(|c: char| c.is_whitespace() || c == '\u{FF}');
    (!t.is_empty()).then_some(t)
}

/// The agent's reply to `cmd` (its result or its error class and description), or why the
/// reply is out of protocol.
pub(crate) fn parse_agent_reply(cmd: &str, reply: &str) -> Result<Reply, String> {
    let obj = match serde_json::from_str::<Value>(reply) {
        Ok(Value::Object(o)) => o,
        _ => return Err(format!("reply to {cmd} is not a JSON object: {reply}")),
    };
    parse_reply(&obj).ok_or_else(|| format!("reply to {cmd} has neither return nor error: {reply}"))
}

impl Qga {
    /// Connects to the agent socket (the QEMU side; this succeeds even when no agent runs
    /// in the guest) and synchronises. `timeout` applies to each command.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qga, QmpError> {
        let stream = connect_retry(path, Duration::from_secs(5)).await?;
        let (rd, wr) = stream.into_split();
        let qga = Qga {
            path: path.to_path_buf(),
            conn: tokio::sync::Mutex::new((BufReader::new(rd), wr)),
            timeout,
            sync_id: AtomicU64::new(std::process::id() as u64 * 1000),
        };
        qga.sync().await?;
        Ok(qga)
    }

    /// Sets how long each later command may take (a freeze runs the guest's hooks).
    pub fn with_timeout(mut self, timeout: Duration) -> Qga {
        self.timeout = timeout;
        self
    }

    /// Resynchronises the stream with `guest-sync-delimited`.
    pub async fn sync(&self) -> Result<(), QmpError> {
        let id = self.sync_id.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let mut conn = self.conn.lock().await;
        let (rd, wr) = &mut *conn;
        let msg = format!(
            "{}\n",
            json!({"execute":"guest-sync-delimited","arguments":{"id":id}})
        );
        let fut = async {
            // A leading 0xFF makes the agent drop any partial input.
            wr.write_all(&[0xFF]).await?;
            wr.write_all(msg.as_bytes()).await?;
            loop {
                let mut junk = Vec::new();
                read_until_capped(rd, 0xFF, &mut junk, MAX_AGENT_LINE).await?;
                if junk.last() != Some(&0xFF) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "agent channel closed",
                    ));
                }
                let line = next_line_capped(rd, MAX_AGENT_LINE)
                    .await?
                    .unwrap_or_default();
                if is_sync_reply(&line, id) {
                    return Ok(());
                }
            }
        };
        let res = tokio::time::timeout(self.timeout, fut).await;
        let ms = start.elapsed().as_millis() as u64;
        tracing::info!(target: "vmrepl::qemu", cmd = "guest-sync-delimited", ms, ok = matches!(res, Ok(Ok(()))), "QGA command");
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(read_err("the guest agent", &self.path, e)),
            Err(_) => Err(QmpError::Timeout {
                path: self.path.clone(),
                cmd: "guest-sync-delimited (is the guest agent installed and running?)".into(),
                secs: self.timeout.as_secs(),
            }),
        }
    }

    /// Runs one agent command.
    pub async fn execute(&self, cmd: &str, args: Value) -> Result<Value, QmpError> {
        let start = Instant::now();
        let mut msg = json!({ "execute": cmd });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let line = format!("{msg}\n");
        let mut conn = self.conn.lock().await;
        let (rd, wr) = &mut *conn;
        let fut = async {
            wr.write_all(line.as_bytes()).await?;
            loop {
                let Some(reply) = next_line_capped(rd, MAX_AGENT_LINE).await? else {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "agent channel closed",
                    ));
                };
                if let Some(t) = agent_reply_text(&reply) {
                    return Ok(t.to_string());
                }
            }
        };
        let res = tokio::time::timeout(self.timeout, fut).await;
        let ms = start.elapsed().as_millis() as u64;
        tracing::info!(target: "vmrepl::qemu", cmd, ms, "QGA command");
        let reply = match res {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(read_err("the guest agent", &self.path, e)),
            Err(_) => {
                return Err(QmpError::Timeout {
                    path: self.path.clone(),
                    cmd: cmd.to_string(),
                    secs: self.timeout.as_secs(),
                })
            }
        };
        match parse_agent_reply(cmd, &reply) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err((class, desc))) => Err(QmpError::Command {
                cmd: cmd.to_string(),
                class,
                desc,
            }),
            Err(detail) => Err(QmpError::Agent {
                path: self.path.clone(),
                detail,
            }),
        }
    }

    /// `guest-network-get-interfaces`: each interface's name and hardware address
    /// (lowercase), with its IP addresses as `ADDRESS/PREFIX`.
    pub async fn network_interfaces(&self) -> Result<Vec<GuestInterface>, QmpError> {
        let v = self
            .execute("guest-network-get-interfaces", Value::Null)
            .await?;
        Ok(parse_interfaces(&v))
    }

    /// Runs `path` with `args` in the guest (`guest-exec`) and waits up to `limit` for it to
    /// end (`guest-exec-status`); returns its exit code and its standard error.
    pub async fn exec(
        &self,
        path: &str,
        args: &[&str],
        limit: Duration,
    ) -> Result<(i64, String), QmpError> {
        let v = self
            .execute(
                "guest-exec",
                serde_json::json!({"path": path, "arg": args, "capture-output": true}),
            )
            .await?;
        let pid = v
            .get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| QmpError::Agent {
                path: self.path.clone(),
                detail: format!("guest-exec gave no pid: {v}"),
            })?;
        let start = Instant::now();
        loop {
            let st = self
                .execute("guest-exec-status", serde_json::json!({ "pid": pid }))
                .await?;
            if st.get("exited").and_then(Value::as_bool) == Some(true) {
                let code = st.get("exitcode").and_then(Value::as_i64).unwrap_or(-1);
                let err = st
                    .get("err-data")
                    .and_then(Value::as_str)
                    .and_then(|b| {
                        use base64::Engine;
                        base64::engine::general_purpose::STANDARD.decode(b).ok()
                    })
                    .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                    .unwrap_or_default();
                return Ok((code, err));
            }
            if start.elapsed() > limit {
                return Err(QmpError::Agent {
                    path: self.path.clone(),
                    detail: format!(
                        "{path} did not end within {} s in the guest",
                        limit.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `guest-ping`.
    pub async fn ping(&self) -> Result<(), QmpError> {
        self.execute("guest-ping", Value::Null).await.map(|_| ())
    }

    /// `guest-fsfreeze-freeze`: the number of filesystems frozen. Always pair with
    /// [`Qga::fsfreeze_thaw`], also on error.
    pub async fn fsfreeze_freeze(&self) -> Result<u64, QmpError> {
        let v = self.execute("guest-fsfreeze-freeze", Value::Null).await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `guest-fsfreeze-thaw`: the number of filesystems thawed.
    pub async fn fsfreeze_thaw(&self) -> Result<u64, QmpError> {
        let v = self.execute("guest-fsfreeze-thaw", Value::Null).await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `guest-fsfreeze-status`: `"thawed"` or `"frozen"`.
    pub async fn fsfreeze_status(&self) -> Result<String, QmpError> {
        let v = self.execute("guest-fsfreeze-status", Value::Null).await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn guest_interfaces_are_read_with_lowercase_hardware_addresses_and_prefixed_ips() {
        let v: Value = serde_json::from_str(
            r#"[{"name":"lo","hardware-address":"00:00:00:00:00:00","ip-addresses":[{"ip-address-type":"ipv4","ip-address":"127.0.0.1","prefix":8}]},
                {"name":"eth0","hardware-address":"52:54:00:AB:CD:EF","ip-addresses":[{"ip-address-type":"ipv4","ip-address":"10.0.2.15","prefix":24}]},
                {"hardware-address":"52:54:00:00:00:01"},
                {"name":"eth1"}]"#,
        )
        .unwrap();
        let ifs = parse_interfaces(&v);
        assert_eq!(ifs.len(), 3, "{ifs:?}");
        assert_eq!(ifs[1].mac, "52:54:00:ab:cd:ef");
        assert_eq!(ifs[1].addresses, vec!["10.0.2.15/24"]);
        assert_eq!((ifs[2].name.as_str(), ifs[2].addresses.len()), ("eth1", 0));
        assert!(parse_interfaces(&Value::Null).is_empty());
    }

    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn sentinel_drops_stale_bytes() {
        assert_eq!(
            after_sentinel(b"junk\xff{\"a\":1}"),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(after_sentinel(b"junk"), None);
    }

    #[test]
    fn replies_and_events_parse() {
        let v: Value =
            serde_json::from_str(r#"{"error":{"class":"DeviceNotFound","desc":"no"},"id":3}"#)
                .unwrap();
        assert_eq!(
            parse_reply(v.as_object().unwrap()),
            Some(Err(("DeviceNotFound".into(), "no".into())))
        );
        let v: Value =
            serde_json::from_str(r#"{"timestamp":{"seconds":5,"microseconds":7},"event":"STOP"}"#)
                .unwrap();
        let ev = parse_event(v.as_object().unwrap()).unwrap();
        assert_eq!(ev.event, "STOP");
        assert_eq!(ev.timestamp.seconds, 5);
    }

    /// A fake agent: answers the sync after some stale bytes, then a ping and a freeze.
    #[tokio::test]
    async fn qga_syncs_past_stale_bytes_and_runs_commands() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            let mut buf = Vec::new();
            // 0xFF reset byte, then the sync line.
            rd.read_until(b'\n', &mut buf).await.unwrap();
            let line = after_sentinel(&buf).unwrap();
            let v: Value = serde_json::from_slice(line).unwrap();
            let id = v["arguments"]["id"].as_u64().unwrap();
            wr.write_all(b"{\"return\": 42}\n\xff").await.unwrap();
            wr.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
                .await
                .unwrap();
            for reply in [
                "{\"return\": {}}\n",
                "{\"return\": 2}\n",
                "{\"error\":{\"class\":\"GenericError\",\"desc\":\"frozen\"}}\n",
            ] {
                let mut l = String::new();
                rd.read_line(&mut l).await.unwrap();
                wr.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let qga = Qga::connect(&sock, Duration::from_secs(5)).await.unwrap();
        qga.ping().await.unwrap();
        assert_eq!(qga.fsfreeze_freeze().await.unwrap(), 2);
        let e = qga.fsfreeze_thaw().await.unwrap_err();
        assert_eq!(e.class(), Some("GenericError"));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_capped_read_takes_lines_up_to_the_limit_and_refuses_longer_ones() {
        let data = [b"abc\n".as_slice(), &[b'x'; 10], b"\n", &[b'y'; 11], b"\n"].concat();
        let mut r = &data[..];
        assert_eq!(
            next_line_capped(&mut r, 10).await.unwrap().as_deref(),
            Some("abc")
        );
        assert_eq!(
            next_line_capped(&mut r, 10).await.unwrap(),
            Some("x".repeat(10))
        );
        let e = next_line_capped(&mut r, 10).await.unwrap_err();
        let e = read_err("the guest agent", Path::new("/qga.sock"), e);
        assert!(matches!(e, QmpError::LineTooLong { limit: 10, .. }), "{e}");
        assert!(e.to_string().contains("limit of 10 bytes"), "{e}");
        // Without any delimiter at all the read stops at the limit, not at the end.
        let endless = [b'z'; 100];
        let mut r = &endless[..];
        let mut buf = Vec::new();
        assert!(read_until_capped(&mut r, 0xFF, &mut buf, 10).await.is_err());
        assert!(buf.is_empty());
    }

    /// A fake agent that syncs and then answers `guest-ping` with `reply`.
    async fn agent_answering(sock: &Path, reply: Vec<u8>) -> tokio::task::JoinHandle<()> {
        let l = UnixListener::bind(sock).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let mut rd = BufReader::new(rd);
            let mut buf = Vec::new();
            rd.read_until(b'\n', &mut buf).await.unwrap();
            let v: Value = serde_json::from_slice(after_sentinel(&buf).unwrap()).unwrap();
            let id = v["arguments"]["id"].as_u64().unwrap();
            wr.write_all(&[0xFF]).await.unwrap();
            wr.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
                .await
                .unwrap();
            let mut l = String::new();
            rd.read_line(&mut l).await.unwrap();
            // The client stops reading at the limit: the rest may never be taken.
            let _ = wr.write_all(&reply).await;
        })
    }

    #[tokio::test]
    async fn an_agent_reply_longer_than_the_limit_is_refused_with_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let server = agent_answering(&sock, vec![b'a'; 2 * MAX_AGENT_LINE]).await;
        let qga = Qga::connect(&sock, Duration::from_secs(10)).await.unwrap();
        let e = qga.ping().await.unwrap_err();
        match &e {
            QmpError::LineTooLong { peer, limit, .. } => {
                assert_eq!((*peer, *limit), ("the guest agent", MAX_AGENT_LINE));
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("1048576 bytes"), "{e}");
        server.abort();
    }

    #[tokio::test]
    async fn an_agent_that_never_sends_the_sync_sentinel_is_cut_off_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qga.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (_rd, mut wr) = s.into_split();
            let _ = wr.write_all(&vec![b'j'; 2 * MAX_AGENT_LINE]).await;
            std::future::pending::<()>().await;
        });
        let e = Qga::connect(&sock, Duration::from_secs(10))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, QmpError::LineTooLong { .. }), "{e}");
        server.abort();
    }
}
