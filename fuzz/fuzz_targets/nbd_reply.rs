//! The NBD client: handshake replies, block status and structured read replies.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmrepl_tracking::fuzzing::nbd_reply(data));
