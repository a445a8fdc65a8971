//! qcow2 images (versions 2 and 3), as QEMU defines them in
//! `docs/interop/qcow2.txt`.
//!
//! Layout: a header in cluster 0; a two-level table (L1 -> L2 -> data
//! cluster) maps guest clusters to host clusters; a two-level refcount
//! structure counts references to every host cluster. New clusters are taken
//! from the end of the file, and every write is ordered
//! data -> refcount -> L2 entry -> L1 entry, so a crash at any point leaves at
//! most leaked clusters, never a table pointing at garbage.
//!
//! Reads understand standard, zero and compressed (zlib, zstd) clusters and
//! backing chains of any depth. Writes allocate (reusing freed clusters) and
//! copy-on-write clusters shared with internal snapshots ([`snapshot`]);
//! compressed writes, resizing, preallocation and lazy refcounts are here
//! too, and [`check`] counts every reference to find leaks and corruption.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::{check_range, io_err, push_extent, BlockBackend, Error, Extent, ExtentKind, Format, ImageFile, Result};

mod amend;
mod open;
pub mod bitmap;
pub mod check;
mod header;
mod refcount;
pub mod snapshot;

pub use bitmap::BitmapInfo;
pub use check::{CheckReport, Repair};
pub use header::{read_backing_name, resolve_backing, Header};
pub use snapshot::Snapshot;
pub(crate) use header::{backing_err, backing_format_for, be32, be64, build_header_cluster, read_header, HeaderCluster};

/// The four bytes every qcow2 file starts with.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

const V2_HEADER_LEN: u32 = 72;
const V3_HEADER_LEN: u32 = 104;
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits: L1 tables up to 32 MiB, refcount tables up to 8 MiB.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const MAX_BACKING_NAME: u32 = 1023;
/// Most images in a backing chain: qemu-img 7.2 reads 1,001 (and crashes
/// at 1,101); each holds one descriptor while open.
pub const MAX_CHAIN_DEPTH: usize = 1024;

const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension naming an external data file.
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Autoclear bit: the external data file is a valid raw image too.
const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// How many L2 tables the metadata cache keeps.
const L2_CACHE_TABLES: usize = 64;

/// Compression used by compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// zlib (raw deflate), the default.
    Zlib,
    /// Zstandard.
    Zstd,
}

/// How much of the image `create` allocates up front (qemu-img's `preallocation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// Nothing: clusters are allocated on first write.
    #[default]
    Off,
    /// Every L2 table and data cluster is allocated; the file stays sparse.
    Metadata,
    /// As metadata, with the file's blocks reserved by `fallocate`.
    Falloc,
    /// As metadata, with zeros written to every data cluster.
    Full,
}

impl Preallocation {
    /// Parses qemu-img's names (`off`, `metadata`, `falloc`, `full`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "off" => Ok(Self::Off),
            "metadata" => Ok(Self::Metadata),
            "falloc" => Ok(Self::Falloc),
            "full" => Ok(Self::Full),
            _ => Err(Error::Request(format!("invalid preallocation '{s}': expected off, metadata, falloc or full"))),
        }
    }
}

/// Options for [`Qcow2Image::create`].
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// log2 of the cluster size (default 16: 64 KiB).
    pub cluster_bits: u32,
    /// 2 (compat=0.10) or 3 (compat=1.1, default).
    pub version: u32,
    /// Backing file name as stored in the image, and its format.
    pub backing: Option<(String, Format)>,
    /// Algorithm for compressed clusters (zstd needs version 3).
    pub compression: Compression,
    /// Defer refcount updates while the image is open (version 3 only).
    pub lazy_refcounts: bool,
    /// What to allocate up front.
    pub preallocation: Preallocation,
    /// An external data file (created or truncated to the size) holding the
    /// guest data at its own offsets, and whether it must stay a valid raw image.
    pub data_file: Option<(String, bool)>,
    /// 128-bit L2 entries with 32 subclusters per cluster (clusters of 16 KiB or more).
    pub extended_l2: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            cluster_bits: 16,
            version: 3,
            backing: None,
            compression: Compression::Zlib,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            data_file: None,
            extended_l2: false,
        }
    }
}

/// Mutable state of an open image, behind one lock.
pub(crate) struct Inner {
    header: Header,
    l1: Vec<u64>,
    l2_cache: HashMap<u64, Vec<u64>>,
    l2_lru: Vec<u64>,
    /// L2 tables changed in the cache and not yet written: written only
    /// after a barrier makes the data and refcounts they point at durable.
    l2_dirty: HashSet<u64>,
    /// Host clusters losing a reference, applied only once the table that
    /// dropped it is durable (until then the old table may still point there).
    pending_free: Vec<u64>,
    reftable: Vec<u64>,
    rc_cache: HashMap<u64, Vec<u8>>,
    rc_lru: Vec<u64>,
    rc_dirty: HashSet<u64>,
    snapshots: Vec<snapshot::Snapshot>,
    /// First byte past every cluster in use: where the file grows.
    next_free: u64,
    /// Lowest cluster index that may have refcount 0.
    free_hint: u64,
    file_len: u64,
    /// Where the next compressed cluster may go inside a partly used cluster (0: none).
    compressed_cursor: u64,
    /// The dirty bit is set on disk (lazy refcounts in use).
    marked_dirty: bool,
    /// Header extensions other than the backing format, kept when the header is rewritten.
    extensions: Vec<(u32, Vec<u8>)>,
    /// Persistent dirty bitmaps.
    bitmaps: bitmap::Bitmaps,
    /// What is unusable in the refcount table or the blocks it names (a repair rebuilds them).
    refcount_damage: Vec<String>,
    /// Why the snapshot table could not be read (read-only opens go on
    /// without it; a repair drops it).
    snapshot_damage: Option<String>,
}

/// An open qcow2 image.
pub struct Qcow2Image {
    path: PathBuf,
    name: String,
    cluster_bits: u32,
    /// 128-bit L2 entries with 32 subclusters each.
    extended_l2: bool,
    /// The external data file the guest data lives in (read only), and its name as recorded.
    data_file: Option<Box<dyn ImageFile>>,
    data_file_name: Option<String>,
    file: Box<dyn ImageFile>,
    backing: Option<Box<dyn BlockBackend>>,
    backing_name: Option<String>,
    backing_format: Option<Format>,
    /// A recorded backing format rvirt does not read (shown by `info`).
    backing_format_unknown: Option<String>,
    read_only: bool,
    lazy_refcounts: bool,
    /// qemu-img's `unsafe` cache mode: barriers and flushes skip `fdatasync`.
    no_sync: AtomicBool,
    /// Closed as if the process died: nothing cached is written.
    abandoned: AtomicBool,
    inner: Mutex<Inner>,
}

/// What a qcow2 layer itself stores for a guest range (see [`Qcow2Image::host_map`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Nothing: reads fall through to the backing file (or zeros).
    Unallocated,
    /// Reads fall through as from `Unallocated`, over a host cluster kept for
    /// the range (subclusters of a preallocated cluster); `host`: its first byte.
    Reserved {
        /// Host offset of the first byte.
        host: u64,
    },
    /// A zero flag; `host` is the offset of the cluster kept allocated under it, if any.
    Zero {
        /// Host offset of the first byte (an allocated zero cluster).
        host: Option<u64>,
    },
    /// Data; `host` is its offset in the file, `None` when compressed.
    Data {
        /// Host offset of the first byte.
        host: Option<u64>,
    },
}

/// A run of guest bytes with the same [`Stored`] kind (and contiguous host offsets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostExtent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What is stored.
    pub stored: Stored,
}

impl HostExtent {
    /// Whether `next`, starting where this run ends, extends it.
    fn continues(&self, next: Stored) -> bool {
        match (self.stored, next) {
            (Stored::Data { host: Some(a) }, Stored::Data { host: Some(b) })
            | (Stored::Zero { host: Some(a) }, Stored::Zero { host: Some(b) })
            | (Stored::Reserved { host: a }, Stored::Reserved { host: b }) => a + self.length == b,
            (a, b) => a == b,
        }
    }
}

/// What one guest cluster maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not allocated here (reads from backing, or zeros).
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster or 0.
    Zero { host: u64 },
    /// Data at `host` (cluster aligned); `copied` means refcount is exactly 1.
    Data { host: u64, copied: bool },
    /// Compressed: `offset` and the length of the sectors it spans in the file.
    Compressed { offset: u64, len: u64 },
    /// Extended L2: a cluster at `host` (or 0) whose 32 subclusters are each
    /// allocated (`alloc` bit), zero (`zero` bit) or neither (the backing file's).
    Sub { host: u64, alloc: u32, zero: u32 },
}

impl Mapping {
    /// The host cluster whose refcount the entry's COPIED flag must reflect, if any.
    pub(crate) fn flagged_host(self) -> Option<u64> {
        match self {
            Mapping::Data { host, .. } => Some(host),
            Mapping::Zero { host } | Mapping::Sub { host, .. } if host != 0 => Some(host),
            _ => None,
        }
    }
}

/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u64 = 32;

impl Qcow2Image {
    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.lock().header.clone()
    }

    /// The backing file name as stored in the image.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_name.as_deref()
    }

    /// The backing file's format as recorded in the image.
    pub fn backing_format(&self) -> Option<Format> {
        self.backing_format
    }

    /// The backing format the image records, also one rvirt does not read (`info`).
    pub fn backing_format_name(&self) -> Option<String> {
        self.backing_format.map(|f| f.name().to_string()).or_else(|| self.backing_format_unknown.clone())
    }

    /// The image file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub(crate) fn corrupt(&self, detail: String) -> Error {
        Error::Corrupt { path: self.name.clone(), detail }
    }

    pub(crate) fn io(&self, e: std::io::Error) -> Error {
        io_err(&self.path, e)
    }

    /// Guest clusters one L2 table maps (its entries are 16 bytes with extended L2).
    fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2 { 16 } else { 8 }
    }

    /// Loads (through the cache) the L2 table at `off`.
    fn l2_table<'a>(&self, inner: &'a mut Inner, off: u64) -> Result<&'a mut Vec<u64>> {
        let cs = self.cluster_size();
        if !inner.l2_cache.contains_key(&off) {
            if off % cs != 0 || off < cs || off + cs > inner.file_len.max(inner.next_free) {
                return Err(self.corrupt(format!("L2 table offset {off:#x} is misaligned, in the header or past the end")));
            }
            let table = read_table(&*self.file, off, (cs / 8) as usize).map_err(|e| self.io(e))?;
            if inner.l2_cache.len() >= L2_CACHE_TABLES {
                let victim = inner.l2_lru.remove(0);
                if let Some(t) = inner.l2_cache.remove(&victim) {
                    if inner.l2_dirty.remove(&victim) {
                        // What the table points at must be durable before it is.
                        self.flush_refcounts(inner)?;
                        self.sync()?;
                        write_table(&*self.file, victim, &t).map_err(|e| self.io(e))?;
                    }
                }
            }
            inner.l2_cache.insert(off, table);
            inner.l2_lru.push(off);
        } else if let Some(pos) = inner.l2_lru.iter().position(|&o| o == off) {
            let o = inner.l2_lru.remove(pos);
            inner.l2_lru.push(o);
        }
        inner.l2_cache.get_mut(&off).ok_or_else(|| self.corrupt("L2 cache".into()))
    }

    /// Replaces a whole L2 table (after its entries were changed): in the
    /// cache, written at the next barrier.
    fn write_l2_table(&self, inner: &mut Inner, off: u64, table: Vec<u64>) -> Result<()> {
        *self.l2_table(inner, off)? = table;
        inner.l2_dirty.insert(off);
        Ok(())
    }

    /// Forgets cached L2 tables; dirty ones are written first.
    fn drop_l2_cache(&self, inner: &mut Inner) -> Result<()> {
        if !inner.l2_dirty.is_empty() {
            self.commit(inner)?;
        }
        inner.l2_cache.clear();
        inner.l2_lru.clear();
        Ok(())
    }

    /// `fdatasync`, unless qemu-img's `unsafe` cache mode is on.
    pub(crate) fn sync(&self) -> Result<()> {
        if self.no_sync.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Guest data in an external file is durable before the tables naming it.
        if let Some(d) = &self.data_file {
            d.sync_data().map_err(|e| self.io(e))?;
        }
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// qemu-img's `-t unsafe`: skip every `fdatasync` (the output of a
    /// convert that is thrown away if the host crashes).
    pub fn set_cache_unsafe(&self, on: bool) {
        self.no_sync.store(on, Ordering::Relaxed);
    }

    /// Makes everything written so far durable, in QEMU's dependency order:
    /// data, new tables and refcount increments first (barrier; with lazy
    /// refcounts the increments wait for close, covered by the dirty bit); then the
    /// L2 tables that point at them (barrier); then the refcount decrements
    /// for clusters those tables stopped pointing at, which only now may be
    /// reused. A power cut anywhere leaves at most leaked clusters.
    pub(crate) fn commit(&self, inner: &mut Inner) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if !self.lazy_refcounts {
            // Lazy refcounts stay in memory until close; the dirty bit covers them.
            self.flush_refcounts(inner)?;
        }
        self.sync()?;
        if !inner.l2_dirty.is_empty() {
            let mut dirty: Vec<u64> = inner.l2_dirty.drain().collect();
            dirty.sort_unstable();
            for off in dirty {
                if let Some(t) = inner.l2_cache.get(&off) {
                    write_table(&*self.file, off, t).map_err(|e| self.io(e))?;
                }
            }
            self.sync()?;
        }
        for host in std::mem::take(&mut inner.pending_free) {
            self.adjust_refcount(inner, host, -1)?;
        }
        Ok(())
    }

    fn mapping(&self, inner: &mut Inner, guest_cluster: u64) -> Result<Mapping> {
        let l1_idx = (guest_cluster / self.l2_entries()) as usize;
        let l2_idx = (guest_cluster % self.l2_entries()) as usize;
        let l1e = *inner.l1.get(l1_idx).ok_or_else(|| self.corrupt(format!("guest cluster {guest_cluster} is beyond the L1 table")))?;
        let l2_off = l1e & L1_OFFSET_MASK;
        if l2_off == 0 {
            return Ok(Mapping::Unallocated);
        }
        // Data in an external file is bounded by that file, not this one.
        let end = if self.data_file_name.is_some() { u64::MAX } else { inner.file_len.max(inner.next_free) };
        let (version, w) = (inner.header.version, self.l2_entry_words());
        let t = self.l2_table(inner, l2_off)?;
        self.decode_entry(version, &t[l2_idx * w..l2_idx * w + w], end)
    }

    /// Words per L2 entry: 2 with extended L2 (descriptor, bitmap), else 1.
    pub(crate) fn l2_entry_words(&self) -> usize {
        if self.extended_l2 { 2 } else { 1 }
    }

    /// Decodes one L2 entry from its words (see [`Self::l2_entry_words`]).
    pub(crate) fn decode_entry(&self, version: u32, words: &[u64], file_len: u64) -> Result<Mapping> {
        if self.extended_l2 {
            self.decode_extended(words[0], words.get(1).copied().unwrap_or(0), file_len)
        } else {
            self.decode_l2(version, words[0], file_len)
        }
    }

    /// Decodes an extended L2 entry: the standard part (whose bit 0 is not
    /// the zero flag here) and the subcluster bitmap.
    pub(crate) fn decode_extended(&self, e: u64, bitmap: u64, file_len: u64) -> Result<Mapping> {
        let m = self.decode_l2(2, e & !ZERO, file_len)?;
        if let Mapping::Compressed { .. } = m {
            return Ok(m);
        }
        let host = match m {
            Mapping::Data { host, .. } => host,
            _ => 0,
        };
        let (alloc, zero) = (bitmap as u32, (bitmap >> 32) as u32);
        if alloc & zero != 0 {
            return Err(self.corrupt(format!("extended L2 entry {e:#x}/{bitmap:#x} marks subclusters both allocated and zero")));
        }
        if alloc != 0 && host == 0 {
            return Err(self.corrupt(format!("extended L2 entry {e:#x} allocates subclusters of no cluster")));
        }
        Ok(match (host, alloc, zero) {
            (h, u32::MAX, 0) if h != 0 => m,
            (_, 0, u32::MAX) => Mapping::Zero { host },
            (0, 0, 0) => Mapping::Unallocated,
            _ => Mapping::Sub { host, alloc, zero },
        })
    }

    /// The mappings of an L2 table's entries that are not empty (pairs of
    /// words with extended L2), with their index in the table.
    pub(crate) fn table_mappings<'a>(&'a self, version: u32, table: &'a [u64], file_len: u64) -> impl Iterator<Item = (usize, u64, Result<Mapping>)> + 'a {
        table.chunks(self.l2_entry_words()).enumerate().filter(|(_, p)| p.iter().any(|&w| w != 0)).map(move |(i, p)| (i, p[0], self.decode_entry(version, p, file_len)))
    }

    pub(crate) fn decode_l2(&self, version: u32, e: u64, file_len: u64) -> Result<Mapping> {
        let cs = self.cluster_size();
        if e & COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let offset = e & ((1u64 << x) - 1);
            let sectors = ((e & !COMPRESSED & !COPIED) >> x) + 1;
            let len = sectors * 512 - (offset & 511);
            if offset < cs || offset >= file_len {
                return Err(self.corrupt(format!("compressed cluster at {offset:#x} is in the header or past the end")));
            }
            return Ok(Mapping::Compressed { offset, len });
        }
        let host = e & L2_OFFSET_MASK;
        if self.data_file_name.is_some() {
            // Offsets in the external data file: any aligned one, 0 included
            // (then marked by COPIED, as the spec says).
            if host % cs != 0 {
                return Err(self.corrupt(format!("data cluster offset {host:#x} is misaligned")));
            }
            let allocated = host != 0 || e & COPIED != 0;
            if version >= 3 && e & ZERO != 0 {
                return Ok(Mapping::Zero { host });
            }
            return Ok(if allocated { Mapping::Data { host, copied: e & COPIED != 0 } } else { Mapping::Unallocated });
        }
        if host != 0 && (host % cs != 0 || host < cs || host >= file_len) {
            return Err(self.corrupt(format!("data cluster offset {host:#x} is misaligned, in the header or past the end")));
        }
        if version >= 3 && e & ZERO != 0 {
            return Ok(Mapping::Zero { host });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data { host, copied: e & COPIED != 0 })
    }

    /// Where guest data is read from: the external data file, or this file.
    fn data_io(&self) -> Result<&dyn ImageFile> {
        match (&self.data_file, &self.data_file_name) {
            (Some(f), _) => Ok(f.as_ref()),
            (None, None) => Ok(&*self.file),
            (None, Some(n)) => Err(Error::Request(format!("{}: the external data file '{n}' was not opened", self.name))),
        }
    }

    /// The external data file as recorded, and whether it is a raw image too.
    pub fn data_file(&self) -> Option<(String, bool)> {
        let raw = self.lock().header.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0;
        self.data_file_name.clone().map(|n| (n, raw))
    }

    /// The host clusters an L2 mapping holds a reference to.
    pub(crate) fn clusters_of(&self, m: Mapping) -> std::ops::Range<u64> {
        let cs = self.cluster_size();
        if self.data_file_name.is_some() && !matches!(m, Mapping::Compressed { .. }) {
            // Data clusters live in the external file: this one counts none.
            return 0..0;
        }
        match m {
            Mapping::Data { host, .. } => host / cs..host / cs + 1,
            Mapping::Zero { host } | Mapping::Sub { host, .. } if host != 0 => host / cs..host / cs + 1,
            Mapping::Compressed { offset, len } => offset / cs..(offset + len).div_ceil(cs),
            _ => 0..0,
        }
    }

    fn decompress(&self, inner: &Inner, offset: u64, len: u64, out: &mut [u8]) -> Result<()> {
        let mut comp = vec![0u8; len as usize];
        let n = read_full(&*self.file, &mut comp, offset).map_err(|e| self.io(e))?;
        comp.truncate(n);
        let bad = |what: &str| self.corrupt(format!("compressed cluster at {offset:#x}: {what}"));
        match inner.header.compression {
            Compression::Zlib => {
                let mut d = flate2::read::DeflateDecoder::new(&comp[..]);
                d.read_exact(out).map_err(|e| bad(&e.to_string()))
            }
            Compression::Zstd => {
                let mut d = zstd::stream::read::Decoder::new(&comp[..]).map_err(|e| bad(&e.to_string()))?;
                d.read_exact(out).map_err(|e| bad(&e.to_string()))
            }
        }
    }

    /// Reads part of one guest cluster.
    fn read_in_cluster(&self, inner: &mut Inner, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.cluster_size();
        let in_cluster = offset % cs;
        match self.mapping(inner, offset / cs)? {
            Mapping::Unallocated => match &self.backing {
                Some(b) => read_backing(b.as_ref(), buf, offset),
                None => {
                    buf.fill(0);
                    Ok(())
                }
            },
            Mapping::Zero { .. } => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => {
                let n = read_full(self.data_io()?, buf, host + in_cluster).map_err(|e| self.io(e))?;
                buf[n..].fill(0);
                Ok(())
            }
            Mapping::Compressed { offset: coff, len } => {
                let mut whole = vec![0u8; cs as usize];
                self.decompress(inner, coff, len, &mut whole)?;
                buf.copy_from_slice(&whole[in_cluster as usize..in_cluster as usize + buf.len()]);
                Ok(())
            }
            Mapping::Sub { host, alloc, zero } => {
                // Subcluster by subcluster: stored here, zero, or the backing file's.
                let sc = cs / SUBCLUSTERS;
                let mut done = 0usize;
                while done < buf.len() {
                    let at = in_cluster + done as u64;
                    let bit = 1u32 << (at / sc);
                    let n = ((sc - at % sc) as usize).min(buf.len() - done);
                    let piece = &mut buf[done..done + n];
                    if alloc & bit != 0 {
                        let got = read_full(self.data_io()?, piece, host + at).map_err(|e| self.io(e))?;
                        piece[got..].fill(0);
                    } else if zero & bit != 0 || self.backing.is_none() {
                        piece.fill(0);
                    } else if let Some(b) = &self.backing {
                        read_backing(b.as_ref(), piece, offset - in_cluster + at)?;
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Drops one reference to every host cluster `m` held, once the table
    /// that stopped pointing at them is durable ([`Self::commit`]).
    fn release(&self, inner: &mut Inner, m: Mapping) -> Result<()> {
        for c in self.clusters_of(m) {
            inner.pending_free.push(c * self.cluster_size());
        }
        Ok(())
    }

    /// The L2 table for `guest_cluster`, allocated (and made exclusively ours) if needed.
    fn writable_l2(&self, inner: &mut Inner, guest_cluster: u64) -> Result<u64> {
        let l1_idx = (guest_cluster / self.l2_entries()) as usize;
        let l1e = inner.l1[l1_idx];
        let old = l1e & L1_OFFSET_MASK;
        if old != 0 && l1e & COPIED != 0 {
            return Ok(old);
        }
        if old != 0 && self.refcount(inner, old)? == 1 {
            // Ours alone (a snapshot that shared it is gone): just mark it so.
            self.set_l1_entry(inner, l1_idx, old | COPIED)?;
            return Ok(old);
        }
        // Unallocated, or shared with a snapshot: a new table. Data clusters
        // stay reachable from as many L1 tables as before, so only the old
        // table loses a reference.
        let new = self.alloc_clusters(inner, 1)?;
        let table = if old != 0 { self.l2_table(inner, old)?.clone() } else { vec![0u64; (self.cluster_size() / 8) as usize] };
        write_table(&*self.file, new, &table).map_err(|e| self.io(e))?;
        inner.file_len = inner.file_len.max(new + self.cluster_size());
        // The table and its refcount are durable before the L1 entry points at it.
        self.flush_refcounts(inner)?;
        self.sync()?;
        self.set_l1_entry(inner, l1_idx, new | COPIED)?;
        *self.l2_table(inner, new)? = table;
        if old != 0 {
            inner.pending_free.push(old);
        }
        Ok(new)
    }

    fn set_l1_entry(&self, inner: &mut Inner, idx: usize, entry: u64) -> Result<()> {
        self.file.write_all_at(&entry.to_be_bytes(), inner.header.l1_table_offset + idx as u64 * 8).map_err(|e| self.io(e))?;
        inner.l1[idx] = entry;
        Ok(())
    }

    /// Changes one L2 entry in the cache; the table is written at the next barrier.
    fn set_l2_entry(&self, inner: &mut Inner, l2_off: u64, guest_cluster: u64, entry: u64) -> Result<()> {
        let idx = guest_cluster % self.l2_entries();
        let extended = self.extended_l2;
        put_l2_entry(self.l2_table(inner, l2_off)?, extended, idx as usize, entry);
        inner.l2_dirty.insert(l2_off);
        Ok(())
    }

    /// Writes part of one guest cluster.
    fn write_in_cluster(&self, inner: &mut Inner, offset: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let gc = offset / cs;
        let in_cluster = offset % cs;
        let current = self.mapping(inner, gc)?;
        if let Mapping::Data { host, copied: true } = current {
            return self.data_io()?.write_all_at(data, host + in_cluster).map_err(|e| self.io(e));
        }
        if self.data_file_name.is_some() {
            if let Mapping::Data { host, .. } = current {
                return self.data_io()?.write_all_at(data, host + in_cluster).map_err(|e| self.io(e));
            }
            return self.write_in_data_file(inner, gc, in_cluster, data);
        }
        let shows_backing = match current {
            Mapping::Unallocated => true,
            Mapping::Sub { alloc, zero, .. } => alloc | zero != u32::MAX,
            _ => false,
        };
        if shows_backing && data.len() as u64 != cs && self.backing.is_none() && self.backing_name.is_some() {
            // The rest of the cluster is the backing file's, which this open did not open.
            return Err(Error::Request(format!("{}: a partial write over the backing file needs the backing file open", self.name)));
        }
        if self.extended_l2 && self.write_subclusters(inner, gc, current, in_cluster, data)? {
            return Ok(());
        }
        let cluster = self.cluster_with(inner, gc, in_cluster, data)?;
        let l2_off = self.writable_l2(inner, gc)?;
        if let Mapping::Zero { host } | Mapping::Sub { host, .. } = current {
            // A host cluster ours alone that is not wholly data yet (preallocated
            // zeros, subclusters) is written in place, as qemu reuses it.
            if host != 0 && self.refcount(inner, host)? == 1 {
                self.file.write_all_at(&cluster, host).map_err(|e| self.io(e))?;
                return self.set_l2_entry(inner, l2_off, gc, host | COPIED);
            }
        }
        // Copy-on-write into a new cluster.
        let host = self.alloc_clusters(inner, 1)?;
        self.file.write_all_at(&cluster, host).map_err(|e| self.io(e))?;
        inner.file_len = inner.file_len.max(host + cs);
        self.set_l2_entry(inner, l2_off, gc, host | COPIED)?;
        self.release(inner, current)
    }

    /// Guest cluster `gc` as reads see it now, with `data` laid over it at
    /// `in_cluster`: what a partial write puts in a new or reused cluster.
    fn cluster_with(&self, inner: &mut Inner, gc: u64, in_cluster: u64, data: &[u8]) -> Result<Vec<u8>> {
        let cs = self.cluster_size();
        let mut cluster = vec![0u8; cs as usize];
        if data.len() as u64 != cs {
            self.read_in_cluster(inner, gc * cs, &mut cluster)?;
        }
        cluster[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
        Ok(cluster)
    }

    /// Writes part of guest cluster `gc` of an image with an external data
    /// file: the cluster lives at its guest offset there, so nothing is
    /// allocated; a cluster new to the image is filled from what reads saw.
    fn write_in_data_file(&self, inner: &mut Inner, gc: u64, in_cluster: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let host = gc * cs;
        let cluster = self.cluster_with(inner, gc, in_cluster, data)?;
        let l2_off = self.writable_l2(inner, gc)?;
        // The image's last cluster may be partial: the data file ends with the disk.
        let part = cs.min(inner.header.size - host) as usize;
        self.data_io()?.write_all_at(&cluster[..part], host).map_err(|e| self.io(e))?;
        // COPIED also marks offset 0 as allocated in a data file.
        self.set_l2_entry(inner, l2_off, gc, host | COPIED)
    }

    /// Writes whole clusters from `pos` that hold nothing yet (unallocated
    /// or plain zero flags, within one L2 table) into newly allocated
    /// contiguous clusters: one data write, one refcount write, one L2
    /// write. The data write runs without the lock, so requests from several
    /// queues overlap; the new clusters are ours alone until linked. Returns
    /// how many clusters it wrote (0: the first is taken).
    fn write_fresh_run(&self, pos: u64, data: &[u8]) -> Result<u64> {
        let cs = self.cluster_size();
        let gc = pos / cs;
        let (host, n, grows) = {
            let mut inner = self.lock();
            let in_table = self.l2_entries() - gc % self.l2_entries();
            let max = (data.len() as u64 / cs).min(in_table);
            let mut n = 0;
            while n < max && matches!(self.mapping(&mut inner, gc + n)?, Mapping::Unallocated | Mapping::Zero { host: 0 }) {
                n += 1;
            }
            if n < 2 {
                return Ok(0);
            }
            self.mark_dirty(&mut inner)?;
            // In an external data file a guest cluster lives at its own offset.
            let host = if self.data_file_name.is_some() { gc * cs } else { self.alloc_clusters(&mut inner, n)? };
            (host, n, host + n * cs > inner.file_len)
        };
        let io = self.data_io()?;
        if grows {
            // Blocks reserved in one call cost the file system less than
            // allocating them page by page as the write lands (a hint: a
            // failure leaves the write to allocate them).
            let _ = io.allocate(host, n * cs);
        }
        io.write_all_at(&data[..(n * cs) as usize], host).map_err(|e| self.io(e))?;
        let mut inner = self.lock();
        inner.file_len = inner.file_len.max(host + n * cs);
        // Link under the lock; whatever another request linked meanwhile is released.
        let l2_off = self.writable_l2(&mut inner, gc)?;
        let mut replaced = Vec::new();
        for i in 0..n {
            let m = self.mapping(&mut inner, gc + i)?;
            if !matches!(m, Mapping::Unallocated | Mapping::Zero { host: 0 }) {
                replaced.push(m);
            }
        }
        let first = (gc % self.l2_entries()) as usize;
        let table = self.l2_table(&mut inner, l2_off)?;
        for i in 0..n {
            put_l2_entry(table, self.extended_l2, first + i as usize, (host + i * cs) | COPIED);
        }
        inner.l2_dirty.insert(l2_off);
        for m in replaced {
            self.release(&mut inner, m)?;
        }
        Ok(n)
    }

    /// Writes one whole cluster compressed (what `qemu-img convert -c` makes).
    /// `data` is a full cluster, or the image's last, partial one. Data that
    /// does not compress is written as a normal cluster.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.writable()?;
        let cs = self.cluster_size();
        let (size, compression) = {
            let inner = self.lock();
            (inner.header.size, inner.header.compression)
        };
        check_range(size, offset, data.len() as u64)?;
        self.lock().bitmaps.mark(offset, data.len() as u64);
        if offset % cs != 0 || (data.len() as u64 != cs && offset + data.len() as u64 != size) {
            return Err(Error::Request("compressed writes must cover whole clusters".into()));
        }
        if self.data_file_name.is_some() {
            return Err(Error::Request("Compression is not supported with an external data file".into()));
        }
        let mut cluster = data.to_vec();
        cluster.resize(cs as usize, 0);
        let packed = compress(compression, &cluster).map_err(|e| self.io(e))?;
        let mut inner = self.lock();
        self.mark_dirty(&mut inner)?;
        if packed.len() as u64 >= cs {
            return self.write_in_cluster(&mut inner, offset, &cluster);
        }
        let gc = offset / cs;
        let current = self.mapping(&mut inner, gc)?;
        let l2_off = self.writable_l2(&mut inner, gc)?;
        let host = self.alloc_compressed(&mut inner, packed.len() as u64)?;
        self.file.write_all_at(&packed, host).map_err(|e| self.io(e))?;
        inner.file_len = inner.file_len.max(host + packed.len() as u64);
        let x = 62 - (self.cluster_bits - 8);
        let sectors = ((host + packed.len() as u64 - 1) >> 9) - (host >> 9);
        self.set_l2_entry(&mut inner, l2_off, gc, COMPRESSED | (sectors << x) | host)?;
        self.release(&mut inner, current)
    }

    /// Makes one whole guest cluster read as zeros (v3 zero flag, else
    /// unallocated when nothing shows through from a backing file).
    /// `unmap` drops the cluster entirely when nothing would show through.
    fn zero_cluster(&self, inner: &mut Inner, gc: u64, unmap: bool) -> Result<()> {
        if self.data_file_name.is_some() {
            // The data file itself reads as zeros there (it may be read as a raw image).
            let zeros = vec![0u8; self.cluster_size() as usize];
            let n = self.cluster_size().min(inner.header.size - gc * self.cluster_size()) as usize;
            return self.write_in_cluster(inner, gc * self.cluster_size(), &zeros[..n]);
        }
        let current = self.mapping(inner, gc)?;
        let entry = if inner.header.version >= 3 {
            // Whether a backing file shows through is the header's to say, even
            // when this open did not open the backing file.
            if unmap && self.backing_name.is_none() {
                0
            } else {
                ZERO
            }
        } else if self.backing_name.is_none() {
            0
        } else {
            // v2 cannot express zeros over a backing file: write them.
            let zeros = vec![0u8; self.cluster_size() as usize];
            return self.write_in_cluster(inner, gc * self.cluster_size(), &zeros);
        };
        if current == Mapping::Unallocated && entry == 0 {
            return Ok(());
        }
        let l2_off = self.writable_l2(inner, gc)?;
        self.set_l2_entry(inner, l2_off, gc, entry)?;
        self.release(inner, current)
    }

    fn zero_range(&self, offset: u64, length: u64, discard: bool) -> Result<()> {
        self.writable()?;
        let cs = self.cluster_size();
        let mut inner = self.lock();
        check_range(inner.header.size, offset, length)?;
        self.mark_dirty(&mut inner)?;
        inner.bitmaps.mark(offset, length);
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let n = (cs - pos % cs).min(end - pos);
            if n == cs || pos + n == inner.header.size {
                self.zero_cluster(&mut inner, pos / cs, discard)?;
            } else if !self.zero_subclusters(&mut inner, pos, n)? {
                self.write_in_cluster(&mut inner, pos, &vec![0u8; n as usize])?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Drops every cluster of the active layer, so reads fall through to the
    /// backing file again (what `qemu-img commit` leaves behind).
    pub fn make_empty(&self) -> Result<()> {
        self.writable()?;
        let cs = self.cluster_size();
        let mut inner = self.lock();
        self.mark_dirty(&mut inner)?;
        let size = inner.header.size;
        inner.bitmaps.mark(0, size);
        for gc in 0..inner.header.size.div_ceil(cs) {
            let current = self.mapping(&mut inner, gc)?;
            if current != Mapping::Unallocated {
                let l2_off = self.writable_l2(&mut inner, gc)?;
                self.set_l2_entry(&mut inner, l2_off, gc, 0)?;
                self.release(&mut inner, current)?;
            }
        }
        Ok(())
    }

    /// Changes the virtual size. Growing extends the L1 table when needed;
    /// shrinking needs `allow_shrink` and drops the clusters past the new end.
    pub fn resize(&self, new_size: u64, allow_shrink: bool) -> Result<()> {
        self.writable()?;
        let cs = self.cluster_size();
        let mut inner = self.lock();
        let old_size = inner.header.size;
        self.resize_bitmaps(&mut inner, new_size)?;
        if new_size < old_size {
            if !allow_shrink {
                return Err(Error::Request("shrinking an image can lose data; pass --shrink to confirm".into()));
            }
            // Internal snapshots keep their own tables (and sizes): only the
            // active layer loses the clusters past the new end, as in qemu-img.
            if new_size % cs != 0 {
                // Zero the tail of the last cluster so growing again shows zeros.
                let n = (cs - new_size % cs).min(old_size - new_size);
                self.write_in_cluster(&mut inner, new_size, &vec![0u8; n as usize])?;
            }
            for gc in new_size.div_ceil(cs)..old_size.div_ceil(cs) {
                let current = self.mapping(&mut inner, gc)?;
                if current != Mapping::Unallocated {
                    let l2_off = self.writable_l2(&mut inner, gc)?;
                    self.set_l2_entry(&mut inner, l2_off, gc, 0)?;
                    self.release(&mut inner, current)?;
                }
            }
        } else {
            let needed = new_size.div_ceil(cs * self.l2_entries());
            if needed * 8 > MAX_L1_BYTES {
                return Err(Error::Request(format!("size {new_size} is too large for {cs}-byte clusters")));
            }
            if needed > u64::from(inner.header.l1_size) {
                self.grow_l1(&mut inner, needed as usize)?;
            }
        }
        self.commit(&mut inner)?;
        if let Some(d) = &self.data_file {
            // The data file holds the disk at its own offsets: it follows the size.
            d.set_len(new_size).map_err(|e| self.io(e))?;
        }
        self.file.write_all_at(&new_size.to_be_bytes(), 24).map_err(|e| self.io(e))?;
        inner.header.size = new_size;
        self.sync()
    }

    /// Moves the active L1 table to new clusters with room for `entries`.
    fn grow_l1(&self, inner: &mut Inner, entries: usize) -> Result<()> {
        let cs = self.cluster_size();
        let clusters = (entries as u64 * 8).div_ceil(cs);
        let mut table = inner.l1.clone();
        table.resize(entries, 0);
        let new = self.alloc_clusters(inner, clusters)?;
        let mut bytes = vec![0u8; (clusters * cs) as usize];
        for (i, e) in table.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.file.write_all_at(&bytes, new).map_err(|e| self.io(e))?;
        inner.file_len = inner.file_len.max(new + clusters * cs);
        self.flush_refcounts(inner)?;
        self.sync()?;
        // l1_size and l1_table_offset are adjacent: one write switches tables.
        let mut field = Vec::with_capacity(12);
        field.extend_from_slice(&(entries as u32).to_be_bytes());
        field.extend_from_slice(&new.to_be_bytes());
        self.file.write_all_at(&field, 36).map_err(|e| self.io(e))?;
        self.sync()?;
        let (old, old_clusters) = (inner.header.l1_table_offset, (u64::from(inner.header.l1_size) * 8).div_ceil(cs));
        inner.header.l1_size = entries as u32;
        inner.header.l1_table_offset = new;
        inner.l1 = table;
        for i in 0..old_clusters {
            self.adjust_refcount(inner, old + i * cs, -1)?;
        }
        Ok(())
    }

    /// Replaces the backing file recorded in the header (`None` removes it).
    /// Only the header changes; `qemu-img rebase` semantics (copying what
    /// differs) are the caller's. The image is closed by this call.
    pub fn set_backing_file(self, backing: Option<(&str, Format)>) -> Result<()> {
        self.writable()?;
        let cs = self.cluster_size();
        let (mut h, extensions) = {
            let inner = self.lock();
            // The new backing format replaces any recorded one.
            (inner.header.clone(), inner.extensions.iter().filter(|(t, _)| *t != EXT_BACKING_FORMAT).cloned().collect::<Vec<_>>())
        };
        let cluster0 = build_header_cluster(&mut h, backing.map(|(n, f)| (n, Some(f))), &extensions)?;
        if cluster0.len() as u64 > cs {
            return Err(Error::Request("backing file name does not fit in the header cluster".into()));
        }
        self.flush()?;
        self.file.write_all_at(&cluster0, 0).map_err(|e| self.io(e))?;
        self.sync()?;
        self.lock().header = h;
        Ok(())
    }

    /// Rewrites the header cluster from `inner` (header fields, extensions,
    /// the backing file as recorded) and makes it durable.
    pub(crate) fn write_header_cluster(&self, inner: &mut Inner) -> Result<()> {
        let mut h = inner.header.clone();
        let backing = self.backing_name.as_deref().map(|n| (n, self.backing_format));
        let cluster0 = build_header_cluster(&mut h, backing, &inner.extensions)?;
        if cluster0.len() as u64 > self.cluster_size() {
            return Err(Error::Request("the header extensions do not fit in the header cluster".into()));
        }
        self.file.write_all_at(&cluster0, 0).map_err(|e| self.io(e))?;
        self.sync()?;
        inner.header = h;
        Ok(())
    }

    pub(crate) fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly(self.name.clone()))
        } else {
            Ok(())
        }
    }

    /// Sets the dirty bit before the first deferred refcount update.
    fn mark_dirty(&self, inner: &mut Inner) -> Result<()> {
        if self.lazy_refcounts && !inner.marked_dirty {
            self.write_incompatible(inner, inner.header.incompatible_features | INCOMPAT_DIRTY)?;
            inner.marked_dirty = true;
        }
        Ok(())
    }

    fn set_dirty(&self, dirty: bool) -> Result<()> {
        let mut inner = self.lock();
        let f = inner.header.incompatible_features;
        let new = if dirty { f | INCOMPAT_DIRTY } else { f & !INCOMPAT_DIRTY };
        self.write_incompatible(&mut inner, new)?;
        inner.marked_dirty = dirty;
        Ok(())
    }

    pub(crate) fn write_incompatible(&self, inner: &mut Inner, features: u64) -> Result<()> {
        if inner.header.version < 3 {
            return Ok(());
        }
        self.file.write_all_at(&features.to_be_bytes(), 72).map_err(|e| self.io(e))?;
        self.sync()?;
        inner.header.incompatible_features = features;
        Ok(())
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of the file that hold data or metadata (what qemu-img calls disk size).
    pub fn allocated_bytes(&self) -> u64 {
        self.file.allocated_bytes()
    }

    /// What this layer stores for each range of `offset..offset+length`,
    /// with host offsets of uncompressed data (for `map`).
    pub fn host_map(&self, offset: u64, length: u64) -> Result<Vec<HostExtent>> {
        let cs = self.cluster_size();
        let mut inner = self.lock();
        check_range(inner.header.size, offset, length)?;
        let mut out: Vec<HostExtent> = Vec::new();
        let mut push = |p: u64, len: u64, stored: Stored| match out.last_mut() {
            Some(last) if last.offset + last.length == p && last.continues(stored) => last.length += len,
            _ => out.push(HostExtent { offset: p, length: len, stored }),
        };
        let end = offset + length;
        let span = cs * self.l2_entries();
        let mut pos = offset;
        while pos < end {
            // One L2 table's span at a time: an absent table is one piece,
            // a present one is read once and decoded entry by entry.
            let span_end = (pos / span + 1).saturating_mul(span).min(end);
            let l1_idx = (pos / span) as usize;
            let l1e = *inner.l1.get(l1_idx).ok_or_else(|| self.corrupt(format!("guest offset {pos:#x} is beyond the L1 table")))?;
            let l2_off = l1e & L1_OFFSET_MASK;
            if l2_off == 0 {
                push(pos, span_end - pos, Stored::Unallocated);
                pos = span_end;
                continue;
            }
            let table = self.l2_table(&mut inner, l2_off)?.clone();
            let file_end = if self.data_file_name.is_some() { u64::MAX } else { inner.file_len.max(inner.next_free) };
            while pos < span_end {
                let n = (cs - pos % cs).min(span_end - pos);
                let idx = ((pos / cs) % self.l2_entries()) as usize;
                let m = if self.extended_l2 {
                    self.decode_extended(table[idx * 2], table[idx * 2 + 1], file_end)?
                } else {
                    self.decode_l2(inner.header.version, table[idx], file_end)?
                };
                match m {
                    Mapping::Unallocated => push(pos, n, Stored::Unallocated),
                    Mapping::Zero { host } => {
                        let at = (host != 0 || self.data_file_name.is_some()).then_some(host + pos % cs).filter(|&h| h != 0);
                        push(pos, n, Stored::Zero { host: at });
                    }
                    Mapping::Data { host, .. } => push(pos, n, Stored::Data { host: Some(host + pos % cs) }),
                    Mapping::Compressed { .. } => push(pos, n, Stored::Data { host: None }),
                    Mapping::Sub { host, alloc, zero } => {
                        // One piece per subcluster, each as what it is.
                        let sc = cs / SUBCLUSTERS;
                        let mut p = pos;
                        while p < pos + n {
                            let bit = 1u32 << (p % cs / sc);
                            let len = (sc - p % sc).min(pos + n - p);
                            let stored = if alloc & bit != 0 {
                                Stored::Data { host: Some(host + p % cs) }
                            } else if zero & bit != 0 {
                                Stored::Zero { host: (host != 0).then_some(host + p % cs) }
                            } else if host != 0 {
                                Stored::Reserved { host: host + p % cs }
                            } else {
                                Stored::Unallocated
                            };
                            push(p, len, stored);
                            p += len;
                        }
                    }
                }
                pos += n;
            }
        }
        Ok(out)
    }

    /// Closes the image and says whether everything reached the file
    /// (bitmaps stored, tables and refcounts written): what `Drop` can only log.
    pub fn close(self) -> Result<()> {
        if !self.read_only {
            let mut inner = self.lock();
            self.store_bitmaps(&mut inner)?;
            self.commit(&mut inner)?;
            self.flush_refcounts(&mut inner)?;
            self.sync()?;
        }
        Ok(())
    }

    /// Closes the image as a crash would: what is cached in memory is lost
    /// (tests of crash consistency).
    #[doc(hidden)]
    pub fn simulate_crash(self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }

    /// What this open went on without: a damaged refcount structure or
    /// snapshot table (read-only and repairing opens only), damaged bitmaps.
    pub fn damage_found(&self) -> Vec<String> {
        let inner = self.lock();
        let mut out = inner.refcount_damage.clone();
        out.extend(inner.snapshot_damage.clone());
        out.extend(inner.bitmaps.damage.clone().map(|d| format!("bitmaps: {d}")));
        out
    }

    /// The backing image, when there is one.
    pub fn backing(&self) -> Option<&dyn BlockBackend> {
        self.backing.as_deref()
    }
}

/// Adds `path` to the backing chain walked so far, refusing a loop back to
/// an image already in it and a chain deeper than [`MAX_CHAIN_DEPTH`].
pub(crate) fn enter_chain(chain: &mut HashSet<PathBuf>, path: &Path) -> Result<()> {
    let canonical = std::fs::canonicalize(path).map_err(|e| io_err(path, e))?;
    if !chain.insert(canonical) {
        return Err(Error::Corrupt { path: path.display().to_string(), detail: "backing chain loops back to this image".into() });
    }
    if chain.len() > MAX_CHAIN_DEPTH {
        return Err(Error::Unsupported { path: path.display().to_string(), detail: format!("backing chain deeper than {MAX_CHAIN_DEPTH}") });
    }
    Ok(())
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if self.read_only || self.abandoned.load(Ordering::Relaxed) {
            return;
        }
        // Best effort: write cached tables and deferred refcounts, then clear
        // the dirty bit. A failure here leaves at most leaks (or the dirty
        // bit set, and the next open repairs).
        let mut inner = self.lock();
        if let Err(e) = self.store_bitmaps(&mut inner) {
            tracing::warn!(image = %self.name, error = %e, "storing the persistent bitmaps failed; they stay marked in use");
        }
        if inner.rc_dirty.is_empty() && inner.l2_dirty.is_empty() && inner.pending_free.is_empty() && !inner.marked_dirty {
            return;
        }
        if self.commit(&mut inner).is_ok() && self.flush_refcounts(&mut inner).is_ok() && self.sync().is_ok() && inner.marked_dirty {
            let f = inner.header.incompatible_features & !INCOMPAT_DIRTY;
            let _ = self.write_incompatible(&mut inner, f);
        }
    }
}

/// Compresses one cluster the way QEMU reads it back: raw deflate with a
/// 4 KiB window (QEMU inflates with 12 window bits), or a zstd frame.
fn compress(c: Compression, data: &[u8]) -> std::io::Result<Vec<u8>> {
    match c {
        Compression::Zlib => {
            let mut z = flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(data.len() + 1024);
            loop {
                let used = z.total_in() as usize;
                let status = z.compress_vec(&data[used..], &mut out, flate2::FlushCompress::Finish).map_err(std::io::Error::other)?;
                if status == flate2::Status::StreamEnd {
                    return Ok(out);
                }
                out.reserve(out.capacity().max(4096));
            }
        }
        Compression::Zstd => zstd::bulk::compress(data, 0),
    }
}

/// Reads `n` big-endian u64 entries at `offset`.
pub(crate) fn read_table(f: &dyn ImageFile, offset: u64, n: usize) -> std::io::Result<Vec<u64>> {
    let mut b = vec![0u8; n * 8];
    f.read_exact_at(&mut b, offset)?;
    Ok(b.chunks_exact(8).map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])).collect())
}

/// Writes big-endian u64 entries at `offset`.
pub(crate) fn write_table(f: &dyn ImageFile, offset: u64, table: &[u64]) -> std::io::Result<()> {
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
    f.write_all_at(&bytes, offset)
}

/// Reads as much as the file has at `offset`; returns the count (short at EOF).
pub(crate) fn read_full(f: &dyn ImageFile, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads from a backing image, which may be smaller than this one: beyond its end reads as zeros.
fn read_backing(b: &dyn BlockBackend, buf: &mut [u8], offset: u64) -> Result<()> {
    let size = b.size();
    if offset >= size {
        buf.fill(0);
        return Ok(());
    }
    let n = (size - offset).min(buf.len() as u64) as usize;
    b.read_at(&mut buf[..n], offset)?;
    buf[n..].fill(0);
    Ok(())
}

impl BlockBackend for Qcow2Image {
    fn size(&self) -> u64 {
        self.lock().header.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cs = self.cluster_size();
        let mut inner = self.lock();
        check_range(inner.header.size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let mut n = ((cs - pos % cs) as usize).min(buf.len() - done);
            if let Mapping::Data { host, .. } = self.mapping(&mut inner, pos / cs)? {
                // Extend over following clusters stored right after this one,
                // so a contiguous run costs one pread.
                let start = host + pos % cs;
                while done + n < buf.len() {
                    let next = offset + (done + n) as u64;
                    match self.mapping(&mut inner, next / cs)? {
                        Mapping::Data { host: h, .. } if h == start + n as u64 => {
                            n += (cs as usize).min(buf.len() - done - n);
                        }
                        _ => break,
                    }
                }
                let got = read_full(self.data_io()?, &mut buf[done..done + n], start).map_err(|e| self.io(e))?;
                buf[done + got..done + n].fill(0);
            } else {
                self.read_in_cluster(&mut inner, pos, &mut buf[done..done + n])?;
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        let cs = self.cluster_size();
        {
            let mut inner = self.lock();
            check_range(inner.header.size, offset, buf.len() as u64)?;
            inner.bitmaps.mark(offset, buf.len() as u64);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let whole = (buf.len() - done) as u64 / cs;
            if pos % cs == 0 && whole >= 2 {
                let n = self.write_fresh_run(pos, &buf[done..done + (whole * cs) as usize])?;
                if n > 0 {
                    done += (n * cs) as usize;
                    continue;
                }
            }
            let n = ((cs - pos % cs) as usize).min(buf.len() - done);
            let mut inner = self.lock();
            self.mark_dirty(&mut inner)?;
            self.write_in_cluster(&mut inner, pos, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut inner = self.lock();
        self.commit(&mut inner)
    }

    fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.zero_range(offset, length, true)
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.zero_range(offset, length, false)
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        for e in self.host_map(offset, length)? {
            let kind = match e.stored {
                Stored::Unallocated | Stored::Reserved { .. } if self.backing_name.is_some() => ExtentKind::Backing,
                Stored::Unallocated | Stored::Reserved { .. } | Stored::Zero { .. } => ExtentKind::Zero,
                Stored::Data { .. } => ExtentKind::Data,
            };
            push_extent(&mut out, Extent { offset: e.offset, length: e.length, kind });
        }
        Ok(out)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn damage(&self) -> Vec<String> {
        self.damage_found()
    }
    fn create_snapshot(&self, name: &str) -> Result<()> {
        Qcow2Image::create_snapshot(self, name)
    }
    fn delete_snapshot(&self, name: &str) -> Result<()> {
        match self.snapshots().into_iter().find(|s| s.name == name) {
            Some(s) => Qcow2Image::delete_snapshot(self, &s.id),
            None => Err(crate::Error::Request(format!("no snapshot named '{name}'"))),
        }
    }
    fn has_snapshot(&self, name: &str) -> bool {
        self.snapshots().iter().any(|s| s.name == name)
    }
}

mod subcluster;
use subcluster::put_l2_entry;

#[cfg(test)]
mod tests;
