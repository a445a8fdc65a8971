//! The container a VM's saved state travels in (snapshots now, migration
//! streams later): a fixed header saying what it is, which version wrote
//! it and how long it is, a CRC-32 of the payload, and the payload itself
//! (bincode of a serde value). Decoding checks each of these before it
//! reads a field, and never allocates more than the header announced and
//! the bytes hold.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// What a state file starts with.
pub const MAGIC: [u8; 8] = *b"RVIRTVMS";
/// The version this VMM writes and reads. A change of layout changes it.
pub const VERSION: u32 = 2;
/// Bytes of the header: magic, version, flags, payload length, CRC-32, reserved.
pub const HEADER_LEN: usize = 32;
/// The largest payload accepted (device and CPU state, never guest memory).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Why saved state cannot be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Fewer bytes than the header, or than the header announces.
    #[error("the state is truncated: {have} bytes where {need} are needed")]
    Truncated {
        /// Bytes present.
        have: u64,
        /// Bytes the header says there are.
        need: u64,
    },
    /// The bytes are not an rvirt state file at all.
    #[error("not an rvirt VM state file (its first bytes are not {:?})", String::from_utf8_lossy(&MAGIC))]
    NotState,
    /// Written by another version of the format.
    #[error("the state was written in format version {found}; this rvirt-vmm reads version {supported}")]
    Version {
        /// The file's version.
        found: u32,
        /// Ours.
        supported: u32,
    },
    /// Header flags or reserved bits this version does not define.
    #[error("the state's header has flags {flags:#x} and reserved word {reserved:#x}; this rvirt-vmm defines neither")]
    UnknownFlags {
        /// The flags word.
        flags: u32,
        /// The reserved word.
        reserved: u32,
    },
    /// The payload announced is larger than any state can be.
    #[error("the state announces a payload of {0} bytes, more than the {MAX_PAYLOAD} any VM's state takes")]
    TooLarge(u64),
    /// The payload does not match its checksum.
    #[error("the state is corrupted: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum {
        /// Computed over the payload.
        found: u32,
        /// Recorded in the header.
        expected: u32,
    },
    /// Bytes after the payload.
    #[error("{0} unexpected bytes follow the state")]
    Trailing(u64),
    /// The payload passed its checksum but does not decode (a writer bug,
    /// or a state of another shape under the same version).
    #[error("the state does not decode: {0}")]
    Malformed(String),
    /// The value could not be encoded.
    #[error("the state could not be encoded: {0}")]
    Encode(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_fixed_int_encoding().with_limit::<{ MAX_PAYLOAD as usize }>()
}

/// The bytes of `value` alone, for state nested in a state file (each
/// device's, kept by id): the file's checksum covers them.
pub fn to_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>, StateError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| StateError::Encode(e.to_string()))
}

/// The value in bytes from [`to_bytes`]; all of them must be used.
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config()).map_err(|e| StateError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(StateError::Malformed(format!("{} bytes are left over", bytes.len() - used)));
    }
    Ok(value)
}

/// The bytes of `value` in a state file.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StateError> {
    let payload = to_bytes(value)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The value in a state file, after checking its header and checksum.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    let have = bytes.len() as u64;
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        // A file too short to hold the magic is judged by what it does hold.
        return Err(if bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) && !bytes.is_empty() {
            StateError::Truncated { have, need: HEADER_LEN as u64 }
        } else {
            StateError::NotState
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(StateError::Truncated { have, need: HEADER_LEN as u64 });
    }
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != VERSION {
        return Err(StateError::Version { found: version, supported: VERSION });
    }
    // No flags are defined and the reserved word is zero: anything else was
    // written by another format, whatever its version says.
    let (flags, reserved) = (word(12), word(28));
    if flags != 0 || reserved != 0 {
        return Err(StateError::UnknownFlags { flags, reserved });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(StateError::TooLarge(len));
    }
    let need = HEADER_LEN as u64 + len;
    if have < need {
        return Err(StateError::Truncated { have, need });
    }
    if have > need {
        return Err(StateError::Trailing(have - need));
    }
    let payload = &bytes[HEADER_LEN..];
    let (expected, found) = (word(24), crc32fast::hash(payload));
    if expected != found {
        return Err(StateError::Checksum { found, expected });
    }
    from_bytes(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Sample {
        name: String,
        values: Vec<u64>,
    }

    fn sample() -> Vec<u8> {
        encode(&Sample { name: "vm".into(), values: vec![1, 2, 3] }).unwrap()
    }

    #[test]
    fn a_value_round_trips() {
        let back: Sample = decode(&sample()).unwrap();
        assert_eq!(back, Sample { name: "vm".into(), values: vec![1, 2, 3] });
    }

    #[test]
    fn every_truncation_is_named() {
        let bytes = sample();
        for cut in 1..bytes.len() {
            let e = decode::<Sample>(&bytes[..cut]).unwrap_err();
            assert!(matches!(e, StateError::Truncated { .. }), "cut at {cut}: {e}");
        }
        assert_eq!(decode::<Sample>(&[]).unwrap_err(), StateError::NotState);
    }

    #[test]
    fn every_flipped_payload_bit_is_caught() {
        let bytes = sample();
        for i in HEADER_LEN..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(matches!(decode::<Sample>(&b).unwrap_err(), StateError::Checksum { .. }), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn foreign_files_versions_and_sizes_are_refused_by_name() {
        let bytes = sample();
        let mut v = bytes.clone();
        v[8] = 9;
        assert_eq!(decode::<Sample>(&v).unwrap_err(), StateError::Version { found: 9, supported: VERSION });
        let mut m = bytes.clone();
        m[0] = b'X';
        assert_eq!(decode::<Sample>(&m).unwrap_err(), StateError::NotState);
        let mut big = bytes.clone();
        big[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode::<Sample>(&big).unwrap_err(), StateError::TooLarge(u64::MAX));
        let mut flagged = bytes.clone();
        flagged[12] = 1;
        assert_eq!(decode::<Sample>(&flagged).unwrap_err(), StateError::UnknownFlags { flags: 1, reserved: 0 });
        let mut reserved = bytes.clone();
        reserved[31] = 1;
        assert!(matches!(decode::<Sample>(&reserved).unwrap_err(), StateError::UnknownFlags { .. }));
        let mut more = bytes.clone();
        more.push(0);
        assert_eq!(decode::<Sample>(&more).unwrap_err(), StateError::Trailing(1));
        assert!(decode::<Sample>(b"QFI\xfb not a state file at all, but long enough").unwrap_err().to_string().contains("not an rvirt"));
    }

    #[test]
    fn a_payload_of_another_shape_is_malformed_not_a_panic() {
        let other = encode(&(1u8, 2u8)).unwrap();
        assert!(matches!(decode::<Sample>(&other).unwrap_err(), StateError::Malformed(_)));
        // A vector announcing more elements than the bytes hold allocates nothing first.
        let lying = encode(&(String::from("vm"), u64::MAX)).unwrap();
        assert!(matches!(decode::<Sample>(&lying).unwrap_err(), StateError::Malformed(_)));
    }
}
