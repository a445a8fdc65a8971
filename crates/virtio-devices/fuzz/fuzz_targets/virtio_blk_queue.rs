#![no_main]
//! A guest-written virtio-blk queue: rings, descriptors and requests are all fuzz input.
libfuzzer_sys::fuzz_target!(|data: &[u8]| rvirt_virtio_devices::fuzzing::block_queue(data));
