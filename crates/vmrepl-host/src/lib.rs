//! The vmrepl host: the daemon behind the CLI.
//!
//! * [`datadir`]: the host's data folder and the one-daemon-per-folder lock.
//! * [`config`]: the TOML configuration (parse → validate → save atomically).
//! * [`db`]: durable state in SQLite.
//! * [`mgmt`]: the local management API (JSON lines over a Unix socket).
//! * [`init`]: `host init` and certificate chores.
//! * [`vmm`]: VM definition and supervision through the QEMU wrapper.
//! * [`daemon`]: wiring and request dispatch.
//! * [`peer`]: the peer API between hosts (mutual TLS).
//! * [`replica`]: the replica side: replica VMs, applying received logs, recovery points.

pub mod config;
pub mod daemon;
pub mod datadir;
pub mod db;
pub mod error;
pub mod failover;
pub mod fsutil;
pub mod host;
pub mod init;
pub mod lifecycle;
pub mod locks;
pub mod mgmt;
pub mod peer;
pub mod peer_server;
pub mod primary;
pub mod replica;
pub mod vmm;
