//! Guest RAM: anonymous host mappings registered with KVM as memory slots.
//!
//! Each region starts on a 2 MiB boundary of the VMM's address space and is
//! advised for transparent huge pages, as QEMU does: KVM maps guest memory
//! with 2 MiB pages only where the guest-physical and host-virtual addresses
//! agree modulo 2 MiB (otherwise every 4 KiB the guest touches is a separate
//! nested page fault and TLB entry).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use rvirt_arch::MemoryLayout;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress};

use crate::{Error, Result};

/// The host's RAM and swap in bytes, from `/proc/meminfo`.
pub fn host_memory() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("MemTotal:")?, field("SwapTotal:").unwrap_or(0)))
}

/// Checks that the host could ever back `bytes` of guest RAM. Pages are only
/// allocated when the guest touches them (overcommit is allowed), but a guest
/// bigger than the host's RAM and swap together can never be satisfied.
pub fn check_host_can_provide(bytes: u64) -> Result<()> {
    if let Some((ram, swap)) = host_memory() {
        if bytes > ram + swap {
            return Err(Error::Memory(format!(
                "{} MiB requested but the host has only {} MiB of RAM and {} MiB of swap",
                bytes >> 20,
                ram >> 20,
                swap >> 20
            )));
        }
    }
    Ok(())
}

/// The huge page size guest RAM is aligned to.
pub const HUGE_PAGE: usize = 2 << 20;

/// PROT_NONE mappings on both sides of a `len`-byte hole that starts on a
/// [`HUGE_PAGE`] boundary. While they stand, the kernel's next `mmap` of
/// `len` bytes lands in the hole unless a higher gap fits (then the region
/// is merely unaligned). Unmapped on drop.
struct AlignedHole {
    pieces: [(usize, usize); 2],
}

impl AlignedHole {
    fn new(len: usize) -> Option<Self> {
        let total = len.checked_add(HUGE_PAGE)?;
        // SAFETY: a fresh anonymous PROT_NONE reservation; no existing memory is touched.
        let r = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return None;
        }
        let start = r as usize;
        let aligned = (start + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
        // SAFETY: [aligned, aligned + len) lies inside the reservation just made.
        unsafe { libc::munmap(aligned as *mut libc::c_void, len) };
        Some(Self { pieces: [(start, aligned - start), (aligned + len, start + total - (aligned + len))] })
    }
}

impl Drop for AlignedHole {
    fn drop(&mut self) {
        for (addr, len) in self.pieces {
            if len > 0 {
                // SAFETY: the pieces are what is left of our own reservation.
                unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            }
        }
    }
}

/// Maps `len` bytes of anonymous, private, unreserved memory, on a
/// [`HUGE_PAGE`] boundary when the address space allows, advised for
/// transparent huge pages. vm-memory owns the mapping (unmapped with the
/// last reference to the guest memory).
fn map_ram(len: usize) -> std::result::Result<MmapRegion, vm_memory::mmap::MmapRegionError> {
    map_aligned(len, None)
}

/// [`map_ram`] of `len` bytes, anonymous or (`file`) a private
/// copy-on-write mapping of a file at an offset.
fn map_aligned(len: usize, file: Option<vm_memory::FileOffset>) -> std::result::Result<MmapRegion, vm_memory::mmap::MmapRegionError> {
    let anonymous = if file.is_none() { libc::MAP_ANONYMOUS } else { 0 };
    // Another thread mapping memory at the same moment can take the hole;
    // then try again, and settle for an unaligned region after three tries.
    let mut attempt = 0;
    let region = loop {
        attempt += 1;
        let hole = AlignedHole::new(len);
        let region = MmapRegion::build(file.clone(), len, libc::PROT_READ | libc::PROT_WRITE, anonymous | libc::MAP_NORESERVE | libc::MAP_PRIVATE);
        drop(hole);
        let region = region?;
        if region.as_ptr() as usize % HUGE_PAGE == 0 || attempt == 3 {
            break region;
        }
    };
    // SAFETY: advice only, on the mapping just made. Without THP in this
    // kernel it fails, and the memory is simply not huge-page backed.
    unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
    Ok(region)
}

/// Maps guest RAM for `layout` (anonymous, private, not reserved up front).
pub fn create_guest_memory(layout: &MemoryLayout) -> Result<GuestMemoryMmap> {
    check_host_can_provide(layout.ram_bytes)?;
    let what = |e: String| Error::Memory(format!("cannot map {} MiB: {e}", layout.ram_bytes >> 20));
    let mut regions = Vec::new();
    for (start, len) in layout.ram_ranges() {
        let len = usize::try_from(len).map_err(|_| Error::Memory("size does not fit this host's address space".into()))?;
        let mapping = map_ram(len).map_err(|e| what(e.to_string()))?;
        regions.push(GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or_else(|| what("region wraps the address space".into()))?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| what(e.to_string()))
}

/// How a restored VM gets its RAM from a snapshot's memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FromFile {
    /// Private copy-on-write mappings of the file: pages are read when the
    /// guest touches them, and any number of VMs share the unchanged ones.
    Map,
    /// Fresh anonymous RAM filled from the file at once.
    Copy,
}

/// Guest RAM for `layout` from `file`, which holds the regions one after
/// the other from `base` (a multiple of the page size; as
/// [`save_guest_memory`] writes them) to its end.
pub fn guest_memory_from_file(layout: &MemoryLayout, file: &std::fs::File, how: FromFile, base: u64) -> Result<GuestMemoryMmap> {
    let have = file.metadata().map_err(|e| Error::Memory(format!("the memory file: {e}")))?.len().saturating_sub(base);
    if have != layout.ram_bytes {
        return Err(Error::Memory(format!("the memory file holds {have} bytes; the snapshot's VM has {}", layout.ram_bytes)));
    }
    let what = |e: String| Error::Memory(format!("cannot map {} MiB from the memory file: {e}", layout.ram_bytes >> 20));
    let mut regions = Vec::new();
    let mut offset = base;
    for (start, len) in layout.ram_ranges() {
        let size = usize::try_from(len).map_err(|_| Error::Memory("size does not fit this host's address space".into()))?;
        let mapping = match how {
            FromFile::Map => {
                let dup = file.try_clone().map_err(|e| what(e.to_string()))?;
                map_aligned(size, Some(vm_memory::FileOffset::new(dup, offset))).map_err(|e| what(e.to_string()))?
            }
            FromFile::Copy => {
                let m = map_ram(size).map_err(|e| what(e.to_string()))?;
                // SAFETY: the mapping was just made, `size` bytes long, and nothing else uses it yet.
                let dest = unsafe { std::slice::from_raw_parts_mut(m.as_ptr(), size) };
                // Only the file's data: its holes are zero, as fresh RAM is.
                for (at, n) in data_extents(file, offset, len).map_err(|e| what(e.to_string()))? {
                    let start = (at - offset) as usize;
                    std::os::unix::fs::FileExt::read_exact_at(file, &mut dest[start..start + n as usize], at).map_err(|e| what(e.to_string()))?;
                }
                m
            }
        };
        offset += len;
        regions.push(GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or_else(|| what("region wraps the address space".into()))?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| what(e.to_string()))
}

/// The extents of `file` within `[start, start + len)` that hold data
/// (`SEEK_DATA`/`SEEK_HOLE`); the whole range on a filesystem without them.
fn data_extents(file: &std::fs::File, start: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let end = start + len;
    let seek = |from: u64, whence: i32| -> std::io::Result<Option<u64>> {
        let from = libc::off_t::try_from(from).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek on a descriptor we own; only its offset changes (reads use pread).
        let r = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data after `from`.
            return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
        }
        Ok(Some(r as u64))
    };
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let data = match seek(at, libc::SEEK_DATA) {
            Ok(Some(d)) if d < end => d,
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![(start, len)]),
            Err(e) => return Err(e),
        };
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((data, hole - data));
        at = hole;
    }
    Ok(out)
}

/// This process's `/proc/self/pagemap`, opened before the VMM confines
/// itself (its jail has no /proc): which pages of fresh guest RAM were
/// ever touched, so a snapshot skips the others (zero) without reading them.
static PAGEMAP: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();

/// Keeps `given` (the jail's) or opens [`PAGEMAP`]; without it snapshots
/// read all of RAM. Called once this process is the one running the VM
/// (a page map opened before the jail's fork is the reaper's).
pub fn open_pagemap(given: Option<std::fs::File>) {
    PAGEMAP.get_or_init(|| given.or_else(|| std::fs::File::open("/proc/self/pagemap").ok()));
}

/// For the `pages` pages from host address `start`: whether each is in
/// memory or swapped out (a page never touched is neither, and reads as
/// zero in anonymous memory). None when the page map cannot be read.
fn touched_pages(start: usize, pages: usize) -> Option<Vec<bool>> {
    const PRESENT_OR_SWAPPED: u64 = 3 << 62;
    let f = PAGEMAP.get()?.as_ref()?;
    let mut entries = vec![0u8; pages * 8];
    std::os::unix::fs::FileExt::read_exact_at(f, &mut entries, (start / 4096 * 8) as u64).ok()?;
    Some(
        entries
            .chunks_exact(8)
            .map(|e| {
                let mut v = [0u8; 8];
                v.copy_from_slice(e);
                u64::from_le_bytes(v) & PRESENT_OR_SWAPPED != 0
            })
            .collect(),
    )
}

/// Writes guest RAM to `file` from `base`, region after region, leaving a
/// hole (the file stays sparse) wherever 64 KiB are all zero, and ends the
/// file there; returns the bytes written. The vCPUs must be paused. In
/// anonymous RAM, chunks whose pages the guest never touched are zero
/// without being read (a file-backed region's untouched pages are the file's).
pub fn save_guest_memory(mem: &GuestMemoryMmap, file: &std::fs::File, base: u64) -> Result<u64> {
    const CHUNK: usize = 64 << 10;
    /// Page map entries read at once: 2 MiB of RAM.
    const WINDOW: usize = 2 << 20;
    let err = |e: std::io::Error| Error::Memory(format!("writing the memory file: {e}"));
    let (mut offset, mut written) = (base, 0u64);
    for region in mem.iter() {
        let host = region.get_host_address(MemoryRegionAddress(0)).map_err(|e| Error::Memory(format!("no host mapping for a region: {e}")))?;
        let len = region.len() as usize;
        let anonymous = region.file_offset().is_none();
        // SAFETY: the region's mapping is `len` bytes and lives as long as
        // `mem`; the vCPUs are paused, and device threads only read or
        // write guest memory through vm-memory, never free it.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        for (w, window) in bytes.chunks(WINDOW).enumerate() {
            let touched = if anonymous { touched_pages(host as usize + w * WINDOW, window.len().div_ceil(4096)) } else { None };
            for (i, chunk) in window.chunks(CHUNK).enumerate() {
                let pages = i * CHUNK / 4096..(i * CHUNK + chunk.len()).div_ceil(4096);
                if touched.as_ref().is_some_and(|t| t.get(pages).is_some_and(|p| !p.contains(&true))) {
                    continue;
                }
                if chunk.iter().any(|&b| b != 0) {
                    std::os::unix::fs::FileExt::write_all_at(file, chunk, offset + (w * WINDOW + i * CHUNK) as u64).map_err(err)?;
                    written += chunk.len() as u64;
                }
            }
        }
        offset += len as u64;
    }
    file.set_len(offset).map_err(err)?;
    Ok(written)
}

/// Registers every region of `mem` with KVM, one slot each, and marks them
/// mergeable so KSM can share identical pages between guests.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(format!("no host mapping for a region: {e}")))?;
        let size = region.len();
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: size,
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping is owned by `mem`, which the VM keeps alive for
        // as long as the VM fd exists; it does not overlap another slot.
        unsafe { vm.set_user_memory_region(desc) }.map_err(crate::error::kvm("SET_USER_MEMORY_REGION"))?;
        // SAFETY: advice only; the range is a mapping we own. Failure (no KSM
        // in this kernel) is harmless.
        unsafe {
            libc::madvise(host.cast(), size as usize, libc::MADV_MERGEABLE);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_memory_file_copies_back_as_it_was_written() {
        let layout = MemoryLayout::new(64 << 20).unwrap();
        let mem = create_guest_memory(&layout).unwrap();
        let region = mem.iter().next().unwrap();
        let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
        // SAFETY: writes inside the 64 MiB region just mapped, used by nothing else.
        unsafe {
            *host.add(4096) = 7;
            *host.add((40 << 20) + 3) = 9;
        }
        let path = std::env::temp_dir().join(format!("rvirt-mem-{}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let written = save_guest_memory(&mem, &file, 0).unwrap();
        assert_eq!(written, 2 * (64 << 10), "two chunks hold data; the rest are holes");
        for how in [FromFile::Map, FromFile::Copy] {
            let back = guest_memory_from_file(&layout, &file, how, 0).unwrap();
            let r = back.iter().next().unwrap();
            let h = r.get_host_address(MemoryRegionAddress(0)).unwrap();
            // SAFETY: reads inside the region just mapped.
            let (a, b, c) = unsafe { (*h.add(4096), *h.add((40 << 20) + 3), *h.add(30 << 20)) };
            assert_eq!((a, b, c), (7, 9, 0), "{how:?}");
        }
        let e = guest_memory_from_file(&MemoryLayout::new(128 << 20).unwrap(), &file, FromFile::Map, 0).unwrap_err();
        assert!(e.to_string().contains("holds 67108864 bytes"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn untouched_ram_is_skipped_unread_but_a_mapped_snapshot_s_is_not() {
        open_pagemap(None);
        let layout = MemoryLayout::new(64 << 20).unwrap();
        let mem = create_guest_memory(&layout).unwrap();
        let region = mem.iter().next().unwrap();
        let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
        // SAFETY: a write inside the 64 MiB region just mapped, used by nothing else.
        unsafe { *host.add((20 << 20) + 5) = 3 };
        let t = touched_pages(host as usize, 64 << 8).expect("this process reads its own page map");
        assert!(t[(20 << 20) / 4096], "the written page is present");
        assert!(t.iter().filter(|p| **p).count() < 1024, "most of fresh RAM was never touched");
        let dir = std::env::temp_dir();
        let one = dir.join(format!("rvirt-mem-a-{}", std::process::id()));
        let f1 = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&one).unwrap();
        assert_eq!(save_guest_memory(&mem, &f1, 0).unwrap(), 64 << 10);
        // RAM mapped from that file: its untouched pages are the file's, so all of it is read.
        let back = guest_memory_from_file(&layout, &f1, FromFile::Map, 0).unwrap();
        let two = dir.join(format!("rvirt-mem-b-{}", std::process::id()));
        let f2 = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&two).unwrap();
        assert_eq!(save_guest_memory(&back, &f2, 0).unwrap(), 64 << 10, "the byte the file holds is saved again");
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&f2, &mut b, (20 << 20) + 5).unwrap();
        assert_eq!(b[0], 3);
        let _ = std::fs::remove_file(&one);
        let _ = std::fs::remove_file(&two);
    }

    #[test]
    fn host_memory_is_readable() {
        let (ram, _) = host_memory().unwrap();
        assert!(ram > 64 << 20);
    }

    #[test]
    fn refuses_more_than_the_host_has() {
        let (ram, swap) = host_memory().unwrap();
        let e = check_host_can_provide(ram + swap + (1 << 30)).unwrap_err();
        assert!(e.to_string().contains("host has only"), "{e}");
        check_host_can_provide(64 << 20).unwrap();
    }

    #[test]
    fn maps_both_sides_of_the_hole() {
        let layout = MemoryLayout::new((3 << 30) + (64 << 20)).unwrap();
        let mem = create_guest_memory(&layout).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.address_in_range(GuestAddress((4 << 30) + 4096)));
        assert!(!mem.address_in_range(GuestAddress(0xd000_0000)));
    }

    #[test]
    fn regions_start_on_huge_page_boundaries_and_are_advised_for_them() {
        let layout = MemoryLayout::new((3 << 30) + (64 << 20)).unwrap();
        for _ in 0..4 {
            let mem = create_guest_memory(&layout).unwrap();
            for region in mem.iter() {
                let host = region.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
                assert_eq!(host % HUGE_PAGE, 0, "region at {:#x} mapped at {host:#x}", region.start_addr().0);
                if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
                    continue; // no THP in this kernel: nothing to advise
                }
                let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
                let header = format!("{host:x}-");
                let block: Vec<&str> = smaps.lines().skip_while(|l| !l.starts_with(&header)).take(30).collect();
                let flags = block.iter().find(|l| l.starts_with("VmFlags:")).unwrap_or_else(|| panic!("no mapping at {header}"));
                assert!(flags.split_whitespace().any(|f| f == "hg"), "MADV_HUGEPAGE: {flags}");
            }
        }
    }
}
