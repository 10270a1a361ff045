//! Pull mode against a real QEMU 7.2: the cycle's point in time read over NBD while the
//! "guest" (qemu-io through the disk's device) keeps writing.
mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use vmrepl_tracking::{
    begin_cycle, begin_full, commit_cycle, list_owned, release_exports, rollback_cycle,
    start_tracking, ChunkData, CycleHandle, NbdClient, NbdRangeReader, Staging, VARS_NODE,
};

const K: u64 = 1024;
const M: u64 = 1 << 20;

fn staging(dir: &Path) -> Staging {
    let mut s = Staging::new(dir.join("staging"));
    s.job_timeout = T;
    assert!(s.pull, "pull is the default");
    s
}

/// Disk `i` of a pulled cycle: its ranges to read (dirty for a delta, holding data for a full
/// copy) and its content there, as (offset, bytes) with holes expanded to zeroes (reads in
/// 48 KiB pieces, 3 in flight).
async fn pull(h: &CycleHandle, i: usize) -> (Vec<(u64, u64)>, Vec<(u64, Vec<u8>)>) {
    let x = h.disks[i]
        .export
        .clone()
        .expect("a pulled disk has an export");
    tokio::task::spawn_blocking(move || {
        let mut c = NbdClient::connect(&x.socket, &x.name, Some(&x.context), T).unwrap();
        assert_eq!(c.size(), DISK_SIZE);
        let ranges = if x.delta() {
            c.dirty_ranges()
        } else {
            c.data_ranges()
        }
        .unwrap();
        let mut r = NbdRangeReader::new(c, &ranges, 48 * 1024, 3);
        let mut out = Vec::new();
        for chunk in r.by_ref() {
            let c = chunk.unwrap();
            let bytes = match c.data {
                ChunkData::Data(d) => d,
                ChunkData::Zero(n) => vec![0u8; n as usize],
            };
            out.push((c.offset, bytes));
        }
        r.finish();
        (ranges, out)
    })
    .await
    .unwrap()
}

fn all(chunks: &[(u64, Vec<u8>)], from: u64, len: u64, byte: u8) -> bool {
    let mut covered = 0;
    for (o, d) in chunks {
        if *o >= from && o + d.len() as u64 <= from + len {
            assert!(
                d.iter().all(|b| *b == byte),
                "bytes at {o} are not {byte:#x}"
            );
            covered += d.len() as u64;
        }
    }
    covered == len
}

async fn list(q: &vmrepl_qemu::QmpClient, cmd: &str) -> Vec<Value> {
    q.execute(cmd, Value::Null)
        .await
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn a_pulled_cycle_reads_its_point_in_time_while_the_guest_overwrites_it() {
    let d = images().await;
    let vm = Vm::start(d.path()).await;
    let q = vm.qmp();
    let rel = rel();
    let st = staging(d.path());
    start_tracking(q, rel, &NODES, 0).await.unwrap();
    vm.io(0, "write -P 0xab 1M 64k").await;
    vm.io(0, "write -z 4M 128k").await;
    vm.io(1, "write -P 0xcd 2M 192k").await;

    let h = begin_cycle(q, rel, &disks(), 0, &st, Some(VARS_NODE), None)
        .await
        .unwrap();
    // The guest overwrites what the point in time holds, and writes elsewhere.
    vm.io(0, "write -P 0xee 1M 64k").await;
    vm.io(1, "write -P 0x11 2M 64k").await;
    vm.io(1, "write -P 0x22 20M 64k").await;

    let (ranges0, data0) = pull(&h, 0).await;
    assert_eq!(ranges0, vec![(M, 64 * K), (4 * M, 128 * K)]);
    assert!(all(&data0, M, 64 * K, 0xab), "the point in time, not 0xee");
    assert!(all(&data0, 4 * M, 128 * K, 0), "zeroes");
    let (ranges1, data1) = pull(&h, 1).await;
    assert_eq!(ranges1, vec![(2 * M, 192 * K)]);
    assert!(all(&data1, 2 * M, 192 * K, 0xcd));
    assert!(
        data1.len() >= 4 && data1.iter().all(|(_, d)| d.len() as u64 <= 48 * K),
        "192k read in 48k requests"
    );
    // The vars are a staged full copy as in push mode.
    let vars = h.vars.as_ref().unwrap();
    assert!(vars.export.is_none() && vars.path.is_file());
    // ... and already complete on disk while the disks are still exported.
    let staged = map_off_thread(&vars.path).await.unwrap();
    let raw = std::fs::read(d.path().join("vars.fd")).unwrap();
    let f = std::fs::File::open(&vars.path).unwrap();
    let mut covered = 0;
    for e in staged {
        if let vmrepl_tracking::ExtentKind::Data { file_offset } = e.kind {
            let mut buf = vec![0u8; e.len as usize];
            vmrepl_tracking::read_extent(&f, file_offset, &mut buf).unwrap();
            assert_eq!(buf, raw[e.offset as usize..(e.offset + e.len) as usize]);
            covered += e.len;
        }
    }
    assert_eq!(covered, VARS_SIZE, "the whole vars copy is mapped");

    // Released: no export, job or staging node is left, the files are gone, and the frozen
    // bitmap can be committed.
    release_exports(q, &h).await.unwrap();
    assert!(list(q, "query-block-exports").await.is_empty());
    assert!(list(q, "query-block-jobs").await.is_empty());
    let nodes = list(q, "query-named-block-nodes").await;
    assert!(!nodes
        .iter()
        .any(|n| n["node-name"].as_str().unwrap_or("").starts_with("stg-")));
    assert!(h.images().all(|i| !i.path.exists()));
    commit_cycle(q, rel, &NODES, 0).await.unwrap();

    // The next cycle holds exactly the overwrites, with their new content.
    let h = begin_cycle(q, rel, &disks(), 1, &st, None, None)
        .await
        .unwrap();
    let (ranges0, data0) = pull(&h, 0).await;
    assert_eq!(ranges0, vec![(M, 64 * K)]);
    assert!(all(&data0, M, 64 * K, 0xee));
    let (ranges1, data1) = pull(&h, 1).await;
    assert_eq!(ranges1, vec![(2 * M, 64 * K), (20 * M, 64 * K)]);
    assert!(all(&data1, 2 * M, 64 * K, 0x11));
    assert!(all(&data1, 20 * M, 64 * K, 0x22));

    // A cycle abandoned with its exports still up rolls back fully: exports, jobs and
    // nodes go, and bitmap 1 is merged into 2 (nothing lost).
    rollback_cycle(q, rel, &NODES, 1).await.unwrap();
    h.remove_files().unwrap();
    assert!(list(q, "query-block-exports").await.is_empty());
    assert!(list(q, "query-block-jobs").await.is_empty());
    let owned = list_owned(q, rel, &NODES).await.unwrap();
    assert_eq!(owned["disk1"].len(), 1);
    assert_eq!(
        (owned["disk1"][0].seq, owned["disk1"][0].count),
        (2, 128 * K)
    );
    vm.quit().await;
}

#[tokio::test]
async fn a_pulled_full_copy_reads_the_data_of_its_point_in_time_and_skips_the_rest() {
    let d = images().await;
    let vm = Vm::start(d.path()).await;
    let q = vm.qmp();
    let rel = rel();
    let st = staging(d.path());
    vm.io(0, "write -P 0x31 3M 128k").await;
    vm.io(0, "write -z 5M 64k").await;
    let h = begin_full(q, rel, &disks(), 1, &st, None).await.unwrap();
    assert!(h.disks[0].export.as_ref().is_some_and(|x| !x.delta()));
    vm.io(0, "write -P 0x77 3M 64k").await;
    vm.io(0, "write -P 0x78 9M 64k").await;
    let (ranges, data) = pull(&h, 0).await;
    assert_eq!(
        ranges,
        vec![(3 * M, 128 * K)],
        "only the data, as of the point in time"
    );
    assert!(all(&data, 3 * M, 128 * K, 0x31));
    release_exports(q, &h).await.unwrap();
    assert!(list(q, "query-block-exports").await.is_empty());
    // Bitmap 1 started with the copy and holds the writes after it.
    let owned = list_owned(q, rel, &NODES).await.unwrap();
    assert_eq!(
        (owned["disk0"][0].seq, owned["disk0"][0].count),
        (1, 128 * K)
    );
    vm.quit().await;
}
