//! Hostile command streams against a disk, a CD-ROM and an empty drive
//! (`cargo +nightly fuzz run scsi_commands` in crates/scsi).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rvirt_scsi::fuzzing::commands(data));
