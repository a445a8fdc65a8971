//! The commands of `rvirt-img`, as a library: the binary only parses
//! arguments. Names, flags and JSON field names follow qemu-img so scripts
//! written for it keep working.

use std::path::{Path, PathBuf};

pub mod access;
mod amend;
mod bench;
mod bitmaps;
mod convert;
mod dd;
mod mapped;
mod ops;

pub use access::{image_arg, set_force_share, set_image_opts, set_probe_backing};
pub use amend::{amend, AMEND_HELP};
pub use bench::{bench, BenchRequest};
pub use bitmaps::{bitmap, BitmapAction, BitmapRequest};
pub use dd::{dd, DdRequest};
pub use convert::{cache_mode_flushes, convert, ConvertRequest};
pub use ops::*;

use anyhow::{bail, Context, Result};
use rvirt_block::qcow2::{resolve_backing, Compression, CreateOptions, Preallocation, Qcow2Image};
use rvirt_block::{Format, RawImage};
use serde::Serialize;

/// Parses a size the way qemu-img does: bytes, or a number with a
/// `k`/`K`, `M`, `G`, `T`, `P`, `E` suffix (binary units); fractions allowed with a suffix.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().strip_suffix(['B', 'b']).unwrap_or(unit.trim()) {
        "" => 0,
        "k" | "K" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        "P" | "p" => 50,
        "E" | "e" => 60,
        _ => bail!("invalid size '{s}': expected e.g. 10G, 512M or a byte count"),
    };
    let bad = || anyhow::anyhow!("invalid size '{s}': expected e.g. 10G, 512M or a byte count");
    let value = if num.contains('.') {
        if shift == 0 {
            return Err(bad());
        }
        let f: f64 = num.parse().map_err(|_| bad())?;
        let v = f * (1u64 << shift) as f64;
        if !(0.0..1.8e19).contains(&v) {
            return Err(bad());
        }
        v as u64
    } else {
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_mul(1u64 << shift).ok_or_else(bad)?
    };
    Ok(value)
}

/// What `create` makes.
#[derive(Clone, Debug, Default)]
pub struct CreateRequest {
    /// The new image.
    pub path: PathBuf,
    /// raw or qcow2.
    pub format: Option<String>,
    /// Virtual size; defaults to the backing file's.
    pub size: Option<u64>,
    /// Backing file (qcow2 only), as it will be stored.
    pub backing_file: Option<String>,
    /// Backing file format.
    pub backing_format: Option<String>,
    /// `-o` options (`key=value`, comma separated, possibly repeated).
    pub options: Vec<String>,
    /// `-u`: record the backing file without opening it (its format must be given; a size too).
    pub unsafe_backing: bool,
}

/// What `create -f qcow2 -o help` lists.
pub const CREATE_HELP: &str = "Supported qcow2 options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method used for image cluster compression
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  extended_l2=<bool (on/off)> - Extended L2 tables
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// `rvirt-img create`: written under a temporary name and moved into
/// place when complete.
pub fn create(req: &CreateRequest) -> Result<()> {
    let out = access::Output::new(&req.path)?;
    create_at(req, out.path())?;
    out.finish()
}

/// Creates the image `req` describes at `at` (backing names resolve next to
/// `req.path`, which is in the same directory).
pub(crate) fn create_at(req: &CreateRequest, at: &Path) -> Result<()> {
    let format = Format::parse(req.format.as_deref().unwrap_or("raw"))?;
    let mut size = req.size;
    let mut backing = req.backing_file.clone();
    let mut backing_fmt = req.backing_format.clone();
    let mut qopts = CreateOptions::default();
    let mut compression = None;
    let mut prealloc = Preallocation::Off;
    let mut refcount_bits = None;
    let (mut data_file, mut data_file_raw) = (None, false);
    for kv in req.options.iter().flat_map(|o| o.split(',')).filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').with_context(|| format!("invalid option '{kv}': expected key=value"))?;
        match (k, format) {
            ("size", _) => size = Some(parse_size(v)?),
            ("backing_file", Format::Qcow2) => backing = Some(v.to_string()),
            ("backing_fmt", Format::Qcow2) => backing_fmt = Some(v.to_string()),
            ("cluster_size", Format::Qcow2) => {
                let cs = parse_size(v)?;
                if !cs.is_power_of_two() {
                    bail!("cluster_size {cs} is not a power of two");
                }
                qopts.cluster_bits = cs.trailing_zeros();
            }
            ("compat", Format::Qcow2) => {
                qopts.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("invalid compat '{v}': expected 0.10 or 1.1"),
                }
            }
            ("compression_type", Format::Qcow2) => {
                compression = Some(match v {
                    "zlib" => Compression::Zlib,
                    "zstd" => Compression::Zstd,
                    _ => bail!("invalid compression_type '{v}': expected zlib or zstd"),
                })
            }
            ("preallocation", _) => prealloc = Preallocation::parse(v)?,
            ("lazy_refcounts", Format::Qcow2) => {
                qopts.lazy_refcounts = match v {
                    "on" => true,
                    "off" => false,
                    _ => bail!("invalid lazy_refcounts '{v}': expected on or off"),
                }
            }
            ("refcount_bits", Format::Qcow2) => {
                refcount_bits = Some(v.parse::<u32>().ok().filter(|b| b.is_power_of_two() && *b <= 64).with_context(|| {
                    format!("Refcount width must be a power of two and may not exceed 64 bits (got '{v}')")
                })?)
            }
            ("extended_l2", Format::Qcow2) => {
                qopts.extended_l2 = match v {
                    "on" => true,
                    "off" => false,
                    _ => bail!("invalid extended_l2 '{v}': expected on or off"),
                }
            }
            ("data_file", Format::Qcow2) => data_file = Some(v.to_string()),
            ("data_file_raw", Format::Qcow2) => {
                data_file_raw = match v {
                    "on" => true,
                    "off" => false,
                    _ => bail!("invalid data_file_raw '{v}': expected on or off"),
                }
            }
            _ => bail!("option '{k}' is not supported for format {}", format.name()),
        }
    }
    if let Some(c) = compression {
        qopts.compression = c;
    }
    if data_file_raw && data_file.is_none() {
        bail!("data-file-raw requires data-file");
    }
    qopts.data_file = data_file.map(|n| (n, data_file_raw));
    qopts.preallocation = prealloc;
    if backing.is_some() && format != Format::Qcow2 {
        bail!("backing files need format qcow2");
    }
    if let Some(b) = &backing {
        let bpath = resolve_backing(&req.path, b);
        if bpath.to_str().is_some_and(|p| p.starts_with("json:")) {
            bail!("a json: name cannot be stored as a backing file name");
        }
        access::refuse_overlap(&req.path, &[bpath.clone()], "new image")?;
        let bfmt = if req.unsafe_backing {
            // -u: nothing is opened, so nothing is probed.
            Format::parse(backing_fmt.as_deref().context("-u needs the backing file's format (-F)")?)?
        } else {
            access::format_of(&bpath, backing_fmt.as_deref()).with_context(|| format!("backing file {b}"))?
        };
        if !req.unsafe_backing {
            let bimg = access::open(&bpath, bfmt, true).with_context(|| format!("backing file {b}"))?;
            if size.is_none() {
                size = Some(bimg.size());
            }
        }
        qopts.backing = Some((b.clone(), bfmt));
    }
    // Rounded up to whole 512-byte sectors, as qemu-img does (a qcow2 size
    // that is not would read back rounded down, smaller than asked).
    let size = size.context("Image creation needs a size parameter (e.g. 10G)")?;
    let size = size.checked_next_multiple_of(512).context("the size is too large")?;
    match format {
        Format::Raw => {
            let img = RawImage::create(at, size)?;
            match prealloc {
                Preallocation::Off => {}
                Preallocation::Metadata => bail!("preallocation=metadata is for qcow2; raw takes off, falloc or full"),
                Preallocation::Falloc => img.preallocate(false)?,
                Preallocation::Full => img.preallocate(true)?,
            }
        }
        Format::Qcow2 => {
            if refcount_bits.is_some_and(|b| b != 16) && qopts.version < 3 {
                bail!("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)");
            }
            let img = if req.unsafe_backing && qopts.backing.is_some() {
                // -u: the backing file is recorded, never opened.
                Qcow2Image::create_unopened(at, size, &qopts)?;
                let opts = rvirt_block::ImageOptions { backing: rvirt_block::BackingPolicy::Ignore, ..Default::default() };
                Qcow2Image::open_with(at, &opts)?
            } else {
                Qcow2Image::create(at, size, &qopts)?
            };
            if let Some(bits) = refcount_bits {
                img.set_refcount_bits(bits)?;
            }
            img.close()?;
        }
    }
    Ok(())
}

/// qcow2-specific details, under `format-specific.data`.
#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Details {
    compat: String,
    compression_type: String,
    // The v3-only fields are absent for compat=0.10 images, as in qemu-img.
    #[serde(skip_serializing_if = "Option::is_none")]
    lazy_refcounts: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    bitmaps: Vec<bitmaps::BitmapJson>,
    refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_file_raw: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    extended_l2: Option<bool>,
}

/// `format-specific` in qemu-img's JSON.
#[derive(Serialize, Debug)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    typ: String,
    data: Qcow2Details,
}

/// One internal snapshot in `info --output json`.
#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    icount: u64,
    vm_clock_nsec: u64,
    name: String,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_sec: u64,
    id: String,
    vm_state_size: u64,
}

/// What `info` reports, with qemu-img's JSON field names.
#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// Internal snapshots (qcow2).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    /// Snapshots as the library reports them, for the human table.
    #[serde(skip)]
    pub snapshot_list: Vec<rvirt_block::qcow2::Snapshot>,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// The image's path as given.
    pub filename: String,
    /// Cluster size (qcow2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// raw or qcow2.
    pub format: String,
    /// Bytes allocated on the host filesystem.
    pub actual_size: u64,
    /// qcow2 details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    /// Backing file as resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// Backing file as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Backing file format as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// Whether the image is marked dirty.
    pub dirty_flag: bool,
}

/// `rvirt-img info`.
pub fn info(path: &Path, format: Option<&str>) -> Result<ImageInfo> {
    use std::os::unix::fs::MetadataExt;
    let format = access::format_of(path, format)?;
    let meta = std::fs::metadata(path).with_context(|| path.display().to_string())?;
    let mut info = ImageInfo {
        snapshots: Vec::new(),
        snapshot_list: Vec::new(),
        virtual_size: 0,
        filename: path.display().to_string(),
        cluster_size: None,
        format: format.name().into(),
        actual_size: meta.blocks() * 512,
        format_specific: None,
        full_backing_filename: None,
        backing_filename: None,
        backing_filename_format: None,
        dirty_flag: false,
    };
    match format {
        Format::Raw => info.virtual_size = access::open(path, Format::Raw, true)?.size(),
        Format::Qcow2 => {
            // Like qemu-img, info reads the header alone, not the chain.
            let img = access::open_qcow2(path, true, false)?;
            access::warn_damage(path, &img);
            let h = img.header();
            info.virtual_size = h.size;
            info.cluster_size = Some(h.cluster_size());
            info.dirty_flag = h.incompatible_features & 1 != 0;
            let v3 = h.version >= 3;
            info.format_specific = Some(FormatSpecific {
                typ: "qcow2".into(),
                data: Qcow2Details {
                    compat: if h.version >= 3 { "1.1" } else { "0.10" }.into(),
                    compression_type: match h.compression {
                        Compression::Zlib => "zlib",
                        Compression::Zstd => "zstd",
                    }
                    .into(),
                    lazy_refcounts: v3.then_some(h.compatible_features & 1 != 0),
                    bitmaps: img.bitmaps().iter().map(Into::into).collect(),
                    refcount_bits: h.refcount_bits(),
                    data_file: img.data_file().map(|d| d.0),
                    data_file_raw: img.data_file().map(|d| d.1),
                    corrupt: v3.then_some(h.incompatible_features & 2 != 0),
                    extended_l2: v3.then_some(h.incompatible_features & (1 << 4) != 0),
                },
            });
            info.snapshot_list = img.snapshots();
            info.snapshots = info
                .snapshot_list
                .iter()
                .map(|sn| SnapshotInfo {
                    icount: sn.icount().unwrap_or(0),
                    vm_clock_nsec: sn.vm_clock_nsec % 1_000_000_000,
                    name: sn.name.clone(),
                    date_sec: sn.date_sec,
                    date_nsec: sn.date_nsec,
                    vm_clock_sec: sn.vm_clock_nsec / 1_000_000_000,
                    id: sn.id.clone(),
                    vm_state_size: sn.vm_state_size,
                })
                .collect();
            if let Some(b) = img.backing_file() {
                info.backing_filename = Some(b.to_string());
                info.full_backing_filename = Some(resolve_backing(path, b).display().to_string());
                info.backing_filename_format = img.backing_format_name();
            }
        }
    }
    Ok(info)
}

/// `info --backing-chain`: the image and every backing file below it, top first.
pub fn info_chain(path: &Path, format: Option<&str>) -> Result<Vec<ImageInfo>> {
    let fmt = access::format_of(path, format)?;
    // The chain as the images record it: formats are not guessed below the top.
    let mut out = vec![info(path, Some(fmt.name()))?];
    for layer in access::chain_below(path, fmt)? {
        out.push(info(&layer.path, Some(layer.format.name()))?);
    }
    Ok(out)
}

/// qemu-img's human size: "1 GiB", "196 KiB", "512 B".
pub fn human_size(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        // Three significant digits, trailing zeros dropped, as qemu-img prints.
        let s = format!("{:.*}", if v >= 100.0 { 0 } else if v >= 10.0 { 1 } else { 2 }, v);
        let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
        format!("{s} {}", units[u])
    }
}

/// `info` in qemu-img's human format.
pub fn info_text(i: &ImageInfo) -> String {
    let mut s = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        i.filename,
        i.format,
        human_size(i.virtual_size),
        i.virtual_size,
        human_size(i.actual_size)
    );
    if let Some(cs) = i.cluster_size {
        s += &format!("cluster_size: {cs}\n");
    }
    if let Some(b) = &i.backing_filename {
        match &i.full_backing_filename {
            // qemu-img names the resolved path when it is not the stored one.
            Some(full) if full != b => s += &format!("backing file: {b} (actual path: {full})\n"),
            _ => s += &format!("backing file: {b}\n"),
        }
        if let Some(f) = &i.backing_filename_format {
            s += &format!("backing file format: {f}\n");
        }
    }
    s += &snapshot_table(&i.snapshot_list);
    if let Some(fs) = &i.format_specific {
        let d = &fs.data;
        s += &format!("Format specific information:\n    compat: {}\n    compression type: {}\n", d.compat, d.compression_type);
        if let Some(l) = d.lazy_refcounts {
            s += &format!("    lazy refcounts: {l}\n");
        }
        if !d.bitmaps.is_empty() {
            s += &bitmaps::bitmaps_text(&d.bitmaps);
        }
        s += &format!("    refcount bits: {}\n", d.refcount_bits);
        if let (Some(f), Some(raw)) = (&d.data_file, d.data_file_raw) {
            s += &format!("    data file: {f}\n    data file raw: {raw}\n");
        }
        if let (Some(c), Some(e)) = (d.corrupt, d.extended_l2) {
            s += &format!("    corrupt: {c}\n    extended l2: {e}\n");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu_img() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1.5M").unwrap(), 1536 * 1024);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        for bad in ["", "G", "1.5", "10X", "-1", "99999999999E"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn human_sizes_like_qemu_img() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(200704), "196 KiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536 * 1024), "1.5 MiB");
    }
}
