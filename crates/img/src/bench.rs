//! `rvirt-img bench`: time a run of reads or writes through the image
//! library, with `qemu-img bench`'s options and output.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::access::{self, format_of};

/// What `rvirt-img bench` runs.
#[derive(Clone, Debug)]
pub struct BenchRequest {
    /// Requests in all (`-c`, 75,000 by default).
    pub count: u64,
    /// Requests in flight (`-d`, 64 by default): one thread each, at most 64.
    pub depth: u64,
    /// Bytes per request (`-s`, 4 KiB by default).
    pub buffer_size: u64,
    /// Bytes between the starts of consecutive requests (`-S`, the buffer size by default).
    pub step: Option<u64>,
    /// Where the first request starts (`-o`).
    pub offset: u64,
    /// Write instead of read (`-w`).
    pub write: bool,
    /// The byte written (`--pattern`, 0 by default).
    pub pattern: u8,
    /// A flush after every this many requests (`--flush-interval`, writes only).
    pub flush_interval: Option<u64>,
    /// Bypass the host page cache (`-n`, or `-t none|directsync`).
    pub direct: bool,
    /// Print nothing (`-q`).
    pub quiet: bool,
}

impl Default for BenchRequest {
    fn default() -> Self {
        Self { count: 75_000, depth: 64, buffer_size: 4096, step: None, offset: 0, write: false, pattern: 0, flush_interval: None, direct: false, quiet: false }
    }
}

/// Largest buffer one request may use (at most 64 threads hold one each: 1 GiB).
const MAX_BUFFER: u64 = 16 << 20;

/// `rvirt-img bench FILE`: returns the run's wall time in seconds.
pub fn bench(path: &Path, format: Option<&str>, req: &BenchRequest) -> Result<f64> {
    if req.flush_interval.is_some() && !req.write {
        bail!("--flush-interval is only available in write tests");
    }
    if req.buffer_size == 0 || req.buffer_size > MAX_BUFFER {
        bail!("Invalid buffer size specified (1 to {MAX_BUFFER} bytes)");
    }
    if req.depth == 0 {
        bail!("Invalid queue depth specified");
    }
    let fmt = format_of(path, format)?;
    let mut opts = access::options(!req.write, true)?;
    opts.direct = req.direct;
    let img = rvirt_block::open_with(path, fmt, &opts).with_context(|| path.display().to_string())?;
    let size = img.size();
    let step = req.step.unwrap_or(req.buffer_size);
    if req.offset.checked_add(req.buffer_size).is_none_or(|end| end > size) {
        bail!("the first request ({} bytes at {}) ends past the image ({size} bytes)", req.buffer_size, req.offset);
    }
    if !req.quiet {
        println!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {step})",
            req.count,
            if req.write { "write" } else { "read" },
            req.buffer_size,
            req.depth,
            req.offset
        );
        if let Some(n) = req.flush_interval {
            println!("Sending flush every {n} requests");
        }
    }
    let next = AtomicU64::new(0);
    let threads = req.depth.min(64).min(req.count.max(1));
    let start = Instant::now();
    let failed: std::sync::Mutex<Option<rvirt_block::Error>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![req.pattern; req.buffer_size as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= req.count {
                        break;
                    }
                    // Request i starts i steps on, modulo the image size as with qemu-img
                    // (a request that then crosses the end fails, as there).
                    let pos = ((req.offset as u128 + i as u128 * step as u128) % size as u128) as u64;
                    let r = if req.write { img.write_at(&buf, pos) } else { img.read_at(&mut buf, pos) };
                    let r = r.and_then(|()| match req.flush_interval {
                        Some(n) if n > 0 && (i + 1) % n == 0 => img.flush(),
                        _ => Ok(()),
                    });
                    if let Err(e) = r {
                        failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        next.store(req.count, Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(anyhow::Error::new(e).context("Failed request"));
    }
    if req.write {
        img.flush()?;
    }
    let secs = start.elapsed().as_secs_f64();
    if !req.quiet {
        println!("Run completed in {secs:.3} seconds.");
    }
    Ok(secs)
}
