//! Image files opened with O_DIRECT (QEMU's `cache=none`): I/O bypasses the
//! host page cache, so the guest's data is not cached twice and a host
//! crash loses nothing a guest flush covered. O_DIRECT wants buffers,
//! lengths and offsets aligned; what is not goes through an aligned bounce
//! buffer (read-modify-write for writes).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::RwLock;

use crate::file::ImageFile;

/// Alignment used for O_DIRECT bounce buffers (covers 512-byte and 4 KiB-sector disks).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// A zeroed heap buffer aligned for O_DIRECT.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    /// `len` zero bytes (at least one block), aligned to [`DIRECT_ALIGN`].
    pub(crate) fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN).expect("valid layout");
        // SAFETY: non-zero size; checked for null below.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { ptr, layout }
    }

    /// The whole buffer.
    pub(crate) fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr owns layout.size() initialised bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// A file opened with O_DIRECT, usable under any image format (qcow2 keeps
/// its metadata in small, unaligned writes).
pub struct DirectFile {
    file: File,
    /// Aligned writes share it; a read-modify-write holds it alone, so no
    /// write to the same block can fall between its read and its write.
    rmw: RwLock<()>,
}

impl DirectFile {
    /// Wraps `file`, which must have been opened (or set) with O_DIRECT.
    pub fn new(file: File) -> Self {
        Self { file, rmw: RwLock::new(()) }
    }

    fn aligned(buf: *const u8, len: usize, offset: u64) -> bool {
        (buf as usize).is_multiple_of(512) && len.is_multiple_of(512) && offset.is_multiple_of(512)
    }
}

/// The aligned span around `offset..offset+len` of `file` read into a
/// bounce buffer (zeros past the end of the file), with where `offset`
/// falls in it and how many bytes of it the file holds.
pub(crate) fn bounce_read(file: &File, offset: u64, len: usize) -> io::Result<(AlignedBuf, usize, usize)> {
    let a = DIRECT_ALIGN as u64;
    let start = offset / a * a;
    let end = (offset + len as u64).div_ceil(a) * a;
    let mut buf = AlignedBuf::new((end - start) as usize);
    let bytes = buf.bytes();
    let mut done = 0usize;
    while done < bytes.len() {
        match FileExt::read_at(file, &mut bytes[done..], start + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((buf, (offset - start) as usize, done))
}

impl ImageFile for DirectFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if Self::aligned(buf.as_ptr(), buf.len(), offset) {
            match FileExt::read_at(&self.file, buf, offset) {
                // The device wants more alignment than 512 bytes: bounce.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        let (mut bounce, skip, held) = bounce_read(&self.file, offset, buf.len())?;
        let n = held.saturating_sub(skip).min(buf.len());
        buf[..n].copy_from_slice(&bounce.bytes()[skip..skip + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if Self::aligned(buf.as_ptr(), buf.len(), offset) {
            let _shared = self.rmw.read().unwrap_or_else(|p| p.into_inner());
            match FileExt::write_all_at(&self.file, buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        let _alone = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        let old_len = self.file.metadata()?.len();
        let (mut bounce, skip, _) = bounce_read(&self.file, offset, buf.len())?;
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let span = (offset + buf.len() as u64).div_ceil(a) * a - start;
        bounce.bytes()[skip..skip + buf.len()].copy_from_slice(buf);
        FileExt::write_all_at(&self.file, &bounce.bytes()[..span as usize], start)?;
        // A whole last block was written: the file ends where the write did, or where it was.
        let end = old_len.max(offset + buf.len() as u64);
        if self.file.metadata()?.len() > end {
            File::set_len(&self.file, end)?;
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(&self.file)
    }

    fn len(&self) -> io::Result<u64> {
        ImageFile::len(&self.file)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let _alone = self.rmw.write().unwrap_or_else(|p| p.into_inner());
        File::set_len(&self.file, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        ImageFile::allocate(&self.file, offset, len)
    }

    fn allocated_bytes(&self) -> u64 {
        ImageFile::allocated_bytes(&self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(path: &std::path::Path) -> Option<DirectFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).custom_flags(libc::O_DIRECT).open(path);
        match f {
            Ok(f) => Some(DirectFile::new(f)),
            // tmpfs has no O_DIRECT on older kernels.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn unaligned_reads_and_writes_land_where_a_cached_file_would_put_them() {
        let dir = std::env::temp_dir().join(format!("rvirt-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let Some(f) = direct(&path) else {
            eprintln!("WARNING: no O_DIRECT on {}; skipped", dir.display());
            return;
        };
        let mut model = vec![0u8; 0];
        let mut put = |f: &DirectFile, data: &[u8], at: u64| {
            f.write_all_at(data, at).unwrap();
            let end = at as usize + data.len();
            if model.len() < end {
                model.resize(end, 0);
            }
            model[at as usize..end].copy_from_slice(data);
            assert_eq!(ImageFile::len(f).unwrap(), model.len() as u64, "the file ends where the data does");
        };
        put(&f, &[1u8; 8], 3);
        put(&f, &vec![2u8; 65536], 65536);
        put(&f, &[3u8; 2], 65530);
        put(&f, &vec![4u8; 5000], 131_000);
        put(&f, &[5u8; 1], 0);
        let mut aligned = AlignedBuf::new(8192);
        aligned.bytes().fill(6);
        put(&f, aligned.bytes(), 8192);
        let mut back = vec![0u8; model.len() + 100];
        let mut done = 0;
        while done < back.len() {
            let n = f.read_at(&mut back[done..], done as u64).unwrap();
            if n == 0 {
                break;
            }
            done += n;
        }
        assert_eq!(done, model.len(), "short at the end of the file only");
        assert_eq!(&back[..done], &model[..]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
