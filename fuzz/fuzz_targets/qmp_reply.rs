//! QMP greetings, replies and events, and guest-agent replies.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmrepl_qemu::fuzzing::qmp_reply(data));
