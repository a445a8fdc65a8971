//! The body of the fuzz target in `crates/scsi/fuzz`, here so the kept
//! corpus also runs as an ordinary test on stable Rust
//! (`tests/fuzz_corpus.rs`). Not part of the public API.

use std::sync::{Arc, Mutex};

use rvirt_block::{BlockBackend, Extent, Result};

use crate::{Lun, Status};

/// An image in memory (block `n` holds bytes `n`), for tests and fuzzing.
pub struct MemImage {
    /// The bytes.
    pub data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemImage {
    /// `size` bytes, each 512-byte block filled with its number.
    pub fn new(size: usize, read_only: bool) -> Arc<Self> {
        let data = (0..size).map(|i| (i / 512) as u8).collect();
        Arc::new(Self { data: Mutex::new(data), read_only })
    }
}

impl BlockBackend for MemImage {
    fn size(&self) -> u64 {
        self.data.lock().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let start = offset as usize;
        buf.copy_from_slice(&d[start..start + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let start = offset as usize;
        d[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.write_zeroes(offset, length)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        d[offset as usize..(offset + length) as usize].fill(0);
        Ok(())
    }
    fn map(&self, _: u64, _: u64) -> Result<Vec<Extent>> {
        Ok(Vec::new())
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// Runs `data` as a stream of commands against a disk, a CD-ROM with a
/// disc and an empty drive. Each record: a byte choosing the unit (bit 7:
/// the host ejects or inserts first), a CDB length and the CDB, a data-out
/// length (u16 LE) and the data, a data-in buffer length (u16 LE). A panic,
/// or a reply larger than its buffer, is the bug.
pub fn commands(data: &[u8]) {
    let mut units = [
        Lun::disk(MemImage::new(64 * 512, false), "fuzz-disk"),
        Lun::cdrom(Some(MemImage::new(16 * 2048, true)), "fuzz-cd"),
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
                let _ = unit.insert(MemImage::new(8 * 2048, true));
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
