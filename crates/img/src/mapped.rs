//! A read-only memory map of a source image file, for `convert`: zero
//! detection reads the page cache in place and the destination is written
//! straight from it, one copy of each byte instead of two (into a buffer,
//! then out of it).
//!
//! Reading a mapped page that is no longer in the file (the file shrank) or
//! cannot be read raises SIGBUS. Each range is first populated with
//! `MADV_POPULATE_READ`, which reports both as an error instead. For a file
//! cut between that and the access, a SIGBUS handler maps a page of zeros
//! over the faulting address and marks the map damaged: the copy then ends
//! with an error, not the process. Faults outside every map go to the
//! handler that was there before (by default: the process dies as it would
//! have).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

use anyhow::{bail, Result};

const PAGE: usize = 4096;

/// Maps alive at once (a convert uses one; more are refused, not mapped).
const SLOTS: usize = 8;

/// One live map's address range and whether a fault was caught in it.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    hit: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot { start: AtomicUsize::new(0), end: AtomicUsize::new(0), hit: AtomicBool::new(false) };
static MAPS: [Slot; SLOTS] = [EMPTY; SLOTS];
static HANDLER: Once = Once::new();
/// The SIGBUS disposition before ours, for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &MAPS {
        let (start, end) = (slot.start.load(Ordering::Acquire), slot.end.load(Ordering::Acquire));
        if start != 0 && (start..end).contains(&addr) {
            let page = addr & !(PAGE - 1);
            // SAFETY: replaces one page inside our own read-only map with
            // anonymous zeros (mmap is a plain system call, safe in a handler).
            let r = unsafe {
                libc::mmap(page as *mut libc::c_void, PAGE, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1, 0)
            };
            if r != libc::MAP_FAILED {
                slot.hit.store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not ours: the previous disposition takes the fault when it recurs on
    // return, or (a SIGBUS sent by a process, not a fault) the signal again.
    if let Some(prev) = PREVIOUS.get() {
        // SAFETY: reinstalls the disposition saved before ours.
        unsafe { libc::sigaction(libc::SIGBUS, prev, std::ptr::null_mut()) };
    }
    // SAFETY: as above, the kernel's siginfo.
    if unsafe { (*info).si_code } <= 0 {
        // SAFETY: raise is async-signal-safe.
        unsafe { libc::raise(libc::SIGBUS) };
    }
}

/// Installs the SIGBUS handler once per process; false if it could not be.
fn install_handler() -> bool {
    HANDLER.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the fields are set below.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: sa_mask is ours to initialise.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: a zeroed sigaction receives the previous disposition.
        let mut prev: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: reads the current disposition only.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut prev) } != 0 {
            return;
        }
        let _ = PREVIOUS.set(prev);
        // SAFETY: installs a handler that only touches atomics and maps pages.
        unsafe { libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) };
    });
    PREVIOUS.get().is_some()
}

/// A read-only map of a whole file (see the module documentation).
pub(crate) struct SourceMap {
    base: *mut libc::c_void,
    len: usize,
    slot: &'static Slot,
}

// SAFETY: the map is read-only and lives until drop; slices of it may be
// read from any thread.
unsafe impl Send for SourceMap {}
// SAFETY: as above: shared reads only.
unsafe impl Sync for SourceMap {}

impl SourceMap {
    /// Maps `file` (its whole length), or None when it cannot be: empty,
    /// not a regular file, no free slot, no handler, or mmap refused. The
    /// caller then reads as usual.
    pub(crate) fn new(file: &File) -> Option<Self> {
        let meta = file.metadata().ok()?;
        let len = usize::try_from(meta.len()).ok()?;
        if !meta.is_file() || len == 0 || !install_handler() {
            return None;
        }
        let slot = MAPS.iter().find(|s| s.start.compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Acquire).is_ok())?;
        // SAFETY: a new shared read-only map of a file we hold open.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if base == libc::MAP_FAILED {
            slot.start.store(0, Ordering::Release);
            return None;
        }
        slot.hit.store(false, Ordering::Release);
        slot.end.store(base as usize + len, Ordering::Release);
        slot.start.store(base as usize, Ordering::Release);
        let map = Self { base, len, slot };
        // A kernel without MADV_POPULATE_READ (before 5.14) cannot read
        // ranges safely first: no map then (dropping it frees the slot).
        // SAFETY: the first page of our own map.
        if unsafe { libc::madvise(base, PAGE.min(len), libc::MADV_POPULATE_READ) } != 0 {
            return None;
        }
        Some(map)
    }

    /// The file's bytes `offset..offset+len`, their pages read in first: an
    /// error when they are past the file's end now or cannot be read.
    pub(crate) fn bytes(&self, offset: u64, len: u64) -> Result<&[u8]> {
        let (Ok(start), Ok(n)) = (usize::try_from(offset), usize::try_from(len)) else { bail!("range {offset}+{len} is past the mapped file") };
        if start.checked_add(n).is_none_or(|e| e > self.len) {
            bail!("range {offset}+{len} is past the mapped file ({} bytes)", self.len);
        }
        if n == 0 {
            return Ok(&[]);
        }
        let page_start = start & !(PAGE - 1);
        // SAFETY: the range lies inside our map.
        let r = unsafe { libc::madvise(self.base.cast::<u8>().add(page_start).cast(), start + n - page_start, libc::MADV_POPULATE_READ) };
        if r != 0 {
            bail!("the source file changed size or could not be read during the copy: {}", std::io::Error::last_os_error());
        }
        // SAFETY: inside the map, which lives as long as `self`; read-only.
        Ok(unsafe { std::slice::from_raw_parts(self.base.cast::<u8>().add(start), n) })
    }

    /// Drops the page-table entries of the whole pages inside `bytes` (a
    /// slice of this map that was copied): the pages stay in the page cache,
    /// and unmapping them here, as the copy goes, spares the one thread that
    /// ends the copy tearing down the whole map at once.
    pub(crate) fn release(&self, bytes: &[u8]) {
        let base = self.base as usize;
        let (start, end) = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
        if start < base || end > base + self.len {
            return;
        }
        let (first, last) = (start.next_multiple_of(PAGE), end & !(PAGE - 1));
        if first < last {
            // SAFETY: whole pages inside our map; a later read maps them again.
            unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_DONTNEED) };
        }
    }

    /// Bytes mapped: the file's length when it was mapped.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether a read of the map faulted (the file shrank under it): what
    /// was read since is not the file's, and the copy must fail.
    pub(crate) fn damaged(&self) -> bool {
        self.slot.hit.load(Ordering::Acquire)
    }
}

impl Drop for SourceMap {
    fn drop(&mut self) {
        // The slot is freed first, so a fault no longer matches it.
        self.slot.start.store(0, Ordering::Release);
        // SAFETY: unmaps what `new` mapped; no slice outlives `self`.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_file_and_refuses_past_its_end() {
        let p = std::env::temp_dir().join(format!("rvirt-map-{}", std::process::id()));
        std::fs::write(&p, (0..3 * PAGE).map(|i| (i % 251) as u8).collect::<Vec<_>>()).unwrap();
        let f = File::open(&p).unwrap();
        let m = SourceMap::new(&f).unwrap();
        assert_eq!(m.bytes(PAGE as u64 + 5, 3).unwrap(), &[((PAGE + 5) % 251) as u8, ((PAGE + 6) % 251) as u8, ((PAGE + 7) % 251) as u8]);
        assert!(m.bytes(3 * PAGE as u64 - 1, 2).is_err());
        assert!(m.bytes(u64::MAX, 1).is_err());
        assert!(!m.damaged());
        drop(m);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_file_cut_under_the_map_is_an_error_not_a_crash() {
        let p = std::env::temp_dir().join(format!("rvirt-map-cut-{}", std::process::id()));
        std::fs::write(&p, vec![7u8; 4 * PAGE]).unwrap();
        let f = File::open(&p).unwrap();
        let m = SourceMap::new(&f).unwrap();
        let whole = m.bytes(0, 4 * PAGE as u64).unwrap();
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(PAGE as u64).unwrap();
        // Populating again reports the cut.
        assert!(m.bytes(2 * PAGE as u64, PAGE as u64).is_err());
        // A slice taken before the cut reads zeros past it, and the map says so.
        let tail = std::hint::black_box(&whole[3 * PAGE..]);
        assert!(tail.iter().all(|&b| b == 0));
        assert!(m.damaged());
        assert_eq!(whole[0], 7);
        drop(m);
        std::fs::remove_file(&p).unwrap();
    }
}
