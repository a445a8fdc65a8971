//! vCPU threads: each loops on `KVM_RUN`, dispatching port and MMIO exits to
//! the buses and reporting machine-level events to the [`VmControl`].
//!
//! A vCPU is interrupted ("kicked") with a real-time signal whose handler
//! sets `immediate_exit` in that thread's `kvm_run`, so a kick that lands just
//! before `KVM_RUN` is not lost. Kicked vCPUs re-check the control state:
//! stop, or park while paused.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use rvirt_devices::bus::lock;
use rvirt_devices::{Bus, PlatformControl, PlatformRequest};
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu_state::VcpuState;

/// Why the VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered itself off.
    PowerOff,
    /// The guest asked for a reset.
    Reset,
    /// Stopped from outside: the `stop` API request or a signal to the VMM.
    Stopped,
    /// The guest or KVM failed (triple fault, internal error, ...); the message says how.
    Crashed(String),
    /// The guest moved to another VMM (`migrate`), which runs it now; how it went.
    Migrated(String),
}

/// Names of the exit counters reported by the `stats` API request.
pub const EXIT_REASONS: [&str; 10] = [
    "io",
    "mmio",
    "io-unhandled",
    "mmio-unhandled",
    "interrupted",
    "hlt",
    "shutdown",
    "system-event",
    "dirty-ring-full",
    "other",
];

/// VM-exit counters, summed over all vCPUs.
#[derive(Default)]
pub struct ExitCounters {
    counts: [AtomicU64; EXIT_REASONS.len()],
}

impl ExitCounters {
    fn bump(&self, reason: &str) {
        if let Some(i) = EXIT_REASONS.iter().position(|r| *r == reason) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A snapshot of every counter by name.
    pub fn snapshot(&self) -> std::collections::BTreeMap<String, u64> {
        EXIT_REASONS
            .iter()
            .zip(&self.counts)
            .map(|(n, c)| (n.to_string(), c.load(Ordering::Relaxed)))
            .collect()
    }
}

#[derive(Default)]
struct RunFlags {
    paused: bool,
    /// Held off for a moment by a migration's auto-converge.
    throttled: bool,
    stopping: bool,
    parked: usize,
    /// What each vCPU reported ([`describe_vcpu`]) the last time it parked.
    reports: std::collections::BTreeMap<u8, String>,
    /// Bumped by [`VmControl::request_save`]: parked vCPUs save their state.
    save_generation: u64,
    /// Each vCPU's state for the current generation (or why it has none).
    saved: std::collections::BTreeMap<u8, (u64, std::result::Result<VcpuState, String>)>,
}

/// What a parked vCPU thread can be asked for: its state report, and its
/// whole state (for snapshots).
pub trait Parked {
    /// A human-readable report ([`describe_vcpu`]).
    fn report(&self) -> String;
    /// Everything KVM holds of this vCPU.
    fn save(&mut self) -> std::result::Result<VcpuState, String>;
}

/// State shared by the VMM's main thread and all vCPU threads.
pub struct VmControl {
    exit_evt: EventFd,
    exit: Mutex<Option<VmExit>>,
    flags: Mutex<RunFlags>,
    changed: Condvar,
    /// Exit counters for the `stats` request.
    pub counters: ExitCounters,
}

impl VmControl {
    /// Fresh control state for one boot of the VM.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            exit: Mutex::new(None),
            flags: Mutex::new(RunFlags::default()),
            changed: Condvar::new(),
            counters: ExitCounters::default(),
        })
    }

    /// The eventfd that becomes readable once the VM must stop.
    pub fn exit_eventfd(&self) -> &EventFd {
        &self.exit_evt
    }

    /// Records why the VM ends (the first reason wins) and wakes the main thread.
    pub fn exit(&self, why: VmExit) {
        let mut e = lock(&self.exit);
        if e.is_none() {
            *e = Some(why);
        }
        drop(e);
        let _ = self.exit_evt.write(1);
    }

    /// The recorded exit reason, if any.
    pub fn exit_reason(&self) -> Option<VmExit> {
        lock(&self.exit).clone()
    }

    /// Whether vCPUs are (being) paused.
    pub fn is_paused(&self) -> bool {
        lock(&self.flags).paused
    }

    fn set(&self, f: impl FnOnce(&mut RunFlags)) {
        f(&mut lock(&self.flags));
        self.changed.notify_all();
    }

    /// Asks vCPUs to park; the caller must kick them and then [`Self::wait_parked`].
    pub fn request_pause(&self) {
        self.set(|f| f.paused = true);
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.set(|f| f.paused = false);
    }

    /// Holds vCPUs off (`true`; the caller kicks them) or lets them go, for
    /// a migration's auto-converge; independent of pausing.
    pub fn set_throttled(&self, on: bool) {
        self.set(|f| f.throttled = on);
    }

    /// Asks vCPU threads to return; the caller must kick them.
    pub fn request_stop(&self) {
        self.set(|f| f.stopping = true);
    }

    /// Waits up to `timeout` until `n` vCPUs are parked.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let guard = lock(&self.flags);
        let (g, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |f| f.parked < n && !f.stopping)
            .unwrap_or_else(|e| e.into_inner());
        g.parked >= n
    }

    /// What each vCPU reported when it last parked, in vCPU order.
    pub fn parked_reports(&self) -> Vec<String> {
        lock(&self.flags).reports.values().cloned().collect()
    }

    /// Asks parked vCPUs for their whole state (the VM must be paused);
    /// collect it with [`VmControl::wait_saved`].
    pub fn request_save(&self) -> u64 {
        let mut generation = 0;
        self.set(|f| {
            f.save_generation += 1;
            generation = f.save_generation;
        });
        generation
    }

    /// Waits up to `timeout` for `n` vCPUs' states of `generation`; in vCPU order.
    pub fn wait_saved(&self, n: usize, generation: u64, timeout: Duration) -> Option<Vec<std::result::Result<VcpuState, String>>> {
        let guard = lock(&self.flags);
        let count = |f: &RunFlags| f.saved.values().filter(|(g, _)| *g == generation).count();
        let (mut g, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |f| count(f) < n && !f.stopping)
            .unwrap_or_else(|e| e.into_inner());
        if count(&g) < n {
            return None;
        }
        let taken = std::mem::take(&mut g.saved);
        Some(taken.into_values().filter(|(gen, _)| *gen == generation).map(|(_, s)| s).collect())
    }

    /// Called by vCPU `id` between runs: parks while paused, first leaving
    /// its report for [`VmControl::parked_reports`], and while parked saves
    /// its state when asked. Returns false when the thread must exit.
    fn checkpoint(&self, id: u8, vcpu: &mut impl Parked) -> bool {
        let mut f = lock(&self.flags);
        if f.stopping {
            return false;
        }
        if f.paused || f.throttled {
            if f.paused {
                f.reports.insert(id, vcpu.report());
            }
            f.parked += 1;
            self.changed.notify_all();
            while (f.paused || f.throttled) && !f.stopping {
                let generation = f.save_generation;
                let done = f.saved.get(&id).is_some_and(|(g, _)| *g == generation);
                if generation > 0 && !done {
                    // KVM calls outside the lock: other vCPUs save at the same time.
                    drop(f);
                    let state = vcpu.save();
                    f = lock(&self.flags);
                    f.saved.insert(id, (generation, state));
                    self.changed.notify_all();
                    continue;
                }
                f = self.changed.wait(f).unwrap_or_else(|e| e.into_inner());
            }
            f.parked -= 1;
            self.changed.notify_all();
        }
        !f.stopping
    }
}

impl PlatformControl for VmControl {
    fn request(&self, request: PlatformRequest) {
        self.exit(match request {
            PlatformRequest::PowerOff => VmExit::PowerOff,
            PlatformRequest::Reset => VmExit::Reset,
        });
    }
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only touches a const-initialised thread-local and a field of this
    // thread's own kvm_run mapping: async-signal-safe.
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: the pointer was set by this thread to its live kvm_run
        // mapping and is cleared before the VcpuFd is dropped.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler; call once per process before starting vCPUs.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// A vCPU thread's own view of its vCPU, for [`VmControl::checkpoint`].
struct OwnVcpu<'a> {
    vcpu: &'a mut VcpuFd,
    id: u8,
    cpuid: &'a [kvm_bindings::kvm_cpuid_entry2],
    msrs: &'a [u32],
}

impl Parked for OwnVcpu<'_> {
    fn report(&self) -> String {
        describe_vcpu(self.vcpu, self.id)
    }

    fn save(&mut self) -> std::result::Result<VcpuState, String> {
        // Complete the I/O or MMIO access the vCPU last exited for (its
        // result is in kvm_run, not yet in the registers): KVM_RUN with
        // immediate_exit finishes it and returns at once.
        self.vcpu.set_kvm_immediate_exit(1);
        let _ = self.vcpu.run();
        self.vcpu.set_kvm_immediate_exit(0);
        crate::vcpu_state::save_vcpu(self.vcpu, self.id, self.cpuid.to_vec(), self.msrs).map_err(|e| e.to_string())
    }
}

/// What a vCPU needs to run.
pub struct VcpuContext {
    /// Index (and APIC ID) of this vCPU.
    pub id: u8,
    /// Port I/O devices.
    pub io_bus: Arc<Bus>,
    /// MMIO devices.
    pub mmio_bus: Arc<Bus>,
    /// Shared control state.
    pub control: Arc<VmControl>,
    /// The CPUID it was given (kept with its saved state).
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// The MSRs to save ([`crate::vcpu_state::msr_list`]).
    pub msrs: Arc<[u32]>,
    /// The VM's dirty rings, when it has them: a vCPU whose ring is full harvests it.
    pub dirty_rings: Option<Arc<crate::dirty_ring::DirtyRings>>,
}

enum Next {
    Continue,
    Exit(VmExit, bool),
}

/// The body of a vCPU thread: runs until the VM stops.
pub fn run_vcpu(mut vcpu: VcpuFd, ctx: VcpuContext) {
    if let Err(e) = rvirt_sandbox::affinity::pin_vcpu_thread(ctx.id) {
        tracing::warn!("vCPU {}: {e}", ctx.id);
    }
    rvirt_sandbox::seccomp::enter_or_exit(rvirt_sandbox::ThreadKind::Vcpu);
    let run_ptr: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN.with(|c| c.set(run_ptr));
    let counters = &ctx.control.counters;
    let mut warned_mmio = 0u32;
    loop {
        let mut own = OwnVcpu { vcpu: &mut vcpu, id: ctx.id, cpuid: &ctx.cpuid, msrs: &ctx.msrs };
        if !ctx.control.checkpoint(ctx.id, &mut own) {
            break;
        }
        let next = match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    dispatch(counters, "io", ctx.io_bus.read(u64::from(port), data));
                    Next::Continue
                }
                VcpuExit::IoOut(port, data) => {
                    dispatch(counters, "io", ctx.io_bus.write(u64::from(port), data));
                    Next::Continue
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !dispatch(counters, "mmio", ctx.mmio_bus.read(addr, data)) {
                        warn_mmio(&mut warned_mmio, ctx.id, "read", addr);
                    }
                    Next::Continue
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !dispatch(counters, "mmio", ctx.mmio_bus.write(addr, data)) {
                        warn_mmio(&mut warned_mmio, ctx.id, "write", addr);
                    }
                    Next::Continue
                }
                VcpuExit::Hlt => {
                    // Only reachable without an in-kernel LAPIC; nothing to wake us.
                    counters.bump("hlt");
                    Next::Exit(VmExit::Crashed(format!("vCPU {} halted with no way to wake up", ctx.id)), true)
                }
                VcpuExit::Shutdown => {
                    counters.bump("shutdown");
                    Next::Exit(VmExit::Crashed(format!("vCPU {}: triple fault", ctx.id)), true)
                }
                VcpuExit::SystemEvent(kind, _) => {
                    counters.bump("system-event");
                    match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::Exit(VmExit::PowerOff, false),
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Exit(VmExit::Reset, false),
                        other => Next::Exit(VmExit::Crashed(format!("vCPU {}: system event {other}", ctx.id)), true),
                    }
                }
                VcpuExit::InternalError => {
                    counters.bump("other");
                    Next::Exit(VmExit::Crashed(format!("vCPU {}: KVM internal error", ctx.id)), true)
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    counters.bump("other");
                    let msg = format!("vCPU {}: VM entry failed (reason {reason:#x}, host CPU {cpu})", ctx.id);
                    Next::Exit(VmExit::Crashed(msg), true)
                }
                VcpuExit::Intr => {
                    counters.bump("interrupted");
                    Next::Continue
                }
                VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL) => {
                    counters.bump("dirty-ring-full");
                    match ctx.dirty_rings.as_ref().map(|r| r.harvest_full(usize::from(ctx.id))) {
                        Some(Ok(())) => Next::Continue,
                        Some(Err(e)) => Next::Exit(VmExit::Crashed(format!("vCPU {}: {e}", ctx.id)), false),
                        None => Next::Exit(VmExit::Crashed(format!("vCPU {}: a dirty ring filled on a VM without one", ctx.id)), false),
                    }
                }
                other => {
                    counters.bump("other");
                    tracing::warn!("vCPU {}: unsupported VM exit {other:?}; resuming", ctx.id);
                    Next::Continue
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                counters.bump("interrupted");
                vcpu.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Exit(VmExit::Crashed(format!("vCPU {}: KVM_RUN failed: {e}", ctx.id)), true),
        };
        if let Next::Exit(why, dump) = next {
            if dump {
                eprintln!("{}", describe_registers(&vcpu, ctx.id));
            }
            ctx.control.exit(why);
            break;
        }
    }
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

/// Counts one port or MMIO exit (and whether a device answered it); returns `handled`.
fn dispatch(counters: &ExitCounters, space: &str, handled: bool) -> bool {
    counters.bump(space);
    if !handled {
        counters.bump(&format!("{space}-unhandled"));
    }
    handled
}

fn warn_mmio(warned: &mut u32, id: u8, op: &str, addr: u64) {
    const LIMIT: u32 = 10;
    if *warned < LIMIT {
        tracing::warn!("vCPU {id}: guest {op} at unmapped MMIO address {addr:#x}; ignored");
        *warned += 1;
        if *warned == LIMIT {
            tracing::warn!("vCPU {id}: further unmapped MMIO accesses are counted, not logged");
        }
    }
}

/// Where a vCPU is and what could wake it: registers, run state, pending
/// events and the local APIC's timer and interrupt state. Answers the
/// `vcpu-state` request and SIGUSR2 (like QEMU's `info registers` and
/// `info lapic`), for guests that hang.
pub fn describe_vcpu(vcpu: &VcpuFd, id: u8) -> String {
    use std::fmt::Write as _;
    let mut s = describe_registers(vcpu, id);
    match vcpu.get_mp_state() {
        Ok(m) => {
            let state = match m.mp_state {
                kvm_bindings::KVM_MP_STATE_RUNNABLE => "runnable",
                kvm_bindings::KVM_MP_STATE_UNINITIALIZED => "waiting for INIT/SIPI",
                kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => "INIT received",
                kvm_bindings::KVM_MP_STATE_HALTED => "halted",
                kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED => "SIPI received",
                _ => "other",
            };
            let _ = write!(s, "\n  run state: {state} ({})", m.mp_state);
        }
        Err(e) => {
            let _ = write!(s, "\n  run state unavailable: {e}");
        }
    }
    if let Ok(ev) = vcpu.get_vcpu_events() {
        let _ = write!(
            s,
            "\n  pending: exception {} (vector {}), interrupt {} (vector {}), NMI {}, interrupt shadow {}",
            ev.exception.injected | ev.exception.pending,
            ev.exception.nr,
            ev.interrupt.injected,
            ev.interrupt.nr,
            ev.nmi.pending | ev.nmi.injected,
            ev.interrupt.shadow
        );
    }
    let mut msrs = match kvm_bindings::Msrs::from_entries(&[
        kvm_bindings::kvm_msr_entry { index: 0x10, ..Default::default() },
        kvm_bindings::kvm_msr_entry { index: 0x6e0, ..Default::default() },
    ]) {
        Ok(m) => m,
        Err(_) => return s,
    };
    if vcpu.get_msrs(&mut msrs) == Ok(2) {
        let (tsc, deadline) = (msrs.as_slice()[0].data, msrs.as_slice()[1].data);
        let due = match deadline {
            0 => "disarmed".to_string(),
            d if d <= tsc => format!("due {} cycles ago", tsc - d),
            d => format!("due in {} cycles", d - tsc),
        };
        let _ = write!(s, "\n  TSC {tsc:#x}, TSC deadline {deadline:#x} ({due})");
    }
    if let Ok(lapic) = vcpu.get_lapic() {
        let reg = |off: usize| -> u32 {
            let b = &lapic.regs[off..off + 4];
            u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
        };
        // IRR and ISR are 8 32-bit words each, 16 bytes apart.
        let vectors = |base: usize| -> Vec<String> {
            (0..256usize).filter(|v| reg(base + (v / 32) * 16) & (1 << (v % 32)) != 0).map(|v| format!("{v:#x}")).collect()
        };
        let lvt = reg(0x320);
        let mode = match (lvt >> 17) & 3 {
            0 => "one-shot",
            1 => "periodic",
            2 => "TSC-deadline",
            _ => "reserved",
        };
        let _ = write!(
            s,
            "\n  LAPIC: TPR {:#x}, timer LVT {lvt:#x} ({mode}{}, vector {:#x}), initial count {:#x}, current count {:#x}\n  LAPIC: requested [{}], in service [{}]",
            reg(0x80),
            if lvt & (1 << 16) != 0 { ", masked" } else { "" },
            lvt & 0xff,
            reg(0x380),
            reg(0x390),
            vectors(0x200).join(" "),
            vectors(0x100).join(" ")
        );
    }
    s
}

/// The vCPU's registers, for the report printed when the guest crashes.
pub fn describe_registers(vcpu: &VcpuFd, id: u8) -> String {
    let mut s = format!("rvirt-vmm: vCPU {id} state:\n");
    let regs = vcpu.get_regs();
    match &regs {
        Ok(r) => s.push_str(&format!(
            "  rip={:#018x} rsp={:#018x} rflags={:#010x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        )),
        Err(e) => s.push_str(&format!("  registers unavailable: {e}\n")),
    }
    match vcpu.get_sregs() {
        Ok(r) => {
            s.push_str(&format!(
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                r.cr0, r.cr2, r.cr3, r.cr4, r.efer, r.cs.selector
            ));
            if regs.as_ref().is_ok_and(|g| is_reset_state(g.rip, r.cs.selector, r.cr0)) {
                s.push_str("\n  (the power-on state: KVM on AMD reinitializes a vCPU after a shutdown, so its state at the fault is lost)");
            }
        }
        Err(e) => s.push_str(&format!("  system registers unavailable: {e}")),
    }
    s
}

/// Whether registers are the x86 power-on state (CS:IP F000:FFF0, real
/// mode), which is all a crash report can show after KVM on AMD has
/// reinitialized a vCPU that triple-faulted.
fn is_reset_state(rip: u64, cs: u16, cr0: u64) -> bool {
    rip == 0xfff0 && cs == 0xf000 && cr0 & 1 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_power_on_state_is_recognised_and_a_real_fault_is_not() {
        assert!(is_reset_state(0xfff0, 0xf000, 0x10));
        assert!(!is_reset_state(0xffff_ffff_8100_0000, 0x10, 0x8005_0033));
        assert!(!is_reset_state(0xfff0, 0xf000, 0x11), "protected mode at that address is not the reset state");
    }

    #[test]
    fn first_exit_reason_wins() {
        let c = VmControl::new().unwrap();
        c.request(PlatformRequest::PowerOff);
        c.request(PlatformRequest::Reset);
        assert_eq!(c.exit_reason(), Some(VmExit::PowerOff));
        assert!(c.exit_eventfd().read().unwrap() >= 1);
    }

    /// A paused control with one thread parked at its checkpoint.
    /// A vCPU that reports a fixed line and counts the saves asked of it.
    struct FakeVcpu(u32);

    impl Parked for FakeVcpu {
        fn report(&self) -> String {
            "vCPU 3 report".into()
        }
        fn save(&mut self) -> std::result::Result<VcpuState, String> {
            self.0 += 1;
            Err(format!("save {}", self.0))
        }
    }

    #[test]
    fn a_parked_vcpu_saves_once_per_request() {
        let (c, t) = parked_thread();
        let errors = |v: Option<Vec<std::result::Result<VcpuState, String>>>| v.map(|v| v.into_iter().map(|r| r.err()).collect::<Vec<_>>());
        let g1 = c.request_save();
        assert_eq!(errors(c.wait_saved(1, g1, Duration::from_secs(5))), Some(vec![Some("save 1".to_string())]));
        let g2 = c.request_save();
        assert_eq!(errors(c.wait_saved(1, g2, Duration::from_secs(5))), Some(vec![Some("save 2".to_string())]));
        // Two vCPUs are not there: no answer rather than a short one.
        let g3 = c.request_save();
        assert!(c.wait_saved(2, g3, Duration::from_millis(200)).is_none());
        c.resume();
        assert!(t.join().unwrap());
    }

    fn parked_thread() -> (Arc<VmControl>, std::thread::JoinHandle<bool>) {
        let c = Arc::new(VmControl::new().unwrap());
        c.request_pause();
        let t = {
            let c = c.clone();
            std::thread::spawn(move || c.checkpoint(3, &mut FakeVcpu(0)))
        };
        assert!(c.wait_parked(1, Duration::from_secs(5)));
        (c, t)
    }

    #[test]
    fn pause_parks_and_resume_releases() {
        let (c, t) = parked_thread();
        assert!(c.is_paused());
        assert_eq!(c.parked_reports(), vec!["vCPU 3 report".to_string()], "a parked vCPU leaves its report");
        c.resume();
        assert!(t.join().unwrap());
    }

    #[test]
    fn stop_releases_parked_threads() {
        let (c, t) = parked_thread();
        c.request_stop();
        assert!(!t.join().unwrap());
    }

    #[test]
    fn counters_snapshot_names_every_reason() {
        let c = ExitCounters::default();
        dispatch(&c, "io", true);
        dispatch(&c, "io", false);
        c.bump("nonsense");
        let s = c.snapshot();
        assert_eq!(s.len(), EXIT_REASONS.len());
        assert_eq!((s["io"], s["io-unhandled"]), (2, 1));
    }
}
