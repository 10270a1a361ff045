//! The vmrepl host: the daemon behind the CLI, and the replication engine.
//!
//! Read top-down (docs/design/architecture.md has the map and its rules):
//! * [`daemon`]: boots the host and maps each management request to a flow; nothing imports it.
//! * [`host`]: the context every flow receives ([`host::Host`]); it imports no flow.
//! * [`primary`], [`replica`], [`failover`]: the flows of each role; `primary/run.rs` reads one
//!   replication cycle top-down.
//! * [`peer_server`]: the replica server's front door; [`peer`]: the wire (messages, client).
//! * [`lifecycle`]: the relationship state machines, one per role; [`db`]: every table behind
//!   typed repositories, and the only writer of a relationship's state.
//! * [`error`]: the flows' typed error and its one mapping to API codes.
//! * [`vmm`]: VM definitions and QEMU supervision; [`mgmt`]: the management socket;
//!   [`config`], [`datadir`], [`init`], [`locks`], [`fsutil`]: the host's files and locks;
//!   [`host_settings`]: the settings commands change, kept in the database (the configuration
//!   file is the admin's and never written by the daemon).
//! * [`sd_notify`]: systemd's readiness, watchdog and stopping notifications.
//! * [`faults`]: test-only crash points (`VMREPL_CRASH_AT`) for the fault matrix.

pub mod config;
pub mod daemon;
pub mod dashboard;
pub mod datadir;
pub mod db;
pub mod doctor;
pub mod error;
pub mod failover;
pub mod faults;
pub mod fingerprint;
pub mod fsutil;
pub mod host;
pub mod host_settings;
pub mod init;
pub mod inventory;
pub mod lifecycle;
pub mod locks;
pub mod metrics;
pub mod mgmt;
pub mod peer;
pub mod peer_server;
pub mod primary;
pub mod replica;
pub mod sd_notify;
pub mod vmm;
