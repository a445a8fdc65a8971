//! `rvirt-img convert`: a parallel, sparse-preserving copy between formats.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use rvirt_block::qcow2::Qcow2Image;
use rvirt_block::{BlockBackend, ExtentKind, Format};

use crate::mapped::SourceMap;
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
    /// Write into an existing destination instead of creating it (`-n`).
    pub existing_target: bool,
    /// With `existing_target`: it already reads as zeros, so zeros are not written (`--target-is-zero`).
    pub target_is_zero: bool,
    /// The new image's backing file (`-B`): only what the source's top layer stores is copied.
    pub backing: Option<String>,
    /// The backing file's format (`-F`).
    pub backing_format: Option<String>,
    /// Smallest run of zeros left unallocated (`-S`; 0 writes everything, fully allocating).
    pub sparse_size: Option<u64>,
    /// Writes may land out of order (`-W`): a qcow2 destination is written by every worker.
    pub out_of_order: bool,
    /// Copy this internal snapshot of the source (`-l`/`-s`: id or name) instead of its active layer.
    pub snapshot: Option<String>,
    /// Bytes per second at most (`-r`).
    pub rate_limit: Option<u64>,
}

/// One piece of work: copy `len` bytes at `pos`, or only make them read as zeros.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    pos: u64,
    len: u64,
    zero_only: bool,
}

/// qemu-img's `-r`: a cap on bytes copied per second, shared by the workers.
struct RateLimit {
    rate: Option<u64>,
    start: std::time::Instant,
    bytes: AtomicU64,
}

impl RateLimit {
    fn new(rate: Option<u64>) -> Self {
        Self { rate, start: std::time::Instant::now(), bytes: AtomicU64::new(0) }
    }

    /// Counts `n` bytes and sleeps until the copy is back under the cap.
    fn take(&self, n: u64) {
        let Some(rate) = self.rate.filter(|&r| r > 0) else { return };
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        let due = std::time::Duration::from_secs_f64(total as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
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

/// How the destination takes the zeros it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Zeros {
    /// Left unallocated: the destination is new and reads zeros there.
    Skip,
    /// Written as zeros the cheap way (zero clusters, holes): a backing file
    /// or an existing destination would otherwise show through.
    Explicit,
    /// Written like data (`-S 0`): a fully allocated destination.
    Allocate,
}

struct Target {
    dest: Dest,
    zeros: Zeros,
}

impl Target {
    fn backend(&self) -> &dyn BlockBackend {
        self.dest.backend()
    }

    /// Writes `buf` at `pos`: data as data, zeros as `zeros` says, `zero`
    /// telling which destination pieces of `buf` are all zero (the readers
    /// found out). Returns the data bytes written.
    fn write(&self, buf: &[u8], pos: u64, zero: &[bool]) -> rvirt_block::Result<u64> {
        match self.zeros {
            Zeros::Allocate => self.backend().write_at(buf, pos).map(|()| buf.len() as u64),
            Zeros::Skip => self.dest.write(buf, pos, zero),
            Zeros::Explicit => {
                let piece = self.dest.alignment() as usize;
                for (i, p) in buf.chunks(piece).enumerate() {
                    if zero[i] {
                        self.backend().write_zeroes(pos + (i * piece) as u64, p.len() as u64)?;
                    }
                }
                self.dest.write(buf, pos, zero)
            }
        }
    }

    /// Which destination pieces of `buf` are all zero, or None when nothing
    /// of it needs writing (all zero, and zeros are left unallocated). A
    /// fully allocated destination (`-S 0`) writes every byte and needs no test.
    fn zero_pieces(&self, buf: &[u8]) -> Option<Vec<bool>> {
        if self.zeros == Zeros::Allocate {
            return Some(Vec::new());
        }
        let zero: Vec<bool> = buf.chunks(self.dest.alignment() as usize).map(rvirt_block::is_zero).collect();
        (self.writes_zeros() || zero.contains(&false)).then_some(zero)
    }

    /// Whether an all-zero buffer still needs writing.
    fn writes_zeros(&self) -> bool {
        self.zeros != Zeros::Skip
    }
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
    /// file) that are not all zero (`zero` says which are), each run of them
    /// in one write: a zero cluster beside data stays unallocated, as with
    /// qemu-img. Returns the bytes written.
    fn write(&self, buf: &[u8], pos: u64, zero: &[bool]) -> rvirt_block::Result<u64> {
        let piece = self.alignment() as usize;
        if let Dest::Qcow2 { img, compress: true } = self {
            let mut written = 0;
            for (i, cluster) in buf.chunks(piece).enumerate() {
                if !zero[i] {
                    img.write_compressed(pos + (i * piece) as u64, cluster)?;
                    written += cluster.len() as u64;
                }
            }
            return Ok(written);
        }
        // One run of data: its blocks reserved at once (a raw file), then written.
        let put = |run: &[u8], at: u64| {
            self.backend().reserve(at, run.len() as u64);
            self.backend().write_at(run, at).map(|()| run.len() as u64)
        };
        let (mut written, mut run_start) = (0u64, None::<usize>);
        for (i, &z) in zero.iter().enumerate() {
            match (z, run_start) {
                (false, None) => run_start = Some(i * piece),
                (true, Some(start)) => {
                    written += put(&buf[start..i * piece], pos + start as u64)?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run_start {
            written += put(&buf[start..], pos + start as u64)?;
        }
        Ok(written)
    }
}

/// Copies every byte that reads as non-zero, with `workers` threads; holes,
/// zero clusters and every all-zero destination cluster (a raw file: page)
/// stay unallocated in the destination (unless a backing file, an existing
/// destination or `-S 0` needs them written).
/// Returns the bytes written.
pub fn convert(req: &ConvertRequest) -> Result<u64> {
    let sfmt = access::format_of(&req.source, req.source_format.as_deref())?;
    let dfmt = Format::parse(req.dest_format.as_deref().unwrap_or("raw"))?;
    check_request(req, dfmt)?;
    // Writing over the source (or a file of its chain) would destroy it as it is read.
    let mut sources = vec![req.source.clone()];
    sources.extend(access::chain_below(&req.source, sfmt)?.into_iter().map(|l| l.path));
    access::refuse_overlap(&req.dest, &sources, "destination")?;
    // A qcow2 source is opened once, as itself: its own layer's map (which
    // ignores the backing chain) says what -B copies and where its data sits
    // in its file. A raw one opens as any image.
    let (qcow2, raw): (Option<Qcow2Image>, Option<Box<dyn BlockBackend>>) = match (&req.snapshot, sfmt) {
        (Some(_), Format::Raw) => bail!("{}: a raw image has no snapshots (-l)", req.source.display()),
        (snapshot, Format::Qcow2) => {
            let img = access::open_qcow2(&req.source, true, true)?;
            match snapshot {
                Some(snap) => img.view_snapshot(snap).with_context(|| req.source.display().to_string())?,
                None => access::warn_damage(&req.source, &img),
            }
            (Some(img), None)
        }
        (None, Format::Raw) => (None, Some(access::open(&req.source, sfmt, true)?)),
    };
    let src: &dyn BlockBackend = match &qcow2 {
        Some(img) => img,
        None => raw.as_deref().context("the source image is not open")?,
    };
    // The source's own layer (not a snapshot's view), and with -B the top
    // whose stored clusters alone are copied.
    let layer = qcow2.as_ref().filter(|_| req.snapshot.is_none());
    let top = layer.filter(|_| req.backing.is_some());
    if req.bitmaps {
        crate::bitmaps::check_copy_bitmaps(&req.source, sfmt, dfmt, req.skip_broken_bitmaps)?;
    }
    let size = src.size();
    // Written under a temporary name, moved into place when complete and
    // removed on any failure (a full disk leaves no half image behind); an
    // existing destination (-n) is written where it is.
    let out = if req.existing_target { None } else { Some(access::Output::new(&req.dest)?) };
    let at = out.as_ref().map_or(req.dest.as_path(), |o| o.path());
    if out.is_some() {
        let create_req = CreateRequest {
            path: req.dest.clone(),
            format: req.dest_format.clone(),
            size: Some(size),
            options: req.options.clone(),
            backing_file: req.backing.clone(),
            backing_format: req.backing_format.clone(),
            unsafe_backing: false,
        };
        create_at(&create_req, at)?;
    }
    let dest = match dfmt {
        Format::Qcow2 => {
            let img = Qcow2Image::open(at, false).with_context(|| req.dest.display().to_string())?;
            img.set_cache_unsafe(!req.flush);
            Dest::Qcow2 { img, compress: req.compress }
        }
        Format::Raw => Dest::Raw(rvirt_block::open(at, dfmt, false).with_context(|| req.dest.display().to_string())?),
    };
    if dest.backend().size() < size {
        bail!("output file is smaller than input file");
    }
    let zeros = match (req.sparse_size, req.backing.is_some() || (req.existing_target && !req.target_is_zero)) {
        (Some(0), _) => Zeros::Allocate,
        (_, true) => Zeros::Explicit,
        _ => Zeros::Skip,
    };
    let dst = Target { dest, zeros };
    let chunks = work(src, top, &dst, size)?;
    let total: u64 = chunks.iter().map(|c| c.len).sum();
    let progress = Progress::new(req.progress);
    let limit = RateLimit::new(req.rate_limit);
    let workers = if req.workers == 0 { DEFAULT_WORKERS } else { req.workers }.min(chunks.len().max(1));
    let chunk = CONVERT_CHUNK.max(dst.dest.alignment());
    // A qcow2 destination grows by appending, and parallel appends contend
    // on the file's inode lock: one writer in order (unless -W). Raw
    // destinations are already full size, and compression wants every core:
    // parallel writes.
    let ordered = matches!(dst.dest, Dest::Qcow2 { compress: false, .. }) && !req.out_of_order;
    // The source read in place where it can be (mapped.rs): a raw file, or
    // the data clusters of a qcow2 file's own layer (not a snapshot's view,
    // not in an external data file). The rest is read as usual.
    let mappable = match sfmt {
        Format::Raw => req.snapshot.is_none(),
        Format::Qcow2 => layer.is_some_and(|l| l.data_file().is_none()),
    };
    let source_file = std::fs::File::open(&req.source).with_context(|| req.source.display().to_string())?;
    let map = if mappable { SourceMap::new(&source_file) } else { None };
    let mapped = map.as_ref().map(|map| Mapped { map, layer });
    let copy = Copy { src, dst: &dst, chunks: &chunks, chunk, workers, progress: &progress, total, limit: &limit, map: mapped };
    let copied = if ordered { copy.ordered()? } else { copy.parallel()? };
    if map.as_ref().is_some_and(SourceMap::damaged) {
        bail!("{}: the file shrank during the copy", req.source.display());
    }
    // A qcow2 destination writes its cached tables here (without fdatasync
    // in the unsafe cache mode), so a full disk is an error, not a silent loss.
    if req.flush || matches!(dst.dest, Dest::Qcow2 { .. }) {
        dst.backend().flush()?;
    }
    // Closing writes the qcow2 tables still cached; only then is the image whole.
    drop(dst);
    if req.bitmaps {
        crate::bitmaps::copy_bitmaps(&req.source, at, req.skip_broken_bitmaps)?;
    }
    if let Some(out) = out {
        out.finish()?;
    }
    progress.finish();
    Ok(copied)
}

/// Refuses what qemu-img refuses, before anything is opened for writing.
fn check_request(req: &ConvertRequest, dfmt: Format) -> Result<()> {
    if req.options.iter().any(|o| o.split(',').any(|kv| kv.starts_with("backing_file="))) {
        bail!("give the new image's backing file with -B (and -F), not -o backing_file");
    }
    if req.compress && dfmt != Format::Qcow2 {
        bail!("-c (compression) needs a qcow2 destination (-O qcow2)");
    }
    if req.skip_broken_bitmaps && !req.bitmaps {
        bail!("--skip-broken-bitmaps is only valid with --bitmaps");
    }
    if req.target_is_zero && !req.existing_target {
        bail!("--target-is-zero requires use of -n flag");
    }
    if req.backing.is_some() {
        if dfmt != Format::Qcow2 {
            bail!("Backing file not supported for file format '{}'", dfmt.name());
        }
        if req.existing_target {
            bail!("-B cannot be used with -n: the existing image keeps its own backing file");
        }
        if req.snapshot.is_some() {
            bail!("-B cannot be used with -l: a snapshot's view has no top layer of its own");
        }
    }
    if req.backing_format.is_some() && req.backing.is_none() {
        bail!("-F needs -B");
    }
    if let Some(s) = req.sparse_size {
        if s % 512 != 0 || s > 16 << 20 {
            bail!("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).");
        }
    }
    if req.existing_target && req.options.iter().any(|o| !o.is_empty()) {
        bail!("-o cannot be used with -n: the existing image is not created");
    }
    Ok(())
}

/// The pieces to copy, aligned for the destination: the extents that may
/// hold data (with -B, those the source's own top layer stores); with
/// explicit zeros, the rest as zero-only pieces; with -S 0, everything.
fn work(src: &dyn BlockBackend, top: Option<&Qcow2Image>, dst: &Target, size: u64) -> Result<Vec<Chunk>> {
    use rvirt_block::qcow2::Stored;
    let align = dst.dest.alignment();
    let chunk = CONVERT_CHUNK.max(align);
    // (offset, length, copied?) for the whole disk.
    let mut ranges: Vec<(u64, u64, Option<bool>)> = Vec::new();
    match top {
        Some(top) => {
            for e in top.host_map(0, size)? {
                // Unallocated in the top: the new backing file shows through.
                let kind = match e.stored {
                    Stored::Unallocated | Stored::Reserved { .. } => None,
                    Stored::Zero { .. } => Some(false),
                    Stored::Data { .. } => Some(true),
                };
                ranges.push((e.offset, e.length, kind));
            }
        }
        None => {
            for e in src.map(0, size)? {
                let data = e.kind == ExtentKind::Data || e.kind == ExtentKind::Backing;
                ranges.push((e.offset, e.length, Some(data)));
            }
        }
    }
    if dst.zeros == Zeros::Allocate {
        ranges = vec![(0, size, Some(true))];
    }
    let mut chunks = Vec::new();
    let mut covered = 0u64;
    for (offset, length, kind) in ranges {
        let Some(data) = kind else { continue };
        if !data && dst.zeros == Zeros::Skip {
            continue;
        }
        let mut pos = if data { (offset / align * align).max(covered) } else { offset.max(covered) };
        let end = if data { (offset + length).next_multiple_of(align).min(size) } else { offset + length };
        while pos < end {
            let n = (end - pos).min(chunk - pos % chunk);
            chunks.push(Chunk { pos, len: n, zero_only: !data });
            pos += n;
        }
        covered = covered.max(end);
    }
    Ok(chunks)
}

/// One copy's shared parts, for its worker threads.
struct Copy<'a> {
    src: &'a dyn BlockBackend,
    dst: &'a Target,
    chunks: &'a [Chunk],
    chunk: u64,
    workers: usize,
    progress: &'a Progress,
    total: u64,
    limit: &'a RateLimit,
    map: Option<Mapped<'a>>,
}

/// The source file mapped, to read chunks in place (see [`crate::mapped`]).
#[derive(Clone, Copy)]
struct Mapped<'a> {
    map: &'a SourceMap,
    /// A qcow2 source's own layer, which says where a chunk's data sits in
    /// its file; None for a raw source (guest offset = file offset).
    layer: Option<&'a Qcow2Image>,
}

impl<'a> Mapped<'a> {
    /// The chunk's bytes in the map, or None when they are not one run of
    /// plain data in the mapped file (compressed, zero, the backing file's,
    /// past the length mapped): those are read as usual.
    fn bytes(&self, c: Chunk) -> Option<Result<&'a [u8]>> {
        let at = match self.layer {
            None => c.pos,
            Some(img) => match img.host_map(c.pos, c.len).ok()?.as_slice() {
                [e] if e.length == c.len => match e.stored {
                    rvirt_block::qcow2::Stored::Data { host: Some(h) } => h,
                    _ => return None,
                },
                _ => return None,
            },
        };
        (at.checked_add(c.len)? <= self.map.len() as u64).then(|| self.map.bytes(at, c.len))
    }
}

/// Where a fetched chunk's bytes are.
enum Bytes<'a> {
    /// In the buffer the reader was given.
    InBuffer,
    /// In the source's map.
    Mapped(&'a [u8]),
}

impl<'a> Copy<'a> {
    /// Unmaps mapped bytes once written (see [`SourceMap::release`]).
    fn release(&self, bytes: &Bytes<'a>) {
        if let (Some(m), Bytes::Mapped(b)) = (self.map, bytes) {
            m.map.release(b);
        }
    }

    /// One chunk for the writer: a zero-only chunk is zeroed in the
    /// destination at once (None); else its bytes, from the source's map
    /// when it has them or read into `buf`, and which destination pieces of
    /// them are all zero (None when nothing is left to write).
    fn fetch(&self, c: Chunk, buf: &mut [u8]) -> Result<Option<(Vec<bool>, Bytes<'a>)>> {
        if c.zero_only {
            self.dst.backend().write_zeroes(c.pos, c.len)?;
            return Ok(None);
        }
        self.limit.take(c.len);
        if let Some(bytes) = self.map.and_then(|m| m.bytes(c)) {
            let data = bytes?;
            let zero = self.dst.zero_pieces(data);
            if zero.is_none() {
                // All zero: nothing to write, and the map is done with them.
                self.release(&Bytes::Mapped(data));
            }
            return Ok(zero.map(|z| (z, Bytes::Mapped(data))));
        }
        self.src.read_at(buf, c.pos)?;
        Ok(self.dst.zero_pieces(buf).map(|z| (z, Bytes::InBuffer)))
    }

    /// Reads the chunks with `workers` threads and writes each non-zero one as
    /// it comes (compression, the expensive part, runs in every worker).
    fn parallel(&self) -> Result<u64> {
        let next = AtomicUsize::new(0);
        let copied = AtomicU64::new(0);
        let done = AtomicU64::new(0);
        let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..self.workers {
                s.spawn(|| {
                    let mut storage = vec![0u8; self.chunk as usize + PAGE];
                    let buf = page_aligned(&mut storage, self.chunk as usize);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&c) = self.chunks.get(i) else { break };
                        let buf = &mut buf[..c.len as usize];
                        let r = self.fetch(c, buf).and_then(|got| {
                            if let Some((zero, bytes)) = got {
                                let data = match bytes {
                                    Bytes::InBuffer => &*buf,
                                    Bytes::Mapped(m) => m,
                                };
                                copied.fetch_add(self.dst.write(data, c.pos, &zero)?, Ordering::Relaxed);
                                self.release(&bytes);
                            }
                            Ok(())
                        });
                        if let Err(e) = r {
                            first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                            next.store(self.chunks.len(), Ordering::Relaxed);
                            break;
                        }
                        self.progress.show(done.fetch_add(c.len, Ordering::Relaxed) + c.len, self.total);
                    }
                });
            }
        });
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(copied.into_inner()),
        }
    }

    /// Reads the chunks with `workers` threads and writes them from one thread in
    /// order, as qemu-img does by default: parallel writers to one file contend
    /// on its inode lock, while in-order appends are cheap. A fixed pool of
    /// buffers bounds memory; a reader takes a buffer before its chunk index, so
    /// the chunk the writer waits for always has one.
    fn ordered(&self) -> Result<u64> {
        use std::collections::BTreeMap;
        use std::sync::mpsc::{channel, sync_channel};
        let chunk = self.chunk as usize;
        let buffers = self.workers * 2;
        // A buffer back from the writer, with the mapped bytes it wrote from
        // (released by the reader, off the writer's path).
        let (free_tx, free_rx) = sync_channel::<(Vec<u8>, Bytes<'a>)>(buffers);
        for _ in 0..buffers {
            let _ = free_tx.send((vec![0u8; chunk + PAGE], Bytes::InBuffer));
        }
        let free_rx = Mutex::new(free_rx);
        type Fetched<'m> = Result<Option<(Vec<bool>, Bytes<'m>)>>;
        let (full_tx, full_rx) = channel::<(usize, Fetched<'a>, Vec<u8>)>();
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            // Owned by this closure, so an early error return drops it before
            // the scope joins the readers, and readers waiting for a buffer stop.
            let free_tx = free_tx;
            for _ in 0..self.workers {
                let full_tx = full_tx.clone();
                let (free_rx, next) = (&free_rx, &next);
                s.spawn(move || loop {
                    let Ok((mut storage, written)) = free_rx.lock().unwrap_or_else(|p| p.into_inner()).recv() else { break };
                    self.release(&written);
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&c) = self.chunks.get(i) else { break };
                    let buf = &mut page_aligned(&mut storage, chunk)[..c.len as usize];
                    let r = self.fetch(c, buf);
                    if full_tx.send((i, r, storage)).is_err() {
                        break;
                    }
                });
            }
            drop(full_tx);
            let (mut pending, mut expected, mut copied, mut done) = (BTreeMap::new(), 0usize, 0u64, 0u64);
            while expected < self.chunks.len() {
                let Ok((i, r, storage)) = full_rx.recv() else { bail!("convert workers stopped early") };
                pending.insert(i, (r, storage));
                while let Some((r, mut storage)) = pending.remove(&expected) {
                    let c = self.chunks[expected];
                    let mut written = Bytes::InBuffer;
                    if let Some((zero, bytes)) = r? {
                        let data = match bytes {
                            Bytes::InBuffer => &page_aligned(&mut storage, chunk)[..c.len as usize],
                            Bytes::Mapped(m) => m,
                        };
                        copied += self.dst.write(data, c.pos, &zero)?;
                        written = bytes;
                    }
                    done += c.len;
                    self.progress.show(done, self.total);
                    let _ = free_tx.send((storage, written));
                    expected += 1;
                }
            }
            Ok(copied)
        })
    }
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
