//! The VM's side: its block nodes with the relationship's bitmaps, the points in time they
//! stage, and its guest agent.

use super::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use vmrepl_log::LogWriter;
use vmrepl_tracking::{
    Chunk, CycleHandle, CycleKind, OwnedBitmap, PointSignal, ReconcileOutcome, StagedImage,
};
use vmrepl_tracking::{ChunkData, RelTag, Staging};

/// A tracking call the engine made, as [`FakeNodes`] recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    Reconcile {
        committed: Vec<u64>,
        merged_back: Vec<u64>,
    },
    BeginCycle(u64),
    BeginFull(u64),
    BeginPoint(u64),
    Commit(u64),
    Rollback(u64),
    StopTracking,
    Release(u64),
}

impl Op {
    /// A reconcile that found nothing to repair.
    pub(crate) fn reconciled() -> Op {
        Op::Reconcile {
            committed: vec![],
            merged_back: vec![],
        }
    }
}

/// One bitmap of the relationship (the same on every disk).
#[derive(Debug, Clone, Default)]
pub(crate) struct Bitmap {
    pub(crate) recording: bool,
    /// QEMU did not close the disk cleanly.
    pub(crate) inconsistent: bool,
    /// Dirty clusters per disk.
    pub(crate) dirty: BTreeMap<String, BTreeSet<u64>>,
}

/// One staged image: its bytes as of the point in time, and the ranges the cycle carries.
type Image = (Vec<u8>, Vec<(u64, u64)>);

/// A point in time as staged: its images (disks, then the vars).
struct Point {
    images: Vec<Image>,
}

pub(crate) struct NodesState {
    /// The VM's running QEMU (true) or qemu-storage-daemon.
    pub(crate) live: bool,
    /// The primary's disks by id.
    pub(crate) disks: BTreeMap<String, Vec<u8>>,
    /// The UEFI vars.
    pub(crate) vars: Vec<u8>,
    pub(crate) bitmaps: BTreeMap<u64, Bitmap>,
    /// Every tracking call, in order.
    pub(crate) ops: Vec<Op>,
    /// What the engine answered to `replica_has(n)` during reconcile.
    pub(crate) replica_has: Vec<(u64, bool)>,
    points: BTreeMap<u64, Point>,
    clock: u64,
    /// The next `begin_cycle` / `begin_full` fails with this (the transaction changes nothing).
    pub(crate) fail_begin: Option<fn() -> TrackingError>,
    /// Builds of a log (numbered from 1) from this one on fail while reading the disks.
    pub(crate) fail_build_from: Option<usize>,
    builds: usize,
    /// `release_exports` fails (the engine only warns).
    pub(crate) fail_release: bool,
    /// Bytes read from a point by `write_blocks` (what a resynchronization's part reads
    /// again because its compare did not keep it).
    pub(crate) blocks_read: Arc<std::sync::atomic::AtomicU64>,
}

/// The primary's block nodes, in memory.
#[derive(Clone)]
pub(crate) struct FakeNodes {
    pub(crate) s: Arc<Mutex<NodesState>>,
    journal: Journal,
}

fn ranges_of(clusters: &BTreeSet<u64>, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &c in clusters {
        let (o, end) = (c * CLUSTER, ((c + 1) * CLUSTER).min(size));
        match out.last_mut() {
            Some((lo, ll)) if *lo + *ll == o => *ll = end - *lo,
            _ => out.push((o, end - o)),
        }
    }
    out
}

/// The clusters of `data` that hold anything but zeroes (what `base:allocation` reports).
fn allocated(data: &[u8]) -> BTreeSet<u64> {
    data.chunks(CLUSTER as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|b| *b != 0))
        .map(|(i, _)| i as u64)
        .collect()
}

fn missing(node: &str, seq: u64) -> TrackingError {
    TrackingError::BitmapMissing {
        node: node.to_string(),
        bitmap: format!("vmrepl-fake-{seq}"),
    }
}

fn bad_state(node: &str, seq: u64, detail: &str) -> TrackingError {
    TrackingError::BitmapState {
        node: node.to_string(),
        bitmap: format!("vmrepl-fake-{seq}"),
        detail: detail.to_string(),
    }
}

impl FakeNodes {
    pub(crate) fn new(disks: &[(&str, u64)], journal: &Journal) -> FakeNodes {
        FakeNodes {
            s: Arc::new(Mutex::new(NodesState {
                live: true,
                disks: disks
                    .iter()
                    .map(|(id, size)| (id.to_string(), vec![0u8; *size as usize]))
                    .collect(),
                vars: Vec::new(),
                bitmaps: BTreeMap::new(),
                ops: Vec::new(),
                replica_has: Vec::new(),
                points: BTreeMap::new(),
                clock: 1_700_000_000_000,
                fail_begin: None,
                fail_build_from: None,
                builds: 0,
                fail_release: false,
                blocks_read: Arc::default(),
            })),
            journal: journal.clone(),
        }
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, NodesState> {
        self.s.lock().unwrap()
    }

    /// The guest writes `data` at `offset` of disk `id`: every recording bitmap marks it.
    pub(crate) fn write(&self, id: &str, offset: u64, data: &[u8]) {
        let mut s = self.state();
        let disk = s.disks.get_mut(id).expect("a disk of the VM");
        disk[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        let clusters = offset / CLUSTER..(offset + data.len() as u64).div_ceil(CLUSTER);
        for b in s.bitmaps.values_mut().filter(|b| b.recording) {
            b.dirty
                .entry(id.to_string())
                .or_default()
                .extend(clusters.clone());
        }
    }

    pub(crate) fn ops(&self) -> Vec<Op> {
        self.state().ops.clone()
    }

    /// The relationship's bitmaps as (sequence, recording).
    pub(crate) fn bitmaps(&self) -> Vec<(u64, bool)> {
        self.state()
            .bitmaps
            .iter()
            .map(|(s, b)| (*s, b.recording))
            .collect()
    }

    /// Whether the relationship's bitmaps are as a cycle leaves them: one recording, at most
    /// one frozen below it.
    pub(crate) fn bitmaps_sound(&self) -> bool {
        let b = self.bitmaps();
        let recording: Vec<u64> = b.iter().filter(|x| x.1).map(|x| x.0).collect();
        let frozen: Vec<u64> = b.iter().filter(|x| !x.1).map(|x| x.0).collect();
        recording.len() == 1 && frozen.len() <= 1 && frozen.iter().all(|f| *f < recording[0])
    }

    /// Bitmap `seq` starts recording, as `enable` or a finished initial copy leaves it.
    pub(crate) fn track_from(&self, seq: u64) {
        self.state().bitmaps.insert(
            seq,
            Bitmap {
                recording: true,
                ..Bitmap::default()
            },
        );
    }

    fn stage(
        s: &mut NodesState,
        tag: RelTag,
        disks: &[(String, u64)],
        seq: u64,
        kind: CycleKind,
        staging: &Staging,
        vars: Option<&str>,
    ) -> CycleHandle {
        s.clock += 1000;
        let ms = s.clock;
        let mut images = Vec::new();
        let mut staged = Vec::new();
        for (node, size) in disks {
            let data = s.disks[node].clone();
            let clusters = match kind {
                CycleKind::Delta => s.bitmaps[&seq].dirty.get(node).cloned().unwrap_or_default(),
                CycleKind::Full => allocated(&data),
            };
            images.push((data, ranges_of(&clusters, *size)));
            staged.push(StagedImage {
                node: node.clone(),
                size: *size,
                path: staging.dir.join(format!("fake-{ms}-{node}.qcow2")),
                export: None,
            });
        }
        let vars = vars.map(|node| {
            let size = s.vars.len() as u64;
            images.push((s.vars.clone(), ranges_of(&allocated(&s.vars), size)));
            StagedImage {
                node: node.to_string(),
                size,
                path: staging.dir.join(format!("fake-{ms}-vars.qcow2")),
                export: None,
            }
        });
        s.points.insert(ms, Point { images });
        CycleHandle {
            rel: tag,
            seq,
            kind,
            point_in_time_ms: ms,
            disks: staged,
            vars,
        }
    }
}

impl BlockNodes for FakeNodes {
    fn live(&self) -> bool {
        self.state().live
    }

    async fn reconcile(
        &self,
        _tag: RelTag,
        nodes: &[&str],
        _staging_dir: Option<&Path>,
        replica_has: impl Fn(u64) -> bool,
    ) -> Result<ReconcileOutcome, TrackingError> {
        let mut s = self.state();
        let recording: Vec<u64> = s
            .bitmaps
            .iter()
            .filter(|(_, b)| b.recording)
            .map(|(q, _)| *q)
            .collect();
        let reason = if let Some((q, _)) = s.bitmaps.iter().find(|(_, b)| b.inconsistent) {
            Some(format!(
                "bitmap {q} on node {} is inconsistent: QEMU did not close the disk cleanly",
                nodes[0]
            ))
        } else if recording.len() != 1 {
            Some(format!("no single recording bitmap on node {}", nodes[0]))
        } else {
            None
        };
        if let Some(reason) = reason {
            s.bitmaps.clear();
            s.ops.push(Op::reconciled());
            return Ok(ReconcileOutcome::ResyncRequired { reason });
        }
        let rec = recording[0];
        let frozen: Vec<u64> = s.bitmaps.range(..rec).map(|(q, _)| *q).collect();
        let (mut committed, mut merged_back) = (vec![], vec![]);
        for f in frozen {
            let has = replica_has(f);
            s.replica_has.push((f, has));
            let b = s.bitmaps.remove(&f).unwrap();
            if has {
                committed.push(f);
            } else {
                let into = s.bitmaps.get_mut(&rec).unwrap();
                for (d, c) in b.dirty {
                    into.dirty.entry(d).or_default().extend(c);
                }
                merged_back.push(f);
            }
        }
        s.ops.push(Op::Reconcile {
            committed: committed.clone(),
            merged_back: merged_back.clone(),
        });
        Ok(ReconcileOutcome::Ready {
            recording: rec,
            committed,
            merged_back,
        })
    }

    async fn begin_cycle(
        &self,
        tag: RelTag,
        disks: &[(String, u64)],
        _fresh: &[String],
        seq: u64,
        staging: &Staging,
        vars: Option<&str>,
        on_point: Option<PointSignal>,
    ) -> Result<CycleHandle, TrackingError> {
        let h = {
            let mut s = self.state();
            s.ops.push(Op::BeginCycle(seq));
            if let Some(fail) = s.fail_begin.take() {
                return Err(fail());
            }
            let node = disks[0].0.as_str();
            match s.bitmaps.get(&seq) {
                None => return Err(missing(node, seq)),
                Some(b) if !b.recording || b.inconsistent => {
                    return Err(bad_state(node, seq, "a cycle needs it recording"))
                }
                Some(_) => {}
            }
            if s.bitmaps.keys().any(|q| *q > seq) {
                return Err(bad_state(node, seq + 1, "a newer bitmap already exists"));
            }
            s.bitmaps.get_mut(&seq).unwrap().recording = false;
            s.bitmaps.insert(
                seq + 1,
                Bitmap {
                    recording: true,
                    ..Bitmap::default()
                },
            );
            FakeNodes::stage(&mut s, tag, disks, seq, CycleKind::Delta, staging, vars)
        };
        self.journal
            .push(format!("nodes: point of bitmap {seq} taken"));
        if let Some(p) = on_point {
            let _ = p.send(h.point_in_time_ms);
        }
        Ok(h)
    }

    async fn begin_full(
        &self,
        tag: RelTag,
        disks: &[(String, u64)],
        seq0: u64,
        staging: &Staging,
        vars: Option<&str>,
    ) -> Result<CycleHandle, TrackingError> {
        let mut s = self.state();
        s.ops.push(Op::BeginFull(seq0));
        if let Some(fail) = s.fail_begin.take() {
            return Err(fail());
        }
        if s.bitmaps.contains_key(&seq0) {
            return Err(bad_state(&disks[0].0, seq0, "it exists already"));
        }
        s.bitmaps.insert(
            seq0,
            Bitmap {
                recording: true,
                ..Bitmap::default()
            },
        );
        let h = FakeNodes::stage(&mut s, tag, disks, seq0, CycleKind::Full, staging, vars);
        drop(s);
        self.journal
            .push(format!("nodes: full copy with bitmap {seq0} taken"));
        Ok(h)
    }

    async fn begin_point(
        &self,
        tag: RelTag,
        disks: &[(String, u64)],
        seq: u64,
        staging: &Staging,
    ) -> Result<CycleHandle, TrackingError> {
        let mut s = self.state();
        s.ops.push(Op::BeginPoint(seq));
        if let Some(fail) = s.fail_begin.take() {
            return Err(fail());
        }
        let h = FakeNodes::stage(&mut s, tag, disks, seq, CycleKind::Full, staging, None);
        drop(s);
        self.journal
            .push(format!("nodes: a point in time taken ({seq} names it)"));
        Ok(h)
    }

    async fn commit_cycle(
        &self,
        _tag: RelTag,
        nodes: &[&str],
        seq: u64,
    ) -> Result<(), TrackingError> {
        let mut s = self.state();
        s.ops.push(Op::Commit(seq));
        match s.bitmaps.get(&seq) {
            Some(b) if b.recording => Err(bad_state(nodes[0], seq, "it is still recording")),
            Some(_) => {
                s.bitmaps.remove(&seq);
                drop(s);
                self.journal.push(format!("nodes: bitmap {seq} committed"));
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn rollback_cycle(
        &self,
        _tag: RelTag,
        nodes: &[&str],
        seq: u64,
    ) -> Result<(), TrackingError> {
        let mut s = self.state();
        s.ops.push(Op::Rollback(seq));
        let Some(b) = s.bitmaps.get(&seq) else {
            return Ok(());
        };
        match s.bitmaps.get(&(seq + 1)) {
            Some(n) if !n.inconsistent => {
                let b = s.bitmaps.remove(&seq).unwrap();
                let into = s.bitmaps.get_mut(&(seq + 1)).unwrap();
                for (d, c) in b.dirty {
                    into.dirty.entry(d).or_default().extend(c);
                }
                drop(s);
                self.journal
                    .push(format!("nodes: bitmap {seq} merged back"));
                Ok(())
            }
            _ if b.recording => Ok(()),
            _ => Err(missing(nodes[0], seq + 1)),
        }
    }

    async fn stop_tracking(
        &self,
        _tag: RelTag,
        _nodes: &[&str],
        _staging_dir: Option<&Path>,
    ) -> Result<(), TrackingError> {
        let mut s = self.state();
        s.ops.push(Op::StopTracking);
        s.bitmaps.clear();
        Ok(())
    }

    async fn list_owned(
        &self,
        _tag: RelTag,
        nodes: &[&str],
    ) -> Result<BTreeMap<String, Vec<OwnedBitmap>>, TrackingError> {
        let s = self.state();
        Ok(nodes
            .iter()
            .map(|n| {
                let owned = s
                    .bitmaps
                    .iter()
                    .map(|(q, b)| OwnedBitmap {
                        seq: *q,
                        recording: b.recording,
                        count: b.dirty.get(*n).map_or(0, |c| c.len() as u64 * CLUSTER),
                        granularity: CLUSTER,
                        busy: false,
                        inconsistent: b.inconsistent,
                        persistent: true,
                    })
                    .collect();
                (n.to_string(), owned)
            })
            .collect())
    }

    async fn release_exports(&self, h: &CycleHandle) -> Result<(), TrackingError> {
        let mut s = self.state();
        s.ops.push(Op::Release(h.seq));
        s.points.remove(&h.point_in_time_ms);
        if s.fail_release {
            return Err(TrackingError::ExportTimeout {
                exports: vec!["fake".into()],
                secs: 10,
            });
        }
        Ok(())
    }

    fn reader(&self) -> Arc<dyn PointReader> {
        Arc::new(self.clone())
    }
}

impl PointReader for FakeNodes {
    fn open(&self, h: &CycleHandle) -> Result<Vec<Box<dyn PointImage>>, CycleError> {
        let mut s = self.state();
        s.builds += 1;
        let fail = s.fail_build_from.is_some_and(|n| s.builds >= n);
        let Some(p) = s.points.get(&h.point_in_time_ms) else {
            return Err(CycleError::Other(format!(
                "the point in time of cycle {} was released before it was read",
                h.seq
            )));
        };
        let blocks_read = s.blocks_read.clone();
        Ok(p.images
            .iter()
            .map(|(data, ranges)| {
                Box::new(FakeImage {
                    data: data.clone(),
                    ranges: ranges.clone(),
                    fail,
                    blocks_read: blocks_read.clone(),
                }) as Box<dyn PointImage>
            })
            .collect())
    }
}

/// One staged image in memory.
struct FakeImage {
    data: Vec<u8>,
    ranges: Vec<(u64, u64)>,
    /// Reading it fails (an NBD read error, say).
    fail: bool,
    blocks_read: Arc<std::sync::atomic::AtomicU64>,
}

impl FakeImage {
    fn check(&self) -> Result<(), String> {
        if self.fail {
            return Err("injected: the export could not be read".into());
        }
        Ok(())
    }
}

impl PointImage for FakeImage {
    fn digest_range(&mut self, h: &mut BlockHasher) -> Result<(), String> {
        self.check()?;
        let (offset, len, _) = h.range();
        h.put(
            offset,
            Some(&self.data[offset as usize..(offset + len) as usize]),
            len,
        )
    }

    fn write_blocks(
        &mut self,
        w: &mut LogWriter<LogSink>,
        disk: u16,
        blocks: &[(u64, u64)],
    ) -> Result<(), String> {
        self.check()?;
        let data = &self.data;
        let n: u64 = blocks.iter().map(|b| b.1).sum();
        self.blocks_read
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        let chunks = blocks.iter().map(|&(o, l)| {
            Ok(Chunk {
                offset: o,
                data: ChunkData::Data(data[o as usize..(o + l) as usize].to_vec()),
            })
        });
        write_chunks(w, disk, chunks)
    }

    fn write_ranges(
        &mut self,
        w: &mut LogWriter<LogSink>,
        disk: u16,
        size: u64,
        zero_gaps: bool,
    ) -> Result<(), String> {
        self.check()?;
        let data = &self.data;
        let chunks = self.ranges.iter().flat_map(|&(o, l)| {
            (o..o + l)
                .step_by(vmrepl_tracking::MAX_CHUNK)
                .map(move |at| {
                    let end = (at + vmrepl_tracking::MAX_CHUNK as u64).min(o + l);
                    Ok(Chunk {
                        offset: at,
                        data: ChunkData::Data(data[at as usize..end as usize].to_vec()),
                    })
                })
        });
        write_ranges(w, disk, size, &self.ranges, chunks, zero_gaps)
    }

    fn write_differing(
        &mut self,
        w: &mut LogWriter<LogSink>,
        disk: u16,
        size: u64,
        bs: u64,
        theirs: &[[u8; 32]],
        report: &mut dyn FnMut(u64, bool),
    ) -> Result<u64, String> {
        self.check()?;
        let data = &self.data;
        compare_blocks(w, disk, size, bs, theirs, report, |start, buf| {
            buf.copy_from_slice(&data[start as usize..start as usize + buf.len()]);
            Ok(())
        })
    }
}

/// How a [`FakeGuest`] answers a freeze.
pub(crate) struct GuestState {
    pub(crate) freeze: Result<u64, String>,
    pub(crate) frozen: bool,
    pub(crate) freezes: u32,
    pub(crate) thaws: u32,
}

/// The guest agent of the VM.
#[derive(Clone)]
pub(crate) struct FakeGuest {
    pub(crate) s: Arc<Mutex<GuestState>>,
    journal: Journal,
}

impl FakeGuest {
    pub(crate) fn new(journal: &Journal) -> FakeGuest {
        FakeGuest {
            s: Arc::new(Mutex::new(GuestState {
                freeze: Ok(2),
                frozen: false,
                freezes: 0,
                thaws: 0,
            })),
            journal: journal.clone(),
        }
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, GuestState> {
        self.s.lock().unwrap()
    }
}

impl GuestAgent for FakeGuest {
    type Frozen = ();

    async fn freeze(&self) -> Result<((), u64), String> {
        let mut s = self.state();
        s.freezes += 1;
        let r = s.freeze.clone();
        s.frozen = r.is_ok();
        drop(s);
        if r.is_ok() {
            self.journal.push("guest: frozen");
        }
        r.map(|n| ((), n))
    }

    async fn thaw(&self, (): ()) {
        let mut s = self.state();
        s.thaws += 1;
        s.frozen = false;
        drop(s);
        self.journal.push("guest: thawed");
    }
}
