//! Descriptors the VMM inherits from its parent: rvirtd opens a domain's
//! files and taps itself, checks where each really leads, and passes them
//! (`--pass-fd N=PATH`, `--net tap=NAME,fd=N`), so a jailed VMM opens
//! nothing by name. They are taken once, before the VMM opens anything.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Taps passed by descriptor, by interface name, until a card takes one.
static TAPS: Mutex<BTreeMap<String, OwnedFd>> = Mutex::new(BTreeMap::new());

fn taps() -> std::sync::MutexGuard<'static, BTreeMap<String, OwnedFd>> {
    TAPS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes ownership of inherited descriptor `n`: it must be open and must
/// have crossed `exec` (no close-on-exec flag), which no descriptor this
/// process opened itself has; it is made close-on-exec from here.
pub fn take(option: &str, n: i32) -> Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the flags of descriptor n, if it exists.
    let flags = unsafe { libc::fcntl(n, libc::F_GETFD) };
    if flags < 0 {
        return Err(Error::Config(format!("{option}: descriptor {n} is not open (was it passed?)")));
    }
    if flags & libc::FD_CLOEXEC != 0 || n < 3 {
        return Err(Error::Config(format!("{option}: descriptor {n} was not inherited (or was already taken)")));
    }
    // SAFETY: F_SETFD on an open descriptor, plain integer flags.
    unsafe { libc::fcntl(n, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: n is open, was inherited (nothing in this process owns it: every
    // descriptor it opens is close-on-exec) and is now marked taken.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Parses `N=PATH` and records descriptor N as the file PATH names.
pub fn pass_file(spec: &str) -> Result<()> {
    let (n, path) = spec
        .split_once('=')
        .filter(|(_, p)| p.starts_with('/'))
        .ok_or_else(|| Error::Config(format!("--pass-fd '{spec}': expected N=PATH with an absolute path")))?;
    let n = crate::config::parse_inherited_fd("--pass-fd", n)?;
    let fd = take("--pass-fd", n)?;
    rvirt_block::file::pass(PathBuf::from(path), fd).map_err(|e| Error::Config(format!("--pass-fd: {e}")))
}

/// Records descriptor `n` as tap `name`.
pub fn pass_tap(name: &str, n: i32) -> Result<()> {
    let fd = take("--net", n)?;
    if taps().insert(name.to_string(), fd).is_some() {
        return Err(Error::Config(format!("--net: tap '{name}' was given twice")));
    }
    Ok(())
}

/// The descriptor passed for tap `name`, once.
pub(crate) fn take_tap(name: &str) -> Option<OwnedFd> {
    taps().remove(name)
}
