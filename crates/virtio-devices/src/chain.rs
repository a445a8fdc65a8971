//! A descriptor chain checked against guest memory, seen as two byte
//! streams: what the driver gave the device to read, and what it gave the
//! device to write. Devices address the streams by offset, so they never
//! depend on how the driver split a request into descriptors.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Why a chain cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A buffer is not inside guest RAM.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The spec puts every device-readable buffer before the writable ones.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// The request is shorter than its format needs.
    #[error("request is {have} bytes; needs {need}")]
    TooShort {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
}

/// A validated chain: its head index and its readable and writable buffers.
#[derive(Debug)]
pub struct GuestChain {
    /// Head descriptor index, returned to the used ring.
    pub head: u16,
    readable: Vec<(GuestAddress, usize)>,
    writable: Vec<(GuestAddress, usize)>,
    readable_len: usize,
    writable_len: usize,
}

impl GuestChain {
    /// Walks `chain` (bounded by `virtio-queue`: no loops, at most a queue's
    /// worth of descriptors) and checks every buffer lies in `mem`.
    pub fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Result<Self, ChainError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let mut c = Self { head: chain.head_index(), readable: Vec::new(), writable: Vec::new(), readable_len: 0, writable_len: 0 };
        for d in chain {
            let len = d.len() as usize;
            if len > 0 && mem.get_slice(d.addr(), len).is_err() {
                return Err(ChainError::OutsideMemory { addr: d.addr().0, len: d.len() });
            }
            if d.is_write_only() {
                c.writable.push((d.addr(), len));
                c.writable_len += len;
            } else {
                if !c.writable.is_empty() {
                    return Err(ChainError::ReadableAfterWritable);
                }
                c.readable.push((d.addr(), len));
                c.readable_len += len;
            }
        }
        Ok(c)
    }

    /// Total bytes the device may read.
    pub fn readable_len(&self) -> usize {
        self.readable_len
    }

    /// Total bytes the device may write.
    pub fn writable_len(&self) -> usize {
        self.writable_len
    }

    fn slices<'a>(
        list: &[(GuestAddress, usize)],
        total: usize,
        mem: &'a GuestMemoryMmap,
        offset: usize,
        len: usize,
    ) -> Result<Vec<VolatileSlice<'a, ()>>, ChainError> {
        let end = offset.checked_add(len).filter(|e| *e <= total).ok_or(ChainError::TooShort {
            need: offset.saturating_add(len),
            have: total,
        })?;
        let mut out = Vec::new();
        let mut pos = 0usize;
        for &(addr, n) in list {
            let (start, stop) = (pos.max(offset), (pos + n).min(end));
            if start < stop {
                let at = GuestAddress(addr.0 + (start - pos) as u64);
                let s = mem
                    .get_slice(at, stop - start)
                    .map_err(|_| ChainError::OutsideMemory { addr: at.0, len: (stop - start) as u32 })?;
                out.push(s);
            }
            pos += n;
            if pos >= end {
                break;
            }
        }
        Ok(out)
    }

    /// Guest memory slices covering `len` readable bytes from `offset`.
    pub fn readable_slices<'a>(&self, mem: &'a GuestMemoryMmap, offset: usize, len: usize) -> Result<Vec<VolatileSlice<'a, ()>>, ChainError> {
        Self::slices(&self.readable, self.readable_len, mem, offset, len)
    }

    /// Guest memory slices covering `len` writable bytes from `offset`.
    pub fn writable_slices<'a>(&self, mem: &'a GuestMemoryMmap, offset: usize, len: usize) -> Result<Vec<VolatileSlice<'a, ()>>, ChainError> {
        Self::slices(&self.writable, self.writable_len, mem, offset, len)
    }

    /// Copies readable bytes at `offset` into `buf`.
    pub fn read(&self, mem: &GuestMemoryMmap, offset: usize, buf: &mut [u8]) -> Result<(), ChainError> {
        let mut done = 0;
        for s in self.readable_slices(mem, offset, buf.len())? {
            s.copy_to(&mut buf[done..done + s.len()]);
            done += s.len();
        }
        Ok(())
    }

    /// Copies `buf` into the writable bytes at `offset`.
    pub fn write(&self, mem: &GuestMemoryMmap, offset: usize, buf: &[u8]) -> Result<(), ChainError> {
        let mut done = 0;
        for s in self.writable_slices(mem, offset, buf.len())? {
            s.copy_from(&buf[done..done + s.len()]);
            done += s.len();
        }
        Ok(())
    }
}

/// A request's buffers are written by the time its chain goes: the pages
/// are marked for a live migration (KVM does not see the VMM's writes).
impl Drop for GuestChain {
    fn drop(&mut self) {
        for (addr, len) in &self.writable {
            rvirt_devices::dirty::mark(addr.0, *len as u64);
        }
    }
}

/// The bytes of `s` as a mutable slice, for handing guest buffers to
/// `read(2)`-like calls without a copy.
///
/// # Safety
/// The guest may change the memory concurrently; callers only pass the
/// slice to I/O that treats it as opaque bytes and do not keep it.
pub unsafe fn as_mut_bytes<'a>(s: &VolatileSlice<'a, ()>) -> &'a mut [u8] {
    // SAFETY: the slice was bounds-checked by vm-memory against a live mapping.
    unsafe { std::slice::from_raw_parts_mut(s.ptr_guard_mut().as_ptr(), s.len()) }
}

/// The bytes of `s` as a shared slice (see [`as_mut_bytes`]).
///
/// # Safety
/// As for [`as_mut_bytes`].
pub unsafe fn as_bytes<'a>(s: &VolatileSlice<'a, ()>) -> &'a [u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts(s.ptr_guard().as_ptr(), s.len()) }
}

#[cfg(test)]
pub(crate) mod tests {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    pub(crate) const F_NEXT: u16 = 1;
    pub(crate) const F_WRITE: u16 = 2;

    pub(crate) fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// Builds a queue holding one chain of `descs` (addr, len, flags); NEXT
    /// links are added automatically. Returns the queue ready to pop.
    pub(crate) fn queue_with_chain(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Queue {
        let mock = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < descs.len() { F_NEXT } else { 0 };
                RawDescriptor::from(Descriptor::new(addr, len, flags | next, (i + 1) as u16))
            })
            .collect();
        mock.build_desc_chain(&raw).unwrap();
        mock.create_queue().unwrap()
    }

    #[test]
    fn streams_span_descriptors() {
        let mem = memory();
        mem.write_slice(&[1, 2, 3], GuestAddress(0x8000)).unwrap();
        mem.write_slice(&[4, 5], GuestAddress(0x9000)).unwrap();
        let mut q = queue_with_chain(&mem, &[(0x8000, 3, 0), (0x9000, 2, 0), (0xa000, 4, F_WRITE), (0xb000, 1, F_WRITE)]);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        let c = GuestChain::parse(chain, &mem).unwrap();
        assert_eq!((c.readable_len(), c.writable_len()), (5, 5));
        let mut b = [0u8; 3];
        c.read(&mem, 2, &mut b).unwrap();
        assert_eq!(b, [3, 4, 5]);
        c.write(&mem, 3, &[9, 8]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa003)).unwrap(), 9);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xb000)).unwrap(), 8);
        assert!(matches!(c.read(&mem, 4, &mut b), Err(ChainError::TooShort { .. })));
        assert!(c.write(&mem, usize::MAX, &[1]).is_err());
        assert_eq!(q.size(), 16);
    }

    #[test]
    fn rejects_buffers_outside_memory_and_misordered_chains() {
        let mem = memory();
        let mut q = queue_with_chain(&mem, &[(0x8000, 16, 0), (0xff000, 0x2000, F_WRITE)]);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        assert!(matches!(GuestChain::parse(chain, &mem), Err(ChainError::OutsideMemory { .. })));
        let mut q = queue_with_chain(&mem, &[(0x8000, 16, F_WRITE), (0x9000, 16, 0)]);
        let chain = q.iter(&mem).unwrap().next().unwrap();
        assert_eq!(GuestChain::parse(chain, &mem).unwrap_err(), ChainError::ReadableAfterWritable);
    }
}
