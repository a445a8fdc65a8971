//! The body of the fuzz target in `crates/vmm/fuzz`, here so the kept
//! corpus also replays as an ordinary test on stable Rust
//! (`tests/fuzz_corpus.rs`). Not part of the public API.

use crate::state_file;
use crate::vcpu_state::MachineState;

/// A saved VM's state as a restore reads it: decoding must not panic or
/// allocate beyond the bytes given, and a state that decodes must encode
/// into a file that decodes to the same state. (Not always to the input's
/// bytes: kvm-bindings reads some structures from fewer bytes than it
/// writes, filling the rest with zeroes.)
pub fn vm_state(data: &[u8]) {
    let Ok(state) = state_file::decode::<MachineState>(data) else { return };
    let once = state_file::encode(&state).unwrap_or_else(|e| panic!("a decoded state does not encode: {e}"));
    let again: MachineState = state_file::decode(&once).unwrap_or_else(|e| panic!("an encoded state does not decode: {e}"));
    let twice = state_file::encode(&again).unwrap_or_else(|e| panic!("a decoded state does not encode: {e}"));
    assert!(once == twice, "a state's encoding is not stable ({} and {} bytes)", once.len(), twice.len());
}
