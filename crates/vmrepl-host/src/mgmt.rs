//! The local management API transport: JSON lines over a Unix socket in the data folder,
//! owner-only. One [`Request`] line in, one [`Response`] line out, any number per connection.
//!
//! Only root and the user the daemon runs as may connect: the socket is 0600 (created under
//! the process umask 077, see [`crate::fsutil::set_private_umask`]) and every connection's
//! peer uid (`SO_PEERCRED`) is checked as well.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use vmrepl_types::api::{ApiError, ErrorCode, Request, Response};

/// Longest request line accepted (a VM definition is a few KiB).
pub const MAX_REQUEST: usize = 1 << 20;

/// Longest answer line sent or accepted (the largest is `vm console --tail` at its 16 MiB
/// limit, which JSON escaping can make a few times longer).
pub const MAX_RESPONSE: usize = 128 << 20;

/// Whether the local user `peer_uid` may use the API of a daemon running as `own_uid`: only
/// root and the daemon's own user may. The error is the answer the refused client gets.
pub fn check_peer(peer_uid: u32, own_uid: u32) -> Result<(), ApiError> {
    if peer_uid == 0 || peer_uid == own_uid {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::PermissionDenied,
        format!(
            "This vmrepl daemon accepts requests only from root and from its own user (uid {own_uid}); you are uid {peer_uid}. Run the command as root (e.g. with sudo) or as that user."
        ),
    ))
}

/// Something that answers requests: the daemon.
pub trait Handler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, req: Request) -> impl std::future::Future<Output = Response> + Send;
}

/// Errors of the management transport.
#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    #[error("No vmrepl daemon answers on {path} ({source}). Start it with `vmrepl --data {data} daemon` (or `daemon --background`).")]
    NotRunning {
        path: PathBuf,
        data: PathBuf,
        source: std::io::Error,
    },
    #[error("Cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("The daemon closed the connection before answering; see its log (daemon.log in the data folder).")]
    Closed,
    #[error("I/O error talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("The daemon's answer is not valid JSON ({0}); the CLI and the daemon may be different releases.")]
    BadAnswer(String),
    #[error("The daemon's answer is longer than the limit of {limit} bytes; it was not read. Ask for less (e.g. a smaller `vm console --tail`).")]
    AnswerTooLong { limit: usize },
}

/// Binds the socket (removing a stale one: the caller holds the daemon lock) with mode 0600.
/// The process umask (077 in `vmrepl`) makes it owner-only from creation; the chmod covers
/// callers with another umask, and [`serve`] checks each peer's uid whatever the mode.
pub fn bind(path: &Path) -> Result<UnixListener, MgmtError> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|source| MgmtError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        MgmtError::Bind {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(l)
}

/// Serves connections until the listener fails. Connections of other local users than root
/// and the daemon's own user get one error answer and are closed.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    let own_uid = nix::unistd::geteuid().as_raw();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let h = handler.clone();
                tokio::spawn(async move {
                    let checked = match stream.peer_cred() {
                        Ok(c) => check_peer(c.uid(), own_uid).map_err(|e| (e, c.uid(), c.pid())),
                        Err(e) => Err((
                            ApiError::new(
                                ErrorCode::PermissionDenied,
                                format!("The daemon cannot tell which user connected ({e}); the connection was refused."),
                            ),
                            u32::MAX,
                            None,
                        )),
                    };
                    if let Err((refusal, uid, pid)) = checked {
                        tracing::warn!(target: "vmrepl::mgmt", uid, ?pid, "refused a local connection: {}", refusal.message);
                        let _ = refuse(stream, refusal).await;
                        return;
                    }
                    if let Err(e) = serve_conn(stream, h).await {
                        tracing::debug!(target: "vmrepl::mgmt", "connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::error!(target: "vmrepl::mgmt", "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Answers a refused connection with `e`. The client's request is read (and dropped, up to
/// [`MAX_REQUEST`] bytes, for at most 5 s) before closing, so that its write does not fail
/// with a broken pipe before it reads the answer.
async fn refuse(mut stream: UnixStream, e: ApiError) -> std::io::Result<()> {
    let mut out = serde_json::to_string(&Response::Error(e)).unwrap_or_default();
    out.push('\n');
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await?;
    let mut sink = tokio::io::sink();
    let mut request = (&mut stream).take(MAX_REQUEST as u64);
    let drain = tokio::io::copy(&mut request, &mut sink);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
    Ok(())
}

/// The answer line for `resp`, or an error answer if it would be longer than
/// [`MAX_RESPONSE`].
fn encode_response(resp: &Response) -> String {
    let mut out = serde_json::to_string(resp).unwrap_or_else(|e| {
        format!(r#"{{"kind":"error","code":"internal","message":"cannot encode answer: {e}"}}"#)
    });
    if out.len() > MAX_RESPONSE {
        out = serde_json::to_string(&Response::Error(ApiError::new(
            ErrorCode::InvalidInput,
            format!(
                "The answer would be {} bytes, more than the limit of {MAX_RESPONSE}; ask for less.",
                out.len()
            ),
        )))
        .unwrap_or_default();
    }
    out.push('\n');
    out
}

async fn serve_conn<H: Handler>(stream: UnixStream, handler: Arc<H>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut r)
            .take(MAX_REQUEST as u64 + 1)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let resp = if n > MAX_REQUEST {
            Response::Error(ApiError::new(
                ErrorCode::InvalidInput,
                format!("The request is longer than {MAX_REQUEST} bytes; it was refused."),
            ))
        } else {
            match serde_json::from_str::<Request>(line.trim_end()) {
                Ok(req) => {
                    let t = std::time::Instant::now();
                    let op = op_name(&req);
                    let resp = handler.clone().handle(req).await;
                    tracing::info!(target: "vmrepl::mgmt", op, ms = t.elapsed().as_millis() as u64, ok = !matches!(resp, Response::Error(_)), "request");
                    resp
                }
                Err(e) => Response::Error(ApiError::new(
                    ErrorCode::InvalidInput,
                    format!(
                        "The request is not valid for the vmrepl API: {e}. Nothing was changed."
                    ),
                )),
            }
        };
        let out = encode_response(&resp);
        w.write_all(out.as_bytes()).await?;
        if n > MAX_REQUEST {
            return Ok(());
        }
    }
}

fn op_name(r: &Request) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(String::from))
        .unwrap_or_default()
}

/// A client of the management API.
pub struct Client {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    /// Connects to the daemon of the data folder `data`.
    pub async fn connect(data: &Path, sock: &Path) -> Result<Self, MgmtError> {
        let s = UnixStream::connect(sock)
            .await
            .map_err(|source| MgmtError::NotRunning {
                path: sock.to_path_buf(),
                data: data.to_path_buf(),
                source,
            })?;
        let (r, w) = s.into_split();
        Ok(Client {
            reader: BufReader::new(r),
            writer: w,
        })
    }

    /// Sends one request and reads its answer.
    pub async fn call(&mut self, req: &Request) -> Result<Response, MgmtError> {
        let mut line =
            serde_json::to_string(req).map_err(|e| MgmtError::BadAnswer(e.to_string()))?;
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        let mut answer = String::new();
        let n = (&mut self.reader)
            .take(MAX_RESPONSE as u64 + 1)
            .read_line(&mut answer)
            .await?;
        if n == 0 {
            return Err(MgmtError::Closed);
        }
        if n > MAX_RESPONSE {
            return Err(MgmtError::AnswerTooLong {
                limit: MAX_RESPONSE,
            });
        }
        serde_json::from_str(answer.trim_end()).map_err(|e| MgmtError::BadAnswer(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Handler for Echo {
        async fn handle(self: Arc<Self>, req: Request) -> Response {
            Response::Ok {
                message: op_name(&req),
            }
        }
    }

    #[tokio::test]
    async fn requests_get_answers_and_garbage_gets_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("m.sock");
        let l = bind(&sock).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        tokio::spawn(serve(l, Arc::new(Echo)));
        let mut c = Client::connect(d.path(), &sock).await.unwrap();
        let r = c.call(&Request::Ping).await.unwrap();
        assert_eq!(
            r,
            Response::Ok {
                message: "ping".into()
            }
        );
        // A malformed line on a raw connection.
        let mut s = UnixStream::connect(&sock).await.unwrap();
        s.write_all(b"{\"op\":\"vm-start\",\"name\":\"../x\"}\n")
            .await
            .unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        let resp: Response = serde_json::from_str(&line).unwrap();
        match resp {
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::InvalidInput);
                assert!(e.message.contains("Nothing was changed"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_root_and_the_daemons_own_user_may_use_the_api() {
        assert!(check_peer(0, 1000).is_ok());
        assert!(check_peer(1000, 1000).is_ok());
        assert!(check_peer(0, 0).is_ok());
        let e = check_peer(1001, 1000).unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert!(
            e.message.contains("uid 1001") && e.message.contains("uid 1000"),
            "{}",
            e.message
        );
        assert!(check_peer(1000, 0).is_err());
    }

    #[test]
    fn an_answer_over_the_limit_becomes_an_error_answer() {
        let big = Response::Ok {
            message: "x".repeat(MAX_RESPONSE + 1),
        };
        let out = encode_response(&big);
        assert!(out.len() < 1000, "{}", out.len());
        match serde_json::from_str::<Response>(out.trim_end()).unwrap() {
            Response::Error(e) => assert!(e.message.contains("limit"), "{}", e.message),
            other => panic!("{other:?}"),
        }
    }

    /// As root, a connection from another user (nobody, uid 65534) through a socket it can
    /// reach is refused by its peer uid, with an answer that says why.
    #[tokio::test]
    async fn a_connection_from_another_local_user_is_refused_by_its_uid() {
        if !nix::unistd::geteuid().is_root() || which("python3").is_none() {
            eprintln!("skipped: needs root and python3");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = d.path().join("m.sock");
        let l = bind(&sock).unwrap();
        // Open the socket to everyone: the uid check alone must refuse.
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let server = tokio::spawn(serve(l, Arc::new(Echo)));
        let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b'{"op":"ping"}\n')
sys.stdout.write(s.makefile().readline())
"#;
        let out = tokio::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&sock)
            .uid(65534)
            .gid(65534)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let resp: Response = serde_json::from_slice(&out.stdout).unwrap();
        match resp {
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::PermissionDenied);
                assert!(e.message.contains("uid 65534"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        // Root (this process) is still served.
        let mut c = Client::connect(d.path(), &sock).await.unwrap();
        assert!(matches!(
            c.call(&Request::Ping).await.unwrap(),
            Response::Ok { .. }
        ));
        server.abort();
    }

    fn which(prog: &str) -> Option<PathBuf> {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(prog))
                .find(|c| c.is_file())
        })
    }

    #[tokio::test]
    async fn a_missing_daemon_is_reported_with_the_command_that_starts_it() {
        let d = tempfile::tempdir().unwrap();
        let e = Client::connect(d.path(), &d.path().join("none.sock"))
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("daemon"), "{e}");
    }
}
