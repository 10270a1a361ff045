//! Body of the `peer_frame` fuzz target (the `fuzz/` crate at the repository root) and of the
//! regression test that replays its corpus on stable. Not part of the stable API.

use std::future::Future;
use std::task::{Context, Poll, Waker};

use vmrepl_transport::frame::{read_frame, read_preamble, write_frame, Frame, SUPPORTED};

use super::proto::{PeerRequest, PeerResponse};

/// Runs a future that never waits (it only reads from and writes to memory).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("I/O on memory never waits"),
    }
}

/// The `peer_frame` target: `data` is what a peer sends on a connection after the TLS handshake,
/// the preamble and then frames. Every control frame is decoded both as a [`PeerRequest`] (what
/// a replica server reads) and as a [`PeerResponse`] (what a primary reads).
///
/// Checks, besides "no panic":
/// * a negotiated version lies in both ranges;
/// * every frame read re-encodes into exactly the bytes it was read from;
/// * every request and response that decodes encodes to JSON that decodes to the same value;
/// * block digests that decode re-encode to the same (lower-case) hex text.
pub fn peer_frame(data: &[u8]) {
    let mut input = data;
    let Ok(theirs) = now(read_preamble(&mut input)) else {
        return;
    };
    if let Ok(v) = SUPPORTED.negotiate(theirs) {
        assert!(
            (SUPPORTED.min..=SUPPORTED.max).contains(&v) && (theirs.min..=theirs.max).contains(&v),
            "version {v} negotiated between {SUPPORTED} and {theirs}"
        );
    }
    loop {
        let before = input;
        let Ok(frame) = now(read_frame(&mut input)) else {
            return;
        };
        let consumed = &before[..before.len() - input.len()];
        let payload = match &frame {
            Frame::Control(p) | Frame::Data(p) => p,
        };
        let mut again = Vec::new();
        now(write_frame(&mut again, frame.kind(), payload)).expect("a frame that was read fits");
        assert_eq!(again, consumed, "a frame re-encodes differently");
        if !matches!(frame, Frame::Control(_)) {
            continue;
        }
        if let Ok(req) = frame.parse_control::<PeerRequest>() {
            let json = serde_json::to_vec(&req).expect("a request encodes");
            let back: PeerRequest = serde_json::from_slice(&json)
                .unwrap_or_else(|e| panic!("a re-encoded request does not decode: {e}"));
            assert_eq!(back, req, "a request changes through JSON");
        }
        if let Ok(resp) = frame.parse_control::<PeerResponse>() {
            let json = serde_json::to_vec(&resp).expect("a response encodes");
            let back: PeerResponse = serde_json::from_slice(&json)
                .unwrap_or_else(|e| panic!("a re-encoded response does not decode: {e}"));
            assert_eq!(back, resp, "a response changes through JSON");
            if let PeerResponse::BlockDigests { disks } = &resp {
                for d in disks {
                    if let Some(digests) = d.decode() {
                        let hex =
                            super::proto::DiskDigests::new(d.id.clone(), d.block_size, &digests);
                        assert_eq!(hex.digests, d.digests.to_ascii_lowercase());
                    }
                }
            }
        }
    }
}
