#![no_main]
//! Lines on rvirtd's socket: parse, serialise, parse again.
libfuzzer_sys::fuzz_target!(|data: &[u8]| rvirt_domain::fuzzing::daemon_request(data));
