//! `rvirt-img dd`: copy part of an image into a new one, as `qemu-img dd`
//! does (`bs=`, `count=`, `skip=`, `if=`, `of=`), with its size rules.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rvirt_block::Format;

use crate::access::{self, format_of};
use crate::{create_at, parse_size, CreateRequest};

/// What `rvirt-img dd` was asked.
#[derive(Clone, Debug, Default)]
pub struct DdRequest {
    /// `if=`.
    pub input: PathBuf,
    /// `of=` (created, or replaced).
    pub output: PathBuf,
    /// `-f`: the input's format (probed when `None`).
    pub input_format: Option<String>,
    /// `-O`: the output's format (raw when `None`).
    pub output_format: Option<String>,
    /// `bs=`: block size in bytes (512 by default).
    pub block_size: u64,
    /// `count=`: blocks to copy (all when `None`).
    pub count: Option<u64>,
    /// `skip=`: input blocks to skip.
    pub skip: u64,
}

impl DdRequest {
    /// Parses dd's `key=value` operands.
    pub fn parse(operands: &[String]) -> Result<Self> {
        let mut r = DdRequest { block_size: 512, ..Default::default() };
        let (mut input, mut output) = (None, None);
        for op in operands {
            let (k, v) = op.split_once('=').with_context(|| format!("unrecognized operand {op}"))?;
            match k {
                "if" => input = Some(PathBuf::from(v)),
                "of" => output = Some(PathBuf::from(v)),
                "bs" => {
                    r.block_size = parse_size(v).ok().filter(|&b| b > 0 && b <= i32::MAX as u64).with_context(|| format!("invalid number: '{v}'"))?
                }
                "count" => r.count = Some(v.parse().with_context(|| format!("invalid number: '{v}'"))?),
                "skip" => r.skip = v.parse().with_context(|| format!("invalid number: '{v}'"))?,
                _ => bail!("unrecognized operand {op}"),
            }
        }
        match (input, output) {
            (Some(i), Some(o)) => {
                r.input = i;
                r.output = o;
                Ok(r)
            }
            _ => bail!("Must specify both input and output files"),
        }
    }
}

/// `rvirt-img dd`: the output holds `count` blocks (or the whole input)
/// less the `skip`ped ones, read from the input after them, as qemu-img
/// sizes it.
pub fn dd(req: &DdRequest) -> Result<()> {
    let sfmt = format_of(&req.input, req.input_format.as_deref())?;
    let dfmt = Format::parse(req.output_format.as_deref().unwrap_or("raw"))?;
    access::refuse_overlap(&req.output, &[req.input.clone()], "output")?;
    let src = access::open(&req.input, sfmt, true)?;
    let in_size = src.size();
    let mut size = match req.count.and_then(|c| c.checked_mul(req.block_size)) {
        Some(n) if n <= in_size => n,
        _ => in_size,
    };
    let from = req.skip.checked_mul(req.block_size).unwrap_or(u64::MAX);
    if from > size {
        // qemu-img says so, leaves an empty output and exits 0.
        eprintln!("rvirt-img: {}: cannot skip to specified offset", req.input.display());
        size = 0;
    } else {
        size -= from;
    }
    let out = access::Output::new(&req.output)?;
    let create = CreateRequest { path: req.output.clone(), format: Some(dfmt.name().into()), size: Some(size), ..Default::default() };
    create_at(&create, out.path())?;
    let dst = rvirt_block::open(out.path(), dfmt, false).with_context(|| req.output.display().to_string())?;
    let mut buf = vec![0u8; (1 << 20).min(size.max(1)) as usize];
    let mut done = 0u64;
    while done < size {
        let n = (size - done).min(buf.len() as u64) as usize;
        src.read_at(&mut buf[..n], from + done)?;
        // The new output reads as zeros already.
        if !rvirt_block::is_zero(&buf[..n]) {
            dst.write_at(&buf[..n], done)?;
        }
        done += n as u64;
    }
    dst.flush()?;
    drop(dst);
    out.finish()
}
