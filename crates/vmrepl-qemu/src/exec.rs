//! Running external commands (qemu-img, qemu-system-x86_64 probes) with a timeout, logging
//! each one with its duration.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use tokio::process::Command;

/// Why an external command could not be run to completion.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("could not start {program}: {source}; check that it is installed and on the configured path")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} did not finish within {secs} s and was killed; the storage may be hung or overloaded")]
    Timeout { cmd: String, secs: u64 },
}

/// Renders a command line for logs and error messages.
pub(crate) fn render<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> String {
    let mut s = program.display().to_string();
    for a in args {
        s.push(' ');
        let a = a.as_ref().to_string_lossy();
        if a.is_empty() || a.contains([' ', '"', '\'']) {
            s.push_str(&format!("{a:?}"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// The blocking twin of [`run`], for synchronous callers (the replica store runs on the
/// blocking pool): runs `program args` in `cwd`, captures stdout/stderr, kills it after
/// `timeout`, and logs it like every other command.
pub(crate) fn run_blocking<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    cwd: Option<&Path>,
    timeout: Duration,
) -> Result<Output, ExecError> {
    let mut cmd = render(program, args);
    if let Some(d) = cwd {
        cmd = format!("(in {}) {cmd}", d.display());
    }
    let start = Instant::now();
    let mut c = std::process::Command::new(program);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let child = c.spawn().map_err(|source| ExecError::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let ms = || start.elapsed().as_millis() as u64;
    match rx.recv_timeout(timeout) {
        Ok(Ok(out)) => {
            tracing::info!(target: "vmrepl::qemu", cmd = %cmd, ms = ms(), status = ?out.status.code(), "external command finished");
            Ok(out)
        }
        Ok(Err(source)) => Err(ExecError::Spawn {
            program: program.display().to_string(),
            source,
        }),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            tracing::warn!(target: "vmrepl::qemu", cmd = %cmd, ms = ms(), "external command timed out");
            Err(ExecError::Timeout {
                cmd,
                secs: timeout.as_secs(),
            })
        }
    }
}

/// Runs `program args`, captures stdout/stderr, kills it after `timeout`.
pub(crate) async fn run<S: AsRef<OsStr>>(
    program: &Path,
    args: &[S],
    timeout: Duration,
) -> Result<Output, ExecError> {
    let cmd = render(program, args);
    let start = Instant::now();
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ExecError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
    let out = tokio::time::timeout(timeout, child.wait_with_output()).await;
    let ms = start.elapsed().as_millis() as u64;
    match out {
        Ok(Ok(out)) => {
            tracing::info!(target: "vmrepl::qemu", cmd = %cmd, ms, status = ?out.status.code(), "external command finished");
            Ok(out)
        }
        Ok(Err(source)) => Err(ExecError::Spawn {
            program: program.display().to_string(),
            source,
        }),
        Err(_) => {
            tracing::warn!(target: "vmrepl::qemu", cmd = %cmd, ms, "external command timed out");
            Err(ExecError::Timeout {
                cmd,
                secs: timeout.as_secs(),
            })
        }
    }
}
