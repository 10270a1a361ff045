//! The web dashboard: one HTML page and its JSON (`GET /api/overview`), served over HTTPS with
//! the host's certificate on the address `dashboard` in the configuration file (`docs/dashboard.md`).
//!
//! Who may look: a browser that shows a client certificate issued by this host's CA (verified
//! in the TLS handshake), or one that knows the token in `DATA/dashboard.token`
//! (`vmrepl dashboard` prints a URL with it). The token is taken as `Authorization: Bearer`,
//! as `?token=` on `/` (answered with a cookie and a redirect, so the token leaves the address
//! bar), or as that cookie. The token file is read on every request: `vmrepl dashboard
//! --rotate` takes effect at once.
//!
//! Like the metrics page, the server is deliberately small: one request per connection, a
//! bounded request head read within a deadline, a bounded number of connections at a time.

pub mod api;

use crate::datadir::DataDir;
use crate::host::Host;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The default address of the dashboard (loopback; HTTPS and authenticated all the same).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9470";
/// The cookie that carries the token once a `?token=` URL was opened.
pub const COOKIE: &str = "vmrepl_dashboard";
/// Time a client has for the TLS handshake and its request head.
const READ_DEADLINE: Duration = Duration::from_secs(10);
/// Time to write an answer.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// The longest request head read.
const MAX_HEAD: usize = 8192;
/// Connections served at a time; more wait for a slot.
const MAX_CONNECTIONS: usize = 32;

/// What can go wrong with the dashboard's token and TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("Cannot read the dashboard token {path}: {source}")]
    TokenRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Cannot write the dashboard token {path}: {source}")]
    TokenWrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("The dashboard token in {path} is not 64 hexadecimal digits; run `vmrepl dashboard --rotate` to make a new one.")]
    TokenInvalid { path: PathBuf },
    #[error("Cannot read {path} for the dashboard's TLS: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("Cannot set up the dashboard's TLS: {0}")]
    Tls(String),
}

/// Where the token is kept.
pub fn token_path(dd: &DataDir) -> PathBuf {
    dd.root().join("dashboard.token")
}

fn random_token() -> Result<String, std::io::Error> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(hex(&b))
}

use std::io::Read as _;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn valid_token(t: &str) -> bool {
    t.len() == 64 && t.bytes().all(|c| c.is_ascii_hexdigit())
}

/// The token in `path`.
pub fn read_token(path: &Path) -> Result<String, DashboardError> {
    let text = std::fs::read_to_string(path).map_err(|source| DashboardError::TokenRead {
        path: path.to_path_buf(),
        source,
    })?;
    let t = text.trim();
    if !valid_token(t) {
        return Err(DashboardError::TokenInvalid {
            path: path.to_path_buf(),
        });
    }
    Ok(t.to_string())
}

/// Writes a new random token to `path` (mode 0600, replacing any) and returns it.
pub fn rotate_token(path: &Path) -> Result<String, DashboardError> {
    let werr = |source| DashboardError::TokenWrite {
        path: path.to_path_buf(),
        source,
    };
    let token = random_token().map_err(werr)?;
    let tmp = path.with_extension("token.tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(werr)?;
        f.write_all(format!("{token}\n").as_bytes()).map_err(werr)?;
        f.sync_all().map_err(werr)?;
    }
    std::fs::rename(&tmp, path).map_err(werr)?;
    Ok(token)
}

/// The token in `path`, made when there is none (or it is not a token).
pub fn ensure_token(path: &Path) -> Result<String, DashboardError> {
    match read_token(path) {
        Ok(t) => Ok(t),
        Err(DashboardError::TokenRead { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            rotate_token(path)
        }
        Err(DashboardError::TokenInvalid { .. }) => rotate_token(path),
        Err(e) => Err(e),
    }
}

/// Compares in time that depends on the lengths only.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One parsed request head.
#[derive(Debug, Default, PartialEq)]
pub struct RequestHead {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub cookie: Option<String>,
}

/// Parses a request head (request line and headers); `None` when it is not HTTP/1.x.
pub fn parse_head(head: &[u8]) -> Option<RequestHead> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let method = parts.next()?.to_string();
    let target = parts.next()?;
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let mut h = RequestHead {
        method,
        path,
        query,
        ..Default::default()
    };
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_string();
        if name.eq_ignore_ascii_case("authorization") {
            h.authorization = Some(value);
        } else if name.eq_ignore_ascii_case("cookie") {
            h.cookie = Some(match h.cookie.take() {
                Some(c) => format!("{c}; {value}"),
                None => value,
            });
        }
    }
    Some(h)
}

/// The value of cookie `name` in a `Cookie:` header.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k.trim() == name).then_some(v.trim())
    })
}

/// The value of `name` in a query string.
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then_some(v)
    })
}

/// What to answer.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// The HTML page.
    Page,
    /// `/api/overview`.
    Overview,
    /// A right `?token=`: set the cookie, send the browser to `/`.
    SignIn(String),
    Unauthorized,
    NotFound,
    MethodNotAllowed,
}

/// Decides the answer to `req`, from a connection that showed a verified client certificate
/// (`client_cert`) or not, when the token is `token` (`None`: unreadable, so no token is
/// accepted).
pub fn route(req: &RequestHead, client_cert: bool, token: Option<&str>) -> Route {
    if req.method != "GET" && req.method != "HEAD" {
        return Route::MethodNotAllowed;
    }
    let matches = |given: &str| token.is_some_and(|t| same(given, t));
    if req.path == "/" {
        if let Some(given) = req.query.as_deref().and_then(|q| query_value(q, "token")) {
            return if matches(given) {
                Route::SignIn(given.to_string())
            } else {
                Route::Unauthorized
            };
        }
    }
    let bearer = req
        .authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| matches(t.trim()));
    let cookie = req
        .cookie
        .as_deref()
        .and_then(|c| cookie_value(c, COOKIE))
        .is_some_and(matches);
    if !(client_cert || bearer || cookie) {
        return Route::Unauthorized;
    }
    match req.path.as_str() {
        "/" | "/index.html" => Route::Page,
        "/api/overview" => Route::Overview,
        _ => Route::NotFound,
    }
}

/// The page an unauthenticated request gets.
pub const UNAUTHORIZED_TEXT: &str = "Not signed in to the vmrepl dashboard: run `vmrepl dashboard` on this host and open the URL it prints.";

const PAGE: &str = include_str!("page.html");

/// An answer: status line, content type, extra headers, body.
struct Answer {
    status: &'static str,
    content_type: &'static str,
    headers: Vec<String>,
    body: Vec<u8>,
}

fn answer(host: &Arc<Host>, route: Route) -> Answer {
    let text = |status, body: &str| Answer {
        status,
        content_type: "text/plain; charset=utf-8",
        headers: vec![],
        body: format!("{body}\n").into_bytes(),
    };
    match route {
        Route::Page => Answer {
            status: "200 OK",
            content_type: "text/html; charset=utf-8",
            headers: vec![],
            body: PAGE.as_bytes().to_vec(),
        },
        Route::Overview => {
            let o = api::overview(host);
            match serde_json::to_vec(&o) {
                Ok(body) => Answer {
                    status: "200 OK",
                    content_type: "application/json",
                    headers: vec![],
                    body,
                },
                Err(e) => text("500 Internal Server Error", &e.to_string()),
            }
        }
        Route::SignIn(token) => Answer {
            status: "303 See Other",
            content_type: "text/plain; charset=utf-8",
            headers: vec![
                format!("Set-Cookie: {COOKIE}={token}; HttpOnly; Secure; SameSite=Strict; Path=/"),
                "Location: /".into(),
            ],
            body: b"signed in\n".to_vec(),
        },
        Route::Unauthorized => Answer {
            status: "401 Unauthorized",
            content_type: "text/html; charset=utf-8",
            headers: vec![],
            body: format!(
                "<!doctype html><meta charset=\"utf-8\"><title>vmrepl dashboard</title>\
                 <p data-testid=\"unauthorized\">{}</p>\n",
                UNAUTHORIZED_TEXT
                    .replacen('`', "<code>", 1)
                    .replacen('`', "</code>", 1)
            )
            .into_bytes(),
        },
        Route::NotFound => text("404 Not Found", "not found"),
        Route::MethodNotAllowed => text("405 Method Not Allowed", "only GET is served here"),
    }
}

fn encode(a: &Answer, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
         Cache-Control: no-store\r\nReferrer-Policy: no-referrer\r\nX-Content-Type-Options: nosniff\r\n\
         X-Frame-Options: DENY\r\nContent-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; \
         style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'\r\n",
        a.status,
        a.content_type,
        a.body.len()
    );
    for h in &a.headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if !head_only {
        out.extend_from_slice(&a.body);
    }
    out
}

fn read_pem(path: &Path) -> Result<Vec<u8>, DashboardError> {
    std::fs::read(path).map_err(|e| DashboardError::Pem {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The server's TLS configuration: the host's certificate and key; a client certificate is
/// asked for but optional, and verified against `ca` (this host's CA) when there is one.
pub fn server_config(
    cert: &Path,
    key: &Path,
    ca: Option<&Path>,
) -> Result<rustls::ServerConfig, DashboardError> {
    let pem_err = |path: &Path, e: rustls::pki_types::pem::Error| DashboardError::Pem {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read_pem(cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(cert, e))?;
    let key_der = PrivateKeyDer::from_pem_slice(&read_pem(key)?).map_err(|e| pem_err(key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = |e: rustls::Error| DashboardError::Tls(e.to_string());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls)?;
    let builder = match ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read_pem(ca)?) {
                roots.add(c.map_err(|e| pem_err(ca, e))?).map_err(tls)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| DashboardError::Tls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key_der).map_err(tls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Binds the dashboard's address (empty: off) and serves it; a failure is logged, not fatal.
/// Returns the serving task.
pub async fn start(host: &Arc<Host>) -> Option<tokio::task::JoinHandle<()>> {
    let addr = host.cfg().dashboard.clone();
    if addr.trim().is_empty() {
        return None;
    }
    let warn = |what: String| {
        tracing::warn!(target: "vmrepl::daemon", "cannot serve the dashboard on {addr}: {what}; set another address as `dashboard` in the configuration file (\"\" turns it off)");
    };
    let tp = crate::init::tls_paths(&host.dd);
    let ca = tp.ca_cert.exists().then_some(tp.ca_cert.as_path());
    let config = match server_config(&tp.host_cert, &tp.host_key, ca) {
        Ok(c) => c,
        Err(e) => {
            warn(e.to_string());
            return None;
        }
    };
    let token_file = token_path(&host.dd);
    if let Err(e) = ensure_token(&token_file) {
        warn(e.to_string());
        return None;
    }
    let listener = match TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            warn(e.to_string());
            return None;
        }
    };
    let url = listener
        .local_addr()
        .map(|a| format!("https://{a}/"))
        .unwrap_or_else(|_| format!("https://{addr}/"));
    tracing::info!(target: "vmrepl::daemon", %url, "dashboard served");
    let _ = host.dashboard_url.set(url);
    Some(tokio::spawn(serve(
        listener,
        Arc::new(config),
        token_file,
        host.clone(),
    )))
}

async fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    token_file: PathBuf,
    host: Arc<Host>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let token_file = Arc::new(token_file);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, host, token_file) = (acceptor.clone(), host.clone(), token_file.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let read = tokio::time::timeout(READ_DEADLINE, async {
                let mut tls = acceptor.accept(tcp).await.ok()?;
                let mut head = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    if head.len() >= MAX_HEAD {
                        return Some((tls, None));
                    }
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                Some((tls, Some(head)))
            })
            .await;
            let Ok(Some((mut tls, head))) = read else {
                return;
            };
            let client_cert = tls.get_ref().1.peer_certificates().is_some();
            let bytes = match head.as_deref().and_then(parse_head) {
                None => encode(
                    &Answer {
                        status: "400 Bad Request",
                        content_type: "text/plain; charset=utf-8",
                        headers: vec![],
                        body: b"bad request\n".to_vec(),
                    },
                    false,
                ),
                Some(req) => {
                    let token = read_token(&token_file).ok();
                    let r = route(&req, client_cert, token.as_deref());
                    let head_only = req.method == "HEAD";
                    let host2 = host.clone();
                    let a = match r {
                        // Gathering reads the database: off the async threads.
                        Route::Overview => tokio::task::spawn_blocking(move || answer(&host2, r))
                            .await
                            .ok(),
                        r => Some(answer(&host, r)),
                    };
                    let Some(a) = a else { return };
                    encode(&a, head_only)
                }
            };
            let _ = tokio::time::timeout(WRITE_DEADLINE, async {
                let _ = tls.write_all(&bytes).await;
                let _ = tls.shutdown().await;
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn req(raw: &str) -> RequestHead {
        parse_head(raw.as_bytes()).expect("a request")
    }

    #[test]
    fn a_request_head_is_parsed_with_its_query_authorization_and_cookies() {
        let r = req("GET /?token=abc&x=1 HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nAUTHORIZATION: Bearer xyz\r\ncookie: b=2\r\n\r\n");
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/");
        assert_eq!(r.query.as_deref(), Some("token=abc&x=1"));
        assert_eq!(r.authorization.as_deref(), Some("Bearer xyz"));
        assert_eq!(r.cookie.as_deref(), Some("a=1; b=2"));
        assert_eq!(query_value("token=abc&x=1", "x"), Some("1"));
        assert_eq!(query_value("token=abc", "tok"), None);
        assert!(parse_head(b"GET /\r\n\r\n").is_none());
        assert!(parse_head(b"\xff\xfe GET / HTTP/1.1\r\n\r\n").is_none());
        assert!(parse_head(b"").is_none());
    }

    #[test]
    fn cookies_are_found_by_name_among_others() {
        let h = format!("theme=dark; {COOKIE}={T} ;other=x");
        assert_eq!(cookie_value(&h, COOKIE), Some(T));
        assert_eq!(cookie_value("vmrepl_dashboardX=1", COOKIE), None);
        assert_eq!(cookie_value("", COOKIE), None);
        assert_eq!(cookie_value("novalue", COOKIE), None);
    }

    #[test]
    fn tokens_compare_whole_and_in_length_dependent_time_only() {
        assert!(same(T, T));
        assert!(!same(T, &T[..63]));
        assert!(!same(T, &T.replace('f', "e")));
        assert!(!same("", T));
    }

    #[test]
    fn without_a_token_or_certificate_every_page_is_refused() {
        for raw in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET /api/overview HTTP/1.1\r\n\r\n",
            "GET /?token=wrong HTTP/1.1\r\n\r\n",
            "GET /api/overview HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n",
            "GET /api/overview HTTP/1.1\r\nCookie: vmrepl_dashboard=wrong\r\n\r\n",
            "GET /nothing HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                route(&req(raw), false, Some(T)),
                Route::Unauthorized,
                "{raw}"
            );
        }
        // An unreadable token file lets no token in.
        let raw = "GET / HTTP/1.1\r\nAuthorization: Bearer \r\n\r\n";
        assert_eq!(route(&req(raw), false, None), Route::Unauthorized);
        let raw = format!("GET /?token={T} HTTP/1.1\r\n\r\n");
        assert_eq!(route(&req(&raw), false, None), Route::Unauthorized);
    }

    #[test]
    fn the_token_signs_in_by_query_bearer_or_cookie_and_a_client_certificate_alone_does() {
        let raw = format!("GET /?token={T} HTTP/1.1\r\n\r\n");
        assert_eq!(route(&req(&raw), false, Some(T)), Route::SignIn(T.into()));
        let raw = format!("GET /api/overview HTTP/1.1\r\nAuthorization: Bearer {T}\r\n\r\n");
        assert_eq!(route(&req(&raw), false, Some(T)), Route::Overview);
        let raw = format!("GET / HTTP/1.1\r\nCookie: x=1; {COOKIE}={T}\r\n\r\n");
        assert_eq!(route(&req(&raw), false, Some(T)), Route::Page);
        let raw = format!("GET /else HTTP/1.1\r\nCookie: {COOKIE}={T}\r\n\r\n");
        assert_eq!(route(&req(&raw), false, Some(T)), Route::NotFound);
        assert_eq!(
            route(&req("GET /api/overview HTTP/1.1\r\n\r\n"), true, Some(T)),
            Route::Overview
        );
        assert_eq!(
            route(&req("POST / HTTP/1.1\r\n\r\n"), true, Some(T)),
            Route::MethodNotAllowed
        );
    }

    #[test]
    fn the_sign_in_answer_sets_a_strict_cookie_and_the_refusal_says_what_to_run() {
        let a = Answer {
            status: "303 See Other",
            content_type: "text/plain",
            headers: vec![format!(
                "Set-Cookie: {COOKIE}={T}; HttpOnly; Secure; SameSite=Strict; Path=/"
            )],
            body: vec![],
        };
        let text = String::from_utf8(encode(&a, false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 303 See Other\r\n"), "{text}");
        assert!(text.contains("HttpOnly; Secure; SameSite=Strict"));
        assert!(text.contains("Referrer-Policy: no-referrer"));
        assert!(UNAUTHORIZED_TEXT.contains("`vmrepl dashboard`"));
    }

    /// A TLS handshake with the dashboard's configuration: whether the server saw a verified
    /// client certificate (`Err` when the handshake failed).
    async fn handshake(
        server: rustls::ServerConfig,
        ca_pem: &str,
        client: Option<&vmrepl_transport::pki::IssuedCert>,
    ) -> Result<bool, String> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            let _ = tls.read(&mut b).await;
            Ok::<bool, String>(tls.get_ref().1.peer_certificates().is_some())
        });
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let cfg = match client {
            Some(c) => {
                let chain = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap();
                b.with_client_auth_cert(chain, key).unwrap()
            }
            None => b.with_no_client_auth(),
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("dash.test").unwrap();
        if let Ok(mut tls) = connector.connect(name, tcp).await {
            let _ = tls.write_all(b"x").await;
            let _ = tls.flush().await;
        }
        srv.await.unwrap()
    }

    #[tokio::test]
    async fn a_client_certificate_from_the_hosts_ca_counts_none_is_optional_a_foreign_one_fails() {
        use vmrepl_transport::pki::Ca;
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create(&dir.path().join("ca"), "dash CA").unwrap();
        let foreign = Ca::create(&dir.path().join("foreign"), "other CA").unwrap();
        let day = Duration::from_secs(86_400);
        let host = ca.issue_host("dash.test", day).unwrap();
        let (cert, key) = (dir.path().join("host.pem"), dir.path().join("host-key.pem"));
        host.write(&cert, &key).unwrap();
        let config = || server_config(&cert, &key, Some(&ca.cert_path())).unwrap();
        let admin = ca.issue_host("admin.test", day).unwrap();
        let stranger = foreign.issue_host("admin.test", day).unwrap();
        assert_eq!(
            handshake(config(), ca.cert_pem(), Some(&admin)).await,
            Ok(true)
        );
        assert_eq!(handshake(config(), ca.cert_pem(), None).await, Ok(false));
        assert!(handshake(config(), ca.cert_pem(), Some(&stranger))
            .await
            .is_err());
        // Without a CA of its own, the dashboard asks for no certificate: the token it is.
        let no_ca = server_config(&cert, &key, None).unwrap();
        assert_eq!(handshake(no_ca, ca.cert_pem(), None).await, Ok(false));
        let e = server_config(&dir.path().join("missing.pem"), &key, None).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }

    #[test]
    fn the_token_file_is_made_private_once_kept_and_rotated() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dashboard.token");
        let t1 = ensure_token(&p).unwrap();
        assert!(valid_token(&t1));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ensure_token(&p).unwrap(), t1);
        assert_eq!(read_token(&p).unwrap(), t1);
        let t2 = rotate_token(&p).unwrap();
        assert_ne!(t1, t2);
        assert_eq!(read_token(&p).unwrap(), t2);
        std::fs::write(&p, "short").unwrap();
        assert!(read_token(&p).unwrap_err().to_string().contains("--rotate"));
        assert!(valid_token(&ensure_token(&p).unwrap()));
    }
}
