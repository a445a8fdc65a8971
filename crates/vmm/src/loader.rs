//! Puts the kernel, initramfs, command line and boot parameters into guest
//! memory, and says where the boot vCPU must start.
//!
//! Two kernel formats are accepted, detected by content:
//! - **bzImage** (what distributions ship): the Linux x86 boot protocol with a
//!   64-bit entry, parameters in the zero page;
//! - **ELF vmlinux** with a Xen `PHYS32_ENTRY` note: the PVH boot protocol,
//!   parameters in `hvm_start_info`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use rvirt_arch::layout::*;
use rvirt_arch::regs::BootEntry;
use rvirt_arch::MemoryLayout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{Error, Result};

/// The kernel image formats rvirt-vmm boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed Linux kernel with the x86 boot-protocol header.
    BzImage,
    /// An ELF executable (must carry a PVH entry note).
    Elf,
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";
/// `setup_header.xloadflags`: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// The loader ID for "undefined / other" in `type_of_loader`.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;

fn file_err(what: &'static str, path: &Path, detail: impl ToString) -> Error {
    Error::File { what, path: path.to_path_buf(), detail: detail.to_string() }
}

/// Opens `path` for reading with an error that names it: without blocking
/// (a FIFO cannot hang the VMM) and only if what was opened is a regular file.
pub fn open_input(what: &'static str, path: &Path) -> Result<File> {
    use rvirt_block::file::{open_checked, Kind};
    open_checked(path, false, Kind::Regular, 0).map_err(|e| file_err(what, path, e))
}

/// Recognises the kernel's format from its first bytes.
pub fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat> {
    let mut magic = [0u8; 4];
    let mut read_at = |off: u64, buf: &mut [u8; 4]| -> bool {
        file.seek(SeekFrom::Start(off)).is_ok() && file.read_exact(buf).is_ok()
    };
    if read_at(0, &mut magic) && magic == ELF_MAGIC {
        return Ok(KernelFormat::Elf);
    }
    if read_at(BZIMAGE_MAGIC_OFFSET, &mut magic) && magic == BZIMAGE_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(file_err("kernel", path, "not a Linux kernel (neither a bzImage nor an ELF vmlinux)"))
}

/// Where things were put, for the caller to build the rest of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// How the boot vCPU enters the kernel.
    pub entry: BootEntry,
    /// The format that was loaded.
    pub format: KernelFormat,
    /// First byte after the loaded kernel image.
    pub kernel_end: u64,
    /// The initramfs's guest address and size, if one was loaded.
    pub initrd: Option<(u64, u64)>,
}

/// Loads kernel, initramfs and command line, and writes the boot parameters
/// for the detected protocol. ACPI tables are written separately at
/// [`ACPI_START`], which the parameters point at.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    (kernel, kernel_file): (&Path, &File),
    initrd: Option<(&Path, &File)>,
    cmdline: &str,
) -> Result<LoadedKernel> {
    let mut kfile = kernel_file.try_clone().map_err(|e| file_err("kernel", kernel, e))?;
    let format = detect_format(&mut kfile, kernel)?;
    let high = Some(GuestAddress(HIGH_MEMORY_START));
    let (mut loaded, setup_hdr) = match format {
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut kfile, high)
                .map_err(|e| file_err("kernel", kernel, format!("cannot load bzImage: {e}")))?;
            let hdr = r.setup_header.ok_or_else(|| file_err("kernel", kernel, "bzImage without a setup header"))?;
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(file_err("kernel", kernel, "bzImage has no 64-bit entry point (boot protocol 2.12+ needed)"));
            }
            let entry = BootEntry::Linux64 { entry: r.kernel_load.0 + 0x200 };
            (LoadedKernel { entry, format, kernel_end: r.kernel_end, initrd: None }, Some(hdr))
        }
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut kfile, high)
                .map_err(|e| file_err("kernel", kernel, format!("cannot load ELF: {e}")))?;
            let PvhBootCapability::PvhEntryPresent(addr) = r.pvh_boot_cap else {
                return Err(file_err("kernel", kernel, "ELF kernel has no PVH entry note (CONFIG_PVH); boot its bzImage instead"));
            };
            let entry = BootEntry::Pvh { entry: addr.0 };
            (LoadedKernel { entry, format, kernel_end: r.kernel_end, initrd: None }, None)
        }
    };

    let initrd_max = hdr_initrd_max(setup_hdr.as_ref(), layout);
    if let Some((path, file)) = initrd {
        loaded.initrd = Some(load_initrd(mem, path, file, loaded.kernel_end, initrd_max)?);
    }

    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    mem.write_slice(&cmd, GuestAddress(CMDLINE_START))
        .map_err(|_| Error::Config("kernel command line does not fit in guest memory".into()))?;

    match setup_hdr {
        Some(hdr) => write_zero_page(mem, layout, hdr, cmdline.len(), loaded.initrd)?,
        None => write_pvh_start_info(mem, layout, loaded.initrd)?,
    }
    Ok(loaded)
}

fn hdr_initrd_max(hdr: Option<&setup_header>, layout: &MemoryLayout) -> u64 {
    let ram_top = layout.low_ram_end();
    match hdr {
        // initrd_addr_max is the highest address the initramfs may *end* at.
        Some(h) if h.initrd_addr_max != 0 => ram_top.min(u64::from(h.initrd_addr_max) + 1),
        _ => ram_top,
    }
}

/// Places the initramfs as high as allowed, page aligned, above the kernel.
fn load_initrd(mem: &GuestMemoryMmap, path: &Path, file: &File, kernel_end: u64, max_end: u64) -> Result<(u64, u64)> {
    let mut f = file.try_clone().map_err(|e| file_err("initramfs", path, e))?;
    f.seek(SeekFrom::Start(0)).map_err(|e| file_err("initramfs", path, e))?;
    let size = f.metadata().map_err(|e| file_err("initramfs", path, e))?.len();
    if size == 0 {
        return Err(file_err("initramfs", path, "file is empty"));
    }
    let too_big = || {
        file_err(
            "initramfs",
            path,
            format!("{} MiB does not fit in guest memory above the kernel; give the VM more --memory", size >> 20),
        )
    };
    let start = max_end.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if start < kernel_end {
        return Err(too_big());
    }
    let len = usize::try_from(size).map_err(|_| too_big())?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut f, len)
        .map_err(|e| file_err("initramfs", path, format!("read failed: {e}")))?;
    Ok((start, size))
}

/// The e820 map in the zero page's format.
pub fn e820_entries(layout: &MemoryLayout) -> Vec<boot_e820_entry> {
    layout
        .e820()
        .iter()
        .map(|e| boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind as u32 })
        .collect()
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    hdr: setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<()> {
    let params = build_zero_page(layout, hdr, cmdline_len, initrd)?;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE_START)), mem)
        .map_err(|e| Error::Memory(format!("cannot write boot parameters: {e}")))
}

/// The Linux zero page: the kernel's setup header plus what the loader fills in.
pub fn build_zero_page(
    layout: &MemoryLayout,
    mut hdr: setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<boot_params> {
    let mut params = boot_params::default();
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = ACPI_START;
    let entries = e820_entries(layout);
    if entries.len() > params.e820_table.len() {
        return Err(Error::Memory("too many e820 entries".into()));
    }
    params.e820_table[..entries.len()].copy_from_slice(&entries);
    params.e820_entries = entries.len() as u8;
    Ok(params)
}

fn write_pvh_start_info(mem: &GuestMemoryMmap, layout: &MemoryLayout, initrd: Option<(u64, u64)>) -> Result<()> {
    let memmap: Vec<hvm_memmap_table_entry> = layout
        .e820()
        .iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: ACPI_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let module = initrd.map(|(paddr, size)| hvm_modlist_entry { paddr, size, cmdline_paddr: 0, reserved: 0 });
    if module.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some(m) = module {
        params.set_modules(&[m], GuestAddress(PVH_MODLIST_START));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|e| Error::Memory(format!("cannot write PVH start info: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rvirt-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn mem(layout: &MemoryLayout) -> GuestMemoryMmap {
        crate::memory::create_guest_memory(layout).unwrap()
    }

    /// A minimal but valid bzImage: one setup sector plus a payload.
    fn fake_bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut img = vec![0u8; 512 * 2 + 4096];
        img[0x1f1] = 1; // setup_sects
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img
    }

    #[test]
    fn detects_formats_and_rejects_other_files() {
        let elf = tmp("elf", b"\x7fELF\x02\x01\x01rest-of-header");
        assert_eq!(detect_format(&mut File::open(&elf).unwrap(), &elf).unwrap(), KernelFormat::Elf);
        let bz = tmp("bz", &fake_bzimage(0x20f, 1));
        assert_eq!(detect_format(&mut File::open(&bz).unwrap(), &bz).unwrap(), KernelFormat::BzImage);
        for (name, bytes) in [("text", &b"#!/bin/sh\necho hi\n"[..]), ("empty", b"")] {
            let p = tmp(name, bytes);
            let e = detect_format(&mut File::open(&p).unwrap(), &p).unwrap_err().to_string();
            assert!(e.contains("not a Linux kernel") && e.contains(name), "{e}");
        }
    }

    #[test]
    fn missing_and_directory_inputs_are_named() {
        let e = open_input("kernel", Path::new("/nonexistent/vmlinuz")).unwrap_err().to_string();
        assert!(e.starts_with("kernel /nonexistent/vmlinuz:"), "{e}");
        let e = open_input("kernel", Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    /// Opens the files as `Backends::open` does and loads them.
    fn load_paths(m: &GuestMemoryMmap, layout: &MemoryLayout, kernel: &Path, initrd: Option<&std::path::PathBuf>, cmdline: &str) -> Result<LoadedKernel> {
        let k = open_input("kernel", kernel)?;
        let rd = initrd.map(|p| open_input("initramfs", p)).transpose()?;
        load(m, layout, (kernel, &k), initrd.map(|p| p.as_path()).zip(rd.as_ref()), cmdline)
    }

    #[test]
    fn loads_bzimage_initrd_and_cmdline() {
        let layout = MemoryLayout::new(64 << 20).unwrap();
        let m = mem(&layout);
        let bz = tmp("bz2", &fake_bzimage(0x20f, XLF_KERNEL_64));
        let rd = tmp("initrd", &vec![0xab; 10_000]);
        let k = load_paths(&m, &layout, &bz, Some(&rd), "console=ttyS0 quiet").unwrap();
        assert_eq!(k.entry, BootEntry::Linux64 { entry: 0x10_0200 });
        let (addr, size) = k.initrd.unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 64 << 20 && addr >= k.kernel_end);
        assert_eq!(m.read_obj::<u8>(GuestAddress(addr + 9_999)).unwrap(), 0xab);
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.ramdisk_image }, addr as u32);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(p.e820_entries, 4, "low RAM, BIOS area, RAM, ECAM");
        let mut cmd = [0u8; 20];
        m.read_slice(&mut cmd, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cmd, b"console=ttyS0 quiet\0");
    }

    #[test]
    fn old_or_32bit_bzimage_is_refused() {
        let layout = MemoryLayout::new(64 << 20).unwrap();
        let m = mem(&layout);
        for (v, x) in [(0x20b, 1), (0x20f, 0)] {
            let bz = tmp("old", &fake_bzimage(v, x));
            let e = load_paths(&m, &layout, &bz, None, "").unwrap_err().to_string();
            assert!(e.contains("64-bit entry"), "{e}");
        }
    }

    #[test]
    fn oversized_initrd_is_refused() {
        let layout = MemoryLayout::new(16 << 20).unwrap();
        let m = mem(&layout);
        let bz = tmp("bz3", &fake_bzimage(0x20f, 1));
        let rd = tmp("bigrd", &vec![1; 17 << 20]);
        let e = load_paths(&m, &layout, &bz, Some(&rd), "").unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
        let empty = tmp("emptyrd", b"");
        assert!(load_paths(&m, &layout, &bz, Some(&empty), "").unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn zero_page_e820_matches_layout() {
        let layout = MemoryLayout::new(4 << 30).unwrap();
        let p = build_zero_page(&layout, setup_header::default(), 5, None).unwrap();
        assert_eq!(p.e820_entries, 5);
        let last = p.e820_table[4];
        assert_eq!(({ last.addr }, { last.size }, { last.r#type }), (4 << 30, 1 << 30, 1));
        assert_eq!({ p.hdr.cmdline_size }, 6);
    }
}
