//! The thread each active device serves its queues on, and a small epoll
//! wrapper for it.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// A device worker thread that stops when asked (kill eventfd) and is joined on drop.
pub struct Worker {
    kill: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts `body` on a thread named `name`; `body` receives the eventfd
    /// that becomes readable when it must return.
    pub fn spawn<F>(name: &str, body: F) -> std::io::Result<Self>
    where
        F: FnOnce(EventFd) + Send + 'static,
    {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let theirs = kill.try_clone()?;
        let handle = std::thread::Builder::new().name(name.into()).spawn(move || {
            rvirt_sandbox::seccomp::enter_or_exit(rvirt_sandbox::ThreadKind::Worker);
            body(theirs)
        })?;
        Ok(Self { kill, handle: Some(handle) })
    }

    /// Asks the thread to return and waits for it.
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.kill.write(1);
            if h.join().is_err() {
                tracing::error!("a device worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Level-triggered epoll over a few descriptors, each with a caller-chosen token.
pub struct EventLoop {
    epoll: Epoll,
    events: Vec<EpollEvent>,
}

impl EventLoop {
    /// An empty set.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { epoll: Epoll::new()?, events: vec![EpollEvent::default(); 16] })
    }

    /// Watches `fd` for input, reporting it as `token`.
    pub fn add(&self, fd: &impl AsRawFd, token: u64) -> std::io::Result<()> {
        self.ctl(ControlOperation::Add, fd.as_raw_fd(), EventSet::IN, token)
    }

    /// Changes what `fd` is watched for (empty: nothing, until changed again).
    pub fn modify(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.ctl(ControlOperation::Modify, fd, events, token)
    }

    fn ctl(&self, op: ControlOperation, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.epoll.ctl(op, fd, EpollEvent::new(events, token))
    }

    /// Waits for events and returns their tokens (retrying on EINTR).
    pub fn wait(&mut self) -> std::io::Result<Vec<u64>> {
        loop {
            match self.epoll.wait(-1, &mut self.events) {
                Ok(n) => return Ok(self.events[..n].iter().map(|e| e.data()).collect()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// What [`serve_queue`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Chains completed.
    pub chains: usize,
    /// Whether the driver must be interrupted.
    pub notify: bool,
    /// The ring is unusable (bad avail index or addresses); stop serving it.
    pub broken: bool,
    /// The handler declined a chain (it stays available for later).
    pub stopped: bool,
}

/// Pops every available chain of `queue`, hands it to `handle` (which
/// returns how many bytes it wrote into the chain, or `None` to leave the
/// chain available and stop) and puts it on the used ring. With EVENT_IDX it
/// re-checks after re-enabling notifications, so a chain made available
/// meanwhile is not missed. A ring the guest broke (available index ahead by
/// more than the ring size, unreadable rings) ends the loop instead of spinning.
pub fn serve_queue<F>(queue: &mut virtio_queue::Queue, mem: &vm_memory::GuestMemoryMmap, handle: F) -> Served
where
    F: FnMut(virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>) -> Option<u32>,
{
    serve(queue, mem, handle, None)
}

/// [`serve_queue`] that interrupts the driver (`notify`) as soon as a
/// completed chain crosses the driver's threshold instead of once at the
/// end, as QEMU's virtio-net transmit does: each chain's handling can take
/// long (a tap write runs the host's network stack), and the driver frees
/// its buffers, and TCP sends more, only when told. `Served::notify` is
/// then always false.
pub fn serve_queue_notifying<F>(
    queue: &mut virtio_queue::Queue,
    mem: &vm_memory::GuestMemoryMmap,
    handle: F,
    mut notify: impl FnMut(),
) -> Served
where
    F: FnMut(virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>) -> Option<u32>,
{
    serve(queue, mem, handle, Some(&mut notify))
}

fn serve<F>(
    queue: &mut virtio_queue::Queue,
    mem: &vm_memory::GuestMemoryMmap,
    mut handle: F,
    mut eager: Option<&mut dyn FnMut()>,
) -> Served
where
    F: FnMut(virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>) -> Option<u32>,
{
    use virtio_queue::{QueueOwnedT, QueueT};
    let mut out = Served::default();
    'outer: loop {
        if queue.disable_notification(mem).is_err() {
            out.broken = true;
            break;
        }
        let mut popped = 0;
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(_) => {
                    out.broken = true;
                    break 'outer;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let Some(len) = handle(chain) else {
                queue.go_to_previous_position();
                let _ = queue.enable_notification(mem);
                out.stopped = true;
                break 'outer;
            };
            if queue.add_used(mem, head, len).is_err() {
                // A head index outside the ring: nothing to return it to.
                tracing::warn!("virtio: guest offered an invalid descriptor head {head}");
            }
            popped += 1;
            out.chains += 1;
            if let Some(notify) = eager.as_mut() {
                if queue.needs_notification(mem).unwrap_or(true) {
                    notify();
                }
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) if popped > 0 => continue,
            Ok(false) => break,
            // More announced but nothing could be popped: a broken ring.
            Ok(true) | Err(_) => {
                out.broken = true;
                break;
            }
        }
    }
    if out.chains > 0 && eager.is_none() {
        out.notify = queue.needs_notification(mem).unwrap_or(true);
    }
    out
}

/// Starts the worker of a one-queue device (block, rng): [`spawn_queues`]
/// with its queue as queue 0.
pub fn spawn_single_queue<F>(
    name: &str,
    q: crate::QueueHandle,
    mem: vm_memory::GuestMemoryMmap,
    interrupt: std::sync::Arc<dyn crate::Interrupt>,
    mut handle: F,
) -> std::io::Result<Worker>
where
    F: FnMut(virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>, &vm_memory::GuestMemoryMmap) -> u32 + Send + 'static,
{
    spawn_queues(name, vec![(0, q)], mem, interrupt, move |_, chain, mem| handle(chain, mem))
}

/// Starts a worker serving `queues` (each with its queue index): waits for
/// the driver's notifications, serves every chain of a notified queue with
/// `handle` (given the queue index; it returns the bytes it wrote into the
/// chain) and interrupts for that queue when its ring asks. A ring the guest
/// broke ends the worker; the device works again after a reset.
pub fn spawn_queues<F>(
    name: &str,
    mut queues: Vec<(u16, crate::QueueHandle)>,
    mem: vm_memory::GuestMemoryMmap,
    interrupt: std::sync::Arc<dyn crate::Interrupt>,
    mut handle: F,
) -> std::io::Result<Worker>
where
    F: FnMut(u16, virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>, &vm_memory::GuestMemoryMmap) -> u32 + Send + 'static,
{
    let thread_name = name.to_string();
    Worker::spawn(name, move |kill| {
        let Ok(mut events) = EventLoop::new() else { return };
        let kill_token = queues.len() as u64;
        if queues.iter().enumerate().any(|(i, (_, q))| events.add(&q.event, i as u64).is_err()) || events.add(&kill, kill_token).is_err() {
            return;
        }
        while let Ok(tokens) = events.wait() {
            if tokens.contains(&kill_token) {
                return;
            }
            for (i, (index, q)) in queues.iter_mut().enumerate() {
                if !tokens.contains(&(i as u64)) {
                    continue;
                }
                let _ = q.event.read();
                let index = *index;
                let served = serve_queue(&mut q.queue, &mem, |chain| Some(handle(index, chain, &mem)));
                if served.notify {
                    interrupt.trigger(crate::InterruptKind::Queue(index));
                }
                if served.broken {
                    tracing::error!("{thread_name}: the guest broke queue {index}; serving stops until a device reset");
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;

    use super::*;
    use crate::chain::tests::memory;

    /// A ring with EVENT_IDX and `n` one-descriptor chains; the driver asks
    /// to be told after the first completion (used_event 0).
    fn ring(mem: &vm_memory::GuestMemoryMmap, n: u16) -> (MockSplitQueue<'_, vm_memory::GuestMemoryMmap>, virtio_queue::Queue) {
        let mock = MockSplitQueue::new(mem, 16);
        for i in 0..n {
            mock.desc_table().store(i, RawDescriptor::from(Descriptor::new(0x10000 + u64::from(i) * 0x100, 64, 0, 0))).unwrap();
            mock.avail().ring().ref_at(usize::from(i)).unwrap().store(i);
        }
        mock.avail().idx().store(n);
        let mut q: virtio_queue::Queue = mock.create_queue().unwrap();
        q.set_event_idx(true);
        (mock, q)
    }

    #[test]
    fn notifying_serve_interrupts_when_the_threshold_is_crossed_not_at_the_end() {
        let mem = memory();
        let (mock, mut q) = ring(&mem, 3);
        let notified = Cell::new(0);
        let mut seen = Vec::new();
        let served = serve_queue_notifying(
            &mut q,
            &mem,
            |_| {
                seen.push(notified.get());
                Some(0)
            },
            || notified.set(notified.get() + 1),
        );
        assert_eq!(seen, [0, 1, 1], "the interrupt comes right after the first chain, and once");
        assert_eq!((served.chains, served.notify, notified.get()), (3, false, 1));
        assert_eq!(mock.used().idx().load(), 3);

        // The batch form decides once, at the end.
        let (_, mut q) = ring(&mem, 3);
        let served = serve_queue(&mut q, &mem, |_| Some(0));
        assert_eq!((served.chains, served.notify), (3, true));
    }
}
