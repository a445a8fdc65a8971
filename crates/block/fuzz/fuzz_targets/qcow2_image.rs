//! Fuzzes opening, reading, mapping, checking and writing whole qcow2 files.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rvirt_block::fuzzing::image(data));
