//! Live migration between rvirt-vmm processes (issue 26). Guest memory the
//! VMM writes itself (disk reads, received frames, used rings, fw_cfg DMA)
//! bypasses KVM's dirty log: it is tracked by `rvirt_devices::dirty`, and
//! every pass sends the pages of both. Writable disks change hands at the
//! switch-over ([`crate::handover`]): the images must be on storage both
//! VMMs reach (copying disks is not done here).
//!
//! The stream: the source writes [`MAGIC`] and [`VERSION`], then frames of
//! (tag u32, length u32, payload). `HELLO` carries the configuration, each
//! vCPU's CPUID and the firmware image; the destination builds the VM and
//! answers `READY`, or `REFUSE` with the reason, before a page moves (so a
//! foreign stream or another host's CPU never stops the source). `PAGES`
//! frames carry guest pages while the guest runs: every page that is not
//! zero, then the pages KVM's dirty log names, pass after pass, until what
//! is left fits the downtime limit at the speed measured (a guest that
//! never lets it fit is migrated until cancelled, as QEMU does, unless
//! auto-converge slows it). Then the source pauses the guest, stops its
//! devices, sends the last dirty pages, lets go of its writable disks and
//! sends `STATE` (the snapshot state); the destination takes the disks and
//! answers `DONE` once it holds the guest (and runs it), or `REFUSE`. A
//! source that has not read `DONE` lets the guest run on; a destination
//! that has not received the state exits.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::VmFd;
use rvirt_api::{MigrationState, MigrationStatus};
use rvirt_devices::bus::lock;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::{memory, state_file, Error, Result};

/// What a migration stream starts with.
pub const MAGIC: [u8; 8] = *b"RVIRTMIG";
/// The stream version this VMM speaks.
pub const VERSION: u32 = 1;
const PAGE: usize = 4096;
/// Pages in one `PAGES` frame at most.
const PAGES_PER_FRAME: usize = 256;
/// How long either side waits for the other.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

const HELLO: u32 = 1;
const READY: u32 = 2;
const REFUSE: u32 = 3;
const PAGES: u32 = 4;
const STATE: u32 = 5;
const DONE: u32 = 6;

/// Largest frame of each kind: HELLO holds a firmware image (16 MiB at
/// most), STATE a state file, PAGES its pages with their addresses.
fn max_frame(tag: u32) -> usize {
    match tag {
        HELLO => 20 << 20,
        STATE => state_file::HEADER_LEN + state_file::MAX_PAYLOAD as usize,
        PAGES => 4 + PAGES_PER_FRAME * (8 + 4 + PAGE),
        _ => 64 << 10,
    }
}

/// The first thing the source says: what the destination must build.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    /// The VM's configuration (the destination takes backends from its own).
    pub config: VmConfig,
    /// Each vCPU's CPUID as set on the source.
    pub cpuids: Vec<Vec<kvm_cpuid_entry2>>,
    /// The firmware image the guest runs, when it booted through firmware.
    pub firmware_rom: Option<Vec<u8>>,
    /// Each disk's size in bytes as the guest sees it (None: a CD-ROM
    /// drive, whose disc may differ); the destination's images must match.
    pub disk_sizes: Vec<Option<u64>>,
}

impl Hello {
    /// Why the destination's disks (`backends`) cannot stand in for the
    /// source's, if they cannot.
    pub fn check_disks(&self, backends: &crate::virtio::Backends) -> Result<()> {
        if self.disk_sizes.len() != backends.disks.len() {
            return Err(Error::Config(format!("the source has {} disks, this VMM {}", self.disk_sizes.len(), backends.disks.len())));
        }
        for (i, (want, have)) in self.disk_sizes.iter().zip(&backends.disks).enumerate() {
            let have_size = have.image.as_ref().map(|im| im.size());
            if let (Some(want), Some(size)) = (want, have_size) {
                if *want != size {
                    return Err(Error::Config(format!("disk{i}: {} is {size} bytes here, the source's image {want}", have.config.path.display())));
                }
            }
        }
        Ok(())
    }
}

/// A byte stream to the other VMM.
pub trait Stream: Read + Write + Send {}
impl Stream for UnixStream {}
impl Stream for std::net::TcpStream {}

/// Where the destination waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket.
    Unix(PathBuf),
    /// `HOST:PORT`.
    Tcp(String),
}

/// Parses `unix:PATH` or `tcp:HOST:PORT`.
pub fn parse_uri(s: &str) -> Result<Endpoint> {
    match s.split_once(':') {
        Some(("unix", p)) if !p.is_empty() => Ok(Endpoint::Unix(PathBuf::from(p))),
        Some(("tcp", hp)) if hp.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) => Ok(Endpoint::Tcp(hp.to_string())),
        _ => Err(Error::Config(format!("migration URI '{s}': expected unix:PATH or tcp:HOST:PORT"))),
    }
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::Migration(format!("{what}: {e}"))
}

fn connect(ep: &Endpoint) -> Result<Box<dyn Stream>> {
    match ep {
        Endpoint::Unix(p) => {
            let s = UnixStream::connect(p).map_err(|e| Error::Migration(format!("connecting to {}: {e}", p.display())))?;
            s.set_read_timeout(Some(IO_TIMEOUT)).and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT))).map_err(io("socket"))?;
            Ok(Box::new(s))
        }
        Endpoint::Tcp(hp) => {
            use std::net::ToSocketAddrs;
            let addr = hp.to_socket_addrs().map_err(io("resolving the destination"))?.next().ok_or_else(|| Error::Migration(format!("{hp}: no address")))?;
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|e| Error::Migration(format!("connecting to {hp}: {e}")))?;
            s.set_read_timeout(Some(IO_TIMEOUT)).and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT))).map_err(io("socket"))?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
    }
}

/// A destination's listening socket, bound before the VMM confines itself.
pub enum Listener {
    /// A Unix socket (its file is removed when the listener goes).
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(std::net::TcpListener),
}

impl Listener {
    /// Binds `uri`.
    pub fn bind(uri: &str) -> Result<Self> {
        match parse_uri(uri)? {
            Endpoint::Unix(p) => {
                // Bound under a temporary name and renamed once listening: a
                // source that finds the path is never refused for being early.
                let err = |e: std::io::Error| Error::Device(format!("--incoming {}: {e}", p.display()));
                // A socket nobody listens on any more (a destination that was
                // killed) is replaced by the rename below; anything else is kept.
                if let Ok(meta) = std::fs::symlink_metadata(&p) {
                    use std::os::unix::fs::FileTypeExt;
                    let stale = meta.file_type().is_socket()
                        && matches!(UnixStream::connect(&p), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
                    if !stale {
                        let why = if meta.file_type().is_socket() { "another process listens there" } else { "a file that is not a socket is there" };
                        return Err(err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, why)));
                    }
                    tracing::info!("replacing the stale socket {}", p.display());
                }
                let mut tmp = p.clone().into_os_string();
                tmp.push(format!(".{}", std::process::id()));
                let l = UnixListener::bind(&tmp).map_err(err)?;
                std::fs::rename(&tmp, &p).map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    err(e)
                })?;
                Ok(Self::Unix(l, p))
            }
            Endpoint::Tcp(hp) => Ok(Self::Tcp(std::net::TcpListener::bind(&hp).map_err(|e| Error::Device(format!("--incoming {hp}: {e}")))?)),
        }
    }

    /// Waits for the source.
    pub fn accept(&self) -> Result<Box<dyn Stream>> {
        let s: Box<dyn Stream> = match self {
            Self::Unix(l, _) => {
                let (s, _) = l.accept().map_err(io("accepting the source"))?;
                s.set_read_timeout(Some(IO_TIMEOUT)).and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT))).map_err(io("socket"))?;
                Box::new(s)
            }
            Self::Tcp(l) => {
                let (s, _) = l.accept().map_err(io("accepting the source"))?;
                s.set_read_timeout(Some(IO_TIMEOUT)).and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT))).map_err(io("socket"))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
        };
        Ok(s)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn write_frame(s: &mut dyn Stream, tag: u32, parts: &[&[u8]]) -> Result<()> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len).map_err(|_| Error::Migration("a frame over 4 GiB".into()))?;
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&tag.to_le_bytes());
    head[4..].copy_from_slice(&len.to_le_bytes());
    s.write_all(&head).map_err(io("sending"))?;
    for p in parts {
        s.write_all(p).map_err(io("sending"))?;
    }
    Ok(())
}

fn read_frame(s: &mut dyn Stream) -> Result<(u32, Vec<u8>)> {
    let mut head = [0u8; 8];
    s.read_exact(&mut head).map_err(io("receiving"))?;
    let tag = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    if !(HELLO..=DONE).contains(&tag) {
        return Err(Error::Migration(format!("unknown frame {tag}: not an rvirt migration stream")));
    }
    if len > max_frame(tag) {
        return Err(Error::Migration(format!("frame {tag} of {len} bytes is larger than one can be")));
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).map_err(io("receiving"))?;
    Ok((tag, payload))
}

/// Turns KVM's dirty logging of guest RAM on or off (slot = region index,
/// as `memory::register_with_kvm` numbers them).
fn set_dirty_logging(vm: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region.get_host_address(vm_memory::MemoryRegionAddress(0)).map_err(|e| Error::Memory(format!("no host mapping: {e}")))?;
        let desc = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if on { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the same slot, address and mapping as registered at build;
        // only the flags change.
        unsafe { vm.set_user_memory_region(desc) }.map_err(crate::error::kvm("SET_USER_MEMORY_REGION (dirty log)"))?;
    }
    Ok(())
}

/// The guest-physical addresses of pages written since the last call, by
/// the guest (KVM's bitmaps or dirty rings) or by the VMM (device DMA),
/// ascending, once each.
fn dirty_pages(vm: &SourceVm) -> Result<Vec<u64>> {
    let mut out = rvirt_devices::dirty::take();
    match &vm.rings {
        Some(rings) => out.extend(rings.take()?),
        None => {
            for (slot, region) in vm.mem.iter().enumerate() {
                let bitmap = vm.vm_fd.get_dirty_log(slot as u32, region.len() as usize).map_err(crate::error::kvm("GET_DIRTY_LOG"))?;
                for (w, word) in bitmap.iter().enumerate() {
                    let mut bits = *word;
                    while bits != 0 {
                        let b = bits.trailing_zeros() as u64;
                        bits &= bits - 1;
                        out.push(region.start_addr().0 + (w as u64 * 64 + b) * PAGE as u64);
                    }
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// How a page travels in a `PAGES` frame: the low bits of its address word.
const PAGE_RAW: u64 = 0;
/// A page of zeros: no bytes follow.
const PAGE_ZERO: u64 = 1;
/// A zstd frame follows, its length first (u32).
const PAGE_ZSTD: u64 = 2;

/// How pages are sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Encoding {
    /// Compress pages with zstd (level 1) when that makes them smaller.
    pub compress: bool,
}

/// Whether `page` is all zeros: an OR over 16-byte words without an early
/// exit, which the compiler turns into vector instructions (a byte loop
/// that stops at the first non-zero byte is several times slower on
/// mostly-zero memory).
fn is_zero(page: &[u8]) -> bool {
    let words = page.chunks_exact(16).fold(0u128, |acc, w| acc | u128::from_ne_bytes(w.try_into().unwrap_or([0xff; 16])));
    words == 0 && page.chunks_exact(16).remainder().iter().all(|&b| b == 0)
}

/// Appends one page at `gpa` to a `PAGES` frame being built.
fn encode_page(out: &mut Vec<u8>, gpa: u64, page: &[u8], enc: Encoding, zstd: Option<&mut zstd::bulk::Compressor<'_>>) {
    if is_zero(page) {
        out.extend_from_slice(&(gpa | PAGE_ZERO).to_le_bytes());
        return;
    }
    if let (true, Some(z)) = (enc.compress, zstd) {
        if let Ok(c) = z.compress(page) {
            if c.len() + 4 < PAGE {
                out.extend_from_slice(&(gpa | PAGE_ZSTD).to_le_bytes());
                out.extend_from_slice(&(c.len() as u32).to_le_bytes());
                out.extend_from_slice(&c);
                return;
            }
        }
    }
    out.extend_from_slice(&(gpa | PAGE_RAW).to_le_bytes());
    out.extend_from_slice(page);
}

/// Sends `pages` (guest-physical addresses), `PAGES_PER_FRAME` at a time,
/// zero pages as their address only, others raw or compressed as `enc`
/// says, keeping to `bandwidth` bytes per second when set and counting each
/// frame in `status`; returns bytes sent.
fn send_pages(
    s: &mut dyn Stream,
    mem: &GuestMemoryMmap,
    pages: &[u64],
    (bandwidth, enc): (u64, Encoding),
    cancel: &AtomicBool,
    status: &Mutex<MigrationStatus>,
) -> Result<u64> {
    let started = Instant::now();
    let mut sent = 0u64;
    let mut page = vec![0u8; PAGE];
    let mut buf = Vec::with_capacity(4 + PAGES_PER_FRAME * (8 + 4 + PAGE));
    let mut zstd = if enc.compress { zstd::bulk::Compressor::new(1).ok() } else { None };
    for batch in pages.chunks(PAGES_PER_FRAME) {
        if cancel.load(Ordering::SeqCst) {
            return Err(Error::Migration("cancelled".into()));
        }
        buf.clear();
        buf.extend_from_slice(&(batch.len() as u32).to_le_bytes());
        for gpa in batch {
            mem.read_slice(&mut page, GuestAddress(*gpa)).map_err(|e| Error::Memory(format!("migration: page {gpa:#x}: {e}")))?;
            encode_page(&mut buf, *gpa, &page, enc, zstd.as_mut());
        }
        let at = buf.len();
        write_frame(s, PAGES, &[&buf])?;
        sent += at as u64 + 8;
        lock(status).bytes_sent += at as u64 + 8;
        if bandwidth > 0 {
            let due = Duration::from_secs_f64(sent as f64 / bandwidth as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(sent)
}

/// Every page of `mem` that is not all zeros (the destination's memory starts zeroed).
fn nonzero_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
    let mut out = Vec::new();
    let mut page = [0u8; PAGE];
    for region in mem.iter() {
        let start = region.start_addr().0;
        for i in 0..region.len() / PAGE as u64 {
            let gpa = start + i * PAGE as u64;
            if mem.read_slice(&mut page, GuestAddress(gpa)).is_ok() && !is_zero(&page) {
                out.push(gpa);
            }
        }
    }
    out
}

/// What the migration thread asks of the VMM's main loop.
pub enum ToMain {
    /// Pause the guest, stop its devices and send the state.
    SwitchOver,
    /// The migration ended: Ok once the destination holds the guest.
    Finished(std::result::Result<(), String>),
    /// Hold the vCPUs off this share of the time (percent; 0: not at all).
    Throttle(u8),
}

/// The state the main loop sends for the switch-over, and when the guest stopped.
pub type SwitchState = std::result::Result<(Vec<u8>, Instant), String>;

/// The source side of a migration under way, held by the VM.
pub struct Outgoing {
    /// Progress, for `migrate-status`.
    pub status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    messages: Arc<Mutex<VecDeque<ToMain>>>,
    wake: Arc<EventFd>,
    state_tx: Sender<SwitchState>,
    /// Whether the guest is paused for the switch-over.
    pub paused: bool,
}

/// What the migration thread needs from the VM.
pub struct SourceVm {
    /// KVM's VM, for the dirty log.
    pub vm_fd: Arc<VmFd>,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The vCPUs' dirty rings, which replace KVM's bitmaps when the VM has them.
    pub rings: Option<Arc<crate::dirty_ring::DirtyRings>>,
    /// The first frame.
    pub hello: Hello,
    /// Signalled when the thread has a message for the main loop.
    pub wake: Arc<EventFd>,
}

/// The migration's settings.
#[derive(Clone, Debug)]
pub struct Params {
    /// Where the destination waits.
    pub uri: String,
    /// Longest pause.
    pub max_downtime: Duration,
    /// Bytes per second at most (0: no cap).
    pub bandwidth: u64,
    /// How pages are sent.
    pub encoding: Encoding,
    /// Throttle the vCPUs while the guest dirties faster than the link.
    pub auto_converge: bool,
}

impl Outgoing {
    /// Starts migrating `vm` as `params` say, on a thread of its own.
    pub fn start(vm: SourceVm, params: Params) -> Result<Self> {
        let endpoint = parse_uri(&params.uri)?;
        let status = Arc::new(Mutex::new(MigrationStatus { state: MigrationState::Setup, ..Default::default() }));
        let cancel = Arc::new(AtomicBool::new(false));
        let messages = Arc::new(Mutex::new(VecDeque::new()));
        let (state_tx, state_rx) = std::sync::mpsc::channel();
        let wake = vm.wake.clone();
        let ctx = SourceThread { vm, params, endpoint, status: status.clone(), cancel: cancel.clone(), messages: messages.clone(), state_rx };
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || ctx.run())
            .map_err(crate::error::os("spawning the migration thread"))?;
        Ok(Self { status, cancel, messages, wake, state_tx, paused: false })
    }

    /// Asks the migration to stop; the thread ends it at the next page batch.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// The thread's next message, if any.
    pub fn next_message(&self) -> Option<ToMain> {
        let _ = self.wake.read();
        let m = lock(&self.messages).pop_front();
        if !lock(&self.messages).is_empty() {
            let _ = self.wake.write(1);
        }
        m
    }

    /// Gives the thread the stopped guest's state (or why it could not be taken).
    pub fn send_state(&self, state: SwitchState) {
        let _ = self.state_tx.send(state);
    }
}

struct SourceThread {
    vm: SourceVm,
    params: Params,
    endpoint: Endpoint,
    status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    messages: Arc<Mutex<VecDeque<ToMain>>>,
    state_rx: Receiver<SwitchState>,
}

impl SourceThread {
    fn tell_main(&self, m: ToMain) {
        lock(&self.messages).push_back(m);
        let _ = self.vm.wake.write(1);
    }

    fn run(self) {
        let started = Instant::now();
        let result = self.migrate(started);
        let _ = set_dirty_logging(&self.vm.vm_fd, &self.vm.mem, false);
        rvirt_devices::dirty::stop();
        {
            let mut st = lock(&self.status);
            st.total_ms = started.elapsed().as_secs_f64() * 1000.0;
            match &result {
                Ok(pause) => {
                    st.state = MigrationState::Completed;
                    st.downtime_ms = Some(pause.until_done);
                    st.downtime_sent_ms = Some(pause.until_sent);
                }
                Err(e) if self.cancel.load(Ordering::SeqCst) => {
                    st.state = MigrationState::Cancelled;
                    st.error = Some(e.to_string());
                }
                Err(e) => {
                    st.state = MigrationState::Failed;
                    st.error = Some(e.to_string());
                }
            }
        }
        match result {
            Ok(_) => tracing::info!("migration completed"),
            Err(ref e) => tracing::warn!("migration failed; the guest runs on here: {e}"),
        }
        self.tell_main(ToMain::Finished(result.map(|_| ()).map_err(|e| e.to_string())));
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut lock(&self.status));
    }

    /// Returns the guest's measured pause.
    fn migrate(&self, started: Instant) -> Result<Pause> {
        let (vm, p) = (&self.vm, &self.params);
        let mut s = connect(&self.endpoint)?;
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&VERSION.to_le_bytes());
        s.write_all(&head).map_err(io("sending"))?;
        let hello = state_file::to_bytes(&vm.hello).map_err(|e| Error::Device(e.to_string()))?;
        write_frame(&mut *s, HELLO, &[&hello])?;
        match read_frame(&mut *s)? {
            (READY, _) => {}
            (REFUSE, why) => return Err(Error::Migration(format!("the destination refused: {}", String::from_utf8_lossy(&why)))),
            (tag, _) => return Err(Error::Migration(format!("the destination answered frame {tag}"))),
        }
        set_dirty_logging(&vm.vm_fd, &vm.mem, true)?;
        rvirt_devices::dirty::start(vm.mem.iter().map(|r| r.start_addr().0 + r.len()).max().unwrap_or(0));
        dirty_pages(vm)?;
        self.update(|st| st.state = MigrationState::Active);
        // The first pass: everything that is not zero.
        let mut pending = nonzero_pages(&vm.mem);
        let mut iteration = 0;
        loop {
            iteration += 1;
            let pass = Instant::now();
            let sent = send_pages(&mut *s, &vm.mem, &pending, (p.bandwidth, p.encoding), &self.cancel, &self.status)?;
            let secs = pass.elapsed().as_secs_f64().max(1e-3);
            let rate = sent as f64 / secs;
            pending = dirty_pages(vm)?;
            let remaining = (pending.len() * PAGE) as u64;
            let expected = Duration::from_secs_f64(remaining as f64 / rate.max(1.0));
            // Auto-converge (QEMU's rule): while the guest dirties more than
            // half of what a pass sends, hold its vCPUs off longer each pass.
            if p.auto_converge && remaining > sent / 2 {
                let pct = match lock(&self.status).throttle_percent {
                    0 => 20,
                    t => t.saturating_add(10).min(99),
                };
                self.update(|st| st.throttle_percent = pct);
                self.tell_main(ToMain::Throttle(pct));
            }
            self.update(|st| {
                st.iteration = iteration;
                st.remaining_bytes = remaining;
                st.dirty_rate = (remaining as f64 / secs) as u64;
                st.expected_downtime_ms = expected.as_millis() as u64;
            });
            if expected <= p.max_downtime {
                break;
            }
        }
        // One more pass while the guest runs (it fits the limit): the pause
        // then carries only what the guest dirtied during it.
        if !pending.is_empty() {
            iteration += 1;
            send_pages(&mut *s, &vm.mem, &pending, (p.bandwidth, p.encoding), &self.cancel, &self.status)?;
            pending = dirty_pages(vm)?;
            self.update(|st| {
                st.iteration = iteration;
                st.remaining_bytes = (pending.len() * PAGE) as u64;
            });
        }
        if self.cancel.load(Ordering::SeqCst) {
            return Err(Error::Migration("cancelled".into()));
        }
        // The switch-over: the main loop pauses the guest and stops its devices.
        self.update(|st| st.state = MigrationState::SwitchOver);
        self.tell_main(ToMain::SwitchOver);
        let (state, paused_at) = self
            .state_rx
            .recv_timeout(IO_TIMEOUT)
            .map_err(|_| Error::Migration("the guest was not stopped for the switch-over".into()))?
            .map_err(Error::Migration)?;
        let captured = paused_at.elapsed();
        let mut last = pending;
        last.extend(dirty_pages(vm)?);
        last.sort_unstable();
        last.dedup();
        send_pages(&mut *s, &vm.mem, &last, (0, p.encoding), &AtomicBool::new(false), &self.status)?;
        write_frame(&mut *s, STATE, &[&state])?;
        let sent = paused_at.elapsed();
        match read_frame(&mut *s)? {
            (DONE, _) => {}
            (REFUSE, why) => return Err(Error::Migration(format!("the destination could not take the guest: {}", String::from_utf8_lossy(&why)))),
            (tag, _) => return Err(Error::Migration(format!("the destination answered frame {tag} to the state"))),
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let pause = Pause { until_sent: ms(sent), until_done: ms(paused_at.elapsed()) };
        self.update(|st| st.bytes_sent += state.len() as u64 + 8);
        tracing::info!(
            "migrated in {:.0} ms, {iteration} passes, guest paused {:.1} ms: state taken in {:.1} ms, {} last pages and {} bytes of state sent by {:.1} ms, the destination's answer after {:.1} ms more",
            ms(started.elapsed()),
            pause.until_done,
            ms(captured),
            last.len(),
            state.len(),
            pause.until_sent,
            pause.until_done - pause.until_sent
        );
        Ok(pause)
    }
}

/// The guest's pause at the switch-over, in milliseconds.
struct Pause {
    /// Until the last byte left (QEMU's measure).
    until_sent: f64,
    /// Until the destination said it holds the guest.
    until_done: f64,
}

/// The destination, once the source's first frame is in: the stream and
/// what the source said.
pub struct Incoming {
    /// None once answered.
    stream: Option<Box<dyn Stream>>,
    /// The source's first frame.
    pub hello: Hello,
}

impl Drop for Incoming {
    /// A destination that fails before it accepted tells the source, which runs on.
    fn drop(&mut self) {
        if let Some(mut s) = self.stream.take() {
            let _ = write_frame(&mut *s, REFUSE, &[b"the destination could not build the VM (its log says why)"]);
        }
    }
}

/// Waits at `listener` for the source and reads its first frame. A stream
/// that is not an rvirt migration of this version is refused, telling the
/// source why.
pub fn accept(listener: &Listener) -> Result<Incoming> {
    let mut s = listener.accept()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).map_err(io("receiving"))?;
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    let refuse = |s: &mut Box<dyn Stream>, why: String| {
        let _ = write_frame(&mut **s, REFUSE, &[why.as_bytes()]);
        Error::Config(format!("--incoming: {why}"))
    };
    if head[..8] != MAGIC {
        return Err(refuse(&mut s, "not an rvirt migration stream".into()));
    }
    if version != VERSION {
        return Err(refuse(&mut s, format!("migration stream version {version}; this VMM speaks version {VERSION}")));
    }
    let hello = match read_frame(&mut *s) {
        Ok((HELLO, bytes)) => state_file::from_bytes::<Hello>(&bytes).map_err(|e| refuse(&mut s, format!("malformed first frame: {e}")))?,
        Ok((tag, _)) => return Err(refuse(&mut s, format!("frame {tag} where the first was expected"))),
        Err(e) => return Err(refuse(&mut s, e.to_string())),
    };
    Ok(Incoming { stream: Some(s), hello })
}

impl Incoming {
    /// Refuses the migration (the source runs on), saying why.
    pub fn refuse(mut self, why: &str) {
        if let Some(mut s) = self.stream.take() {
            let _ = write_frame(&mut *s, REFUSE, &[why.as_bytes()]);
        }
    }

    /// Accepts, then writes the source's pages into `mem` until its state
    /// arrives; returns the state. A page outside `mem` or a frame out of
    /// place ends it.
    pub fn receive(mut self, mem: &GuestMemoryMmap) -> Result<(crate::snapshot::VmSnapshot, Finish)> {
        let Some(mut stream) = self.stream.take() else { return Err(Error::Migration("answered already".into())) };
        write_frame(&mut *stream, READY, &[])?;
        loop {
            match read_frame(&mut *stream)? {
                (PAGES, frame) => decode_pages(&frame, mem)?,
                (STATE, bytes) => {
                    let snap = state_file::decode(&bytes).map_err(|e| Error::Migration(format!("the state: {e}")))?;
                    return Ok((snap, Finish { stream }));
                }
                (tag, _) => return Err(Error::Migration(format!("frame {tag} out of place"))),
            }
        }
    }
}

/// Writes the pages of one `PAGES` frame into `mem`. Every length is
/// checked against what is left; a page outside `mem`, a misaligned
/// address, an unknown kind or a compressed page that is not exactly a
/// page is refused.
pub(crate) fn decode_pages(frame: &[u8], mem: &GuestMemoryMmap) -> Result<()> {
    let bad = |why: String| Error::Migration(format!("a malformed page frame: {why}"));
    let take = |rest: &mut &[u8], n: usize| -> Result<Vec<u8>> {
        if rest.len() < n {
            return Err(bad(format!("{} bytes where {n} were announced", rest.len())));
        }
        let (a, b) = rest.split_at(n);
        *rest = b;
        Ok(a.to_vec())
    };
    let mut rest = frame;
    let count = u32::from_le_bytes(take(&mut rest, 4)?.try_into().unwrap_or_default()) as usize;
    if count > PAGES_PER_FRAME {
        return Err(bad(format!("{count} pages")));
    }
    let mut zstd = zstd::bulk::Decompressor::new().map_err(|e| bad(e.to_string()))?;
    let zeros = [0u8; PAGE];
    for _ in 0..count {
        let word = u64::from_le_bytes(take(&mut rest, 8)?.try_into().unwrap_or_default());
        let (gpa, kind) = (word & !(PAGE as u64 - 1), word & (PAGE as u64 - 1));
        let data = match kind {
            PAGE_RAW => take(&mut rest, PAGE)?,
            PAGE_ZERO => zeros.to_vec(),
            PAGE_ZSTD => {
                let n = u32::from_le_bytes(take(&mut rest, 4)?.try_into().unwrap_or_default()) as usize;
                let c = take(&mut rest, n)?;
                let d = zstd.decompress(&c, PAGE).map_err(|e| bad(format!("page {gpa:#x}: {e}")))?;
                if d.len() != PAGE {
                    return Err(bad(format!("page {gpa:#x} decompresses to {} bytes", d.len())));
                }
                d
            }
            k => return Err(bad(format!("page {gpa:#x} of unknown kind {k}"))),
        };
        mem.write_slice(&data, GuestAddress(gpa)).map_err(|e| Error::Migration(format!("page {gpa:#x} is outside guest memory: {e}")))?;
    }
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes left over", rest.len())));
    }
    Ok(())
}

/// Tells the source the destination holds the guest.
pub struct Finish {
    stream: Box<dyn Stream>,
}

impl Finish {
    /// Sends `DONE`: from here the source ends and this VMM runs the guest.
    pub fn done(mut self) -> Result<()> {
        write_frame(&mut *self.stream, DONE, &[])
    }

    /// Tells the source the destination cannot run the guest after all
    /// (a disk it could not take): the source takes its disks back and runs on.
    pub fn refuse(mut self, why: &str) {
        let _ = write_frame(&mut *self.stream, REFUSE, &[why.as_bytes()]);
    }
}

/// Fresh, zeroed guest memory for an incoming VM of `cfg`.
pub fn destination_memory(cfg: &VmConfig) -> Result<GuestMemoryMmap> {
    let layout = rvirt_arch::MemoryLayout::new(cfg.memory_bytes).map_err(|e| Error::Config(format!("the source's memory: {e}")))?;
    memory::create_guest_memory(&layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn page_frames_carry_zero_raw_and_compressed_pages_and_refuse_what_does_not_fit() {
        let src = memory();
        let random: Vec<u8> = (0..PAGE as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        src.write_slice(&random, GuestAddress(0x1000)).unwrap();
        src.write_slice(&[7u8; 100], GuestAddress(0x2000)).unwrap();
        let pages = [0x0, 0x1000, 0x2000];
        for compress in [false, true] {
            let mut z = zstd::bulk::Compressor::new(1).unwrap();
            let mut frame = (pages.len() as u32).to_le_bytes().to_vec();
            let mut buf = vec![0u8; PAGE];
            for gpa in pages {
                src.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
                encode_page(&mut frame, gpa, &buf, Encoding { compress }, Some(&mut z));
            }
            // A zero page is its address; compression only where it pays.
            let whole = 4 + 8 + 2 * (8 + PAGE);
            assert!(if compress { frame.len() < whole - PAGE } else { frame.len() == whole }, "{} bytes (compress {compress})", frame.len());
            let dst = memory();
            dst.write_slice(&[0xffu8; PAGE], GuestAddress(0)).unwrap();
            decode_pages(&frame, &dst).unwrap();
            for gpa in pages {
                let (mut a, mut b) = (vec![0u8; PAGE], vec![0u8; PAGE]);
                src.read_slice(&mut a, GuestAddress(gpa)).unwrap();
                dst.read_slice(&mut b, GuestAddress(gpa)).unwrap();
                assert!(a == b, "page {gpa:#x} (compress {compress})");
            }
            // Every truncation is refused, never a panic.
            for n in 0..frame.len() {
                assert!(decode_pages(&frame[..n], &dst).is_err(), "{n} bytes");
            }
        }
        let dst = memory();
        let frame = |word: u64, tail: &[u8]| [&1u32.to_le_bytes()[..], &word.to_le_bytes(), tail].concat();
        assert!(decode_pages(&frame(0x1000 | 7, &[]), &dst).unwrap_err().to_string().contains("unknown kind 7"));
        assert!(decode_pages(&frame(1 << 40 | PAGE_ZERO, &[]), &dst).unwrap_err().to_string().contains("outside guest memory"));
        let short = zstd::bulk::compress(&[1u8; 100], 1).unwrap();
        let zst = [&(short.len() as u32).to_le_bytes()[..], &short].concat();
        assert!(decode_pages(&frame(0x1000 | PAGE_ZSTD, &zst), &dst).unwrap_err().to_string().contains("decompresses to 100 bytes"));
        let mut many = 1000u32.to_le_bytes().to_vec();
        many.extend_from_slice(&[0; 64]);
        assert!(decode_pages(&many, &dst).unwrap_err().to_string().contains("1000 pages"));
        assert!(decode_pages(&[frame(0x1000 | PAGE_ZERO, &[]), vec![9]].concat(), &dst).unwrap_err().to_string().contains("left over"));
    }

    #[test]
    fn zero_pages_are_told_from_others_whatever_byte_differs() {
        let mut page = vec![0u8; PAGE];
        assert!(is_zero(&page));
        for at in [0, 15, 16, 2047, PAGE - 1] {
            page[at] = 1;
            assert!(!is_zero(&page), "{at}");
            page[at] = 0;
        }
        assert!(!is_zero(&[0, 0, 1]) && is_zero(&[0; 3]), "a short tail counts too");
    }

    #[test]
    fn uris() {
        assert_eq!(parse_uri("unix:/run/m.sock").unwrap(), Endpoint::Unix("/run/m.sock".into()));
        assert_eq!(parse_uri("tcp:10.0.0.2:4444").unwrap(), Endpoint::Tcp("10.0.0.2:4444".into()));
        assert_eq!(parse_uri("tcp:[::1]:4444").unwrap(), Endpoint::Tcp("[::1]:4444".into()));
        for bad in ["", "unix:", "tcp:host", "tcp::1", "tcp:h:99999", "rdma:x", "exec:cat"] {
            assert!(parse_uri(bad).unwrap_err().to_string().contains("unix:PATH or tcp:HOST:PORT"), "{bad}");
        }
    }
}
