//! The body of the fuzz target in `crates/vmm/fuzz`, here so the kept
//! corpus also replays as an ordinary test on stable Rust
//! (`tests/fuzz_corpus.rs`). Not part of the public API.

use crate::state_file;
use crate::vcpu_state::MachineState;

/// A saved VM's state as a restore reads it: decoding must not panic or
/// allocate beyond the bytes given, and a state that decodes must encode
/// to the same bytes (nothing in a file is ignored).
pub fn vm_state(data: &[u8]) {
    let Ok(state) = state_file::decode::<MachineState>(data) else { return };
    let again = state_file::encode(&state).unwrap_or_else(|e| panic!("a decoded state does not encode: {e}"));
    let first = again.iter().zip(data).position(|(a, b)| a != b);
    assert!(again.len() == data.len() && first.is_none(), "a decoded state encodes to other bytes ({} for {}, first difference at {first:?})", again.len(), data.len());
}
