//! The per-relationship scheduler: one task per relationship that waits for its frequency
//! (or a wake-up) and runs one cycle, counting missed cycles.

use crate::db::now_ms;
use crate::host::{Host, RelRuntime};
use crate::primary::all;
use crate::primary::app_consistent_due;
use crate::primary::change;
use crate::primary::happened;
use crate::primary::last_marked_ms;
use crate::primary::load;
use crate::primary::log_path;
use crate::primary::record_cycle;
use crate::primary::run_cycle;
use crate::primary::CycleOutcome;
use crate::primary::Freeze;
use crate::primary::Marked;
use crate::primary::RecordedKind;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;
use vmrepl_tracking::RelTag;
use vmrepl_types::replication::{InitialReplication, ReplicationState};

/// Ends a relationship's scheduler (a cycle in flight finishes; none starts after it).
pub(crate) fn stop_scheduler(d: &Host, vm: Uuid) {
    if let Some(rt) = crate::locks::unpoisoned(&d.repl.rels).remove(&vm) {
        rt.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        rt.wake.notify_one();
    }
}

/// Runs cycles now, outside the schedule, until one built and shipped a fresh log of every
/// change so far (a cut transfer waiting to resume is finished first). Used by a planned
/// failover's prepare with `Consistency::Planned`. Returns the acknowledged sequence and, for
/// an app-consistent point, how freezing the guest went.
pub(crate) async fn replicate_now(
    d: &Arc<Host>,
    vm: Uuid,
    consistency: vmrepl_log::Consistency,
) -> Result<(u64, Option<Freeze>), String> {
    let rt = crate::locks::unpoisoned(&d.repl.rels)
        .get(&vm)
        .cloned()
        .unwrap_or_default();
    for _ in 0..3 {
        let rel = load(d, vm)
            .map_err(|e| e.to_string())?
            .ok_or("replication was removed")?;
        let waiting = log_path(d, RelTag::from_uuid(&rel.rel_id), rel.acked_seq + 1).exists();
        let freeze = run_cycle(d, vm, &rt, consistency).await?;
        *crate::locks::unpoisoned(&rt.progress) = None;
        if !waiting {
            let acked = load(d, vm).map_err(|e| e.to_string())?;
            return Ok((acked.map(|r| r.acked_seq).unwrap_or_default(), freeze));
        }
    }
    Err("a cut transfer kept failing to resume".into())
}

/// The relationship of `vm` needs a resynchronization and its policy allows one now: asks for it
/// (the state machine moves it to Resynchronizing), unless the state moved meanwhile. Says
/// whether the cycle that follows is that resynchronization.
async fn start_resync_by_policy(d: &Host, vm: Uuid) -> bool {
    let rel = match load(d, vm) {
        Ok(Some(rel)) if rel.state == ReplicationState::ResynchronizationRequired => rel,
        _ => return false,
    };
    let cause = format!(
        "started by itself (resynchronization policy: {})",
        rel.settings.resync
    );
    match change(
        d,
        vm,
        crate::lifecycle::PrimaryEvent::ResynchronizationRequested,
        Some(&cause),
    ) {
        Ok(_) => {
            tracing::info!(target: "vmrepl::replication", %vm, "resynchronization {cause}");
            true
        }
        Err(e) => {
            tracing::warn!(target: "vmrepl::replication", %vm, "{e}");
            false
        }
    }
}

/// Starts the scheduler of every stored relationship (daemon start). A cycle that was running
/// when the daemon stopped did not finish: the restart is an event of each relationship
/// (an initial copy that was cut starts over).
pub fn start_all(d: &Arc<Host>) {
    let rels = match all(d) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(target: "vmrepl::replication", "no relationship is started: {e}");
            return;
        }
    };
    for rel in rels {
        happened(
            d,
            rel.vm_uuid,
            crate::lifecycle::PrimaryEvent::DaemonRestarted,
            None,
        );
        spawn(d, rel.vm_uuid);
    }
}

pub(crate) fn spawn(d: &Arc<Host>, vm: Uuid) {
    let rt = Arc::new(RelRuntime::default());
    crate::locks::unpoisoned(&d.repl.rels).insert(vm, rt.clone());
    let d = d.clone();
    tokio::spawn(async move { scheduler(d, vm, rt).await });
}

/// How long until the next cycle of frequency `freq` is due, the last having started at
/// `last` (none yet: at once). Measured on the monotonic clock: a jump of the wall clock
/// neither stalls replication (a jump back) nor hurries it (a jump ahead).
fn due_in(last: Option<Instant>, freq: Duration, now: Instant) -> Duration {
    last.map(|s| (s + freq).saturating_duration_since(now))
        .unwrap_or(Duration::ZERO)
}

/// How many cycles of frequency `freq` were missed between a cycle that started at `prev`
/// and one that starts at `now` (Hyper-V: the log could not go out within its interval), on
/// the monotonic clock, so that a wall-clock jump is not counted as missed cycles.
fn missed_between(prev: Instant, now: Instant, freq: Duration) -> u64 {
    let late = now.saturating_duration_since(prev).as_millis() as u64;
    (late / (freq.as_millis() as u64).max(1)).saturating_sub(1)
}

pub(crate) async fn scheduler(d: Arc<Host>, vm: Uuid, rt: Arc<RelRuntime>) {
    let mut last_start: Option<Instant> = None;
    loop {
        if rt.stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let rel = match load(&d, vm) {
            Ok(Some(rel)) => rel,
            Ok(None) => return,
            Err(e) => {
                // The database failed: the relationship is still there, try again later.
                tracing::error!(target: "vmrepl::replication", %vm, "{e}");
                let _ = tokio::time::timeout(Duration::from_secs(5), rt.wake.notified()).await;
                continue;
            }
        };
        let freq = Duration::from_secs(u64::from(rel.settings.frequency_secs));
        let freq_ms = freq.as_millis() as u64;
        let wait_ms = match rel.state {
            ReplicationState::Suspended | ReplicationState::SyncedReplicationComplete => u64::MAX,
            // Self-healing: the relationship's policy says when a required resynchronization
            // starts by itself; at least one interval after the cycle that found it, so that
            // one that keeps failing does not run in a loop.
            ReplicationState::ResynchronizationRequired => {
                match rel.settings.resync.wait_ms(now_ms()) {
                    None => u64::MAX,
                    Some(policy) => {
                        policy.max(due_in(last_start, freq, Instant::now()).as_millis() as u64)
                    }
                }
            }
            ReplicationState::ReadyForInitialReplication => match rel.settings.initial {
                InitialReplication::NetworkAt { unix_secs } => {
                    (unix_secs * 1000).saturating_sub(now_ms())
                }
                _ => 0,
            },
            ReplicationState::WaitingForInitialReplication => {
                // Retry a failed initial copy after one interval.
                if last_start.is_some() {
                    freq_ms
                } else {
                    0
                }
            }
            _ => due_in(last_start, freq, Instant::now()).as_millis() as u64,
        };
        if wait_ms > 0 {
            let sleep = Duration::from_millis(wait_ms.min(3_600_000));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                // Pause, resume or remove: look again. A resumed relationship replicates at
                // once, and the time it spent paused is not counted as missed cycles.
                _ = rt.wake.notified() => { last_start = None; continue; }
            }
            if wait_ms > 3_600_000 {
                continue;
            }
        }
        if rel.state == ReplicationState::ResynchronizationRequired
            && !start_resync_by_policy(&d, vm).await
        {
            // The state moved meanwhile, or the database failed: look again shortly.
            let _ = tokio::time::timeout(Duration::from_secs(5), rt.wake.notified()).await;
            continue;
        }
        if let Some(prev) = last_start {
            // Hyper-V counts a cycle as missed when the log could not go out within its interval.
            for _ in 0..missed_between(prev, Instant::now(), freq) {
                record_cycle(
                    &d,
                    crate::db::CycleRecord {
                        vm,
                        seq: rel.acked_seq + 1,
                        kind: RecordedKind::Delta,
                        start_ms: now_ms(),
                        bytes: 0,
                        outcome: CycleOutcome::Missed,
                        error: None,
                    },
                );
            }
        }
        let start = now_ms();
        last_start = Some(Instant::now());
        let running = d.vmm.live_process(vm).await.is_some();
        let consistency = if app_consistent_due(
            &rel.settings,
            rel.state,
            running,
            last_marked_ms(&d, vm, rel.created_ms, Marked::AppFreezeTried).unwrap_or_else(|e| {
                tracing::warn!(target: "vmrepl::replication", %vm, "{e}");
                None
            }),
            start,
        ) {
            vmrepl_log::Consistency::AppConsistent
        } else {
            vmrepl_log::Consistency::Crash
        };
        if let Err(e) = run_cycle(&d, vm, &rt, consistency).await {
            tracing::warn!(target: "vmrepl::replication", %vm, "cycle failed: {e}");
        }
        crate::primary::note_health(&d, vm);
        *crate::locks::unpoisoned(&rt.progress) = None;
    }
}

pub(crate) fn wake(d: &Host, vm: Uuid) {
    if let Some(rt) = crate::locks::unpoisoned(&d.repl.rels).get(&vm) {
        rt.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_cycle_is_due_one_frequency_after_the_last_started_on_the_monotonic_clock() {
        let f = Duration::from_secs(5);
        let t0 = Instant::now();
        assert_eq!(
            due_in(None, f, t0),
            Duration::ZERO,
            "the first cycle runs at once"
        );
        assert_eq!(due_in(Some(t0), f, t0), f);
        assert_eq!(
            due_in(Some(t0), f, t0 + Duration::from_secs(2)),
            Duration::from_secs(3)
        );
        assert_eq!(
            due_in(Some(t0), f, t0 + Duration::from_secs(9)),
            Duration::ZERO
        );
    }

    #[test]
    fn only_whole_intervals_past_the_first_count_as_missed_cycles() {
        let f = Duration::from_secs(5);
        let t0 = Instant::now();
        assert_eq!(missed_between(t0, t0 + Duration::from_secs(4), f), 0);
        assert_eq!(missed_between(t0, t0 + Duration::from_secs(9), f), 0);
        assert_eq!(missed_between(t0, t0 + Duration::from_secs(10), f), 1);
        assert_eq!(missed_between(t0, t0 + Duration::from_secs(26), f), 4);
        // A clock that went back (never the monotonic one, but saturate all the same).
        assert_eq!(missed_between(t0 + Duration::from_secs(60), t0, f), 0);
    }
}
