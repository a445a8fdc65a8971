//! Booting through firmware (SeaBIOS) instead of loading a kernel.
//!
//! The image is mapped read-only so that it ends at 4 GiB, where the reset
//! vector is, and its last 256 KiB (all of SeaBIOS's usual build) are
//! copied into RAM ending at 1 MiB: SeaBIOS runs there after its first far
//! jump and expects the low copy to mirror the top of the 4 GiB space, as
//! a chipset shadowing the ROM gives it (we have no PAM registers). The
//! vCPUs keep the architectural reset state KVM gives them. Everything the
//! firmware needs to know about the machine travels through fw_cfg, built
//! here.

use std::io::Read;
use std::path::Path;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use rvirt_arch::layout::{BIOS_LOW_SIZE, MAX_FIRMWARE_SIZE, MIN_FIRMWARE_SIZE};
use rvirt_arch::MemoryLayout;
use rvirt_devices::fw_cfg::{self, FwCfgBuilder};
use rvirt_devices::serial::COM1_BASE;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::acpi::{self, AcpiLayout, AcpiTables};
use crate::config::{BootDevice, DEFAULT_FIRMWARE};
use crate::{loader, Error, Result};

/// Reads and checks a firmware image: 64 KiB to 16 MiB, whole pages.
/// Opened as the kernel is ([`loader::open_input`]: a FIFO cannot hang the
/// VMM, only a regular file is read) and read no further than its size.
pub fn read_image(path: &Path) -> Result<Vec<u8>> {
    let bad = |detail: String| Error::File { what: "firmware", path: path.to_path_buf(), detail };
    if path == Path::new(DEFAULT_FIRMWARE) && !path.exists() {
        return Err(bad("not found: install Debian's seabios package, or give --firmware PATH or --kernel PATH".into()));
    }
    let file = loader::open_input("firmware", path)?;
    let size = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    if !(MIN_FIRMWARE_SIZE..=MAX_FIRMWARE_SIZE).contains(&size) || size % 4096 != 0 {
        return Err(bad(format!("{size} bytes; expected a ROM image of 64 KiB to 16 MiB in whole 4 KiB pages")));
    }
    let mut image = Vec::with_capacity(size as usize);
    file.take(size + 1).read_to_end(&mut image).map_err(|e| bad(e.to_string()))?;
    if image.len() as u64 != size {
        return Err(bad("changed while it was read".into()));
    }
    Ok(image)
}

/// The firmware image as the guest sees it (4 GiB minus its size): held
/// by the VM to keep the mapping KVM reads alive.
pub struct FirmwareRom {
    mapping: MmapRegion,
}

impl FirmwareRom {
    /// The image as mapped (a snapshot keeps it, so a restore maps what the
    /// guest ran, whatever became of the file since).
    pub fn bytes(&self) -> Vec<u8> {
        // SAFETY: the mapping is `size()` bytes, owned by self and alive for the borrow.
        unsafe { std::slice::from_raw_parts(self.mapping.as_ptr().cast_const(), self.mapping.size()) }.to_vec()
    }
}

/// Maps `image` at 4 GiB minus its size in KVM slot `slot` (read-only where
/// KVM supports it) and, when `copy_low` (a boot, not a restore, whose RAM
/// holds what the firmware made of it), copies its last 256 KiB (or all of
/// a smaller image) into RAM ending at 1 MiB.
pub fn map(
    kvm: &Kvm,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    image: &[u8],
    slot: u32,
    copy_low: bool,
) -> Result<FirmwareRom> {
    let size = image.len();
    let mapping = MmapRegion::new(size)
        .map_err(|e| Error::Memory(format!("cannot map the firmware image: {e}")))?;
    // SAFETY: the mapping is `size` bytes, fresh and owned here.
    unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), mapping.as_ptr(), size) };
    let base = (1u64 << 32) - size as u64;
    let flags = if kvm.check_extension(Cap::ReadonlyMem) {
        KVM_MEM_READONLY
    } else {
        0
    };
    let region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: base,
        memory_size: size as u64,
        userspace_addr: mapping.as_ptr() as u64,
    };
    // SAFETY: the mapping lives in the returned FirmwareRom, which the VM
    // keeps for as long as its fd; the range is outside guest RAM.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(crate::error::kvm("SET_USER_MEMORY_REGION (firmware)"))?;
    if copy_low {
        let low = &image[size - size.min(BIOS_LOW_SIZE as usize)..];
        let at = (1u64 << 20) - low.len() as u64;
        mem.write_slice(low, GuestAddress(at))
            .map_err(|e| Error::Memory(format!("cannot copy the firmware to {at:#x}: {e}")))?;
    }
    Ok(FirmwareRom { mapping })
}

/// What fw_cfg tells the firmware about this machine.
pub struct MachineInfo<'a> {
    /// vCPUs at boot (and at most).
    pub vcpus: u8,
    /// RAM and holes.
    pub layout: &'a MemoryLayout,
    /// Populated PCI slots, for the DSDT.
    pub pci_slots: &'a [usize],
    /// Each disk given a place in the boot order, with its index.
    pub boot_disks: &'a [(BootDevicePath, u16)],
    /// The machine's UUID.
    pub uuid: Option<[u8; 16]>,
    /// How long the firmware waits before rebooting after a failed boot
    /// (None: it waits for ever, as QEMU's default).
    pub reboot_timeout_ms: Option<u32>,
    /// How long the boot menu waits for a key (None: no menu).
    pub menu_ms: Option<u16>,
}

/// `etc/e820`: 20-byte entries (address, length, type), little-endian.
fn e820_file(layout: &MemoryLayout) -> Vec<u8> {
    let mut out = Vec::new();
    for e in layout.firmware_e820() {
        out.extend_from_slice(&e.addr.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&(e.kind as u32).to_le_bytes());
    }
    out
}

/// A bootable device as SeaBIOS names it in `bootorder`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BootDevicePath {
    /// A virtio-blk disk: `/pci@i0cf8/*@SLOT`.
    Virtio {
        /// Its PCI slot.
        slot: usize,
    },
    /// A unit on the virtio-scsi controller: `/pci@i0cf8/*@SLOT/*@0/*@TARGET,0`.
    Scsi {
        /// The controller's PCI slot.
        slot: usize,
        /// The unit's target (LUN 0).
        target: usize,
    },
}

impl std::fmt::Display for BootDevicePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Virtio { slot } => write!(f, "/pci@i0cf8/*@{slot:x}"),
            Self::Scsi { slot, target } => write!(f, "/pci@i0cf8/*@{slot:x}/*@0/*@{target:x},0"),
        }
    }
}

/// SeaBIOS's `bootorder`: one device path per line in boot order (slots
/// and targets in hex), then `HALT` so that devices left out are not
/// tried. None when no disk has an index.
pub fn bootorder(boot_disks: &[(BootDevicePath, u16)]) -> Option<String> {
    if boot_disks.is_empty() {
        return None;
    }
    let mut d = boot_disks.to_vec();
    d.sort_by_key(|&(path, index)| (index, path));
    let mut s: String = d.iter().map(|(path, _)| format!("{path}\n")).collect();
    s.push_str("HALT");
    Some(s)
}

/// The ACPI tables for firmware to place, and fw_cfg with everything.
pub fn fw_cfg(info: &MachineInfo, mem: GuestMemoryMmap) -> Result<fw_cfg::FwCfg> {
    let windows: Vec<(u32, u32)> = info
        .layout
        .firmware_pci_windows()
        .iter()
        .map(|&(a, b)| (a as u32, b as u32))
        .collect();
    let tables: AcpiTables = acpi::build(
        info.vcpus,
        info.pci_slots,
        &AcpiLayout {
            rsdp_at: 0,
            tables_at: 0,
            tables_end: 1 << 20,
            pci_windows: windows,
        },
    )?;
    let (rsdp, blob, loader) = acpi::table_loader(&tables);
    let cpus = u16::from(info.vcpus).to_le_bytes().to_vec();
    let mut b = FwCfgBuilder::new();
    b.item(fw_cfg::UUID, info.uuid.unwrap_or([0; 16]).to_vec())
        .item(
            fw_cfg::RAM_SIZE,
            info.layout.ram_bytes.to_le_bytes().to_vec(),
        )
        .item(fw_cfg::NOGRAPHIC, 1u16.to_le_bytes().to_vec())
        .item(fw_cfg::NB_CPUS, cpus.clone())
        .item(fw_cfg::MAX_CPUS, cpus)
        .item(fw_cfg::NUMA, 0u64.to_le_bytes().to_vec())
        .item(fw_cfg::BOOT_MENU, u16::from(info.menu_ms.is_some()).to_le_bytes().to_vec())
        .item(fw_cfg::E820_TABLE, 0u32.to_le_bytes().to_vec());
    if let Some(uuid) = info.uuid {
        b.item(fw_cfg::SMBIOS_ENTRIES, smbios_uuid_field(uuid));
    }
    let err = |e: fw_cfg::FwCfgError| Error::Device(e.to_string());
    b.file("etc/e820", e820_file(info.layout)).map_err(err)?;
    b.file(acpi::RSDP_FILE, rsdp).map_err(err)?;
    b.file(acpi::TABLES_FILE, blob).map_err(err)?;
    b.file("etc/table-loader", loader).map_err(err)?;
    b.file(
        "etc/boot-fail-wait",
        info.reboot_timeout_ms
            .unwrap_or(u32::MAX)
            .to_le_bytes()
            .to_vec(),
    )
    .map_err(err)?;
    if let Some(ms) = info.menu_ms {
        b.file("etc/boot-menu-wait", ms.to_le_bytes().to_vec()).map_err(err)?;
    }
    b.file("etc/sercon-port", (COM1_BASE as u16).to_le_bytes().to_vec())
        .map_err(err)?;
    if let Some(order) = bootorder(info.boot_disks) {
        b.file("bootorder", order.into_bytes()).map_err(err)?;
    }
    Ok(b.build(mem))
}

/// Offset of the UUID in an SMBIOS type 1 (System Information) structure.
const SMBIOS_TYPE1_UUID: u16 = 8;

/// One legacy SMBIOS field entry setting the type 1 UUID: count 1, then
/// {u16 entry length, u8 0 = field, u8 table type, u16 field offset, data}.
/// SeaBIOS announces SMBIOS 2.4, for which the UUID is stored in the order
/// it is written (the byte-swapped first fields came with 2.6), so the
/// guest's `product_uuid` reads back the domain's UUID.
fn smbios_uuid_field(uuid: [u8; 16]) -> Vec<u8> {
    let mut v = 1u16.to_le_bytes().to_vec();
    v.extend_from_slice(&(6u16 + 16).to_le_bytes());
    v.extend_from_slice(&[0, 1]);
    v.extend_from_slice(&SMBIOS_TYPE1_UUID.to_le_bytes());
    v.extend_from_slice(&uuid);
    v
}

/// CMOS bytes SeaBIOS reads: 0x5F the vCPU count less one; 0x3D/0x38 the
/// boot device classes in `order` (first in the low nibble of 0x3D,
/// second in its high nibble, third in the high nibble of 0x38), with the
/// floppy signature check off (bit 0 of 0x38).
pub fn cmos_presets(vcpus: u8, order: &[BootDevice]) -> [(u8, u8); 3] {
    let code = |i: usize| order.get(i).map_or(0, |d| d.cmos_code());
    [(0x5f, vcpus.saturating_sub(1)), (0x3d, code(0) | code(1) << 4), (0x38, code(2) << 4 | 0x01)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rvirt_devices::BusDevice;

    #[test]
    fn bootorder_lines_follow_the_indexes_and_end_with_halt() {
        assert_eq!(bootorder(&[]), None);
        use BootDevicePath::*;
        assert_eq!(
            bootorder(&[(Virtio { slot: 1 }, 2), (Virtio { slot: 2 }, 1)]).unwrap(),
            "/pci@i0cf8/*@2\n/pci@i0cf8/*@1\nHALT"
        );
        assert_eq!(bootorder(&[(Virtio { slot: 17 }, 0)]).unwrap(), "/pci@i0cf8/*@11\nHALT", "slots in hex");
        assert_eq!(
            bootorder(&[(Scsi { slot: 3, target: 10 }, 0), (Virtio { slot: 1 }, 1)]).unwrap(),
            "/pci@i0cf8/*@3/*@0/*@a,0\n/pci@i0cf8/*@1\nHALT",
            "a SCSI unit: controller slot, channel 0, target and LUN"
        );
    }

    #[test]
    fn images_of_the_wrong_size_are_refused() {
        let dir = std::env::temp_dir().join(format!("rvirt-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (len, ok) in [
            (4096usize, false),
            (128 << 10, true),
            ((256 << 10) + 1, false),
            (256 << 10, true),
            (32 << 20, false),
        ] {
            let p = dir.join("bios.bin");
            std::fs::write(&p, vec![0u8; len]).unwrap();
            assert_eq!(read_image(&p).is_ok(), ok, "{len}");
        }
        let e = read_image(&dir.join("missing.bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.bin"), "{e}");
        let fifo = dir.join("bios.fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_image(&fifo).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "a FIFO is refused without blocking: {e}");
        if !Path::new(DEFAULT_FIRMWARE).exists() {
            let e = read_image(Path::new(DEFAULT_FIRMWARE))
                .unwrap_err()
                .to_string();
            assert!(e.contains("seabios package"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Runs `etc/table-loader` as firmware does, with the rsdp file at
    /// `rsdp_at` and the tables at `tables_at`, and returns both patched.
    /// Reads fw_cfg item `key` through the data port, as firmware without DMA does.
    fn read_item(f: &mut fw_cfg::FwCfg, key: u16, len: usize) -> Vec<u8> {
        f.write(0, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0u8];
                f.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    /// Finds fw_cfg file `name` in the directory and reads it whole.
    fn read_file(f: &mut fw_cfg::FwCfg, name: &str) -> Vec<u8> {
        let count = u32::from_be_bytes(read_item(f, fw_cfg::FILE_DIR, 4).try_into().unwrap()) as usize;
        let dir = read_item(f, fw_cfg::FILE_DIR, 4 + 64 * count);
        let e = (0..count)
            .map(|i| &dir[4 + 64 * i..4 + 64 * (i + 1)])
            .find(|e| e[8..].starts_with(name.as_bytes()) && e[8 + name.len()] == 0)
            .unwrap_or_else(|| panic!("no fw_cfg file {name}"));
        let size = u32::from_be_bytes(e[..4].try_into().unwrap()) as usize;
        read_item(f, u16::from_be_bytes([e[4], e[5]]), size)
    }

    fn run_loader(f: &mut fw_cfg::FwCfg, rsdp_at: u64, tables_at: u64) -> (Vec<u8>, Vec<u8>) {
        let script = read_file(f, "etc/table-loader");
        let mut files = [
            ("etc/acpi/rsdp", read_file(f, "etc/acpi/rsdp"), rsdp_at),
            ("etc/acpi/tables", read_file(f, "etc/acpi/tables"), tables_at),
        ];
        let name = |b: &[u8]| {
            String::from_utf8(b.iter().take_while(|c| **c != 0).copied().collect()).unwrap()
        };
        let idx = |n: &str| if n == "etc/acpi/rsdp" { 0 } else { 1 };
        for cmd in script.chunks(128) {
            let u32_at = |o: usize| u32::from_le_bytes(cmd[o..o + 4].try_into().unwrap()) as usize;
            match u32_at(0) {
                1 => assert!(
                    ["etc/acpi/rsdp", "etc/acpi/tables"].contains(&name(&cmd[4..60]).as_str())
                ),
                2 => {
                    let (dest, src) = (idx(&name(&cmd[4..60])), idx(&name(&cmd[60..116])));
                    let (off, size) = (u32_at(116), cmd[120] as usize);
                    let data = &mut files[dest].1;
                    let mut v = [0u8; 8];
                    v[..size].copy_from_slice(&data[off..off + size]);
                    let patched = u64::from_le_bytes(v) + files[src].2;
                    let bytes = patched.to_le_bytes();
                    files[dest].1[off..off + size].copy_from_slice(&bytes[..size]);
                }
                3 => {
                    let d = idx(&name(&cmd[4..60]));
                    let (off, start, len) = (u32_at(60), u32_at(64), u32_at(68));
                    let data = &mut files[d].1;
                    data[off] = 0;
                    let sum = data[start..start + len]
                        .iter()
                        .fold(0u8, |a, b| a.wrapping_add(*b));
                    data[off] = sum.wrapping_neg();
                }
                other => panic!("unknown loader command {other}"),
            }
        }
        let [(_, rsdp, _), (_, tables, _)] = files;
        (rsdp, tables)
    }

    #[test]
    fn the_table_loader_links_and_checksums_our_tables_wherever_they_land() {
        let layout = MemoryLayout::new(512 << 20).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let info = MachineInfo {
            vcpus: 2,
            layout: &layout,
            pci_slots: &[0, 1],
            boot_disks: &[],
            uuid: None,
            reboot_timeout_ms: None,
            menu_ms: None,
        };
        let mut f = fw_cfg(&info, mem).unwrap();
        let (rsdp_at, tables_at) = (0xf5a40u64, 0x1ffe_0000u64);
        let (rsdp, tables) = run_loader(&mut f, rsdp_at, tables_at);
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
        assert_eq!(
            (sum(&rsdp[..20]), sum(&rsdp)),
            (0, 0),
            "both RSDP checksums"
        );
        let at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let xsdt_off = (at(&rsdp, 24) - tables_at) as usize;
        let table = |off: usize| {
            let len = u32::from_le_bytes(tables[off + 4..off + 8].try_into().unwrap()) as usize;
            &tables[off..off + len]
        };
        let xsdt = table(xsdt_off);
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut sigs = Vec::new();
        for o in (36..xsdt.len()).step_by(8) {
            let t = table((at(xsdt, o) - tables_at) as usize);
            assert_eq!(sum(t), 0, "{:?} checksum", std::str::from_utf8(&t[..4]));
            sigs.push(t[..4].to_vec());
            if &t[..4] == b"FACP" {
                let dsdt = table((at(t, 140) - tables_at) as usize);
                assert_eq!((&dsdt[..4], sum(dsdt)), (&b"DSDT"[..], 0));
                assert_eq!(
                    u64::from(u32::from_le_bytes(t[40..44].try_into().unwrap())),
                    at(t, 140),
                    "both DSDT fields"
                );
            }
        }
        assert_eq!(sigs, [b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]);
        assert_eq!(sum(xsdt), 0);
    }

    #[test]
    fn fw_cfg_carries_the_cpu_count_boot_order_and_reboot_timeout() {
        let layout = MemoryLayout::new(256 << 20).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        for (timeout, want) in [(None, u32::MAX), (Some(5000), 5000)] {
            let info = MachineInfo {
                vcpus: 3,
                layout: &layout,
                pci_slots: &[0, 1, 2],
                boot_disks: &[(BootDevicePath::Virtio { slot: 2 }, 1)],
                uuid: Some([7; 16]),
                reboot_timeout_ms: timeout,
                menu_ms: Some(1500),
            };
            let mut f = fw_cfg(&info, mem.clone()).unwrap();
            assert_eq!(read_item(&mut f, fw_cfg::NB_CPUS, 2), [3, 0]);
            assert_eq!(read_item(&mut f, fw_cfg::UUID, 16), [7; 16]);
            let smbios = read_item(&mut f, fw_cfg::SMBIOS_ENTRIES, 24);
            assert_eq!(smbios[..8], [1, 0, 22, 0, 0, 1, 8, 0], "one type 1 field entry at the UUID's offset");
            assert_eq!(smbios[8..], [7; 16]);
            assert_eq!(read_file(&mut f, "etc/boot-fail-wait"), want.to_le_bytes());
            assert_eq!(read_item(&mut f, fw_cfg::BOOT_MENU, 2), [1, 0]);
            assert_eq!(read_file(&mut f, "etc/boot-menu-wait"), 1500u16.to_le_bytes());
            assert_eq!(read_file(&mut f, "bootorder"), b"/pci@i0cf8/*@2\nHALT");
            assert_eq!(read_file(&mut f, "etc/e820"), e820_file(&layout));
        }
    }

    #[test]
    fn e820_and_presets() {
        let layout = MemoryLayout::new(1 << 30).unwrap();
        let e = e820_file(&layout);
        assert_eq!(e.len() % 20, 0);
        assert_eq!(
            &e[..20],
            &[
                &0u64.to_le_bytes()[..],
                &(1u64 << 30).to_le_bytes(),
                &1u32.to_le_bytes()
            ]
            .concat()[..]
        );
        assert_eq!(cmos_presets(4, &[])[0], (0x5f, 3));
        use BootDevice::*;
        assert_eq!(cmos_presets(1, &[Disk, Cdrom])[1..], [(0x3d, 0x32), (0x38, 0x01)], "QEMU's default, -boot order=cd");
        assert_eq!(cmos_presets(1, &[Network, Cdrom, Disk])[1..], [(0x3d, 0x34), (0x38, 0x21)]);
    }
}
