//! The receive side of virtio-net: frames from the tap straight into the
//! guest's receive buffers.
//!
//! Receive buffers are taken off the ring into a pending list and only put
//! on the used ring once a frame fills them, so nothing is ever handed back
//! to the ring. With `VIRTIO_NET_F_MRG_RXBUF` one frame may span several
//! buffers (the Linux driver then posts page-sized buffers instead of one
//! 64 KiB chain per frame, which costs it 17 page allocations per received
//! ACK): the pending list holds enough buffers for the largest frame the tap
//! can deliver, one `readv` covers all of them, and the header's
//! `num_buffers` says how many the frame used.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{iovecs, VNET_HDR_LEN};
use crate::chain::GuestChain;
use crate::DeviceCounters;

/// Most iovecs one `readv` takes (the kernel's UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;
/// Where `num_buffers` sits in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// What one [`RxQueue::receive`] pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxPass {
    /// Frames delivered to the guest.
    pub frames: usize,
    /// Whether the driver must be interrupted.
    pub notify: bool,
    /// The tap ran dry with buffers in hand: keep polling it. Otherwise the
    /// device is out of buffers (or the ring is broken) and waits for the
    /// driver's next notification; polling a readable tap with nowhere to
    /// put its frames would spin.
    pub poll_tap: bool,
    /// The guest broke the ring (bad avail index or ring addresses).
    pub broken: bool,
}

/// Receive buffers taken off the ring and not yet filled, and the rule for
/// how many a frame needs.
#[derive(Debug)]
pub struct RxQueue {
    mergeable: bool,
    max_frame: usize,
    pending: VecDeque<GuestChain>,
    capacity: usize,
}

enum Fill {
    Enough,
    Short,
    Broken,
}

enum Read {
    /// A frame went into this many buffers.
    Frame(usize),
    /// The read failed and used up one buffer.
    Failed,
    /// The tap has nothing to read.
    Empty,
}

impl RxQueue {
    /// Buffers for frames of at most `max_frame` bytes including the
    /// virtio-net header; `mergeable` when the driver accepted MRG_RXBUF.
    pub fn new(mergeable: bool, max_frame: usize) -> Self {
        Self { mergeable, max_frame, pending: VecDeque::new(), capacity: 0 }
    }

    /// Buffers in hand (taken off the ring, not yet used).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn enough(&self) -> bool {
        if self.mergeable {
            self.capacity >= self.max_frame
        } else {
            !self.pending.is_empty()
        }
    }

    /// Moves frames from `fd` (a tap: one frame per read) into the guest's
    /// buffers until the tap is empty or the buffers run out.
    pub fn receive(&mut self, q: &mut Queue, mem: &GuestMemoryMmap, fd: RawFd, counters: &DeviceCounters) -> RxPass {
        let mut pass = RxPass::default();
        let mut used = 0usize;
        if q.disable_notification(mem).is_err() {
            pass.broken = true;
            return pass;
        }
        loop {
            match self.fill(q, mem, counters, &mut used) {
                Fill::Enough => {}
                Fill::Short => break,
                Fill::Broken => {
                    pass.broken = true;
                    break;
                }
            }
            match self.read_frame(q, mem, fd, counters) {
                Read::Frame(n) => {
                    used += n;
                    pass.frames += 1;
                }
                Read::Failed => used += 1,
                Read::Empty => {
                    pass.poll_tap = true;
                    break;
                }
            }
        }
        if used > 0 {
            pass.notify = q.needs_notification(mem).unwrap_or(true);
        }
        pass
    }

    /// Takes buffers off the ring until a frame fits. Out of buffers, it
    /// re-enables notifications so the driver's next buffer wakes the device.
    fn fill(&mut self, q: &mut Queue, mem: &GuestMemoryMmap, counters: &DeviceCounters, used: &mut usize) -> Fill {
        let mut raced = false;
        while !self.enough() {
            let chain = match q.iter(mem) {
                Ok(mut it) => it.next(),
                Err(_) => return Fill::Broken,
            };
            let Some(chain) = chain else {
                match q.enable_notification(mem) {
                    // The driver added buffers meanwhile: take them. Twice in
                    // a row without a buffer to show for it is a ring we
                    // cannot read, not a race.
                    Ok(true) if !raced => {
                        raced = true;
                        let _ = q.disable_notification(mem);
                        continue;
                    }
                    Ok(false) => return Fill::Short,
                    Ok(true) | Err(_) => return Fill::Broken,
                }
            };
            raced = false;
            let head = chain.head_index();
            match GuestChain::parse(chain, mem) {
                Ok(c) if c.writable_len() >= VNET_HDR_LEN => {
                    self.capacity += c.writable_len();
                    self.pending.push_back(c);
                }
                _ => {
                    // Unusable (outside memory, no room for a header): give it back empty.
                    counters.error();
                    if q.add_used(mem, head, 0).is_err() {
                        tracing::warn!("virtio-net: guest offered an invalid descriptor head {head}");
                    }
                    *used += 1;
                }
            }
        }
        Fill::Enough
    }

    fn read_frame(&mut self, q: &mut Queue, mem: &GuestMemoryMmap, fd: RawFd, counters: &DeviceCounters) -> Read {
        let take = if self.mergeable { self.pending.len() } else { 1 };
        let mut iov = Vec::new();
        for c in self.pending.iter().take(take) {
            // Checked against memory when the chain was parsed.
            let Ok(slices) = c.writable_slices(mem, 0, c.writable_len()) else { break };
            iov.extend(iovecs(&slices));
            if iov.len() >= MAX_IOVECS {
                iov.truncate(MAX_IOVECS);
                break;
            }
        }
        let n = loop {
            // SAFETY: readv into guest buffers checked against guest memory;
            // the iovecs do not outlive `mem`'s borrow.
            let n = unsafe { libc::readv(fd, iov.as_ptr(), iov.len() as i32) };
            if n >= 0 {
                break n as usize;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return Read::Empty,
                _ => break 0,
            }
        };
        if n == 0 {
            // A failing tap: use up one buffer, so a persistent error ends
            // when the ring is empty instead of spinning.
            counters.error();
            self.complete(q, mem, &[0]);
            return Read::Failed;
        }
        let mut lens = Vec::new();
        let mut left = n;
        for c in self.pending.iter().take(take) {
            let l = left.min(c.writable_len());
            lens.push(l);
            left -= l;
            if left == 0 {
                break;
            }
        }
        if n >= VNET_HDR_LEN {
            if let Some(first) = self.pending.front() {
                let _ = first.write(mem, NUM_BUFFERS_OFFSET, &(lens.len() as u16).to_le_bytes());
            }
        }
        self.complete(q, mem, &lens);
        counters.request(n as u64, 0);
        Read::Frame(lens.len())
    }

    /// Puts the first `lens.len()` pending buffers on the used ring with those lengths.
    fn complete(&mut self, q: &mut Queue, mem: &GuestMemoryMmap, lens: &[usize]) {
        for &len in lens {
            let Some(c) = self.pending.pop_front() else { return };
            self.capacity -= c.writable_len();
            if q.add_used(mem, c.head, len as u32).is_err() {
                tracing::warn!("virtio-net: guest offered an invalid descriptor head {}", c.head);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, OwnedFd};

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::chain::tests::{memory, F_WRITE};

    fn frames() -> (OwnedFd, OwnedFd) {
        crate::fuzzing::stand_in_tap().expect("socketpair")
    }

    fn send(fd: &OwnedFd, frame: &[u8]) {
        // SAFETY: writes a buffer we own.
        let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        assert_eq!(n as usize, frame.len());
    }

    /// A frame: a zero virtio-net header, then `len - 12` numbered bytes.
    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| if i < VNET_HDR_LEN { 0 } else { (i as u8).wrapping_add(seed) }).collect()
    }

    /// A 64-entry receive ring with one single-descriptor buffer of `len`
    /// bytes per entry of `lens`, at 0x10000 + 0x2000 * i.
    fn ring<'a>(mem: &'a GuestMemoryMmap, lens: &[u32], event_idx: bool) -> (MockSplitQueue<'a, GuestMemoryMmap>, Queue) {
        let mock = MockSplitQueue::new(mem, 64);
        for (i, &len) in lens.iter().enumerate() {
            let d = RawDescriptor::from(Descriptor::new(0x10000 + 0x2000 * i as u64, len, F_WRITE, 0));
            mock.desc_table().store(i as u16, d).unwrap();
            mock.avail().ring().ref_at(i).unwrap().store(i as u16);
        }
        mock.avail().idx().store(lens.len() as u16);
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_event_idx(event_idx);
        (mock, q)
    }

    fn used(mock: &MockSplitQueue<'_, GuestMemoryMmap>, i: u16) -> (u32, u32) {
        let e = mock.used().ring().ref_at(i as usize).unwrap().load();
        (e.id(), e.len())
    }

    fn guest_bytes(mem: &GuestMemoryMmap, buffers: &[(usize, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(i, len) in buffers {
            let mut b = vec![0u8; len as usize];
            mem.read_slice(&mut b, GuestAddress(0x10000 + 0x2000 * i as u64)).unwrap();
            out.extend(b);
        }
        out
    }

    #[test]
    fn mergeable_frames_span_buffers_and_say_how_many() {
        let mem = memory();
        let (mock, mut q) = ring(&mem, &[1000; 16], true);
        let (tap, host) = frames();
        let counters = DeviceCounters::default();
        let mut rx = RxQueue::new(true, 3000);
        let (big, small) = (frame(2500, 1), frame(60, 7));
        send(&host, &big);
        send(&host, &small);
        let pass = rx.receive(&mut q, &mem, tap.as_raw_fd(), &counters);
        assert_eq!((pass.frames, pass.poll_tap, pass.broken), (2, true, false));
        assert!(pass.notify);
        // The big frame used buffers 0-2 (1000 + 1000 + 500), the small one buffer 3.
        assert_eq!(mock.used().idx().load(), 4);
        assert_eq!([used(&mock, 0), used(&mock, 1), used(&mock, 2), used(&mock, 3)], [(0, 1000), (1, 1000), (2, 500), (3, 60)]);
        let got = guest_bytes(&mem, &[(0, 1000), (1, 1000), (2, 500)]);
        assert_eq!(got[VNET_HDR_LEN..], big[VNET_HDR_LEN..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers of the big frame");
        let got = guest_bytes(&mem, &[(3, 60)]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(got[VNET_HDR_LEN..], small[VNET_HDR_LEN..]);
        let c = counters.snapshot();
        assert_eq!((c.requests, c.bytes_to_guest, c.errors), (2, 2560, 0));
        // Enough buffers for the next largest frame stay in hand, none handed back.
        assert_eq!(rx.pending(), 3);
    }

    #[test]
    fn out_of_buffers_waits_for_the_driver_and_frames_stay_queued() {
        let mem = memory();
        // Two buffers hold 2000 bytes; frames may be 3000: not enough to read.
        let (mock, mut q) = ring(&mem, &[1000, 1000], true);
        let (tap, host) = frames();
        let counters = DeviceCounters::default();
        let mut rx = RxQueue::new(true, 3000);
        send(&host, &frame(100, 0));
        let pass = rx.receive(&mut q, &mem, tap.as_raw_fd(), &counters);
        assert_eq!(pass, RxPass::default(), "no frame, no interrupt, tap not polled");
        assert_eq!(rx.pending(), 2);
        // The device asked to be told about the next buffer (avail_event = avail idx).
        let avail_event = mem.read_obj::<u16>(GuestAddress(mock.used_addr().0 + 4 + 8 * 64)).unwrap();
        assert_eq!(avail_event, 2);
        // The driver adds a third buffer: the frame goes in.
        let d = RawDescriptor::from(Descriptor::new(0x10000 + 0x2000 * 2, 1000, F_WRITE, 0));
        mock.desc_table().store(2, d).unwrap();
        mock.avail().ring().ref_at(2).unwrap().store(2);
        mock.avail().idx().store(3);
        let pass = rx.receive(&mut q, &mem, tap.as_raw_fd(), &counters);
        assert_eq!((pass.frames, pass.poll_tap), (1, false), "one frame in; then short of a full frame's room again");
        assert_eq!(used(&mock, 0), (0, 100));
    }

    #[test]
    fn without_mergeable_buffers_each_frame_takes_one_buffer() {
        let mem = memory();
        let (mock, mut q) = ring(&mem, &[4000, 4000, 4000], false);
        let (tap, host) = frames();
        let counters = DeviceCounters::default();
        let mut rx = RxQueue::new(false, 65562);
        for s in 0..3 {
            send(&host, &frame(1500, s));
        }
        send(&host, &frame(1500, 9));
        let pass = rx.receive(&mut q, &mem, tap.as_raw_fd(), &counters);
        assert_eq!((pass.frames, pass.poll_tap, pass.notify), (3, false, true));
        for i in 0..3u16 {
            assert_eq!(used(&mock, i), (i as u32, 1500));
            let got = guest_bytes(&mem, &[(i as usize, 1500)]);
            assert_eq!(got[VNET_HDR_LEN..], frame(1500, i as u8)[VNET_HDR_LEN..]);
            assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        }
        // A frame larger than the buffer is cut to it (the tap drops the rest).
        let (mock, mut q) = ring(&mem, &[1000], false);
        let pass = rx.receive(&mut q, &mem, tap.as_raw_fd(), &counters);
        assert_eq!(pass.frames, 1);
        assert_eq!(used(&mock, 0), (0, 1000));
    }

    #[test]
    fn hostile_buffers_are_returned_empty_and_never_written() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        // 0: outside guest memory; 1: device-readable only; 2: too short for a header;
        // 3: a good buffer.
        let descs = [(0xfff_0000u64, 4096u32, F_WRITE), (0x10000, 4096, 0), (0x12000, 8, F_WRITE), (0x14000, 4096, F_WRITE)];
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            mock.desc_table().store(i as u16, RawDescriptor::from(Descriptor::new(addr, len, flags, 0))).unwrap();
            mock.avail().ring().ref_at(i).unwrap().store(i as u16);
        }
        mock.avail().idx().store(4);
        let mut q = mock.create_queue().unwrap();
        let (tap, host) = frames();
        let counters = DeviceCounters::default();
        let mut rx = RxQueue::new(true, 2000);
        send(&host, &frame(64, 3));
        let pass = rx.receive(&mut q, &mem, tap.as_raw_fd(), &counters);
        assert_eq!(pass.frames, 1);
        assert_eq!([used(&mock, 0), used(&mock, 1), used(&mock, 2), used(&mock, 3)], [(0, 0), (1, 0), (2, 0), (3, 64)]);
        assert_eq!(counters.snapshot().errors, 3);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x12000)).unwrap(), 0, "the 8-byte buffer is untouched");

        // An available index further ahead than the ring is long: broken, no spin.
        let (mock, mut q) = ring(&mem, &[1000], true);
        mock.avail().idx().store(200);
        let pass = rx.receive(&mut q, &mem, tap.as_raw_fd(), &counters);
        assert!(pass.broken && !pass.poll_tap);
    }

    #[test]
    fn a_failing_tap_uses_up_buffers_instead_of_spinning() {
        let mem = memory();
        let (mock, mut q) = ring(&mem, &[1000, 1000], false);
        let counters = DeviceCounters::default();
        let mut rx = RxQueue::new(false, 1530);
        // A descriptor that is not open: every read fails.
        let pass = rx.receive(&mut q, &mem, -1, &counters);
        assert_eq!((pass.frames, pass.poll_tap, pass.notify), (0, false, true));
        assert_eq!([used(&mock, 0), used(&mock, 1)], [(0, 0), (1, 0)]);
        assert_eq!(counters.snapshot().errors, 2);
    }
}
