#![no_main]
//! A migration stream's page frame as the destination decodes it.
libfuzzer_sys::fuzz_target!(|data: &[u8]| rvirt_vmm::fuzzing::migration_pages(data));
