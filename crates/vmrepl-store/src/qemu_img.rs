//! A tiny private helper around the `qemu-img` binary: every call is logged with its arguments,
//! exit status and duration. (The shared `vmrepl-qemu` wrapper is deliberately not used here.)

use crate::error::{Result, StoreError};
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// Runs `qemu-img ARGS...` (in `cwd` if given) and returns its standard output.
pub(crate) fn run<I, A>(cwd: Option<&Path>, args: I) -> Result<String>
where
    I: IntoIterator<Item = A>,
    A: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let shown = std::iter::once("qemu-img".to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new("qemu-img");
    cmd.args(&args);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let started = Instant::now();
    let out = cmd.output();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(command = %shown, elapsed_ms, error = %e, "qemu-img could not start");
            return Err(StoreError::QemuImg {
                command: shown,
                status: "no exit status (could not start)".into(),
                stderr: e.to_string(),
            });
        }
    };
    if out.status.success() {
        tracing::info!(command = %shown, elapsed_ms, "qemu-img done");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        tracing::warn!(command = %shown, elapsed_ms, status = %out.status, %stderr, "qemu-img failed");
        Err(StoreError::QemuImg {
            command: shown,
            status: out.status.to_string(),
            stderr,
        })
    }
}
