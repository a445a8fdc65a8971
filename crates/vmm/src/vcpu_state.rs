//! What KVM holds of a VM, saved and put back: per vCPU the registers,
//! segment and control registers, XSAVE area (x87, SSE, AVX) and XCRs,
//! debug registers, local APIC, multiprocessor state, pending events and
//! every MSR in KVM's list that the vCPU has (TSC, TSC deadline, kvmclock,
//! APIC base, SYSCALL targets, …); for the VM its clock, the PIC pair and
//! IOAPIC and the PIT. Saved in the order KVM needs (MP state first: it
//! completes pending APIC events) and restored in the order Firecracker
//! and QEMU use (MSRs after the LAPIC, events last).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::error::kvm;
use crate::{Error, Result};

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// Index (and APIC ID).
    pub id: u8,
    /// The CPUID it was given: a restore must give the same.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessor state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The XSAVE area (x87, SSE, AVX state).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The in-kernel local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// MSRs as (index, value), in KVM's index-list order.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// The guest's TSC frequency, when KVM reports one.
    pub tsc_khz: Option<u32>,
}

/// The VM-wide state KVM keeps.
#[derive(Debug, Serialize, Deserialize)]
pub struct KvmVmState {
    /// The kvmclock base.
    pub clock: kvm_clock_data,
    /// The master and slave 8259s and the IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The i8254.
    pub pit: kvm_pit_state2,
}

/// Everything KVM holds of a VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// Clock, interrupt controllers, PIT.
    pub vm: KvmVmState,
    /// Each vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
}

/// The first CPUID leaf where `saved` and `ours` differ, described; `None`
/// when they agree.
pub fn cpuid_difference(saved: &[kvm_cpuid_entry2], ours: &[kvm_cpuid_entry2]) -> Option<String> {
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index);
    for s in saved {
        match ours.iter().find(|o| key(o) == key(s)) {
            None => return Some(format!("leaf {:#x}.{} is missing here", s.function, s.index)),
            Some(o) if (o.eax, o.ebx, o.ecx, o.edx) != (s.eax, s.ebx, s.ecx, s.edx) => {
                return Some(format!(
                    "leaf {:#x}.{}: saved eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}, here eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}",
                    s.function, s.index, s.eax, s.ebx, s.ecx, s.edx, o.eax, o.ebx, o.ecx, o.edx
                ))
            }
            Some(_) => {}
        }
    }
    ours.iter().find(|o| !saved.iter().any(|s| key(s) == key(o))).map(|o| format!("leaf {:#x}.{} is new here", o.function, o.index))
}

/// The MSRs this host's KVM can save, asked of KVM once per process (the
/// list is the host's, not the guest's; a guest reboot builds a new VM).
pub fn msr_list(kvm_handle: &Kvm) -> Result<std::sync::Arc<[u32]>> {
    static LIST: std::sync::OnceLock<std::sync::Arc<[u32]>> = std::sync::OnceLock::new();
    if let Some(l) = LIST.get() {
        return Ok(l.clone());
    }
    let list: std::sync::Arc<[u32]> = kvm_handle.get_msr_index_list().map_err(kvm("GET_MSR_INDEX_LIST"))?.as_slice().into();
    Ok(LIST.get_or_init(|| list).clone())
}

/// Reads the MSRs of `indexes` that `vcpu` has. KVM stops a batch at the
/// first MSR it cannot read; that one is left out and the rest read on.
fn read_msrs(vcpu: &VcpuFd, indexes: &[u32]) -> Result<Vec<(u32, u64)>> {
    let mut out = Vec::with_capacity(indexes.len());
    let mut rest = indexes;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(256)];
        let entries: Vec<kvm_msr_entry> = batch.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::Device(format!("MSR list: {e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // The one at `n` failed (when the batch stopped short): skip it.
        rest = &rest[(n + usize::from(n < batch.len())).min(rest.len())..];
    }
    Ok(out)
}

/// Saves `vcpu`'s state. The vCPU must be out of `KVM_RUN`, and any I/O it
/// exited for completed (a `KVM_RUN` with `immediate_exit` set does that).
pub fn save_vcpu(vcpu: &VcpuFd, id: u8, cpuid: Vec<kvm_cpuid_entry2>, msr_indexes: &[u32]) -> Result<VcpuState> {
    let mp_state = vcpu.get_mp_state().map_err(kvm("GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm("GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(kvm("GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm("GET_XCRS"))?;
    let debugregs = vcpu.get_debug_regs().map_err(kvm("GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("GET_LAPIC"))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let msrs = read_msrs(vcpu, msr_indexes)?;
    let events = vcpu.get_vcpu_events().map_err(kvm("GET_VCPU_EVENTS"))?;
    Ok(VcpuState { id, cpuid, mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, msrs, events, tsc_khz })
}

/// Puts `s` into `vcpu` (made for the same vCPU index, CPUID already set).
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<()> {
    if let Some(khz) = s.tsc_khz {
        // A host that cannot scale keeps its own rate; the guest's kvmclock copes.
        if let Err(e) = vcpu.set_tsc_khz(khz) {
            tracing::warn!("vCPU {}: TSC frequency {khz} kHz not set ({e}); the guest keeps this host's", s.id);
        }
    }
    vcpu.set_mp_state(s.mp_state).map_err(kvm("SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm("SET_SREGS"))?;
    // SAFETY: a kvm_xsave of the legacy 4 KiB size, the size KVM_SET_XSAVE
    // reads (snapshots of hosts needing more are refused when saved).
    unsafe { vcpu.set_xsave(&s.xsave) }.map_err(kvm("SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs).map_err(kvm("SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic).map_err(kvm("SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = s.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    for chunk in entries.chunks(256) {
        let msrs = Msrs::from_entries(chunk).map_err(|e| Error::Device(format!("MSR list: {e:?}")))?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm("SET_MSRS"))?;
        if n != chunk.len() {
            return Err(Error::Device(format!("vCPU {}: this host refused MSR {:#x} of the saved state", s.id, chunk[n].index)));
        }
    }
    vcpu.set_vcpu_events(&s.events).map_err(kvm("SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Saves the VM-wide state (vCPUs paused).
pub fn save_vm(vm: &VmFd) -> Result<KvmVmState> {
    let mut irqchips = Vec::new();
    for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
        let mut chip = kvm_irqchip { chip_id, ..Default::default() };
        vm.get_irqchip(&mut chip).map_err(kvm("GET_IRQCHIP"))?;
        irqchips.push(chip);
    }
    let pit = vm.get_pit2().map_err(kvm("GET_PIT2"))?;
    let clock = vm.get_clock().map_err(kvm("GET_CLOCK"))?;
    Ok(KvmVmState { clock, irqchips, pit })
}

/// Puts the VM-wide state back (before any vCPU runs).
pub fn restore_vm(vm: &VmFd, s: &KvmVmState) -> Result<()> {
    for chip in &s.irqchips {
        vm.set_irqchip(chip).map_err(kvm("SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm("SET_PIT2"))?;
    // Only the clock's value: KVM refuses flags it sets itself on reads.
    let clock = kvm_clock_data { clock: s.clock.clock, ..Default::default() };
    vm.set_clock(&clock).map_err(kvm("SET_CLOCK"))?;
    Ok(())
}
