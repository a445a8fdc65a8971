//! The bodies of the fuzz targets in `crates/domain/fuzz`, here so the kept
//! corpus also replays as an ordinary test on stable Rust
//! (`tests/fuzz_corpus.rs`). Not part of the public API.

use std::path::Path;

use crate::{protocol, DomainXml, VmmLaunch};

/// A definition as a client might send it: parsing must not panic, and what
/// parses must write back to XML that parses again and writes back the same
/// (rvirtd stores nothing that does not), and must give VMM arguments.
pub fn definition(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(d) = DomainXml::parse(text) else { return };
    let _ = d.unknown_report();
    let written = d.to_xml();
    let again = DomainXml::parse(&written).unwrap_or_else(|e| panic!("a parsed definition does not read back: {e}\n{written}"));
    assert_eq!(again.to_xml(), written, "a definition does not write back the same way twice");
    let taps: Vec<String> = (0..d.interfaces.len()).map(|i| format!("t{i}")).collect();
    let _ = d.vm_config(&VmmLaunch { api_socket: Path::new("/run/s.sock"), taps: &taps, chains: &[], tap_fds: &[] }).map(|c| c.to_json());
}

/// A line on rvirtd's socket: parsing must not panic, and a request that
/// parses must survive its own serialisation.
pub fn daemon_request(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(req) = protocol::parse_request(text) else { return };
    let line = serde_json::to_string(&req).unwrap_or_else(|e| panic!("a request does not serialise: {e}"));
    assert_eq!(protocol::parse_request(&line).as_ref(), Ok(&req), "{line}");
}
