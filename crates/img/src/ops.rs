//! The commands that inspect and change existing images: check, resize,
//! snapshot, rebase, commit, compare, map and measure. Output formats and
//! exit codes follow qemu-img.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rvirt_block::qcow2::{resolve_backing, CheckReport, Preallocation, Qcow2Image, Repair, Snapshot, Stored};
use rvirt_block::{BlockBackend, ExtentKind, Format, RawImage};
use serde::Serialize;

use crate::access::{self, format_of};
use crate::human_size;

/// `check`'s result and the exit code qemu-img would give it.
pub struct CheckOutcome {
    /// What was found.
    pub report: CheckReport,
    /// 0: clean; 2: corruptions; 3: leaks only.
    pub exit_code: u8,
}

/// `check` on a format without checks: qemu-img exits 63 for it.
#[derive(Debug, thiserror::Error)]
#[error("{0}: this image format does not support checks")]
pub struct CheckUnsupported(pub String);

/// `rvirt-img check [-r leaks|all]`.
pub fn check(path: &Path, format: Option<&str>, repair: Option<&str>) -> Result<CheckOutcome> {
    if format_of(path, format)? != Format::Qcow2 {
        return Err(CheckUnsupported(path.display().to_string()).into());
    }
    let repair = match repair {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(other) => bail!("invalid -r '{other}': expected leaks or all"),
    };
    // Checks need the image alone, not its backing chain. `-r all` also
    // opens an image marked corrupt or with unusable refcount structures.
    let img = if repair == Repair::All {
        access::open_qcow2_for_repair(path)?
    } else {
        access::open_qcow2(path, repair == Repair::None, false)?
    };
    let report = img.check(repair).with_context(|| path.display().to_string())?;
    let exit_code = if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    };
    Ok(CheckOutcome { report, exit_code })
}

/// `check`'s report in qemu-img's human format (problem lines go to stderr separately).
pub fn check_text(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        s += &format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if r.corruptions > 0 {
        s += &format!("\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", r.corruptions);
    }
    if r.leaks > 0 {
        s += &format!("\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", r.leaks);
    }
    if r.corruptions == 0 && r.leaks == 0 {
        s += "No errors were found on the image.\n";
    }
    let pct = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 * 100.0 / d as f64 };
    // qemu-img leaves the allocation line out for an image with nothing allocated.
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        s += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters),
        );
    }
    s += &format!("Image end offset: {}\n", r.image_end_offset);
    s
}

/// `check --output json`, with qemu-img's field names (zero counts omitted as it does).
pub fn check_json(path: &Path, r: &CheckReport) -> serde_json::Value {
    let mut v = serde_json::json!({
        "image-end-offset": r.image_end_offset,
        "total-clusters": r.total_clusters,
        "check-errors": 0,
        "allocated-clusters": r.allocated_clusters,
        "filename": path.display().to_string(),
        "format": "qcow2",
    });
    for (k, n) in [
        ("leaks", r.leaks),
        ("corruptions", r.corruptions),
        ("leaks-fixed", r.leaks_fixed),
        ("corruptions-fixed", r.corruptions_fixed),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ] {
        if n > 0 {
            v[k] = n.into();
        }
    }
    v
}

/// `rvirt-img resize [--shrink] FILE [+|-]SIZE`.
pub fn resize(path: &Path, format: Option<&str>, size: &str, shrink: bool) -> Result<()> {
    resize_preallocated(path, format, size, shrink, None)
}

/// `rvirt-img resize [--preallocation=MODE]`: the area a growth adds is
/// preallocated as MODE says (off, metadata (qcow2), falloc, full).
pub fn resize_preallocated(path: &Path, format: Option<&str>, size: &str, shrink: bool, prealloc: Option<&str>) -> Result<()> {
    let fmt = format_of(path, format)?;
    // Dropped before the resize opens the image for writing.
    let current = access::open(path, fmt, true)?.size();
    let new = if let Some(d) = size.strip_prefix('+') {
        current.checked_add(crate::parse_size(d)?).context("size overflows")?
    } else if let Some(d) = size.strip_prefix('-') {
        current.checked_sub(crate::parse_size(d)?).context("the image cannot shrink below zero bytes")?
    } else {
        crate::parse_size(size)?
    };
    let mode = prealloc.map(Preallocation::parse).transpose()?.unwrap_or(Preallocation::Off);
    if mode != Preallocation::Off && new < current {
        bail!("Preallocation can only be used for growing images");
    }
    match fmt {
        // As qemu-img: a qcow2 size is whole sectors (one that is not would read back smaller).
        Format::Qcow2 if new % 512 != 0 => bail!("The new size must be a multiple of 512"),
        Format::Qcow2 => {
            let img = access::open_qcow2(path, false, true)?;
            img.resize(new, shrink)?;
            img.preallocate_from(mode, current)?;
        }
        Format::Raw => {
            if new < current && !shrink {
                bail!("shrinking an image can lose data; pass --shrink to confirm");
            }
            if mode == Preallocation::Metadata {
                bail!("Unsupported preallocation mode: metadata (raw takes off, falloc or full)");
            }
            // Opened and locked as an image: a VM's disk is not resized under it.
            let mut img = RawImage::open_with(path, &access::options(false, false)?).with_context(|| path.display().to_string())?;
            img.resize(new)?;
            if mode != Preallocation::Off {
                img.preallocate_from(current, mode == Preallocation::Full)?;
            }
        }
    }
    Ok(())
}

/// What `snapshot` does.
pub enum SnapshotAction<'a> {
    /// -l
    List,
    /// -c NAME
    Create(&'a str),
    /// -a NAME
    Apply(&'a str),
    /// -d NAME
    Delete(&'a str),
}

/// `rvirt-img snapshot -l|-c|-a|-d`. Returns the text to print.
pub fn snapshot(path: &Path, action: SnapshotAction) -> Result<String> {
    if format_of(path, None)? != Format::Qcow2 {
        bail!("{}: internal snapshots need a qcow2 image", path.display());
    }
    let read_only = matches!(action, SnapshotAction::List);
    let img = access::open_qcow2(path, read_only, false)?;
    match action {
        SnapshotAction::List => return Ok(snapshot_table(&img.snapshots())),
        SnapshotAction::Create(n) => img.create_snapshot_allowing_duplicate(n)?,
        SnapshotAction::Apply(n) => img.apply_snapshot(n)?,
        SnapshotAction::Delete(n) => img.delete_snapshot(n)?,
    }
    Ok(String::new())
}

/// qemu-img's "Snapshot list:" table (empty when there are none).
pub fn snapshot_table(snaps: &[Snapshot]) -> String {
    if snaps.is_empty() {
        return String::new();
    }
    let mut s = format!("Snapshot list:\n{:<9} {:<17} {:>7}{:>20}{:>13}{:>11}\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
    for sn in snaps {
        let date = format_date(sn.date_sec);
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!("{:02}:{:02}:{:02}.{:03}", secs / 3600, secs / 60 % 60, secs % 60, sn.vm_clock_nsec / 1_000_000 % 1000);
        let icount = sn.icount().map(|i| i.to_string()).unwrap_or_default();
        s += &format!("{:<9} {:<17} {:>7}{:>20}{:>13}{:>11}\n", sn.id, sn.name, human_size(sn.vm_state_size), date, clock, icount);
    }
    s
}

/// "YYYY-MM-DD HH:MM:SS" in local time, as qemu-img prints snapshot dates.
fn format_date(secs: u32) -> String {
    let t = secs as libc::time_t;
    // SAFETY: localtime_r fills the tm we pass; both live on this stack frame.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `t` and fills `tm`, both ours.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return secs.to_string();
    }
    format!(" {:04}-{:02}-{:02} {:02}:{:02}:{:02}", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// `rvirt-img rebase -b NEW [-F FMT] [-u] FILE`. Safe mode (the default)
/// first copies into FILE every cluster it does not store whose content
/// differs between the old and the new backing file, so what FILE reads
/// stays the same. `new_backing` empty removes the backing file.
pub fn rebase(path: &Path, new_backing: &str, new_format: Option<&str>, unsafe_mode: bool) -> Result<()> {
    if format_of(path, None)? != Format::Qcow2 {
        bail!("{}: only qcow2 images have backing files", path.display());
    }
    if new_backing.starts_with("json:") {
        bail!("a json: name cannot be stored as a backing file name");
    }
    // -u edits the header only: the old backing file need not even exist.
    let img = access::open_qcow2(path, false, !unsafe_mode)?;
    let new = if new_backing.is_empty() {
        None
    } else {
        let bpath = resolve_backing(path, new_backing);
        // As qemu-img: with -u and -F the new backing file need not exist (yet).
        let absent = unsafe_mode && std::fs::symlink_metadata(&bpath).is_err();
        let fmt = match (absent, new_format) {
            (true, Some(f)) => Format::parse(f).with_context(|| format!("new backing file {new_backing}"))?,
            (true, None) => bail!("new backing file {new_backing} does not exist: give its format (-F) to name it anyway"),
            (false, _) => format_of(&bpath, new_format).with_context(|| format!("new backing file {new_backing}"))?,
        };
        if !absent {
            let mut files = vec![bpath.clone()];
            files.extend(access::chain_below(&bpath, fmt)?.into_iter().map(|l| l.path));
            access::refuse_overlap(path, &files, "image")?;
        }
        let b = if unsafe_mode { None } else { Some(access::open(&bpath, fmt, true).with_context(|| format!("new backing file {new_backing}"))?) };
        Some((b, fmt))
    };
    if !unsafe_mode {
        let cs = img.header().cluster_size();
        let size = img.size();
        let (mut old_buf, mut new_buf) = (vec![0u8; cs as usize], vec![0u8; cs as usize]);
        for e in img.map(0, size)? {
            if e.kind != ExtentKind::Backing {
                continue;
            }
            let mut pos = e.offset;
            while pos < e.offset + e.length {
                let n = (cs - pos % cs).min(e.offset + e.length - pos) as usize;
                read_or_zero(img.backing(), &mut old_buf[..n], pos)?;
                read_or_zero(new.as_ref().and_then(|(b, _)| b.as_deref()), &mut new_buf[..n], pos)?;
                if old_buf[..n] != new_buf[..n] {
                    img.write_at(&old_buf[..n], pos)?;
                }
                pos += n as u64;
            }
        }
    }
    img.set_backing_file(new.as_ref().map(|(_, f)| (new_backing, *f)))?;
    Ok(())
}

/// Reads from an optional image that may be shorter than the range: zeros elsewhere.
fn read_or_zero(img: Option<&dyn BlockBackend>, buf: &mut [u8], pos: u64) -> Result<()> {
    buf.fill(0);
    if let Some(b) = img {
        let size = b.size();
        if pos < size {
            let n = ((size - pos) as usize).min(buf.len());
            b.read_at(&mut buf[..n], pos)?;
        }
    }
    Ok(())
}

/// `rvirt-img commit [-d] [-b BASE] FILE`: writes what FILE (and, with -b,
/// every layer down to BASE) stores into BASE, by default its backing
/// file, then (unless `keep`) empties FILE so it reads through again.
pub fn commit(path: &Path, keep: bool, base_name: Option<&Path>) -> Result<()> {
    if format_of(path, None)? != Format::Qcow2 {
        bail!("{}: only qcow2 images have backing files to commit to", path.display());
    }
    // -b leaves the top as it is (the layers in between no longer match it), as qemu-img's -b implies -d.
    let keep = keep || base_name.is_some();
    // The top first, so an image another process holds is refused as such.
    let top = access::open_qcow2(path, keep, false)?;
    let chain = access::chain_below(path, Format::Qcow2)?;
    if chain.is_empty() {
        bail!("{}: image has no backing file", path.display());
    }
    // -b names a deeper layer of the chain; the layers in between are committed too.
    let idx = match base_name {
        None => 0,
        Some(b) => {
            let want = std::fs::canonicalize(b).with_context(|| b.display().to_string())?;
            chain
                .iter()
                .position(|l| std::fs::canonicalize(&l.path).is_ok_and(|p| p == want))
                .with_context(|| format!("'{}' is not in the backing chain of '{}'", b.display(), path.display()))?
        }
    };
    let base_layer = &chain[idx];
    access::refuse_overlap(&base_layer.path, &[path.to_path_buf()], "backing file")?;
    // Each layer above the base alone: a range is read from the highest layer storing it.
    let mut above = Vec::with_capacity(idx);
    for l in &chain[..idx] {
        above.push(access::open_qcow2(&l.path, true, false)?);
    }
    let size = top.size();
    // A base smaller than the top grows to its size first, as qemu-img grows it.
    let base_size = access::open(&base_layer.path, base_layer.format, true)?.size();
    if base_size < size {
        resize(&base_layer.path, Some(base_layer.format.name()), &size.to_string(), false).with_context(|| format!("growing backing file {}", base_layer.path.display()))?;
    }
    let base = access::open(&base_layer.path, base_layer.format, false).with_context(|| format!("backing file {}", base_layer.path.display()))?;
    let layers: Vec<&Qcow2Image> = std::iter::once(&top).chain(above.iter()).collect();
    // What each layer stores, once; then, cluster by cluster, the highest
    // layer storing it, gathered into runs of one layer and kind.
    let maps = layers.iter().map(|l| l.host_map(0, size.min(l.size()))).collect::<rvirt_block::Result<Vec<_>>>()?;
    let mut cursors = vec![0usize; maps.len()];
    let cs = top.header().cluster_size();
    let mut runs: Vec<(u64, u64, usize, bool)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let n = (cs - pos % cs).min(size - pos);
        let mut found = None;
        for (i, map) in maps.iter().enumerate() {
            while cursors[i] < map.len() && map[cursors[i]].offset + map[cursors[i]].length <= pos {
                cursors[i] += 1;
            }
            match map.get(cursors[i]) {
                Some(e) if e.offset <= pos && !matches!(e.stored, Stored::Unallocated | Stored::Reserved { .. }) => {
                    found = Some((i, matches!(e.stored, Stored::Zero { .. })));
                    break;
                }
                _ => {}
            }
        }
        if let Some((layer, zero)) = found {
            match runs.last_mut() {
                Some(r) if r.0 + r.1 == pos && r.2 == layer && r.3 == zero && r.1 < 1 << 20 => r.1 += n,
                _ => runs.push((pos, n, layer, zero)),
            }
        }
        pos += n;
    }
    let mut buf = vec![0u8; (1 << 20) + cs as usize];
    for (pos, n, layer, zero) in runs {
        if zero {
            base.write_zeroes(pos, n)?;
        } else {
            let b = &mut buf[..n as usize];
            layers[layer].read_at(b, pos)?;
            base.write_at(b, pos)?;
        }
    }
    base.flush()?;
    drop(above);
    if !keep {
        top.make_empty()?;
        top.flush()?;
    }
    Ok(())
}

/// `compare`'s verdict.
pub enum Comparison {
    /// Same content.
    Identical,
    /// Content differs first at this offset (rounded down to 512 bytes, as qemu-img reports).
    Mismatch(u64),
    /// Strict mode: sizes or allocation differ.
    StrictMismatch(String),
}

/// `rvirt-img compare [-s] A B`. Sizes may differ if the extra part reads as zeros.
pub fn compare(a: &Path, afmt: Option<&str>, b: &Path, bfmt: Option<&str>, strict: bool) -> Result<(Comparison, bool)> {
    let ia = access::open(a, format_of(a, afmt)?, true)?;
    let ib = access::open(b, format_of(b, bfmt)?, true)?;
    let (sa, sb) = (ia.size(), ib.size());
    let size_mismatch = sa != sb;
    if size_mismatch && strict {
        return Ok((Comparison::StrictMismatch("Strict mode: Image size mismatch!".into()), true));
    }
    if strict {
        let common = sa.min(sb);
        let data = |i: &dyn BlockBackend| -> Result<Vec<(u64, u64)>> {
            Ok(i.map(0, common)?.into_iter().filter(|e| e.kind == ExtentKind::Data).map(|e| (e.offset, e.length)).collect())
        };
        let (da, db) = (data(ia.as_ref())?, data(ib.as_ref())?);
        if da != db {
            // The first data extent that the other image does not have.
            let at = match da.iter().zip(&db).find(|(x, y)| x != y) {
                Some((x, y)) => x.0.min(y.0),
                None => da.get(db.len()).or(db.get(da.len())).map_or(0, |e| e.0),
            };
            return Ok((Comparison::StrictMismatch(format!("Strict mode: Offset {at} block status mismatch!")), false));
        }
    }
    let chunk = 1usize << 20;
    let (mut ba, mut bb) = (vec![0u8; chunk], vec![0u8; chunk]);
    let end = sa.max(sb);
    let mut pos = 0u64;
    while pos < end {
        let n = (end - pos).min(chunk as u64) as usize;
        read_or_zero(Some(ia.as_ref()), &mut ba[..n], pos)?;
        read_or_zero(Some(ib.as_ref()), &mut bb[..n], pos)?;
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok((Comparison::Mismatch((pos + i as u64) / 512 * 512), size_mismatch));
        }
        pos += n as u64;
    }
    Ok((Comparison::Identical, size_mismatch))
}

/// One line of `map --output=json`.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Chain depth where the data was found (0: the image itself).
    pub depth: usize,
    /// Allocated somewhere in the chain.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Offset in the file at `depth`, for uncompressed data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip)]
    file: String,
}

impl MapEntry {
    fn continues(&self, next: &MapEntry) -> bool {
        let offsets = match (self.offset, next.offset) {
            (Some(a), Some(b)) => a + self.length == b,
            (None, None) => true,
            _ => false,
        };
        self.start + self.length == next.start && self.depth == next.depth && (self.present, self.zero, self.data) == (next.present, next.zero, next.data) && offsets
    }
}

/// One image of a backing chain opened for `map`.
enum Layer {
    Qcow2(Qcow2Image),
    Raw(RawImage),
}

/// Opens `path` and every backing file below it, top first, each alone.
fn open_chain(path: &Path, format: Option<&str>) -> Result<Vec<(String, Layer)>> {
    let fmt = format_of(path, format)?;
    let mut layers = vec![(path.to_path_buf(), fmt)];
    layers.extend(access::chain_below(path, fmt)?.into_iter().map(|l| (l.path, l.format)));
    let opts = access::options(true, false)?;
    let mut chain = Vec::new();
    for (p, fmt) in layers {
        let name = p.display().to_string();
        let layer = match fmt {
            Format::Raw => Layer::Raw(RawImage::open_with(&p, &opts).with_context(|| name.clone())?),
            Format::Qcow2 => Layer::Qcow2(Qcow2Image::open_with(&p, &opts).with_context(|| name.clone())?),
        };
        chain.push((name, layer));
    }
    Ok(chain)
}

/// `rvirt-img map`: where every guest byte comes from.
pub fn map(path: &Path, format: Option<&str>) -> Result<Vec<MapEntry>> {
    let chain = open_chain(path, format)?;
    let size = match &chain[0].1 {
        Layer::Qcow2(q) => q.size(),
        Layer::Raw(r) => r.size(),
    };
    let mut out: Vec<MapEntry> = Vec::new();
    map_layer(&chain, 0, 0, size, &mut out)?;
    Ok(out)
}

fn map_layer(chain: &[(String, Layer)], depth: usize, offset: u64, length: u64, out: &mut Vec<MapEntry>) -> Result<()> {
    let (file, layer) = &chain[depth];
    let entry = |start, length, present, zero, data, off: Option<u64>| MapEntry { start, length, depth, present, zero, data, offset: off, file: file.clone() };
    match layer {
        Layer::Raw(r) => {
            let size = r.size();
            for e in r.map(offset, length.min(size.saturating_sub(offset)))? {
                let data = e.kind == ExtentKind::Data;
                push_map(out, entry(e.offset, e.length, true, !data, data, Some(e.offset)));
            }
            if offset + length > size {
                let start = offset.max(size);
                push_map(out, entry(start, offset + length - start, false, true, false, None));
            }
        }
        Layer::Qcow2(q) => {
            let size = q.size();
            let inside = length.min(size.saturating_sub(offset));
            for e in q.host_map(offset, inside)? {
                match e.stored {
                    Stored::Data { host } => push_map(out, entry(e.offset, e.length, true, false, true, host)),
                    Stored::Zero { host } => push_map(out, entry(e.offset, e.length, true, true, false, host)),
                    Stored::Unallocated | Stored::Reserved { .. } if depth + 1 < chain.len() => map_layer(chain, depth + 1, e.offset, e.length, out)?,
                    Stored::Unallocated => push_map(out, entry(e.offset, e.length, false, true, false, None)),
                    // qemu-img names the cluster kept under unallocated subclusters.
                    Stored::Reserved { host } => push_map(out, entry(e.offset, e.length, false, true, false, Some(host))),
                }
            }
            if offset + length > size {
                let start = offset.max(size);
                push_map(out, entry(start, offset + length - start, false, true, false, None));
            }
        }
    }
    Ok(())
}

/// Appends `e`, merging it into the previous entry when it continues it.
fn push_map(out: &mut Vec<MapEntry>, e: MapEntry) {
    match out.last_mut() {
        Some(last) if last.continues(&e) => last.length += e.length,
        _ => out.push(e),
    }
}

/// `map` in qemu-img's JSON format (one object per line).
pub fn map_json(entries: &[MapEntry]) -> Result<String> {
    let lines: Vec<String> = entries.iter().map(|e| serde_json::to_string(e).map(|j| json_spaced(&j))).collect::<std::result::Result<_, _>>()?;
    Ok(format!("[{}]\n", lines.join(",\n")))
}

/// qemu-img's spacing: `{ "start": 0, "length": 1}`.
fn json_spaced(compact: &str) -> String {
    let inner = &compact[1..compact.len() - 1];
    let mut s = String::from("{ ");
    let mut in_str = false;
    for c in inner.chars() {
        match c {
            '"' => {
                in_str = !in_str;
                s.push(c);
            }
            ':' if !in_str => s.push_str(": "),
            ',' if !in_str => s.push_str(", "),
            _ => s.push(c),
        }
    }
    s.push('}');
    s
}

/// `map` in qemu-img's human format: data ranges and the file holding them.
pub fn map_text(entries: &[MapEntry]) -> Result<String> {
    let mut s = format!("{:<16}{:<16}{:<16}{}\n", "Offset", "Length", "Mapped to", "File");
    for e in entries.iter().filter(|e| e.data) {
        let Some(off) = e.offset else { bail!("File contains external, encrypted or compressed clusters.") };
        s += &format!("{:<16}{:<16}{:<16}{}\n", hex(e.start), hex(e.length), hex(off), e.file);
    }
    Ok(s)
}

/// `%#x`: "0" for zero, else "0x...".
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// `measure`'s answer, with qemu-img's JSON names.
#[derive(Serialize, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Measurement {
    /// Bytes the converted image needs with preallocation off.
    pub required: u64,
    /// Bytes it needs fully allocated.
    pub fully_allocated: u64,
    /// Bytes the source's persistent bitmaps take in a qcow2 copy (qcow2 sources, as qemu-img shows them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<u64>,
}

/// The `-o` options `measure` weighs (those of `create` that change sizes).
#[derive(Clone, Debug)]
pub struct MeasureOptions {
    /// qcow2 cluster size.
    pub cluster_size: u64,
    /// qcow2 refcount width in bits.
    pub refcount_bits: u64,
    /// qcow2 compat level (version 2 holds no bitmaps).
    pub version: u32,
    /// 16-byte L2 entries (subclusters).
    pub extended_l2: bool,
    /// Anything but off: the whole image is allocated.
    pub preallocated: bool,
    /// A backing file was named (for a source image, qemu-img then answers the fully allocated size).
    pub backing: bool,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        Self { cluster_size: 65536, refcount_bits: 16, version: 3, extended_l2: false, preallocated: false, backing: false }
    }
}

impl MeasureOptions {
    /// Parses `-o` for `measure -O FMT`.
    pub fn parse(options: &[String]) -> Result<Self> {
        let mut m = MeasureOptions::default();
        for kv in options.iter().flat_map(|o| o.split(',')).filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').with_context(|| format!("invalid option '{kv}': expected key=value"))?;
            let on = |v: &str| match v {
                "on" => Ok(true),
                "off" => Ok(false),
                _ => Err(anyhow::anyhow!("invalid {k} '{v}': expected on or off")),
            };
            match k {
                "cluster_size" => m.cluster_size = crate::parse_size(v)?,
                "refcount_bits" => {
                    m.refcount_bits = v.parse().ok().filter(|b: &u64| b.is_power_of_two() && *b <= 64).with_context(|| format!("invalid refcount_bits '{v}'"))?
                }
                "compat" => {
                    m.version = match v {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => bail!("invalid compat '{v}': expected 0.10 or 1.1"),
                    }
                }
                "extended_l2" => m.extended_l2 = on(v)?,
                "preallocation" => m.preallocated = Preallocation::parse(v)? != Preallocation::Off,
                "backing_file" => m.backing = true,
                "backing_fmt" | "lazy_refcounts" | "compression_type" | "size" => {}
                _ => bail!("measure: option '{k}' is not one of create's"),
            }
        }
        Ok(m)
    }
}

/// `rvirt-img measure -O FMT [-o OPTS] (--size N | FILE)`: file size for a
/// new image of `size` bytes, or for converting `source` (what its whole
/// chain holds). qcow2 figures follow QEMU's layout: header, L1 and L2
/// tables, refcount table and blocks.
pub fn measure(out_format: &str, opts: &MeasureOptions, size: Option<u64>, source: Option<(&Path, Option<&str>)>) -> Result<Measurement> {
    let out = Format::parse(out_format)?;
    let cluster_size = opts.cluster_size;
    if out == Format::Qcow2 && (!cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size)) {
        bail!("cluster size {cluster_size} is not a power of two between 512 and 2 MiB");
    }
    if out == Format::Qcow2 && opts.extended_l2 && cluster_size < 16384 {
        bail!("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
    }
    let (virtual_size, data, bitmaps) = match (size, source) {
        (Some(s), None) => (s, None, None),
        (None, Some((p, f))) => {
            let fmt = format_of(p, f)?;
            // Data clusters the chain holds, as the resolved map shows them.
            let mut data = 0u64;
            let mut virtual_size = 0u64;
            for e in map(p, Some(fmt.name()))? {
                virtual_size = virtual_size.max(e.start + e.length);
                if e.data {
                    let start = e.start / cluster_size * cluster_size;
                    data += (e.start + e.length).next_multiple_of(cluster_size) - start;
                }
            }
            let bitmaps = match fmt {
                Format::Qcow2 => Some(access::open_qcow2(p, true, false)?.bitmaps_size(cluster_size)),
                Format::Raw => None,
            };
            (virtual_size, Some(data.min(virtual_size.next_multiple_of(cluster_size))), bitmaps)
        }
        _ => bail!("measure needs either --size or a source image, not both"),
    };
    match out {
        // A raw copy holds no bitmaps; qemu-img shows none.
        Format::Raw => Ok(Measurement { required: virtual_size, fully_allocated: virtual_size, bitmaps: None }),
        Format::Qcow2 => {
            let full = qcow2_full_size(virtual_size, cluster_size, opts.refcount_bits, opts.extended_l2);
            let aligned = virtual_size.next_multiple_of(cluster_size);
            // qemu-img 7.2 answers the fully allocated size for a source measured with a backing file.
            let required = if opts.preallocated || (opts.backing && data.is_some()) { full } else { full - aligned + data.unwrap_or(0) };
            // Version 2 images hold no bitmaps: qemu-img leaves the line out.
            let bitmaps = bitmaps.filter(|_| opts.version >= 3);
            Ok(Measurement { required, fully_allocated: full, bitmaps })
        }
    }
}

/// File size of a fully allocated qcow2 image.
fn qcow2_full_size(size: u64, cs: u64, refcount_bits: u64, extended_l2: bool) -> u64 {
    let l2_entry = if extended_l2 { 16 } else { 8 };
    let per_l2 = cs / l2_entry;
    let per_table = cs / 8;
    let aligned = size.next_multiple_of(cs);
    let l2_entries = (aligned / cs).next_multiple_of(per_l2);
    let l1_entries = (l2_entries / per_l2).next_multiple_of(per_table);
    let meta = cs + l2_entries * l2_entry + l1_entries * 8;
    let refcounts_per_block = cs * 8 / refcount_bits;
    let clusters = (meta + aligned) / cs;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let b = (clusters + blocks + table).div_ceil(refcounts_per_block);
        let t = b.div_ceil(per_table);
        if (b, t) == (blocks, table) {
            break;
        }
        (blocks, table) = (b, t);
    }
    meta + aligned + (blocks + table) * cs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_sizes_match_qemu_img_measure() {
        // Figures printed by qemu-img 7.2 `measure -O qcow2 --size N`.
        assert_eq!(qcow2_full_size(10 << 30, 65536, 16, false), 10739318784);
        assert_eq!(qcow2_full_size(1 << 30, 65536, 16, false), 1074135040);
        // `-o refcount_bits=1` on 100 GiB, as qemu-img measures it.
        assert_eq!(qcow2_full_size(100 << 30, 65536, 1, false), 107387748352);
        assert_eq!(qcow2_full_size(4 << 20, 65536, 16, false), 4521984);
    }

    #[test]
    fn json_spacing_matches_qemu_img() {
        assert_eq!(json_spaced(r#"{"start":0,"length":5,"x":"a:b, c"}"#), r#"{ "start": 0, "length": 5, "x": "a:b, c"}"#);
    }
}
