//! End to end: the web dashboard of a real daemon, in headless Chromium as a person uses it.
//! Two daemons on loopback replicate a stopped VM; the primary's dashboard is opened with the
//! URL `vmrepl dashboard` prints and checked by `tests/browser/dashboard.mjs` (playwright-core
//! driving Debian's `chromium`; `scripts/setup.sh` installs both): the relationship with its
//! state and health, the events, the lag chart, a refresh by itself, and a browser without the
//! token turned away. The screenshot goes to the test's folder; with
//! `VMREPL_UPDATE_SCREENSHOT=1` it replaces `docs/dashboard.png`.

mod common;
use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sign_in_url(h: &Host, args: &[&str]) -> String {
    let mut a = vec!["dashboard"];
    a.extend_from_slice(args);
    let v = h.json(&a);
    let url = v["url"].as_str().expect("a url").to_string();
    assert!(
        url.starts_with(&format!("https://{}:", h.ip)) && url.contains("/?token="),
        "{url}"
    );
    url
}

#[test]
fn the_dashboard_shows_a_replicated_vm_in_a_browser_and_turns_away_one_without_the_token() {
    let browser = repo().join("tests/browser");
    assert!(
        browser.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed in {}; run ./scripts/setup.sh (it runs `npm ci` there)",
        browser.display()
    );
    let (a, b, _store) = pair("127.0.0.161", "127.0.0.162", "dashboard");
    create_small_vm(&a, "app");
    enable_ok(&a, &b, "app", "hostb.test", &["--frequency", "5"]);
    wait_until("the initial copy acknowledged", T, || acked(&a, "app") >= 1);
    // A few cycles for the chart to draw.
    wait_until("three cycles acknowledged", T, || acked(&a, "app") >= 3);

    let info = a.json(&["host", "info"]);
    assert!(
        info["dashboard_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://127.0.0.161:")),
        "{info}"
    );
    let url = sign_in_url(&a, &[]);
    assert_eq!(sign_in_url(&a, &[]), url, "the token stays until rotated");

    let shot = a.data().join("dashboard.png");
    let out = Command::new("node")
        .arg(browser.join("dashboard.mjs"))
        .arg(&url)
        .arg(&shot)
        .arg("app")
        .current_dir(&browser)
        .output()
        .expect("run node");
    let log = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "the browser test failed ({}):\n{log}\n{}",
        out.status,
        a.log_tail()
    );
    println!("{log}");
    assert!(std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000));
    if std::env::var_os("VMREPL_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&shot, repo().join("docs/dashboard.png")).expect("copy the screenshot");
    }

    // A new token signs everyone out: the old URL no longer works, the new one does.
    let rotated = sign_in_url(&a, &["--rotate"]);
    assert_ne!(rotated, url);
    let token = std::fs::read_to_string(a.data().join("dashboard.token")).unwrap();
    assert!(rotated.ends_with(token.trim()));
}
