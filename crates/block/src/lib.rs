//! Disk images for rvirt: one [`BlockBackend`] interface (byte-addressed
//! read, write, flush, discard, write-zeroes, size and allocation map) over
//! the formats users bring: [`RawImage`] (sparse files) and [`Qcow2Image`].
//!
//! Backends are `Send + Sync`: several virtio queues may issue requests
//! concurrently. Every malformed image is refused with an [`Error`] naming
//! the problem; nothing here panics on file contents.

pub mod detect;
pub mod direct;
pub mod file;
#[doc(hidden)]
pub mod fuzzing;
pub mod iso9660;
pub mod lock;
pub mod qcow2;
pub mod raw;

use std::path::{Path, PathBuf};

pub use detect::probe_format;
pub use file::ImageFile;
pub use lock::Locking;
pub use qcow2::Qcow2Image;
pub use raw::RawImage;

/// Errors of the image library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The underlying file failed.
    #[error("{path}: {source}")]
    Io {
        /// The image file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid image of the expected format.
    #[error("{path}: {detail}")]
    Corrupt {
        /// The image file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The image uses something this library does not implement.
    #[error("{path}: unsupported: {detail}")]
    Unsupported {
        /// The image file.
        path: String,
        /// What is not supported.
        detail: String,
    },
    /// A request is outside the image or otherwise invalid.
    #[error("{0}")]
    Request(String),
    /// The image was opened read-only.
    #[error("{0}: image is read-only")]
    ReadOnly(String),
    /// Another process holds the image in a way this open cannot share.
    #[error("{path}: image is in use: {detail} (is another VM or tool using it? -U/--force-share reads it anyway)")]
    Locked {
        /// The image file.
        path: String,
        /// Which permission conflicts.
        detail: String,
    },
}

/// Result type of the image library.
pub type Result<T> = std::result::Result<T, Error>;

/// What a range of an image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated in this image and holding data.
    Data,
    /// Reads as zeros (a hole, or a zero cluster).
    Zero,
    /// Not allocated here: reads come from the backing image.
    Backing,
}

/// A contiguous range of an image with one [`ExtentKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What it holds.
    pub kind: ExtentKind,
}

/// The interface every image format offers the VMM and tools.
pub trait BlockBackend: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Reads consecutive bytes from `offset` into `bufs`, in order: one
    /// guest request scattered over many pages. Formats that can do it in
    /// one system call (raw: `preadv`) override this loop.
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> Result<()> {
        let mut pos = offset;
        for b in bufs.iter_mut() {
            self.read_at(b, pos)?;
            pos += b.len() as u64;
        }
        Ok(())
    }
    /// Writes `bufs` one after the other from `offset` (raw: one `pwritev`).
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> Result<()> {
        let mut pos = offset;
        for b in bufs {
            self.write_at(b, pos)?;
            pos += b.len() as u64;
        }
        Ok(())
    }
    /// Makes completed writes durable.
    fn flush(&self) -> Result<()>;
    /// Tells the image `length` bytes at `offset` are no longer needed (they read as zeros after).
    fn discard(&self, offset: u64, length: u64) -> Result<()>;
    /// Makes `length` bytes at `offset` read as zeros, cheaply where the format allows.
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()>;
    /// The allocation map of `offset..offset+length`, in order, merged.
    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>>;
    /// Says `length` bytes at `offset` are about to be written whole (a bulk
    /// copy): a format that can reserve their blocks in one call does, which
    /// spares the file system allocating them page by page as writes land.
    /// A hint: nothing is changed that reads could see, and failures are ignored.
    fn reserve(&self, _offset: u64, _length: u64) {}
    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;
    /// What a read-only open went on without (a damaged snapshot table or
    /// refcount structure): warnings for the user; reads are unaffected.
    fn damage(&self) -> Vec<String> {
        Vec::new()
    }
    /// Takes an internal snapshot named `name` of the image as it is now
    /// (a running VM's disks, in the pause of its snapshot); formats
    /// without them refuse.
    fn create_snapshot(&self, name: &str) -> Result<()> {
        Err(Error::Request(format!("cannot take internal snapshot '{name}': the image's format has no internal snapshots (qcow2 has)")))
    }
    /// Deletes the internal snapshot named `name` (by name only, never by
    /// id: a domain snapshot called "2" is not the image's snapshot id 2).
    fn delete_snapshot(&self, name: &str) -> Result<()> {
        Err(Error::Request(format!("cannot delete internal snapshot '{name}': the image's format has no internal snapshots")))
    }
    /// Whether the image holds an internal snapshot named `name`.
    fn has_snapshot(&self, name: &str) -> bool {
        let _ = name;
        false
    }
}

/// Image formats this library reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A plain (possibly sparse) file.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl Format {
    /// The name qemu-img uses.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parses a qemu-img format name.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(Error::Request(format!("unknown image format '{s}' (expected raw or qcow2)"))),
        }
    }
}

/// One layer of a backing chain, named by the caller rather than found
/// inside an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
}

/// How a qcow2 image's backing file is found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Follow the name in the header; the image must record the backing
    /// file's format (libvirt's rule: a format is never guessed from
    /// contents a guest may have written).
    #[default]
    RecordedFormat,
    /// Follow the name and probe the backing file's format when none is
    /// recorded: the user opted in, trusting the backing file.
    Probe,
    /// The layers below this image, top first, resolved by the caller
    /// (rvirtd hands the VMM its chains this way): no file is opened by a
    /// name read from an image.
    Given(Vec<Layer>),
    /// Open this layer alone; ranges it does not store read as zeros
    /// (header edits, and commit, which copies only what the top stores).
    Ignore,
}

/// How an image is opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// Open the file (and its chain) read-only.
    pub read_only: bool,
    /// What other users of the file may do meanwhile.
    pub locking: Locking,
    /// Where the backing chain comes from.
    pub backing: BackingPolicy,
    /// Bypass the host page cache (O_DIRECT, QEMU's cache=none) for the
    /// image itself; its backing files are read through the cache.
    pub direct: bool,
}

impl ImageOptions {
    /// A read-only open with default locking and backing rules.
    pub fn read_only() -> Self {
        Self { read_only: true, ..Self::default() }
    }
}

/// Opens an image of `format`. The format is never probed here: callers
/// probe only files a user named ([`probe_format`]).
pub fn open(path: &Path, format: Format, read_only: bool) -> Result<Box<dyn BlockBackend>> {
    open_with(path, format, &ImageOptions { read_only, ..ImageOptions::default() })
}

/// Opens an image of `format` with `opts`.
pub fn open_with(path: &Path, format: Format, opts: &ImageOptions) -> Result<Box<dyn BlockBackend>> {
    Ok(match format {
        Format::Raw => Box::new(RawImage::open_with(path, opts)?),
        Format::Qcow2 => Box::new(Qcow2Image::open_with(path, opts)?),
    })
}

/// The backing chain below the image at `path` (top first), read from the
/// headers of qcow2 layers without opening them for I/O or locking them.
/// Each layer's format must be recorded by the layer above it (or probed
/// with [`BackingPolicy::Probe`]); `json:` names, loops and chains deeper
/// than [`qcow2::MAX_CHAIN_DEPTH`] are refused.
pub fn backing_chain(path: &Path, format: Format, policy: &BackingPolicy) -> Result<Vec<Layer>> {
    let mut chain = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let (mut cur, mut fmt) = (path.to_path_buf(), format);
    while fmt == Format::Qcow2 {
        qcow2::enter_chain(&mut seen, &cur)?;
        let Some((name, recorded)) = qcow2::read_backing_name(&cur)? else { break };
        let next = qcow2::resolve_backing(&cur, &name);
        fmt = qcow2::backing_format_for(&cur, &name, &next, recorded, policy)?;
        chain.push(Layer { path: next.clone(), format: fmt });
        cur = next;
    }
    Ok(chain)
}

/// Whether `buf` is all zeros (fast: ORs 4 KiB at a time, which vectorises).
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// `fallocate(2)` on `f` with `mode` (0 allocates; punch-hole flags free).
pub(crate) fn fallocate(f: &std::fs::File, mode: i32, offset: u64, length: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor the caller owns, with plain integer arguments.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as libc::off_t, length as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Writes zeros over `from..to` of `f` (what `preallocation=full` asks for).
pub(crate) fn write_zeros(f: &dyn ImageFile, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// A path named `name` in this test process's scratch directory for `tag`.
#[cfg(test)]
pub(crate) fn test_path(tag: &str, name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rvirt-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// The library's error for an OS error on `path`.
pub(crate) fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.display().to_string(), source }
}

/// Checks that `offset..offset+len` lies inside an image of `size` bytes.
pub(crate) fn check_range(size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::Request(format!("request {offset}+{len} is beyond the image's {size} bytes"))),
    }
}

/// Appends `e` to `out`, merging it with the last extent when they touch and match.
pub(crate) fn push_extent(out: &mut Vec<Extent>, e: Extent) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.kind == e.kind && last.offset + last.length == e.offset {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}
