//! The bodies of the fuzz targets in `crates/domain/fuzz`, here so the kept
//! corpus also replays as an ordinary test on stable Rust
//! (`tests/fuzz_corpus.rs`). Not part of the public API.

use std::path::Path;

use crate::{protocol, DomainXml, PoolDef, PoolSizes, VmmLaunch, VolumeDef};

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

/// A pool or volume definition as a client might send it: parsing must not
/// panic, and what parses must write back to XML that parses again and, from
/// then on, writes back the same (rvirtd stores and shows what it wrote).
pub fn storage(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let sizes = PoolSizes { capacity: 3, allocation: 2, available: 1 };
    if let Ok(p) = PoolDef::parse(text) {
        let written = p.to_xml(sizes);
        let again = PoolDef::parse(&written).unwrap_or_else(|e| panic!("a parsed pool does not read back: {e}\n{written}"));
        assert_eq!(again.to_xml(sizes), written, "a pool does not write back the same way twice");
    }
    if let Ok(v) = VolumeDef::parse(text) {
        let written = v.to_xml();
        let again = VolumeDef::parse(&written).unwrap_or_else(|e| panic!("a parsed volume does not read back: {e}\n{written}"));
        let twice = VolumeDef::parse(&again.to_xml()).unwrap_or_else(|e| panic!("a volume written twice does not read back: {e}"));
        assert_eq!(twice.to_xml(), again.to_xml(), "a volume does not write back the same way");
        // No format asks for raw, which the written XML says.
        let raw = |f: Option<crate::ImageFormat>| f.unwrap_or(crate::ImageFormat::Raw);
        assert_eq!((again.name, again.capacity, raw(again.format), again.backing), (v.name, v.capacity, raw(v.format), v.backing), "a volume's XML loses what it asks for");
    }
}
