//! The virtio 1.x PCI transport (modern, non-transitional).
//!
//! BAR 0 (64-bit, 32 KiB) holds, at fixed offsets, the common configuration,
//! the ISR byte, the device configuration, the notification area (one
//! 4-byte slot per queue, each backed by an ioeventfd) and the MSI-X table
//! and pending bits. Vendor-specific capabilities point the driver at them;
//! the PCI configuration access capability (`VIRTIO_PCI_CAP_PCI_CFG`) also
//! reaches BAR 0 through configuration space, for firmware that cannot map BARs.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use rvirt_devices::bus::lock;
use rvirt_pci::config::{BarKind, PciClass, PciConfiguration, PciHeader};
use rvirt_pci::{read_le, write_le, MsixConfig, MsixState, PciBarInfo, PciConfigState, PciDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::{
    device_type, ActivateContext, DeviceState, Interrupt, InterruptKind, QueueHandle, VirtioDevice, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
};

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_CFG: u64 = 0x0000;
const COMMON_CFG_LEN: u64 = 0x38;
const ISR_CFG: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
/// Start of the notification area in BAR 0.
pub const NOTIFY_CFG: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
const REGION_LEN: u64 = 0x1000;
/// "No vector" in the MSI-X vector fields.
pub const NO_VECTOR: u16 = 0xffff;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

const PCI_VENDOR_VIRTIO: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
const CAP_VENDOR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// Offsets inside the PCI configuration access capability.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

/// Registers the queue-notification ioeventfds with KVM (implemented by the VMM).
pub trait IoEventRegistrar: Send + Sync {
    /// Signals `evt` on any guest write to MMIO address `addr`.
    fn register(&self, evt: &EventFd, addr: u64) -> std::io::Result<()>;
    /// Undoes [`IoEventRegistrar::register`].
    fn unregister(&self, evt: &EventFd, addr: u64) -> std::io::Result<()>;
}

/// A level-triggered INTx line: an irqfd registered with a resample eventfd,
/// which KVM signals when the guest acknowledges the interrupt.
pub struct IntxLine {
    /// Asserts the line.
    pub irqfd: EventFd,
    /// Readable after the guest's EOI; the line is re-asserted if still pending.
    pub resample: EventFd,
}

/// Interrupt state shared between the transport (vCPU threads) and the
/// device's worker thread.
struct InterruptState {
    isr: AtomicU8,
    config_generation: AtomicU8,
    msix: Mutex<MsixConfig>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    intx: Option<IntxLine>,
    intx_disabled: AtomicBool,
}

impl InterruptState {
    fn assert_intx(&self) {
        if let Some(line) = &self.intx {
            if !self.intx_disabled.load(Ordering::Relaxed) {
                let _ = line.irqfd.write(1);
            }
        }
    }
}

impl Interrupt for InterruptState {
    fn trigger(&self, kind: InterruptKind) {
        let vector = match kind {
            InterruptKind::Config => {
                self.config_generation.fetch_add(1, Ordering::SeqCst);
                self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
                self.config_vector.load(Ordering::SeqCst)
            }
            InterruptKind::Queue(q) => {
                self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
                self.queue_vectors.get(usize::from(q)).map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
            }
        };
        let mut msix = lock(&self.msix);
        if msix.enabled() {
            if vector != NO_VECTOR {
                msix.trigger(vector);
            }
            return;
        }
        drop(msix);
        self.assert_intx();
    }
}

/// Re-asserts a device's INTx line after an EOI while its ISR is still set.
pub struct IntxResample {
    /// The eventfd KVM signals on EOI.
    pub resample: EventFd,
    state: Arc<InterruptState>,
}

impl IntxResample {
    /// Handles one resample event.
    pub fn on_eoi(&self) {
        let _ = self.resample.read();
        if self.state.isr.load(Ordering::SeqCst) != 0 && !lock(&self.state.msix).enabled() {
            self.state.assert_intx();
        }
    }
}

/// A queue as the driver set it up. Where the device was in it is not
/// kept: a stopped device has completed every request it took, so the
/// used ring's index in guest memory says it (see [`VirtioPciDevice::quiesce`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSetup {
    /// Entries.
    pub size: u16,
    /// Enabled by the driver.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
}

/// What a snapshot keeps of a virtio device and its PCI transport.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    /// The virtio device type, checked on restore.
    pub device_type: u32,
    /// Configuration space (BAR address, command, capabilities' fields).
    pub config: PciConfigState,
    /// MSI-X table, pending bits, control.
    pub msix: MsixState,
    /// Device status byte.
    pub status: u8,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Common configuration's selectors.
    pub device_feature_select: u32,
    /// Common configuration's selectors.
    pub driver_feature_select: u32,
    /// Common configuration's selectors.
    pub queue_select: u16,
    /// Interrupt status not yet read by the driver.
    pub isr: u8,
    /// Configuration generation.
    pub config_generation: u8,
    /// MSI-X vector of configuration changes.
    pub config_vector: u16,
    /// MSI-X vector of each queue.
    pub queue_vectors: Vec<u16>,
    /// Each queue's setup.
    pub queues: Vec<QueueSetup>,
    /// The driver had started the device (DRIVER_OK accepted).
    pub active: bool,
    /// The device's own state.
    pub device: DeviceState,
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    name: String,
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    irq: Arc<InterruptState>,
    msix_cap: usize,
    pci_cfg_cap: usize,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    queue_select: u16,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    active: bool,
    /// Stopped for a snapshot while the driver has it started.
    quiesced: bool,
    mem: GuestMemoryMmap,
    ioevents: Arc<dyn IoEventRegistrar>,
    notify_base: Option<u64>,
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20 } else { 16 };
    let mut c = vec![CAP_VENDOR, 0, len, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        c.extend_from_slice(&x.to_le_bytes());
    }
    c
}

fn class_of(device_type: u32) -> PciClass {
    let (class, subclass) = match device_type {
        device_type::NET => (0x02, 0x00),
        device_type::BLOCK => (0x01, 0x80),
        device_type::CONSOLE => (0x07, 0x80),
        _ => (0xff, 0x00),
    };
    PciClass { class, subclass, prog_if: 0 }
}

impl VirtioPciDevice {
    /// Wraps `device`. `msix` has one vector per queue plus one for
    /// configuration changes; `intx` serves guests without MSI-X; BAR 0 is
    /// placed at `bar_addr`.
    pub fn new(
        name: impl Into<String>,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msix: MsixConfig,
        intx: Option<IntxLine>,
        ioevents: Arc<dyn IoEventRegistrar>,
        bar_addr: u64,
    ) -> std::io::Result<Self> {
        let dtype = device.device_type();
        let sizes = device.queue_max_sizes();
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: PCI_VENDOR_VIRTIO,
            device_id: VIRTIO_PCI_DEVICE_BASE + dtype as u16,
            revision: 1,
            class: class_of(dtype),
            subsystem_vendor_id: PCI_VENDOR_VIRTIO,
            subsystem_id: 0x40,
            interrupt_pin: if intx.is_some() { 1 } else { 0 },
        });
        config.add_bar(0, BAR_SIZE, BarKind::Mem64);
        config.set_bar_addr(0, bar_addr);
        config.add_capability(&virtio_cap(CAP_COMMON, COMMON_CFG, COMMON_CFG_LEN, None), None);
        config.add_capability(&virtio_cap(CAP_ISR, ISR_CFG, 1, None), None);
        if device.config_len() > 0 {
            config.add_capability(&virtio_cap(CAP_DEVICE, DEVICE_CFG, device.config_len() as u64, None), None);
        }
        config.add_capability(&virtio_cap(CAP_NOTIFY, NOTIFY_CFG, REGION_LEN, Some(NOTIFY_OFF_MULTIPLIER)), None);
        let (cap, writable) = msix.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = config.add_capability(&cap, Some(&writable));
        // bar, offset, length and the data window are the driver's to set.
        let mut pci_cfg_writable = [0u8; 20];
        pci_cfg_writable[PCI_CFG_BAR] = 0xff;
        pci_cfg_writable[PCI_CFG_OFFSET..].fill(0xff);
        let pci_cfg_cap = config.add_capability(&virtio_cap(CAP_PCI_CFG, 0, 0, Some(0)), Some(&pci_cfg_writable));
        let queues = sizes.iter().map(|s| Queue::new(*s)).collect::<Result<Vec<_>, _>>().map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad queue size: {e}"))
        })?;
        let queue_events =
            sizes.iter().map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<std::io::Result<Vec<_>>>()?;
        let irq = Arc::new(InterruptState {
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            msix: Mutex::new(msix),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: sizes.iter().map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            intx,
            intx_disabled: AtomicBool::new(false),
        });
        Ok(Self {
            name: name.into(),
            config,
            device,
            irq,
            msix_cap,
            pci_cfg_cap,
            queues,
            queue_events,
            queue_select: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            active: false,
            quiesced: false,
            mem,
            ioevents,
            notify_base: None,
        })
    }

    /// The device's name (for logs and the API).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The wrapped device's counters.
    pub fn counters(&self) -> Arc<crate::DeviceCounters> {
        self.device.counters()
    }

    /// The INTx resample hook, when the device has an INTx line.
    pub fn intx_resample(&self) -> std::io::Result<Option<IntxResample>> {
        match &self.irq.intx {
            Some(line) => Ok(Some(IntxResample { resample: line.resample.try_clone()?, state: self.irq.clone() })),
            None => Ok(None),
        }
    }

    /// Stops the device's worker (VM shutdown).
    pub fn shutdown(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
    }

    /// Stops the device's worker for a snapshot: once it returns, every
    /// request the device took is complete and on the used ring, and
    /// nothing changes guest memory. [`VirtioPciDevice::resume`] restarts it.
    pub fn quiesce(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
            self.quiesced = true;
        }
        // The device wrote its used rings (and avail event) all along: a
        // live migration sends them once more, as they are now.
        for q in self.queues.iter().filter(|q| q.ready()) {
            rvirt_devices::dirty::mark(q.used_ring(), 6 + 8 * u64::from(q.size()));
        }
    }

    /// Restarts a device stopped by [`VirtioPciDevice::quiesce`].
    pub fn resume(&mut self) -> Result<(), String> {
        if std::mem::take(&mut self.quiesced) {
            self.activate_where_the_rings_are()?;
        }
        Ok(())
    }

    /// The device's state (stopped first with [`VirtioPciDevice::quiesce`]).
    pub fn save(&self) -> VirtioPciState {
        VirtioPciState {
            device_type: self.device.device_type(),
            config: self.config.state(),
            msix: lock(&self.irq.msix).state(),
            status: self.status,
            driver_features: self.driver_features,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            queue_select: self.queue_select,
            isr: self.irq.isr.load(Ordering::SeqCst),
            config_generation: self.irq.config_generation.load(Ordering::SeqCst),
            config_vector: self.irq.config_vector.load(Ordering::SeqCst),
            queue_vectors: self.irq.queue_vectors.iter().map(|v| v.load(Ordering::SeqCst)).collect(),
            queues: self
                .queues
                .iter()
                .map(|q| QueueSetup { size: q.size(), ready: q.ready(), desc: q.desc_table(), avail: q.avail_ring(), used: q.used_ring() })
                .collect(),
            active: self.active || self.quiesced,
            device: self.device.save_state(),
        }
    }

    /// Puts saved state into the same device built again (before the
    /// vCPUs run) and, when the driver had started it, starts it where the
    /// rings are. The bus must re-read the BARs afterwards
    /// (`PciBus::refresh_all`). Refused, saying what differs, when the
    /// device is another kind or has other queues.
    pub fn restore(&mut self, s: &VirtioPciState) -> Result<(), String> {
        if s.device_type != self.device.device_type() {
            return Err(format!("saved virtio device type {}, this one is type {}", s.device_type, self.device.device_type()));
        }
        if s.queues.len() != self.queues.len() || s.queue_vectors.len() != self.queues.len() {
            return Err(format!("{} queues saved, this device has {}", s.queues.len(), self.queues.len()));
        }
        if s.driver_features & !self.device.features() != 0 {
            return Err(format!("the driver accepted features {:#x} this device does not offer ({:#x})", s.driver_features, self.device.features()));
        }
        self.reset();
        self.config.restore(&s.config)?;
        lock(&self.irq.msix).restore(&s.msix)?;
        self.device.restore_state(&s.device)?;
        for (q, setup) in self.queues.iter_mut().zip(&s.queues) {
            q.try_set_size(setup.size).map_err(|e| format!("queue size {}: {e}", setup.size))?;
            q.set_desc_table_address(Some(setup.desc as u32), Some((setup.desc >> 32) as u32));
            q.set_avail_ring_address(Some(setup.avail as u32), Some((setup.avail >> 32) as u32));
            q.set_used_ring_address(Some(setup.used as u32), Some((setup.used >> 32) as u32));
            q.set_ready(setup.ready);
        }
        self.status = s.status;
        self.driver_features = s.driver_features;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.queue_select = s.queue_select;
        self.irq.isr.store(s.isr, Ordering::SeqCst);
        self.irq.config_generation.store(s.config_generation, Ordering::SeqCst);
        self.irq.config_vector.store(self.valid_vector(s.config_vector), Ordering::SeqCst);
        for (slot, v) in self.irq.queue_vectors.iter().zip(&s.queue_vectors) {
            slot.store(self.valid_vector(*v), Ordering::SeqCst);
        }
        self.irq.intx_disabled.store(self.config.intx_disabled(), Ordering::Relaxed);
        if s.active {
            self.activate_where_the_rings_are()?;
        }
        // An interrupt the driver had not taken yet is raised again.
        if s.isr != 0 && !lock(&self.irq.msix).enabled() {
            self.irq.assert_intx();
        }
        Ok(())
    }

    /// Starts the device with each ready queue positioned at its used
    /// ring's index: a stopped device completed everything it took, so any
    /// chain after that index is still the driver's offer (a chain a device
    /// held without completing, such as the balloon's statistics buffer or
    /// a receive buffer waiting for a frame, is taken again). Each queue is
    /// then notified once, as if the driver had kicked it.
    fn activate_where_the_rings_are(&mut self) -> Result<(), String> {
        use vm_memory::{Address, Bytes};
        for (i, q) in self.queues.iter_mut().enumerate().filter(|(_, q)| q.ready()) {
            let at = vm_memory::GuestAddress(q.used_ring()).checked_add(2).ok_or(format!("queue {i}: used ring at the top of memory"))?;
            let used: u16 = self.mem.read_obj::<u16>(at).map(u16::from_le).map_err(|e| format!("queue {i}: used ring index: {e}"))?;
            q.set_next_avail(used);
            q.set_next_used(used);
        }
        self.activate()?;
        for (q, e) in self.queues.iter().zip(&self.queue_events) {
            if q.ready() {
                let _ = e.write(1);
            }
        }
        Ok(())
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < lock(&self.irq.msix).len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn common_image(&mut self) -> [u8; COMMON_CFG_LEN as usize] {
        let mut b = [0u8; COMMON_CFG_LEN as usize];
        let features = self.device.features();
        let dfs = match self.device_feature_select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        b[0..4].copy_from_slice(&self.device_feature_select.to_le_bytes());
        b[4..8].copy_from_slice(&dfs.to_le_bytes());
        b[8..12].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        let drf = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        b[12..16].copy_from_slice(&drf.to_le_bytes());
        b[16..18].copy_from_slice(&self.irq.config_vector.load(Ordering::SeqCst).to_le_bytes());
        b[18..20].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        b[20] = self.status;
        b[21] = self.irq.config_generation.load(Ordering::SeqCst);
        b[22..24].copy_from_slice(&self.queue_select.to_le_bytes());
        let sel = usize::from(self.queue_select);
        let vector = self.irq.queue_vectors.get(sel).map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        if let Some(q) = self.queues.get(sel) {
            b[24..26].copy_from_slice(&q.size().to_le_bytes());
            b[26..28].copy_from_slice(&vector.to_le_bytes());
            b[28..30].copy_from_slice(&u16::from(q.ready()).to_le_bytes());
            b[30..32].copy_from_slice(&self.queue_select.to_le_bytes());
            b[32..40].copy_from_slice(&q.desc_table().to_le_bytes());
            b[40..48].copy_from_slice(&q.avail_ring().to_le_bytes());
            b[48..56].copy_from_slice(&q.used_ring().to_le_bytes());
        }
        b
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let image = self.common_image();
        crate::read_config_bytes(&image, offset, data);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let v = read_le(data);
        let (lo, hi) = (Some(v as u32), if data.len() == 8 { Some((v >> 32) as u32) } else { None });
        // Queue layout may only change before the device is live.
        let queue_writable = !self.active;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features = (self.driver_features & !(0xffff_ffffu64 << shift)) | ((v & 0xffff_ffff) << shift);
            }
            (0x10, 2) => self.irq.config_vector.store(self.valid_vector(v as u16), Ordering::SeqCst),
            (0x14, 1) => self.set_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) if queue_writable => {
                if let Some(q) = self.selected() {
                    if q.try_set_size(v as u16).is_err() {
                        tracing::warn!("virtio: driver set an invalid queue size {v}");
                    }
                }
            }
            (0x1a, 2) => {
                let vector = self.valid_vector(v as u16);
                if let Some(slot) = self.irq.queue_vectors.get(usize::from(self.queue_select)) {
                    slot.store(vector, Ordering::SeqCst);
                }
            }
            (0x1c, 2) if queue_writable && v == 1 => {
                if let Some(q) = self.selected() {
                    q.set_ready(true);
                }
            }
            (0x20 | 0x28 | 0x30, 4 | 8) | (0x24 | 0x2c | 0x34, 4) if queue_writable => {
                let high_half = offset % 8 == 4;
                let (lo, hi) = if high_half { (None, lo) } else { (lo, hi) };
                if let Some(q) = self.selected() {
                    match offset & !7 {
                        0x20 => q.set_desc_table_address(lo, hi),
                        0x28 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => tracing::debug!("virtio: ignored common config write at {offset:#x} ({} bytes)", data.len()),
        }
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value | (self.status & STATUS_NEEDS_RESET);
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            let bad = self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0;
            if bad {
                tracing::warn!("{}: driver accepted features {:#x} not offered ({offered:#x}) or without VERSION_1", self.name, self.driver_features);
                value &= !STATUS_FEATURES_OK;
            }
        }
        self.status = value;
        let ready = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if newly & STATUS_DRIVER_OK != 0 && value & ready == ready && value & STATUS_FAILED == 0 && !self.active {
            if let Err(e) = self.activate() {
                tracing::error!("{}: cannot start: {e}", self.name);
                self.status |= STATUS_NEEDS_RESET;
                self.irq.trigger(InterruptKind::Config);
            }
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        let event_idx = self.driver_features & VIRTIO_F_RING_EVENT_IDX != 0;
        let mut handles = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(format!("queue {i} has rings outside guest memory or misaligned"));
            }
            let mut state = q.state();
            state.event_idx_enabled = event_idx;
            let queue = Queue::try_from(state).map_err(|e| format!("queue {i}: {e}"))?;
            let event = self.queue_events[i].try_clone().map_err(|e| e.to_string())?;
            handles.push(QueueHandle { queue, event });
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.irq.clone(),
            queues: handles,
            features: self.driver_features,
        };
        self.device.activate(ctx)?;
        self.active = true;
        tracing::info!("{}: driver ready, features {:#x}", self.name, self.driver_features);
        Ok(())
    }

    fn reset(&mut self) {
        self.shutdown();
        for q in &mut self.queues {
            q.reset();
        }
        for e in &self.queue_events {
            let _ = e.read();
        }
        self.driver_features = 0;
        self.status = 0;
        self.quiesced = false;
        self.queue_select = 0;
        self.irq.isr.store(0, Ordering::SeqCst);
        self.irq.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for v in &self.irq.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }

    /// The BAR window the PCI configuration access capability points at:
    /// (offset, length) when it is BAR 0 with a naturally aligned 1, 2 or
    /// 4-byte access, as the spec allows; anything else is ignored.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let reg = |at: usize| self.config.read_reg((self.pci_cfg_cap + at) / 4);
        let bar = reg(PCI_CFG_BAR) & 0xff;
        let (offset, len) = (u64::from(reg(PCI_CFG_OFFSET)), reg(PCI_CFG_LENGTH) as usize);
        (bar == 0 && matches!(len, 1 | 2 | 4) && offset % len as u64 == 0 && offset + len as u64 <= BAR_SIZE)
            .then_some((offset, len))
    }

    fn move_ioevents(&mut self, new: Option<u64>) {
        if let Some(old) = self.notify_base.take() {
            for (i, e) in self.queue_events.iter().enumerate() {
                let _ = self.ioevents.unregister(e, old + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER));
            }
        }
        if let Some(base) = new {
            let base = base + NOTIFY_CFG;
            for (i, e) in self.queue_events.iter().enumerate() {
                if let Err(err) = self.ioevents.register(e, base + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)) {
                    // Notifications still arrive, as MMIO exits.
                    tracing::warn!("{}: ioeventfd for queue {i}: {err}", self.name);
                }
            }
            self.notify_base = Some(base);
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == (self.pci_cfg_cap + PCI_CFG_DATA) / 4 {
            if let Some((offset, len)) = self.pci_cfg_window() {
                let mut b = [0u8; 4];
                self.read_bar(0, offset, &mut b[..len]);
                return u32::from_le_bytes(b);
            }
        }
        self.config.read_reg(reg)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config.write(offset, data);
        if offset == (self.pci_cfg_cap + PCI_CFG_DATA) as u64 {
            if let Some((bar_offset, _)) = self.pci_cfg_window().filter(|(_, len)| *len == data.len()) {
                self.write_bar(0, bar_offset, data);
            }
            return;
        }
        self.irq.intx_disabled.store(self.config.intx_disabled(), Ordering::Relaxed);
        let ctl_at = self.msix_cap as u64 + 2;
        if offset < ctl_at + 2 && offset + data.len() as u64 > ctl_at {
            let ctl = (self.config.read_reg(self.msix_cap / 4) >> 16) as u16;
            lock(&self.irq.msix).set_control(ctl);
        }
    }

    fn decoded_bars(&self) -> Vec<PciBarInfo> {
        self.config.decoded_bars()
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0xff);
            return;
        }
        match offset {
            o if o < COMMON_CFG + REGION_LEN => self.common_read(o, data),
            o if o < ISR_CFG + REGION_LEN => {
                data.fill(0);
                if o == ISR_CFG {
                    data[0] = self.irq.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if o < DEVICE_CFG + REGION_LEN => self.device.read_config(o - DEVICE_CFG, data),
            o if o < NOTIFY_CFG + REGION_LEN => data.fill(0),
            o if o < MSIX_TABLE + REGION_LEN => lock(&self.irq.msix).read_table(o - MSIX_TABLE, data),
            o if o < MSIX_PBA + REGION_LEN => lock(&self.irq.msix).read_pba(o - MSIX_PBA, data),
            _ => write_le(data, 0),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_CFG + REGION_LEN => self.common_write(o, data),
            o if o < ISR_CFG + REGION_LEN => {}
            o if o < DEVICE_CFG + REGION_LEN => self.device.write_config(o - DEVICE_CFG, data),
            o if o < NOTIFY_CFG + REGION_LEN => {
                // Reached only when the ioeventfd is not registered.
                let q = ((o - NOTIFY_CFG) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                if let Some(e) = self.queue_events.get(q) {
                    let _ = e.write(1);
                }
            }
            o if o < MSIX_TABLE + REGION_LEN => lock(&self.irq.msix).write_table(o - MSIX_TABLE, data),
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, _old: Option<u64>, new: Option<u64>) {
        if bar == 0 {
            self.move_ioevents(new);
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.shutdown();
        self.move_ioevents(None);
    }
}

#[cfg(test)]
mod tests {
    use rvirt_pci::{MsiMessage, MsiRouter, MsiVector};

    use super::*;
    use crate::chain::tests::memory;
    use crate::DeviceCounters;

    struct NoKvm;
    impl IoEventRegistrar for NoKvm {
        fn register(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn unregister(&self, _: &EventFd, _: u64) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl MsiRouter for NoKvm {
        fn set_msi_route(&self, _: u32, _: MsiMessage) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A device that records activations and where its queue was each time.
    #[derive(Default)]
    struct Dummy {
        activations: Arc<Mutex<usize>>,
        positions: Arc<Mutex<Vec<(u16, u16)>>>,
    }
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            device_type::RNG
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn config_len(&self) -> usize {
            0
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), String> {
            *self.activations.lock().unwrap() += 1;
            let q = &ctx.queues[0].queue;
            self.positions.lock().unwrap().push((q.next_avail(), q.next_used()));
            Ok(())
        }
        fn reset(&mut self) {}
        fn counters(&self) -> Arc<DeviceCounters> {
            Arc::default()
        }
    }

    fn device() -> (VirtioPciDevice, Arc<Mutex<usize>>) {
        let d = Dummy::default();
        let n = d.activations.clone();
        let vectors = (0..2).map(|i| MsiVector { gsi: 24 + i, irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap() }).collect();
        let msix = MsixConfig::new(vectors, Arc::new(NoKvm));
        (VirtioPciDevice::new("t", Box::new(d), memory(), msix, None, Arc::new(NoKvm), 0xc000_0000).unwrap(), n)
    }

    fn w(d: &mut VirtioPciDevice, off: u64, v: u64, len: usize) {
        d.write_bar(0, off, &v.to_le_bytes()[..len]);
    }

    fn r(d: &mut VirtioPciDevice, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn negotiate(d: &mut VirtioPciDevice) {
        w(d, 0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        w(d, 0x08, 1, 4);
        w(d, 0x0c, 1, 4); // VERSION_1
        w(d, 0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK), 1);
    }

    #[test]
    fn pci_identity_and_capabilities() {
        let (mut d, _) = device();
        assert_eq!(d.read_config_register(0), 0x1044_1af4, "modern virtio-rng ID");
        // Walk the capability list: four virtio capabilities, MSI-X, PCI config access.
        let mut at = (d.read_config_register(0xd) & 0xff) as usize;
        let mut kinds = Vec::new();
        while at != 0 {
            let reg = d.read_config_register(at / 4);
            kinds.push((reg & 0xff, (reg >> 24) & 0xff));
            at = ((reg >> 8) & 0xff) as usize;
        }
        assert_eq!(kinds, vec![(9, 1), (9, 3), (9, 2), (0x11, 0), (9, 5)]);
    }

    #[test]
    fn pci_config_access_capability_reaches_bar_0() {
        let (mut d, _) = device();
        let cap = d.pci_cfg_cap as u64;
        let set = |d: &mut VirtioPciDevice, bar: u8, offset: u32, len: u32| {
            d.write_config(cap + PCI_CFG_BAR as u64, &[bar]);
            d.write_config(cap + PCI_CFG_OFFSET as u64, &offset.to_le_bytes());
            d.write_config(cap + PCI_CFG_LENGTH as u64, &len.to_le_bytes());
        };
        let data_reg = (d.pci_cfg_cap + PCI_CFG_DATA) / 4;
        // device_feature_select = 1, then device_feature reads VERSION_1 (bit 32).
        set(&mut d, 0, 0x00, 4);
        d.write_config(cap + PCI_CFG_DATA as u64, &1u32.to_le_bytes());
        assert_eq!(r(&mut d, 0x00, 4), 1);
        set(&mut d, 0, 0x04, 4);
        assert_eq!(d.read_config_register(data_reg), 1);
        // A 1-byte access: device_status.
        set(&mut d, 0, 0x14, 1);
        d.write_config(cap + PCI_CFG_DATA as u64, &[STATUS_ACKNOWLEDGE]);
        assert_eq!(r(&mut d, 0x14, 1), u64::from(STATUS_ACKNOWLEDGE));
        assert_eq!(d.read_config_register(data_reg) & 0xff, u32::from(STATUS_ACKNOWLEDGE));
        // Another BAR, an odd length, a misaligned or out-of-range offset: no access.
        for (bar, offset, len) in [(1, 0x14, 1), (0, 0x14, 3), (0, 0x15, 2), (0, BAR_SIZE as u32, 4)] {
            set(&mut d, bar, offset, len);
            d.write_config(cap + PCI_CFG_DATA as u64, &[0xff; 4][..len.min(4) as usize]);
        }
        assert_eq!(r(&mut d, 0x14, 1), u64::from(STATUS_ACKNOWLEDGE), "status untouched");
    }

    #[test]
    fn activates_only_after_a_valid_negotiation() {
        let (mut d, n) = device();
        // Features never offered: FEATURES_OK does not stick.
        w(&mut d, 0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        w(&mut d, 0x08, 0, 4);
        w(&mut d, 0x0c, 0xffff_ffff, 4);
        w(&mut d, 0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK), 1);
        assert_eq!(r(&mut d, 0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
        w(&mut d, 0x14, 0, 1);
        negotiate(&mut d);
        assert_ne!(r(&mut d, 0x14, 1) as u8 & STATUS_FEATURES_OK, 0);
        // Queue 0: an invalid size is ignored; rings inside memory.
        w(&mut d, 0x16, 0, 2);
        w(&mut d, 0x18, 3, 2);
        assert_eq!(r(&mut d, 0x18, 2), 16);
        w(&mut d, 0x20, 0x1000, 8);
        w(&mut d, 0x28, 0x2000, 4);
        w(&mut d, 0x2c, 0, 4);
        w(&mut d, 0x30, 0x3000, 8);
        w(&mut d, 0x1c, 1, 2);
        w(&mut d, 0x1a, 500, 2);
        assert_eq!(r(&mut d, 0x1a, 2) as u16, NO_VECTOR, "a vector beyond the table reads as none");
        w(&mut d, 0x14, 0x0f, 1);
        assert_eq!(*n.lock().unwrap(), 1);
        assert_eq!(r(&mut d, 0x14, 1), 0x0f);
    }

    /// A driver's setup: queue 0's rings at 0x1000/0x2000/0x3000, MSI-X on
    /// with vector 0 programmed for the queue and 1 for configuration changes.
    fn started(d: &mut VirtioPciDevice) {
        negotiate(d);
        d.write_config(d.msix_cap as u64 + 2, &0x8000u16.to_le_bytes());
        w(d, MSIX_TABLE, 0xfee0_0000, 8);
        w(d, MSIX_TABLE + 8, 0x41, 4);
        w(d, MSIX_TABLE + 12, 0, 4);
        w(d, 0x10, 1, 2);
        w(d, 0x16, 0, 2);
        w(d, 0x18, 8, 2);
        w(d, 0x20, 0x1000, 8);
        w(d, 0x28, 0x2000, 8);
        w(d, 0x30, 0x3000, 8);
        w(d, 0x1a, 0, 2);
        w(d, 0x1c, 1, 2);
        w(d, 0x14, 0x0f, 1);
    }

    #[test]
    fn a_started_device_is_stopped_saved_and_started_again_where_its_rings_are() {
        use vm_memory::Bytes;
        let (mut one, n) = device();
        started(&mut one);
        assert_eq!(*n.lock().unwrap(), 1);
        // The driver and device got 5 requests through.
        one.mem.write_obj(5u16.to_le(), vm_memory::GuestAddress(0x3002)).unwrap();
        one.quiesce();
        let saved = one.save();
        assert!(saved.active && saved.queues[0] == QueueSetup { size: 8, ready: true, desc: 0x1000, avail: 0x2000, used: 0x3000 });
        // Started again in the same VM (a snapshot that resumes): at the used index, and kicked.
        one.resume().unwrap();
        assert_eq!(*n.lock().unwrap(), 2);
        assert_eq!(one.queue_events[0].read().unwrap(), 1, "each queue is kicked once");

        // Built again and restored: the same registers, table and position.
        let d2 = Dummy::default();
        let (n2, positions) = (d2.activations.clone(), d2.positions.clone());
        let vectors = (0..2).map(|i| MsiVector { gsi: 24 + i, irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap() }).collect();
        let mut two = VirtioPciDevice::new("t", Box::new(d2), one.mem.clone(), MsixConfig::new(vectors, Arc::new(NoKvm)), None, Arc::new(NoKvm), 0xc000_0000).unwrap();
        two.restore(&saved).unwrap();
        assert_eq!(*n2.lock().unwrap(), 1);
        assert_eq!(*positions.lock().unwrap(), [(5, 5)]);
        assert_eq!(two.save(), saved);
        assert_eq!(one.common_image(), two.common_image());
        let (mut t1, mut t2) = ([0u8; 32], [0u8; 32]);
        lock(&one.irq.msix).read_table(0, &mut t1);
        lock(&two.irq.msix).read_table(0, &mut t2);
        assert_eq!(t1, t2);

        // Another kind of device, other queues, features it lacks: refused, saying so.
        let mut other = saved.clone();
        other.device_type = device_type::NET;
        assert!(two.restore(&other).unwrap_err().contains("type 1, this one is type 4"));
        let mut other = saved.clone();
        other.queues.push(other.queues[0].clone());
        assert!(two.restore(&other).unwrap_err().contains("2 queues saved"));
        let mut other = saved.clone();
        other.driver_features |= 1 << 40;
        assert!(two.restore(&other).unwrap_err().contains("does not offer"));
        let mut other = saved;
        other.config.regs[0] = 0x1000_1af4;
        assert!(two.restore(&other).unwrap_err().contains("saved function 0x10001af4"));
    }

    #[test]
    fn rings_outside_memory_ask_for_a_reset() {
        let (mut d, n) = device();
        negotiate(&mut d);
        w(&mut d, 0x16, 0, 2);
        w(&mut d, 0x20, 0xffff_ffff_0000, 8);
        w(&mut d, 0x1c, 1, 2);
        w(&mut d, 0x14, 0x0f, 1);
        assert_eq!(*n.lock().unwrap(), 0);
        assert_ne!(r(&mut d, 0x14, 1) as u8 & STATUS_NEEDS_RESET, 0);
        // Selecting a queue that does not exist reads as size 0 and ignores writes.
        w(&mut d, 0x16, 9, 2);
        assert_eq!(r(&mut d, 0x18, 2), 0);
        w(&mut d, 0x1c, 1, 2);
        // A reset clears everything.
        w(&mut d, 0x14, 0, 1);
        assert_eq!(r(&mut d, 0x14, 1), 0);
        // Odd accesses anywhere in the BAR are harmless.
        for off in (0..BAR_SIZE).step_by(0x7ff) {
            w(&mut d, off, u64::MAX, 8);
            r(&mut d, off, 3);
        }
    }
}
