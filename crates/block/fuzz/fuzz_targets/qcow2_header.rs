//! Fuzzes qcow2 header parsing.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rvirt_block::fuzzing::header(data));
