//! The peer API: what hosts say to each other over mutual TLS.
//!
//! * [`proto`]: the typed messages.
//! * [`server`]: the replica-server side (authorization, replica VMs, receiving and applying logs).
//! * [`client`]: the primary side's connection to a replica server.

pub mod client;
#[doc(hidden)]
pub mod fuzzing;
pub mod proto;
pub mod server;
