//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT and DSDT.
//!
//! They are what lets a stock kernel find every vCPU (MADT), the IOAPIC, the
//! power-off and reset registers (FADT) and the power button (DSDT), without
//! firmware. Built with the `acpi_tables` crate and written at
//! [`ACPI_START`], where both boot protocols point the kernel.

use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use rvirt_arch::layout::{
    ACPI_END, ACPI_START, APIC_START, ECAM_START, IOAPIC_START, PCI_MMIO_END, PCI_MMIO_START, PLATFORM_MMIO_START,
};
use rvirt_pci::acpi::{host_bridge_aml, HostBridgeResources};
use rvirt_devices::acpi::{self as acpi_dev, AcpiPm, Ged};
use rvirt_devices::cmos::{CMOS_BASE, CMOS_IRQ};
use rvirt_devices::fw_cfg::{TableLoader, Zone};
use rvirt_devices::serial::{COM1_BASE, COM1_IRQ};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Error, Result};

const OEM_ID: [u8; 6] = *b"RVIRT ";
/// FADT "IA-PC boot architecture" flag: no VGA.
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;

/// The assembled tables, each at the guest address it will be written to.
pub struct AcpiTables {
    /// (guest address, bytes) of every table, RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
    /// Fields holding the address of another table: (index into `blobs`,
    /// offset in that blob, field size). Firmware relocating the tables
    /// patches these (see [`table_loader`]).
    pub pointers: Vec<(usize, u32, u8)>,
}

/// Where the tables go and what the DSDT describes.
pub struct AcpiLayout {
    /// Where the RSDP is written.
    pub rsdp_at: u64,
    /// Where the other tables start (0 when firmware places them).
    pub tables_at: u64,
    /// Last address the tables may reach (exclusive).
    pub tables_end: u64,
    /// The PCI host bridge's 32-bit MMIO windows (first, last address).
    pub pci_windows: Vec<(u32, u32)>,
}

impl AcpiLayout {
    /// Direct kernel boot: everything in the BIOS area at [`ACPI_START`],
    /// BARs in the VMM's own window.
    pub fn direct() -> Self {
        Self {
            rsdp_at: ACPI_START,
            tables_at: ACPI_START + 48,
            tables_end: ACPI_END,
            pci_windows: vec![(PCI_MMIO_START as u32, (PCI_MMIO_END - 1) as u32)],
        }
    }
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_gas(port: u16) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(port))
}

/// The DSDT's AML body: power states, COM1, the GED, the power button and
/// the PCI host bridge (decoding `pci_windows`) with a child for each
/// populated slot in `pci_slots`.
pub fn dsdt_body(pci_slots: &[usize], pci_windows: &[(u32, u32)]) -> Vec<u8> {
    let mut aml = AcpiPm::aml();
    aml.extend(acpi_dev::com1_aml(COM1_BASE as u16, COM1_IRQ));
    aml.extend(acpi_dev::rtc_aml(CMOS_BASE as u16, CMOS_IRQ));
    aml.extend(Ged::aml(PLATFORM_MMIO_START));
    let res = HostBridgeResources { mmio_windows: pci_windows.to_vec() };
    aml.extend(host_bridge_aml(&res, pci_slots));
    aml
}

/// Builds the tables for a machine with `vcpus` vCPUs and PCI devices in
/// `pci_slots`, placed as `layout` says.
pub fn build(vcpus: u8, pci_slots: &[usize], layout: &AcpiLayout) -> Result<AcpiTables> {
    let mut next = layout.tables_at;
    let mut place = |len: usize| {
        let at = next;
        next = (next + len as u64 + 15) & !15;
        at
    };

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"RVIRTDSD", 1);
    dsdt.append_slice(&dsdt_body(pci_slots, &layout.pci_windows));
    let dsdt_bytes = dsdt.as_slice().to_vec();
    let dsdt_addr = place(dsdt_bytes.len());

    let mut fadt = FADTBuilder::new(OEM_ID, *b"RVIRTFAC", 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .preferred_pm_profile(PmProfile::EnterpriseServer)
        .dsdt_64(dsdt_addr);
    // The 32-bit DSDT field too: SeaBIOS reads only that one (to learn
    // there is no PS/2 keyboard, instead of waiting a second for it).
    fadt.dsdt = (dsdt_addr as u32).into();
    fadt.reset_reg = io_gas(acpi_dev::PM_BASE + acpi_dev::RESET_OFFSET);
    fadt.reset_value = acpi_dev::RESET_VALUE;
    fadt.sleep_control_reg = io_gas(acpi_dev::PM_BASE + acpi_dev::SLEEP_CONTROL_OFFSET);
    fadt.sleep_status_reg = io_gas(acpi_dev::PM_BASE + acpi_dev::SLEEP_STATUS_OFFSET);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_NO_VGA.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"RVIRTVMM").into();
    let fadt_bytes = bytes_of(&fadt.finalize());
    let fadt_addr = place(fadt_bytes.len());

    let mut madt = MADT::new(OEM_ID, *b"RVIRTMAD", 1, LocalInterruptController::Address(APIC_START as u32));
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let madt_bytes = bytes_of(&madt);
    let madt_addr = place(madt_bytes.len());

    let mut mcfg = MCFG::new(OEM_ID, *b"RVIRTMCF", 1);
    mcfg.add_ecam(ECAM_START, 0, 0, 0);
    let mcfg_bytes = bytes_of(&mcfg);
    let mcfg_addr = place(mcfg_bytes.len());

    let mut xsdt = XSDT::new(OEM_ID, *b"RVIRTXSD", 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt_bytes = bytes_of(&xsdt);
    let xsdt_addr = place(xsdt_bytes.len());

    let rsdp_bytes = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    if next > layout.tables_end {
        return Err(Error::Device(format!("ACPI tables need {} bytes, more than their area holds", next - layout.tables_at)));
    }
    // blobs: 0 RSDP, 1 DSDT, 2 FADT, 3 MADT, 4 MCFG, 5 XSDT.
    let mut pointers = vec![(0, RSDP_XSDT, 8), (2, FADT_DSDT, 4), (2, FADT_X_DSDT, 8)];
    pointers.extend((0..3).map(|i| (5, 36 + 8 * i, 8)));
    Ok(AcpiTables {
        blobs: vec![
            (layout.rsdp_at, rsdp_bytes),
            (dsdt_addr, dsdt_bytes),
            (fadt_addr, fadt_bytes),
            (madt_addr, madt_bytes),
            (mcfg_addr, mcfg_bytes),
            (xsdt_addr, xsdt_bytes),
        ],
        pointers,
    })
}

/// Offset of the XSDT address in the RSDP.
const RSDP_XSDT: u32 = 24;
/// Offset of the 32-bit DSDT address in the FADT.
const FADT_DSDT: u32 = 40;
/// Offset of X_DSDT in the FADT.
const FADT_X_DSDT: u32 = 140;

/// Writes the tables into guest memory.
pub fn write(mem: &GuestMemoryMmap, tables: &AcpiTables) -> Result<()> {
    for (addr, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| Error::Memory(format!("cannot write ACPI table at {addr:#x}: {e}")))?;
    }
    Ok(())
}

/// fw_cfg file names the tables travel under, as QEMU names them.
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
/// See [`RSDP_FILE`].
pub const TABLES_FILE: &str = "etc/acpi/tables";

/// The tables as firmware takes them: `etc/acpi/rsdp`, `etc/acpi/tables`
/// (built at address 0) and the `etc/table-loader` script that places
/// them, links them and fixes their checksums.
pub fn table_loader(t: &AcpiTables) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let rsdp = t.blobs[0].1.clone();
    let mut tables = Vec::new();
    for (addr, bytes) in &t.blobs[1..] {
        tables.resize(*addr as usize, 0);
        tables.extend_from_slice(bytes);
    }
    let mut l = TableLoader::new();
    l.allocate(RSDP_FILE, 16, Zone::FSeg);
    l.allocate(TABLES_FILE, 64, Zone::High);
    for &(blob, offset, size) in &t.pointers {
        if blob == 0 {
            l.add_pointer(RSDP_FILE, TABLES_FILE, offset, size);
        } else {
            l.add_pointer(TABLES_FILE, TABLES_FILE, t.blobs[blob].0 as u32 + offset, size);
        }
    }
    for (addr, bytes) in &t.blobs[1..] {
        l.add_checksum(TABLES_FILE, *addr as u32 + 9, *addr as u32, bytes.len() as u32);
    }
    l.add_checksum(RSDP_FILE, 8, 0, 20);
    l.add_checksum(RSDP_FILE, 32, 0, rsdp.len() as u32);
    (rsdp, tables, l.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table<'a>(t: &'a AcpiTables, sig: &[u8]) -> (u64, &'a [u8]) {
        t.blobs.iter().find(|(_, b)| &b[..4] == sig).map(|(a, b)| (*a, b.as_slice())).unwrap()
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn every_table_checksums_to_zero_and_has_its_length() {
        let t = build(2, &[0, 1], &AcpiLayout::direct()).unwrap();
        let (_, rsdp) = t.blobs[0].clone();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        for (_, b) in &t.blobs[1..] {
            assert_eq!(u32_at(b, 4) as usize, b.len(), "{:?} length", &b[..4]);
            assert_eq!(sum(b), 0, "{:?} checksum", std::str::from_utf8(&b[..4]));
        }
    }

    #[test]
    fn pointers_chain_rsdp_to_every_table() {
        let t = build(4, &[0], &AcpiLayout::direct()).unwrap();
        let rsdp = &t.blobs[0].1;
        let (xsdt_addr, xsdt) = table(&t, b"XSDT");
        assert_eq!(u64_at(rsdp, 24), xsdt_addr);
        let entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|o| u64_at(xsdt, o)).collect();
        assert_eq!(entries, vec![table(&t, b"FACP").0, table(&t, b"APIC").0, table(&t, b"MCFG").0]);
        let (_, mcfg) = table(&t, b"MCFG");
        assert_eq!(u64_at(mcfg, 44), ECAM_START, "ECAM base");
        assert_eq!((mcfg[54], mcfg[55]), (0, 0), "bus 0 only");
        let (_, fadt) = table(&t, b"FACP");
        assert_eq!(u64_at(fadt, 140), table(&t, b"DSDT").0, "X_DSDT");
        assert_eq!(u64::from(u32_at(fadt, 40)), table(&t, b"DSDT").0, "DSDT (32-bit, for SeaBIOS)");
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "HW_REDUCED_ACPI");
        // Sleep control register: system I/O at the PM base.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(fadt, 248), u64::from(acpi_dev::PM_BASE));
        for (a, b) in &t.blobs {
            assert!(*a >= ACPI_START && a + b.len() as u64 <= ACPI_END);
        }
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_ioapic() {
        for n in [1u8, 2, 8, 254] {
            let t = build(n, &[0], &AcpiLayout::direct()).unwrap();
            let (_, madt) = table(&t, b"APIC");
            let mut off = 44;
            let (mut lapics, mut ioapics) = (0, 0);
            while off < madt.len() {
                match madt[off] {
                    0 => {
                        assert_eq!(madt[off + 3], lapics as u8, "APIC ID");
                        assert_eq!(u32_at(madt, off + 4), 1, "enabled");
                        lapics += 1;
                    }
                    1 => {
                        assert_eq!(u32_at(madt, off + 4), IOAPIC_START as u32);
                        ioapics += 1;
                    }
                    t => panic!("unexpected MADT entry {t}"),
                }
                off += madt[off + 1] as usize;
            }
            assert_eq!((lapics, ioapics), (n as usize, 1));
        }
    }

    #[test]
    fn dsdt_carries_the_device_aml() {
        let t = build(1, &[0, 1], &AcpiLayout::direct()).unwrap();
        let (_, dsdt) = table(&t, b"DSDT");
        for needle in [&b"_S5_"[..], b"COM1", b"RTC_", b"GED_", b"PWRB", b"PCI0", b"S001"] {
            assert!(dsdt.windows(needle.len()).any(|w| w == needle));
        }
    }
}
