//! What KVM holds of a VM (vCPU registers, XSAVE, MSRs, LAPIC, events, MP
//! state; clock, PICs, IOAPIC, PIT) saved from a running hand-made guest on
//! this host's /dev/kvm, carried through the state file format, put into a
//! second VM and saved again: the two must agree in everything but what
//! time moves (the TSC, the clock, the LAPIC timer's current count, the
//! PIT's load time). The second VM then runs on from where the first was.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rvirt_lab::guests::{bzimage_with, print_every};
use rvirt_vmm::console::Console;
use rvirt_vmm::state_file;
use rvirt_vmm::vcpu_state::{KvmVmState, MachineState, VcpuState};
use rvirt_vmm::virtio::Backends;
use rvirt_vmm::vm::Vm;
use rvirt_vmm::{SerialMode, VmConfig};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rvirt-state-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A VM built (not started) from `cfg` with its serial output in `log`.
fn build(kvm: &kvm_ioctls::Kvm, cfg: &VmConfig, log: &Path) -> Vm {
    let mut cfg = cfg.clone();
    cfg.serial = SerialMode::File(log.to_path_buf());
    let backends = Backends::open(&cfg).unwrap();
    let console = Console::open(&cfg.serial).unwrap();
    Vm::create(kvm, &cfg, console.writer().unwrap(), &backends, None).unwrap()
}

fn wait_for(log: &Path, len: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read(log).unwrap_or_default().len() < len {
        assert!(Instant::now() < deadline, "the guest printed {} bytes", std::fs::read(log).unwrap_or_default().len());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The MSRs whose value is the time (IA32_TSC): they move between saves.
const TIME_MSRS: [u32; 1] = [0x10];
/// The LAPIC's timer current count register: counts down with time.
const APIC_TMCCT: std::ops::Range<usize> = 0x390..0x394;

fn same_vcpu(a: &VcpuState, b: &VcpuState) {
    let id = a.id;
    assert_eq!(a.id, b.id);
    assert_eq!(format!("{:?}", a.regs), format!("{:?}", b.regs), "vCPU {id} registers");
    assert_eq!(format!("{:?}", a.sregs), format!("{:?}", b.sregs), "vCPU {id} special registers");
    assert_eq!(format!("{:?}", a.xsave), format!("{:?}", b.xsave), "vCPU {id} XSAVE area");
    assert_eq!(format!("{:?}", a.xcrs), format!("{:?}", b.xcrs), "vCPU {id} XCRs");
    assert_eq!(format!("{:?}", a.debugregs), format!("{:?}", b.debugregs), "vCPU {id} debug registers");
    assert_eq!(format!("{:?}", a.mp_state), format!("{:?}", b.mp_state), "vCPU {id} MP state");
    assert_eq!(format!("{:?}", a.events), format!("{:?}", b.events), "vCPU {id} events");
    assert_eq!(a.tsc_khz, b.tsc_khz, "vCPU {id} TSC rate");
    assert_eq!(format!("{:?}", a.cpuid), format!("{:?}", b.cpuid), "vCPU {id} CPUID");
    let timeless = |s: &VcpuState| s.msrs.iter().filter(|(i, _)| !TIME_MSRS.contains(i)).copied().collect::<Vec<_>>();
    assert_eq!(timeless(a), timeless(b), "vCPU {id} MSRs");
    assert!(a.msrs.len() > 20, "vCPU {id}: only {} MSRs saved", a.msrs.len());
    let lapic = |s: &VcpuState| {
        let mut r: Vec<u8> = s.lapic.regs.iter().map(|&c| c as u8).collect();
        r[APIC_TMCCT].fill(0);
        r
    };
    assert_eq!(lapic(a), lapic(b), "vCPU {id} LAPIC");
}

fn same_vm(a: &KvmVmState, b: &KvmVmState) {
    assert_eq!(format!("{:?}", a.irqchips), format!("{:?}", b.irqchips), "PICs and IOAPIC");
    for (i, (x, y)) in a.pit.channels.iter().zip(&b.pit.channels).enumerate() {
        let without_time = |c: &kvm_bindings::kvm_pit_channel_state| kvm_bindings::kvm_pit_channel_state { count_load_time: 0, ..*c };
        assert_eq!(format!("{:?}", without_time(x)), format!("{:?}", without_time(y)), "PIT channel {i}");
    }
    assert_eq!(a.pit.flags, b.pit.flags, "PIT flags");
    // The clock goes on, from where it was.
    assert!(b.clock.clock >= a.clock.clock, "the restored clock went back: {} -> {}", a.clock.clock, b.clock.clock);
}

#[test]
fn a_running_guest_s_kvm_state_round_trips_into_a_new_vm_that_runs_on() {
    assert!(Path::new("/dev/kvm").exists(), "these tests need /dev/kvm");
    rvirt_vmm::vcpu::install_kick_handler().unwrap();
    let dir = tmpdir("roundtrip");
    let kernel = dir.join("kernel");
    // Many port exits: the save must complete the one in flight.
    std::fs::write(&kernel, bzimage_with(&print_every(b'x', 0x1000))).unwrap();
    let mut cfg = VmConfig::new(&kernel);
    cfg.memory_bytes = 64 << 20;
    cfg.vcpus = 2;
    let kvm = rvirt_vmm::open_kvm().unwrap();

    let (log1, log2) = (dir.join("one.log"), dir.join("two.log"));
    let mut one = build(&kvm, &cfg, &log1);
    one.start().unwrap();
    wait_for(&log1, 64);
    let saved = one.save_machine().unwrap();
    assert_eq!(saved.vcpus.len(), 2);
    // Through the file format, as a snapshot carries it.
    let bytes = state_file::encode(&saved).unwrap();
    let back: MachineState = state_file::decode(&bytes).unwrap();
    assert_eq!(state_file::encode(&back).unwrap(), bytes, "the state file round-trips byte for byte");
    // The fuzz target's seed is a state like this one (RVIRT_WRITE_STATE_SEED=FILE writes it).
    if let Some(seed) = std::env::var_os("RVIRT_WRITE_STATE_SEED") {
        std::fs::write(seed, &bytes).unwrap();
    }

    // A VM of another shape refuses it, saying what differs.
    let mut one_cpu = cfg.clone();
    one_cpu.vcpus = 1;
    let mut other = build(&kvm, &one_cpu, &dir.join("other.log"));
    let e = other.restore_machine(&back).unwrap_err().to_string();
    assert!(e.contains("2 vCPUs") && e.contains("this one 1"), "{e}");
    // So does one whose CPU features differ.
    let mut changed: MachineState = state_file::decode(&bytes).unwrap();
    changed.vcpus[1].cpuid[1].ecx ^= 1 << 28;
    let mut two_cpus = build(&kvm, &cfg, &dir.join("other2.log"));
    let e = two_cpus.restore_machine(&changed).unwrap_err().to_string();
    assert!(e.contains("vCPU 1") && e.contains("CPU features differ"), "{e}");

    // The restored VM, started paused, saves what it was given.
    let mut two = build(&kvm, &cfg, &log2);
    two.restore_machine(&back).unwrap();
    two.control().request_pause();
    two.start().unwrap();
    let again = two.save_machine().unwrap();
    for (a, b) in saved.vcpus.iter().zip(&again.vcpus) {
        same_vcpu(a, b);
    }
    same_vm(&saved.vm, &again.vm);

    // And it runs on from there while the first stays paused.
    two.resume();
    wait_for(&log2, 64);
    let printed = std::fs::read(&log2).unwrap();
    assert!(printed.iter().all(|&b| b == b'x'), "the restored guest prints what the first did");
    drop(two);
    drop(one);
    let _ = std::fs::remove_dir_all(&dir);
}
