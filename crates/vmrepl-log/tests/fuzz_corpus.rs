//! Replays the seed corpus and every past crash of the `log_reader` fuzz target (see
//! `docs/fuzzing.md`) through the same function the target calls, on the stable toolchain.

#[test]
fn every_seed_and_past_crash_of_the_log_reader_is_handled() {
    vmrepl_types::fuzzing::replay_corpus("log_reader", |d: &[u8]| {
        vmrepl_log::fuzzing::log_reader(d)
    });
}
