//! virtio-blk over any [`BlockBackend`]: raw files (sparse, optionally
//! O_DIRECT) and qcow2 images. Reads and writes go straight between the
//! image and guest memory; flush, discard, write-zeroes and the serial
//! (GET_ID) are supported; a read-only disk answers writes with an I/O error.

use std::sync::Arc;

use rvirt_block::BlockBackend;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use crate::chain::{as_bytes, as_mut_bytes, GuestChain};
use crate::worker::{spawn_single_queue, Worker};
use crate::{device_type, ActivateContext, DeviceCounters, VirtioDevice, COMMON_FEATURES};

/// Bytes per sector in virtio-blk requests.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of a disk serial (GET_ID answer).
pub const SERIAL_LEN: usize = 20;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Request status: done.
pub const S_OK: u8 = 0;
/// Request status: failed.
pub const S_IOERR: u8 = 1;
/// Request status: unknown request type.
pub const S_UNSUPP: u8 = 2;

const HEADER_LEN: usize = 16;
const SEGMENT_LEN: usize = 16;
/// Discard/write-zeroes segments accepted per request.
const MAX_SEGMENTS: u32 = 1;
const WRITE_ZEROES_UNMAP: u32 = 1;

/// Serves requests of one disk: shared by the worker and (for fuzzing) tests.
pub struct BlockRequestHandler {
    backend: Arc<dyn BlockBackend>,
    serial: [u8; SERIAL_LEN],
    counters: Arc<DeviceCounters>,
}

impl BlockRequestHandler {
    /// A handler for `backend`, answering GET_ID with `serial`.
    pub fn new(backend: Arc<dyn BlockBackend>, serial: [u8; SERIAL_LEN], counters: Arc<DeviceCounters>) -> Self {
        Self { backend, serial, counters }
    }

    /// Executes one request; returns the bytes written into the chain
    /// (data plus the status byte).
    pub fn handle(&self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let chain = match GuestChain::parse(chain, mem) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("virtio-blk: bad request: {e}");
                self.counters.error();
                return 0;
            }
        };
        let Some(status_at) = chain.writable_len().checked_sub(1) else {
            self.counters.error();
            return 0;
        };
        let (status, to_guest, from_guest) = match self.execute(&chain, mem, status_at) {
            Ok((to, from)) => (S_OK, to, from),
            Err(status) => (status, 0, 0),
        };
        if status == S_OK {
            self.counters.request(to_guest as u64, from_guest as u64);
        } else {
            self.counters.error();
        }
        if chain.write(mem, status_at, &[status]).is_err() {
            return 0;
        }
        (to_guest + 1) as u32
    }

    fn range(&self, sector: u64, len: u64) -> Result<u64, u8> {
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(S_IOERR)?;
        match offset.checked_add(len) {
            Some(end) if end <= self.backend.size() => Ok(offset),
            _ => Err(S_IOERR),
        }
    }

    fn execute(&self, chain: &GuestChain, mem: &GuestMemoryMmap, data_len: usize) -> Result<(usize, usize), u8> {
        let mut hdr = [0u8; HEADER_LEN];
        chain.read(mem, 0, &mut hdr).map_err(|_| S_IOERR)?;
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
        let io = |what: &str, e: rvirt_block::Error| {
            tracing::warn!("virtio-blk: {what} failed: {e}");
            S_IOERR
        };
        match kind {
            T_IN => {
                if data_len as u64 % SECTOR_SIZE != 0 {
                    return Err(S_IOERR);
                }
                let offset = self.range(sector, data_len as u64)?;
                let slices = chain.writable_slices(mem, 0, data_len).map_err(|_| S_IOERR)?;
                // SAFETY: the slices are checked guest memory, used only for this read.
                let mut bufs: Vec<&mut [u8]> = slices.iter().map(|s| unsafe { as_mut_bytes(s) }).collect();
                self.backend.read_vectored_at(&mut bufs, offset).map_err(|e| io("read", e))?;
                Ok((data_len, 0))
            }
            T_OUT => {
                let len = chain.readable_len().saturating_sub(HEADER_LEN);
                if len as u64 % SECTOR_SIZE != 0 || self.backend.is_read_only() {
                    return Err(S_IOERR);
                }
                let offset = self.range(sector, len as u64)?;
                let slices = chain.readable_slices(mem, HEADER_LEN, len).map_err(|_| S_IOERR)?;
                // SAFETY: as above, for this write.
                let bufs: Vec<&[u8]> = slices.iter().map(|s| unsafe { as_bytes(s) }).collect();
                self.backend.write_vectored_at(&bufs, offset).map_err(|e| io("write", e))?;
                Ok((0, len))
            }
            T_FLUSH => self.backend.flush().map(|_| (0, 0)).map_err(|e| io("flush", e)),
            T_GET_ID => {
                let n = data_len.min(SERIAL_LEN);
                chain.write(mem, 0, &self.serial[..n]).map_err(|_| S_IOERR)?;
                Ok((n, 0))
            }
            T_DISCARD | T_WRITE_ZEROES => {
                if self.backend.is_read_only() {
                    return Err(S_IOERR);
                }
                let segments = chain.readable_len().saturating_sub(HEADER_LEN) / SEGMENT_LEN;
                if segments == 0 || segments > MAX_SEGMENTS as usize {
                    return Err(S_UNSUPP);
                }
                for i in 0..segments {
                    let mut seg = [0u8; SEGMENT_LEN];
                    chain.read(mem, HEADER_LEN + i * SEGMENT_LEN, &mut seg).map_err(|_| S_IOERR)?;
                    let start = u64::from_le_bytes([seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7]]);
                    let count = u64::from(u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]));
                    let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                    let len = count * SECTOR_SIZE;
                    let offset = self.range(start, len)?;
                    if kind == T_DISCARD {
                        if flags != 0 {
                            return Err(S_UNSUPP);
                        }
                        self.backend.discard(offset, len).map_err(|e| io("discard", e))?;
                    } else {
                        if flags & !WRITE_ZEROES_UNMAP != 0 {
                            return Err(S_UNSUPP);
                        }
                        self.backend.write_zeroes(offset, len).map_err(|e| io("write-zeroes", e))?;
                    }
                }
                Ok((0, 0))
            }
            _ => Err(S_UNSUPP),
        }
    }
}

/// A virtio block device.
pub struct VirtioBlock {
    handler: Arc<BlockRequestHandler>,
    config: Vec<u8>,
    features: u64,
    worker: Option<Worker>,
    name: String,
}

impl VirtioBlock {
    /// A disk over `backend`; `serial` is truncated to 20 bytes.
    pub fn new(name: impl Into<String>, backend: Arc<dyn BlockBackend>, serial: &str) -> Self {
        let mut id = [0u8; SERIAL_LEN];
        let s = serial.as_bytes();
        id[..s.len().min(SERIAL_LEN)].copy_from_slice(&s[..s.len().min(SERIAL_LEN)]);
        let read_only = backend.is_read_only();
        let mut features = COMMON_FEATURES | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        features |= if read_only { F_RO } else { F_DISCARD | F_WRITE_ZEROES };
        let config = Self::config_space(backend.size());
        Self {
            handler: Arc::new(BlockRequestHandler::new(backend, id, Arc::new(DeviceCounters::default()))),
            config,
            features,
            worker: None,
            name: name.into(),
        }
    }

    fn config_space(size: u64) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        c[0..8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes());
        // seg_max: the ring minus header and status descriptors.
        c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        let max_sectors = (u32::MAX / SECTOR_SIZE as u32).to_le_bytes();
        c[36..40].copy_from_slice(&max_sectors);
        c[40..44].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        c[44..48].copy_from_slice(&8u32.to_le_bytes());
        c[48..52].copy_from_slice(&max_sectors);
        c[52..56].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        c[56] = 1;
        c
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn config_len(&self) -> usize {
        self.config.len()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), String> {
        let ActivateContext { mem, interrupt, mut queues, .. } = ctx;
        let q = queues.pop().ok_or("virtio-blk needs its request queue")?;
        let handler = self.handler.clone();
        let worker = spawn_single_queue(&format!("{}-io", self.name), q, mem, interrupt, move |chain, mem| {
            handler.handle(chain, mem)
        })
        .map_err(|e| e.to_string())?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.handler.counters.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use rvirt_block::RawImage;
    use virtio_queue::{QueueOwnedT, QueueT};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::chain::tests::{memory, queue_with_chain, F_WRITE};

    const HDR: u64 = 0x8000;
    const DATA: u64 = 0x9000;
    const STATUS: u64 = 0xa000;

    fn disk(name: &str, read_only: bool) -> (std::path::PathBuf, Arc<dyn BlockBackend>) {
        let dir = std::env::temp_dir().join(format!("rvirt-vblk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i / 512) as u8).collect();
        f.write_all(&bytes).unwrap();
        (p.clone(), Arc::new(RawImage::open(&p, read_only).unwrap()))
    }

    fn handler(backend: Arc<dyn BlockBackend>) -> BlockRequestHandler {
        let mut serial = [0u8; SERIAL_LEN];
        serial[..5].copy_from_slice(b"disk7");
        BlockRequestHandler::new(backend, serial, Arc::default())
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn run(h: &BlockRequestHandler, mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> (u32, u8) {
        let mut q = queue_with_chain(mem, descs);
        let chain = q.iter(mem).unwrap().next().unwrap();
        let used = h.handle(chain, mem);
        (used, mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    #[test]
    fn reads_writes_and_identifies() {
        let mem = memory();
        let (path, backend) = disk("rw.raw", false);
        let h = handler(backend);
        header(&mem, T_IN, 3);
        let (used, status) = run(&h, &mem, &[(HDR, 16, 0), (DATA, 1024, F_WRITE), (STATUS, 1, F_WRITE)]);
        assert_eq!((used, status), (1025, S_OK));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 3);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 1023)).unwrap(), 4);

        mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
        header(&mem, T_OUT, 15);
        assert_eq!(run(&h, &mem, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)]), (1, S_OK));
        assert_eq!(std::fs::read(&path).unwrap()[15 * 512..], [0xee; 512]);

        header(&mem, T_GET_ID, 0);
        assert_eq!(run(&h, &mem, &[(HDR, 16, 0), (DATA, 20, F_WRITE), (STATUS, 1, F_WRITE)]), (21, S_OK));
        assert_eq!(mem.read_obj::<[u8; 5]>(GuestAddress(DATA)).unwrap(), *b"disk7");

        header(&mem, T_FLUSH, 0);
        assert_eq!(run(&h, &mem, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)]), (1, S_OK));
        assert_eq!(h.counters.snapshot().errors, 0);
        assert_eq!(h.counters.snapshot().bytes_to_guest, 1024 + SERIAL_LEN as u64);
    }

    #[test]
    fn bad_requests_get_an_error_status_and_never_panic() {
        let mem = memory();
        let (path, backend) = disk("ro.raw", true);
        let before = std::fs::read(&path).unwrap();
        let h = handler(backend);
        // Writes, discards and write-zeroes to a read-only disk.
        for kind in [T_OUT, T_DISCARD, T_WRITE_ZEROES] {
            header(&mem, kind, 0);
            assert_eq!(run(&h, &mem, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)]).1, S_IOERR, "{kind}");
        }
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // Past the end, an overflowing sector, a partial sector, an unknown type.
        for (kind, sector, len, want) in
            [(T_IN, 16, 512, S_IOERR), (T_IN, u64::MAX / 2, 512, S_IOERR), (T_IN, 0, 100, S_IOERR), (77, 0, 512, S_UNSUPP)]
        {
            header(&mem, kind, sector);
            assert_eq!(run(&h, &mem, &[(HDR, 16, 0), (DATA, len, F_WRITE), (STATUS, 1, F_WRITE)]), (1, want));
        }
        // A short header.
        header(&mem, T_IN, 0);
        assert_eq!(run(&h, &mem, &[(HDR, 8, 0), (STATUS, 1, F_WRITE)]), (1, S_IOERR));
        // No status byte, a buffer outside guest memory, a huge length: no reply possible.
        assert_eq!(run(&h, &mem, &[(HDR, 16, 0)]).0, 0);
        assert_eq!(run(&h, &mem, &[(HDR, 16, 0), (0xff_0000, 0x10_0000, F_WRITE), (STATUS, 1, F_WRITE)]).0, 0);
        assert_eq!(run(&h, &mem, &[(HDR, 16, 0), (DATA, u32::MAX, F_WRITE), (STATUS, 1, F_WRITE)]).0, 0);
        assert!(h.counters.snapshot().errors >= 10);
    }

    #[test]
    fn a_broken_ring_ends_service_instead_of_spinning() {
        let mem = memory();
        let (_, backend) = disk("ring.raw", false);
        let h = handler(backend);
        header(&mem, T_FLUSH, 0);
        let mut q = queue_with_chain(&mem, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)]);
        // The driver claims 1000 new buffers in a 16-entry ring.
        mem.write_obj(1000u16, GuestAddress(q.avail_ring() + 2)).unwrap();
        let served = crate::worker::serve_queue(&mut q, &mem, |c| Some(h.handle(c, &mem)));
        assert!(served.broken);
        assert_eq!(served.chains, 0);
    }
}
