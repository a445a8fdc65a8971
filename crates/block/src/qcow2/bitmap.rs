//! Persistent dirty bitmaps (the qcow2 bitmaps extension): which ranges of
//! the virtual disk were written since a bitmap was added or cleared, the
//! base of incremental backups.
//!
//! As QEMU does, an image opened read-write loads every consistent bitmap
//! into memory and marks them all `in_use` in the file; writes set the bits
//! of enabled (`auto`) bitmaps; closing stores them anew (fresh tables and
//! data, then the directory, then the header) and clears `in_use`. A crash
//! in between leaves them `in_use`: inconsistent, which QEMU and we report
//! and refuse to use. An image whose bitmaps a bitmap-unaware program wrote
//! (autoclear bit clear) has its bitmaps dropped, as the spec says.

use super::{be32, be64, read_full, read_table, Inner, Qcow2Image};
use crate::{Error, Result};

/// Header extension type of the bitmaps extension.
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
/// Autoclear bit saying the bitmaps extension is consistent with the data.
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1;

const FLAG_IN_USE: u32 = 1;
const FLAG_AUTO: u32 = 2;
const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 4;
const TYPE_DIRTY_TRACKING: u8 = 1;
/// QEMU's limits: 65535 bitmaps, names up to 1023 bytes, granularity 512 B to 2 GiB.
const MAX_BITMAPS: usize = 65535;
const MAX_NAME: usize = 1023;
const MIN_GRANULARITY_BITS: u8 = 9;
const MAX_GRANULARITY_BITS: u8 = 31;
/// Largest directory read (QEMU's bound).
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Largest bitmap held in memory (a 2 TiB disk at 4 KiB granularity).
const MAX_BITMAP_BYTES: u64 = 64 << 20;
/// Bits 9-55 of a bitmap table entry: the data cluster's offset.
const BITMAP_TABLE_ENTRY_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// One persistent bitmap as `info` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its name, unique in the image.
    pub name: String,
    /// Bytes of the virtual disk each bit stands for.
    pub granularity: u64,
    /// Enabled: records every write (`auto` in the file).
    pub enabled: bool,
    /// Not stored cleanly (a crash while open): inconsistent and unusable.
    pub in_use: bool,
}

/// One bitmap directory entry, and its bits when loaded.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    table_offset: u64,
    table_size: u32,
    flags: u32,
    granularity_bits: u8,
    name: String,
    extra: Vec<u8>,
    /// The bitmap's bits, one per granule, least significant bit first.
    bits: Option<Vec<u8>>,
    /// Clusters of the stored copy to free once a new copy is stored.
    stale: bool,
}

impl Entry {
    fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    fn enabled(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    fn in_use_on_open(&self) -> bool {
        self.bits.is_none() && self.flags & FLAG_IN_USE != 0
    }

    fn info(&self) -> BitmapInfo {
        BitmapInfo { name: self.name.clone(), granularity: self.granularity(), enabled: self.enabled(), in_use: self.flags & FLAG_IN_USE != 0 }
    }

    /// The data clusters its stored table names (unallocated ones left out).
    fn data_clusters(&self, file: &dyn crate::ImageFile) -> std::io::Result<Vec<u64>> {
        let table = read_table(file, self.table_offset, self.table_size as usize)?;
        Ok(table.into_iter().map(|t| t & BITMAP_TABLE_ENTRY_MASK).filter(|&o| o != 0).collect())
    }

    fn encoded_len(&self) -> usize {
        (24 + self.extra.len() + self.name.len()).next_multiple_of(8)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(TYPE_DIRTY_TRACKING);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.name.as_bytes());
        out.resize(start + self.encoded_len(), 0);
    }
}

/// Bytes of a bitmap of `granularity` over a disk of `size` bytes.
fn bitmap_bytes(size: u64, granularity: u64) -> u64 {
    size.div_ceil(granularity).div_ceil(8)
}

/// Sets the bits of `bits` covering guest bytes `offset..offset+len`.
fn set_range(bits: &mut [u8], granularity: u64, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    let (first, last) = (offset / granularity, (offset + len - 1) / granularity);
    for b in first..=last {
        if let Some(byte) = bits.get_mut((b / 8) as usize) {
            *byte |= 1 << (b % 8);
        }
    }
}

/// Clears the bits past the last granule of a disk of `size` bytes.
fn clear_tail(bits: &mut [u8], granularity: u64, size: u64) {
    let used = size.div_ceil(granularity);
    if used % 8 != 0 {
        if let Some(last) = bits.get_mut((used / 8) as usize) {
            *last &= (1u8 << (used % 8)) - 1;
        }
    }
}

/// The persistent bitmaps of an open image.
#[derive(Debug, Default)]
pub(crate) struct Bitmaps {
    pub(crate) entries: Vec<Entry>,
    /// Where the stored directory is and how long it is (0, 0: none).
    directory: (u64, u64),
    /// Why the bitmaps could not be read (they are then left alone).
    pub(crate) damage: Option<String>,
    /// Loaded and marked in use by this read-write open: stored at close.
    pub(crate) open_for_write: bool,
    /// Bits or entries changed since the open: the stored copy must be replaced.
    changed: bool,
    /// Removed bitmaps whose stored clusters are freed at the next store.
    removed: Vec<Entry>,
}

impl Bitmaps {
    /// Parses the bitmaps extension `ext` and its directory; `consistent` is the autoclear bit.
    pub(crate) fn read(file: &dyn crate::ImageFile, ext: Option<&[u8]>, consistent: bool, cs: u64, file_len: u64, disk_size: u64) -> Bitmaps {
        let Some(ext) = ext else { return Bitmaps::default() };
        if !consistent {
            return Bitmaps {
                damage: Some("a program without bitmap support wrote this image: its bitmaps are inconsistent and are dropped on the next write".into()),
                ..Bitmaps::default()
            };
        }
        match read_directory(file, ext, cs, file_len, disk_size) {
            Ok((entries, directory)) => Bitmaps { entries, directory, ..Bitmaps::default() },
            Err(e) => Bitmaps { damage: Some(e), ..Bitmaps::default() },
        }
    }

    /// Records a guest write of `offset..offset+len` in every enabled bitmap.
    pub(crate) fn mark(&mut self, offset: u64, len: u64) {
        if !self.open_for_write {
            return;
        }
        for e in &mut self.entries {
            if e.enabled() {
                let g = e.granularity();
                if let Some(bits) = &mut e.bits {
                    set_range(bits, g, offset, len);
                    self.changed = true;
                }
            }
        }
    }

    /// What `info` shows.
    pub(crate) fn infos(&self) -> Vec<BitmapInfo> {
        self.entries.iter().map(Entry::info).collect()
    }

    /// Every host range the stored bitmaps use (directory, tables, data), read from the file.
    pub(crate) fn stored_ranges(&self, file: &dyn crate::ImageFile, cs: u64) -> Vec<(u64, u64, String)> {
        let mut out = Vec::new();
        if self.directory.1 > 0 {
            out.push((self.directory.0, self.directory.1, "bitmap directory".to_string()));
        }
        for e in &self.entries {
            out.push((e.table_offset, u64::from(e.table_size) * 8, format!("bitmap '{}' table", e.name)));
            match e.data_clusters(file) {
                Ok(data) => out.extend(data.into_iter().map(|off| (off, cs, format!("bitmap '{}' data", e.name)))),
                Err(err) => out.push((0, 0, format!("bitmap '{}' table unreadable: {err}", e.name))),
            }
        }
        out
    }
}

/// Bitmap `name` of the image, or qemu-img's error naming it.
fn find_bitmap<'a>(inner: &'a mut Inner, name: &str) -> Result<&'a mut Entry> {
    inner.bitmaps.entries.iter_mut().find(|e| e.name == name).ok_or_else(|| not_found(name))
}

fn not_found(name: &str) -> Error {
    Error::Request(format!("Dirty bitmap '{name}' not found"))
}

/// qemu-img's refusal of a bitmap left in use by a crash.
fn inconsistent(name: &str) -> Error {
    Error::Request(format!("Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"))
}

/// Reads and validates the directory the extension `ext` points at.
fn read_directory(file: &dyn crate::ImageFile, ext: &[u8], cs: u64, file_len: u64, disk_size: u64) -> std::result::Result<(Vec<Entry>, (u64, u64)), String> {
    if ext.len() < 24 {
        return Err(format!("bitmaps extension of {} bytes (24 expected)", ext.len()));
    }
    let (nb, dir_size, dir_offset) = (be32(ext, 0) as usize, be64(ext, 8), be64(ext, 16));
    if nb == 0 || nb > MAX_BITMAPS {
        return Err(format!("{nb} bitmaps (1 to {MAX_BITMAPS} allowed)"));
    }
    if dir_size == 0 || dir_size > MAX_DIRECTORY_BYTES || dir_offset % cs != 0 || dir_offset < cs || dir_offset.checked_add(dir_size).is_none_or(|e| e > file_len) {
        return Err(format!("bitmap directory at {dir_offset:#x} (+{dir_size}) is misplaced"));
    }
    let mut dir = vec![0u8; dir_size as usize];
    read_full(file, &mut dir, dir_offset).map_err(|e| format!("bitmap directory: {e}"))?;
    let mut entries = Vec::with_capacity(nb);
    let mut off = 0usize;
    for i in 0..nb {
        if off + 24 > dir.len() {
            return Err(format!("bitmap directory ends inside entry {i}"));
        }
        let d = &dir[off..];
        let (table_offset, table_size, flags) = (be64(d, 0), be32(d, 8), be32(d, 12));
        let (typ, granularity_bits) = (d[16], d[17]);
        let name_size = usize::from(u16::from_be_bytes([d[18], d[19]]));
        let extra_size = be32(d, 20) as usize;
        let len = (24usize + extra_size).saturating_add(name_size).next_multiple_of(8);
        if extra_size > dir.len() || off + len > dir.len() {
            return Err(format!("bitmap directory entry {i} runs past the directory"));
        }
        let extra = d[24..24 + extra_size].to_vec();
        let name = String::from_utf8_lossy(&d[24 + extra_size..24 + extra_size + name_size]).into_owned();
        let bad = |what: String| Err(format!("bitmap '{name}': {what}"));
        if typ != TYPE_DIRTY_TRACKING {
            return bad(format!("type {typ} is not a dirty tracking bitmap"));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return bad(format!("granularity bits {granularity_bits} outside {MIN_GRANULARITY_BITS}..={MAX_GRANULARITY_BITS}"));
        }
        if name_size == 0 || name_size > MAX_NAME {
            return bad(format!("name of {name_size} bytes"));
        }
        if flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE) != 0 {
            return bad(format!("reserved flags {flags:#x}"));
        }
        if table_offset % cs != 0 || table_offset < cs || table_offset.checked_add(u64::from(table_size) * 8).is_none_or(|e| e > file_len) {
            return bad(format!("bitmap table at {table_offset:#x} is misplaced"));
        }
        let needed = bitmap_bytes(disk_size, 1 << granularity_bits).div_ceil(cs);
        if flags & FLAG_IN_USE == 0 && u64::from(table_size) != needed {
            return bad(format!("bitmap table of {table_size} entries; {needed} cover the disk"));
        }
        if entries.iter().any(|e: &Entry| e.name == name) {
            return bad("the name appears twice".into());
        }
        entries.push(Entry { table_offset, table_size, flags, granularity_bits, name, extra, bits: None, stale: false });
        off += len;
    }
    Ok((entries, (dir_offset, dir_size)))
}

impl Qcow2Image {
    /// The image's persistent bitmaps.
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        self.lock().bitmaps.infos()
    }

    /// Why the image's bitmaps could not be read, if they could not (the data reads on).
    pub fn bitmap_damage(&self) -> Option<String> {
        self.lock().bitmaps.damage.clone()
    }

    /// Bytes a copy of this image's bitmaps takes in a qcow2 image with `cs`-byte clusters (`measure`).
    pub fn bitmaps_size(&self, cs: u64) -> u64 {
        let inner = self.lock();
        let size = inner.header.size;
        let mut total = 0u64;
        let mut dir = 0u64;
        for e in &inner.bitmaps.entries {
            if e.in_use_on_open() {
                continue;
            }
            let data = bitmap_bytes(size, e.granularity()).div_ceil(cs);
            total += (data + (data * 8).div_ceil(cs)) * cs;
            dir += e.encoded_len() as u64;
        }
        total + dir.div_ceil(cs) * cs
    }

    /// Loads every consistent bitmap and marks them in use on disk (read-write open).
    pub(crate) fn open_bitmaps(&self, inner: &mut Inner) -> Result<()> {
        if let Some(damage) = &inner.bitmaps.damage {
            if inner.extensions.iter().any(|(t, _)| *t == EXT_BITMAPS) && inner.header.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
                return Err(self.corrupt(format!("bitmaps: {damage}; open the image read-only, or remove the bitmaps extension")));
            }
        }
        let known = AUTOCLEAR_BITMAPS | super::AUTOCLEAR_DATA_FILE_RAW;
        let stale_ext = inner.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 && inner.extensions.iter().any(|(t, _)| *t == EXT_BITMAPS);
        if inner.header.autoclear_features & !known != 0 || stale_ext {
            // Unknown autoclear bits must go before writing; a stale bitmaps
            // extension is dropped (its clusters become leaks, as in QEMU).
            inner.header.autoclear_features &= known;
            if stale_ext {
                tracing::warn!(image = %self.name, "bitmaps written over by a program without bitmap support are dropped");
                inner.extensions.retain(|(t, _)| *t != EXT_BITMAPS);
                inner.bitmaps = Bitmaps::default();
            }
            self.write_header_cluster(inner)?;
        }
        if inner.bitmaps.entries.is_empty() {
            return Ok(());
        }
        let (cs, size, file_len) = (self.cluster_size(), inner.header.size, inner.file_len);
        for e in &mut inner.bitmaps.entries {
            if e.flags & FLAG_IN_USE != 0 {
                continue;
            }
            e.bits = Some(self.load_bits(e, cs, size, file_len)?);
        }
        for e in &mut inner.bitmaps.entries {
            e.flags |= FLAG_IN_USE;
        }
        self.rewrite_directory_in_place(inner)?;
        inner.bitmaps.open_for_write = true;
        Ok(())
    }

    fn load_bits(&self, e: &Entry, cs: u64, size: u64, file_len: u64) -> Result<Vec<u8>> {
        let n = bitmap_bytes(size, e.granularity());
        if n > MAX_BITMAP_BYTES {
            return Err(Error::Unsupported { path: self.name.clone(), detail: format!("bitmap '{}' of {n} bytes (at most {MAX_BITMAP_BYTES} are loaded)", e.name) });
        }
        let table = read_table(&*self.file, e.table_offset, e.table_size as usize).map_err(|err| self.io(err))?;
        let mut bits = vec![0u8; n as usize];
        for (i, chunk) in bits.chunks_mut(cs as usize).enumerate() {
            let entry = table.get(i).copied().unwrap_or(0);
            let off = entry & BITMAP_TABLE_ENTRY_MASK;
            if entry & !(BITMAP_TABLE_ENTRY_MASK | 1) != 0 || (off != 0 && entry & 1 != 0) {
                return Err(self.corrupt(format!("bitmap '{}': table entry {i} ({entry:#x}) has reserved bits set", e.name)));
            }
            if off == 0 {
                chunk.fill(if entry & 1 != 0 { 0xff } else { 0 });
            } else if off % cs != 0 || off.checked_add(cs).is_none_or(|end| end > file_len) {
                return Err(self.corrupt(format!("bitmap '{}': data cluster {off:#x} is misplaced", e.name)));
            } else {
                let got = read_full(&*self.file, chunk, off).map_err(|err| self.io(err))?;
                chunk[got..].fill(0);
            }
        }
        clear_tail(&mut bits, e.granularity(), size);
        Ok(bits)
    }

    /// Writes the directory over itself with new flags (same size).
    fn rewrite_directory_in_place(&self, inner: &mut Inner) -> Result<()> {
        let mut dir = Vec::new();
        for e in &inner.bitmaps.entries {
            e.encode(&mut dir);
        }
        if dir.len() as u64 != inner.bitmaps.directory.1 {
            return Err(self.corrupt("bitmap directory changed size".into()));
        }
        self.file.write_all_at(&dir, inner.bitmaps.directory.0).map_err(|e| self.io(e))?;
        self.sync()
    }

    /// Stores the loaded bitmaps and clears `in_use` (close). Nothing
    /// changed: only the flags are written back in place.
    pub(crate) fn store_bitmaps(&self, inner: &mut Inner) -> Result<()> {
        if !inner.bitmaps.open_for_write {
            return Ok(());
        }
        inner.bitmaps.open_for_write = false;
        let changed = inner.bitmaps.changed || inner.bitmaps.entries.iter().any(|e| e.stale);
        if !changed && !inner.bitmaps.entries.is_empty() && inner.bitmaps.directory.1 > 0 {
            for e in &mut inner.bitmaps.entries {
                if e.bits.take().is_some() {
                    e.flags &= !FLAG_IN_USE;
                }
            }
            return self.rewrite_directory_in_place(inner);
        }
        let cs = self.cluster_size();
        // Everything the stored copy uses is freed once the new one is in place.
        let mut old: Vec<(u64, u64)> = Vec::new();
        let (dir_off, dir_len) = inner.bitmaps.directory;
        if dir_len > 0 {
            old.push((dir_off, dir_len));
        }
        let mut entries = std::mem::take(&mut inner.bitmaps.entries);
        let removed = std::mem::take(&mut inner.bitmaps.removed);
        for e in entries.iter().filter(|e| e.bits.is_some() && e.table_offset != 0).chain(removed.iter()) {
            old.push((e.table_offset, u64::from(e.table_size) * 8));
            old.extend(e.data_clusters(&*self.file).map_err(|err| self.io(err))?.into_iter().map(|o| (o, cs)));
        }
        let result = self.write_bitmaps(inner, &mut entries);
        inner.bitmaps.entries = entries;
        result?;
        for (off, len) in old {
            for c in 0..len.div_ceil(cs) {
                self.adjust_refcount(inner, off + c * cs, -1)?;
            }
        }
        self.flush_refcounts(inner)?;
        self.sync()
    }

    /// Writes fresh data, tables and directory for `entries`, then the header pointing at them.
    fn write_bitmaps(&self, inner: &mut Inner, entries: &mut [Entry]) -> Result<()> {
        let cs = self.cluster_size() as usize;
        for e in entries.iter_mut() {
            let Some(bits) = e.bits.take() else { continue };
            let mut table = Vec::with_capacity(bits.len().div_ceil(cs));
            for chunk in bits.chunks(cs) {
                if chunk.iter().all(|&b| b == 0) {
                    table.push(0u64);
                    continue;
                }
                let off = self.alloc_clusters(inner, 1)?;
                let mut data = chunk.to_vec();
                data.resize(cs, 0);
                self.file.write_all_at(&data, off).map_err(|err| self.io(err))?;
                inner.file_len = inner.file_len.max(off + cs as u64);
                table.push(off);
            }
            let table_clusters = (table.len() as u64 * 8).div_ceil(cs as u64).max(1);
            let toff = self.alloc_clusters(inner, table_clusters)?;
            let mut tb = vec![0u8; (table_clusters * cs as u64) as usize];
            for (i, t) in table.iter().enumerate() {
                tb[i * 8..i * 8 + 8].copy_from_slice(&t.to_be_bytes());
            }
            self.file.write_all_at(&tb, toff).map_err(|err| self.io(err))?;
            inner.file_len = inner.file_len.max(toff + tb.len() as u64);
            e.table_offset = toff;
            e.table_size = table.len() as u32;
            e.flags &= !FLAG_IN_USE;
            e.stale = false;
        }
        let mut dir = Vec::new();
        for e in entries.iter() {
            e.encode(&mut dir);
        }
        inner.extensions.retain(|(t, _)| *t != EXT_BITMAPS);
        if entries.is_empty() {
            inner.bitmaps.directory = (0, 0);
            inner.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
        } else {
            let clusters = (dir.len() as u64).div_ceil(cs as u64);
            let doff = self.alloc_clusters(inner, clusters)?;
            let mut db = dir.clone();
            db.resize((clusters * cs as u64) as usize, 0);
            self.file.write_all_at(&db, doff).map_err(|err| self.io(err))?;
            inner.file_len = inner.file_len.max(doff + db.len() as u64);
            inner.bitmaps.directory = (doff, dir.len() as u64);
            let mut ext = Vec::with_capacity(24);
            ext.extend_from_slice(&(entries.len() as u32).to_be_bytes());
            ext.extend_from_slice(&0u32.to_be_bytes());
            ext.extend_from_slice(&(dir.len() as u64).to_be_bytes());
            ext.extend_from_slice(&doff.to_be_bytes());
            inner.extensions.push((EXT_BITMAPS, ext));
            inner.header.autoclear_features |= AUTOCLEAR_BITMAPS;
        }
        // New copies durable before the header points at them.
        self.flush_refcounts(inner)?;
        self.sync()?;
        inner.bitmaps.changed = false;
        self.write_header_cluster(inner)
    }

    /// The loaded bitmap `name`, refusing one left in use by a crash.
    fn usable_bitmap<'a>(&self, inner: &'a mut Inner, name: &str) -> Result<&'a mut Entry> {
        self.writable()?;
        let e = find_bitmap(inner, name)?;
        if e.in_use_on_open() {
            return Err(inconsistent(name));
        }
        Ok(e)
    }

    /// Adds an empty bitmap; `granularity` defaults, as in QEMU, to the
    /// cluster size kept within 4 KiB..64 KiB.
    pub fn add_bitmap(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        self.writable()?;
        let mut inner = self.lock();
        if inner.header.version < 3 {
            return Err(Error::Request("Cannot store dirty bitmaps in qcow2 v2 files".into()));
        }
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(Error::Request(format!("bitmap names are 1 to {MAX_NAME} bytes")));
        }
        if inner.bitmaps.entries.iter().any(|e| e.name == name) {
            return Err(Error::Request(format!("Bitmap already exists: {name}")));
        }
        if inner.bitmaps.entries.len() >= MAX_BITMAPS {
            return Err(Error::Request(format!("an image holds at most {MAX_BITMAPS} bitmaps")));
        }
        let g = granularity.unwrap_or_else(|| self.cluster_size().clamp(4096, 65536));
        if !g.is_power_of_two() || !(1u64 << MIN_GRANULARITY_BITS..=1u64 << MAX_GRANULARITY_BITS).contains(&g) {
            return Err(Error::Request("Granularity must be power of 2 between 512 and 2147483648".into()));
        }
        let n = bitmap_bytes(inner.header.size, g);
        if n > MAX_BITMAP_BYTES {
            return Err(Error::Request(format!("a bitmap of granularity {g} over this disk needs {n} bytes; use a larger granularity")));
        }
        let flags = FLAG_IN_USE | if enabled { FLAG_AUTO } else { 0 };
        inner.bitmaps.entries.push(Entry {
            table_offset: 0,
            table_size: 0,
            flags,
            granularity_bits: g.trailing_zeros() as u8,
            name: name.to_string(),
            extra: Vec::new(),
            bits: Some(vec![0; n as usize]),
            stale: true,
        });
        inner.bitmaps.open_for_write = true;
        Ok(())
    }

    /// Removes a bitmap (also one left in use by a crash).
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.writable()?;
        let mut inner = self.lock();
        let i = inner.bitmaps.entries.iter().position(|e| e.name == name).ok_or_else(|| not_found(name))?;
        let e = inner.bitmaps.entries.remove(i);
        if e.table_offset != 0 {
            inner.bitmaps.removed.push(e);
        }
        inner.bitmaps.changed = true;
        inner.bitmaps.open_for_write = true;
        Ok(())
    }

    /// Clears every bit of a bitmap.
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        let e = self.usable_bitmap(&mut inner, name)?;
        if let Some(b) = &mut e.bits {
            b.fill(0);
        }
        e.stale = true;
        Ok(())
    }

    /// Enables (records writes) or disables a bitmap.
    pub fn enable_bitmap(&self, name: &str, enabled: bool) -> Result<()> {
        let mut inner = self.lock();
        let e = self.usable_bitmap(&mut inner, name)?;
        if enabled {
            e.flags |= FLAG_AUTO;
        } else {
            e.flags &= !FLAG_AUTO;
        }
        e.stale = true;
        Ok(())
    }

    /// Which guest ranges bitmap `name` marks, in granules (`granularity`, bits).
    pub fn bitmap_ranges(&self, name: &str) -> Result<(u64, Vec<(u64, u64)>)> {
        let mut inner = self.lock();
        let (cs, size, file_len) = (self.cluster_size(), inner.header.size, inner.file_len);
        let e = find_bitmap(&mut inner, name)?;
        if e.in_use_on_open() {
            return Err(Error::Request(format!("Bitmap '{name}' is inconsistent and cannot be used")));
        }
        let loaded;
        let bits = match &e.bits {
            Some(b) => b,
            None => {
                loaded = self.load_bits(e, cs, size, file_len)?;
                &loaded
            }
        };
        let g = e.granularity();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, &byte) in bits.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    let start = (i as u64 * 8 + bit) * g;
                    let len = g.min(size.saturating_sub(start));
                    match out.last_mut() {
                        Some(last) if last.0 + last.1 == start => last.1 += len,
                        _ => out.push((start, len)),
                    }
                }
            }
        }
        Ok((g, out))
    }

    /// Sets in bitmap `name` every range of `ranges` (`--merge`).
    pub fn merge_into_bitmap(&self, name: &str, ranges: &[(u64, u64)]) -> Result<()> {
        let mut inner = self.lock();
        let e = self.usable_bitmap(&mut inner, name)?;
        let g = e.granularity();
        if let Some(bits) = &mut e.bits {
            for &(off, len) in ranges {
                set_range(bits, g, off, len);
            }
        }
        e.stale = true;
        Ok(())
    }

    /// Grows or shrinks the loaded bitmaps with the disk (`resize`).
    pub(crate) fn resize_bitmaps(&self, inner: &mut Inner, new_size: u64) -> Result<()> {
        if let Some(e) = inner.bitmaps.entries.iter().find(|e| e.in_use_on_open()) {
            return Err(inconsistent(&e.name));
        }
        for e in &mut inner.bitmaps.entries {
            let g = e.granularity();
            if let Some(bits) = &mut e.bits {
                let n = bitmap_bytes(new_size, g);
                if n > MAX_BITMAP_BYTES {
                    return Err(Error::Request(format!("bitmap '{}' would need {n} bytes at the new size", e.name)));
                }
                bits.resize(n as usize, 0);
                clear_tail(bits, g, new_size);
                e.stale = true;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_set_whole_granules_and_tails_clear() {
        let mut bits = vec![0u8; 2];
        set_range(&mut bits, 512, 600, 100);
        assert_eq!(bits, [0b0000_0010, 0]);
        set_range(&mut bits, 512, 511, 2);
        assert_eq!(bits, [0b0000_0011, 0]);
        set_range(&mut bits, 512, 0, 16 * 512);
        assert_eq!(bits, [0xff, 0xff]);
        clear_tail(&mut bits, 512, 10 * 512 + 1);
        assert_eq!(bits, [0xff, 0b0000_0111]);
        // Past the end: ignored, never a panic.
        set_range(&mut bits, 512, 1 << 40, 512);
        assert_eq!(bitmap_bytes(64 << 20, 65536), 128);
    }

    #[test]
    fn entries_round_trip_through_the_directory() {
        let e = Entry {
            table_offset: 0x30000,
            table_size: 1,
            flags: FLAG_AUTO,
            granularity_bits: 16,
            name: "backup-0".into(),
            extra: Vec::new(),
            bits: None,
            stale: false,
        };
        let mut dir = Vec::new();
        e.encode(&mut dir);
        assert_eq!(dir.len(), 32);
        let mut ext = Vec::new();
        ext.extend_from_slice(&1u32.to_be_bytes());
        ext.extend_from_slice(&0u32.to_be_bytes());
        ext.extend_from_slice(&(dir.len() as u64).to_be_bytes());
        ext.extend_from_slice(&0x20000u64.to_be_bytes());
        let made = std::cell::Cell::new(0);
        let file_with = |dir: &[u8]| {
            made.set(made.get() + 1);
            let p = crate::test_path("qcow2", &format!("bitmap-dir-{}", made.get()));
            let mut f = vec![0u8; 0x40000];
            f[0x20000..0x20000 + dir.len()].copy_from_slice(dir);
            std::fs::write(&p, f).unwrap();
            std::fs::File::open(&p).unwrap()
        };
        let file = file_with(&dir);
        let (entries, d) = read_directory(&file, &ext, 65536, 0x40000, 64 << 20).unwrap();
        assert_eq!(d, (0x20000, 32));
        assert_eq!(entries[0].info(), BitmapInfo { name: "backup-0".into(), granularity: 65536, enabled: true, in_use: false });
        // Damage is named, never a panic.
        for (at, v) in [(16usize, 7u8), (17, 2), (19, 0), (12, 0x80)] {
            let mut bad = dir.clone();
            bad[at] = v;
            assert!(read_directory(&file_with(&bad), &ext, 65536, 0x40000, 64 << 20).is_err(), "byte {at}");
        }
        assert!(read_directory(&file, &ext[..20], 65536, 0x40000, 64 << 20).is_err());
        assert!(read_directory(&file, &ext, 65536, 0x20010, 64 << 20).is_err());
    }

    use crate::BlockBackend;

    fn image(name: &str) -> (std::path::PathBuf, Qcow2Image) {
        let p = crate::test_path("qcow2", name);
        let _ = std::fs::remove_file(&p);
        let img = Qcow2Image::create(&p, 64 << 20, &super::super::CreateOptions::default()).unwrap();
        (p, img)
    }

    #[test]
    fn writes_mark_enabled_bitmaps_and_survive_close() {
        let (p, img) = image("bm-track.qcow2");
        img.add_bitmap("on", None, true).unwrap();
        img.add_bitmap("off", Some(512), false).unwrap();
        img.close().unwrap();
        let img = Qcow2Image::open(&p, false).unwrap();
        // Opened for writing: every bitmap is in use on disk until closed.
        let on_disk = Qcow2Image::open_file(Box::new(std::fs::File::open(&p).unwrap()), "peek", true, None).unwrap();
        assert!(on_disk.bitmaps().iter().all(|b| b.in_use));
        drop(on_disk);
        img.write_at(&[1u8; 4096], 1 << 20).unwrap();
        img.write_zeroes(8 << 20, 65536 * 2).unwrap();
        img.resize(128 << 20, false).unwrap();
        img.write_at(&[2u8; 512], 100 << 20).unwrap();
        img.close().unwrap();
        let img = Qcow2Image::open(&p, true).unwrap();
        let infos = img.bitmaps();
        assert!(infos.iter().all(|b| !b.in_use), "{infos:?}");
        assert_eq!(img.bitmap_ranges("on").unwrap(), (65536, vec![(1 << 20, 65536), (8 << 20, 131072), (100 << 20, 65536)]));
        assert_eq!(img.bitmap_ranges("off").unwrap(), (512, vec![]));
        assert_eq!(img.check(super::super::Repair::None).unwrap().leaks, 0);
    }

    #[test]
    fn a_crash_leaves_bitmaps_in_use_and_they_refuse_use() {
        let (p, img) = image("bm-crash.qcow2");
        img.add_bitmap("b", None, true).unwrap();
        img.close().unwrap();
        let img = Qcow2Image::open(&p, false).unwrap();
        img.write_at(&[1u8; 512], 0).unwrap();
        img.simulate_crash();
        let img = Qcow2Image::open(&p, false).unwrap();
        assert!(img.bitmaps()[0].in_use);
        assert!(img.clear_bitmap("b").unwrap_err().to_string().contains("inconsistent"));
        assert!(img.resize(128 << 20, false).unwrap_err().to_string().contains("inconsistent"));
        // Still counted: a repair of leaks does not free its clusters.
        let r = img.check(super::super::Repair::Leaks).unwrap();
        assert_eq!((r.leaks, r.corruptions), (0, 0));
        img.remove_bitmap("b").unwrap();
        img.close().unwrap();
        let img = Qcow2Image::open(&p, true).unwrap();
        assert!(img.bitmaps().is_empty());
        assert_eq!(img.header().autoclear_features, 0);
        let r = img.check(super::super::Repair::None).unwrap();
        assert_eq!((r.leaks, r.corruptions), (0, 0));
    }

    #[test]
    fn bitmaps_a_bitmap_unaware_writer_left_are_dropped() {
        let (p, img) = image("bm-stale.qcow2");
        img.add_bitmap("b", None, true).unwrap();
        img.close().unwrap();
        // What a writer without bitmap support does: clear the autoclear bits.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &0u64.to_be_bytes(), 88).unwrap();
        drop(f);
        let ro = Qcow2Image::open(&p, true).unwrap();
        assert!(ro.bitmaps().is_empty());
        assert!(ro.bitmap_damage().unwrap().contains("without bitmap support"));
        drop(ro);
        let img = Qcow2Image::open(&p, false).unwrap();
        img.close().unwrap();
        let img = Qcow2Image::open(&p, true).unwrap();
        assert!(img.bitmap_damage().is_none());
        // Its clusters are leaks now, as qemu-img check reports them.
        assert!(img.check(super::super::Repair::None).unwrap().leaks > 0);
    }
}
