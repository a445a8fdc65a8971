//! KVM glue for PCI devices: GSI routes for MSI-X vectors and ioeventfds
//! for virtio notifications.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use rvirt_devices::bus::lock;
use rvirt_pci::{MsiMessage, MsiRouter, MsiVector};
use rvirt_virtio_devices::IoEventRegistrar;
use vmm_sys_util::eventfd::EventFd;

/// IOAPIC inputs; GSIs from here up are free for MSI routes.
const IOAPIC_PINS: u32 = 24;

/// Owns the VM's GSI routing table: KVM's default legacy routes (PIC and
/// IOAPIC) plus one MSI route per MSI-X vector. KVM replaces the whole table
/// on every update, so every update sends all of it.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
    next: AtomicU32,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl GsiRouter {
    /// A router for `vm` (whose in-kernel irqchip exists already).
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm, msi: Mutex::new(BTreeMap::new()), next: AtomicU32::new(IOAPIC_PINS) }
    }

    /// A fresh GSI with an irqfd registered on it, for one MSI-X vector.
    pub fn new_vector(&self) -> std::io::Result<MsiVector> {
        let gsi = self.next.fetch_add(1, Ordering::SeqCst);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
        self.vm.register_irqfd(&irqfd, gsi).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(MsiVector { gsi, irqfd })
    }

    fn commit(&self, msi: &BTreeMap<u32, MsiMessage>) -> std::io::Result<()> {
        let mut entries = Vec::with_capacity(40 + msi.len());
        for gsi in 0..IOAPIC_PINS {
            if gsi < 16 {
                let (chip, pin) = if gsi < 8 { (KVM_IRQCHIP_PIC_MASTER, gsi) } else { (KVM_IRQCHIP_PIC_SLAVE, gsi - 8) };
                entries.push(irqchip(gsi, chip, pin));
            }
            entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (gsi, m) in msi {
            let mut e = kvm_irq_routing_entry { gsi: *gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
            e.u.msi.address_lo = m.address as u32;
            e.u.msi.address_hi = (m.address >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl MsiRouter for GsiRouter {
    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
        let mut msi = lock(&self.msi);
        if msi.get(&gsi) == Some(&msg) {
            return Ok(());
        }
        msi.insert(gsi, msg);
        self.commit(&msi)
    }
}

/// Registers virtio notification addresses as KVM ioeventfds.
pub struct KvmIoEvents(pub Arc<VmFd>);

impl IoEventRegistrar for KvmIoEvents {
    fn register(&self, evt: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0.register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
    fn unregister(&self, evt: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0.unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}
