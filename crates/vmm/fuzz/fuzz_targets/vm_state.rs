#![no_main]
//! A VM state file as `--restore` reads it: decode, encode, compare.
libfuzzer_sys::fuzz_target!(|data: &[u8]| rvirt_vmm::fuzzing::vm_state(data));
