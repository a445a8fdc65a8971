//! virtio-rng: fills the guest's buffers from the host's `/dev/urandom`.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use crate::chain::{as_mut_bytes, GuestChain};
use crate::worker::{spawn_single_queue, Worker};
use crate::{device_type, ActivateContext, DeviceCounters, VirtioDevice, COMMON_FEATURES};

/// Largest request served at once; the driver asks again for more.
const MAX_REQUEST: usize = 64 * 1024;

/// An entropy device.
pub struct VirtioRng {
    source: Arc<File>,
    counters: Arc<DeviceCounters>,
    worker: Option<Worker>,
}

impl VirtioRng {
    /// An entropy device reading the host's `/dev/urandom`.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self::with_source(Arc::new(File::open("/dev/urandom")?)))
    }

    /// An entropy device reading `source`, opened by the caller (a jailed
    /// VMM opens `/dev/urandom` once, before it loses the path).
    pub fn with_source(source: Arc<File>) -> Self {
        Self { source, counters: Arc::default(), worker: None }
    }
}

impl VirtioDevice for VirtioRng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES
    }
    fn config_len(&self) -> usize {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), String> {
        let ActivateContext { mem, interrupt, mut queues, .. } = ctx;
        let q = queues.pop().ok_or("virtio-rng needs its request queue")?;
        let (source, counters) = (self.source.clone(), self.counters.clone());
        let fill = move |chain: virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>, mem: &vm_memory::GuestMemoryMmap| -> u32 {
            let Ok(chain) = GuestChain::parse(chain, mem) else {
                counters.error();
                return 0;
            };
            let len = chain.writable_len().min(MAX_REQUEST);
            let mut done = 0;
            for s in chain.writable_slices(mem, 0, len).unwrap_or_default() {
                // SAFETY: checked guest memory, used only for this read.
                match (&*source).read(unsafe { as_mut_bytes(&s) }) {
                    Ok(n) => done += n,
                    Err(_) => break,
                }
            }
            counters.request(done as u64, 0);
            done as u32
        };
        self.worker = Some(spawn_single_queue("virtio-rng", q, mem, interrupt, fill).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}
