//! Body of the `qmp_reply` fuzz target (the `fuzz/` crate at the repository root) and of the
//! regression test that replays its corpus on stable. Not part of the stable API.

use serde_json::{json, Value};

use crate::qmp::{
    after_sentinel, agent_reply_text, classify_line, is_sync_reply, parse_agent_reply,
    parse_greeting, QmpLine,
};

/// Splits `data` into lines as the clients read them (tokio's `lines()`: without the `\n` and
/// a `\r` before it); stops at the first line that is not UTF-8, where the client's read fails.
fn lines(data: &[u8]) -> impl Iterator<Item = &str> {
    data.split_inclusive(|b| *b == b'\n').map_while(|l| {
        let l = l.strip_suffix(b"\n").unwrap_or(l);
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        std::str::from_utf8(l).ok()
    })
}

/// Equal JSON, except that floating-point numbers may differ in their last bit: serde_json
/// (without its `float_roundtrip` feature) does not always read back exactly the float it
/// wrote, which is no bug of the QMP parsers.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= f64::EPSILON * 4.0 * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// [`QmpLine`]s that are equal up to [`same_json`].
fn same_line(a: &QmpLine, b: &QmpLine) -> bool {
    match (a, b) {
        (QmpLine::Event(x), QmpLine::Event(y)) => {
            x.event == y.event && x.timestamp == y.timestamp && same_json(&x.data, &y.data)
        }
        (QmpLine::Reply { id: i, reply: x }, QmpLine::Reply { id: j, reply: y }) => {
            i == j
                && match (x, y) {
                    (Ok(x), Ok(y)) => same_json(x, y),
                    (x, y) => x == y,
                }
        }
        (x, y) => x == y,
    }
}

/// The `qmp_reply` target: `data` is what a QMP monitor sends (a greeting line, then replies
/// and events), and the same bytes seen as what a guest agent sends (stale bytes, the 0xFF
/// sentinel, the answer to `guest-sync-delimited`, then command replies).
///
/// Checks, besides "no panic":
/// * an event or a reply, written back as QEMU would write it, is classified the same again;
/// * a reply's result is exactly the `return` member of the line;
/// * the agent's trimmed reply text never starts or ends with a blank or a sentinel, and an
///   agent reply parses the same as the same object read as a QMP reply.
pub fn qmp_reply(data: &[u8]) {
    let mut monitor = lines(data);
    if let Some(first) = monitor.next() {
        if let Ok(g) = parse_greeting(first) {
            assert_eq!(
                Some(&g),
                serde_json::from_str::<Value>(first).unwrap().get("QMP")
            );
        }
    }
    for line in monitor {
        let class = classify_line(line);
        let again = match &class {
            QmpLine::Event(ev) => json!({
                "event": ev.event,
                "data": ev.data,
                "timestamp": {"seconds": ev.timestamp.seconds, "microseconds": ev.timestamp.microseconds},
            }),
            QmpLine::Reply { id, reply } => {
                let v: Value = serde_json::from_str(line).expect("a reply is JSON");
                if let Ok(r) = reply {
                    assert_eq!(
                        Some(r),
                        v.get("return"),
                        "a reply's result is not its return"
                    );
                }
                match reply {
                    Ok(r) => json!({"return": r, "id": id}),
                    Err((class, desc)) => {
                        json!({"error": {"class": class, "desc": desc}, "id": id})
                    }
                }
            }
            QmpLine::Unrouted | QmpLine::NotAnObject => continue,
        };
        let back = classify_line(&again.to_string());
        assert!(
            same_line(&back, &class),
            "{line} and its re-encoding {again} are read differently: {class:?} and {back:?}"
        );
    }

    // The guest agent's side: everything before the first 0xFF is stale and dropped.
    let Some(rest) = after_sentinel(data) else {
        return;
    };
    let mut agent = lines(rest);
    if let Some(sync) = agent.next() {
        if let Some(id) = serde_json::from_str::<Value>(sync.trim())
            .ok()
            .and_then(|v| v.get("return").and_then(Value::as_u64))
        {
            assert!(is_sync_reply(sync, id));
            assert!(!is_sync_reply(sync, id.wrapping_add(1)));
        }
    }
    for line in agent {
        let Some(text) = agent_reply_text(line) else {
            continue;
        };
        let blank = |c: char| c.is_whitespace() || c == '\u{FF}';
        assert!(!text.starts_with(blank) && !text.ends_with(blank));
        let Ok(reply) = parse_agent_reply("guest-ping", text) else {
            continue;
        };
        let mut obj: Value = serde_json::from_str(text).expect("an agent reply is JSON");
        obj["id"] = json!(1);
        obj.as_object_mut().expect("an object").remove("event");
        let back = classify_line(&obj.to_string());
        assert!(
            same_line(&back, &QmpLine::Reply { id: 1, reply }),
            "an agent reply reads differently as a QMP reply: {back:?}"
        );
    }
}
