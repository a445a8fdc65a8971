//! Boot-time vCPU state: registers, segments, page tables, FPU, MSRs and LAPIC.
//!
//! Two entry protocols are supported, both straight into the kernel without
//! firmware:
//! - the Linux 64-bit boot protocol (bzImage): long mode, paging on with an
//!   identity map of the first [`IDENTITY_MAPPED_GIB`] GiB, `rsi` = zero page;
//! - the PVH protocol (ELF vmlinux with a Xen PHYS32 entry note): flat 32-bit
//!   protected mode, paging off, `rbx` = `hvm_start_info`.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::gdt::{self, kvm_segment_from_gdt};
use crate::layout::*;
use crate::{kvm_err, Error, Result};

/// How the boot vCPU enters the guest kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: jump to `entry` in long mode with `rsi` = zero page.
    Linux64 {
        /// Guest-physical address of the 64-bit entry point.
        entry: u64,
    },
    /// PVH: jump to `entry` in 32-bit protected mode with `rbx` = start info.
    Pvh {
        /// Guest-physical address of the PVH entry point.
        entry: u64,
    },
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRITEBACK: u64 = 6;

/// Page-table entry bits: present, writable, page-size (2 MiB).
const PTE_PRESENT_RW: u64 = 0x3;
const PTE_HUGE: u64 = 0x80;

/// Sets the general-purpose registers for `entry`.
pub fn setup_regs(vcpu: &VcpuFd, entry: BootEntry) -> Result<()> {
    vcpu.set_regs(&boot_regs(entry)).map_err(kvm_err("SET_REGS"))
}

/// The register file for `entry`; separate from [`setup_regs`] so it can be tested.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match entry {
        BootEntry::Linux64 { entry } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootEntry::Pvh { entry } => {
            regs.rip = entry;
            regs.rbx = PVH_INFO_START;
        }
    }
    regs
}

/// Writes the boot GDT (and for long mode, the identity page tables) into
/// guest memory and loads the matching segment and control registers.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd, entry: BootEntry) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("GET_SREGS"))?;
    let code = match entry {
        BootEntry::Linux64 { .. } => gdt::CODE64,
        BootEntry::Pvh { .. } => gdt::CODE32,
    };
    let table = [0, code, gdt::DATA, gdt::TSS];
    write_gdt(mem, &table)?;
    configure_segments(&mut sregs, &table);
    match entry {
        BootEntry::Linux64 { .. } => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("SET_SREGS"))
}

fn write_gdt(mem: &GuestMemoryMmap, table: &[u64]) -> Result<()> {
    for (i, entry) in table.iter().enumerate() {
        let addr = BOOT_GDT_START + (i as u64) * 8;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(|_| Error::GuestMemory { what: "GDT", addr })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| Error::GuestMemory { what: "IDT", addr: BOOT_IDT_START })
}

/// Loads CS/DS/ES/FS/GS/SS/TR and the GDT/IDT registers from `table`
/// (null, code, data, tss).
pub fn configure_segments(sregs: &mut kvm_sregs, table: &[u64; 4]) {
    let code = kvm_segment_from_gdt(table[1], 1);
    let data = kvm_segment_from_gdt(table[2], 2);
    let tss = kvm_segment_from_gdt(table[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(table) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

/// Identity-maps the first [`IDENTITY_MAPPED_GIB`] GiB with 2 MiB pages.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |val: u64, addr: u64, what| {
        mem.write_obj(val, GuestAddress(addr)).map_err(|_| Error::GuestMemory { what, addr })
    };
    w(PDPTE_START | PTE_PRESENT_RW, PML4_START, "PML4")?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PDE_START + gib * 0x1000;
        w(pd | PTE_PRESENT_RW, PDPTE_START + gib * 8, "PDPT")?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            w(phys | PTE_PRESENT_RW | PTE_HUGE, pd + i * 8, "PD")?;
        }
    }
    Ok(())
}

/// x87 control word and SSE control/status as a freshly reset CPU has them.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm_err("SET_FPU"))
}

/// The MSRs every vCPU starts with: syscall MSRs cleared, fast strings on and
/// MTRRs enabled with write-back as the default type (without it the guest
/// would treat all RAM as uncached).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITEBACK),
    ]
}

/// Loads [`boot_msrs`] into `vcpu`. An MSR the host refuses is logged by the caller
/// through the returned count, not treated as fatal, as long as most were accepted.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<usize> {
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|_| Error::Layout("too many boot MSRs".into()))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("SET_MSRS"))?;
    Ok(entries.len() - set)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    let b = |i: usize| regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, val: u32) {
    for (i, byte) in val.to_le_bytes().iter().enumerate() {
        regs[off + i] = *byte as std::os::raw::c_char;
    }
}

/// Wires LINT0 as ExtINT (the PIC) and LINT1 as NMI, as PC firmware does.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("GET_LAPIC"))?;
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(&mut lapic.regs, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(&mut lapic.regs, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(kvm_err("SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn linux64_regs_point_at_zero_page() {
        let r = boot_regs(BootEntry::Linux64 { entry: 0x100200 });
        assert_eq!((r.rip, r.rsi, r.rsp, r.rflags), (0x100200, ZERO_PAGE_START, BOOT_STACK_POINTER, 2));
    }

    #[test]
    fn pvh_regs_point_at_start_info() {
        let r = boot_regs(BootEntry::Pvh { entry: 0x1000000 });
        assert_eq!((r.rip, r.rbx), (0x1000000, PVH_INFO_START));
    }

    #[test]
    fn identity_map_covers_4g_with_2m_pages() {
        let m = mem();
        write_identity_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        for gib in 0..IDENTITY_MAPPED_GIB {
            let pdpte: u64 = m.read_obj(GuestAddress(PDPTE_START + gib * 8)).unwrap();
            assert_eq!(pdpte & !0xfff, PDE_START + gib * 0x1000);
            let last: u64 = m.read_obj(GuestAddress((pdpte & !0xfff) + 511 * 8)).unwrap();
            assert_eq!(last, (gib << 30) | (511 << 21) | 0x83);
        }
    }

    #[test]
    fn gdt_is_written_where_sregs_say() {
        let m = mem();
        let table = [0, gdt::CODE64, gdt::DATA, gdt::TSS];
        write_gdt(&m, &table).unwrap();
        let mut sregs = kvm_sregs::default();
        configure_segments(&mut sregs, &table);
        let code: u64 = m.read_obj(GuestAddress(sregs.gdt.base + u64::from(sregs.cs.selector))).unwrap();
        assert_eq!(code, gdt::CODE64);
        assert_eq!(sregs.gdt.limit, 31);
        assert_eq!(sregs.tr.selector, 24);
    }

    #[test]
    fn msrs_enable_writeback_mtrrs() {
        let m = boot_msrs();
        let def = m.iter().find(|e| e.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(def.data, (1 << 11) | 6);
    }

    #[test]
    fn lapic_register_helpers_round_trip() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        set_lapic_reg(&mut regs, APIC_LVT0, 0xdead_beef);
        assert_eq!(lapic_reg(&regs, APIC_LVT0), 0xdead_beef);
    }
}
