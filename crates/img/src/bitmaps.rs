//! `rvirt-img bitmap`: persistent dirty bitmaps of qcow2 images (add,
//! remove, clear, enable, disable, merge), as `qemu-img bitmap` does them;
//! and their copy by `convert --bitmaps`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rvirt_block::qcow2::{BitmapInfo, Qcow2Image};
use rvirt_block::Format;

use crate::access::{self, format_of};

/// One step of `rvirt-img bitmap`, applied in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapAction {
    /// `--add`: a new, empty, enabled bitmap.
    Add,
    /// `--remove`.
    Remove,
    /// `--clear`: every bit unset.
    Clear,
    /// `--enable`: record writes.
    Enable,
    /// `--disable`: stop recording writes.
    Disable,
    /// `--merge SOURCE`: set every bit SOURCE has set.
    Merge(String),
}

impl BitmapAction {
    fn verb(&self) -> &'static str {
        match self {
            BitmapAction::Add => "add",
            BitmapAction::Remove => "remove",
            BitmapAction::Clear => "clear",
            BitmapAction::Enable => "enable",
            BitmapAction::Disable => "disable",
            BitmapAction::Merge(_) => "merge",
        }
    }
}

/// What `rvirt-img bitmap` was asked.
#[derive(Clone, Debug)]
pub struct BitmapRequest {
    /// The image.
    pub path: PathBuf,
    /// Its format, when given (-f).
    pub format: Option<String>,
    /// The bitmap acted on.
    pub name: String,
    /// The steps, in command-line order.
    pub actions: Vec<BitmapAction>,
    /// Granularity of an added bitmap (-g).
    pub granularity: Option<u64>,
    /// The image holding `--merge`'s source bitmap (-b, -F), when not this one.
    pub source: Option<(PathBuf, Option<String>)>,
}

fn qcow2_only(path: &Path, format: Option<&str>) -> Result<()> {
    let f = format_of(path, format)?;
    if f != Format::Qcow2 {
        bail!("Format driver '{}' does not support bitmaps", f.name());
    }
    Ok(())
}

/// `rvirt-img bitmap`.
pub fn bitmap(req: &BitmapRequest) -> Result<()> {
    if req.actions.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    if req.granularity.is_some() && !req.actions.contains(&BitmapAction::Add) {
        bail!("granularity only supported with --add");
    }
    if req.source.is_some() && !req.actions.iter().any(|a| matches!(a, BitmapAction::Merge(_))) {
        bail!("-b requires --merge");
    }
    qcow2_only(&req.path, req.format.as_deref())?;
    let img = access::open_qcow2(&req.path, false, false)?;
    let source = match &req.source {
        Some((p, f)) => {
            qcow2_only(p, f.as_deref())?;
            Some(access::open_qcow2(p, true, false)?)
        }
        None => None,
    };
    for action in &req.actions {
        let name = &req.name;
        let done = match action {
            BitmapAction::Add => img.add_bitmap(name, req.granularity, true),
            BitmapAction::Remove => img.remove_bitmap(name),
            BitmapAction::Clear => img.clear_bitmap(name),
            BitmapAction::Enable => img.enable_bitmap(name, true),
            BitmapAction::Disable => img.enable_bitmap(name, false),
            BitmapAction::Merge(src) => {
                let from = source.as_ref().unwrap_or(&img);
                from.bitmap_ranges(src).and_then(|(_, ranges)| img.merge_into_bitmap(name, &ranges))
            }
        };
        done.map_err(|e| anyhow::anyhow!("Operation {} on bitmap {name} failed: {e}", action.verb()))?;
    }
    img.close().with_context(|| format!("{}: storing the bitmaps", req.path.display()))
}

/// Copies every bitmap of the qcow2 image `src` into the qcow2 image `dst`
/// (`convert --bitmaps`, after [`check_copy_bitmaps`]); an inconsistent one
/// is refused unless `skip_broken`.
pub fn copy_bitmaps(src: &Path, dst: &Path, skip_broken: bool) -> Result<()> {
    let from = access::open_qcow2(src, true, false)?;
    let list: Vec<BitmapInfo> = from.bitmaps();
    refuse_inconsistent(&list, skip_broken)?;
    let to = Qcow2Image::open(dst, false).with_context(|| dst.display().to_string())?;
    for b in list.iter().filter(|b| !b.in_use) {
        let (_, ranges) = from.bitmap_ranges(&b.name)?;
        to.add_bitmap(&b.name, Some(b.granularity), b.enabled)?;
        to.merge_into_bitmap(&b.name, &ranges)?;
    }
    to.close().with_context(|| format!("{}: storing the bitmaps", dst.display()))
}

/// Checks `convert --bitmaps` can be done before anything is copied.
pub fn check_copy_bitmaps(src: &Path, src_format: Format, dst_format: Format, skip_broken: bool) -> Result<()> {
    if dst_format != Format::Qcow2 {
        bail!("Format driver '{}' does not support bitmaps", dst_format.name());
    }
    if src_format != Format::Qcow2 {
        bail!("Source format '{}' does not support bitmaps", src_format.name());
    }
    refuse_inconsistent(&access::open_qcow2(src, true, false)?.bitmaps(), skip_broken)
}

/// qemu-img's refusal to copy a bitmap left in use by a crash.
fn refuse_inconsistent(list: &[BitmapInfo], skip_broken: bool) -> Result<()> {
    if let Some(b) = list.iter().find(|b| b.in_use && !skip_broken) {
        bail!("Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it", b.name);
    }
    Ok(())
}

/// One bitmap in `info`'s JSON (`format-specific.data.bitmaps`).
#[derive(serde::Serialize, Debug)]
pub struct BitmapJson {
    flags: Vec<&'static str>,
    name: String,
    granularity: u64,
}

impl From<&BitmapInfo> for BitmapJson {
    fn from(b: &BitmapInfo) -> Self {
        let mut flags = Vec::new();
        if b.in_use {
            flags.push("in-use");
        }
        if b.enabled {
            flags.push("auto");
        }
        BitmapJson { flags, name: b.name.clone(), granularity: b.granularity }
    }
}

/// `info`'s human lines for the bitmaps, as qemu-img indents them.
pub(crate) fn bitmaps_text(list: &[BitmapJson]) -> String {
    let mut s = String::from("    bitmaps:\n");
    for (i, b) in list.iter().enumerate() {
        s += &format!("        [{i}]:\n            flags:\n");
        for (j, f) in b.flags.iter().enumerate() {
            s += &format!("                [{j}]: {f}\n");
        }
        s += &format!("            name: {}\n            granularity: {}\n", b.name, b.granularity);
    }
    s
}
