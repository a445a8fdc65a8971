//! Each device against a chain built to make the VMM buffer gigabytes: 64
//! descriptors of 32 MiB, all over the same guest memory. The VMM's memory
//! may grow by the guest RAM it touches and a few MiB, never by the
//! gigabytes the chain describes. virtio-net's tap is made in a network
//! namespace of the test thread's own.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rvirt_virtio_devices::{ActivateContext, Interrupt, InterruptKind, QueueHandle, VirtioBlock, VirtioConsole, VirtioDevice, VirtioRng};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const RAM: u64 = 64 << 20;
const RINGS: u64 = 48 << 20;
const WRITE: u16 = 2;

struct NoInterrupt;

impl Interrupt for NoInterrupt {
    fn trigger(&self, _: InterruptKind) {}
}

/// The tests measure this process's memory: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
}

/// A ready queue at `base` whose one available chain is `descs` (address, length, flags).
fn queue(mem: &GuestMemoryMmap, base: u64, descs: &[(u64, u32, u16)]) -> QueueHandle {
    QueueHandle { queue: rvirt_virtio_devices::fuzzing::chain_queue(mem, base, descs), event: EventFd::new(0).unwrap() }
}

/// Activates `dev` on `queues`, notifies queue `kick` and waits until it has used its chain.
fn serve(dev: &mut dyn VirtioDevice, mem: &GuestMemoryMmap, queues: Vec<QueueHandle>, kick: usize, used_at: u64) {
    let kick_fd = queues[kick].event.try_clone().unwrap();
    dev.activate(ActivateContext { mem: mem.clone(), interrupt: Arc::new(NoInterrupt), queues, features: 1 << 32 }).unwrap();
    kick_fd.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while mem.read_obj::<u16>(GuestAddress(used_at + 2)).unwrap() == 0 {
        assert!(Instant::now() < deadline, "the device never used the chain");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// 64 descriptors of 32 MiB each over the first 32 MiB of RAM: 2 GiB described.
fn bomb(flags: u16) -> Vec<(u64, u32, u16)> {
    vec![(0, 32 << 20, flags); 64]
}

fn ram() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
}

#[test]
fn virtio_rng_fills_at_most_one_bounded_request() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mem = ram();
    let before = rss();
    let mut rng = VirtioRng::new().unwrap();
    let q = queue(&mem, RINGS, &bomb(WRITE));
    serve(&mut rng, &mem, vec![q], 0, RINGS + 0x2000);
    let grown = rss().saturating_sub(before);
    assert!(grown < 16 << 20, "the VMM grew by {grown} bytes");
    rng.reset();
}

#[derive(Clone, Default)]
struct Counting(Arc<AtomicUsize>);

impl Write for Counting {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(b.len(), Ordering::SeqCst);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn virtio_console_takes_at_most_64_kib_of_a_transmit_chain() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mem = ram();
    let before = rss();
    let out = Counting::default();
    let mut console = VirtioConsole::new(Box::new(out.clone()), None);
    let rx = queue(&mem, RINGS, &[]);
    let tx = queue(&mem, RINGS + 0x10_0000, &bomb(0));
    serve(&mut console, &mem, vec![rx, tx], 1, RINGS + 0x10_0000 + 0x2000);
    assert!(out.0.load(Ordering::SeqCst) <= 64 << 10, "{} bytes taken", out.0.load(Ordering::SeqCst));
    let grown = rss().saturating_sub(before);
    assert!(grown < 16 << 20, "the VMM grew by {grown} bytes");
    console.reset();
}

#[test]
fn virtio_blk_reads_a_huge_request_straight_into_guest_memory() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mem = ram();
    let dir = std::env::temp_dir().join(format!("rvirt-hostile-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("sparse.raw");
    std::fs::File::create(&img).unwrap().set_len(4 << 30).unwrap();
    let backend: Arc<dyn rvirt_block::BlockBackend> = Arc::new(rvirt_block::RawImage::open(&img, true).unwrap());
    let mut blk = VirtioBlock::new("hostile", backend, "");
    // A read (type 0) of 2 GiB into overlapping buffers, then the status byte.
    let header = 40u64 << 20;
    mem.write_slice(&[0u8; 16], GuestAddress(header)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(header + 16)).unwrap();
    let mut descs = vec![(header, 16, 0)];
    descs.extend(bomb(WRITE));
    descs.push((header + 16, 1, WRITE));
    let before = rss();
    serve(&mut blk, &mem, vec![queue(&mem, RINGS, &descs)], 0, RINGS + 0x2000);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(header + 16)).unwrap(), 0, "the read succeeded");
    let grown = rss().saturating_sub(before);
    // The guest RAM it wrote into (32 MiB) and a little more.
    assert!(grown < 48 << 20, "the VMM grew by {grown} bytes");
    blk.reset();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn virtio_net_hands_a_huge_transmit_chain_to_the_tap_without_copying() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The tap lives in a network namespace of this test thread's own (never
    // the machine's); the device's threads, started from here, share it.
    let handle = std::thread::spawn(|| {
        // SAFETY: unshare affects only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()));
        }
        let tap = Arc::new(rvirt_virtio_devices::Tap::open("rvhostile0").map_err(|e| e.to_string())?);
        let mem = ram();
        let before = rss();
        let (mut net, _handle) = rvirt_virtio_devices::VirtioNet::new(tap, [0x52, 0x54, 0, 0, 0, 1]);
        let rx = queue(&mem, RINGS, &[]);
        let tx = queue(&mem, RINGS + 0x10_0000, &bomb(0));
        serve(&mut net, &mem, vec![rx, tx], 1, RINGS + 0x10_0000 + 0x2000);
        let grown = rss().saturating_sub(before);
        net.reset();
        Ok(grown)
    });
    let grown = handle.join().unwrap().unwrap();
    assert!(grown < 16 << 20, "the VMM grew by {grown} bytes");
}
