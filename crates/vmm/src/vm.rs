//! One boot of a virtual machine: the KVM VM, its memory, devices and vCPU
//! threads. A guest reboot with `--on-reboot restart` builds a new [`Vm`].

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use rvirt_api::{BalloonStatus, DeviceStats, Request, Response, RunState, VmStats, VmStatus};
use rvirt_arch::layout::{
    ECAM_SIZE, ECAM_START, KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, PCI_MMIO_END, PCI_MMIO_START, PLATFORM_MMIO_START,
};
use rvirt_arch::{cpuid, regs, MemoryLayout};
use rvirt_devices::acpi::{AcpiPm, Ged, GedEvent, GED_IRQ, GED_SIZE, PM_BASE, PM_SIZE};
use rvirt_devices::bus::lock;
use rvirt_devices::cmos::{Cmos, CMOS_BASE, CMOS_IRQ, CMOS_SIZE};
use rvirt_devices::debugcon::{DebugCon, DEBUGCON_PORT};
use rvirt_devices::fw_cfg::{FW_CFG_PORT, FW_CFG_PORT_LEN};
use rvirt_devices::i8042::{I8042, I8042_BASE, I8042_SIZE};
use rvirt_devices::serial::{SerialDevice, COM1_BASE, COM1_IRQ, UART_REGISTERS};
use rvirt_devices::{Bus, BusDevice, IrqLine};
use rvirt_pci::{PciBarWindow, PciConfigIo, PciConfigMmio, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_SIZE};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{Boot, VmConfig};
use crate::device_manager::{DeviceManager, Devices, Resource};
use crate::error::kvm;
use crate::firmware::{self, FirmwareRom, MachineInfo};
use crate::loader::{self, LoadedKernel};
use crate::vcpu::{self, VcpuContext, VmControl};
use crate::vcpu_state::MachineState;
use crate::virtio::{Backends, PciDevices};
use crate::{acpi, memory, snapshot, virtio, Error, Result};

/// Port 0x80: the POST-code port Linux writes to as an I/O delay. Swallowed.
struct PostCodePort;

impl BusDevice for PostCodePort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Where [`Vm::snapshot`] writes.
pub enum SnapshotTo<'a> {
    /// A directory of `state` and `memory` files, made here.
    Dir(&'a std::path::Path),
    /// One file ([`rvirt_api::saved`]), open for writing, with the
    /// manager's note.
    File {
        /// The file (emptied first).
        file: &'a std::fs::File,
        /// Kept for the manager.
        note: &'a str,
    },
}

/// A built (and, after [`Vm::start`], running) virtual machine.
pub struct Vm {
    vm_fd: Arc<VmFd>,
    /// Each vCPU's CPUID, as set (saved with its state, checked on restore).
    cpuids: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    /// The MSRs a vCPU's saved state holds.
    msrs: Arc<[u32]>,
    memory: GuestMemoryMmap,
    pci: PciDevices,
    control: Arc<VmControl>,
    serial: Arc<Mutex<SerialDevice>>,
    ged: Arc<Mutex<Ged>>,
    /// Every platform device by id, for snapshots.
    devices: Devices,
    vcpus: Vec<VcpuFd>,
    threads: Vec<JoinHandle<()>>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    started: Instant,
    /// What the VM was built from, with each card's MAC as given to it (a
    /// snapshot keeps it: a restore builds the same devices).
    config: VmConfig,
    /// Discs changed since the VM was built, by drive (`diskN`): the file
    /// now in it (empty: ejected). A snapshot's configuration says so.
    media: Mutex<std::collections::BTreeMap<String, std::path::PathBuf>>,
    /// Disks moved onto an overlay since the start, by `--disk` position, as they are now.
    overlaid: Mutex<std::collections::BTreeMap<usize, crate::config::DiskConfig>>,
    /// A migration under way or ended (for `migrate-status`).
    outgoing: Mutex<Option<crate::migration::Outgoing>>,
    /// Signalled when the migration thread has word for the main loop.
    migration_wake: Arc<EventFd>,
    /// Auto-converge's hold on the vCPUs, while a migration asks for it.
    throttle: Mutex<Option<Throttle>>,
    /// The writable disks, let go at a migration's switch-over.
    handovers: Vec<Arc<crate::handover::HandoverDisk>>,
    /// Each disk's size (None: a CD-ROM drive), told to a migration's destination.
    disk_sizes: Vec<Option<u64>>,
    /// The vCPUs' dirty rings, when the VM tracks dirty pages with them.
    dirty_rings: Option<Arc<crate::dirty_ring::DirtyRings>>,
    /// What was loaded where (direct kernel boot).
    pub kernel: Option<LoadedKernel>,
    _firmware: Option<FirmwareRom>,
    /// The serial console's pty, reported in `status`.
    pub serial_pty: Option<String>,
}

fn irq_line(vm: &VmFd, gsi: u32) -> Result<IrqLine> {
    let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(crate::error::os("eventfd"))?);
    vm.register_irqfd(&evt, gsi).map_err(kvm("IRQFD"))?;
    Ok(IrqLine::new(evt))
}

impl Vm {
    /// Builds the VM described by `cfg`, with the guest's console output
    /// going to `serial_out`, its virtio devices on `backends` and, when it
    /// boots through firmware, the image `firmware` (read by the caller).
    pub fn create(
        kvm_handle: &Kvm,
        cfg: &VmConfig,
        serial_out: Box<dyn std::io::Write + Send>,
        backends: &Backends,
        firmware: Option<&[u8]>,
    ) -> Result<Self> {
        Self::build(kvm_handle, cfg, serial_out, backends, firmware, None)
    }

    /// Builds the VM of a snapshot (`cfg` is the snapshot's configuration,
    /// booting as the VM first did) on `mem`, its memory, with the firmware
    /// image the snapshot kept (`rom`, for a VM that booted through
    /// firmware): nothing is loaded; the caller restores the vCPU and device
    /// state ([`Vm::restore_snapshot`]) before [`Vm::start`].
    pub fn create_restored(
        kvm_handle: &Kvm,
        cfg: &VmConfig,
        serial_out: Box<dyn std::io::Write + Send>,
        backends: &Backends,
        mem: GuestMemoryMmap,
        rom: Option<&[u8]>,
    ) -> Result<Self> {
        Self::build(kvm_handle, cfg, serial_out, backends, rom, Some(mem))
    }

    fn build(
        kvm_handle: &Kvm,
        cfg: &VmConfig,
        serial_out: Box<dyn std::io::Write + Send>,
        backends: &Backends,
        firmware: Option<&[u8]>,
        restored: Option<GuestMemoryMmap>,
    ) -> Result<Self> {
        let layout = MemoryLayout::new(cfg.memory_bytes).map_err(|e| Error::Config(format!("--memory: {e}")))?;
        let restoring = restored.is_some();
        let vm_fd = Arc::new(kvm_handle.create_vm().map_err(kvm("CREATE_VM"))?);
        // Before any vCPU exists, as KVM requires.
        if let Some(entries) = cfg.dirty_ring {
            crate::dirty_ring::enable(kvm_handle, &vm_fd, entries)?;
        }
        vm_fd.set_tss_address(KVM_TSS_ADDRESS as usize).map_err(kvm("SET_TSS_ADDR"))?;
        vm_fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS).map_err(kvm("SET_IDENTITY_MAP_ADDR"))?;
        vm_fd.create_irq_chip().map_err(kvm("CREATE_IRQCHIP"))?;
        // The PIT's speaker port (0x61) is KVM's: firmware and kernels
        // calibrate the TSC on channel 2, gated through it. KVM emulates
        // the port in the kernel only with this flag (named "dummy", but it
        // reports the gate and channel 2's output); without it reads of 0x61
        // come to us and a calibration loop never ends.
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm_fd.create_pit2(pit).map_err(kvm("CREATE_PIT2"))?;

        let mem = match restored {
            Some(m) => m,
            None => memory::create_guest_memory(&layout)?,
        };
        memory::register_with_kvm(&vm_fd, &mem)?;
        let pci = virtio::build(&vm_fd, &mem, backends)?;
        // A kernel is loaded with ACPI tables beside it; firmware is mapped
        // and gets the machine's description through fw_cfg.
        let (kernel, firmware) = match (&cfg.boot, firmware) {
            // The memory holds the kernel, tables and all; the state comes next.
            (Boot::Kernel { .. }, _) if restoring => (None, None),
            (Boot::Kernel { kernel, initrd, cmdline }, _) => {
                let files = backends.kernel.as_ref().ok_or_else(|| Error::Config(format!("kernel {} was not opened", kernel.display())))?;
                let initrd = match (initrd, &files.initrd) {
                    (Some(path), Some(f)) => Some((path.as_path(), f)),
                    _ => None,
                };
                let k = loader::load(&mem, &layout, (kernel, &files.kernel), initrd, cmdline)?;
                tracing::info!("loaded {:?} kernel, entry {:?}, initramfs {:?}", k.format, k.entry, k.initrd);
                acpi::write(&mem, &acpi::build(cfg.vcpus, &pci.bus.occupied_slots(), &acpi::AcpiLayout::direct())?)?;
                (Some(k), None)
            }
            (Boot::Firmware { reboot_timeout_ms, menu_ms, .. }, Some(image)) => {
                let slot = vm_memory::GuestMemoryBackend::num_regions(&mem) as u32;
                let rom = firmware::map(kvm_handle, &vm_fd, &mem, image, slot, !restoring)?;
                let info = MachineInfo {
                    vcpus: cfg.vcpus,
                    layout: &layout,
                    pci_slots: &pci.bus.occupied_slots(),
                    boot_disks: &pci.boot,
                    uuid: cfg.uuid,
                    reboot_timeout_ms: *reboot_timeout_ms,
                    menu_ms: *menu_ms,
                };
                (None, Some((rom, firmware::fw_cfg(&info, mem.clone())?)))
            }
            (Boot::Restore { .. } | Boot::Incoming { .. }, _) => return Err(Error::Config("a VM is built from its own boot, not from a restore's".into())),
            (Boot::Firmware { .. }, None) if restoring => {
                return Err(Error::Config("the snapshot of a VM booted through firmware holds no firmware image".into()))
            }
            (Boot::Firmware { path, .. }, None) => {
                return Err(Error::Config(format!("firmware {} was not read", path.display())))
            }
        };

        let control = Arc::new(VmControl::new().map_err(crate::error::os("eventfd"))?);
        let serial = Arc::new(Mutex::new(SerialDevice::new(irq_line(&vm_fd, COM1_IRQ)?, serial_out)));
        let ged = Arc::new(Mutex::new(Ged::new(irq_line(&vm_fd, GED_IRQ)?)));
        let pio = |base: u64, len: u64| Resource::Pio { base, len };
        let mut dm = DeviceManager::new();
        dm.add_stateful("com1", serial.clone(), pio(COM1_BASE, UART_REGISTERS))?;
        dm.add("i8042", Arc::new(Mutex::new(I8042::new(control.clone()))), pio(I8042_BASE, I8042_SIZE))?;
        let mut cmos = Cmos::new().with_irq(irq_line(&vm_fd, CMOS_IRQ)?);
        let rom = match firmware {
            Some((rom, fw_cfg)) => {
                let order = match &cfg.boot {
                    Boot::Firmware { order, .. } => order.as_slice(),
                    Boot::Kernel { .. } | Boot::Restore { .. } | Boot::Incoming { .. } => &[],
                };
                for (index, value) in firmware::cmos_presets(cfg.vcpus, order) {
                    cmos.set_nvram(index, value);
                }
                dm.add_stateful("fw_cfg", Arc::new(Mutex::new(fw_cfg)), pio(FW_CFG_PORT, FW_CFG_PORT_LEN))?;
                dm.add("debugcon", Arc::new(Mutex::new(DebugCon::new())), pio(DEBUGCON_PORT, 1))?;
                Some(rom)
            }
            None => None,
        };
        dm.add_stateful("cmos", Arc::new(Mutex::new(cmos)), pio(CMOS_BASE, CMOS_SIZE))?;
        dm.add("post-code", Arc::new(Mutex::new(PostCodePort)), pio(0x80, 1))?;
        dm.add("acpi-pm", Arc::new(Mutex::new(AcpiPm::new(control.clone()))), pio(u64::from(PM_BASE), PM_SIZE))?;
        let config_io = PciConfigIo::new(pci.bus.clone()).with_reset_control(control.clone());
        dm.add("pci-config-io", Arc::new(Mutex::new(config_io)), pio(PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_SIZE))?;
        dm.add_stateful("ged", ged.clone(), Resource::Mmio { base: PLATFORM_MMIO_START, len: GED_SIZE })?;
        dm.add("pci-ecam", Arc::new(Mutex::new(PciConfigMmio::new(pci.bus.clone()))), Resource::Mmio { base: ECAM_START, len: ECAM_SIZE })?;
        // BARs live where the VMM put them, or anywhere firmware moves them.
        let windows = match rom {
            None => vec![(PCI_MMIO_START, PCI_MMIO_END - 1)],
            Some(_) => layout.firmware_pci_windows().to_vec(),
        };
        for (start, last) in windows {
            let window = Arc::new(Mutex::new(PciBarWindow::new(pci.bus.clone(), start)));
            dm.add(&format!("pci-bars@{start:#x}"), window, Resource::Mmio { base: start, len: last - start + 1 })?;
        }
        // Virtio devices live on the PCI bus.
        for d in &pci.devices {
            dm.add_virtio(&d.name, d.slot, d.transport.clone())?;
        }
        let (io_bus, mmio_bus, devices) = dm.finish();

        let supported = kvm_handle.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm("GET_SUPPORTED_CPUID"))?;
        let caps = cpuid::KvmCaps { tsc_deadline_timer: kvm_handle.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) };
        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        let mut cpuids = Vec::with_capacity(usize::from(cfg.vcpus));
        let msrs = crate::vcpu_state::msr_list(kvm_handle)?;
        for id in 0..cfg.vcpus {
            let vcpu = vm_fd.create_vcpu(u64::from(id)).map_err(kvm("CREATE_VCPU"))?;
            let mut cpuid = supported.clone();
            cpuid::filter_cpuid(&mut cpuid, id, cfg.vcpus, caps);
            vcpu.set_cpuid2(&cpuid).map_err(kvm("SET_CPUID2"))?;
            cpuids.push(cpuid.as_slice().to_vec());
            let refused = regs::setup_msrs(&vcpu)?;
            if refused > 0 {
                tracing::warn!("vCPU {id}: host refused {refused} boot MSRs");
            }
            regs::setup_fpu(&vcpu)?;
            regs::setup_lapic(&vcpu)?;
            // Application processors wait for INIT/SIPI from the guest;
            // with firmware the boot vCPU keeps its reset state too.
            if let (0, Some(k)) = (id, &kernel) {
                regs::setup_regs(&vcpu, k.entry)?;
                regs::setup_sregs(&mem, &vcpu, k.entry)?;
            }
            vcpus.push(vcpu);
        }
        let dirty_rings = cfg.dirty_ring.map(|n| crate::dirty_ring::DirtyRings::map(vm_fd.clone(), &mem, &vcpus, n).map(Arc::new)).transpose()?;

        Ok(Self {
            vm_fd,
            cpuids,
            msrs,
            memory: mem,
            pci,
            control,
            serial,
            ged,
            vcpus,
            threads: Vec::new(),
            io_bus,
            mmio_bus,
            devices,
            started: Instant::now(),
            config: {
                let mut c = cfg.clone();
                for (n, (_, mac)) in c.nets.iter_mut().zip(&backends.nets) {
                    n.mac = Some(*mac);
                }
                c
            },
            media: Mutex::default(),
            overlaid: Mutex::default(),
            outgoing: Mutex::default(),
            throttle: Mutex::default(),
            handovers: backends.handovers.clone(),
            dirty_rings,
            disk_sizes: backends
                .disks
                .iter()
                .map(|d| (d.config.media == rvirt_api::config::Media::Disk).then(|| d.image.as_ref().map(|im| im.size())).flatten())
                .collect(),
            migration_wake: Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(crate::error::os("eventfd"))?),
            kernel,
            _firmware: rom,
            serial_pty: None,
        })
    }

    /// Starts one thread per vCPU.
    pub fn start(&mut self) -> Result<()> {
        self.started = Instant::now();
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let ctx = VcpuContext {
                id: id as u8,
                io_bus: self.io_bus.clone(),
                mmio_bus: self.mmio_bus.clone(),
                control: self.control.clone(),
                cpuid: self.cpuids.get(id).cloned().unwrap_or_default(),
                msrs: self.msrs.clone(),
                dirty_rings: self.dirty_rings.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu::run_vcpu(vcpu, ctx))
                .map_err(crate::error::os("spawning a vCPU thread"))?;
            self.threads.push(handle);
        }
        Ok(())
    }

    /// Shared control state (exit reason, pause flags, counters).
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// The guest's COM1, for feeding it input.
    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    fn kick_all(&self) {
        use std::os::unix::thread::JoinHandleExt;
        for t in &self.threads {
            // SAFETY: the thread is alive until joined (we hold its handle).
            unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
        }
    }

    /// Parks every vCPU; returns once all are out of the guest.
    pub fn pause(&self) -> Result<()> {
        self.control.request_pause();
        for _ in 0..100 {
            self.kick_all();
            if self.control.wait_parked(self.threads.len(), Duration::from_millis(50)) {
                return Ok(());
            }
        }
        Err(Error::Device("vCPUs did not stop within 5 seconds".into()))
    }

    /// Each vCPU's state report ([`vcpu::describe_vcpu`]), taken by pausing
    /// the vCPUs for a moment (a VM paused already stays paused).
    pub fn vcpu_reports(&self) -> Result<Vec<String>> {
        let was_paused = self.control.is_paused();
        let paused = self.pause();
        let reports = self.control.parked_reports();
        if !was_paused {
            self.resume();
        }
        paused.map(|()| reports)
    }

    /// Saves what KVM holds of the VM: each vCPU's state and the clock,
    /// interrupt controllers and PIT. The VM is paused for it and stays
    /// paused; the caller resumes it.
    pub fn save_machine(&self) -> Result<MachineState> {
        if self.threads.is_empty() {
            return Err(Error::Device("the VM has not started: nothing to save".into()));
        }
        self.pause()?;
        let generation = self.control.request_save();
        let saved = self
            .control
            .wait_saved(self.threads.len(), generation, Duration::from_secs(10))
            .ok_or_else(|| Error::Device("the vCPUs did not save their state within 10 seconds".into()))?;
        let vcpus = saved.into_iter().collect::<std::result::Result<Vec<_>, String>>().map_err(Error::Device)?;
        Ok(MachineState { vm: crate::vcpu_state::save_vm(&self.vm_fd)?, vcpus })
    }

    /// Puts saved state into a VM built from the same configuration, before
    /// [`Vm::start`]. Refused, saying what differs, when the vCPU count or
    /// a vCPU's CPUID (this host's features) is not the saved one.
    pub fn restore_machine(&mut self, state: &MachineState) -> Result<()> {
        if !self.threads.is_empty() {
            return Err(Error::Device("state can only be restored before the VM starts".into()));
        }
        if state.vcpus.len() != self.vcpus.len() {
            return Err(Error::Config(format!("the saved VM has {} vCPUs, this one {}", state.vcpus.len(), self.vcpus.len())));
        }
        self.check_cpuids(&state.vcpus.iter().map(|s| s.cpuid.clone()).collect::<Vec<_>>())?;
        crate::vcpu_state::restore_vm(&self.vm_fd, &state.vm)?;
        for (vcpu, s) in self.vcpus.iter().zip(&state.vcpus) {
            crate::vcpu_state::restore_vcpu(vcpu, s)?;
        }
        Ok(())
    }

    /// Refused, naming the first difference, when a vCPU's saved CPUID is
    /// not what this host gives the same vCPU.
    pub fn check_cpuids(&self, saved: &[Vec<kvm_bindings::kvm_cpuid_entry2>]) -> Result<()> {
        if saved.len() != self.cpuids.len() {
            return Err(Error::Config(format!("the saved VM has {} vCPUs, this one {}", saved.len(), self.cpuids.len())));
        }
        for (i, (s, ours)) in saved.iter().zip(&self.cpuids).enumerate() {
            if let Some(leaf) = crate::vcpu_state::cpuid_difference(s, ours) {
                return Err(Error::Config(format!("vCPU {i}: this host's CPU features differ from the saved ones ({leaf})")));
            }
        }
        Ok(())
    }

    /// Writes a snapshot of the running VM (see [`snapshot`]) into the
    /// directory or file `to`; the VM is paused for it and stays paused
    /// unless `resume` (a VM paused before stays paused either way). With
    /// `disk_snapshot`, every writable disk takes an internal snapshot of
    /// that name in the same pause (all or none: one that fails undoes the
    /// others and the memory is not written).
    pub fn snapshot(&self, to: SnapshotTo<'_>, resume: bool, disk_snapshot: Option<&str>) -> Result<snapshot::Written> {
        if let (SnapshotTo::Dir(_), true) = (&to, rvirt_sandbox::jail::jailed()) {
            return Err(Error::Config("a jailed VMM can open no path, so it cannot write a snapshot directory; send a descriptor (\"fd\":true)".into()));
        }
        if let Some(name) = disk_snapshot {
            // Refused before the pause: a disk of a format without internal snapshots.
            if let Some(d) = self.handovers.iter().find(|d| d.config().format != Some(crate::config::ImageFormat::Qcow2)) {
                return Err(Error::Config(format!(
                    "cannot take internal snapshot '{name}': disk {} is not qcow2 (raw images have no internal snapshots)",
                    d.config().path.display()
                )));
            }
        }
        let was_paused = self.control.is_paused();
        let result = self.capture().and_then(|snap| {
            let mut taken: Vec<&Arc<crate::handover::HandoverDisk>> = Vec::new();
            if let Some(name) = disk_snapshot {
                use rvirt_block::BlockBackend;
                for d in &self.handovers {
                    if let Err(e) = d.flush().and_then(|()| d.create_snapshot(name)) {
                        for t in &taken {
                            let _ = t.delete_snapshot(name);
                        }
                        return Err(Error::Device(format!("internal snapshot of {}: {e}", d.config().path.display())));
                    }
                    taken.push(d);
                }
            }
            let written = match &to {
                SnapshotTo::Dir(dir) => snapshot::write(dir, &snap, &self.memory),
                SnapshotTo::File { file, note } => snapshot::write_file(file, &snap, &self.memory, note),
            };
            if written.is_err() {
                for t in &taken {
                    let _ = rvirt_block::BlockBackend::delete_snapshot(&***t, disk_snapshot.unwrap_or_default());
                }
            }
            written
        });
        // A VM that stays paused restarts its devices when it is resumed.
        if !was_paused && (resume || result.is_err()) {
            self.resume();
        }
        result
    }

    /// Continues disk `device` (`diskN`) in the overlay `file` named
    /// `name` (see [`crate::handover::HandoverDisk::continue_in_overlay`]),
    /// with the VM paused and its devices stopped meanwhile.
    pub fn disk_overlay(&self, device: &str, name: &std::path::Path, file: std::fs::File) -> Result<()> {
        let index = device.strip_prefix("disk").and_then(|n| n.parse::<usize>().ok()).ok_or_else(|| Error::Config(format!("'{device}' is not a disk (disks are named diskN)")))?;
        let now = self.config_now().disks.get(index).cloned().ok_or_else(|| Error::Config(format!("no disk named '{device}'")))?;
        let disk = self
            .handovers
            .iter()
            .find(|h| h.config().path == now.path)
            .ok_or_else(|| Error::Config(format!("{device} is not a writable disk: it has no overlay to continue in")))?;
        let was_paused = self.control.is_paused();
        self.pause()?;
        self.devices.quiesce();
        let result = disk.continue_in_overlay(file, name);
        if result.is_ok() {
            lock(&self.overlaid).insert(index, disk.config());
        }
        if !was_paused {
            self.resume();
        }
        result
    }

    /// Pauses the VM, stops its devices (nothing writes guest memory from
    /// here) and takes everything but its memory. The caller resumes it.
    fn capture(&self) -> Result<snapshot::VmSnapshot> {
        let machine = self.save_machine()?;
        self.devices.quiesce();
        Ok(snapshot::VmSnapshot {
            config: self.config_now(),
            machine,
            devices: self.devices.save()?,
            firmware_rom: self._firmware.as_ref().map(FirmwareRom::bytes),
        })
    }

    /// Starts migrating the VM (see [`crate::migration`]). Refused, saying
    /// why, for a jailed VMM (it cannot reach the destination). Network
    /// cards go to the taps the destination is given; writable disks change
    /// hands at the switch-over ([`crate::handover`]), on storage both see.
    pub fn start_migration(&self, params: crate::migration::Params) -> Result<()> {
        use rvirt_api::MigrationState::{Active, Setup, SwitchOver};
        let mut out = lock(&self.outgoing);
        if out.as_ref().is_some_and(|o| matches!(lock(&o.status).state, Setup | Active | SwitchOver)) {
            return Err(Error::Config("a migration is under way".into()));
        }
        if rvirt_sandbox::jail::jailed() {
            return Err(Error::Config("this VM cannot migrate yet: a jailed VMM cannot reach the destination".into()));
        }
        let hello = crate::migration::Hello {
            config: self.config_now(),
            cpuids: self.cpuids.clone(),
            firmware_rom: self._firmware.as_ref().map(FirmwareRom::bytes),
            disk_sizes: self.disk_sizes.clone(),
        };
        let vm = crate::migration::SourceVm {
            vm_fd: self.vm_fd.clone(),
            mem: self.memory.clone(),
            rings: self.dirty_rings.clone(),
            hello,
            wake: self.migration_wake.clone(),
        };
        *out = Some(crate::migration::Outgoing::start(vm, params)?);
        Ok(())
    }

    /// The eventfd the main loop polls for the migration thread's word.
    pub fn migration_eventfd(&self) -> &EventFd {
        &self.migration_wake
    }

    /// Serves the migration thread: pauses the guest and hands over its
    /// state at the switch-over, resumes it when the migration failed;
    /// `Some(Migrated)` once the destination holds the guest.
    pub fn on_migration_event(&self) -> Option<crate::vcpu::VmExit> {
        use crate::migration::ToMain;
        let mut guard = lock(&self.outgoing);
        let Some(out) = guard.as_mut() else {
            let _ = self.migration_wake.read();
            return None;
        };
        while let Some(message) = out.next_message() {
            match message {
                ToMain::SwitchOver => {
                    let paused_at = Instant::now();
                    let state = self
                        .capture()
                        .and_then(|snap| crate::state_file::encode(&snap).map_err(|e| Error::Device(e.to_string())))
                        .and_then(|bytes| self.handovers.iter().try_for_each(|d| d.release()).map(|()| bytes));
                    out.paused = true;
                    out.send_state(state.map(|bytes| (bytes, paused_at)).map_err(|e| e.to_string()));
                }
                ToMain::Throttle(pct) => self.set_throttle(pct),
                ToMain::Finished(Ok(())) => {
                    self.set_throttle(0);
                    let st = lock(&out.status).clone();
                    let how = format!(
                        "guest paused {:.1} ms ({:.1} ms until its last byte left), {} passes, {} KiB sent in {:.0} ms",
                        st.downtime_ms.unwrap_or_default(),
                        st.downtime_sent_ms.unwrap_or_default(),
                        st.iteration,
                        st.bytes_sent >> 10,
                        st.total_ms
                    );
                    return Some(crate::vcpu::VmExit::Migrated(how));
                }
                ToMain::Finished(Err(_)) => {
                    self.set_throttle(0);
                    if std::mem::take(&mut out.paused) {
                        // The disks come back first; a guest without them stays paused.
                        match self.handovers.iter().try_for_each(|d| d.take()) {
                            Ok(()) => self.resume(),
                            Err(e) => {
                                tracing::error!("the migration failed and a disk could not be taken back: {e}; the guest stays paused");
                                let mut st = lock(&out.status);
                                let before = st.error.take().unwrap_or_else(|| "the migration failed".into());
                                st.error = Some(format!("{before}; then a disk could not be taken back ({e}): the guest stays paused"));
                            }
                        }
                    }
                }
            }
        }
        None
    }

    /// Holds the vCPUs off `pct` percent of the time (0 stops it).
    fn set_throttle(&self, pct: u8) {
        let mut t = lock(&self.throttle);
        match (t.as_ref(), pct) {
            (Some(th), p) if p > 0 => th.percent.store(p, std::sync::atomic::Ordering::SeqCst),
            (None, 0) => {}
            (Some(_), _) => *t = None,
            (None, p) => {
                use std::os::unix::thread::JoinHandleExt;
                let threads = self.threads.iter().map(|h| h.as_pthread_t()).collect();
                match Throttle::start(self.control.clone(), threads, p) {
                    Ok(th) => *t = Some(th),
                    Err(e) => tracing::warn!("auto-converge: {e}"),
                }
            }
        }
    }

    /// The configuration with the discs in the CD-ROM drives now.
    fn config_now(&self) -> VmConfig {
        let mut c = self.config.clone();
        for (i, d) in lock(&self.overlaid).iter() {
            if let Some(slot) = c.disks.get_mut(*i) {
                *slot = d.clone();
            }
        }
        for (device, path) in lock(&self.media).iter() {
            if let Some(d) = device.strip_prefix("disk").and_then(|n| n.parse::<usize>().ok()).and_then(|i| c.disks.get_mut(i)) {
                d.path = path.clone();
                d.format = (!path.as_os_str().is_empty()).then_some(crate::config::ImageFormat::Raw);
            }
        }
        c
    }

    /// Puts a snapshot's vCPU, KVM and device state into this VM, built by
    /// [`Vm::create_restored`] on its memory, before [`Vm::start`].
    pub fn restore_snapshot(&mut self, snap: snapshot::VmSnapshot) -> Result<()> {
        self.restore_machine(&snap.machine)?;
        self.devices.restore(&snap.devices)?;
        // BARs are where the guest had them: accesses and notifications follow.
        self.pci.bus.refresh_all();
        // A card's link as the guest last saw it survives the guest's reboots too.
        for (_, handle, link) in &self.pci.nets {
            link.store(handle.link_up(), std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    /// Lets parked vCPUs run again, after restarting devices a snapshot stopped.
    pub fn resume(&self) {
        if let Err(e) = self.devices.resume() {
            tracing::error!("resuming after a snapshot: {e}");
        }
        self.control.resume();
    }

    /// Presses the ACPI power button.
    pub fn press_power_button(&self) -> Result<()> {
        lock(&self.ged).notify(GedEvent::PowerButton).map_err(|e| Error::Device(format!("power button: {e}")))
    }

    /// Ejects the disc of CD-ROM drive `device` (`diskN`), or inserts the
    /// image at `path` (opened read-only, raw, locked as QEMU locks it).
    pub fn change_media(&self, device: &str, path: Option<&std::path::Path>, force: bool) -> Result<()> {
        let unit = self.cdrom_unit(device)?;
        if path.is_some() && rvirt_sandbox::jail::jailed() {
            return Err(Error::Config(
                "a jailed VMM can open no path: send the disc's descriptor with the request (\"fd\":true, SCM_RIGHTS), as rvirtd does".into(),
            ));
        }
        let image = match path {
            Some(p) => Some(crate::virtio::open_disk(&crate::config::DiskConfig::cdrom(p.to_path_buf()))?),
            None => None,
        };
        put_media(&unit, device, image, force)?;
        lock(&self.media).insert(device.to_string(), path.map(std::path::Path::to_path_buf).unwrap_or_default());
        Ok(())
    }

    /// Inserts the disc open as `fd` (sent by rvirtd, which checked its
    /// path) into CD-ROM drive `device`; `name` names it in messages.
    pub fn insert_media_fd(&self, device: &str, name: Option<&std::path::Path>, fd: std::os::fd::OwnedFd) -> Result<()> {
        let unit = self.cdrom_unit(device)?;
        let name = name.unwrap_or(std::path::Path::new("(descriptor)"));
        let opts = rvirt_block::ImageOptions { read_only: true, ..Default::default() };
        let image = rvirt_block::RawImage::from_file(std::fs::File::from(fd), name, &opts).map_err(|e| Error::Device(format!("--disk: {e}")))?;
        put_media(&unit, device, Some(Arc::new(image)), false)?;
        lock(&self.media).insert(device.to_string(), name.to_path_buf());
        Ok(())
    }

    fn cdrom_unit(&self, device: &str) -> Result<Arc<Mutex<rvirt_scsi::Lun>>> {
        let target = self.pci.scsi_units.iter().find(|(n, _)| n == device).map(|(_, t)| *t);
        let unit = target.and_then(|t| self.pci.scsi.as_ref()?.get(t).cloned());
        unit.ok_or_else(|| Error::Config(format!("no CD-ROM drive named '{device}' (drives are named diskN by their --disk position)")))
    }

    /// The disc in each CD-ROM drive now, by `--disk` position: a guest
    /// reset keeps it, as a real drive does (the next devices are built
    /// with these instead of the start-time images).
    pub fn current_media(&self) -> Vec<(usize, Option<Arc<dyn rvirt_block::BlockBackend>>)> {
        let Some(targets) = &self.pci.scsi else { return Vec::new() };
        self.pci
            .scsi_units
            .iter()
            .filter_map(|(name, t)| {
                let index: usize = name.strip_prefix("disk")?.parse().ok()?;
                let lun = targets.get(*t)?.lock().ok()?;
                (lun.kind() == rvirt_scsi::Kind::Cdrom).then(|| (index, lun.medium().cloned()))
            })
            .collect()
    }

    /// Current status for the API.
    pub fn status(&self) -> VmStatus {
        VmStatus {
            state: if self.control.is_paused() { RunState::Paused } else { RunState::Running },
            vcpus: self.config.vcpus,
            memory_bytes: self.config.memory_bytes,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            pid: std::process::id(),
            balloon: self
                .pci
                .balloon
                .as_ref()
                .map(|b| BalloonStatus { target_bytes: b.target_bytes(), actual_bytes: b.actual_bytes() }),
            serial_pty: self.serial_pty.clone(),
        }
    }

    /// Carries out one API request. `Stop` only records the exit; the caller ends the loop.
    pub fn handle(&self, req: &Request) -> Response {
        self.handle_with(req, None)
    }

    /// [`Vm::handle`] for a request that came with a descriptor.
    pub fn handle_with(&self, req: &Request, fd: Option<std::os::fd::OwnedFd>) -> Response {
        let result = match req {
            Request::Status => return Response { status: Some(self.status()), ..Response::ok() },
            Request::Stats => {
                let devices = self
                    .pci
                    .counters()
                    .into_iter()
                    .map(|(name, c)| {
                        let s = DeviceStats {
                            requests: c.requests,
                            bytes_to_guest: c.bytes_to_guest,
                            bytes_from_guest: c.bytes_from_guest,
                            errors: c.errors,
                            reads: c.reads,
                            writes: c.writes,
                        };
                        (name, s)
                    })
                    .collect();
                let stats = VmStats { exits: self.control.counters.snapshot(), devices };
                return Response { stats: Some(stats), ..Response::ok() };
            }
            Request::Balloon { target_bytes } => match &self.pci.balloon {
                Some(b) if *target_bytes <= self.config.memory_bytes => {
                    b.set_target(*target_bytes);
                    Ok(())
                }
                Some(_) => Err(Error::Config(format!(
                    "balloon target {target_bytes} is larger than the guest's {} bytes",
                    self.config.memory_bytes
                ))),
                None => Err(Error::Config("this VM has no balloon (start it with --balloon)".into())),
            },
            Request::BalloonStats => {
                return match &self.pci.balloon {
                    Some(b) => {
                        let g = b.stats();
                        let stats = rvirt_api::BalloonStats { values: g.values, generation: g.generation, updated_unix: g.updated_unix, actual_bytes: b.actual_bytes() };
                        Response { balloon_stats: Some(stats), ..Response::ok() }
                    }
                    None => Response::error("this VM has no balloon (start it with --balloon)"),
                }
            }
            Request::SetLink { device, up } => match self.pci.nets.iter().find(|(n, _, _)| n == device) {
                Some((_, h, kept)) => {
                    h.set_link(*up);
                    kept.store(*up, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                }
                None => Err(Error::Config(format!("no network device named '{device}'"))),
            },
            Request::ChangeMedia { device, path, force, fd: false } => self.change_media(device, path.as_deref(), *force),
            Request::ChangeMedia { device, path, force: _, fd: true } => match fd {
                Some(fd) => self.insert_media_fd(device, path.as_deref(), fd),
                None => Err(Error::Config("change-media with fd: no descriptor came with the request".into())),
            },
            Request::VcpuState => {
                return match self.vcpu_reports() {
                    Ok(r) => Response { vcpus: Some(r), ..Response::ok() },
                    Err(e) => Response::error(e.to_string()),
                }
            }
            Request::Snapshot { path, resume, fd: sent, note, disk_snapshot } => {
                let started = Instant::now();
                let file = match (sent, fd) {
                    (false, _) => None,
                    (true, Some(fd)) => Some(std::fs::File::from(fd)),
                    (true, None) => return Response::error("snapshot with fd: no descriptor came with the request"),
                };
                let to = match &file {
                    Some(file) => SnapshotTo::File { file, note: note.as_deref().unwrap_or_default() },
                    None => SnapshotTo::Dir(path),
                };
                return match self.snapshot(to, *resume, disk_snapshot.as_deref()) {
                    Ok(w) => {
                        let info = rvirt_api::SnapshotInfo { state_bytes: w.state_bytes, memory_bytes: w.memory_bytes, millis: started.elapsed().as_secs_f64() * 1000.0 };
                        Response { snapshot: Some(info), ..Response::ok() }
                    }
                    Err(e) => Response::error(e.to_string()),
                };
            }
            Request::DiskOverlay { device, path } => match fd {
                Some(fd) => self.disk_overlay(device, path, std::fs::File::from(fd)),
                None => Err(Error::Config("disk-overlay: no descriptor came with the request".into())),
            },
            Request::DeleteDiskSnapshot { name } => {
                use rvirt_block::BlockBackend;
                self.handovers
                    .iter()
                    .filter(|d| d.has_snapshot(name))
                    .try_for_each(|d| d.delete_snapshot(name).map_err(|e| Error::Device(format!("{}: {e}", d.config().path.display()))))
            }
            Request::Migrate { uri, max_downtime_ms, bandwidth_mib_s, compress, auto_converge } => self.start_migration(crate::migration::Params {
                uri: uri.clone(),
                max_downtime: Duration::from_millis(*max_downtime_ms),
                bandwidth: bandwidth_mib_s.saturating_mul(1 << 20),
                encoding: crate::migration::Encoding { compress: *compress },
                auto_converge: *auto_converge,
            }),
            Request::MigrateStatus => {
                let status = lock(&self.outgoing).as_ref().map(|o| lock(&o.status).clone()).unwrap_or_default();
                return Response { migration: Some(status), ..Response::ok() };
            }
            Request::MigrateCancel => match lock(&self.outgoing).as_ref() {
                Some(o) => {
                    o.cancel();
                    Ok(())
                }
                None => Err(Error::Config("no migration is under way".into())),
            },
            Request::Pause => self.pause(),
            Request::Resume => {
                self.resume();
                Ok(())
            }
            Request::Shutdown => self.press_power_button(),
            Request::Stop => {
                self.control.exit(vcpu::VmExit::Stopped);
                Ok(())
            }
            Request::Reset => {
                self.control.exit(vcpu::VmExit::Reset);
                Ok(())
            }
        };
        match result {
            Ok(()) => Response::ok(),
            Err(e) => Response::error(e.to_string()),
        }
    }

    /// Stops every vCPU thread and waits for them.
    pub fn stop(&mut self) {
        // The throttle kicks vCPU threads: it goes before they do.
        *lock(&self.throttle) = None;
        self.control.request_stop();
        self.kick_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.pci.shutdown();
    }
}

/// Auto-converge: holds the vCPUs off a share of every 20 ms (kicking them
/// out of the guest, parked on the control's throttle flag), so a guest
/// that dirties memory faster than the link carries it slows down.
struct Throttle {
    percent: Arc<std::sync::atomic::AtomicU8>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Throttle {
    fn start(control: Arc<VmControl>, threads: Vec<libc::pthread_t>, pct: u8) -> std::io::Result<Self> {
        use std::sync::atomic::Ordering::SeqCst;
        let percent = Arc::new(std::sync::atomic::AtomicU8::new(pct));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (percent.clone(), stop.clone());
        let handle = std::thread::Builder::new().name("throttle".into()).spawn(move || {
            const SLICE_US: u64 = 20_000;
            while !s.load(SeqCst) {
                let held = SLICE_US * u64::from(p.load(SeqCst).min(99)) / 100;
                control.set_throttled(true);
                for t in &threads {
                    // SAFETY: the vCPU threads outlive the throttle (Vm::stop ends it first).
                    unsafe { libc::pthread_kill(*t, vcpu::kick_signal()) };
                }
                std::thread::sleep(Duration::from_micros(held));
                control.set_throttled(false);
                std::thread::sleep(Duration::from_micros(SLICE_US - held));
            }
            control.set_throttled(false);
        })?;
        Ok(Self { percent, stop, handle: Some(handle) })
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Puts `image` in CD-ROM drive `unit` (named `device`), or with none ejects its disc.
fn put_media(unit: &Mutex<rvirt_scsi::Lun>, device: &str, image: Option<Arc<dyn rvirt_block::BlockBackend>>, force: bool) -> Result<()> {
    let mut lun = unit.lock().map_err(|_| Error::Device(format!("{device}: the unit's lock is poisoned")))?;
    let done = match image {
        Some(i) => lun.insert(i),
        None => lun.eject(force),
    };
    done.map_err(|e| Error::Config(format!("{device}: {e}")))
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
