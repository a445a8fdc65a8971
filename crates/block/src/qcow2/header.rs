//! The qcow2 header and the rest of its first cluster: header extensions
//! (the backing file's format among them) and the backing file name, and
//! the rules for following that name.

use std::path::{Path, PathBuf};

use super::*;
use crate::file::{open_checked, Kind};
use crate::{io_err, BackingPolicy, Error, Format, ImageFile, Result};

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

pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3], b[o + 4], b[o + 5], b[o + 6], b[o + 7]])
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
        if h.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 && h.cluster_bits < 14 {
            return Err(corrupt("extended L2 entries need clusters of at least 16 KiB".into()));
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

    /// What is wrong with where the header puts the refcount table, if
    /// anything: reads do not need it, and `check -r all` rebuilds it.
    pub fn refcount_table_problem(&self, file_len: u64) -> Option<String> {
        let cs = self.cluster_size();
        let rt_len = u64::from(self.refcount_table_clusters) * cs;
        if rt_len > MAX_REFTABLE_BYTES {
            return Some(format!("refcount table of {} clusters is too large", self.refcount_table_clusters));
        }
        if rt_len == 0 {
            return Some("no refcount table".into());
        }
        let off = self.refcount_table_offset;
        if off % cs != 0 || off < cs || off.checked_add(rt_len).is_none_or(|end| end > file_len) {
            return Some(format!("refcount table at {off:#x} (+{rt_len}) is misaligned, overlaps the header or is past the end of the file"));
        }
        None
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

/// Serialises the header cluster: header, backing-format extension, kept
/// extensions, end marker, backing file name. Updates `h`'s backing fields.
pub(crate) fn build_header_cluster(h: &mut Header, backing: Option<(&str, Option<Format>)>, extensions: &[(u32, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut out = h.to_bytes();
    let ext = |out: &mut Vec<u8>, typ: u32, data: &[u8]| {
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(8), 0);
    };
    if h.version >= 3 || backing.is_some() {
        if let Some((_, Some(fmt))) = backing {
            ext(&mut out, EXT_BACKING_FORMAT, fmt.name().as_bytes());
        }
        if h.version >= 3 {
            for (typ, data) in extensions {
                ext(&mut out, *typ, data);
            }
        }
        out.extend_from_slice(&[0u8; 8]);
    }
    match backing {
        Some((name, _)) => {
            if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
                return Err(Error::Request("backing file name must be 1 to 1023 bytes".into()));
            }
            h.backing_file_offset = out.len() as u64;
            h.backing_file_size = name.len() as u32;
            out.extend_from_slice(name.as_bytes());
        }
        None => {
            h.backing_file_offset = 0;
            h.backing_file_size = 0;
        }
    }
    let hb = h.to_bytes();
    out[..hb.len()].copy_from_slice(&hb);
    Ok(out)
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

/// What the header cluster holds besides the header.
pub(crate) struct HeaderCluster {
    pub(crate) backing_name: Option<String>,
    pub(crate) backing_format: Option<Format>,
    /// A recorded backing format rvirt does not read (kept in `extensions`
    /// as it is, so rewriting the header keeps it).
    pub(crate) backing_format_unknown: Option<String>,
    pub(crate) extensions: Vec<(u32, Vec<u8>)>,
}

/// Parses the header extensions and the backing file name of a header
/// cluster `hc` whose header is `header`.
pub(crate) fn parse_header_cluster(hc: &[u8], header: &Header, name: &str) -> Result<HeaderCluster> {
    let corrupt = |d: &str| Error::Corrupt { path: name.into(), detail: d.into() };
    let mut backing_format = None;
    let mut backing_format_unknown = None;
    let mut extensions = Vec::new();
    let mut off = header.header_length as usize;
    loop {
        if off + 8 > hc.len() {
            break;
        }
        let (typ, len) = (be32(hc, off), be32(hc, off + 4) as usize);
        if typ == EXT_END {
            break;
        }
        let data_end = off + 8 + len;
        if data_end > hc.len() {
            return Err(corrupt("header extension runs past the header cluster"));
        }
        if typ == EXT_BACKING_FORMAT {
            let fmt = String::from_utf8_lossy(&hc[off + 8..data_end]).into_owned();
            match Format::parse(&fmt) {
                Ok(f) => backing_format = Some(f),
                Err(_) => {
                    // Opening the backing file will refuse it; the header itself reads on (info).
                    backing_format_unknown = Some(fmt);
                    extensions.push((typ, hc[off + 8..data_end].to_vec()));
                }
            }
        } else {
            extensions.push((typ, hc[off + 8..data_end].to_vec()));
        }
        off = data_end.next_multiple_of(8);
    }
    let mut backing_name = None;
    if header.backing_file_offset != 0 {
        let s = header.backing_file_offset as usize;
        let raw = hc.get(s..s + header.backing_file_size as usize).ok_or_else(|| corrupt("backing file name is outside the header cluster"))?;
        let bname = String::from_utf8_lossy(raw).into_owned();
        if bname.starts_with("json:") {
            // A json: name can point anywhere (another driver, a host file
            // by any name); QEMU's users give those on command lines only.
            return Err(Error::Unsupported {
                path: name.into(),
                detail: "the backing file name is a json: pseudo-name; those are accepted on the command line only".into(),
            });
        }
        backing_name = Some(bname);
    }
    Ok(HeaderCluster { backing_name, backing_format, backing_format_unknown, extensions })
}

/// The backing file name and recorded backing format of the qcow2 image at
/// `path`, read from its header alone (no lock, no I/O beyond the header).
pub fn read_backing_name(path: &Path) -> Result<Option<(String, Option<Format>)>> {
    let file = open_checked(path, false, Kind::Regular, 0).map_err(|e| io_err(path, e))?;
    let (_, _, hc) = read_header(&file, path)?;
    if let (Some(_), Some(f)) = (&hc.backing_name, &hc.backing_format_unknown) {
        return Err(Error::Unsupported { path: path.display().to_string(), detail: format!("backing format '{f}'") });
    }
    Ok(hc.backing_name.map(|n| (n, hc.backing_format)))
}

/// Reads and validates the header and the rest of the header cluster of
/// the image in `file` (named `path` in errors); also returns the file's length.
pub(crate) fn read_header(file: &dyn ImageFile, path: &Path) -> Result<(u64, Header, HeaderCluster)> {
    let name = path.display().to_string();
    let file_len = file.len().map_err(|e| io_err(path, e))?;
    let mut head = vec![0u8; 4096.min(file_len as usize).max(V2_HEADER_LEN as usize)];
    let n = read_full(file, &mut head, 0).map_err(|e| io_err(path, e))?;
    head.truncate(n);
    let header = Header::parse(&head, file_len, &name)?;
    // Re-read the whole header cluster for extensions and the backing name.
    let mut hc = vec![0u8; header.cluster_size().min(file_len) as usize];
    read_full(file, &mut hc, 0).map_err(|e| io_err(path, e))?;
    let hc = parse_header_cluster(&hc, &header, &name)?;
    Ok((file_len, header, hc))
}

/// The format of the backing file `bname` (at `bpath`) of the image at
/// `image`: the recorded one, or, only when `policy` opts in, a probe.
pub(crate) fn backing_format_for(image: &Path, bname: &str, bpath: &Path, recorded: Option<Format>, policy: &BackingPolicy) -> Result<Format> {
    match (recorded, policy) {
        (Some(f), _) => Ok(f),
        (None, BackingPolicy::Probe) => crate::probe_format(bpath).map_err(|e| backing_err(image, e)),
        (None, _) => Err(Error::Unsupported {
            path: image.display().to_string(),
            detail: format!(
                "the image does not record the format of its backing file '{bname}', and formats of backing files are not guessed \
                 (a guest could have written what a probe would read); record it with `rvirt-img rebase -u -b '{bname}' -F raw|qcow2`"
            ),
        }),
    }
}

/// An error opening the backing file of `image`.
pub(crate) fn backing_err(image: &Path, e: Error) -> Error {
    Error::Corrupt { path: image.display().to_string(), detail: format!("backing file: {e}") }
}

