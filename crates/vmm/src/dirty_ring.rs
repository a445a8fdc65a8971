//! KVM's dirty ring, opt-in (`--dirty-ring ENTRIES`, QEMU's
//! `-accel kvm,dirty-ring-size=`): instead of a bitmap per memory slot that
//! a migration fetches and scans whole every pass, each vCPU gets a ring of
//! the pages it dirtied, shared with KVM. The ring must be enabled before
//! any vCPU exists, so it is chosen when the VM is built. A migration
//! harvests every ring each pass; a vCPU whose ring fills exits
//! (`KVM_EXIT_DIRTY_RING_FULL`) and harvests its own before it runs on.
//! Harvested entries are handed back with `KVM_RESET_DIRTY_RINGS`, which
//! also makes KVM log those pages again.

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_dirty_gfn;
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{Error, Result};

/// The bytes of one ring entry.
const ENTRY: usize = std::mem::size_of::<kvm_dirty_gfn>();
/// The entry holds a page KVM dirtied.
const GFN_DIRTY: u32 = 1;
/// The entry was harvested: KVM may reuse it at the next reset.
const GFN_RESET: u32 = 2;
/// The fewest and most entries a ring may have here (QEMU's default is 4096).
pub const ENTRIES: std::ops::RangeInclusive<u32> = 1024..=65536;

/// The ioctl numbers kvm-ioctls does not wrap.
mod ioctls {
    vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);
}

/// Refuses a ring size KVM cannot take: not a power of two, or outside [`ENTRIES`].
pub fn check_entries(entries: u32) -> Result<()> {
    if !entries.is_power_of_two() || !ENTRIES.contains(&entries) {
        return Err(Error::Config(format!("--dirty-ring {entries}: a power of two from {} to {}", ENTRIES.start(), ENTRIES.end())));
    }
    Ok(())
}

/// Turns the dirty ring on for `vm` (before its vCPUs exist), `entries`
/// per vCPU, or says why this host's KVM cannot.
pub fn enable(kvm: &Kvm, vm: &VmFd, entries: u32) -> Result<()> {
    check_entries(entries)?;
    let bytes = entries as usize * ENTRY;
    let max = usize::try_from(kvm.check_extension_int(Cap::DirtyLogRing)).unwrap_or(0);
    if max == 0 {
        return Err(Error::Config("--dirty-ring: this host's KVM has no dirty ring".into()));
    }
    if bytes > max {
        return Err(Error::Config(format!("--dirty-ring {entries}: this host's KVM allows {} entries at most", max / ENTRY)));
    }
    let cap = kvm_bindings::kvm_enable_cap { cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING, args: [bytes as u64, 0, 0, 0], ..Default::default() };
    vm.enable_cap(&cap).map_err(crate::error::kvm("ENABLE_CAP (dirty ring)"))
}

/// One vCPU's ring, mapped from its descriptor.
struct Ring {
    entries: *mut kvm_dirty_gfn,
    count: u32,
    /// The next entry to harvest (counts on; taken modulo `count`).
    next: u32,
}

// SAFETY: the mapping is shared with KVM only; every access goes through
// the `Mutex` around the ring, so one thread at a time harvests it.
unsafe impl Send for Ring {}

impl Ring {
    fn map(vcpu: &VcpuFd, count: u32) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let len = count as usize * ENTRY;
        let offset = kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * 4096;
        // SAFETY: maps `len` bytes of the vCPU's ring at the offset KVM
        // gives it; the result is checked and unmapped on drop.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, vcpu.as_raw_fd(), offset) };
        if p == libc::MAP_FAILED {
            return Err(Error::Memory(format!("mapping a vCPU's dirty ring: {}", std::io::Error::last_os_error())));
        }
        Ok(Self { entries: p.cast(), count, next: 0 })
    }

    /// Moves every entry KVM filled into `out` as (slot, page offset) and
    /// marks it harvested; stops at the first entry KVM has not filled.
    fn harvest(&mut self, out: &mut Vec<(u32, u64)>) {
        for _ in 0..self.count {
            // SAFETY: `next % count` indexes the mapped ring; fields are read
            // and written volatile because KVM writes them concurrently.
            let e = unsafe { self.entries.add((self.next % self.count) as usize) };
            let flags = unsafe { std::ptr::addr_of!((*e).flags).read_volatile() };
            if flags & GFN_DIRTY == 0 {
                break;
            }
            // KVM publishes the slot and offset before the flag.
            fence(Ordering::Acquire);
            // SAFETY: as above.
            let (slot, offset) = unsafe { (std::ptr::addr_of!((*e).slot).read_volatile(), std::ptr::addr_of!((*e).offset).read_volatile()) };
            out.push((slot, offset));
            fence(Ordering::Release);
            // SAFETY: as above; KVM reads the flag back at the next reset.
            unsafe { std::ptr::addr_of_mut!((*e).flags).write_volatile(GFN_RESET) };
            self.next = self.next.wrapping_add(1);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.entries.cast(), self.count as usize * ENTRY) };
    }
}

/// Every vCPU's ring of a VM, and what was harvested and not yet taken.
pub struct DirtyRings {
    vm: Arc<VmFd>,
    rings: Vec<Mutex<Ring>>,
    /// The guest-physical address where each memory slot starts.
    slot_starts: Vec<u64>,
    /// Harvested by vCPUs whose ring filled: (slot, page offset).
    harvested: Mutex<Vec<(u32, u64)>>,
}

impl DirtyRings {
    /// Maps the ring of each of `vcpus` (enabled with [`enable`] for `entries`).
    pub fn map(vm: Arc<VmFd>, mem: &GuestMemoryMmap, vcpus: &[VcpuFd], entries: u32) -> Result<Self> {
        let rings = vcpus.iter().map(|v| Ring::map(v, entries).map(Mutex::new)).collect::<Result<Vec<_>>>()?;
        Ok(Self { vm, rings, slot_starts: mem.iter().map(|r| r.start_addr().0).collect(), harvested: Mutex::default() })
    }

    /// Called by vCPU `id` when its ring is full: harvests it so it can run on.
    pub fn harvest_full(&self, id: usize) -> Result<()> {
        let mut got = Vec::new();
        if let Some(r) = self.rings.get(id) {
            r.lock().unwrap_or_else(|p| p.into_inner()).harvest(&mut got);
        }
        self.harvested.lock().unwrap_or_else(|p| p.into_inner()).extend(got);
        self.reset()
    }

    /// Every page dirtied since the last call, as guest-physical addresses
    /// (unsorted, maybe repeated).
    pub fn take(&self) -> Result<Vec<u64>> {
        let mut got = std::mem::take(&mut *self.harvested.lock().unwrap_or_else(|p| p.into_inner()));
        for r in &self.rings {
            r.lock().unwrap_or_else(|p| p.into_inner()).harvest(&mut got);
        }
        self.reset()?;
        let mut out = Vec::with_capacity(got.len());
        for (slot, page) in got {
            // The address space is the slot's high half; rvirt uses only the first.
            match self.slot_starts.get((slot & 0xffff) as usize) {
                Some(start) if slot >> 16 == 0 => out.push(start + page * 4096),
                _ => return Err(Error::Memory(format!("the dirty ring named slot {slot:#x}, which this VM does not have"))),
            }
        }
        Ok(out)
    }

    fn reset(&self) -> Result<()> {
        // SAFETY: an ioctl without argument on the VM's descriptor.
        let r = unsafe { vmm_sys_util::ioctl::ioctl(&*self.vm, ioctls::KVM_RESET_DIRTY_RINGS()) };
        if r < 0 {
            return Err(Error::Memory(format!("KVM_RESET_DIRTY_RINGS: {}", std::io::Error::last_os_error())));
        }
        Ok(())
    }
}
