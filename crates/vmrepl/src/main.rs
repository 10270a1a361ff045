//! `vmrepl`: the host daemon and its CLI in one binary. The CLI is a thin front-end: it turns
//! arguments into one typed API request, sends it to the daemon of the chosen data folder and
//! renders the answer. Host creation (`host init`) works without a daemon.

mod cli;
mod dashboard;
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
    // Colours only for a person at a terminal: a log file (`daemon --background` writes
    // DATA/daemon.log) or journald gets plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
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
