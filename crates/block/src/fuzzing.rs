//! The body of the fuzz targets in `crates/block/fuzz`, here so the kept
//! corpus also runs as an ordinary test on stable Rust
//! (`tests/fuzz_corpus.rs`). Not part of the public API.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::qcow2::{Header, Qcow2Image, Repair};
use crate::{BlockBackend, Error, Extent, ExtentKind, Result};

/// Largest range read or mapped per input, so huge virtual sizes stay fast.
const SPAN: u64 = 64 << 20;

fn scratch_file(bytes: &[u8]) -> Option<PathBuf> {
    let p = std::env::temp_dir().join(format!("rvirt-fuzz-{}.qcow2", std::process::id()));
    std::fs::write(&p, bytes).ok()?;
    Some(p)
}

/// Parses `bytes` as a qcow2 header.
pub fn header(bytes: &[u8]) {
    let _ = Header::parse(bytes, bytes.len() as u64, "fuzz");
}

/// Treats `bytes` as a qcow2 file: opens it read-only (read, map, check,
/// snapshot list, bitmaps), for repair (`check -r all`), then read-write
/// (write, bitmap changes, repair). Errors are fine;
/// panics, hangs and unbounded memory are the bugs.
pub fn image(bytes: &[u8]) {
    let Some(path) = scratch_file(bytes) else { return };
    if let Ok(img) = Qcow2Image::open(&path, true) {
        let size = img.size();
        let mut buf = vec![0u8; 65536];
        for off in [0, size / 2, size.saturating_sub(65536)] {
            let n = (size - off.min(size)).min(65536) as usize;
            let _ = img.read_at(&mut buf[..n], off.min(size));
        }
        let _ = img.map(0, size.min(SPAN));
        let _ = img.host_map(0, size.min(SPAN));
        let _ = img.check(Repair::None);
        let _ = img.snapshots();
        let _ = img.bitmaps_size(65536);
        for b in img.bitmaps() {
            let _ = img.bitmap_ranges(&b.name);
        }
    }
    // An image naming an external data file would have the writers below
    // write into whatever file it names: those stop at reading.
    let names_data_file = Qcow2Image::open(&path, true).is_ok_and(|i| i.data_file().is_some()) || bytes.windows(4).any(|w| w == b"DATA");
    if names_data_file {
        let _ = std::fs::remove_file(&path);
        return;
    }
    if let Ok(img) = Qcow2Image::open_for_repair(&path, crate::Locking::Exclusive) {
        // Rebuilding refcount structures, dropping an unreadable snapshot table.
        let _ = img.check(Repair::All);
    }
    if let Ok(img) = Qcow2Image::open(&path, false) {
        let size = img.size();
        let _ = img.write_at(&[0x5a; 4096], 0);
        let _ = img.write_zeroes(size / 2, 4096.min(size - size / 2));
        // Within a cluster and across subclusters (extended L2): partial ones
        // completed from what reads see, whole ones zeroed by their bits.
        let _ = img.write_at(&[0x3c; 3000], (size / 3).min(size.saturating_sub(3000)));
        let _ = img.write_zeroes((size / 4) & !2047, 2048.min(size - ((size / 4) & !2047)));
        // Bitmaps: every change, then a store of them all at close.
        let names: Vec<String> = img.bitmaps().into_iter().map(|b| b.name).collect();
        let _ = img.add_bitmap("fuzz", Some(512), true);
        for n in &names {
            let _ = img.bitmap_ranges(n).and_then(|(_, r)| img.merge_into_bitmap("fuzz", &r));
            let _ = img.enable_bitmap(n, true);
        }
        if let Some(n) = names.first() {
            let _ = img.clear_bitmap(n);
            let _ = img.remove_bitmap(n);
        }
        let _ = img.write_at(&[0xa5; 512], size.saturating_sub(512));
        let _ = img.resize(size.saturating_add(1 << 20).min(1 << 40), false);
        let _ = img.check(Repair::All);
        let _ = img.close();
    }
    if let Ok(img) = Qcow2Image::open(&path, true) {
        // What the close stored must read back.
        for b in img.bitmaps() {
            let _ = img.bitmap_ranges(&b.name);
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// An image in memory: the disk behind the tests and fuzz targets of the
/// layers above the image library (virtio-blk, SCSI units).
pub struct MemImage {
    /// The bytes (tests look at them).
    pub data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemImage {
    /// An image holding `data`.
    pub fn new(data: Vec<u8>, read_only: bool) -> Arc<Self> {
        Arc::new(Self { data: Mutex::new(data), read_only })
    }

    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| Error::Request("range".into()))?;
        let end = start.checked_add(len).ok_or_else(|| Error::Request("range".into()))?;
        Ok(start..end)
    }
}

impl BlockBackend for MemImage {
    fn size(&self) -> u64 {
        self.data.lock().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let d = self.data.lock().map_err(|_| Error::Request("poisoned".into()))?;
        buf.copy_from_slice(d.get(self.range(offset, buf.len())?).ok_or_else(|| Error::Request("range".into()))?);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut d = self.data.lock().map_err(|_| Error::Request("poisoned".into()))?;
        d.get_mut(self.range(offset, buf.len())?).ok_or_else(|| Error::Request("range".into()))?.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.write_zeroes(offset, length)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        let len = usize::try_from(length).map_err(|_| Error::Request("range".into()))?;
        let mut d = self.data.lock().map_err(|_| Error::Request("poisoned".into()))?;
        d.get_mut(self.range(offset, len)?).ok_or_else(|| Error::Request("range".into()))?.fill(0);
        Ok(())
    }
    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent { offset, length, kind: ExtentKind::Data }])
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
