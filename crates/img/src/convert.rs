//! `rvirt-img convert`: a parallel, sparse-preserving copy between formats.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use rvirt_block::qcow2::Qcow2Image;
use rvirt_block::{BlockBackend, ExtentKind, Format};

use crate::{access, create_at, CreateRequest};

/// What `convert` copies.
#[derive(Clone, Debug, Default)]
pub struct ConvertRequest {
    /// Source image.
    pub source: std::path::PathBuf,
    /// Source format (probed when `None`).
    pub source_format: Option<String>,
    /// Destination image (created).
    pub dest: std::path::PathBuf,
    /// Destination format (default raw).
    pub dest_format: Option<String>,
    /// `-o` options for the destination (as for create).
    pub options: Vec<String>,
    /// Print progress on stderr.
    pub progress: bool,
    /// Flush the destination at the end. qemu-img's default cache mode for
    /// convert, `unsafe`, does not; the other modes do.
    pub flush: bool,
    /// Write compressed clusters (qcow2 destinations).
    pub compress: bool,
    /// Parallel copy workers (qemu-img's `-m`; 0 means the default, 8).
    pub workers: usize,
    /// Copy the persistent bitmaps too (`--bitmaps`; qcow2 to qcow2).
    pub bitmaps: bool,
    /// With `bitmaps`, leave out inconsistent ones instead of failing (`--skip-broken-bitmaps`).
    pub skip_broken_bitmaps: bool,
}

/// Whether a qemu-img cache mode (`-t`) makes convert flush at the end.
pub fn cache_mode_flushes(mode: &str) -> Result<bool> {
    match mode {
        "unsafe" => Ok(false),
        "none" | "writeback" | "writethrough" | "directsync" => Ok(true),
        _ => bail!("invalid cache mode '{mode}': expected none, writeback, writethrough, directsync or unsafe"),
    }
}

/// Granularity of `convert`'s copy loop.
const CONVERT_CHUNK: u64 = 2 << 20;
/// qemu-img's default number of parallel requests.
const DEFAULT_WORKERS: usize = 8;

const PAGE: usize = 4096;

/// A page-aligned `len`-byte window of `storage` (which has `PAGE` spare
/// bytes): the kernel copies page-cache data to aligned buffers much faster.
fn page_aligned(storage: &mut [u8], len: usize) -> &mut [u8] {
    let skip = storage.as_ptr().align_offset(PAGE).min(PAGE);
    &mut storage[skip..skip + len]
}

/// The destination: a raw file, or a qcow2 image (optionally taking compressed clusters).
enum Dest {
    Raw(Box<dyn BlockBackend>),
    Qcow2 { img: Qcow2Image, compress: bool },
}

impl Dest {
    fn backend(&self) -> &dyn BlockBackend {
        match self {
            Dest::Raw(b) => b.as_ref(),
            Dest::Qcow2 { img, .. } => img,
        }
    }

    /// Whole clusters are what compression takes, and they spare
    /// partial-cluster copy-on-write; raw files want page-sized pieces.
    fn alignment(&self) -> u64 {
        match self {
            Dest::Raw(_) => 4096,
            Dest::Qcow2 { img, .. } => img.header().cluster_size(),
        }
    }

    /// Writes the pieces of `buf` (destination clusters, or pages of a raw
    /// file) that are not all zero, each run of them in one write: a zero
    /// cluster beside data stays unallocated, as with qemu-img. Returns the
    /// bytes written.
    fn write(&self, buf: &[u8], pos: u64) -> rvirt_block::Result<u64> {
        let piece = self.alignment() as usize;
        if let Dest::Qcow2 { img, compress: true } = self {
            let mut written = 0;
            for (i, cluster) in buf.chunks(piece).enumerate() {
                if !rvirt_block::is_zero(cluster) {
                    img.write_compressed(pos + (i * piece) as u64, cluster)?;
                    written += cluster.len() as u64;
                }
            }
            return Ok(written);
        }
        let (mut written, mut run_start) = (0u64, None::<usize>);
        for (i, p) in buf.chunks(piece).enumerate() {
            match (rvirt_block::is_zero(p), run_start) {
                (false, None) => run_start = Some(i * piece),
                (true, Some(start)) => {
                    self.backend().write_at(&buf[start..i * piece], pos + start as u64)?;
                    written += (i * piece - start) as u64;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run_start {
            self.backend().write_at(&buf[start..], pos + start as u64)?;
            written += (buf.len() - start) as u64;
        }
        Ok(written)
    }
}

/// Copies every byte that reads as non-zero, with `workers` threads; holes,
/// zero clusters and every all-zero destination cluster (a raw file: page)
/// stay unallocated in the destination.
/// Returns the bytes written.
pub fn convert(req: &ConvertRequest) -> Result<u64> {
    let sfmt = access::format_of(&req.source, req.source_format.as_deref())?;
    // Writing over the source (or a file of its chain) would destroy it as it is read.
    let mut sources = vec![req.source.clone()];
    sources.extend(access::chain_below(&req.source, sfmt)?.into_iter().map(|l| l.path));
    access::refuse_overlap(&req.dest, &sources, "destination")?;
    let src = access::open(&req.source, sfmt, true)?;
    if req.options.iter().any(|o| o.split(',').any(|kv| kv.starts_with("backing_file="))) {
        bail!("convert does not create backed images; convert first, then rebase");
    }
    let dfmt = Format::parse(req.dest_format.as_deref().unwrap_or("raw"))?;
    if req.compress && dfmt != Format::Qcow2 {
        bail!("-c (compression) needs a qcow2 destination (-O qcow2)");
    }
    if req.skip_broken_bitmaps && !req.bitmaps {
        bail!("--skip-broken-bitmaps is only valid with --bitmaps");
    }
    if req.bitmaps {
        crate::bitmaps::check_copy_bitmaps(&req.source, sfmt, dfmt, req.skip_broken_bitmaps)?;
    }
    // Written under a temporary name, moved into place when complete and
    // removed on any failure (a full disk leaves no half image behind).
    let out = access::Output::new(&req.dest)?;
    let create_req =
        CreateRequest { path: req.dest.clone(), format: req.dest_format.clone(), size: Some(src.size()), options: req.options.clone(), ..Default::default() };
    create_at(&create_req, out.path())?;
    let dst = match dfmt {
        Format::Qcow2 => {
            let img = Qcow2Image::open(out.path(), false).with_context(|| req.dest.display().to_string())?;
            img.set_cache_unsafe(!req.flush);
            Dest::Qcow2 { img, compress: req.compress }
        }
        Format::Raw => Dest::Raw(rvirt_block::open(out.path(), dfmt, false).with_context(|| req.dest.display().to_string())?),
    };
    let size = src.size();
    // Work items: pieces of the extents that may hold data, aligned for the destination.
    let align = dst.alignment();
    let chunk = CONVERT_CHUNK.max(align);
    let mut chunks = Vec::new();
    let mut covered = 0u64;
    for extent in src.map(0, size)? {
        if extent.kind != ExtentKind::Data && extent.kind != ExtentKind::Backing {
            continue;
        }
        let mut pos = (extent.offset / align * align).max(covered);
        let end = (extent.offset + extent.length).next_multiple_of(align).min(size);
        while pos < end {
            let n = (end - pos).min(chunk - pos % chunk);
            chunks.push((pos, n));
            pos += n;
        }
        covered = covered.max(end);
    }
    let total: u64 = chunks.iter().map(|c| c.1).sum();
    let progress = Progress::new(req.progress);
    let workers = if req.workers == 0 { DEFAULT_WORKERS } else { req.workers }.min(chunks.len().max(1));
    // A qcow2 destination grows by appending, and parallel appends contend
    // on the file's inode lock: one writer in order. Raw destinations are
    // already full size, and compression wants every core: parallel writes.
    let copied = if matches!(dst, Dest::Qcow2 { compress: false, .. }) {
        copy_ordered(src.as_ref(), &dst, &chunks, chunk, workers, &progress, total)?
    } else {
        copy_parallel(src.as_ref(), &dst, &chunks, chunk, workers, &progress, total)?
    };
    // A qcow2 destination writes its cached tables here (without fdatasync
    // in the unsafe cache mode), so a full disk is an error, not a silent loss.
    if req.flush || matches!(dst, Dest::Qcow2 { .. }) {
        dst.backend().flush()?;
    }
    // Closing writes the qcow2 tables still cached; only then is the image whole.
    drop(dst);
    if req.bitmaps {
        crate::bitmaps::copy_bitmaps(&req.source, sfmt, out.path(), req.skip_broken_bitmaps)?;
    }
    out.finish()?;
    progress.finish();
    Ok(copied)
}

/// Reads `chunks` with `workers` threads and writes each non-zero one as
/// it comes (compression, the expensive part, runs in every worker).
fn copy_parallel(src: &dyn BlockBackend, dst: &Dest, chunks: &[(u64, u64)], chunk: u64, workers: usize, progress: &Progress, total: u64) -> Result<u64> {
    let next = AtomicUsize::new(0);
    let copied = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut storage = vec![0u8; chunk as usize + PAGE];
                let buf = page_aligned(&mut storage, chunk as usize);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(pos, n)) = chunks.get(i) else { break };
                    let buf = &mut buf[..n as usize];
                    let r = src.read_at(buf, pos).and_then(|()| {
                        if !rvirt_block::is_zero(buf) {
                            copied.fetch_add(dst.write(buf, pos)?, Ordering::Relaxed);
                        }
                        Ok(())
                    });
                    if let Err(e) = r {
                        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e.into());
                        next.store(chunks.len(), Ordering::Relaxed);
                        break;
                    }
                    progress.show(done.fetch_add(n, Ordering::Relaxed) + n, total);
                }
            });
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(copied.into_inner()),
    }
}

/// Reads `chunks` with `workers` threads and writes them from one thread in
/// order, as qemu-img does by default: parallel writers to one file contend
/// on its inode lock, while in-order appends are cheap. A fixed pool of
/// buffers bounds memory; a reader takes a buffer before its chunk index, so
/// the chunk the writer waits for always has one.
fn copy_ordered(src: &dyn BlockBackend, dst: &Dest, chunks: &[(u64, u64)], chunk: u64, workers: usize, progress: &Progress, total: u64) -> Result<u64> {
    use std::collections::BTreeMap;
    use std::sync::mpsc::{channel, sync_channel};
    let buffers = workers * 2;
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(buffers);
    for _ in 0..buffers {
        let _ = free_tx.send(vec![0u8; chunk as usize + PAGE]);
    }
    let free_rx = Mutex::new(free_rx);
    let (full_tx, full_rx) = channel::<(usize, rvirt_block::Result<bool>, Vec<u8>)>();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        // Owned by this closure, so an early error return drops it before
        // the scope joins the readers, and readers waiting for a buffer stop.
        let free_tx = free_tx;
        for _ in 0..workers {
            let full_tx = full_tx.clone();
            let (free_rx, next) = (&free_rx, &next);
            s.spawn(move || loop {
                let Ok(mut storage) = free_rx.lock().unwrap_or_else(|p| p.into_inner()).recv() else { break };
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(pos, n)) = chunks.get(i) else { break };
                let buf = &mut page_aligned(&mut storage, chunk as usize)[..n as usize];
                let r = src.read_at(buf, pos).map(|()| !rvirt_block::is_zero(buf));
                if full_tx.send((i, r, storage)).is_err() {
                    break;
                }
            });
        }
        drop(full_tx);
        let (mut pending, mut expected, mut copied, mut done) = (BTreeMap::new(), 0usize, 0u64, 0u64);
        while expected < chunks.len() {
            let Ok((i, r, storage)) = full_rx.recv() else { bail!("convert workers stopped early") };
            pending.insert(i, (r, storage));
            while let Some((r, mut storage)) = pending.remove(&expected) {
                let (pos, n) = chunks[expected];
                if r? {
                    copied += dst.write(&page_aligned(&mut storage, chunk as usize)[..n as usize], pos)?;
                }
                done += n;
                progress.show(done, total);
                let _ = free_tx.send(storage);
                expected += 1;
            }
        }
        Ok(copied)
    })
}

/// qemu-img's `-p` progress line, shared by worker threads.
pub(crate) struct Progress {
    enabled: bool,
    last: AtomicU64,
}

impl Progress {
    pub(crate) fn new(enabled: bool) -> Self {
        Self { enabled, last: AtomicU64::new(u64::MAX) }
    }

    pub(crate) fn show(&self, done: u64, total: u64) {
        if !self.enabled || total == 0 {
            return;
        }
        let pct = done * 100 / total;
        if self.last.swap(pct, Ordering::Relaxed) != pct {
            eprint!("\r    ({pct}.00/100%)");
        }
    }

    pub(crate) fn finish(&self) {
        if self.enabled {
            eprintln!("\r    (100.00/100%)");
        }
    }
}
