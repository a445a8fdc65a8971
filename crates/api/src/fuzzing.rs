//! The body of the fuzz target in `crates/api/fuzz`, here so the kept
//! corpus also replays as an ordinary test on stable Rust
//! (`tests/fuzz_corpus.rs`). Not part of the public API.

use crate::parse_request;

/// A line on a VMM's control socket: parsing must not panic, and a request
/// that parses must survive its own serialisation.
pub fn control_request(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(req) = parse_request(text) else { return };
    let line = serde_json::to_string(&req).unwrap_or_else(|e| panic!("a request does not serialise: {e}"));
    assert_eq!(parse_request(&line).as_ref(), Ok(&req), "{line}");
}
