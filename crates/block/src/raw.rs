//! Raw images: the file is the disk. Holes stay holes: discard punches them,
//! write-zeroes uses `FALLOC_FL_ZERO_RANGE`/`PUNCH_HOLE`, and the allocation
//! map comes from `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::direct::{AlignedBuf, DIRECT_ALIGN};
use crate::file::{open_checked, Kind};
use crate::lock::Permissions;
use crate::{check_range, io_err, push_extent, BlockBackend, Error, Extent, ExtentKind, ImageOptions, Result};

/// A raw image file.
pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    direct: bool,
}

impl RawImage {
    /// Opens `path`; `read_only` opens the file O_RDONLY so nothing can write it.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_with(path, &ImageOptions { read_only, ..ImageOptions::default() })
    }

    /// Opens `path` with O_DIRECT: I/O bypasses the host page cache (QEMU's
    /// `cache=none`). Unaligned requests go through an aligned bounce buffer.
    pub fn open_direct(path: &Path, read_only: bool) -> Result<Self> {
        Self::open_with(path, &ImageOptions { read_only, direct: true, ..ImageOptions::default() })
    }

    /// Opens `path` as `opts` say: a regular file or block device (anything
    /// else is refused without blocking), locked as QEMU locks it.
    pub fn open_with(path: &Path, opts: &ImageOptions) -> Result<Self> {
        let flags = if opts.direct { libc::O_DIRECT } else { 0 };
        let file = open_checked(path, !opts.read_only, Kind::RegularOrBlock, flags).map_err(|e| {
            let e = if opts.direct { std::io::Error::new(e.kind(), format!("O_DIRECT: {e}")) } else { e };
            io_err(path, e)
        })?;
        crate::lock::lock(&file, path, Permissions::for_image(opts.read_only, false, opts.locking))?;
        Self::from_locked(file, path, opts.read_only, opts.direct)
    }

    /// A read-only raw image on a file opened by someone else (a descriptor
    /// passed to a jailed VMM), `name` naming it in messages; refused unless
    /// a regular file or block device, locked as [`RawImage::open_with`] locks.
    pub fn from_file(file: std::fs::File, name: &Path, opts: &ImageOptions) -> Result<Self> {
        crate::file::check_kind(&file, Kind::RegularOrBlock).map_err(|e| io_err(name, e))?;
        crate::lock::lock(&file, name, Permissions::for_image(true, false, opts.locking))?;
        Self::from_locked(file, name, true, false)
    }

    /// Opens a raw backing file: read-only, locked so nobody changes it underneath.
    pub(crate) fn open_backing(path: &Path, locking: crate::Locking) -> Result<Self> {
        let file = open_checked(path, false, Kind::RegularOrBlock, 0).map_err(|e| io_err(path, e))?;
        crate::lock::lock(&file, path, Permissions::for_backing(locking))?;
        Self::from_locked(file, path, true, false)
    }

    fn from_locked(file: File, path: &Path, read_only: bool, direct: bool) -> Result<Self> {
        let size = device_size(&file).map_err(|e| io_err(path, e))?;
        Ok(Self { file, path: path.to_path_buf(), size, read_only, direct })
    }

    fn aligned(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        !self.direct || (ptr as usize % 512 == 0 && len % 512 == 0 && offset % 512 == 0)
    }

    /// Moves a whole vectored request with one `preadv`/`pwritev` when it can
    /// go to the file as it is (always, unless O_DIRECT wants alignment the
    /// pieces lack). `Ok(false)`: nothing moved, go piece by piece.
    ///
    /// # Safety
    /// As [`transfer_vectored`].
    unsafe fn try_vectored(&self, mut iov: Vec<libc::iovec>, offset: u64, write: bool) -> Result<bool> {
        if self.direct && (offset % 512 != 0 || !iov.iter().all(|v| self.aligned(v.iov_base as *const u8, v.iov_len, 0))) {
            return Ok(false);
        }
        // SAFETY: the caller's promise.
        match unsafe { transfer_vectored(&self.file, &mut iov, offset, write) } {
            Ok(()) => Ok(true),
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// The block-aligned span around `offset..offset+len` read into a bounce buffer.
    fn bounce_read(&self, offset: u64, len: usize) -> std::io::Result<(AlignedBuf, usize)> {
        crate::direct::bounce_read(&self.file, offset, len).map(|(buf, skip, _)| (buf, skip))
    }

    fn read_direct(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            match self.file.read_exact_at(buf, offset) {
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        let (mut bounce, skip) = self.bounce_read(offset, buf.len())?;
        buf.copy_from_slice(&bounce.bytes()[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_direct(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.aligned(buf.as_ptr(), buf.len(), offset) {
            match self.file.write_all_at(buf, offset) {
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        // Read-modify-write of the aligned span.
        let (mut bounce, skip) = self.bounce_read(offset, buf.len())?;
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let span = ((offset + buf.len() as u64).div_ceil(a) * a).min(self.size.div_ceil(a) * a) - start;
        bounce.bytes()[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(&bounce.bytes()[..span as usize], start)?;
        if self.file.metadata()?.len() > self.size {
            // The last block was written whole: put the file's size back.
            self.file.set_len(self.size)?;
        }
        Ok(())
    }

    /// Creates (or truncates) a sparse raw image of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = crate::file::create_locked(path)?;
        file.set_len(size).map_err(|e| io_err(path, e))?;
        Ok(Self { file, path: path.to_path_buf(), size, read_only: false, direct: false })
    }

    /// Changes the size of the file (`rvirt-img resize` on a raw image).
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.writable()?;
        self.file.set_len(new_size).map_err(|e| self.err(e))?;
        self.size = new_size;
        Ok(())
    }

    /// Allocates every block of the file: reserved with `fallocate`, or
    /// (`write_zeros`, qemu-img's `preallocation=full`) written with zeros.
    pub fn preallocate(&self, write_zeros: bool) -> Result<()> {
        self.preallocate_from(0, write_zeros)
    }

    /// Allocates the blocks from `from` to the end (the area a resize added).
    pub fn preallocate_from(&self, from: u64, write_zeros: bool) -> Result<()> {
        self.writable()?;
        let from = from.min(self.size);
        if !write_zeros {
            return self.fallocate(0, from, self.size - from).map_err(|e| self.err(e));
        }
        crate::write_zeros(&self.file, from, self.size).map_err(|e| self.err(e))?;
        self.file.sync_data().map_err(|e| self.err(e))
    }

    fn err(&self, e: std::io::Error) -> Error {
        io_err(&self.path, e)
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly(self.path.display().to_string()))
        } else {
            Ok(())
        }
    }

    fn fallocate(&self, mode: i32, offset: u64, length: u64) -> std::io::Result<()> {
        crate::fallocate(&self.file, mode, offset, length)
    }

    fn seek(&self, offset: u64, whence: i32) -> Option<u64> {
        // SAFETY: lseek on a descriptor we own; the position is not shared with readers (they use pread).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        (r >= 0).then_some(r as u64)
    }
}

/// Most iovecs one `preadv`/`pwritev` takes (Linux's UIO_MAXIOV).
const MAX_IOV: usize = 1024;

/// Moves all of `iov` from/to `file` at `offset` with `preadv`/`pwritev`,
/// continuing after short transfers.
///
/// # Safety
/// Each iovec must describe memory valid for the transfer's direction for
/// the whole call.
unsafe fn transfer_vectored(file: &File, iov: &mut [libc::iovec], mut offset: u64, write: bool) -> std::io::Result<()> {
    let mut first = 0;
    while first < iov.len() {
        let end = (first + MAX_IOV).min(iov.len());
        let batch = &iov[first..end];
        let (fd, ptr, cnt, off) = (file.as_raw_fd(), batch.as_ptr(), batch.len() as libc::c_int, offset as libc::off_t);
        // SAFETY: the caller vouches for the buffers; the iovec array is ours.
        let n = unsafe { if write { libc::pwritev(fd, ptr, cnt, off) } else { libc::preadv(fd, ptr, cnt, off) } };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            let kind = if write { std::io::ErrorKind::WriteZero } else { std::io::ErrorKind::UnexpectedEof };
            return Err(std::io::Error::new(kind, "short vectored transfer"));
        }
        offset += n as u64;
        let mut left = n as usize;
        while left > 0 && first < iov.len() {
            let v = &mut iov[first];
            if left >= v.iov_len {
                left -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(left).cast() };
                v.iov_len -= left;
                left = 0;
            }
        }
        while first < iov.len() && iov[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
}

/// Size of a regular file or block device.
pub(crate) fn device_size(f: &File) -> std::io::Result<u64> {
    let meta = f.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // Block devices report 0 as their length; ask for the end instead.
    // SAFETY: lseek on a descriptor we own.
    let end = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(end as u64)
    }
}

impl BlockBackend for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.read_direct(buf, offset).map_err(|e| self.err(e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(self.size, offset, buf.len() as u64)?;
        self.write_direct(buf, offset).map_err(|e| self.err(e))
    }

    fn reserve(&self, offset: u64, length: u64) {
        // Unwritten extents: reads of the range still see zeros until written.
        if !self.read_only && check_range(self.size, offset, length).is_ok() {
            let _ = self.fallocate(0, offset, length);
        }
    }

    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> Result<()> {
        let total = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(self.size, offset, total)?;
        let iov = bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
        // SAFETY: every iovec covers one of `bufs`, borrowed mutably for the call.
        if unsafe { self.try_vectored(iov, offset, false)? } {
            return Ok(());
        }
        let mut pos = offset;
        for b in bufs.iter_mut() {
            self.read_direct(b, pos).map_err(|e| self.err(e))?;
            pos += b.len() as u64;
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> Result<()> {
        self.writable()?;
        let total = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(self.size, offset, total)?;
        let iov = bufs.iter().map(|b| libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() }).collect();
        // SAFETY: every iovec covers one of `bufs`; pwritev only reads them.
        if unsafe { self.try_vectored(iov, offset, true)? } {
            return Ok(());
        }
        let mut pos = offset;
        for b in bufs {
            self.write_direct(b, pos).map_err(|e| self.err(e))?;
            pos += b.len() as u64;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.err(e))
    }

    fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.writable()?;
        check_range(self.size, offset, length)?;
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, length).map_err(|e| self.err(e))
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.writable()?;
        check_range(self.size, offset, length)?;
        if length == 0 {
            return Ok(());
        }
        // Punching a hole both zeroes and keeps the file sparse; fall back to
        // writing zeros where the filesystem cannot.
        if self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, length).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < length {
            let n = (length - done).min(zeros.len() as u64) as usize;
            self.write_direct(&zeros[..n], offset + done).map_err(|e| self.err(e))?;
            done += n as u64;
        }
        Ok(())
    }

    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        check_range(self.size, offset, length)?;
        let end = offset + length;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            // Where does data start at or after pos? None: the rest is a hole.
            let data = self.seek(pos, libc::SEEK_DATA).unwrap_or(end).min(end);
            push_extent(&mut out, Extent { offset: pos, length: data - pos, kind: ExtentKind::Zero });
            if data >= end {
                break;
            }
            let hole = self.seek(data, libc::SEEK_HOLE).unwrap_or(end).min(end);
            push_extent(&mut out, Extent { offset: data, length: hole - data, kind: ExtentKind::Data });
            pos = hole;
        }
        Ok(out)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        crate::test_path("raw", name)
    }

    #[test]
    fn sparse_create_read_write_and_map() {
        let p = tmp("a.raw");
        let img = RawImage::create(&p, 16 << 20).unwrap();
        assert_eq!(img.map(0, 16 << 20).unwrap(), vec![Extent { offset: 0, length: 16 << 20, kind: ExtentKind::Zero }]);
        img.write_at(&[7u8; 4096], 1 << 20).unwrap();
        let mut b = [0u8; 4096];
        img.read_at(&mut b, 1 << 20).unwrap();
        assert_eq!(b, [7u8; 4096]);
        let m = img.map(0, 16 << 20).unwrap();
        assert!(m.iter().any(|e| e.kind == ExtentKind::Data && e.offset <= 1 << 20 && e.offset + e.length >= (1 << 20) + 4096), "{m:?}");
        img.write_zeroes(1 << 20, 4096).unwrap();
        img.read_at(&mut b, 1 << 20).unwrap();
        assert_eq!(b, [0u8; 4096]);
        assert!(img.map(0, 16 << 20).unwrap().iter().all(|e| e.kind == ExtentKind::Zero));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn direct_io_handles_aligned_and_unaligned_requests() {
        let p = tmp("direct.raw");
        RawImage::create(&p, 10_000).unwrap();
        let img = match RawImage::open_direct(&p, false) {
            Ok(i) => i,
            // Filesystems without O_DIRECT (tmpfs before Linux 6.6) refuse the open plainly.
            Err(e) => {
                assert!(e.to_string().contains("O_DIRECT"), "{e}");
                return;
            }
        };
        let mut aligned = AlignedBuf::new(4096);
        aligned.bytes().fill(7);
        img.write_at(aligned.bytes(), 4096).unwrap();
        // Unaligned in buffer, offset and length; crossing the file's last partial block.
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        img.write_at(&data, 9_000 - 3000 + 999).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 10_000, "size kept");
        let mut back = vec![0u8; 3000];
        img.read_at(&mut back, 6999).unwrap();
        assert_eq!(back, data);
        let mut one = [0u8; 1];
        img.read_at(&mut one, 5000).unwrap();
        assert_eq!(one, [7]);
        let plain = std::fs::read(&p).unwrap();
        assert_eq!(&plain[6999..9999], &data[..]);
        assert!(plain[4096..8192 - 1193].iter().all(|b| *b == 7));
        // Vectored: aligned pieces go in one pwritev, an unaligned one falls back.
        let (mut a, mut b) = (AlignedBuf::new(512), AlignedBuf::new(512));
        a.bytes().fill(1);
        b.bytes().fill(2);
        img.write_vectored_at(&[a.bytes(), b.bytes()], 0).unwrap();
        let mut odd = [0u8; 100];
        let (mut c, mut d) = (AlignedBuf::new(512), AlignedBuf::new(512));
        img.read_vectored_at(&mut [c.bytes(), &mut odd[..], &mut d.bytes()[..412]], 0).unwrap();
        assert!(c.bytes().iter().all(|x| *x == 1) && odd.iter().all(|x| *x == 2) && d.bytes()[..412].iter().all(|x| *x == 2));
        img.flush().unwrap();
    }

    #[test]
    fn vectored_reads_and_writes_match_the_file() {
        let p = tmp("vec.raw");
        let img = RawImage::create(&p, 1 << 20).unwrap();
        // 1500 pieces: more than one preadv batch, odd sizes, an empty one.
        let data: Vec<u8> = (0..1500 * 7 + 3).map(|i| (i * 31 % 251) as u8).collect();
        let mut pieces: Vec<&[u8]> = data.chunks(7).collect();
        pieces.insert(3, &[]);
        img.write_vectored_at(&pieces, 4000).unwrap();
        assert_eq!(&std::fs::read(&p).unwrap()[4000..4000 + data.len()], &data[..]);
        let mut back = vec![0u8; data.len()];
        let mut bufs: Vec<&mut [u8]> = back.chunks_mut(5).collect();
        img.read_vectored_at(&mut bufs, 4000).unwrap();
        assert_eq!(back, data);
        let mut big = vec![0u8; 2 << 20];
        assert!(img.read_vectored_at(&mut [&mut big[..]], 0).unwrap_err().to_string().contains("beyond"));
        // A reader needs the writer gone (the image locks of QEMU's layout).
        assert!(RawImage::open(&p, true).err().unwrap().to_string().contains("in use"));
        drop(img);
        let ro = RawImage::open(&p, true).unwrap();
        assert!(matches!(ro.write_vectored_at(&[&[1u8][..]], 0), Err(Error::ReadOnly(_))));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn out_of_range_and_read_only_are_refused() {
        let p = tmp("b.raw");
        RawImage::create(&p, 4096).unwrap();
        let ro = RawImage::open(&p, true).unwrap();
        let mut b = [0u8; 2];
        assert!(ro.read_at(&mut b, 4095).unwrap_err().to_string().contains("beyond"));
        assert!(matches!(ro.write_at(&[1], 0), Err(Error::ReadOnly(_))));
        assert!(matches!(ro.discard(0, 1), Err(Error::ReadOnly(_))));
        assert!(RawImage::open(Path::new("/nonexistent.raw"), true).err().unwrap().to_string().contains("/nonexistent.raw"));
        assert!(RawImage::open(Path::new("/tmp"), true).is_err());
        std::fs::remove_file(p).unwrap();
    }
}
