//! Primary side of the peer API: one mutually authenticated connection to a replica server.
//!
//! ```text
//! let (mut c, theirs) = PeerClient::connect(&identity, &my_info, "b.example:7443", "b.example").await?;
//! c.request(&PeerRequest::CheckReplica { vm }).await?;           // -> PeerResponse::Ok
//! c.send_log(vm_uuid, (seq, base), None, &path, |sent| ..).await?; // -> PeerResponse::LogAck
//! ```
//!
//! A `PeerResponse::Refused` answer to [`PeerClient::request`] is returned as `Ok` (the caller
//! decides); [`PeerClient::call`] turns it into [`PeerError::Refused`].

use super::proto::{PeerRequest, PeerResponse, RefusalCode, Resume};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// How long a primary waits for the answer to a whole log: the replica verifies it as it
/// arrives, but makes it durable (and first applies what it still holds) before answering.
pub const ANSWER_TO_LOG: Duration = Duration::from_secs(15 * 60);

/// How long a primary waits for the block digests of a replica's disks (read whole).
pub const ANSWER_TO_DIGESTS: Duration = Duration::from_secs(3600);
use std::sync::Arc;
use uuid::Uuid;
use vmrepl_transport::frame::{self, FrameError, Framed};
use vmrepl_transport::pki::HostIdentity;
use vmrepl_transport::tls::{self, PeerIdentity, TlsError, TlsStream};
use vmrepl_types::HostInfo;

/// Size of the Data frames a log is streamed in.
pub const DATA_CHUNK: usize = 1024 * 1024;

/// How much of a log its writer has put in the file, and whether it finished (`Some(true)`)
/// or failed (`Some(false)`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogGrowth {
    pub written: u64,
    pub done: Option<bool>,
    /// A resynchronization by compare: bytes compared so far, of `compare_total`, and how many
    /// blocks differed.
    pub compared: u64,
    pub compare_total: u64,
    pub differing_blocks: u64,
}

/// Why talking to another host failed. The client is a primary talking to its replica server,
/// or a replica server asking its primary before a failover: messages name the host, not a
/// role that may be the wrong one.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Network: unreachable, refused, timed out, or the connection was lost.
    #[error("cannot talk to {host} at {addr}: {detail}{}", connect_hint(detail))]
    Connect {
        host: String,
        addr: String,
        detail: String,
    },
    /// Certificates (ours refused, theirs not acceptable, handshake problems).
    #[error("{0}")]
    Tls(String),
    /// The other host answered with a refusal.
    #[error("the other host refused: {message}")]
    Refused { code: RefusalCode, message: String },
    /// The peer said something we did not expect.
    #[error("protocol error with {host}: {detail}")]
    Protocol { host: String, detail: String },
    /// A local file could not be read.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The hint of [`PeerError::Connect`], unless the detail gives one already (each hint once).
fn connect_hint(detail: &str) -> &'static str {
    if detail.contains("check that") {
        ""
    } else {
        "; check that the vmrepl daemon there runs and its port is open"
    }
}

impl PeerError {
    /// Whether the failure is the network's (worth retrying later).
    pub fn is_network(&self) -> bool {
        matches!(self, PeerError::Connect { .. })
    }
}

/// A connection to a replica server, after the Hello exchange.
pub struct PeerClient {
    framed: Framed<TlsStream>,
    peer: PeerIdentity,
    host: String,
    addr: String,
    /// The relationship's bandwidth limit, when it has one.
    pacer: Option<Pacer>,
    /// The host's limit, shared by every relationship that sends (when it has one).
    host_pacer: Option<Arc<HostPacer>>,
}

/// The host's bandwidth limit (a QoS policy): one pace for every log this host sends, in force
/// inside its daily window only (UTC; always without one). A pause of over a second starts the
/// pace afresh, so idle time earns no burst.
#[derive(Debug)]
pub struct HostPacer {
    rate: u64,
    window: Option<vmrepl_types::replication::ResyncPolicy>,
    state: std::sync::Mutex<Pacer>,
}

impl HostPacer {
    /// A pace of `rate` bytes per second, inside `window` (a `HH:MM-HH:MM` window) if given.
    pub fn new(rate: u64, window: Option<vmrepl_types::replication::ResyncPolicy>) -> HostPacer {
        HostPacer {
            rate,
            window,
            state: std::sync::Mutex::new(Pacer::new(rate)),
        }
    }

    /// Whether the limit is in force at `now_unix_ms`.
    pub fn in_force(&self, now_unix_ms: u64) -> bool {
        self.window
            .as_ref()
            .is_none_or(|w| w.wait_ms(now_unix_ms) == Some(0))
    }

    /// When `n` more bytes may count as sent by this host (now when out of its window).
    fn due_after(&self, n: u64) -> tokio::time::Instant {
        if !self.in_force(crate::db::now_ms()) {
            return tokio::time::Instant::now();
        }
        crate::locks::unpoisoned(&self.state).due_after(n)
    }
}

/// Paces a transfer to `rate` bytes per second: after each frame the sender waits until the
/// bytes sent are due at that rate. Time when nothing was sent earns no burst: a pacer whose
/// bytes are all due already starts afresh from now (so neither the time between cycles nor a
/// pause in a transfer lets more than the rate through afterwards).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pacer {
    rate: u64,
    start: tokio::time::Instant,
    sent: u64,
}

impl Pacer {
    pub(crate) fn new(rate: u64) -> Pacer {
        Pacer {
            rate: rate.max(1),
            start: tokio::time::Instant::now(),
            sent: 0,
        }
    }

    fn restart(&mut self) {
        self.start = tokio::time::Instant::now();
        self.sent = 0;
    }

    fn due(&self) -> tokio::time::Instant {
        self.start + std::time::Duration::from_secs_f64(self.sent as f64 / self.rate as f64)
    }

    /// When `n` more bytes may be considered sent.
    pub(crate) fn due_after(&mut self, n: u64) -> tokio::time::Instant {
        if self.due() < tokio::time::Instant::now() {
            self.restart();
        }
        self.sent += n;
        self.due()
    }
}

#[cfg(test)]
mod pacer_tests {
    use super::Pacer;
    use std::time::Duration;

    #[test]
    fn a_pacer_makes_bytes_due_at_its_rate_and_time_idle_earns_no_burst() {
        let mut p = Pacer::new(1 << 20);
        let first = p.due_after(512 << 10);
        assert_eq!(p.due_after(512 << 10) - first, Duration::from_millis(500));
        // Idle until every byte is due (and a little more): the next bytes are due a rate's
        // worth from now, not at once.
        let idle_until = p.due() + Duration::from_millis(20);
        while tokio::time::Instant::now() < idle_until {
            std::thread::sleep(Duration::from_millis(5));
        }
        let before = tokio::time::Instant::now();
        let due = p.due_after(256 << 10);
        assert!(
            due >= before + Duration::from_millis(250),
            "{:?}",
            due - before
        );
        p.restart();
        assert_eq!(p.sent, 0, "a new transfer earns no burst from the old one");
        assert_eq!(Pacer::new(0).rate, 1);
    }

    #[test]
    fn a_host_limit_is_in_force_inside_its_window_only() {
        use super::HostPacer;
        use vmrepl_types::replication::ResyncPolicy;
        let always = HostPacer::new(1 << 20, None);
        assert!(always.in_force(0));
        let office = HostPacer::new(1 << 20, Some(ResyncPolicy::parse("08:00-18:00").unwrap()));
        let at = |h: u64| h * 3_600_000;
        assert!(office.in_force(at(9)));
        assert!(!office.in_force(at(20)));
        let night = HostPacer::new(1 << 20, Some(ResyncPolicy::parse("22:00-06:00").unwrap()));
        assert!(night.in_force(at(23)) && night.in_force(at(3)));
        assert!(!night.in_force(at(12)));
    }
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("host", &self.host)
            .field("addr", &self.addr)
            .field("peer", &self.peer)
            .finish()
    }
}

fn tls_err(host: &str, addr: &str, e: TlsError) -> PeerError {
    match e {
        TlsError::Resolve { .. } | TlsError::Connect { .. } | TlsError::ConnectTimeout { .. } => {
            PeerError::Connect {
                host: host.to_string(),
                addr: addr.to_string(),
                detail: e.to_string(),
            }
        }
        other => PeerError::Tls(other.to_string()),
    }
}

impl PeerClient {
    /// Limits the logs this connection sends to `rate` bytes per second (None: no limit).
    pub fn set_rate_limit(&mut self, rate: Option<u64>) {
        self.pacer = rate.map(Pacer::new);
    }

    /// Also paces the logs this connection sends by the host's limit, shared with others.
    pub fn set_host_pacer(&mut self, p: Option<Arc<HostPacer>>) {
        self.host_pacer = p;
    }

    /// Writes one Data frame, at the pace of the bandwidth limit if there is one.
    /// Frames are cut to a tenth of a second's worth (16 KiB at least), so a slow link is
    /// fed evenly rather than in bursts of a whole frame.
    async fn write_paced(&mut self, data: &[u8]) -> Result<(), PeerError> {
        let host = self.host_pacer.clone();
        let rate = match (self.pacer.map(|p| p.rate), host.as_ref().map(|h| h.rate)) {
            (None, None) => {
                return match self.framed.write_data(data).await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(self.ferr(e)),
                }
            }
            (a, b) => a.into_iter().chain(b).min().unwrap_or(u64::MAX),
        };
        let piece = ((rate / 10) as usize).clamp(16 << 10, DATA_CHUNK);
        for part in data.chunks(piece) {
            if let Err(e) = self.framed.write_data(part).await {
                return Err(self.ferr(e));
            }
            let n = part.len() as u64;
            let mine = self.pacer.as_mut().map(|p| p.due_after(n));
            let hosts = host.as_ref().map(|h| h.due_after(n));
            if let Some(due) = mine.into_iter().chain(hosts).max() {
                tokio::time::sleep_until(due).await;
            }
        }
        Ok(())
    }

    fn restart_pacer(&mut self) {
        if let Some(p) = self.pacer.as_mut() {
            p.restart();
        }
    }

    /// Connects to the replica server `expected_host` at `addr` (host:port), checks its
    /// certificate names `expected_host`, negotiates the protocol version and exchanges Hello.
    /// Returns the connection and the replica's [`HostInfo`].
    pub async fn connect(
        identity: &HostIdentity,
        my_info: &HostInfo,
        addr: &str,
        expected_host: &str,
    ) -> Result<(PeerClient, HostInfo), PeerError> {
        let (stream, peer) = tls::connect(addr, expected_host, identity)
            .await
            .map_err(|e| tls_err(expected_host, addr, e))?;
        let framed = Framed::negotiate(stream, frame::SUPPORTED)
            .await
            .map_err(|e| frame_err(expected_host, addr, e))?;
        let mut c = PeerClient {
            framed,
            peer,
            host: expected_host.to_string(),
            addr: addr.to_string(),
            pacer: None,
            host_pacer: None,
        };
        let hello = PeerRequest::Hello {
            host_info: Box::new(my_info.clone()),
        };
        match c.request(&hello).await? {
            PeerResponse::Hello { host_info } => Ok((c, *host_info)),
            PeerResponse::Refused { code, message } => Err(PeerError::Refused { code, message }),
            other => Err(c.protocol(format!("expected Hello, got {other:?}"))),
        }
    }

    /// The replica server's verified identity.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u32 {
        self.framed.version()
    }

    fn protocol(&self, detail: String) -> PeerError {
        PeerError::Protocol {
            host: self.host.clone(),
            detail,
        }
    }

    fn ferr(&self, e: FrameError) -> PeerError {
        frame_err(&self.host, &self.addr, e)
    }

    /// Sends one request and reads its answer (a refusal is an `Ok(PeerResponse::Refused)`).
    pub async fn request(&mut self, req: &PeerRequest) -> Result<PeerResponse, PeerError> {
        if let Err(e) = self.framed.write_control(req).await {
            return Err(self.ferr(e));
        }
        self.read_response().await
    }

    /// Like [`PeerClient::request`], with a refusal as [`PeerError::Refused`].
    pub async fn call(&mut self, req: &PeerRequest) -> Result<PeerResponse, PeerError> {
        let usual = self.framed.timeout();
        self.call_within(req, usual).await
    }

    /// Sends log `seq` (on `base`) while it is encoded: each chunk from `chunks` goes out as
    /// data frames, and the end of the log only once `growth` says the encoder finished well.
    /// An encoder that failed abandons the transfer (the connection is dropped without the end
    /// frame, so the replica keeps nothing as a whole log).
    pub async fn send_log_stream(
        &mut self,
        vm_uuid: Uuid,
        (seq, base_seq): (u64, u64),
        mut chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
        mut growth: tokio::sync::watch::Receiver<LogGrowth>,
        mut progress: impl FnMut(u64),
    ) -> Result<PeerResponse, PeerError> {
        let req = PeerRequest::SendLog {
            vm_uuid,
            sequence: seq,
            base_sequence: base_seq,
            resume: None,
        };
        if let Err(e) = self.framed.write_control(&req).await {
            return Err(self.ferr(e));
        }
        self.restart_pacer();
        let mut sent = 0u64;
        while let Some(chunk) = chunks.recv().await {
            for part in chunk.chunks(DATA_CHUNK) {
                self.write_paced(part).await?;
            }
            sent += chunk.len() as u64;
            progress(sent);
        }
        let ok = growth
            .wait_for(|g| g.done.is_some())
            .await
            .map(|g| g.done == Some(true))
            .unwrap_or(false);
        if !ok {
            return Err(PeerError::Io {
                action: "build",
                path: std::path::PathBuf::from(format!("log {seq}")),
                source: std::io::Error::other("the log could not be encoded"),
            });
        }
        if let Err(e) = self.framed.write_data(&[]).await {
            return Err(self.ferr(e));
        }
        self.read_response_within(ANSWER_TO_LOG).await
    }

    async fn read_response(&mut self) -> Result<PeerResponse, PeerError> {
        match self.framed.read_control::<PeerResponse>().await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.ferr(e)),
        }
    }

    /// Reads the answer to a request that needs long work on the replica, with the deadline
    /// `t` instead of the frame deadline.
    async fn read_response_within(&mut self, t: Duration) -> Result<PeerResponse, PeerError> {
        let usual = self.framed.timeout();
        self.framed.set_timeout(t);
        let r = self.read_response().await;
        self.framed.set_timeout(usual);
        r
    }

    /// Sends one request whose answer needs long work on the replica (block digests of whole
    /// disks), waiting for it up to `t`.
    pub async fn call_within(
        &mut self,
        req: &PeerRequest,
        t: Duration,
    ) -> Result<PeerResponse, PeerError> {
        if let Err(e) = self.framed.write_control(req).await {
            return Err(self.ferr(e));
        }
        match self.read_response_within(t).await? {
            PeerResponse::Refused { code, message } => Err(PeerError::Refused { code, message }),
            r => Ok(r),
        }
    }

    /// Sends log `seq` (built on `base_seq`) from the file `log_file` (from `resume.bytes` when
    /// resuming a cut transfer, else from its start), in Data frames of at most 1 MiB, ended by
    /// an empty Data frame; `progress` is called with the bytes sent so far (of this transfer).
    /// Returns the replica's answer: `LogAck` once the log is durable and verified there, or
    /// `Refused`.
    pub async fn send_log(
        &mut self,
        vm_uuid: Uuid,
        (seq, base_seq): (u64, u64),
        resume: Option<Resume>,
        log_file: &Path,
        mut progress: impl FnMut(u64),
    ) -> Result<PeerResponse, PeerError> {
        let req = PeerRequest::SendLog {
            vm_uuid,
            sequence: seq,
            base_sequence: base_seq,
            resume,
        };
        self.send_file(&req, log_file, resume.map_or(0, |r| r.bytes), &mut progress)
            .await
    }

    /// Sends `req` followed by the file `path` from byte `from` as Data frames of at most
    /// 1 MiB, ended by an empty Data frame, and reads the answer (with the deadline of an
    /// answer to a whole log); `progress` gets the bytes sent so far.
    async fn send_file(
        &mut self,
        req: &PeerRequest,
        path: &Path,
        from: u64,
        progress: &mut impl FnMut(u64),
    ) -> Result<PeerResponse, PeerError> {
        let io = |action: &'static str| {
            let path = path.to_path_buf();
            move |source| PeerError::Io {
                action,
                path,
                source,
            }
        };
        let mut f = tokio::fs::File::open(path).await.map_err(io("open"))?;
        if from > 0 {
            use tokio::io::AsyncSeekExt;
            f.seek(std::io::SeekFrom::Start(from))
                .await
                .map_err(io("seek in"))?;
        }
        if let Err(e) = self.framed.write_control(req).await {
            return Err(self.ferr(e));
        }
        self.restart_pacer();
        let mut buf = vec![0u8; DATA_CHUNK];
        let mut sent = 0u64;
        loop {
            let want = buf.len();
            let mut n = 0;
            while n < want {
                let k = f.read(&mut buf[n..want]).await.map_err(io("read"))?;
                if k == 0 {
                    break;
                }
                n += k;
            }
            if n == 0 {
                break;
            }
            self.write_paced(&buf[..n]).await?;
            sent += n as u64;
            progress(sent);
        }
        if let Err(e) = self.framed.write_data(&[]).await {
            return Err(self.ferr(e));
        }
        self.read_response_within(ANSWER_TO_LOG).await
    }

    /// Sends the `SendLog` request `req` and `data` as its first Data frames, and then nothing
    /// (tests of a stalled primary keep the connection open after it).
    #[doc(hidden)]
    pub async fn send_partial(&mut self, req: &PeerRequest, data: &[u8]) -> Result<(), PeerError> {
        if let Err(e) = self.framed.write_control(req).await {
            return Err(self.ferr(e));
        }
        for chunk in data.chunks(64 * 1024) {
            if let Err(e) = self.framed.write_data(chunk).await {
                return Err(self.ferr(e));
            }
        }
        Ok(())
    }

    /// Sends the boot file `file` of VM `vm_uuid` from `path` (its size and BLAKE3 digest
    /// `blake3` computed by the caller). Returns the replica's answer.
    pub async fn put_boot_file(
        &mut self,
        vm_uuid: Uuid,
        file: super::proto::BootFile,
        path: &Path,
        (size, blake3): (u64, String),
    ) -> Result<PeerResponse, PeerError> {
        let req = PeerRequest::PutBootFile {
            vm_uuid,
            file,
            size,
            blake3,
        };
        self.send_file(&req, path, 0, &mut |_| {}).await
    }

    /// Sends only part of a log and then drops the connection (tests of resume use it to
    /// simulate a cut transfer): the `SendLog` request and `bytes` bytes of `data`.
    #[doc(hidden)]
    pub async fn send_partial_and_drop(
        mut self,
        req: &PeerRequest,
        data: &[u8],
    ) -> Result<(), PeerError> {
        self.send_partial(req, data).await?;
        let mut inner = self.framed.into_inner();
        use tokio::io::AsyncWriteExt;
        let _ = inner.flush().await;
        let _ = inner.shutdown().await;
        Ok(())
    }
}

fn frame_err(host: &str, addr: &str, e: FrameError) -> PeerError {
    match e {
        FrameError::Io(_)
        | FrameError::Closed
        | FrameError::Truncated { .. }
        | FrameError::TimedOut { .. } => PeerError::Connect {
            host: host.to_string(),
            addr: addr.to_string(),
            detail: format!("the connection was lost: {e}"),
        },
        other => PeerError::Protocol {
            host: host.to_string(),
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_error_states_its_hint_once() {
        let e = PeerError::Connect {
            host: "hostb".into(),
            addr: "10.0.0.2:7443".into(),
            detail: "refused; check that the vmrepl daemon runs there".into(),
        };
        assert_eq!(e.to_string().matches("check that").count(), 1, "{e}");
        let e = PeerError::Connect {
            host: "hostb".into(),
            addr: "10.0.0.2:7443".into(),
            detail: "the connection was lost".into(),
        };
        assert!(e.to_string().ends_with("its port is open"), "{e}");
    }
}
