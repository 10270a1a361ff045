//! End to end: the event journal (`vmrepl events`) of two real daemons on loopback addresses,
//! as a VM that is shut down is replicated, paused and resumed: state changes with their
//! stable codes and severities on both hosts, the filters, `--follow`, and a daemon log in
//! plain text.

mod common;
use common::*;
use serde_json::Value;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

fn events(h: &Host, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["events"];
    a.extend_from_slice(args);
    h.json(&a)["events"].as_array().cloned().unwrap_or_default()
}

fn codes(ev: &[Value]) -> Vec<u64> {
    ev.iter().map(|e| e["code"].as_u64().unwrap()).collect()
}

#[test]
fn every_state_change_is_an_event_with_a_stable_code_that_can_be_filtered_and_followed() {
    let (a, b, _store) = pair("127.0.0.151", "127.0.0.152", "events");
    create_small_vm(&a, "app");
    enable_ok(&a, &b, "app", "hostb.test", &["--frequency", "30"]);
    wait_until("the initial copy acknowledged", T, || acked(&a, "app") >= 1);
    wait_until("the replica applied it", T, || acked(&b, "app") >= 1);

    // The primary: enabled, initial replication started, the cycle acknowledged.
    let ev = events(&a, &["--vm", "app"]);
    let c = codes(&ev);
    for want in [1001, 1002, 1005] {
        assert!(c.contains(&want), "code {want} missing from {ev:#?}");
    }
    let ids: Vec<i64> = ev.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "not oldest first: {ids:?}"
    );
    for e in &ev {
        assert_eq!(e["host"], "hosta.test");
        assert_eq!(e["vm"], "app");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // The replica server: the replica created, then the log applied.
    let evb = events(&b, &["--vm", "app"]);
    let cb = codes(&evb);
    assert!(cb.contains(&2001) && cb.contains(&2002), "{evb:#?}");
    assert!(evb.iter().all(|e| e["host"] == "hostb.test"));

    // Following: a pause made after it started shows up, as a warning.
    let mut follow = Command::new(env!("CARGO_BIN_EXE_vmrepl"))
        .arg("--data")
        .arg(a.data())
        .args([
            "--json", "events", "--follow", "--vm", "app", "--since", "10s",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run events --follow");
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let out = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    a.ok(&["replication", "pause", "app"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let paused = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if v["code"] == 1009 => break v,
            Ok(_) => {}
            Err(e) => {
                let _ = follow.kill();
                panic!("`events --follow` did not show the pause within 30 s: {e}");
            }
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(paused["severity"], "warning");
    a.ok(&["replication", "resume", "app"]);
    wait_until("the resume recorded", T, || {
        codes(&events(&a, &["--vm", "app"])).contains(&1010)
    });

    // Filters: a time to come gives nothing; the limit keeps the newest.
    assert!(events(&a, &["--since", "2099-01-01T00:00:00Z"]).is_empty());
    let all = events(&a, &["--vm", "app"]);
    let newest = events(&a, &["--vm", "app", "--limit", "1"]);
    assert_eq!(newest.len(), 1);
    assert!(newest[0]["id"].as_i64() >= all.last().unwrap()["id"].as_i64());
    // Unknown VMs and unreadable times are refused with what to do.
    let msg = a.fails(&["events", "--vm", "nosuch"]);
    assert!(msg.contains("No VM nosuch"), "{msg}");
    let msg = a.fails(&["events", "--since", "yesterday-ish"]);
    assert!(msg.contains("is not a time"), "{msg}");
    // People get one line per event.
    let text = a.ok(&["events", "--vm", "app"]);
    assert!(
        text.lines()
            .any(|l| l.contains("1009") && l.contains("warning")),
        "{text}"
    );

    // Measure-VMReplication: the window's statistics, then started anew.
    let m = a.json(&["replication", "measure", "app"]);
    assert_eq!(m["kind"], "measure", "{m}");
    let st = &m["relationships"][0]["stats"];
    assert!(st["success_count"].as_u64().unwrap() >= 1, "{m}");
    let (from, to) = (
        st["window_from_unix"].as_u64().unwrap(),
        st["window_to_unix"].as_u64().unwrap(),
    );
    assert!(from <= to && to - from <= 12 * 3600, "{m}");
    let text = a.ok(&["replication", "measure", "app"]);
    assert!(
        text.contains("Monitoring window:") && text.contains("Average latency:"),
        "{text}"
    );
    let m = a.json(&["replication", "measure", "app", "--reset"]);
    let st = &m["relationships"][0]["stats"];
    assert_eq!(st["success_count"], 0, "{m}");
    assert!(st["window_from_unix"].as_u64().unwrap() >= to, "{m}");
    assert!(
        events(&a, &["--vm", "app"])
            .iter()
            .any(|e| e["message"] == "replication statistics reset"),
        "the reset is not in the journal"
    );
    let b_m = b.json(&["replication", "measure", "app"]);
    assert_eq!(b_m["relationships"][0]["role"], "replica", "{b_m}");

    // The metrics page, where `host info` says it is, tells the same.
    let url = a.json(&["host", "info"])["metrics_url"]
        .as_str()
        .expect("a metrics URL")
        .to_string();
    let page = http_get(&url);
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let labels = r#"vm="app",vm_uuid=""#;
    let line = |name: &str| {
        page.lines()
            .find(|l| {
                l.starts_with(&format!("{name}{{"))
                    && l.contains(labels)
                    && l.contains(r#"role="primary""#)
            })
            .unwrap_or_else(|| panic!("no {name} for app in:\n{page}"))
            .to_string()
    };
    assert!(line("vmrepl_health").ends_with(" 0"), "{page}");
    assert!(
        line("vmrepl_last_sequence")
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert!(page.contains(r#"outcome="ok"}"#), "{page}");
    assert!(page.contains("vmrepl_up{host=\"hosta.test\"} 1"), "{page}");
    let other = http_get(&url.replace("/metrics", "/other"));
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");

    // The daemon's log file is plain text.
    let log = std::fs::read_to_string(a.data().join("daemon.log")).unwrap();
    assert!(
        !log.is_empty() && !log.contains('\u{1b}'),
        "colour codes in daemon.log"
    );
}

/// A plain HTTP GET of `url` (`http://IP:PORT/PATH`): the whole answer, head and body.
fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (addr, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut c = std::net::TcpStream::connect(addr).expect("connect to the metrics page");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read the answer");
    out
}

#[test]
fn health_goes_warning_then_critical_while_the_replica_server_is_down_and_back_to_normal_with_an_event_each(
) {
    let (a, mut b, _store) = pair("127.0.0.156", "127.0.0.157", "health");
    create_small_vm(&a, "app");
    enable_ok(&a, &b, "app", "hostb.test", &["--frequency", "5"]);
    wait_until("replicating and Normal", T, || {
        let s = status(&a, "app");
        s["state"] == "replicating" && s["health"] == "normal"
    });
    let mark = events(&a, &["--vm", "app"]).last().unwrap()["id"]
        .as_i64()
        .unwrap();
    let health_since = |h: &Host| -> Vec<u64> {
        events(h, &["--vm", "app"])
            .iter()
            .filter(|e| e["id"].as_i64().unwrap() > mark)
            .map(|e| e["code"].as_u64().unwrap())
            .filter(|c| (1101..=1103).contains(c))
            .collect()
    };
    b.ok(&["stop"]);
    // The next cycle cannot reach the replica server: Warning (the next one retries), then,
    // failing again, Critical, each with the reason.
    wait_until("health Critical journaled", T, || {
        health_since(&a).contains(&1103)
    });
    let seen = health_since(&a);
    assert!(
        seen.len() >= 2 && seen[..2] == [1102, 1103],
        "Warning, then Critical: {seen:?} in {:#?}",
        events(&a, &["--vm", "app"])
    );
    let s = status(&a, "app");
    assert_eq!(s["health"], "critical", "{s}");
    let why = s["health_details"].to_string();
    assert!(why.contains("cannot send"), "{why}");
    let ev = events(&a, &["--vm", "app"]);
    let crit = ev.iter().find(|e| e["code"] == 1103).unwrap();
    assert_eq!(crit["severity"], "error");
    assert!(
        crit["message"].as_str().unwrap().contains("cannot send"),
        "{crit}"
    );
    // The replica server back: the next cycle succeeds and health is Normal again.
    b.start();
    wait_until("health Normal journaled", T, || {
        let c = codes(&events(&a, &["--vm", "app"]));
        c.iter().rposition(|x| *x == 1101) > c.iter().rposition(|x| *x == 1103)
    });
    assert_eq!(status(&a, "app")["health"], "normal");
}
