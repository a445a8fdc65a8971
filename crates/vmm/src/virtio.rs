//! The VM's PCI bus and its virtio devices, built from the configuration.
//!
//! Backends (image files, taps, the console) are opened once per VMM run by
//! [`Backends::open`], before any KVM resource exists, so a missing disk or
//! a tap the user may not create is reported plainly; a guest reboot builds
//! new devices on the same backends (a tap created by us keeps its address).

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use rvirt_devices::bus::lock;
use rvirt_pci::acpi::intx_gsi;
use rvirt_pci::{MsixConfig, PciBus};
use rvirt_virtio_devices::balloon::BalloonHandle;
use rvirt_virtio_devices::net::NetHandle;
use rvirt_virtio_devices::transport::{IntxResample, BAR_SIZE};
use rvirt_virtio_devices::worker::{EventLoop, Worker};
use rvirt_virtio_devices::{
    Balloon, CounterSnapshot, DeviceCounters, IntxLine, Tap, VirtioBlock, VirtioConsole, VirtioDevice, VirtioNet,
    VirtioPciDevice, VirtioRng, VirtioScsi,
};
use rvirt_scsi::Lun;
use rvirt_virtio_devices::scsi::Targets;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{DiskBus, DiskConfig, Media, VmConfig};
use crate::firmware::BootDevicePath;
use crate::console::Console;
use crate::interrupts::{GsiRouter, KvmIoEvents};
use crate::{Error, Result};

/// An opened disk.
pub struct DiskBackend {
    /// What the user asked for.
    pub config: DiskConfig,
    /// The image (None: a CD-ROM drive without a disc).
    pub image: Option<Arc<dyn rvirt_block::BlockBackend>>,
}

/// Everything outside the VM that devices attach to, opened once per run.
pub struct Backends {
    /// Disks in order.
    pub disks: Vec<DiskBackend>,
    /// Taps and the MAC each card gets.
    pub nets: Vec<(Arc<Tap>, [u8; 6])>,
    /// Each card's link state, kept across reboots (fresh devices start with it).
    pub links: Vec<Arc<std::sync::atomic::AtomicBool>>,
    /// The virtio console's backend.
    pub console: Option<Console>,
    /// The kernel and initramfs, opened once: a reboot reloads them from
    /// these descriptors (a jailed VMM can no longer reach their paths).
    pub kernel: Option<KernelFiles>,
    /// The writable disks, which a live migration hands over (also in `disks`).
    pub handovers: Vec<Arc<crate::handover::HandoverDisk>>,
    /// `/dev/urandom` for the virtio-rng device.
    rng: Option<Arc<std::fs::File>>,
    balloon: bool,
}

/// A kernel and its initramfs, open.
pub struct KernelFiles {
    /// The kernel image.
    pub kernel: std::fs::File,
    /// The initramfs.
    pub initrd: Option<std::fs::File>,
}

fn random_mac() -> [u8; 6] {
    let mut b = [0u8; 3];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    // 52:54:00 is the prefix QEMU and libvirt users expect for virtual cards.
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

/// Opens the image of `d` as its settings say (format never probed).
pub(crate) fn open_disk(d: &DiskConfig) -> Result<Arc<dyn rvirt_block::BlockBackend>> {
    open_disk_with(d, if d.shareable { rvirt_block::Locking::ShareWrite } else { rvirt_block::Locking::Exclusive })
}

/// Opens the image of `d` taking the locks `locking` says.
pub(crate) fn open_disk_with(d: &DiskConfig, locking: rvirt_block::Locking) -> Result<Arc<dyn rvirt_block::BlockBackend>> {
    use rvirt_block::{BackingPolicy, Format, ImageOptions};
    // The image library's errors already name the file.
    let err = |e: rvirt_block::Error| Error::Device(format!("--disk: {e}"));
    // Never probed: the guest writes the first bytes of its disk, and a
    // probe could be talked into opening any host file as a backing file.
    let format = d.format.map_or(Format::Raw, crate::config::block_format);
    let backing = if !d.backing.is_empty() {
        BackingPolicy::Given(d.backing.iter().map(|l| rvirt_block::Layer { path: l.path.clone(), format: crate::config::block_format(l.format) }).collect())
    } else if d.probe_backing {
        BackingPolicy::Probe
    } else {
        BackingPolicy::RecordedFormat
    };
    let opts = ImageOptions {
        read_only: d.read_only,
        locking,
        backing,
        direct: d.direct,
    };
    Ok(Arc::from(rvirt_block::open_with(&d.path, format, &opts).map_err(err)?))
}

impl Backends {
    /// Opens every backend `cfg` names.
    pub fn open(cfg: &VmConfig) -> Result<Self> {
        Self::open_with(cfg, false, false)
    }

    /// Opens the backends of a restored VM: its kernel only serves a later
    /// guest reboot, so a kernel that can no longer be opened is a warning
    /// (a reboot then ends the VM), not a failed restore.
    pub fn open_restored(cfg: &VmConfig) -> Result<Self> {
        Self::open_with(cfg, true, false)
    }

    /// Opens the backends of a VM migrating here: as a restored VM's,
    /// except that the writable disks stay closed until the source lets go
    /// of them ([`crate::handover`]).
    pub fn open_incoming(cfg: &VmConfig) -> Result<Self> {
        Self::open_with(cfg, true, true)
    }

    fn open_with(cfg: &VmConfig, kernel_optional: bool, incoming: bool) -> Result<Self> {
        use crate::handover::{needs_handover, HandoverDisk};
        let mut handovers = Vec::new();
        let disks = cfg
            .disks
            .iter()
            .map(|d| {
                let image: Option<Arc<dyn rvirt_block::BlockBackend>> = if d.path.as_os_str().is_empty() {
                    None
                } else if needs_handover(d) {
                    let h = Arc::new(if incoming { HandoverDisk::held_elsewhere(d)? } else { HandoverDisk::open(d)? });
                    handovers.push(h.clone());
                    Some(h)
                } else {
                    Some(open_disk(d)?)
                };
                Ok(DiskBackend { config: d.clone(), image })
            })
            .collect::<Result<Vec<_>>>()?;
        let nets = cfg
            .nets
            .iter()
            .map(|n| {
                let tap = match (crate::inherited::take_tap(&n.tap), n.fd) {
                    (Some(fd), _) => Tap::from_fd(&n.tap, fd),
                    (None, Some(fd)) => return Err(Error::Config(format!("--net: descriptor {fd} of tap '{}' was not taken at start", n.tap))),
                    (None, None) => Tap::open(&n.tap),
                }
                .map_err(|e| Error::Device(format!("--net: {e}")))?;
                if let Some(br) = &n.bridge {
                    tap.attach_to_bridge(br).map_err(|e| Error::Device(format!("--net: {e}")))?;
                }
                Ok((Arc::new(tap), n.mac.unwrap_or_else(random_mac)))
            })
            .collect::<Result<Vec<_>>>()?;
        let links = cfg.nets.iter().map(|n| Arc::new(std::sync::atomic::AtomicBool::new(n.link_up))).collect();
        let console = cfg.console.as_ref().map(Console::open).transpose()?;
        let kernel = match &cfg.boot {
            crate::config::Boot::Kernel { kernel, initrd, .. } => {
                let files = crate::loader::open_input("kernel", kernel).and_then(|k| {
                    Ok(KernelFiles { kernel: k, initrd: initrd.as_deref().map(|p| crate::loader::open_input("initramfs", p)).transpose()? })
                });
                match files {
                    Ok(f) => Some(f),
                    Err(e) if kernel_optional => {
                        tracing::warn!("{e}: a guest reboot will end the restored VM");
                        None
                    }
                    Err(e) => return Err(e),
                }
            }
            crate::config::Boot::Firmware { .. } | crate::config::Boot::Restore { .. } | crate::config::Boot::Incoming { .. } => None,
        };
        let rng = if cfg.rng {
            let f = std::fs::File::open("/dev/urandom").map_err(|e| Error::Device(format!("virtio-rng: /dev/urandom: {e}")))?;
            Some(Arc::new(f))
        } else {
            None
        };
        Ok(Self { disks, nets, links, console, kernel, handovers, rng, balloon: cfg.balloon })
    }
}

/// One virtio device on the bus, as the API reports it.
pub struct DeviceEntry {
    /// Name: `disk0`, `net0`, `rng`, `balloon`, `console`.
    pub name: String,
    /// Its slot on PCI bus 0 (firmware boot order names devices by slot).
    pub slot: usize,
    /// Counters.
    pub counters: Arc<DeviceCounters>,
    /// The device with its transport (the device tree saves its state).
    pub transport: Arc<Mutex<VirtioPciDevice>>,
}

/// The PCI bus with its devices, and handles the API steers them with.
pub struct PciDevices {
    /// Bus 0.
    pub bus: Arc<PciBus>,
    /// Every virtio device.
    pub devices: Vec<DeviceEntry>,
    /// The balloon, when there is one.
    pub balloon: Option<BalloonHandle>,
    /// Network cards' link controls by device name, with the state a
    /// reboot's fresh card starts with.
    pub nets: Vec<(String, NetHandle, Arc<std::sync::atomic::AtomicBool>)>,
    /// The virtio-scsi controller's units (target = index), for media changes.
    pub scsi: Option<Targets>,
    /// Each SCSI unit's name (`diskN`, its `--disk` position) and target.
    pub scsi_units: Vec<(String, usize)>,
    /// Disks with a place in the firmware's boot order, and their index.
    pub boot: Vec<(BootDevicePath, u16)>,
    transports: Vec<Arc<Mutex<VirtioPciDevice>>>,
    _resampler: Option<Worker>,
}

impl PciDevices {
    /// The PCI slot of the device called `name` (`disk0`, ...).
    pub fn slot_of(&self, name: &str) -> Option<usize> {
        self.devices.iter().find(|d| d.name == name).map(|d| d.slot)
    }

    /// Device counters by name.
    pub fn counters(&self) -> Vec<(String, CounterSnapshot)> {
        self.devices.iter().map(|d| (d.name.clone(), d.counters.snapshot())).collect()
    }

    /// Stops every device's worker thread.
    pub fn shutdown(&self) {
        for t in &self.transports {
            lock(t).shutdown();
        }
    }
}

struct Builder<'a> {
    vm: &'a Arc<VmFd>,
    mem: &'a GuestMemoryMmap,
    router: Arc<GsiRouter>,
    ioevents: Arc<KvmIoEvents>,
    bus: PciBus,
    transports: Vec<Arc<Mutex<VirtioPciDevice>>>,
    devices: Vec<DeviceEntry>,
    resamples: Vec<IntxResample>,
    scsi: Option<Targets>,
}

impl Builder<'_> {
    /// Puts `device` on the bus; returns its slot.
    fn add(&mut self, name: &str, device: Box<dyn VirtioDevice>) -> Result<usize> {
        let dev_err = |e: std::io::Error| Error::Device(format!("{name}: {e}"));
        let slot = self.bus.free_slot().ok_or_else(|| Error::Device(format!("{name}: {}", rvirt_pci::Error::NoFreeSlot)))?;
        let vectors = (0..=device.queue_max_sizes().len())
            .map(|_| self.router.new_vector())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(dev_err)?;
        let msix = MsixConfig::new(vectors, self.router.clone());
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err)?;
        let resample = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err)?;
        self.vm
            .register_irqfd_with_resample(&irqfd, &resample, intx_gsi(slot, 0))
            .map_err(|e| Error::Device(format!("{name}: INTx irqfd: {e}")))?;
        let bar = self.bus.allocate_bar(BAR_SIZE).map_err(|e| Error::Device(format!("{name}: {e}")))?;
        let counters = device.counters();
        let transport = VirtioPciDevice::new(
            name,
            device,
            self.mem.clone(),
            msix,
            Some(IntxLine { irqfd, resample }),
            self.ioevents.clone(),
            bar,
        )
        .map_err(dev_err)?;
        if let Some(r) = transport.intx_resample().map_err(dev_err)? {
            self.resamples.push(r);
        }
        let transport = Arc::new(Mutex::new(transport));
        self.bus.add_device(transport.clone()).map_err(|e| Error::Device(format!("{name}: {e}")))?;
        self.transports.push(transport.clone());
        self.devices.push(DeviceEntry { name: name.into(), slot, counters, transport });
        Ok(slot)
    }
}

/// Re-asserts INTx lines after EOIs while their device still has an interrupt pending.
fn spawn_resampler(resamples: Vec<IntxResample>) -> Result<Option<Worker>> {
    if resamples.is_empty() {
        return Ok(None);
    }
    let worker = Worker::spawn("intx-resample", move |kill| {
        let Ok(mut events) = EventLoop::new() else { return };
        for (i, r) in resamples.iter().enumerate() {
            if events.add(&r.resample, i as u64).is_err() {
                return;
            }
        }
        if events.add(&kill, u64::MAX).is_err() {
            return;
        }
        while let Ok(tokens) = events.wait() {
            for t in tokens {
                match resamples.get(t as usize) {
                    Some(r) => r.on_eoi(),
                    None => return,
                }
            }
        }
    })
    .map_err(crate::error::os("spawning the INTx resampler"))?;
    Ok(Some(worker))
}

/// Builds bus 0 with the virtio devices for `backends`.
pub fn build(vm: &Arc<VmFd>, mem: &GuestMemoryMmap, backends: &Backends) -> Result<PciDevices> {
    use rvirt_arch::layout::{PCI_MMIO_END, PCI_MMIO_START};
    let mut b = Builder {
        vm,
        mem,
        router: Arc::new(GsiRouter::new(vm.clone())),
        ioevents: Arc::new(KvmIoEvents(vm.clone())),
        bus: PciBus::new(PCI_MMIO_START, PCI_MMIO_END),
        transports: Vec::new(),
        devices: Vec::new(),
        resamples: Vec::new(),
        scsi: None,
    };
    let mut luns = Vec::new();
    let mut boot = Vec::new();
    let mut scsi_units = Vec::new();
    for (i, d) in backends.disks.iter().enumerate() {
        let serial = d.config.serial.clone().unwrap_or_default();
        match (d.config.bus, d.config.media, &d.image) {
            (DiskBus::Virtio, _, Some(image)) => {
                let slot = b.add(&format!("disk{i}"), Box::new(VirtioBlock::new(format!("disk{i}"), image.clone(), &serial)))?;
                if let Some(index) = d.config.boot_index {
                    boot.push((BootDevicePath::Virtio { slot }, index));
                }
            }
            (DiskBus::Scsi, media, image) => {
                if let Some(index) = d.config.boot_index {
                    boot.push((BootDevicePath::Scsi { slot: 0, target: luns.len() }, index));
                }
                scsi_units.push((format!("disk{i}"), luns.len()));
                luns.push(match media {
                    Media::Disk => Lun::disk(image.clone().ok_or_else(|| Error::Config(format!("disk{i} has no image")))?, &serial),
                    Media::Cdrom => Lun::cdrom(image.clone(), &serial),
                });
            }
            (DiskBus::Virtio, _, None) => return Err(Error::Config(format!("disk{i} has no image"))),
        }
    }
    if !luns.is_empty() {
        let scsi = VirtioScsi::new("scsi0", luns).map_err(Error::Config)?;
        let targets = scsi.targets();
        let slot = b.add("scsi0", Box::new(scsi))?;
        for (path, _) in &mut boot {
            if let BootDevicePath::Scsi { slot: s, .. } = path {
                *s = slot;
            }
        }
        b.scsi = Some(targets);
    }
    let mut nets = Vec::new();
    for (i, (tap, mac)) in backends.nets.iter().enumerate() {
        let (dev, handle) = VirtioNet::new(tap.clone(), *mac);
        let link = backends.links.get(i).cloned().unwrap_or_else(|| Arc::new(std::sync::atomic::AtomicBool::new(true)));
        handle.set_link(link.load(std::sync::atomic::Ordering::SeqCst));
        b.add(&format!("net{i}"), Box::new(dev))?;
        nets.push((format!("net{i}"), handle, link));
    }
    if let Some(source) = &backends.rng {
        b.add("rng", Box::new(VirtioRng::with_source(source.clone())))?;
    }
    let mut balloon = None;
    if backends.balloon {
        let (dev, handle) = Balloon::new();
        b.add("balloon", Box::new(dev))?;
        balloon = Some(handle);
    }
    if let Some(console) = &backends.console {
        let input = match console.input_fd() {
            // SAFETY: dup of a descriptor the console holds; the copy is owned by the device.
            Some(fd) => match unsafe { libc::dup(fd) } {
                // SAFETY: `n` is the new descriptor dup returned, owned by nothing else.
                n if n >= 0 => Some(unsafe { OwnedFd::from_raw_fd(n) }),
                _ => return Err(Error::Device(format!("virtio-console: dup: {}", std::io::Error::last_os_error()))),
            },
            None => None,
        };
        b.add("console", Box::new(VirtioConsole::new(console.writer()?, input)))?;
    }
    let resampler = spawn_resampler(std::mem::take(&mut b.resamples))?;
    Ok(PciDevices {
        bus: Arc::new(b.bus),
        devices: b.devices,
        balloon,
        nets,
        transports: b.transports,
        scsi: b.scsi,
        scsi_units,
        boot,
        _resampler: resampler,
    })
}
