//! Replays the seed corpus and every past crash of the `qmp_reply` fuzz target (QMP and guest-agent replies) (see
//! `docs/fuzzing.md`) through the same function the target calls, on the stable toolchain.

#[test]
fn every_seed_and_past_crash_of_the_qmp_and_agent_reply_parsers_is_handled() {
    vmrepl_types::fuzzing::replay_corpus("qmp_reply", |d: &[u8]| {
        vmrepl_qemu::fuzzing::qmp_reply(d)
    });
}
