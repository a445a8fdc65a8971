//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the stable
//! test that replays their corpus: guest-controlled rings and requests.

use std::sync::{Arc, Mutex};

use rvirt_block::{BlockBackend, Extent, ExtentKind, Result};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::block::BlockRequestHandler;
use crate::chain::GuestChain;
use crate::worker::serve_queue;

/// A 64 KiB disk in memory.
struct MemDisk(Mutex<Vec<u8>>);

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        65536
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let d = self.0.lock().map_err(|_| rvirt_block::Error::Request("poisoned".into()))?;
        let o = offset as usize;
        buf.copy_from_slice(d.get(o..o + buf.len()).ok_or_else(|| rvirt_block::Error::Request("range".into()))?);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut d = self.0.lock().map_err(|_| rvirt_block::Error::Request("poisoned".into()))?;
        let o = offset as usize;
        d.get_mut(o..o + buf.len()).ok_or_else(|| rvirt_block::Error::Request("range".into()))?.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.write_zeroes(offset, length)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> Result<()> {
        self.write_at(&vec![0; length as usize], offset)
    }
    fn map(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        Ok(vec![Extent { offset, length, kind: ExtentKind::Data }])
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

/// Guest memory layout of a fuzz case: 1 MiB of RAM whose first 64 KiB are
/// the input (descriptor table at 0, avail ring at 0x1000, used ring at
/// 0x2000, buffers after), and a 16-entry queue over them.
fn setup(data: &[u8]) -> Option<(GuestMemoryMmap, Queue)> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).ok()?;
    mem.write_slice(&data[..data.len().min(0x10000)], GuestAddress(0)).ok()?;
    let mut q = Queue::new(16).ok()?;
    q.set_size(16);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_event_idx(data.first().is_some_and(|b| b & 1 == 1));
    q.set_ready(true);
    Some((mem, q))
}

/// Serves a virtio-blk request queue whose rings and requests are `data`.
pub fn block_queue(data: &[u8]) {
    let Some((mem, mut q)) = setup(data) else { return };
    let disk: Arc<dyn BlockBackend> = Arc::new(MemDisk(Mutex::new(vec![0; 65536])));
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
