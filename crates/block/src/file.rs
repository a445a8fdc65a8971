//! The file under an image, and opening files so that nobody can make an
//! open hang or land on something that is not an image.
//!
//! [`ImageFile`] is what a format reads and writes: a real [`File`] in use,
//! a recording in-memory file in the power-loss tests. [`open_checked`]
//! opens with `O_NONBLOCK` (a FIFO or a device cannot block the open) and
//! checks the type of what was opened (not of what the path named a moment
//! before), so a FIFO, socket, directory or character device given as a
//! kernel, disk or backing file is refused at once.
//!
//! A confined VMM opens nothing by path: its parent (rvirtd) opens each
//! file itself, checks where the descriptor really leads, and passes it;
//! [`pass`] records it under the name the VMM's options use, every open of
//! that name here takes a copy of it, and after [`only_passed`] a name
//! without a descriptor is refused instead of opened.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The byte store under an image format.
pub trait ImageFile: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; short only at the end of the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, growing the file when needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every write so far durable (`fdatasync`): the write barrier.
    fn sync_data(&self) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves blocks for `offset..offset+len` (`fallocate`).
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Bytes the file occupies on disk (what qemu-img calls disk size).
    fn allocated_bytes(&self) -> u64;

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "unexpected end of file")),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl ImageFile for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        crate::fallocate(self, 0, offset, len)
    }
    fn allocated_bytes(&self) -> u64 {
        self.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }
}

/// What kinds of file an open accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Regular files only (kernels, initrds, firmware, qcow2 images).
    Regular,
    /// Regular files and block devices (raw disks).
    RegularOrBlock,
}

/// Opens `path` without blocking (a FIFO or a device cannot hang the
/// caller), close-on-exec and without taking a controlling terminal, then
/// refuses what is not of `kind`, naming what it is. `custom` adds open
/// flags (`O_DIRECT`).
///
/// A name with a passed descriptor ([`pass`]) is not opened: the
/// descriptor is copied and given the same checks (and `custom` flags).
pub fn open_checked(path: &Path, write: bool, kind: Kind, custom: i32) -> io::Result<File> {
    let file = match passed(path, true, write)? {
        Some(file) => {
            if custom != 0 {
                // SAFETY: F_GETFL/F_SETFL on a descriptor we own, plain integer flags.
                let set = unsafe {
                    let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
                    fl >= 0 && libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | custom) == 0
                };
                if !set {
                    return Err(io::Error::last_os_error());
                }
            }
            file
        }
        None => OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC | custom)
            .open(path)?,
    };
    check_kind(&file, kind)?;
    set_blocking(&file);
    Ok(file)
}

/// Descriptors passed for named files, and whether other names are refused.
struct Passed {
    files: BTreeMap<PathBuf, OwnedFd>,
    only: bool,
}

static PASSED: Mutex<Passed> = Mutex::new(Passed { files: BTreeMap::new(), only: false });

fn passed_table() -> std::sync::MutexGuard<'static, Passed> {
    // The table is only ever inserted into: a panic elsewhere leaves it whole.
    PASSED.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Records `fd` as the file named `path`: opens of that name in this
/// process use a copy of it. Refused when the name already has one.
pub fn pass(path: PathBuf, fd: OwnedFd) -> io::Result<()> {
    let mut t = passed_table();
    if t.files.contains_key(&path) {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{}: a descriptor was already passed for it", path.display())));
    }
    t.files.insert(path, fd);
    Ok(())
}

/// From now on a name without a passed descriptor is refused, not opened.
pub fn only_passed() {
    passed_table().only = true;
}

/// Closes every passed descriptor (the copies taken stay open); names stay
/// refused when [`only_passed`] was called.
pub fn forget_passed() {
    passed_table().files.clear();
}

/// A copy of the descriptor passed for `path`, if any, after checking it
/// was opened for what the caller does with it (`read`, `write`); `None`
/// when there is none and names may still be opened; an error when there is
/// none and they may not.
pub fn passed(path: &Path, read: bool, write: bool) -> io::Result<Option<File>> {
    let t = passed_table();
    let Some(fd) = t.files.get(path) else {
        if t.only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "was not passed as a descriptor, and this VMM opens no file by name (its parent passes each with --pass-fd)",
            ));
        }
        return Ok(None);
    };
    // SAFETY: F_GETFL on a descriptor the table owns.
    let mode = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) } & libc::O_ACCMODE;
    let can_read = mode == libc::O_RDONLY || mode == libc::O_RDWR;
    let can_write = mode == libc::O_WRONLY || mode == libc::O_RDWR;
    if (read && !can_read) || (write && !can_write) {
        let want = match (read, write) {
            (true, true) => "reading and writing",
            (false, true) => "writing",
            _ => "reading",
        };
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("was passed as a descriptor not open for {want}")));
    }
    Ok(Some(File::from(fd.as_fd().try_clone_to_owned()?)))
}

/// Refuses an open file that is not of `kind`, naming what it is (a
/// descriptor someone else opened gets the same check as a path we open).
pub fn check_kind(file: &File, kind: Kind) -> io::Result<()> {
    let ft = file.metadata()?.file_type();
    let ok = ft.is_file() || (kind == Kind::RegularOrBlock && ft.is_block_device());
    if !ok {
        let what = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else {
            "not a regular file"
        };
        let want = if kind == Kind::Regular { "a regular file" } else { "a regular file or block device" };
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("is {what}, not {want}")));
    }
    Ok(())
}

/// Creates or empties the image file at `path` for writing: opened without
/// blocking, checked to be a regular file, locked as a writer (so an image
/// a VM or tool holds is refused, not truncated), then truncated.
pub fn create_locked(path: &Path) -> crate::Result<File> {
    let io = |e| crate::io_err(path, e);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    if !file.metadata().map_err(io)?.is_file() {
        return Err(crate::Error::Request(format!("{}: not a regular file; an image is created only as a file", path.display())));
    }
    crate::lock::lock(&file, path, crate::lock::Permissions::for_image(false, true, crate::Locking::Exclusive))?;
    file.set_len(0).map_err(io)?;
    set_blocking(&file);
    Ok(file)
}

/// Back to blocking I/O once the open (the part that could hang) is done.
fn set_blocking(file: &File) {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller owns, plain integer flags.
    unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn fifos_directories_and_devices_are_refused_without_blocking() {
        let p = crate::test_path("file", "fifo");
        let _ = std::fs::remove_file(&p);
        mkfifo(&p);
        // Neither a reader nor a writer is on the other end: a blocking open would hang here.
        for write in [false, true] {
            let e = open_checked(&p, write, Kind::RegularOrBlock, 0).unwrap_err();
            assert!(e.to_string().contains("a FIFO"), "{e}");
        }
        let e = open_checked(Path::new("/tmp"), false, Kind::Regular, 0).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = open_checked(Path::new("/dev/null"), false, Kind::RegularOrBlock, 0).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
    }

    /// (`only_passed` is not called here: the table is the test process's,
    /// and other tests open by path; the VMM's tests cover refusal.)
    #[test]
    fn a_passed_descriptor_stands_for_its_name_with_the_same_checks() {
        let p = crate::test_path("file", "passed");
        std::fs::write(&p, b"passed bytes").unwrap();
        // Names that lead nowhere: only the descriptors make them openable.
        let ro = PathBuf::from(format!("/nonexistent/rvirt-{}/ro.img", std::process::id()));
        let rw = PathBuf::from(format!("/nonexistent/rvirt-{}/rw.img", std::process::id()));
        let fifo_name = PathBuf::from(format!("/nonexistent/rvirt-{}/dir", std::process::id()));
        pass(ro.clone(), File::open(&p).unwrap().into()).unwrap();
        pass(rw.clone(), OpenOptions::new().read(true).write(true).open(&p).unwrap().into()).unwrap();
        pass(fifo_name.clone(), File::open("/tmp").unwrap().into()).unwrap();

        let f = open_checked(&ro, false, Kind::Regular, 0).unwrap();
        let mut buf = [0u8; 6];
        FileExt::read_exact_at(&f, &mut buf, 0).unwrap();
        assert_eq!(&buf, b"passed");
        let e = open_checked(&ro, true, Kind::Regular, 0).unwrap_err();
        assert!(e.to_string().contains("not open for reading and writing"), "{e}");
        let e = passed(&ro, false, true).unwrap_err();
        assert!(e.to_string().contains("not open for writing"), "{e}");
        // Each open is a copy: closing one leaves the next usable.
        drop(f);
        let f = open_checked(&rw, true, Kind::Regular, 0).unwrap();
        FileExt::write_all_at(&f, b"PASSED", 0).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"PASSED bytes");
        // The kind is the descriptor's, checked as a path's would be.
        let e = open_checked(&fifo_name, false, Kind::Regular, 0).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = pass(ro.clone(), File::open(&p).unwrap().into()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        // A name without one is still opened while names are allowed.
        assert!(passed(&p, true, false).unwrap().is_none());
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn regular_files_open_blocking() {
        let p = crate::test_path("file", "plain");
        std::fs::write(&p, b"0123456789").unwrap();
        let f = open_checked(&p, true, Kind::Regular, 0).unwrap();
        // SAFETY: F_GETFL on an open descriptor.
        let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_NONBLOCK, 0, "the open file is blocking again");
    }
}
