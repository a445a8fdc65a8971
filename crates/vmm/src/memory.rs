//! Guest RAM: anonymous host mappings registered with KVM as memory slots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use rvirt_arch::MemoryLayout;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

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

/// Maps guest RAM for `layout` (anonymous, private, not reserved up front).
pub fn create_guest_memory(layout: &MemoryLayout) -> Result<GuestMemoryMmap> {
    check_host_can_provide(layout.ram_bytes)?;
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ram_ranges()
        .into_iter()
        .map(|(start, len)| usize::try_from(len).map(|l| (GuestAddress(start), l)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Memory("size does not fit this host's address space".into()))?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory(format!("cannot map {} MiB: {e}", layout.ram_bytes >> 20)))
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
}
