//! Image locks that QEMU's tools and rvirt see alike.
//!
//! QEMU's `file` driver locks bytes of the image file with open file
//! description (OFD) locks, all of them shared (read) locks: byte `100 + n`
//! while it holds permission `n`, byte `200 + n` while it does not let
//! anyone else hold permission `n`. Before it keeps its locks it tests, for
//! every permission it holds, that nobody locks `200 + n`, and for every
//! permission it denies, that nobody locks `100 + n`. The permissions are
//! consistent read (0), write (1), write-unchanged (2) and resize (3).
//! rvirt-vmm, rvirtd and rvirt-img take the same bytes in the same way, so
//! `qemu-img info` fails on an image rvirt-vmm writes, and `rvirt-img
//! resize` fails on one `qemu-io` holds.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// Consistent read: nobody changes the bytes under the reader.
pub const CONSISTENT_READ: u8 = 1 << 0;
/// Writing guest-visible data.
pub const WRITE: u8 = 1 << 1;
/// Writing that leaves the data as it reads (copy-on-read, block jobs).
pub const WRITE_UNCHANGED: u8 = 1 << 2;
/// Changing the file's size.
pub const RESIZE: u8 = 1 << 3;
const ALL: u8 = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// What an open of an image asks of other users of the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// QEMU's default: a reader needs a consistent image (nobody writes or
    /// resizes it), a writer is the only writer.
    #[default]
    Exclusive,
    /// `<shareable/>` disks: several writers may hold the image at once
    /// (the guests coordinate, as with a cluster file system).
    ShareWrite,
    /// `-U` / `--force-share`: a read-only look that takes no locks and
    /// tolerates writers (the result may be inconsistent).
    ForceShare,
}

/// The permissions an open holds and denies others, as QEMU counts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permissions {
    /// Held: byte `100 + n` locked.
    pub held: u8,
    /// Not shared: byte `200 + n` locked.
    pub denied: u8,
}

impl Permissions {
    /// What an image opened by a user (the VMM's disk, a tool) takes:
    /// `resizes` for formats that grow their file (qcow2).
    pub fn for_image(read_only: bool, resizes: bool, locking: Locking) -> Self {
        let held = match (read_only, locking) {
            (_, Locking::ForceShare) => 0,
            (true, _) => CONSISTENT_READ,
            (false, _) => CONSISTENT_READ | WRITE | if resizes { RESIZE } else { 0 },
        };
        let denied = match locking {
            Locking::ForceShare => 0,
            Locking::ShareWrite => RESIZE,
            Locking::Exclusive => WRITE | RESIZE,
        };
        Self { held, denied }
    }

    /// What a backing file of an open image takes: reads, and nobody may
    /// change it underneath (QEMU's rule for backing files).
    pub fn for_backing(locking: Locking) -> Self {
        match locking {
            Locking::ForceShare => Self { held: 0, denied: 0 },
            _ => Self { held: CONSISTENT_READ, denied: WRITE | RESIZE },
        }
    }
}

fn ofd(fd: i32, cmd: i32, typ: i32, byte: i64) -> std::io::Result<libc::flock> {
    // SAFETY: a zeroed flock is a valid value; every field used is set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl.l_pid = 0;
    // SAFETY: fcntl with an OFD lock command and a pointer to a live flock.
    let r = unsafe { libc::fcntl(fd, cmd, &mut fl) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

/// Whether another open file description holds a lock on `byte`.
fn locked_by_others(fd: i32, byte: i64) -> std::io::Result<bool> {
    // An exclusive lock conflicts with anyone's shared lock; our own OFD never conflicts.
    Ok(ofd(fd, libc::F_OFD_GETLK, libc::F_WRLCK, byte)?.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes `perms` on `file` (the image at `path`), or fails naming the
/// permission another process holds or denies. Locks last as long as the
/// file stays open. File systems without OFD locks are let through, as QEMU does.
pub fn lock(file: &File, path: &Path, perms: Permissions) -> Result<()> {
    let fd = file.as_raw_fd();
    let unsupported = |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::ENOLCK) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP));
    // Take our bytes first, then test: of two racing opens, at least one sees the other.
    for n in 0..4 {
        let bit = 1u8 << n;
        for (set, base) in [(perms.held & bit != 0, PERM_BASE), (perms.denied & bit != 0, SHARED_BASE)] {
            let typ = if set { libc::F_RDLCK } else { libc::F_UNLCK };
            match ofd(fd, libc::F_OFD_SETLK, typ, base + n) {
                Ok(_) => {}
                Err(e) if unsupported(&e) => return Ok(()),
                Err(e) => return Err(conflict(path, &format!("locking byte {}: {e}", base + n))),
            }
        }
    }
    for n in 0..4 {
        let bit = 1u8 << n;
        let io = |e: std::io::Error| conflict(path, &format!("testing its locks: {e}"));
        if perms.held & bit != 0 && locked_by_others(fd, SHARED_BASE + n).map_err(io)? {
            release(file);
            return Err(conflict(path, &format!("another process does not share \"{}\"", NAMES[n as usize])));
        }
        if perms.denied & bit != 0 && locked_by_others(fd, PERM_BASE + n).map_err(io)? {
            release(file);
            return Err(conflict(path, &format!("another process holds \"{}\"", NAMES[n as usize])));
        }
    }
    Ok(())
}

/// Drops every lock byte this open file description holds.
fn release(file: &File) {
    for n in 0..4 {
        let _ = ofd(file.as_raw_fd(), libc::F_OFD_SETLK, libc::F_UNLCK, PERM_BASE + n);
        let _ = ofd(file.as_raw_fd(), libc::F_OFD_SETLK, libc::F_UNLCK, SHARED_BASE + n);
    }
}

fn conflict(path: &Path, why: &str) -> Error {
    Error::Locked { path: path.display().to_string(), detail: why.to_string() }
}

/// Which permissions other processes hold on the file at `path` and which
/// they deny (for tests and diagnostics).
pub fn held_by_others(path: &Path) -> Result<Permissions> {
    let f = File::open(path).map_err(|e| crate::io_err(path, e))?;
    let mut p = Permissions { held: 0, denied: 0 };
    for n in 0..4 {
        let io = |e| crate::io_err(path, e);
        if locked_by_others(f.as_raw_fd(), PERM_BASE + n).map_err(io)? {
            p.held |= 1 << n;
        }
        if locked_by_others(f.as_raw_fd(), SHARED_BASE + n).map_err(io)? {
            p.denied |= 1 << n;
        }
    }
    debug_assert!(p.held & !ALL == 0);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> std::path::PathBuf {
        let p = crate::test_path("lock", name);
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        p
    }

    fn open(p: &Path) -> File {
        std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap()
    }

    #[test]
    fn readers_share_and_a_writer_excludes_them() {
        let p = file("rw");
        let w = open(&p);
        lock(&w, &p, Permissions::for_image(false, true, Locking::Exclusive)).unwrap();
        let r = open(&p);
        let e = lock(&r, &p, Permissions::for_image(true, true, Locking::Exclusive)).unwrap_err();
        assert!(e.to_string().contains("holds \"write\""), "{e}");
        // -U looks anyway.
        lock(&r, &p, Permissions::for_image(true, true, Locking::ForceShare)).unwrap();
        let w2 = open(&p);
        assert!(lock(&w2, &p, Permissions::for_image(false, false, Locking::Exclusive)).is_err());
        drop(w);
        // The failed attempt left nothing behind: the image is free again.
        let r1 = open(&p);
        let r2 = open(&p);
        lock(&r1, &p, Permissions::for_image(true, true, Locking::Exclusive)).unwrap();
        lock(&r2, &p, Permissions::for_backing(Locking::Exclusive)).unwrap();
        assert_eq!(held_by_others(&p).unwrap(), Permissions { held: CONSISTENT_READ, denied: WRITE | RESIZE });
        let w3 = open(&p);
        let e = lock(&w3, &p, Permissions::for_image(false, true, Locking::Exclusive)).unwrap_err();
        assert!(e.to_string().contains("does not share \"write\""), "{e}");
    }

    #[test]
    fn shareable_writers_coexist() {
        let p = file("share");
        let a = open(&p);
        let b = open(&p);
        lock(&a, &p, Permissions::for_image(false, false, Locking::ShareWrite)).unwrap();
        lock(&b, &p, Permissions::for_image(false, false, Locking::ShareWrite)).unwrap();
        let c = open(&p);
        assert!(lock(&c, &p, Permissions::for_image(false, false, Locking::Exclusive)).is_err());
    }
}
