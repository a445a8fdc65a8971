#![no_main]
//! Lines on a VMM's control socket: parse, serialise, parse again.
libfuzzer_sys::fuzz_target!(|data: &[u8]| rvirt_api::fuzzing::control_request(data));
