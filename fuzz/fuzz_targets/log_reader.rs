//! The replication log reader, verifier and valid-prefix scanner, with re-encoding and resume.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmrepl_log::fuzzing::log_reader(data));
