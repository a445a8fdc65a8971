//! The body of the fuzz target in `crates/vmm/fuzz`, here so the kept
//! corpus also replays as an ordinary test on stable Rust
//! (`tests/fuzz_corpus.rs`). Not part of the public API.

use crate::snapshot::VmSnapshot;
use crate::state_file;

/// A saved VM's state as a restore reads it: decoding must not panic or
/// allocate beyond the bytes given, and a state that decodes must encode
/// to the same bytes (nothing in a file is ignored); so must each virtio
/// device's state inside it.
pub fn vm_state(data: &[u8]) {
    let Ok(state) = state_file::decode::<VmSnapshot>(data) else { return };
    for bytes in state.devices.values() {
        if let Ok(dev) = state_file::from_bytes::<rvirt_virtio_devices::transport::VirtioPciState>(bytes) {
            let again = state_file::to_bytes(&dev).unwrap_or_else(|e| panic!("a decoded device state does not encode: {e}"));
            assert!(again == *bytes, "a decoded device state encodes to other bytes");
        }
    }
    let again = state_file::encode(&state).unwrap_or_else(|e| panic!("a decoded state does not encode: {e}"));
    let first = again.iter().zip(data).position(|(a, b)| a != b);
    assert!(again.len() == data.len() && first.is_none(), "a decoded state encodes to other bytes ({} for {}, first difference at {first:?})", again.len(), data.len());
}

/// A `PAGES` frame of a migration stream as the destination reads it, into
/// 1 MiB of guest memory: it must be refused or written, never panic or
/// write outside the memory.
pub fn migration_pages(data: &[u8]) {
    use vm_memory::GuestAddress;
    let Ok(mem) = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]) else { return };
    let _ = crate::migration::decode_pages(data, &mem);
}
