//! `rvirt-img amend`: change a qcow2 image's options in place, as
//! `qemu-img amend -o` does (compat, lazy_refcounts, refcount_bits, size;
//! backing_file and backing_fmt only as they are).

use std::path::Path;

use anyhow::{bail, Context, Result};
use rvirt_block::Format;

use crate::access::{self, format_of};
use crate::parse_size;

/// What `amend -o help` lists.
pub const AMEND_HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// The changes `-o` asks for.
#[derive(Debug, Default)]
struct Changes {
    version: Option<u32>,
    lazy: Option<bool>,
    refcount_bits: Option<u32>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    size: Option<u64>,
}

fn on_off(k: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("Parameter '{k}' expects 'on' or 'off'"),
    }
}

fn parse(options: &[String]) -> Result<Changes> {
    let mut c = Changes::default();
    let mut any = false;
    for kv in options.iter().flat_map(|o| o.split(',')).filter(|s| !s.is_empty()) {
        any = true;
        let (k, v) = kv.split_once('=').with_context(|| format!("Invalid option '{kv}': expected key=value"))?;
        match k {
            "compat" => {
                c.version = Some(match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("Invalid compatibility level: '{v}'"),
                })
            }
            "lazy_refcounts" => c.lazy = Some(on_off(k, v)?),
            "refcount_bits" => c.refcount_bits = Some(v.parse().with_context(|| format!("Invalid refcount_bits '{v}'"))?),
            "backing_file" => c.backing_file = Some(v.to_string()),
            "backing_fmt" => c.backing_fmt = Some(v.to_string()),
            "size" => c.size = Some(parse_size(v)?),
            "cluster_size" | "preallocation" | "compression_type" | "extended_l2" => {
                bail!("Invalid parameter '{k}'\nThis option is only supported for image creation")
            }
            "data_file" | "data_file_raw" | "encryption" | "encrypt.format" => bail!("rvirt-img does not change '{k}' (external data files and encryption are not supported)"),
            _ => bail!("Invalid parameter '{k}'"),
        }
    }
    if !any {
        bail!("Must specify options (-o)");
    }
    Ok(c)
}

/// `rvirt-img amend -o OPTIONS FILE`. Changes run in QEMU's order: an
/// upgrade first, then refcount width, lazy refcounts and size, then a
/// downgrade. The backing file is rebase's to change, as in qemu-img 7.2.
pub fn amend(path: &Path, format: Option<&str>, options: &[String]) -> Result<()> {
    if format_of(path, format)? != Format::Qcow2 {
        bail!("Format driver '{}' does not support option amendment", format_of(path, format)?.name());
    }
    let c = parse(options)?;
    let img = access::open_qcow2(path, false, false)?;
    let h = img.header();
    // As qemu-img 7.2: the backing file is rebase's to change; naming the current one is fine.
    let same_file = c.backing_file.as_deref().is_none_or(|b| img.backing_file() == Some(b));
    let same_fmt = c.backing_fmt.as_deref().is_none_or(|f| img.backing_format_name().as_deref() == Some(f));
    if !same_file || !same_fmt {
        bail!("Cannot amend the backing file\nYou can use 'rvirt-img rebase' instead.");
    }
    if c.version == Some(3) {
        img.set_version(3)?;
    }
    if let Some(bits) = c.refcount_bits {
        img.set_refcount_bits(bits)?;
    }
    if let Some(on) = c.lazy {
        img.set_lazy_refcounts(on)?;
    }
    if let Some(size) = c.size.filter(|&s| s != h.size) {
        if size % 512 != 0 {
            bail!("The new size must be a multiple of 512");
        }
        img.resize(size, true)?;
    }
    if c.version == Some(2) {
        img.set_version(2)?;
    }
    img.close().with_context(|| path.display().to_string())
}
