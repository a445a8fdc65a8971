//! Guest memory the VMM writes itself (device workers' DMA, fw_cfg's),
//! which KVM's dirty log does not see. A live migration turns tracking on
//! for the VM (one per process) and takes the pages written since, pass
//! after pass; with tracking off, marking costs one uncontended read lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

const PAGE: u64 = 4096;

static TRACKER: RwLock<Option<Arc<Vec<AtomicU64>>>> = RwLock::new(None);

fn tracker() -> Option<Arc<Vec<AtomicU64>>> {
    TRACKER.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Starts tracking writes below guest-physical address `limit`, forgetting
/// any earlier marks.
pub fn start(limit: u64) {
    let words = limit.div_ceil(PAGE).div_ceil(64) as usize;
    *TRACKER.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new((0..words).map(|_| AtomicU64::new(0)).collect()));
}

/// Stops tracking.
pub fn stop() {
    *TRACKER.write().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Records that the VMM wrote `len` bytes at `gpa` (after writing them).
pub fn mark(gpa: u64, len: u64) {
    let Some(bits) = tracker() else { return };
    if len == 0 {
        return;
    }
    let (first, last) = (gpa / PAGE, gpa.saturating_add(len - 1) / PAGE);
    for page in first..=last {
        if let Some(w) = bits.get((page / 64) as usize) {
            w.fetch_or(1 << (page % 64), Ordering::SeqCst);
        }
    }
}

/// The guest-physical addresses of the pages written since the last call
/// (or since [`start`]), ascending; empty when not tracking.
pub fn take() -> Vec<u64> {
    let Some(bits) = tracker() else { return Vec::new() };
    let mut out = Vec::new();
    for (i, w) in bits.iter().enumerate() {
        let mut v = w.swap(0, Ordering::SeqCst);
        while v != 0 {
            let b = u64::from(v.trailing_zeros());
            v &= v - 1;
            out.push((i as u64 * 64 + b) * PAGE);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_kept_per_page_only_while_tracking_and_taken_once() {
        // One test: the tracker is the process's.
        mark(0x1000, 1);
        start(1 << 30);
        assert!(take().is_empty(), "marks before the start are not kept");
        mark(0x1fff, 2);
        mark(0x10_0000, 4096);
        mark(0x5000, 0);
        mark(u64::MAX - 10, 100);
        assert_eq!(take(), [0x1000, 0x2000, 0x10_0000]);
        assert!(take().is_empty());
        stop();
        mark(0x3000, 1);
        assert!(take().is_empty());
    }
}
