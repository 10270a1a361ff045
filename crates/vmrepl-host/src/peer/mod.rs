//! The peer API: what hosts say to each other over mutual TLS.
//!
//! * [`proto`]: the typed messages.
//! * [`client`]: the primary side's connection to a replica server.

pub mod client;
#[doc(hidden)]
pub mod fuzzing;
pub mod proto;
