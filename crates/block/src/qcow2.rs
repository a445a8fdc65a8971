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
//! backing chains of any depth. Writes allocate and copy-on-write; internal
//! snapshots, compressed writes and resizing are not implemented yet.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::{check_range, io_err, push_extent, BlockBackend, Error, Extent, ExtentKind, Format, Result};

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
/// Deepest backing chain followed.
pub const MAX_CHAIN_DEPTH: usize = 64;

const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

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

/// The fields of a qcow2 header this library uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is stored (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// Encryption method (0: none; anything else is refused).
    pub crypt_method: u32,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Where the L1 table is.
    pub l1_table_offset: u64,
    /// Where the refcount table is.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Where the snapshot table is.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Auto-clear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes.
    pub header_length: u32,
    /// Compressed-cluster algorithm.
    pub compression: Compression,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn be64(b: &[u8], o: usize) -> u64 {
    (u64::from(be32(b, o)) << 32) | u64::from(be32(b, o + 4))
}

impl Header {
    /// Parses and validates a header against a file of `file_len` bytes.
    /// `name` is used in error messages.
    pub fn parse(b: &[u8], file_len: u64, name: &str) -> Result<Self> {
        let corrupt = |d: String| Error::Corrupt { path: name.into(), detail: d };
        let unsupported = |d: String| Error::Unsupported { path: name.into(), detail: d };
        if b.len() < V2_HEADER_LEN as usize || b[..4] != MAGIC {
            return Err(corrupt("not a qcow2 image (bad magic or truncated header)".into()));
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!("qcow2 version {version}")));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(b, 8),
            backing_file_size: be32(b, 16),
            cluster_bits: be32(b, 20),
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: Compression::Zlib,
        };
        if version == 3 {
            if b.len() < V3_HEADER_LEN as usize {
                return Err(corrupt("truncated version 3 header".into()));
            }
            h.incompatible_features = be64(b, 72);
            h.compatible_features = be64(b, 80);
            h.autoclear_features = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < V3_HEADER_LEN || h.header_length as usize > b.len() {
                return Err(corrupt(format!("header length {} is invalid", h.header_length)));
            }
            if h.incompatible_features & INCOMPAT_COMPRESSION != 0 {
                if h.header_length <= V3_HEADER_LEN {
                    return Err(corrupt("compression-type feature set but no compression type field".into()));
                }
                h.compression = match b[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    t => return Err(unsupported(format!("compression type {t}"))),
                };
            }
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(corrupt(format!("cluster bits {} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}", h.cluster_bits)));
        }
        if h.crypt_method != 0 {
            return Err(unsupported("encrypted images".into()));
        }
        if h.refcount_order > 6 {
            return Err(corrupt(format!("refcount order {} is over 6", h.refcount_order)));
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_EXTERNAL_DATA | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2;
        if h.incompatible_features & !known != 0 {
            return Err(unsupported(format!("unknown incompatible features {:#x}", h.incompatible_features & !known)));
        }
        if h.incompatible_features & INCOMPAT_EXTERNAL_DATA != 0 {
            return Err(unsupported("external data files".into()));
        }
        if h.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(unsupported("extended L2 entries (subclusters)".into()));
        }
        let cs = 1u64 << h.cluster_bits;
        // The L1 table must cover the virtual size, within QEMU's limits.
        let l2_entries = cs / 8;
        let needed_l1 = h.size.div_ceil(cs * l2_entries);
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES || needed_l1 * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!("virtual size {} needs an L1 table over 32 MiB", h.size)));
        }
        if u64::from(h.l1_size) < needed_l1 {
            return Err(corrupt(format!("L1 table has {} entries; {needed_l1} are needed for the virtual size", h.l1_size)));
        }
        let table_ok = |off: u64, len: u64, what: &str| -> Result<()> {
            if off % cs != 0 {
                return Err(corrupt(format!("{what} at {off:#x} is not cluster aligned")));
            }
            if len > 0 && off < cs {
                return Err(corrupt(format!("{what} at {off:#x} overlaps the header")));
            }
            match off.checked_add(len) {
                Some(end) if end <= file_len => Ok(()),
                _ => Err(corrupt(format!("{what} at {off:#x} (+{len}) is past the end of the file ({file_len} bytes)"))),
            }
        };
        table_ok(h.l1_table_offset, u64::from(h.l1_size) * 8, "L1 table")?;
        let rt_len = u64::from(h.refcount_table_clusters) * cs;
        if rt_len > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!("refcount table of {} clusters is too large", h.refcount_table_clusters)));
        }
        if rt_len == 0 {
            return Err(corrupt("no refcount table".into()));
        }
        table_ok(h.refcount_table_offset, rt_len, "refcount table")?;
        if h.backing_file_offset != 0 {
            if h.backing_file_size == 0 || h.backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt(format!("backing file name length {} is invalid", h.backing_file_size)));
            }
            let end = h.backing_file_offset.checked_add(u64::from(h.backing_file_size));
            if end.is_none_or(|e| e > cs.min(file_len)) {
                return Err(corrupt("backing file name is outside the header cluster".into()));
            }
        }
        Ok(h)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Serialises the header (v2: 72 bytes; v3: `header_length` bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.header_length as usize);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        b.extend_from_slice(&self.backing_file_size.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible_features.to_be_bytes());
            b.extend_from_slice(&self.compatible_features.to_be_bytes());
            b.extend_from_slice(&self.autoclear_features.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > V3_HEADER_LEN {
                b.push(match self.compression {
                    Compression::Zlib => 0,
                    Compression::Zstd => 1,
                });
            }
            b.resize(self.header_length as usize, 0);
        }
        b
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
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self { cluster_bits: 16, version: 3, backing: None }
    }
}

struct Inner {
    file: File,
    l1: Vec<u64>,
    l2_cache: HashMap<u64, Vec<u64>>,
    l2_lru: Vec<u64>,
    refcount_table: Vec<u64>,
    next_free: u64,
    file_len: u64,
}

/// An open qcow2 image.
pub struct Qcow2Image {
    path: PathBuf,
    name: String,
    header: Header,
    backing: Option<Box<dyn BlockBackend>>,
    backing_name: Option<String>,
    backing_format: Option<Format>,
    read_only: bool,
    inner: Mutex<Inner>,
}

/// What one guest cluster maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mapping {
    /// Not allocated here (reads from backing, or zeros).
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster or 0.
    Zero { host: u64 },
    /// Data at `host` (cluster aligned); `copied` means refcount is exactly 1.
    Data { host: u64, copied: bool },
    /// Compressed: `offset` and compressed length in the file.
    Compressed { offset: u64, len: u64 },
}

impl Qcow2Image {
    /// Opens `path`; `read_only` opens the file (and its backing chain) O_RDONLY.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_in_chain(path, read_only, &mut HashSet::new())
    }

    fn open_in_chain(path: &Path, read_only: bool, chain: &mut HashSet<PathBuf>) -> Result<Self> {
        let name = path.display().to_string();
        let canonical = std::fs::canonicalize(path).map_err(|e| io_err(path, e))?;
        if !chain.insert(canonical) {
            return Err(Error::Corrupt { path: name, detail: "backing chain loops back to this image".into() });
        }
        if chain.len() > MAX_CHAIN_DEPTH {
            return Err(Error::Unsupported { path: name, detail: format!("backing chain deeper than {MAX_CHAIN_DEPTH}") });
        }
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(|e| io_err(path, e))?;
        let file_len = file.metadata().map_err(|e| io_err(path, e))?.len();
        let mut head = vec![0u8; 4096.min(file_len as usize).max(V2_HEADER_LEN as usize)];
        let n = read_full(&file, &mut head, 0).map_err(|e| io_err(path, e))?;
        head.truncate(n);
        let header = Header::parse(&head, file_len, &name)?;
        let cs = header.cluster_size();
        // Re-read the whole header cluster for extensions and the backing name.
        let mut hc = vec![0u8; cs.min(file_len) as usize];
        read_full(&file, &mut hc, 0).map_err(|e| io_err(path, e))?;
        let corrupt = |d: &str| Error::Corrupt { path: name.clone(), detail: d.into() };
        if !read_only && header.incompatible_features & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt("image is marked corrupt; open it read-only or repair it"));
        }
        if !read_only && header.incompatible_features & INCOMPAT_DIRTY != 0 {
            return Err(Error::Unsupported { path: name, detail: "image is dirty (lazy refcounts); repair it with qemu-img check -r all first".into() });
        }
        if header.nb_snapshots > 0 && !read_only {
            return Err(Error::Unsupported { path: name, detail: "writing images with internal snapshots".into() });
        }
        let mut backing_format = None;
        let mut off = header.header_length as usize;
        loop {
            if off + 8 > hc.len() {
                break;
            }
            let (typ, len) = (be32(&hc, off), be32(&hc, off + 4) as usize);
            if typ == EXT_END {
                break;
            }
            let data_end = off + 8 + len;
            if data_end > hc.len() {
                return Err(corrupt("header extension runs past the header cluster"));
            }
            if typ == EXT_BACKING_FORMAT {
                let fmt = String::from_utf8_lossy(&hc[off + 8..data_end]).into_owned();
                backing_format = Some(Format::parse(&fmt).map_err(|_| Error::Unsupported { path: name.clone(), detail: format!("backing format '{fmt}'") })?);
            }
            off = data_end.next_multiple_of(8);
        }
        let mut backing_name = None;
        let mut backing: Option<Box<dyn BlockBackend>> = None;
        if header.backing_file_offset != 0 {
            let s = header.backing_file_offset as usize;
            let raw = &hc[s..s + header.backing_file_size as usize];
            let bname = String::from_utf8_lossy(raw).into_owned();
            let bpath = resolve_backing(path, &bname);
            let fmt = match backing_format {
                Some(f) => f,
                None => crate::probe_format(&bpath).map_err(|e| corrupt(&format!("backing file {bname}: {e}")))?,
            };
            let b: Box<dyn BlockBackend> = match fmt {
                Format::Raw => Box::new(crate::RawImage::open(&bpath, true).map_err(|e| corrupt(&format!("backing file: {e}")))?),
                Format::Qcow2 => Box::new(Self::open_in_chain(&bpath, true, chain)?),
            };
            backing = Some(b);
            backing_name = Some(bname);
        }
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        file.read_exact_at(&mut l1_bytes, header.l1_table_offset).map_err(|e| io_err(path, e))?;
        let l1: Vec<u64> = l1_bytes.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let mut rt_bytes = vec![0u8; (u64::from(header.refcount_table_clusters) * cs) as usize];
        file.read_exact_at(&mut rt_bytes, header.refcount_table_offset).map_err(|e| io_err(path, e))?;
        let refcount_table: Vec<u64> = rt_bytes.chunks_exact(8).map(|c| be64(c, 0) & REFT_OFFSET_MASK).collect();
        for (i, &rb) in refcount_table.iter().enumerate() {
            if rb != 0 && (rb % cs != 0 || rb < cs || rb + cs > file_len) {
                return Err(corrupt(&format!("refcount block {i} at {rb:#x} is outside the file or misaligned")));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            name,
            backing,
            backing_name,
            backing_format,
            read_only,
            inner: Mutex::new(Inner {
                file,
                l1,
                l2_cache: HashMap::new(),
                l2_lru: Vec::new(),
                refcount_table,
                next_free: file_len.next_multiple_of(cs),
                file_len,
            }),
            header,
        })
    }

    /// Creates a new, empty image of `size` bytes.
    pub fn create(path: &Path, size: u64, opts: &CreateOptions) -> Result<Self> {
        let name = path.display().to_string();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&opts.cluster_bits) {
            return Err(Error::Request(format!(
                "cluster size must be a power of two between {} and {} bytes",
                1 << MIN_CLUSTER_BITS,
                1 << MAX_CLUSTER_BITS
            )));
        }
        if opts.version != 2 && opts.version != 3 {
            return Err(Error::Request(format!("qcow2 version {} (compat) is not 2 or 3", opts.version)));
        }
        let cs = 1u64 << opts.cluster_bits;
        let l1_size = size.div_ceil(cs * (cs / 8));
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(Error::Request(format!("size {size} is too large for {cs}-byte clusters")));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
        let header_length = if opts.version == 3 { V3_HEADER_LEN } else { V2_HEADER_LEN };
        let mut h = Header {
            version: opts.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: opts.cluster_bits,
            size,
            crypt_method: 0,
            l1_size: l1_size as u32,
            l1_table_offset: 3 * cs,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length,
            compression: Compression::Zlib,
        };
        let mut cluster0 = h.to_bytes();
        if let Some((bname, bfmt)) = &opts.backing {
            if bname.is_empty() || bname.len() > MAX_BACKING_NAME as usize {
                return Err(Error::Request("backing file name must be 1 to 1023 bytes".into()));
            }
            let fmt = bfmt.name().as_bytes();
            cluster0.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
            cluster0.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
            cluster0.extend_from_slice(fmt);
            cluster0.resize(cluster0.len().next_multiple_of(8), 0);
            cluster0.extend_from_slice(&[0u8; 8]); // end of extensions
            h.backing_file_offset = cluster0.len() as u64;
            h.backing_file_size = bname.len() as u32;
            cluster0.extend_from_slice(bname.as_bytes());
            if cluster0.len() as u64 > cs {
                return Err(Error::Request("backing file name does not fit in the header cluster".into()));
            }
            let hb = h.to_bytes();
            cluster0[..hb.len()].copy_from_slice(&hb);
        } else {
            cluster0.extend_from_slice(&[0u8; 8]);
        }
        // Header, refcount table, refcount block, L1: all counted by the one
        // refcount block (16-bit entries). Refuse before touching the file.
        let total_clusters = 3 + l1_clusters;
        if total_clusters > cs / 2 {
            return Err(Error::Request("image metadata does not fit one refcount block; use larger clusters".into()));
        }
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(|e| io_err(path, e))?;
        let io = |e| Error::Io { path: name.clone(), source: e };
        file.set_len(total_clusters * cs).map_err(io)?;
        file.write_all_at(&cluster0, 0).map_err(io)?;
        // Refcount table -> the one refcount block in cluster 2.
        file.write_all_at(&(2 * cs).to_be_bytes(), cs).map_err(io)?;
        let mut block = Vec::with_capacity(total_clusters as usize * 2);
        for _ in 0..total_clusters {
            block.extend_from_slice(&1u16.to_be_bytes());
        }
        file.write_all_at(&block, 2 * cs).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        Self::open(path, false)
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The backing file name as stored in the image.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_name.as_deref()
    }

    /// The backing file's format as recorded in the image.
    pub fn backing_format(&self) -> Option<Format> {
        self.backing_format
    }

    /// The image file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn corrupt(&self, detail: String) -> Error {
        Error::Corrupt { path: self.name.clone(), detail }
    }

    fn io(&self, e: std::io::Error) -> Error {
        io_err(&self.path, e)
    }

    fn l2_entries(&self) -> u64 {
        self.header.cluster_size() / 8
    }

    /// Loads (through the cache) the L2 table at `off`.
    fn l2_table<'a>(&self, inner: &'a mut Inner, off: u64) -> Result<&'a mut Vec<u64>> {
        let cs = self.header.cluster_size();
        if !inner.l2_cache.contains_key(&off) {
            if off % cs != 0 || off < cs || off + cs > inner.file_len.max(inner.next_free) {
                return Err(self.corrupt(format!("L2 table offset {off:#x} is misaligned, in the header or past the end")));
            }
            let mut b = vec![0u8; cs as usize];
            inner.file.read_exact_at(&mut b, off).map_err(|e| self.io(e))?;
            if inner.l2_cache.len() >= L2_CACHE_TABLES {
                let victim = inner.l2_lru.remove(0);
                inner.l2_cache.remove(&victim);
            }
            inner.l2_cache.insert(off, b.chunks_exact(8).map(|c| be64(c, 0)).collect());
            inner.l2_lru.push(off);
        } else if let Some(pos) = inner.l2_lru.iter().position(|&o| o == off) {
            let o = inner.l2_lru.remove(pos);
            inner.l2_lru.push(o);
        }
        inner.l2_cache.get_mut(&off).ok_or_else(|| self.corrupt("L2 cache".into()))
    }

    fn mapping(&self, inner: &mut Inner, guest_cluster: u64) -> Result<Mapping> {
        let l1_idx = (guest_cluster / self.l2_entries()) as usize;
        let l2_idx = (guest_cluster % self.l2_entries()) as usize;
        let l1e = *inner.l1.get(l1_idx).ok_or_else(|| self.corrupt(format!("guest cluster {guest_cluster} is beyond the L1 table")))?;
        let l2_off = l1e & L1_OFFSET_MASK;
        if l2_off == 0 {
            return Ok(Mapping::Unallocated);
        }
        let e = self.l2_table(inner, l2_off)?[l2_idx];
        self.decode_l2(e, inner.file_len.max(inner.next_free))
    }

    fn decode_l2(&self, e: u64, file_len: u64) -> Result<Mapping> {
        let cs = self.header.cluster_size();
        if e & COMPRESSED != 0 {
            let x = 62 - (self.header.cluster_bits - 8);
            let offset = e & ((1u64 << x) - 1);
            let sectors = ((e & !COMPRESSED & !COPIED) >> x) + 1;
            let len = sectors * 512 - (offset & 511);
            if offset < cs || offset >= file_len {
                return Err(self.corrupt(format!("compressed cluster at {offset:#x} is in the header or past the end")));
            }
            return Ok(Mapping::Compressed { offset, len: len.min(file_len - offset) });
        }
        let host = e & L2_OFFSET_MASK;
        if host != 0 && (host % cs != 0 || host < cs || host >= file_len) {
            return Err(self.corrupt(format!("data cluster offset {host:#x} is misaligned, in the header or past the end")));
        }
        if self.header.version >= 3 && e & ZERO != 0 {
            return Ok(Mapping::Zero { host });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data { host, copied: e & COPIED != 0 })
    }

    fn decompress(&self, inner: &Inner, offset: u64, len: u64, out: &mut [u8]) -> Result<()> {
        let mut comp = vec![0u8; len as usize];
        let n = read_full(&inner.file, &mut comp, offset).map_err(|e| self.io(e))?;
        comp.truncate(n);
        let bad = |what: &str| self.corrupt(format!("compressed cluster at {offset:#x}: {what}"));
        match self.header.compression {
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
        let cs = self.header.cluster_size();
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
                let n = read_full(&inner.file, buf, host + in_cluster).map_err(|e| self.io(e))?;
                buf[n..].fill(0);
                Ok(())
            }
            Mapping::Compressed { offset: coff, len } => {
                let mut whole = vec![0u8; cs as usize];
                self.decompress(inner, coff, len, &mut whole)?;
                buf.copy_from_slice(&whole[in_cluster as usize..in_cluster as usize + buf.len()]);
                Ok(())
            }
        }
    }

    fn refcount_geometry(&self, host: u64) -> (usize, u64) {
        let cluster = host >> self.header.cluster_bits;
        let per_block = self.header.cluster_size() * 8 / u64::from(self.header.refcount_bits());
        ((cluster / per_block) as usize, cluster % per_block)
    }

    /// Writes the refcount of the cluster at `host`, creating its refcount block if needed.
    fn set_refcount(&self, inner: &mut Inner, host: u64, value: u64) -> Result<()> {
        let cs = self.header.cluster_size();
        let bits = u64::from(self.header.refcount_bits());
        if bits < 64 && value >= 1 << bits {
            return Err(self.corrupt(format!("refcount of cluster {host:#x} would overflow {bits} bits")));
        }
        let (rt_idx, idx) = self.refcount_geometry(host);
        if rt_idx >= inner.refcount_table.len() {
            return Err(Error::Unsupported { path: self.name.clone(), detail: "growing the refcount table (image over its addressable size)".into() });
        }
        let mut block = inner.refcount_table[rt_idx];
        if block == 0 {
            // A new refcount block at the end of the file. If it counts its
            // own cluster, its refcount is written with it; the table entry
            // goes last, so a crash only leaks the block.
            block = inner.next_free;
            inner.next_free += cs;
            let mut b = vec![0u8; cs as usize];
            let (own_rt, own_idx) = self.refcount_geometry(block);
            if own_rt == rt_idx {
                put_refcount(&mut b, own_idx, bits, 1);
            }
            inner.file.write_all_at(&b, block).map_err(|e| self.io(e))?;
            inner.file_len = inner.file_len.max(block + cs);
            inner.file.write_all_at(&block.to_be_bytes(), self.header.refcount_table_offset + rt_idx as u64 * 8).map_err(|e| self.io(e))?;
            inner.refcount_table[rt_idx] = block;
            if own_rt != rt_idx {
                self.set_refcount(inner, block, 1)?;
            }
        }
        // Read-modify-write the bytes holding this entry.
        let bit = idx * bits;
        let (byte, nbytes) = (bit / 8, bits.div_ceil(8));
        let mut cur = vec![0u8; nbytes as usize];
        inner.file.read_exact_at(&mut cur, block + byte).map_err(|e| self.io(e))?;
        let mut tmp = vec![0u8; cs as usize];
        tmp[byte as usize..(byte + nbytes) as usize].copy_from_slice(&cur);
        put_refcount(&mut tmp, idx, bits, value);
        inner.file.write_all_at(&tmp[byte as usize..(byte + nbytes) as usize], block + byte).map_err(|e| self.io(e))
    }

    fn refcount(&self, inner: &mut Inner, host: u64) -> Result<u64> {
        let bits = u64::from(self.header.refcount_bits());
        let (rt_idx, idx) = self.refcount_geometry(host);
        let block = *inner.refcount_table.get(rt_idx).unwrap_or(&0);
        if block == 0 {
            return Ok(0);
        }
        let bit = idx * bits;
        let (byte, nbytes) = (bit / 8, bits.div_ceil(8));
        let mut tmp = vec![0u8; (byte + nbytes) as usize];
        inner.file.read_exact_at(&mut tmp[byte as usize..], block + byte).map_err(|e| self.io(e))?;
        Ok(get_refcount(&tmp, idx, bits))
    }

    /// Takes a new cluster from the end of the file with refcount 1.
    fn alloc_cluster(&self, inner: &mut Inner) -> Result<u64> {
        let host = inner.next_free;
        inner.next_free += self.header.cluster_size();
        self.set_refcount(inner, host, 1)?;
        Ok(host)
    }

    fn release(&self, inner: &mut Inner, m: Mapping) -> Result<()> {
        let cs = self.header.cluster_size();
        let clusters: Vec<u64> = match m {
            Mapping::Data { host, .. } => vec![host],
            Mapping::Zero { host } if host != 0 => vec![host],
            Mapping::Compressed { offset, len } => {
                let first = offset / cs * cs;
                (first..offset + len).step_by(cs as usize).collect()
            }
            _ => vec![],
        };
        for c in clusters {
            let rc = self.refcount(inner, c)?;
            if rc > 0 {
                self.set_refcount(inner, c, rc - 1)?;
            }
        }
        Ok(())
    }

    /// The L2 table for `guest_cluster`, allocated (and made exclusively ours) if needed.
    fn writable_l2(&self, inner: &mut Inner, guest_cluster: u64) -> Result<u64> {
        let cs = self.header.cluster_size();
        let l1_idx = (guest_cluster / self.l2_entries()) as usize;
        let l1e = inner.l1[l1_idx];
        let old = l1e & L1_OFFSET_MASK;
        if old != 0 && l1e & COPIED != 0 {
            return Ok(old);
        }
        let new = self.alloc_cluster(inner)?;
        let table = if old != 0 { self.l2_table(inner, old)?.clone() } else { vec![0u64; self.l2_entries() as usize] };
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        inner.file.write_all_at(&bytes, new).map_err(|e| self.io(e))?;
        inner.file_len = inner.file_len.max(new + cs);
        inner.file.write_all_at(&(new | COPIED).to_be_bytes(), self.header.l1_table_offset + l1_idx as u64 * 8).map_err(|e| self.io(e))?;
        inner.l1[l1_idx] = new | COPIED;
        inner.l2_cache.insert(new, table);
        inner.l2_lru.push(new);
        if old != 0 {
            let rc = self.refcount(inner, old)?;
            self.set_refcount(inner, old, rc.saturating_sub(1))?;
        }
        Ok(new)
    }

    fn set_l2_entry(&self, inner: &mut Inner, l2_off: u64, guest_cluster: u64, entry: u64) -> Result<()> {
        let idx = guest_cluster % self.l2_entries();
        inner.file.write_all_at(&entry.to_be_bytes(), l2_off + idx * 8).map_err(|e| self.io(e))?;
        self.l2_table(inner, l2_off)?[idx as usize] = entry;
        Ok(())
    }

    /// Writes part of one guest cluster.
    fn write_in_cluster(&self, inner: &mut Inner, offset: u64, data: &[u8]) -> Result<()> {
        let cs = self.header.cluster_size();
        let gc = offset / cs;
        let in_cluster = offset % cs;
        let current = self.mapping(inner, gc)?;
        if let Mapping::Data { host, copied: true } = current {
            return inner.file.write_all_at(data, host + in_cluster).map_err(|e| self.io(e));
        }
        // Copy-on-write: build the whole new cluster from what reads see now.
        let mut cluster = vec![0u8; cs as usize];
        if data.len() as u64 != cs {
            self.read_in_cluster(inner, gc * cs, &mut cluster)?;
        }
        cluster[in_cluster as usize..in_cluster as usize + data.len()].copy_from_slice(data);
        let l2_off = self.writable_l2(inner, gc)?;
        let host = self.alloc_cluster(inner)?;
        inner.file.write_all_at(&cluster, host).map_err(|e| self.io(e))?;
        inner.file_len = inner.file_len.max(host + cs);
        self.set_l2_entry(inner, l2_off, gc, host | COPIED)?;
        self.release(inner, current)
    }

    /// Makes one whole guest cluster read as zeros (v3 zero flag, else
    /// unallocated when nothing shows through from a backing file).
    fn zero_cluster(&self, inner: &mut Inner, gc: u64, discard: bool) -> Result<()> {
        let current = self.mapping(inner, gc)?;
        let entry = if self.header.version >= 3 {
            if discard && self.backing.is_none() { 0 } else { ZERO }
        } else if self.backing.is_none() {
            0
        } else {
            // v2 cannot express zeros over a backing file: write them.
            let zeros = vec![0u8; self.header.cluster_size() as usize];
            return self.write_in_cluster(inner, gc * self.header.cluster_size(), &zeros);
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
        check_range(self.header.size, offset, length)?;
        let cs = self.header.cluster_size();
        let mut inner = self.lock();
        let mut pos = offset;
        let end = offset + length;
        while pos < end {
            let n = (cs - pos % cs).min(end - pos);
            if n == cs {
                self.zero_cluster(&mut inner, pos / cs, discard)?;
            } else {
                self.write_in_cluster(&mut inner, pos, &vec![0u8; n as usize])?;
            }
            pos += n;
        }
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly(self.name.clone()))
        } else {
            Ok(())
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of the file that hold data or metadata (what qemu-img calls disk size).
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.lock().file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }
}

fn put_refcount(block: &mut [u8], idx: u64, bits: u64, value: u64) {
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = idx as usize * n;
        let be = value.to_be_bytes();
        block[at..at + n].copy_from_slice(&be[8 - n..]);
    } else {
        let bit = idx * bits;
        let (byte, shift) = ((bit / 8) as usize, bit % 8);
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        block[byte] = (block[byte] & !mask) | (((value as u8) << shift) & mask);
    }
}

fn get_refcount(block: &[u8], idx: u64, bits: u64) -> u64 {
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = idx as usize * n;
        block[at..at + n].iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    } else {
        let bit = idx * bits;
        let (byte, shift) = ((bit / 8) as usize, bit % 8);
        u64::from((block[byte] >> shift) & (((1u16 << bits) - 1) as u8))
    }
}

/// Reads as much as the file has at `offset`; returns the count (short at EOF).
fn read_full(f: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
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

/// Where a backing file named `name` in `image` lives: names are relative to
/// the directory of the image that stores them.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    }
}

impl BlockBackend for Qcow2Image {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.header.size, offset, buf.len() as u64)?;
        let cs = self.header.cluster_size();
        let mut inner = self.lock();
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
                let got = read_full(&inner.file, &mut buf[done..done + n], start).map_err(|e| self.io(e))?;
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
        check_range(self.header.size, offset, buf.len() as u64)?;
        let cs = self.header.cluster_size();
        let mut inner = self.lock();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((cs - pos % cs) as usize).min(buf.len() - done);
            self.write_in_cluster(&mut inner, pos, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.lock().file.sync_data().map_err(|e| self.io(e))
    }

    fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.zero_range(offset, length, true)
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.zero_range(offset, length, false)
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        check_range(self.header.size, offset, length)?;
        let cs = self.header.cluster_size();
        let mut inner = self.lock();
        let mut out = Vec::new();
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let n = (cs - pos % cs).min(end - pos);
            let kind = match self.mapping(&mut inner, pos / cs)? {
                Mapping::Unallocated if self.backing.is_some() => ExtentKind::Backing,
                Mapping::Unallocated | Mapping::Zero { .. } => ExtentKind::Zero,
                Mapping::Data { .. } | Mapping::Compressed { .. } => ExtentKind::Data,
            };
            push_extent(&mut out, Extent { offset: pos, length: n, kind });
            pos += n;
        }
        Ok(out)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rvirt-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    #[test]
    fn header_round_trips() {
        let p = tmp("h.qcow2");
        let img = Qcow2Image::create(&p, 1 << 30, &CreateOptions::default()).unwrap();
        let h = img.header().clone();
        assert_eq!((h.version, h.cluster_bits, h.size, h.l1_size, h.refcount_order), (3, 16, 1 << 30, 2, 4));
        let bytes = h.to_bytes();
        assert_eq!(Header::parse(&bytes, 1 << 20, "x").unwrap(), h);
    }

    #[test]
    fn refcount_packing_for_every_width() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let mut block = vec![0u8; 64];
            let max = if bits == 64 { u64::MAX } else { (1 << bits) - 1 };
            for idx in 0..(64 * 8 / bits).min(20) {
                put_refcount(&mut block, idx, bits, max.min(idx + 1));
            }
            for idx in 0..(64 * 8 / bits).min(20) {
                assert_eq!(get_refcount(&block, idx, bits), max.min(idx + 1), "order {order} idx {idx}");
            }
        }
    }

    #[test]
    fn bad_headers_are_named() {
        let p = tmp("bad.qcow2");
        let img = Qcow2Image::create(&p, 1 << 20, &CreateOptions::default()).unwrap();
        let good = img.header().to_bytes();
        let len = 4 * 65536;
        let mutate = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            Header::parse(&b, len, "img").unwrap_err().to_string()
        };
        assert!(mutate(&|b| b[0] = b'X').contains("not a qcow2"));
        assert!(mutate(&|b| b[7] = 9).contains("version 9"));
        assert!(mutate(&|b| b[23] = 40).contains("cluster bits 40"));
        assert!(mutate(&|b| b[35] = 1).contains("encrypted"));
        assert!(mutate(&|b| b[24..32].copy_from_slice(&(1u64 << 62).to_be_bytes())).contains("32 MiB"));
        assert!(mutate(&|b| b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes())).contains("past the end"));
        assert!(mutate(&|b| b[40..48].copy_from_slice(&0u64.to_be_bytes())).contains("overlaps the header"));
        assert!(mutate(&|b| b[48..56].copy_from_slice(&12345u64.to_be_bytes())).contains("not cluster aligned"));
        assert!(mutate(&|b| b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes())).contains("unknown incompatible"));
        assert!(mutate(&|b| b[99] = 9).contains("refcount order 9"));
        assert!(mutate(&|b| b.truncate(50)).contains("truncated"));
        assert!(Header::parse(&good, 100, "img").unwrap_err().to_string().contains("past the end"));
    }

    #[test]
    fn write_read_and_map() {
        let p = tmp("rw.qcow2");
        let img = Qcow2Image::create(&p, 8 << 20, &CreateOptions::default()).unwrap();
        img.write_at(&[0xaa; 1000], 70_000).unwrap();
        let mut b = vec![0u8; 3000];
        img.read_at(&mut b, 69_000).unwrap();
        assert!(b[..1000].iter().all(|&x| x == 0));
        assert!(b[1000..2000].iter().all(|&x| x == 0xaa));
        assert!(b[2000..].iter().all(|&x| x == 0));
        let m = img.map(0, 8 << 20).unwrap();
        assert_eq!(m[1], Extent { offset: 65536, length: 65536, kind: ExtentKind::Data });
        img.write_zeroes(65536, 65536).unwrap();
        img.read_at(&mut b, 69_000).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        drop(img);
        let again = Qcow2Image::open(&p, true).unwrap();
        again.read_at(&mut b, 69_000).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert!(matches!(again.write_at(&[1], 0), Err(Error::ReadOnly(_))));
        let mut big = vec![0u8; 2];
        assert!(again.read_at(&mut big, (8 << 20) - 1).is_err());
    }

    #[test]
    fn refused_create_leaves_no_file() {
        // 512-byte clusters: an L1 table for 16 GiB needs 512 clusters, more
        // than one refcount block (256 entries) can count.
        let p = tmp("toobig.qcow2");
        let _ = std::fs::remove_file(&p);
        let e = Qcow2Image::create(&p, 16 << 30, &CreateOptions { cluster_bits: 9, ..Default::default() }).err().unwrap();
        assert!(e.to_string().contains("use larger clusters"), "{e}");
        assert!(!p.exists(), "a refused create must not leave a file behind");
    }

    #[test]
    fn backing_chain_loop_is_refused() {
        let a = tmp("loop-a.qcow2");
        let b = tmp("loop-b.qcow2");
        Qcow2Image::create(&a, 1 << 20, &CreateOptions { backing: Some(("loop-b.qcow2".into(), Format::Qcow2)), ..Default::default() }).err();
        Qcow2Image::create(&b, 1 << 20, &CreateOptions { backing: Some(("loop-a.qcow2".into(), Format::Qcow2)), ..Default::default() }).err();
        let e = Qcow2Image::open(&a, true).err().unwrap().to_string();
        assert!(e.contains("loops"), "{e}");
    }
}
