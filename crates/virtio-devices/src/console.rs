//! virtio-console: a second console (hvc0 in Linux), single port. Output
//! goes to a writer chosen by the VMM (file, terminal, pty); input, when
//! there is an input descriptor, fills the receive queue.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use rvirt_devices::bus::lock;
use vmm_sys_util::epoll::EventSet;

use crate::chain::GuestChain;
use crate::worker::{serve_queue, EventLoop, Worker};
use crate::{device_type, ActivateContext, DeviceCounters, InterruptKind, VirtioDevice, COMMON_FEATURES};

/// Feature: the driver may write single characters to `emerg_wr` before the queues work.
const F_EMERG_WRITE: u64 = 1 << 2;
const RX: u64 = 0;
const TX: u64 = 1;
const INPUT: u64 = 2;
const KILL: u64 = 3;

/// A console device.
pub struct VirtioConsole {
    output: Arc<Mutex<Box<dyn Write + Send>>>,
    input: Option<Arc<OwnedFd>>,
    counters: Arc<DeviceCounters>,
    worker: Option<Worker>,
}

impl VirtioConsole {
    /// A console printing to `output` and, with `input`, reading from it.
    pub fn new(output: Box<dyn Write + Send>, input: Option<OwnedFd>) -> Self {
        Self { output: Arc::new(Mutex::new(output)), input: input.map(Arc::new), counters: Arc::default(), worker: None }
    }
}

fn read_input(fd: &OwnedFd, buf: &mut [u8]) -> isize {
    // SAFETY: read(2) into a buffer we own.
    unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64, 64]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES | F_EMERG_WRITE
    }
    fn config_len(&self) -> usize {
        12
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows (unknown: 0), max_nr_ports (1), emerg_wr (write-only).
        let mut c = [0u8; 12];
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        crate::read_config_bytes(&c, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 8 && !data.is_empty() {
            let mut out = lock(&self.output);
            let _ = out.write_all(&data[..1]);
            let _ = out.flush();
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), String> {
        let ActivateContext { mem, interrupt, queues, .. } = ctx;
        let mut queues: Vec<_> = queues.into_iter().take(2).collect();
        if queues.len() != 2 {
            return Err("virtio-console needs its receive and transmit queues".into());
        }
        let (output, input, counters) = (self.output.clone(), self.input.clone(), self.counters.clone());
        self.worker = Some(
            Worker::spawn("virtio-console", move |kill| {
                let Ok(mut events) = EventLoop::new() else { return };
                let mut ok = events.add(&queues[0].event, RX).is_ok() && events.add(&queues[1].event, TX).is_ok();
                ok &= events.add(&kill, KILL).is_ok();
                if let Some(fd) = &input {
                    ok &= events.add(fd.as_ref(), INPUT).is_ok();
                }
                if !ok {
                    return;
                }
                let mut pending: Vec<u8> = Vec::new();
                while let Ok(tokens) = events.wait() {
                    if tokens.contains(&KILL) {
                        return;
                    }
                    if tokens.contains(&TX) {
                        let q = &mut queues[1];
                        let _ = q.event.read();
                        let served = serve_queue(&mut q.queue, &mem, |chain| {
                            if let Ok(c) = GuestChain::parse(chain, &mem) {
                                let mut buf = vec![0u8; c.readable_len().min(1 << 16)];
                                if c.read(&mem, 0, &mut buf).is_ok() {
                                    let mut out = lock(&output);
                                    let _ = out.write_all(&buf);
                                    let _ = out.flush();
                                    counters.request(0, buf.len() as u64);
                                    return Some(0);
                                }
                            }
                            counters.error();
                            Some(0)
                        });
                        if served.notify {
                            interrupt.trigger(InterruptKind::Queue(1));
                        }
                    }
                    if tokens.contains(&RX) {
                        let _ = queues[0].event.read();
                    }
                    if tokens.contains(&INPUT) {
                        if let Some(fd) = &input {
                            let mut buf = [0u8; 1024];
                            let n = read_input(fd, &mut buf);
                            if n > 0 {
                                pending.extend_from_slice(&buf[..n as usize]);
                            } else {
                                // End of input or an error: stop watching it.
                                let _ = events.modify(fd.as_raw_fd(), EventSet::empty(), INPUT);
                            }
                        }
                    }
                    if !pending.is_empty() {
                        let q = &mut queues[0];
                        let served = serve_queue(&mut q.queue, &mem, |chain| {
                            if pending.is_empty() {
                                return None;
                            }
                            let Ok(c) = GuestChain::parse(chain, &mem) else { return Some(0) };
                            let n = c.writable_len().min(pending.len());
                            if c.write(&mem, 0, &pending[..n]).is_err() {
                                return Some(0);
                            }
                            pending.drain(..n);
                            counters.request(n as u64, 0);
                            Some(n as u32)
                        });
                        if served.notify {
                            interrupt.trigger(InterruptKind::Queue(0));
                        }
                    }
                    // Input waits in `pending` while the guest has no buffers; stop
                    // reading more until it has room.
                    if let Some(fd) = &input {
                        let ev = if pending.len() < 4096 { EventSet::IN } else { EventSet::empty() };
                        let _ = events.modify(fd.as_raw_fd(), ev, INPUT);
                    }
                }
            })
            .map_err(|e| e.to_string())?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}
