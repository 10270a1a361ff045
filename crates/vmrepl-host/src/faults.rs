//! Test-only crash points: named moments of a cycle where the daemon can be made to die as
//! `kill -9` would, on demand. The end-to-end fault matrix (`crates/vmrepl/tests/faults.rs`)
//! starts a daemon with `VMREPL_CRASH_AT=<point>`; when the daemon reaches that point it aborts
//! at once (no destructor, no flush, no core file), which a real kill cannot time exactly.
//! Without the variable (always, outside the tests) a crash point is one cached comparison.

use std::sync::OnceLock;

/// The environment variable that names the one point at which the daemon aborts.
pub const CRASH_AT_ENV: &str = "VMREPL_CRASH_AT";

/// The moments a crash can be asked for, in the order a cycle reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// Primary: the delta's transaction has taken the point in time (bitmap N frozen, N+1
    /// recording), nothing has been sent yet.
    PrimaryAfterTransaction,
    /// Primary: the replica acknowledged the log; the frozen bitmap is not released yet.
    PrimaryAfterAck,
    /// Replica: the first frame of a log is in the spool, the rest has not arrived.
    ReplicaReceiving,
    /// Replica: the log is durable and verified; the acknowledgement has not been sent.
    ReplicaBeforeAck,
    /// Replica: the log's records are written into the top layer, not committed.
    ReplicaApplying,
}

impl CrashPoint {
    /// Every point, for documentation and parsing.
    pub const ALL: [CrashPoint; 5] = [
        CrashPoint::PrimaryAfterTransaction,
        CrashPoint::PrimaryAfterAck,
        CrashPoint::ReplicaReceiving,
        CrashPoint::ReplicaBeforeAck,
        CrashPoint::ReplicaApplying,
    ];

    /// The name `VMREPL_CRASH_AT` takes.
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::PrimaryAfterTransaction => "primary-after-transaction",
            CrashPoint::PrimaryAfterAck => "primary-after-ack",
            CrashPoint::ReplicaReceiving => "replica-receiving",
            CrashPoint::ReplicaBeforeAck => "replica-before-ack",
            CrashPoint::ReplicaApplying => "replica-applying",
        }
    }

    /// The point a name stands for.
    pub fn parse(name: &str) -> Option<CrashPoint> {
        CrashPoint::ALL
            .into_iter()
            .find(|p| p.name() == name.trim())
    }
}

/// The point named by `VMREPL_CRASH_AT`, read once per process.
fn armed() -> Option<CrashPoint> {
    static AT: OnceLock<Option<CrashPoint>> = OnceLock::new();
    *AT.get_or_init(|| {
        let name = std::env::var(CRASH_AT_ENV).ok()?;
        let p = CrashPoint::parse(&name);
        if p.is_none() {
            tracing::warn!(target: "vmrepl::faults", "{CRASH_AT_ENV}={name:?} names no crash point; ignored");
        }
        p
    })
}

/// Aborts the process when `VMREPL_CRASH_AT` names `p` (test-only; see the module).
pub fn crash_point(p: CrashPoint) {
    if armed() == Some(p) {
        tracing::error!(target: "vmrepl::faults", point = p.name(), "crash point reached: aborting");
        // A crashed daemon leaves no core file behind in the tests' folders.
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_crash_point_is_found_by_its_own_name_and_only_by_it() {
        for p in CrashPoint::ALL {
            assert_eq!(CrashPoint::parse(p.name()), Some(p));
        }
        assert_eq!(CrashPoint::parse("primary-somewhere"), None);
        assert_eq!(CrashPoint::parse(""), None);
    }

    #[test]
    fn without_the_variable_a_crash_point_does_nothing() {
        // The unit tests never set VMREPL_CRASH_AT; reaching every point must return.
        if std::env::var_os(CRASH_AT_ENV).is_none() {
            for p in CrashPoint::ALL {
                crash_point(p);
            }
        }
    }
}
