//! Replica-server side of the peer API (being written).

use crate::daemon::Daemon;
use std::sync::Arc;

/// Serves peer connections.
pub async fn serve(listener: vmrepl_transport::tls::Listener, _daemon: Arc<Daemon>) {
    loop {
        match listener.accept().await {
            Ok((_stream, peer)) => {
                tracing::info!(target: "vmrepl::peer", host = %peer.host_name, "peer connected")
            }
            Err(e) => tracing::warn!(target: "vmrepl::peer", "peer refused: {e}"),
        }
    }
}
