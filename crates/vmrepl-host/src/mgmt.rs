//! The local management API transport: JSON lines over a Unix socket in the data folder,
//! owner-only. One [`Request`] line in, one [`Response`] line out, any number per connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use vmrepl_types::api::{ApiError, ErrorCode, Request, Response};

/// Longest request line accepted (a VM definition is a few KiB).
pub const MAX_REQUEST: usize = 1 << 20;

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
}

/// Binds the socket (removing a stale one: the caller holds the daemon lock) with mode 0600.
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

/// Serves connections until the listener fails.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let h = handler.clone();
                tokio::spawn(async move {
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
        let mut out = serde_json::to_string(&resp).unwrap_or_else(|e| {
            format!(r#"{{"kind":"error","code":"internal","message":"cannot encode answer: {e}"}}"#)
        });
        out.push('\n');
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
        if self.reader.read_line(&mut answer).await? == 0 {
            return Err(MgmtError::Closed);
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
