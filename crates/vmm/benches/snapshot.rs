//! Snapshot and restore of a running VM (`cargo bench -p rvirt-vmm --bench
//! snapshot`, host /dev/kvm): a hand-made guest of 512 MiB and of 2 GiB
//! that has written 256 MiB of its RAM (a working set the snapshot must
//! carry), then prints the alphabet. For each size: the snapshot's time
//! (pause to files on disk, as the API reports it) and size; the restore's
//! VMM time to the guest's first instruction (reading and checking the
//! state, mapping the memory copy-on-write, building the VM, putting the
//! state back, starting the vCPUs), in the process, and the same with the
//! memory copied instead of mapped; and a whole `rvirt-vmm --restore`
//! process to the guest's first letter on its serial port.
//!
//! `RVIRT_BENCH_ROUNDS=N` (default 10) restores per figure; upper medians.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rvirt_api::{ApiClient, Request};
use rvirt_lab::guests::{bzimage_with, fill_then_print_alphabet};
use rvirt_lab::stats::upper_median;
use rvirt_vmm::console::Console;
use rvirt_vmm::memory::{self, FromFile};
use rvirt_vmm::virtio::Backends;
use rvirt_vmm::vm::Vm;
use rvirt_vmm::{snapshot, SerialMode, VmConfig};

fn wait_for(log: &Path, len: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::fs::metadata(log).map(|m| m.len()).unwrap_or(0) < len {
        assert!(Instant::now() < deadline, "{} stayed short", log.display());
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The VMM's restore path, timed to the moment the vCPUs run.
fn restore_in_process(kvm: &kvm_ioctls::Kvm, snap: &Path, log: &Path, how: FromFile) -> (f64, Vm) {
    let t = Instant::now();
    let (state, file, base) = snapshot::read(snap).unwrap();
    let mut given = VmConfig::with_boot(rvirt_vmm::config::Boot::Restore { dir: snap.to_path_buf(), copy_memory: how == FromFile::Copy });
    given.serial = SerialMode::File(log.to_path_buf());
    let cfg = snapshot::restored_config(&given, &state.config).unwrap();
    let layout = rvirt_arch::MemoryLayout::new(cfg.memory_bytes).unwrap();
    let mem = memory::guest_memory_from_file(&layout, &file, how, base).unwrap();
    let backends = Backends::open_restored(&cfg).unwrap();
    let console = Console::open(&cfg.serial).unwrap();
    let mut vm = Vm::create_restored(kvm, &cfg, console.writer().unwrap(), &backends, mem, None).unwrap();
    vm.restore_snapshot(state).unwrap();
    vm.start().unwrap();
    (t.elapsed().as_secs_f64() * 1000.0, vm)
}

fn main() {
    let rounds: usize = std::env::var("RVIRT_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let dir = std::env::temp_dir().join(format!("rvirt-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    rvirt_vmm::vcpu::install_kick_handler().unwrap();
    let kvm = rvirt_vmm::open_kvm().unwrap();
    let vmm_bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/rvirt-vmm");
    println!("| guest RAM | snapshot | state | memory written | restore, mapped (VMM) | restore, copied (VMM) | rvirt-vmm --restore to first output |");
    println!("|---|---|---|---|---|---|---|");
    for mib in [512u64, 2048] {
        let kernel = dir.join(format!("k{mib}"));
        std::fs::write(&kernel, bzimage_with(&fill_then_print_alphabet(256 << 20, 0x100))).unwrap();
        let mut cfg = VmConfig::new(&kernel);
        cfg.memory_bytes = mib << 20;
        cfg.serial = SerialMode::File(dir.join(format!("boot{mib}.log")));
        cfg.api_socket = Some(dir.join(format!("api{mib}.sock")));
        let sock = cfg.api_socket.clone().unwrap();
        let vmm = std::thread::spawn(move || rvirt_vmm::run(&cfg));
        // The guest prints once its 256 MiB are written.
        wait_for(&dir.join(format!("boot{mib}.log")), 1, Duration::from_secs(60));
        let mut api = ApiClient::connect(&sock, Duration::from_secs(10)).unwrap();
        let snap = dir.join(format!("snap{mib}"));
        let r = api.call(&Request::Snapshot { path: snap.clone(), resume: false, fd: false, note: None, disk_snapshot: None }).unwrap();
        let info = r.snapshot.unwrap_or_else(|| panic!("{r:?}"));
        assert!(api.call(&Request::Stop).unwrap().ok);
        let _ = vmm.join();

        let mut times = [Vec::new(), Vec::new(), Vec::new()];
        for round in 0..rounds {
            for (i, how) in [FromFile::Map, FromFile::Copy].into_iter().enumerate() {
                let log = dir.join(format!("r{mib}-{round}-{i}.log"));
                let (ms, mut vm) = restore_in_process(&kvm, &snap, &log, how);
                wait_for(&log, 1, Duration::from_secs(10));
                vm.stop();
                times[i].push(ms);
            }
            if vmm_bin.exists() {
                let log = dir.join(format!("p{mib}-{round}.log"));
                let t = Instant::now();
                let mut child = std::process::Command::new(&vmm_bin)
                    .args(["--restore", snap.to_str().unwrap(), "--serial"])
                    .arg(format!("file={}", log.display()))
                    .spawn()
                    .unwrap();
                wait_for(&log, 1, Duration::from_secs(10));
                times[2].push(t.elapsed().as_secs_f64() * 1000.0);
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let process = if times[2].is_empty() { "(build --release first)".to_string() } else { format!("{:.1} ms", upper_median(times[2].clone())) };
        println!(
            "| {mib} MiB | {:.0} ms | {} KiB | {} MiB | {:.2} ms | {:.1} ms | {process} |",
            info.millis,
            info.state_bytes >> 10,
            info.memory_bytes >> 20,
            upper_median(times[0].clone()),
            upper_median(times[1].clone())
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
