//! Raw images: the file is the disk. Holes stay holes: discard punches them,
//! write-zeroes uses `FALLOC_FL_ZERO_RANGE`/`PUNCH_HOLE`, and the allocation
//! map comes from `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{check_range, io_err, push_extent, BlockBackend, Error, Extent, ExtentKind, Result};

/// A raw image file.
pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl RawImage {
    /// Opens `path`; `read_only` opens the file O_RDONLY so nothing can write it.
    pub fn open(path: &Path, read_only: bool) -> Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(|e| io_err(path, e))?;
        let meta = file.metadata().map_err(|e| io_err(path, e))?;
        if !meta.is_file() && !is_block_device(&meta) {
            return Err(Error::Corrupt { path: path.display().to_string(), detail: "not a regular file or block device".into() });
        }
        let size = device_size(&file).map_err(|e| io_err(path, e))?;
        Ok(Self { file, path: path.to_path_buf(), size, read_only })
    }

    /// Creates (or truncates) a sparse raw image of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(|e| io_err(path, e))?;
        file.set_len(size).map_err(|e| io_err(path, e))?;
        Ok(Self { file, path: path.to_path_buf(), size, read_only: false })
    }

    /// Allocates every block of the file: reserved with `fallocate`, or
    /// (`write_zeros`, qemu-img's `preallocation=full`) written with zeros.
    pub fn preallocate(&self, write_zeros: bool) -> Result<()> {
        self.writable()?;
        if !write_zeros {
            return self.fallocate(0, 0, self.size).map_err(|e| self.err(e));
        }
        crate::write_zeros(&self.file, 0, self.size).map_err(|e| self.err(e))?;
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

fn is_block_device(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_block_device()
}

fn device_size(f: &File) -> std::io::Result<u64> {
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
        self.file.read_exact_at(buf, offset).map_err(|e| self.err(e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.writable()?;
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset).map_err(|e| self.err(e))
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
            self.file.write_all_at(&zeros[..n], offset + done).map_err(|e| self.err(e))?;
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
