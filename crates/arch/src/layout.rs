//! Guest-physical memory layout of an rvirt x86_64 machine.
//!
//! ```text
//! 0x0000_0000 .. 0x0009_fc00  low RAM: boot GDT, zero page, page tables, command line
//! 0x0009_fc00 .. 0x0010_0000  reserved: EBDA, ACPI tables at 0xe0000, BIOS area
//! 0x0010_0000 .. 3 GiB        RAM (kernel, initramfs)
//! 3 GiB       .. 3.5 GiB      PCI BARs
//! 3.5 GiB     .. +1 MiB       PCI ECAM (bus 0), reserved in the e820 map
//! ..          .. 0xfec0_0000  PCI BARs as firmware places them (top down)
//! 0xfec0_0000 .. 4 GiB        IOAPIC, LAPIC, platform MMIO (GED), KVM's
//!                             TSS pages, the firmware image at 4 GiB - size
//! 4 GiB       .. 4 GiB + rest RAM that did not fit below the hole
//! ```
//!
//! With firmware, 0xc0000..0x100000 holds a writable copy of the image's
//! last 256 KiB (SeaBIOS runs its 32-bit code from there, as if a chipset
//! had shadowed it) instead of ACPI tables, which the firmware places
//! itself, from fw_cfg.

/// Where the GDT used for the first guest instruction lives.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) boot IDT lives.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map table.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table (PML4) of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of the page directories of the boot identity map (one per GiB mapped).
pub const PDE_START: u64 = 0xb000;
/// Number of GiB identity-mapped with 2 MiB pages before the kernel runs.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted, including the NUL terminator.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area; RAM below it is usable by the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables, starting with the RSDP (the kernel also scans 0xe0000..0x100000 for it).
pub const ACPI_START: u64 = 0xe0000;
/// End of the legacy BIOS area reserved for ACPI tables.
pub const ACPI_END: u64 = 0x10_0000;
/// Where 64-bit kernels are loaded (1 MiB).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole below 4 GiB.
pub const PCI_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const PCI_HOLE_END: u64 = 0x1_0000_0000;
/// Start of the window PCI BARs are placed in.
pub const PCI_MMIO_START: u64 = PCI_HOLE_START;
/// End of the PCI BAR window (where ECAM begins).
pub const PCI_MMIO_END: u64 = 0xe000_0000;
/// PCI Express enhanced configuration access (ECAM), bus 0 only.
pub const ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM window: one bus.
pub const ECAM_SIZE: u64 = 1 << 20;
/// MMIO window handed to platform devices (ACPI GED and friends): above
/// the IOAPIC, outside the range firmware assigns PCI BARs in.
pub const PLATFORM_MMIO_START: u64 = 0xfef0_0000;
/// SeaBIOS assigns 32-bit BARs top-down below this address (the IOAPIC).
pub const FIRMWARE_PCI_MMIO_END: u64 = 0xfec0_0000;
/// Lowest address the firmware image's tail is copied to: the image's
/// last [`BIOS_LOW_SIZE`] bytes end at 1 MiB, mirroring its place below 4 GiB.
pub const BIOS_LOW_START: u64 = 0xc0000;
/// Most bytes of the image copied below 1 MiB (SeaBIOS's 256 KiB build).
pub const BIOS_LOW_SIZE: u64 = 0x40000;
/// Smallest firmware image accepted.
pub const MIN_FIRMWARE_SIZE: u64 = 64 << 10;
/// Largest firmware image accepted (it is mapped just below 4 GiB).
pub const MAX_FIRMWARE_SIZE: u64 = 16 << 20;
/// The IOAPIC's MMIO base, as the in-kernel irqchip expects.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// TSS address given to KVM (three pages above the identity-map page).
pub const KVM_TSS_ADDRESS: u64 = 0xfeff_d000;
/// Identity-map page given to KVM: below any firmware image, as QEMU puts it.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfeff_c000;
/// Bytes KVM's identity-map page and TSS take (reserved in firmware's map).
pub const KVM_PRIVATE_SIZE: u64 = 0x4000;
/// Smallest guest RAM rvirt will build a machine with.
pub const MIN_MEMORY: u64 = 16 << 20;

/// The kinds of e820 entries rvirt emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: the OS must not use it.
    Reserved = 2,
}

/// One range of the guest's e820 memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

/// Where the guest's RAM sits around the PCI hole, and the e820 map that follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Total guest RAM in bytes.
    pub ram_bytes: u64,
}

impl MemoryLayout {
    /// Describes a machine with `ram_bytes` of RAM, checking that it is neither
    /// too small to boot nor too large to address.
    pub fn new(ram_bytes: u64) -> crate::Result<Self> {
        if ram_bytes < MIN_MEMORY {
            return Err(crate::Error::Layout(format!(
                "guest memory must be at least {} MiB",
                MIN_MEMORY >> 20
            )));
        }
        if ram_bytes % 4096 != 0 {
            return Err(crate::Error::Layout("guest memory must be a multiple of 4 KiB".into()));
        }
        // 46-bit guest physical addresses are safe on every host KVM supports.
        if ram_bytes > (1u64 << 46) - PCI_HOLE_END {
            return Err(crate::Error::Layout("guest memory is larger than x86_64 guests can address".into()));
        }
        Ok(Self { ram_bytes })
    }

    /// RAM ranges as (guest address, length) pairs, split around the PCI hole.
    pub fn ram_ranges(&self) -> Vec<(u64, u64)> {
        if self.ram_bytes <= PCI_HOLE_START {
            vec![(0, self.ram_bytes)]
        } else {
            vec![(0, PCI_HOLE_START), (PCI_HOLE_END, self.ram_bytes - PCI_HOLE_START)]
        }
    }

    /// End of the RAM below the PCI hole.
    pub fn low_ram_end(&self) -> u64 {
        self.ram_bytes.min(PCI_HOLE_START)
    }

    /// The e820 map the guest sees: low RAM, the reserved BIOS/ACPI area, RAM
    /// up to the hole, the ECAM window (reserved: Linux only trusts MCFG
    /// ranges firmware reserved) and RAM above 4 GiB. The rest of the hole is
    /// left out, which is how firmware marks MMIO.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![
            E820Entry { addr: 0, size: EBDA_START, kind: E820Kind::Ram },
            E820Entry { addr: EBDA_START, size: HIGH_MEMORY_START - EBDA_START, kind: E820Kind::Reserved },
            E820Entry {
                addr: HIGH_MEMORY_START,
                size: self.low_ram_end() - HIGH_MEMORY_START,
                kind: E820Kind::Ram,
            },
        ];
        map.push(E820Entry { addr: ECAM_START, size: ECAM_SIZE, kind: E820Kind::Reserved });
        if self.ram_bytes > PCI_HOLE_START {
            map.push(E820Entry { addr: PCI_HOLE_END, size: self.ram_bytes - PCI_HOLE_START, kind: E820Kind::Ram });
        }
        map
    }

    /// The map firmware gets through fw_cfg (`etc/e820`): RAM from 0 (the
    /// firmware carves its own low areas), ECAM and KVM's private pages
    /// reserved, RAM above 4 GiB.
    pub fn firmware_e820(&self) -> Vec<E820Entry> {
        let mut map = vec![
            E820Entry {
                addr: 0,
                size: self.low_ram_end(),
                kind: E820Kind::Ram,
            },
            E820Entry {
                addr: ECAM_START,
                size: ECAM_SIZE,
                kind: E820Kind::Reserved,
            },
            E820Entry {
                addr: KVM_IDENTITY_MAP_ADDRESS,
                size: KVM_PRIVATE_SIZE,
                kind: E820Kind::Reserved,
            },
        ];
        if self.ram_bytes > PCI_HOLE_START {
            map.push(E820Entry {
                addr: PCI_HOLE_END,
                size: self.ram_bytes - PCI_HOLE_START,
                kind: E820Kind::Ram,
            });
        }
        map
    }

    /// Where firmware may put 32-bit BARs, as (first, last) address pairs:
    /// from the end of low RAM up to [`FIRMWARE_PCI_MMIO_END`], around ECAM
    /// (low RAM always ends below it, at the PCI hole at the latest).
    /// SeaBIOS assigns top-down from the end, within the same bounds.
    pub fn firmware_pci_windows(&self) -> [(u64, u64); 2] {
        [(self.low_ram_end(), ECAM_START - 1), (ECAM_START + ECAM_SIZE, FIRMWARE_PCI_MMIO_END - 1)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range_below_the_hole() {
        let l = MemoryLayout::new(512 << 20).unwrap();
        assert_eq!(l.ram_ranges(), vec![(0, 512 << 20)]);
        let e = l.e820();
        assert_eq!(e.len(), 4);
        assert_eq!(e[3], E820Entry { addr: ECAM_START, size: ECAM_SIZE, kind: E820Kind::Reserved });
        assert_eq!(e[0], E820Entry { addr: 0, size: 0x9fc00, kind: E820Kind::Ram });
        assert_eq!(e[1].kind, E820Kind::Reserved);
        assert_eq!(e[1].addr + e[1].size, HIGH_MEMORY_START);
        assert_eq!(e[2].addr + e[2].size, 512 << 20);
        let ram: u64 = e.iter().filter(|x| x.kind == E820Kind::Ram).map(|x| x.size).sum();
        assert!(PCI_MMIO_START >= 512 << 20 && PCI_MMIO_END <= ECAM_START && ECAM_START + ECAM_SIZE <= PLATFORM_MMIO_START);
        assert_eq!(ram, (512 << 20) - (HIGH_MEMORY_START - EBDA_START));
    }

    #[test]
    fn large_guest_skips_the_pci_hole() {
        let l = MemoryLayout::new(4 << 30).unwrap();
        assert_eq!(l.ram_ranges(), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        let e = l.e820();
        assert_eq!(e.last().unwrap(), &E820Entry { addr: 4 << 30, size: 1 << 30, kind: E820Kind::Ram });
        for entry in e.iter().filter(|x| x.kind == E820Kind::Ram) {
            let end = entry.addr + entry.size;
            assert!(end <= PCI_HOLE_START || entry.addr >= PCI_HOLE_END, "{entry:?} overlaps the hole");
        }
    }

    #[test]
    fn exactly_at_the_hole_has_no_high_range() {
        let l = MemoryLayout::new(PCI_HOLE_START).unwrap();
        assert_eq!(l.ram_ranges().len(), 1);
        assert_eq!(l.e820().len(), 4);
    }

    #[test]
    fn firmware_map_and_bar_windows_leave_ecam_and_platform_mmio_alone() {
        let l = MemoryLayout::new(512 << 20).unwrap();
        assert_eq!(
            l.firmware_pci_windows(),
            [
                (512 << 20, ECAM_START - 1),
                (ECAM_START + ECAM_SIZE, 0xfebf_ffff)
            ]
        );
        let big = MemoryLayout::new(6 << 30).unwrap();
        assert_eq!(big.firmware_pci_windows()[0].0, PCI_HOLE_START);
        assert_eq!(
            big.firmware_e820().last().unwrap(),
            &E820Entry {
                addr: 4 << 30,
                size: 3 << 30,
                kind: E820Kind::Ram
            }
        );
        for w in big
            .firmware_pci_windows()
            .iter()
            .chain(&l.firmware_pci_windows())
        {
            assert!(
                w.1 < PLATFORM_MMIO_START && w.1 < IOAPIC_START && w.1 < KVM_IDENTITY_MAP_ADDRESS
            );
        }
        assert!(
            PLATFORM_MMIO_START > IOAPIC_START
                && PLATFORM_MMIO_START < (1 << 32) - MAX_FIRMWARE_SIZE
        );
        assert!(KVM_IDENTITY_MAP_ADDRESS + KVM_PRIVATE_SIZE <= (1 << 32) - MAX_FIRMWARE_SIZE);
        assert!(KVM_TSS_ADDRESS == KVM_IDENTITY_MAP_ADDRESS + 0x1000);
    }

    #[test]
    fn rejects_tiny_unaligned_and_absurd_sizes() {
        assert!(MemoryLayout::new(1 << 20).is_err());
        assert!(MemoryLayout::new((64 << 20) + 1).is_err());
        assert!(MemoryLayout::new(1 << 50).is_err());
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 0x8),
            (PVH_INFO_START, 0x40),
            (PVH_MODLIST_START, 0x20),
            (PVH_MEMMAP_START, 0x100),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000 * IDENTITY_MAPPED_GIB),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{:#x?} overlaps {:#x?}", w[0], w[1]);
        }
        assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
        assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
    }
}
