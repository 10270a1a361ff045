//! Primary side of the peer API (being written).
