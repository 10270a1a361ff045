//! `vmrepl`: the host daemon and its CLI in one binary. The CLI is a thin front-end: it turns
//! arguments into one typed API request, sends it to the daemon of the chosen data folder and
//! renders the answer. Host creation (`host init`) works without a daemon.

mod cli;
mod dashboard;
mod generate;
mod render;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Owner-only by default (files 0600, folders 0700): VM disks, recovery points, exports
    // and keys must not be readable by other local users. Set before any thread starts and
    // before the daemon binds its socket.
    vmrepl_host::fsutil::set_private_umask();
    let args = cli::Args::parse();
    let default_level = if matches!(args.cmd, cli::Cmd::Daemon { .. }) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMREPL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    init_logging(filter);
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  because: {cause}");
            }
            ExitCode::from(2)
        }
    }
}

/// Where the log goes: to journald, with its levels and fields, when systemd connected this
/// process's stderr to the journal (`JOURNAL_STREAM` names stderr's device and inode); else to
/// stderr, with colours only for a person at a terminal (a log file, `daemon --background`'s
/// DATA/daemon.log, gets plain text).
fn init_logging(filter: tracing_subscriber::EnvFilter) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let stream = std::env::var("JOURNAL_STREAM").ok();
    if stderr_is_journal(stream.as_deref(), stderr_id()) {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("vmrepl".into()))
                .init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// stderr's (device, inode), when it can be told.
fn stderr_id() -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let fd = std::os::fd::AsFd::as_fd(&std::io::stderr())
        .try_clone_to_owned()
        .ok()?;
    let m = std::fs::File::from(fd).metadata().ok()?;
    Some((m.dev(), m.ino()))
}

/// Whether `JOURNAL_STREAM` (`DEVICE:INODE`, as systemd sets it) names stderr `id`: only then
/// does stderr lead to the journal (a service started by hand from a unit's shell inherits the
/// variable but not the stream).
fn stderr_is_journal(journal_stream: Option<&str>, id: Option<(u64, u64)>) -> bool {
    let (Some(v), Some((dev, ino))) = (journal_stream, id) else {
        return false;
    };
    let mut parts = v.split(':').map(str::parse::<u64>);
    matches!((parts.next(), parts.next(), parts.next()), (Some(Ok(d)), Some(Ok(i)), None) if (d, i) == (dev, ino))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journald_is_used_only_when_the_journal_stream_is_stderr_itself() {
        assert!(stderr_is_journal(Some("2049:77"), Some((2049, 77))));
        assert!(
            !stderr_is_journal(Some("2049:78"), Some((2049, 77))),
            "another stream"
        );
        assert!(
            !stderr_is_journal(None, Some((2049, 77))),
            "not under systemd"
        );
        assert!(!stderr_is_journal(Some("2049:77"), None));
        assert!(!stderr_is_journal(Some("garbage"), Some((2049, 77))));
        assert!(!stderr_is_journal(Some("1:2:3"), Some((1, 2))));
    }
}
