//! The body of the fuzz target in `crates/scsi/fuzz`, here so the kept
//! corpus also runs as an ordinary test on stable Rust
//! (`tests/fuzz_corpus.rs`). Not part of the public API.

use std::sync::Arc;

use rvirt_block::fuzzing::MemImage;

use crate::{Lun, Status};

/// An image in memory whose 512-byte block `n` is filled with the byte `n`
/// (so tests can tell blocks apart).
pub fn patterned(size: usize, read_only: bool) -> Arc<MemImage> {
    MemImage::new((0..size).map(|i| (i / 512) as u8).collect(), read_only)
}

/// Runs `data` as a stream of commands against a disk, a CD-ROM with a
/// disc and an empty drive. Each record: a byte choosing the unit (bit 7:
/// the host ejects or inserts first), a CDB length and the CDB, a data-out
/// length (u16 LE) and the data, a data-in buffer length (u16 LE). A panic,
/// or a reply larger than its buffer, is the bug.
pub fn commands(data: &[u8]) {
    let mut units = [
        Lun::disk(patterned(64 * 512, false), "fuzz-disk"),
        Lun::cdrom(Some(patterned(16 * 2048, true)), "fuzz-cd"),
        Lun::cdrom(None, ""),
    ];
    let mut rest = data;
    let mut take = |n: usize| -> Vec<u8> {
        let n = n.min(rest.len());
        let (a, b) = rest.split_at(n);
        rest = b;
        a.to_vec()
    };
    let len = |b: Vec<u8>| if b.len() == 2 { usize::from(u16::from_le_bytes([b[0], b[1]])) } else { 0 };
    for _ in 0..256 {
        let head = take(2);
        if head.len() < 2 {
            break;
        }
        let unit = &mut units[usize::from(head[0] & 0x03) % 3];
        if head[0] & 0x80 != 0 {
            if head[0] & 0x40 != 0 {
                let _ = unit.insert(patterned(8 * 2048, true));
            } else {
                let _ = unit.eject(head[0] & 0x20 != 0);
            }
        }
        let cdb = take(usize::from(head[1] % 33));
        let out_len = len(take(2));
        let out = take(out_len);
        let in_len = len(take(2)) % 9000;
        let mut buf = vec![0u8; in_len];
        let (a, b) = buf.split_at_mut(in_len / 2);
        let c = unit.execute(&cdb, &[&out], &mut [a, b]);
        assert!(c.data_in_len <= in_len, "a reply larger than its buffer");
        if matches!(c.status, Status::CheckCondition(_)) {
            assert_eq!(c.data_in_len, 0);
        }
    }
}
