//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the stable
//! test that replays their corpus: guest-controlled rings and requests.

use std::sync::Arc;

use rvirt_block::fuzzing::MemImage;
use rvirt_block::BlockBackend;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::block::BlockRequestHandler;
use crate::chain::GuestChain;
use crate::worker::serve_queue;

/// Guest RAM of a fuzz case.
const RAM: u64 = 1 << 20;
/// Where the payload (request headers, data) of a fuzz case starts.
const PAYLOAD: u64 = 0x4000;
/// Queue size of a fuzz case.
const QSIZE: u16 = 16;

/// Lays a fuzz input out in guest memory as a driver would, so the device
/// sees real chains instead of a zeroed ring (raw bytes as memory put the
/// avail ring past libFuzzer's input sizes: 152 edges in 4 million runs).
///
/// Input: a flags byte (bit 0: EVENT_IDX; bit 1: addresses and lengths
/// taken raw, so some point outside RAM), the number of descriptors and of
/// avail entries (each 1 to 16), then 16 bytes per descriptor (address,
/// length, flags, next), 2 bytes per avail entry, and the rest as payload
/// at [`PAYLOAD`]. Addresses land in the payload area unless raw; lengths
/// are kept under 64 KiB unless raw.
fn setup(data: &[u8]) -> Option<(GuestMemoryMmap, Queue)> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).ok()?;
    let (&flags, rest) = data.split_first()?;
    let (&nd, rest) = rest.split_first()?;
    let (&na, mut rest) = rest.split_first()?;
    let (nd, na) = (usize::from(nd % QSIZE as u8) + 1, usize::from(na % QSIZE as u8) + 1);
    let raw = flags & 2 != 0;
    let mut take = |n: usize| -> Vec<u8> {
        let k = n.min(rest.len());
        let (a, b) = rest.split_at(k);
        rest = b;
        let mut v = a.to_vec();
        v.resize(n, 0);
        v
    };
    for i in 0..nd {
        let d = take(16);
        let mut addr = u64::from_le_bytes(d[0..8].try_into().ok()?);
        let mut len = u32::from_le_bytes(d[8..12].try_into().ok()?);
        if !raw {
            addr = PAYLOAD + addr % (RAM - PAYLOAD);
            len %= 1 << 16;
        }
        let dflags = u16::from_le_bytes([d[12], d[13]]) & 0x7;
        let next = u16::from_le_bytes([d[14], d[15]]) % if raw { u16::MAX } else { QSIZE };
        let at = i as u64 * 16;
        mem.write_obj(addr, GuestAddress(at)).ok()?;
        mem.write_obj(len, GuestAddress(at + 8)).ok()?;
        mem.write_obj(dflags, GuestAddress(at + 12)).ok()?;
        mem.write_obj(next, GuestAddress(at + 14)).ok()?;
    }
    mem.write_obj(0u16, GuestAddress(0x1000)).ok()?;
    mem.write_obj(na as u16, GuestAddress(0x1002)).ok()?;
    for i in 0..na {
        let h = take(2);
        let head = u16::from_le_bytes([h[0], h[1]]) % if raw { u16::MAX } else { nd as u16 };
        mem.write_obj(head, GuestAddress(0x1004 + 2 * i as u64)).ok()?;
    }
    mem.write_slice(&rest[..rest.len().min((RAM - PAYLOAD) as usize)], GuestAddress(PAYLOAD)).ok()?;
    let mut q = Queue::new(QSIZE).ok()?;
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_event_idx(flags & 1 == 1);
    q.set_ready(true);
    Some((mem, q))
}

/// A ready 256-entry queue with its rings at `base` (descriptor table),
/// `base + 0x1000` (avail) and `base + 0x2000` (used), whose one available
/// chain is `descs` (address, length, flags; NEXT is added): what the
/// hostile-chain tests hand a device.
pub fn chain_queue(mem: &GuestMemoryMmap, base: u64, descs: &[(u64, u32, u16)]) -> Queue {
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let at = base + i as u64 * 16;
        let flags = if i + 1 < descs.len() { flags | 1 } else { flags };
        let _ = mem.write_obj(addr, GuestAddress(at));
        let _ = mem.write_obj(len, GuestAddress(at + 8));
        let _ = mem.write_obj(flags, GuestAddress(at + 12));
        let _ = mem.write_obj(i as u16 + 1, GuestAddress(at + 14));
    }
    let avail = base + 0x1000;
    let _ = mem.write_obj(0u16, GuestAddress(avail));
    let _ = mem.write_obj(u16::from(!descs.is_empty()), GuestAddress(avail + 2));
    let _ = mem.write_obj(0u16, GuestAddress(avail + 4));
    let mut q = Queue::new(256).unwrap_or_else(|_| unreachable!("256 is a valid queue size"));
    q.set_size(256);
    q.set_desc_table_address(Some(base as u32), Some((base >> 32) as u32));
    q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    q.set_used_ring_address(Some((avail + 0x1000) as u32), Some(((avail + 0x1000) >> 32) as u32));
    q.set_ready(true);
    q
}

/// A fuzz input that lays out one chain of `descs` (address, length, flags)
/// with `payload` at [`PAYLOAD`]: seeds for the corpus.
pub fn seed(descs: &[(u64, u32, u16)], payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8, (descs.len() as u8).saturating_sub(1), 0];
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        v.extend_from_slice(&(addr - PAYLOAD).to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&((i + 1) as u16).to_le_bytes());
    }
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Serves a virtio-blk request queue whose rings and requests are `data`.
pub fn block_queue(data: &[u8]) {
    let Some((mem, mut q)) = setup(data) else { return };
    let disk: Arc<dyn BlockBackend> = MemImage::new(vec![0; 65536], false);
    let h = BlockRequestHandler::new(disk, [0; 20], Arc::default());
    let _ = serve_queue(&mut q, &mem, |c| Some(h.handle(c, &mem)));
}

/// Parses every chain of a queue built from `data` and reads/writes its streams.
pub fn chains(data: &[u8]) {
    let Some((mem, mut q)) = setup(data) else { return };
    let _ = serve_queue(&mut q, &mem, |c| {
        if let Ok(c) = GuestChain::parse(c, &mem) {
            let mut b = vec![0u8; c.readable_len().min(4096)];
            let _ = c.read(&mem, 1, &mut b);
            let _ = c.write(&mem, 3, &b);
        }
        Some(0)
    });
}

/// A connected pair of non-blocking, message-preserving sockets standing in
/// for a tap: one frame per read, a frame longer than the buffers cut to
/// them. Write frames to the second; the device reads the first.
pub fn stand_in_tap() -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors we then own.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just created.
    Ok(unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) })
}

/// Receives frames into a virtio-net receive queue whose rings and buffers
/// are `data`: the first bytes choose mergeable buffers and the largest
/// frame, the last ones the sizes of three frames from a stand-in tap.
pub fn net_rx(data: &[u8]) {
    use std::os::fd::AsRawFd;
    let Some((mem, mut q)) = setup(data) else { return };
    let byte = |i: usize| data.get(i).copied().unwrap_or(0) as usize;
    let mergeable = byte(1) & 1 == 1;
    let max_frame = 12 + byte(2) * 256;
    let Ok((tap, host)) = stand_in_tap() else { return };
    for k in 1..=3 {
        let frame = vec![0xa5u8; byte(data.len().saturating_sub(k)) * 64 + 1];
        // SAFETY: writes a buffer we own.
        unsafe { libc::write(host.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    }
    let counters = crate::DeviceCounters::default();
    let mut rx = crate::net::rx::RxQueue::new(mergeable, max_frame);
    for _ in 0..2 {
        let _ = rx.receive(&mut q, &mem, tap.as_raw_fd(), &counters);
    }
}
