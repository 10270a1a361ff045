//! The peer connection's preamble and frames, and the JSON of requests and responses.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmrepl_host::peer::fuzzing::peer_frame(data));
