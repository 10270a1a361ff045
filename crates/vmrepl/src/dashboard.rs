//! `vmrepl dashboard [--rotate]`: the web dashboard's URL with its sign-in token.

use anyhow::{bail, Context, Result};
use std::process::ExitCode;
use vmrepl_host::datadir::DataDir;
use vmrepl_host::mgmt::Client;
use vmrepl_types::api::{Request, Response};

/// The URL to open: the daemon's dashboard address (an unspecified IP replaced by the host's
/// name) with `?token=`.
fn sign_in_url(base: &str, host_name: &str, token: &str) -> String {
    let base = base
        .replace("://0.0.0.0:", &format!("://{host_name}:"))
        .replace("://[::]:", &format!("://{host_name}:"));
    let base = if base.ends_with('/') {
        base
    } else {
        format!("{base}/")
    };
    format!("{base}?token={token}")
}

pub fn run(dd: &DataDir, json: bool, rotate: bool) -> Result<ExitCode> {
    dd.require_host()?;
    let path = vmrepl_host::dashboard::token_path(dd);
    let token = if rotate {
        vmrepl_host::dashboard::rotate_token(&path)?
    } else {
        vmrepl_host::dashboard::ensure_token(&path)?
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let resp = rt
        .block_on(async {
            let mut c = Client::connect(dd.root(), &dd.socket()).await?;
            c.call(&Request::HostInfo).await
        })
        .context("cannot ask the daemon where the dashboard is; start it with `vmrepl daemon --background`")?;
    let info = match resp {
        Response::HostInfo(i) => i,
        Response::Error(e) => bail!("{}", e.message),
        other => bail!("the daemon answered {other:?} to host info"),
    };
    let Some(base) = info.dashboard_url.as_deref() else {
        bail!(
            "the daemon serves no dashboard; set `dashboard` in the configuration file (for example \"{}\") and restart it",
            vmrepl_host::dashboard::DEFAULT_LISTEN
        );
    };
    let url = sign_in_url(base, &info.host_name, &token);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "url": url,
                "token": token,
                "rotated": rotate,
            }))?
        );
    } else {
        if rotate {
            println!("A new token is in force; browsers signed in with the old one must open this URL again.");
        }
        println!("{url}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_names_the_host_when_the_dashboard_listens_everywhere() {
        assert_eq!(
            sign_in_url("https://127.0.0.1:9470/", "hv1", "ab"),
            "https://127.0.0.1:9470/?token=ab"
        );
        assert_eq!(
            sign_in_url("https://0.0.0.0:9470", "hv1.example.org", "ab"),
            "https://hv1.example.org:9470/?token=ab"
        );
    }
}
