//! virtio-balloon: memory overcommit. The host sets a target; the guest
//! driver gives up that many pages (inflate) and the VMM returns them to the
//! host with `madvise(MADV_DONTNEED)`, so the VMM's RSS shrinks. Deflating
//! needs no work: a page given back faults in fresh on its next use.
//!
//! The statistics queue: the driver posts a buffer of its memory figures
//! (free, total, available, caches, swap and fault counts); the device
//! keeps the buffer until the host wants fresh figures, then hands it back
//! and the driver posts new ones.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use rvirt_devices::bus::lock;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::chain::GuestChain;
use crate::worker::{serve_queue, EventLoop, Worker};
use crate::{device_type, ActivateContext, DeviceCounters, Interrupt, InterruptKind, VirtioDevice, COMMON_FEATURES};

/// The balloon's page size (fixed by the spec).
pub const BALLOON_PAGE: u64 = 4096;
/// Feature: the guest may deflate under memory pressure.
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// Feature: the statistics queue (queue 2).
const F_STATS_VQ: u64 = 1 << 1;
/// Queue 0 takes pages from the guest; queue 1 (deflate) gives them back.
const INFLATE: u16 = 0;
/// Queue 2 carries the driver's statistics.
const STATS: u16 = 2;
/// Bytes of one statistic: a little-endian u16 tag and u64 value.
const STAT_LEN: usize = 10;
/// Statistics read from one buffer (the spec defines 10 tags; a longer
/// buffer is read this far and no further).
const MAX_STATS: usize = 16;

/// The spec's statistic tags, by the names the API reports them under.
const STAT_NAMES: [&str; 10] = [
    "swap-in",
    "swap-out",
    "major-faults",
    "minor-faults",
    "free-memory",
    "total-memory",
    "available-memory",
    "disk-caches",
    "hugetlb-allocations",
    "hugetlb-failures",
];

/// The driver's latest statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// Values by name ([`STAT_NAMES`]); memory in bytes, the rest counts.
    pub values: BTreeMap<String, u64>,
    /// How many buffers of statistics the driver has posted (0: none yet).
    pub generation: u64,
    /// When the last one came, in seconds since the epoch (0: never).
    pub updated_unix: u64,
}

struct State {
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    released_bytes: AtomicU64,
    interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
    stats: Mutex<GuestStats>,
    /// Written when the host wants fresh statistics.
    refresh: Option<EventFd>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            target_pages: AtomicU32::new(0),
            actual_pages: AtomicU32::new(0),
            released_bytes: AtomicU64::new(0),
            interrupt: Mutex::new(None),
            stats: Mutex::new(GuestStats::default()),
            refresh: EventFd::new(libc::EFD_NONBLOCK).ok(),
        }
    }
}

/// Controls a balloon from the VMM's API thread.
#[derive(Clone)]
pub struct BalloonHandle {
    state: Arc<State>,
}

impl BalloonHandle {
    /// Asks the guest to give up `bytes` of memory (rounded down to pages).
    pub fn set_target(&self, bytes: u64) {
        let pages = u32::try_from(bytes / BALLOON_PAGE).unwrap_or(u32::MAX);
        self.state.target_pages.store(pages, Ordering::SeqCst);
        if let Some(i) = lock(&self.state.interrupt).as_ref() {
            i.trigger(InterruptKind::Config);
        }
    }

    /// The target in bytes.
    pub fn target_bytes(&self) -> u64 {
        u64::from(self.state.target_pages.load(Ordering::SeqCst)) * BALLOON_PAGE
    }

    /// What the guest says it has given up, in bytes.
    pub fn actual_bytes(&self) -> u64 {
        u64::from(self.state.actual_pages.load(Ordering::SeqCst)) * BALLOON_PAGE
    }

    /// Bytes handed back to the host so far (inflations, counted once per page given).
    pub fn released_bytes(&self) -> u64 {
        self.state.released_bytes.load(Ordering::SeqCst)
    }

    /// The driver's latest statistics, and a request for fresh ones (they
    /// arrive as a later generation, if the driver has a statistics queue).
    pub fn stats(&self) -> GuestStats {
        if let Some(e) = &self.state.refresh {
            let _ = e.write(1);
        }
        lock(&self.state.stats).clone()
    }
}

/// Reads the statistics in `chain` (at most [`MAX_STATS`]) into `state`;
/// unknown tags are skipped, a short or unreadable buffer is an error.
fn read_stats(chain: &GuestChain, mem: &GuestMemoryMmap, state: &State, counters: &DeviceCounters) {
    let n = (chain.readable_len() / STAT_LEN).min(MAX_STATS);
    let mut raw = [0u8; MAX_STATS * STAT_LEN];
    if n == 0 || chain.read(mem, 0, &mut raw[..n * STAT_LEN]).is_err() {
        counters.error();
        return;
    }
    let mut s = lock(&state.stats);
    for e in raw[..n * STAT_LEN].chunks_exact(STAT_LEN) {
        let tag = usize::from(u16::from_le_bytes([e[0], e[1]]));
        let mut v = [0u8; 8];
        v.copy_from_slice(&e[2..10]);
        if let Some(name) = STAT_NAMES.get(tag) {
            s.values.insert((*name).to_string(), u64::from_le_bytes(v));
        }
    }
    s.generation += 1;
    s.updated_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    counters.request(0, (n * STAT_LEN) as u64);
}

/// A memory balloon.
pub struct Balloon {
    state: Arc<State>,
    counters: Arc<DeviceCounters>,
    worker: Option<Worker>,
}

impl Balloon {
    /// A balloon with target 0, and the handle to steer it.
    pub fn new() -> (Self, BalloonHandle) {
        let state = Arc::new(State::default());
        (Self { state: state.clone(), counters: Arc::default(), worker: None }, BalloonHandle { state })
    }
}

/// Most page numbers one inflate request may carry (Linux sends 256; this
/// is 1 GiB of guest memory). A longer chain (descriptors may overlap, so a
/// small guest can describe gigabytes) is refused, not read.
const MAX_INFLATE_PFNS: usize = 1 << 18;
/// Page numbers read from guest memory at a time.
const INFLATE_CHUNK_PFNS: usize = 4096;

/// Releases the guest pages listed in `chain` (little-endian u32 frame
/// numbers), one `madvise` per run of contiguous frames, reading the list
/// in bounded chunks: whatever the guest writes, the VMM holds at most
/// [`INFLATE_CHUNK_PFNS`] page numbers.
fn inflate(chain: &GuestChain, mem: &GuestMemoryMmap, state: &State, counters: &DeviceCounters) {
    let count = chain.readable_len() / 4;
    if count > MAX_INFLATE_PFNS {
        counters.error();
        return;
    }
    let mut raw = vec![0u8; INFLATE_CHUNK_PFNS.min(count) * 4];
    let mut released = 0u64;
    let mut done = 0usize;
    while done < count {
        let n = (count - done).min(INFLATE_CHUNK_PFNS);
        if chain.read(mem, done * 4, &mut raw[..n * 4]).is_err() {
            counters.error();
            break;
        }
        let mut pfns: Vec<u64> = raw[..n * 4].chunks_exact(4).map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect();
        pfns.sort_unstable();
        pfns.dedup();
        released += release_runs(&pfns, mem, counters);
        done += n;
    }
    state.released_bytes.fetch_add(released, Ordering::SeqCst);
    counters.request(0, released);
}

/// `madvise(MADV_DONTNEED)` over each run of contiguous pages in sorted
/// `pfns`; returns the bytes released.
fn release_runs(pfns: &[u64], mem: &GuestMemoryMmap, counters: &DeviceCounters) -> u64 {
    let mut released = 0u64;
    let mut i = 0;
    while i < pfns.len() {
        let mut j = i + 1;
        while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
            j += 1;
        }
        let len = (j - i) as u64 * BALLOON_PAGE;
        match mem.get_slice(GuestAddress(pfns[i] * BALLOON_PAGE), len as usize) {
            Ok(s) => {
                // SAFETY: the range is guest RAM we mapped privately; dropping
                // it only makes the next guest access see zeros.
                let r = unsafe { libc::madvise(s.ptr_guard_mut().as_ptr().cast(), len as usize, libc::MADV_DONTNEED) };
                if r == 0 {
                    released += len;
                } else {
                    counters.error();
                }
            }
            // Outside RAM, or a run crossing into the PCI hole: the guest lied.
            Err(_) => counters.error(),
        }
        i = j;
    }
    released
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 256, 256]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES | F_DEFLATE_ON_OOM | F_STATS_VQ
    }
    fn config_len(&self) -> usize {
        8
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[0..4].copy_from_slice(&self.state.target_pages.load(Ordering::SeqCst).to_le_bytes());
        c[4..8].copy_from_slice(&self.state.actual_pages.load(Ordering::SeqCst).to_le_bytes());
        crate::read_config_bytes(&c, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.state.actual_pages.store(v, Ordering::SeqCst);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), String> {
        let ActivateContext { mem, interrupt, queues, features } = ctx;
        // The statistics queue counts only when the driver took the feature and enabled it.
        let with_stats = features & F_STATS_VQ != 0 && queues.get(usize::from(STATS)).is_some_and(|q| virtio_queue::QueueT::ready(&q.queue));
        let mut queues: Vec<_> = queues.into_iter().take(if with_stats { 3 } else { 2 }).collect();
        if queues.len() < 2 {
            return Err("virtio-balloon needs its inflate and deflate queues".into());
        }
        *lock(&self.state.interrupt) = Some(interrupt.clone());
        let (state, counters) = (self.state.clone(), self.counters.clone());
        /// The token of the host's request for fresh statistics.
        const REFRESH: u64 = 8;
        self.worker = Some(
            Worker::spawn("virtio-balloon", move |kill| {
                let Ok(mut events) = EventLoop::new() else { return };
                for (i, q) in queues.iter().enumerate() {
                    if events.add(&q.event, i as u64).is_err() {
                        return;
                    }
                }
                if events.add(&kill, 9).is_err() {
                    return;
                }
                if let (true, Some(refresh)) = (with_stats, &state.refresh) {
                    if events.add(refresh, REFRESH).is_err() {
                        return;
                    }
                }
                // The statistics buffer the device holds has been read.
                let mut held = false;
                while let Ok(tokens) = events.wait() {
                    if tokens.contains(&9) {
                        return;
                    }
                    for t in tokens {
                        if t == REFRESH {
                            if let Some(r) = &state.refresh {
                                let _ = r.read();
                            }
                            // Hand the held buffer back: the driver answers with fresh figures.
                            // One it posted but whose kick is not yet served is read first.
                            let q = &mut queues[usize::from(STATS)];
                            let mut returned = false;
                            let served = serve_queue(&mut q.queue, &mem, |chain| {
                                if std::mem::replace(&mut returned, true) {
                                    return None;
                                }
                                if !std::mem::replace(&mut held, false) {
                                    match GuestChain::parse(chain, &mem) {
                                        Ok(c) => read_stats(&c, &mem, &state, &counters),
                                        Err(_) => counters.error(),
                                    }
                                }
                                Some(0)
                            });
                            if served.chains > 0 && served.notify {
                                interrupt.trigger(InterruptKind::Queue(STATS));
                            }
                            continue;
                        }
                        let q = &mut queues[t as usize];
                        let _ = q.event.read();
                        let served = serve_queue(&mut q.queue, &mem, |chain| {
                            match GuestChain::parse(chain, &mem) {
                                Ok(c) if t as u16 == INFLATE => inflate(&c, &mem, &state, &counters),
                                Ok(c) if t as u16 == STATS => {
                                    // Kept (not returned) until the host asks again; read once
                                    // however often the driver kicks.
                                    if !std::mem::replace(&mut held, true) {
                                        read_stats(&c, &mem, &state, &counters);
                                    }
                                    return None;
                                }
                                Ok(c) => counters.request(0, c.readable_len() as u64),
                                Err(_) => counters.error(),
                            }
                            Some(0)
                        });
                        if served.notify {
                            interrupt.trigger(InterruptKind::Queue(t as u16));
                        }
                        if served.broken {
                            tracing::error!("virtio-balloon: the guest broke queue {t}");
                            return;
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        *lock(&self.state.interrupt) = None;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }

    fn save_state(&self) -> crate::DeviceState {
        crate::DeviceState::Balloon {
            target_pages: self.state.target_pages.load(Ordering::SeqCst),
            actual_pages: self.state.actual_pages.load(Ordering::SeqCst),
        }
    }

    fn restore_state(&mut self, state: &crate::DeviceState) -> Result<(), String> {
        let crate::DeviceState::Balloon { target_pages, actual_pages } = state else {
            return Err(format!("saved state {state:?} is not a balloon's"));
        };
        self.state.target_pages.store(*target_pages, Ordering::SeqCst);
        self.state.actual_pages.store(*actual_pages, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::QueueT;

    use super::*;

    /// Resident memory of this process, in bytes.
    fn rss() -> u64 {
        let s = std::fs::read_to_string("/proc/self/statm").unwrap();
        s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
    }

    /// A chain of `n` readable descriptors, each `len` bytes at guest address 0
    /// (overlapping: a small guest describing a huge list), popped from a queue.
    fn hostile_chain(mem: &GuestMemoryMmap, n: u16, len: u32) -> GuestChain {
        let mut q = crate::fuzzing::chain_queue(mem, 0x10_0000, &vec![(0, len, 0); usize::from(n)]);
        let chain = q.pop_descriptor_chain(mem).expect("a chain");
        GuestChain::parse(chain, mem).unwrap()
    }

    #[test]
    fn statistics_are_read_by_tag_bounded_and_counted() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let state = State::default();
        let counters = DeviceCounters::default();
        let mut buf = Vec::new();
        for (tag, v) in [(4u16, 1000u64), (5, 4096), (42, 7), (2, 3)] {
            buf.extend_from_slice(&tag.to_le_bytes());
            buf.extend_from_slice(&v.to_le_bytes());
        }
        use vm_memory::Bytes;
        mem.write_slice(&buf, GuestAddress(0x2000)).unwrap();
        let mut q = crate::fuzzing::chain_queue(&mem, 0x10_0000, &[(0x2000, buf.len() as u32, 0)]);
        let chain = GuestChain::parse(q.pop_descriptor_chain(&mem).unwrap(), &mem).unwrap();
        read_stats(&chain, &mem, &state, &counters);
        let s = lock(&state.stats).clone();
        assert_eq!(s.generation, 1);
        assert!(s.updated_unix > 0);
        let want: BTreeMap<String, u64> = [("free-memory", 1000), ("total-memory", 4096), ("major-faults", 3)].into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        assert_eq!(s.values, want, "tag 42 is no statistic");
        // A buffer shorter than one statistic is an error; a huge one is read to the limit.
        let mut q = crate::fuzzing::chain_queue(&mem, 0x10_0000, &[(0x2000, 9, 0)]);
        read_stats(&GuestChain::parse(q.pop_descriptor_chain(&mem).unwrap(), &mem).unwrap(), &mem, &state, &counters);
        assert_eq!(counters.snapshot().errors, 1);
        let mut q = crate::fuzzing::chain_queue(&mem, 0x10_0000, &[(0, 2 << 20, 0)]);
        read_stats(&GuestChain::parse(q.pop_descriptor_chain(&mem).unwrap(), &mem).unwrap(), &mem, &state, &counters);
        assert_eq!(counters.snapshot().bytes_from_guest, (buf.len() + MAX_STATS * STAT_LEN) as u64);
        // The handle asks the worker for fresh figures.
        let handle = BalloonHandle { state: Arc::new(State::default()) };
        assert_eq!(handle.stats().generation, 0);
        assert_eq!(handle.state.refresh.as_ref().unwrap().read().unwrap(), 1);
    }

    #[test]
    fn a_hostile_inflate_list_cannot_grow_the_vmm() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let state = State::default();
        let counters = DeviceCounters::default();
        let before = rss();
        // Descriptors of all 64 MiB each: a page list of gigabytes, refused unread.
        let huge = hostile_chain(&mem, 256, 64 << 20);
        assert!(huge.readable_len() >= 1 << 30, "{}", huge.readable_len());
        inflate(&huge, &mem, &state, &counters);
        assert_eq!(counters.snapshot().errors, 1);
        // At the limit (1 MiB of page numbers, overlapping), read in chunks.
        let at_limit = hostile_chain(&mem, 4, 256 << 10);
        inflate(&at_limit, &mem, &state, &counters);
        assert_eq!(counters.snapshot().errors, 1, "a list within the limit is served");
        let chunks = (MAX_INFLATE_PFNS / INFLATE_CHUNK_PFNS) as u64;
        assert_eq!(state.released_bytes.load(Ordering::SeqCst), chunks * BALLOON_PAGE, "page 0, listed 262,144 times, released once per chunk");
        let grown = rss().saturating_sub(before);
        assert!(grown < 8 << 20, "the VMM grew by {grown} bytes");
    }
}
