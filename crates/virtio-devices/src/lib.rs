//! Virtio 1.x devices for rvirt-vmm and the PCI transport that presents them.
//!
//! Each device implements [`VirtioDevice`]: it describes its features,
//! queues and configuration space, and once the driver sets DRIVER_OK it is
//! [activated](VirtioDevice::activate) with its queues, the guest memory and
//! an [`Interrupt`]; from then on a worker thread of its own serves the
//! queues, woken by ioeventfds and raising interrupts through irqfds, so the
//! I/O path never passes through a vCPU thread.
//!
//! Everything a guest puts in a queue is hostile input: descriptor chains
//! are walked by `virtio-queue` (bounded, indirect tables checked), every
//! buffer is checked against guest memory by [`chain::GuestChain`], and a
//! malformed request gets an error status, never a panic.

pub mod balloon;
pub mod block;
pub mod chain;
pub mod console;
#[doc(hidden)]
pub mod fuzzing;
pub mod net;
pub mod rng;
pub mod scsi;
pub mod transport;
pub mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use balloon::{Balloon, BalloonHandle};
pub use block::VirtioBlock;
pub use console::VirtioConsole;
pub use net::{Tap, VirtioNet};
pub use rng::VirtioRng;
pub use scsi::VirtioScsi;
pub use transport::{IoEventRegistrar, IntxLine, VirtioPciDevice};

/// Feature bit: the device follows virtio 1.x (modern) rules.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: descriptors may point to indirect tables.
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// Feature bit: used/avail event indexes suppress needless notifications.
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
/// The features every rvirt device offers.
pub const COMMON_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX;

/// Virtio device type IDs (virtio 1.2, section 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
    /// SCSI host (controller).
    pub const SCSI: u32 = 8;
}

/// What an interrupt is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device configuration changed.
    Config,
    /// Queue `n` has used buffers.
    Queue(u16),
}

/// How a device tells the driver something happened. Implemented by the
/// transport (MSI-X vector or INTx).
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt for `kind`.
    fn trigger(&self, kind: InterruptKind);
}

/// One queue handed to a device at activation: the negotiated ring and the
/// eventfd the driver's notifications arrive on.
pub struct QueueHandle {
    /// The ring.
    pub queue: Queue,
    /// Signalled when the driver notifies this queue.
    pub event: EventFd,
}

/// Everything a device needs to start serving its queues.
pub struct ActivateContext {
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// Interrupt delivery.
    pub interrupt: Arc<dyn Interrupt>,
    /// Every queue, in order (a queue the driver did not enable is not ready).
    pub queues: Vec<QueueHandle>,
    /// Features the driver accepted.
    pub features: u64,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device type ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Size of the device configuration space in bytes.
    fn config_len(&self) -> usize;
    /// The driver reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver writes the device configuration space (most fields are read-only).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues. An error leaves the device inactive and is
    /// reported to the driver as DEVICE_NEEDS_RESET.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), String>;
    /// Stops serving (driver reset or VM shutdown); the device can be activated again.
    fn reset(&mut self);
    /// The device's request counters.
    fn counters(&self) -> Arc<DeviceCounters>;
    /// What a snapshot keeps of the device beyond its transport and
    /// configuration (taken while it is stopped).
    fn save_state(&self) -> DeviceState {
        DeviceState::Stateless
    }
    /// Puts saved state back into the same device built again; state of
    /// another kind of device is refused.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), String> {
        match state {
            DeviceState::Stateless => Ok(()),
            other => Err(format!("saved state {other:?} is not this device's")),
        }
    }
}

/// A device's own state in a snapshot: what the guest or the API changed
/// that its configuration does not say.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    /// Nothing beyond the configuration (block, SCSI, rng, console).
    #[default]
    Stateless,
    /// A network card's link (the API's `set-link`).
    Net {
        /// Cable in.
        link_up: bool,
    },
    /// The balloon's target (set by the host) and the size the driver reports.
    Balloon {
        /// Target, in 4 KiB pages.
        target_pages: u32,
        /// The driver's `actual`, in 4 KiB pages.
        actual_pages: u32,
    },
}

/// Per-device counters, reported by the control API.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Requests (descriptor chains) completed.
    pub requests: AtomicU64,
    /// Bytes moved from the device to the guest.
    pub bytes_to_guest: AtomicU64,
    /// Bytes moved from the guest to the device.
    pub bytes_from_guest: AtomicU64,
    /// Requests that failed (I/O errors, malformed chains, refused writes).
    pub errors: AtomicU64,
    /// Requests that moved bytes to the guest (disk reads, received frames).
    pub reads: AtomicU64,
    /// Requests that moved bytes from the guest (disk writes, sent frames).
    pub writes: AtomicU64,
}

/// A copy of [`DeviceCounters`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Requests completed.
    pub requests: u64,
    /// Bytes to the guest.
    pub bytes_to_guest: u64,
    /// Bytes from the guest.
    pub bytes_from_guest: u64,
    /// Failed requests.
    pub errors: u64,
    /// Requests that moved bytes to the guest.
    pub reads: u64,
    /// Requests that moved bytes from the guest.
    pub writes: u64,
}

impl DeviceCounters {
    /// Counts one completed request moving `to_guest`/`from_guest` bytes.
    pub fn request(&self, to_guest: u64, from_guest: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes_to_guest.fetch_add(to_guest, Ordering::Relaxed);
        self.bytes_from_guest.fetch_add(from_guest, Ordering::Relaxed);
        if to_guest > 0 {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        if from_guest > 0 {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one failed request.
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            bytes_to_guest: self.bytes_to_guest.load(Ordering::Relaxed),
            bytes_from_guest: self.bytes_from_guest.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
        }
    }
}

/// Copies the bytes of `config` at `offset` into `data`; reads past the end read zeros.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
