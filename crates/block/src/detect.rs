//! Image format detection by content, for every format qemu-img knows.
//!
//! Only images a user names are probed (as qemu-img does); a guest-writable
//! disk is never probed, because its first bytes are the guest's to choose.
//! A format rvirt cannot read is named in the error instead of being read
//! as raw (which would copy container bytes as if they were the disk).

use std::path::Path;

use crate::file::{open_checked, Kind};
use crate::{io_err, Error, Format, Result};

/// What the first (and last) bytes of a file say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// A format rvirt reads and writes.
    Known(Format),
    /// A format qemu-img knows and rvirt does not: its qemu-img name.
    Foreign(&'static str),
}

/// Leading signatures, as each of qemu-img's format drivers probes them.
const LEADING: &[(usize, &[u8], &str)] = &[
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"QED\0", "qed"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
    (0x40, &[0x7f, 0x10, 0xda, 0xbe], "vdi"),
];

/// Classifies a file from its first 512 bytes and its last 512 (`tail`:
/// fixed-size VHD and DMG keep their signature in a footer).
pub fn classify(head: &[u8], tail: &[u8]) -> Detected {
    if head.len() >= 8 && head[..4] == crate::qcow2::MAGIC {
        return match u32::from_be_bytes([head[4], head[5], head[6], head[7]]) {
            1 => Detected::Foreign("qcow"),
            _ => Detected::Known(Format::Qcow2),
        };
    }
    for &(at, magic, name) in LEADING {
        if head.len() >= at + magic.len() && &head[at..at + magic.len()] == magic {
            return Detected::Foreign(name);
        }
    }
    if tail.len() == 512 {
        if tail.starts_with(b"conectix") {
            return Detected::Foreign("vpc");
        }
        if tail.starts_with(b"koly") {
            return Detected::Foreign("dmg");
        }
    }
    Detected::Known(Format::Raw)
}

/// Detects the format of the file at `path` (opened without blocking).
pub fn detect(path: &Path) -> Result<Detected> {
    let f = open_checked(path, false, Kind::RegularOrBlock, 0).map_err(|e| io_err(path, e))?;
    let len = crate::raw::device_size(&f).map_err(|e| io_err(path, e))?;
    let mut head = vec![0u8; 512.min(len as usize)];
    crate::file::ImageFile::read_exact_at(&f, &mut head, 0).map_err(|e| io_err(path, e))?;
    let mut tail = Vec::new();
    if len >= 1024 {
        tail = vec![0u8; 512];
        crate::file::ImageFile::read_exact_at(&f, &mut tail, len - 512).map_err(|e| io_err(path, e))?;
    }
    Ok(classify(&head, &tail))
}

/// Probes a user-named image: raw or qcow2, or an error naming the foreign format.
pub fn probe_format(path: &Path) -> Result<Format> {
    match detect(path)? {
        Detected::Known(f) => Ok(f),
        Detected::Foreign(name) => Err(foreign(path, name)),
    }
}

/// The error for an image in a format rvirt does not read.
pub fn foreign(path: &Path, name: &str) -> Error {
    Error::Unsupported {
        path: path.display().to_string(),
        detail: format!(
            "the image is in {name} format, which rvirt does not read; convert it first (qemu-img convert -f {name} -O qcow2 …)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_named() {
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda107fu32.to_le_bytes());
        assert_eq!(classify(&vdi, &[]), Detected::Foreign("vdi"));
        assert_eq!(classify(b"QFI\xfb\0\0\0\x01rest", &[]), Detected::Foreign("qcow"));
        assert_eq!(classify(b"QFI\xfb\0\0\0\x03rest", &[]), Detected::Known(Format::Qcow2));
        assert_eq!(classify(b"KDMV\x01\0\0\0", &[]), Detected::Foreign("vmdk"));
        let mut footer = vec![0u8; 512];
        footer[..8].copy_from_slice(b"conectix");
        assert_eq!(classify(&[0u8; 512], &footer), Detected::Foreign("vpc"));
        footer[..4].copy_from_slice(b"koly");
        assert_eq!(classify(&[0u8; 512], &footer), Detected::Foreign("dmg"));
        assert_eq!(classify(&[0u8; 512], &[0u8; 512]), Detected::Known(Format::Raw));
        assert_eq!(classify(&[], &[]), Detected::Known(Format::Raw));
    }
}
