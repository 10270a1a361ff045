//! systemd's service notifications (sd_notify(3)) without libsystemd: one Unix datagram per
//! message to the socket `$NOTIFY_SOCKET` names (a path, or an abstract name when it starts
//! with `@`).
//!
//! The daemon tells systemd `READY=1` once it serves (the unit is `Type=notify`), pings
//! `WATCHDOG=1` every half of `$WATCHDOG_USEC` from a task on its own runtime (a runtime that
//! hangs stops the pings, and systemd restarts the service after `WatchdogSec=`), and says
//! `STOPPING=1` when it shuts down. Without `$NOTIFY_SOCKET` (not under systemd, or not a
//! notify unit) nothing is sent; without `$WATCHDOG_USEC`, or with a `$WATCHDOG_PID` that is
//! not this process, nothing is pinged.
//!
//! The variables stay in the environment, so QEMU children inherit them; they send nothing,
//! and the unit's `NotifyAccess=main` would drop what they sent.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

/// Why notifications cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "NOTIFY_SOCKET={value:?} is neither an absolute path nor an abstract socket name \
         starting with '@'; systemd sets it for a Type=notify service, so unset it when \
         starting the daemon by hand"
    )]
    BadSocket { value: String },
    #[error("Cannot open a datagram socket to notify systemd: {0}")]
    Socket(#[source] std::io::Error),
    #[error("Cannot send {what} to systemd's notification socket {socket}: {source}")]
    Send {
        what: String,
        socket: String,
        #[source]
        source: std::io::Error,
    },
}

/// The notification socket of the service manager that started this process.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// What `$NOTIFY_SOCKET` said, for messages.
    name: String,
    /// How often to ping the watchdog, when systemd watches this process.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier the environment asks for: `None` when `$NOTIFY_SOCKET` is unset or empty.
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        let Some(socket) = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty())
        else {
            return Ok(None);
        };
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Notifier::new(&socket, watchdog).map(Some)
    }

    /// A notifier for the socket named `socket` (`$NOTIFY_SOCKET`'s syntax), pinging every
    /// `watchdog` when given.
    pub fn new(socket: &str, watchdog: Option<Duration>) -> Result<Notifier, NotifyError> {
        let addr = socket_addr(socket)?;
        let sock = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        // A full receive queue must not block a runtime thread: a lost ping is retried.
        sock.set_nonblocking(true).map_err(NotifyError::Socket)?;
        Ok(Notifier {
            sock,
            addr,
            name: socket.to_string(),
            watchdog,
        })
    }

    /// How often this notifier pings the watchdog (`None`: it does not).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one message (`KEY=VALUE` lines).
    pub fn send(&self, message: &str) -> Result<(), NotifyError> {
        self.sock
            .send_to_addr(message.as_bytes(), &self.addr)
            .map(|_| ())
            .map_err(|source| NotifyError::Send {
                what: message.lines().next().unwrap_or_default().to_string(),
                socket: self.name.clone(),
                source,
            })
    }

    /// `READY=1` with `status`; a failure is logged, not fatal.
    pub fn ready(&self, status: &str) {
        self.send_logged(&ready_message(status));
    }

    /// `STOPPING=1` with `status`; a failure is logged, not fatal.
    pub fn stopping(&self, status: &str) {
        self.send_logged(&stopping_message(status));
    }

    fn send_logged(&self, message: &str) {
        if let Err(e) = self.send(message) {
            tracing::warn!(target: "vmrepl::daemon", "{e}");
        }
    }

    /// Starts pinging the watchdog from a task on the current runtime, when systemd watches
    /// this process; abort the task before [`Notifier::stopping`].
    pub fn spawn_watchdog(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let every = self.watchdog?;
        let me = self.clone();
        tracing::info!(target: "vmrepl::daemon", ms = every.as_millis() as u64, "pinging systemd's watchdog");
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                me.send_logged(WATCHDOG_MESSAGE);
            }
        }))
    }
}

/// The watchdog's keep-alive.
pub const WATCHDOG_MESSAGE: &str = "WATCHDOG=1\n";

/// `READY=1` with a status line.
pub fn ready_message(status: &str) -> String {
    format!("READY=1\nSTATUS={}\n", one_line(status))
}

/// `STOPPING=1` with a status line.
pub fn stopping_message(status: &str) -> String {
    format!("STOPPING=1\nSTATUS={}\n", one_line(status))
}

/// A value fit for one `KEY=VALUE` line: a line break would start another assignment.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// `$NOTIFY_SOCKET` as a socket address: an absolute path, or `@name` for the abstract
/// namespace.
pub fn socket_addr(value: &str) -> Result<SocketAddr, NotifyError> {
    let bad = || NotifyError::BadSocket {
        value: value.to_string(),
    };
    if let Some(name) = value.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(|_| bad())
    } else if value.starts_with('/') {
        SocketAddr::from_pathname(value).map_err(|_| bad())
    } else {
        Err(bad())
    }
}

/// Half of `$WATCHDOG_USEC` (systemd's advice), when the watchdog is on and meant for this
/// process: `$WATCHDOG_PID` unset or equal to `own_pid`. Unset, zero or unreadable values turn
/// it off.
pub fn watchdog_interval(
    watchdog_usec: Option<&str>,
    watchdog_pid: Option<&str>,
    own_pid: u32,
) -> Option<Duration> {
    let usec: u64 = watchdog_usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = watchdog_pid.filter(|p| !p.is_empty()) {
        if pid.trim().parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_pinged_every_half_period_only_when_meant_for_this_process() {
        let half = Some(Duration::from_millis(500));
        assert_eq!(watchdog_interval(Some("1000000"), None, 42), half);
        assert_eq!(watchdog_interval(Some("1000000"), Some("42"), 42), half);
        assert_eq!(watchdog_interval(Some("1000000"), Some(""), 42), half);
        assert_eq!(
            watchdog_interval(Some("60000000"), None, 42),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval(Some("1000000"), Some("7"), 42),
            None,
            "another process is watched"
        );
        assert_eq!(watchdog_interval(Some("1000000"), Some("x"), 42), None);
        assert_eq!(watchdog_interval(None, Some("42"), 42), None, "no watchdog");
        assert_eq!(watchdog_interval(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 42), None);
    }

    #[test]
    fn messages_are_key_value_lines_and_a_status_stays_on_one_line() {
        assert_eq!(ready_message("serving"), "READY=1\nSTATUS=serving\n");
        assert_eq!(
            stopping_message("bye\nREADY=1"),
            "STOPPING=1\nSTATUS=bye READY=1\n"
        );
        assert_eq!(WATCHDOG_MESSAGE, "WATCHDOG=1\n");
    }

    #[test]
    fn the_socket_is_a_path_or_an_abstract_name_and_anything_else_is_explained() {
        use std::os::linux::net::SocketAddrExt;
        let a = socket_addr("/run/systemd/notify").unwrap();
        assert_eq!(
            a.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        let a = socket_addr("@/org/freedesktop/systemd1/notify/42").unwrap();
        assert_eq!(
            a.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify/42"[..])
        );
        let e = socket_addr("relative/notify").unwrap_err().to_string();
        assert!(
            e.contains("\"relative/notify\"") && e.contains("unset it"),
            "{e}"
        );
    }

    #[test]
    fn messages_arrive_at_a_path_socket_and_at_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap(), None).unwrap();
        n.ready("up");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up\n");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("vmrepl-test-notify-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        let n = Notifier::new(&format!("@{name}"), None).unwrap();
        n.send(WATCHDOG_MESSAGE).unwrap();
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1\n");
    }

    #[test]
    fn a_socket_nobody_listens_on_gives_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone");
        let n = Notifier::new(path.to_str().unwrap(), None).unwrap();
        let e = n.send(&ready_message("x")).unwrap_err().to_string();
        assert!(e.contains("READY=1") && e.contains("gone"), "{e}");
    }
}
