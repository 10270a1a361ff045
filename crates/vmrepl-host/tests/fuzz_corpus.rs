//! Replays the seed corpus and every past crash of the `peer_frame` fuzz target (peer frames and requests) (see
//! `docs/fuzzing.md`) through the same function the target calls, on the stable toolchain.

#[test]
fn every_seed_and_past_crash_of_the_peer_frame_decoder_is_handled() {
    vmrepl_types::fuzzing::replay_corpus("peer_frame", |d: &[u8]| {
        vmrepl_host::peer::fuzzing::peer_frame(d)
    });
}
