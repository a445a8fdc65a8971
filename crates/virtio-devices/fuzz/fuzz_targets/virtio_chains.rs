#![no_main]
//! Descriptor chains (direct, indirect, looping, out of memory) walked as byte streams.
libfuzzer_sys::fuzz_target!(|data: &[u8]| rvirt_virtio_devices::fuzzing::chains(data));
