#![no_main]
//! Frames received into guest-made rings and buffers, with and without mergeable buffers.
libfuzzer_sys::fuzz_target!(|data: &[u8]| rvirt_virtio_devices::fuzzing::net_rx(data));
