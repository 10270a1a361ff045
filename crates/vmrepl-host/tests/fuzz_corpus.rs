//! Replays the seed corpus and every past crash of the `peer_frame` fuzz target (peer frames and requests) (see
//! `docs/fuzzing.md`) through the same function the target calls, on the stable toolchain.

use std::path::{Path, PathBuf};

/// Every file of `fuzz/corpus/<target>` and `fuzz/regressions/<target>`.
fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_seed_and_past_crash_of_the_peer_frame_decoder_is_handled() {
    let files = inputs("peer_frame");
    assert!(!files.is_empty(), "no seed corpus found for peer_frame");
    let failed: Vec<String> = files
        .iter()
        .filter(|p| {
            let data = std::fs::read(p).unwrap();
            std::panic::catch_unwind(|| vmrepl_host::peer::fuzzing::peer_frame(&data)).is_err()
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(failed.is_empty(), "these inputs panic: {failed:?}");
}
