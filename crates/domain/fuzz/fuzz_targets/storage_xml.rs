#![no_main]
//! Pool and volume definitions as a client sends them: parse, write back, parse again.
libfuzzer_sys::fuzz_target!(|data: &[u8]| rvirt_domain::fuzzing::storage(data));
