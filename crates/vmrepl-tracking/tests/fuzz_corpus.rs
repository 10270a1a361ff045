//! Replays the seed corpus and every past crash of the `nbd_reply` fuzz target (NBD replies) (see
//! `docs/fuzzing.md`) through the same function the target calls, on the stable toolchain.

#[test]
fn every_seed_and_past_crash_of_the_nbd_reply_parser_is_handled() {
    vmrepl_types::fuzzing::replay_corpus("nbd_reply", |d: &[u8]| {
        vmrepl_tracking::fuzzing::nbd_reply(d)
    });
}
