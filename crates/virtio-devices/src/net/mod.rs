//! virtio-net over a Linux tap device.
//!
//! Frames move between the tap and guest memory with `readv`/`writev`
//! straight on the guest's buffers, each prefixed by the 12-byte virtio-net
//! header that the tap understands (`IFF_VNET_HDR`), so checksum and TSO
//! offloads pass through: the guest sends 64 KiB TCP segments and the host
//! kernel segments (or never needs to), and the tap delivers large frames to
//! the guest when the guest accepted `GUEST_TSO*`. Receive buffers may be
//! merged (`MRG_RXBUF`, see [`rx`]).

pub mod rx;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use rvirt_devices::bus::lock;
use vmm_sys_util::epoll::EventSet;

use crate::chain::GuestChain;
use crate::worker::{serve_queue_notifying, EventLoop, Worker};
use crate::{device_type, ActivateContext, DeviceCounters, Interrupt, InterruptKind, VirtioDevice, COMMON_FEATURES};
use rx::RxQueue;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_GUEST_ECN: u64 = 1 << 9;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_HOST_ECN: u64 = 1 << 13;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
/// Config `status`: link up.
const S_LINK_UP: u16 = 1;
pub use rvirt_tap::{Tap, VNET_HDR_LEN};
use rvirt_tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};
const QUEUE_SIZE: u16 = 256;
/// The largest frame a tap delivers to a guest that accepted GSO: a 64 KiB
/// packet, its Ethernet and VLAN headers and the virtio-net header.
const MAX_GSO_FRAME: usize = VNET_HDR_LEN + 65536 + 14 + 4;

fn iovecs(slices: &[vm_memory::VolatileSlice<'_, ()>]) -> Vec<libc::iovec> {
    slices.iter().map(|s| libc::iovec { iov_base: s.ptr_guard_mut().as_ptr().cast(), iov_len: s.len() }).collect()
}

/// Controls a network device's link from the VMM's API thread.
#[derive(Clone)]
pub struct NetHandle {
    status: Arc<AtomicU16>,
    interrupt: Arc<Mutex<Option<Arc<dyn Interrupt>>>>,
}

impl NetHandle {
    /// Sets the link up or down as the guest sees it.
    pub fn set_link(&self, up: bool) {
        self.status.store(if up { S_LINK_UP } else { 0 }, Ordering::SeqCst);
        if let Some(i) = lock(&self.interrupt).as_ref() {
            i.trigger(InterruptKind::Config);
        }
    }

    /// Whether the link is up.
    pub fn link_up(&self) -> bool {
        self.status.load(Ordering::SeqCst) & S_LINK_UP != 0
    }
}

/// A network card backed by a tap.
pub struct VirtioNet {
    tap: Arc<Tap>,
    mac: [u8; 6],
    handle: NetHandle,
    counters: Arc<DeviceCounters>,
    worker: Option<Worker>,
}

impl VirtioNet {
    /// A card on `tap` with address `mac`, link up.
    pub fn new(tap: Arc<Tap>, mac: [u8; 6]) -> (Self, NetHandle) {
        let handle = NetHandle { status: Arc::new(AtomicU16::new(S_LINK_UP)), interrupt: Arc::default() };
        (Self { tap, mac, handle: handle.clone(), counters: Arc::default(), worker: None }, handle)
    }
}

/// Tokens of the worker's event loop.
const RX_QUEUE: u64 = 0;
const TX_QUEUE: u64 = 1;
const TAP: u64 = 2;
const KILL: u64 = 3;

struct NetWorker {
    mem: vm_memory::GuestMemoryMmap,
    tap: Arc<Tap>,
    interrupt: Arc<dyn Interrupt>,
    counters: Arc<DeviceCounters>,
    rx: RxQueue,
}

impl NetWorker {
    /// Moves frames from the tap into receive buffers; returns whether to
    /// keep polling the tap (see [`rx::RxPass::poll_tap`]).
    fn receive(&mut self, q: &mut virtio_queue::Queue) -> bool {
        let pass = self.rx.receive(q, &self.mem, self.tap.as_raw_fd(), &self.counters);
        if pass.notify {
            self.interrupt.trigger(InterruptKind::Queue(0));
        }
        pass.poll_tap
    }

    /// Writes the guest's frames to the tap; returns whether the tap refused
    /// one for now (`EAGAIN`): that frame stays on the ring and the worker
    /// waits for the tap to become writable instead of dropping it.
    fn transmit(&self, q: &mut virtio_queue::Queue) -> bool {
        let mut tap_full = false;
        let interrupt = &self.interrupt;
        serve_queue_notifying(q, &self.mem, |chain| {
            let Ok(c) = GuestChain::parse(chain, &self.mem) else {
                self.counters.error();
                return Some(0);
            };
            let Ok(slices) = c.readable_slices(&self.mem, 0, c.readable_len()) else {
                self.counters.error();
                return Some(0);
            };
            let iov = iovecs(&slices);
            // SAFETY: writev from checked guest buffers.
            let n = unsafe { libc::writev(self.tap.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            if n >= 0 {
                self.counters.request(0, c.readable_len() as u64);
            } else if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
                tap_full = true;
                return None;
            } else {
                // A frame the tap rejects (malformed header, link down) is dropped, as a wire would.
                self.counters.error();
            }
            Some(0)
        }, || interrupt.trigger(InterruptKind::Queue(1)));
        tap_full
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        device_type::NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES
            | F_CSUM
            | F_GUEST_CSUM
            | F_MAC
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_MRG_RXBUF
            | F_STATUS
    }
    fn config_len(&self) -> usize {
        12
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 12];
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&self.handle.status.load(Ordering::SeqCst).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        crate::read_config_bytes(&c, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), String> {
        let ActivateContext { mem, interrupt, queues, features } = ctx;
        let mut queues: Vec<_> = queues.into_iter().take(2).collect();
        if queues.len() != 2 {
            return Err("virtio-net needs its receive and transmit queues".into());
        }
        let mut offload = 0;
        for (feature, flag) in
            [(F_GUEST_CSUM, TUN_F_CSUM), (F_GUEST_TSO4, TUN_F_TSO4), (F_GUEST_TSO6, TUN_F_TSO6), (F_GUEST_ECN, TUN_F_TSO_ECN)]
        {
            if features & feature != 0 {
                offload |= flag;
            }
        }
        self.tap.set_offload(offload).map_err(|e| format!("tap {}: setting offloads: {e}", self.tap.name()))?;
        *lock(&self.handle.interrupt) = Some(interrupt.clone());
        // Without GSO the tap's frames are at most its MTU plus Ethernet and VLAN headers.
        let mtu = self.tap.mtu();
        let mut max_frame = VNET_HDR_LEN + 14 + 4 + mtu;
        if features & (F_GUEST_TSO4 | F_GUEST_TSO6) != 0 {
            max_frame = max_frame.max(MAX_GSO_FRAME);
        }
        let rx = RxQueue::new(features & F_MRG_RXBUF != 0, max_frame);
        let mut w = NetWorker { mem, tap: self.tap.clone(), interrupt, counters: self.counters.clone(), rx };
        self.worker = Some(
            Worker::spawn(&format!("virtio-net-{}", self.tap.name()), move |kill| {
                let Ok(mut events) = EventLoop::new() else { return };
                let ok = events.add(&queues[0].event, RX_QUEUE).is_ok()
                    && events.add(&queues[1].event, TX_QUEUE).is_ok()
                    && events.add(&*w.tap, TAP).is_ok()
                    && events.add(&kill, KILL).is_ok();
                if !ok {
                    return;
                }
                let tap_fd = w.tap.as_raw_fd();
                // What the tap is watched for: input while there are receive
                // buffers, output while a frame waits for room.
                let (mut polling_rx, mut tx_waiting) = (true, false);
                while let Ok(tokens) = events.wait() {
                    if tokens.contains(&KILL) {
                        return;
                    }
                    let tap = tokens.contains(&TAP);
                    let tx_kick = tokens.contains(&TX_QUEUE);
                    if tx_kick {
                        let _ = queues[1].event.read();
                    }
                    let was_waiting = tx_waiting;
                    if tx_kick || (tap && tx_waiting) {
                        tx_waiting = w.transmit(&mut queues[1].queue);
                    }
                    let rx_kick = tokens.contains(&RX_QUEUE);
                    if rx_kick {
                        let _ = queues[0].event.read();
                    }
                    let was_polling = polling_rx;
                    if (tap && polling_rx) || rx_kick {
                        polling_rx = w.receive(&mut queues[0].queue);
                    }
                    if polling_rx != was_polling || tx_waiting != was_waiting {
                        let mut ev = EventSet::empty();
                        if polling_rx {
                            ev |= EventSet::IN;
                        }
                        if tx_waiting {
                            ev |= EventSet::OUT;
                        }
                        let _ = events.modify(tap_fd, ev, TAP);
                    }
                }
            })
            .map_err(|e| e.to_string())?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        *lock(&self.handle.interrupt) = None;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }

    fn save_state(&self) -> crate::DeviceState {
        crate::DeviceState::Net { link_up: self.handle.link_up() }
    }

    fn restore_state(&mut self, state: &crate::DeviceState) -> Result<(), String> {
        let crate::DeviceState::Net { link_up } = state else {
            return Err(format!("saved state {state:?} is not a network card's"));
        };
        self.handle.status.store(if *link_up { S_LINK_UP } else { 0 }, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod transmit_tests {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicUsize;

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::chain::tests::memory;
    use crate::net::rx::RxQueue;

    #[derive(Default)]
    struct CountingInterrupt(AtomicUsize);
    impl Interrupt for CountingInterrupt {
        fn trigger(&self, _: InterruptKind) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A full tap (`EAGAIN`) leaves the frame on the ring and says so; once
    /// the host side reads, the same frame goes out whole and is returned.
    #[test]
    fn a_full_tap_holds_the_frame_instead_of_dropping_it() {
        let mem = memory();
        let (tap_end, host) = crate::fuzzing::stand_in_tap().expect("socketpair");
        // Fill the stand-in tap until it refuses.
        let filler = [0u8; 4096];
        // SAFETY: writes a buffer we own to a non-blocking socket.
        while unsafe { libc::write(tap_end.as_raw_fd(), filler.as_ptr().cast(), filler.len()) } > 0 {}
        let frame: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
        mem.write_slice(&frame, GuestAddress(0x10000)).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.desc_table().store(0, RawDescriptor::from(Descriptor::new(0x10000, frame.len() as u32, 0, 0))).unwrap();
        mock.avail().ring().ref_at(0).unwrap().store(0);
        mock.avail().idx().store(1);
        let mut q: virtio_queue::Queue = mock.create_queue().unwrap();

        let tap = Arc::new(Tap::stand_in(tap_end, "stand-in", 1500));
        let interrupt = Arc::new(CountingInterrupt::default());
        let w = NetWorker { mem: mem.clone(), tap, interrupt: interrupt.clone(), counters: Arc::default(), rx: RxQueue::new(false, 1526) };
        assert!(w.transmit(&mut q), "EAGAIN must be reported as a full tap");
        assert_eq!(q.next_avail(), 0, "the frame stays available");
        assert_eq!(mock.used().idx().load(), 0);
        assert_eq!(w.counters.snapshot().errors, 0, "a full tap is not an error");

        // The host drains the tap; the retry sends the frame.
        let mut buf = vec![0u8; 8192];
        // SAFETY: reads into a buffer we own.
        while unsafe { libc::read(host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        assert!(!w.transmit(&mut q));
        assert_eq!(mock.used().idx().load(), 1);
        // SAFETY: reads into a buffer we own.
        let n = unsafe { libc::read(host.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(&buf[..n as usize], &frame[..]);
        assert_eq!(interrupt.0.load(Ordering::SeqCst), 1);
    }
}
