//! rvirt-vmm: the virtual machine monitor, one process per VM.
//!
//! Like qemu-kvm or Firecracker, it maps guest RAM into this process,
//! registers it with `/dev/kvm`, runs one thread per vCPU on `KVM_RUN` and
//! emulates the platform devices. [`run`] is the whole program; the binary
//! only parses arguments and reports errors.

pub mod acpi;
pub mod api_server;
pub mod config;
pub mod console;
pub mod device_manager;
pub mod dirty_ring;
pub mod error;
pub mod firmware;
pub mod handover;
#[doc(hidden)]
pub mod fuzzing;
pub mod inherited;
pub mod interrupts;
pub mod loader;
pub mod log_limit;
pub mod memory;
pub mod migration;
pub mod snapshot;
pub mod state_file;
pub mod vcpu;
pub mod vcpu_state;
pub mod virtio;
pub mod vm;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use kvm_ioctls::{Cap, Kvm};

pub use config::{Boot, OnReboot, SerialMode, VmConfig};
pub use error::{Error, Result};
pub use vcpu::VmExit;
pub use vm::Vm;

use api_server::ApiServer;
use console::{Console, EscapeFilter};
use rvirt_devices::bus::lock;

/// Opens `/dev/kvm` and checks it can run rvirt guests, explaining what to do when not.
pub fn open_kvm() -> Result<Kvm> {
    let kvm = Kvm::new().map_err(|e| {
        Error::Kvm(match e.errno() {
            libc::ENOENT | libc::ENODEV | libc::ENXIO => {
                "cannot open /dev/kvm: no such device (is the kvm module loaded and virtualization enabled?)".into()
            }
            libc::EACCES | libc::EPERM => {
                "cannot open /dev/kvm: permission denied (run as root or add the user to the kvm group)".into()
            }
            _ => format!("cannot open /dev/kvm: {e}"),
        })
    })?;
    if kvm.get_api_version() != 12 {
        return Err(Error::Kvm(format!("/dev/kvm speaks API version {}, rvirt needs 12", kvm.get_api_version())));
    }
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::UserMemory, "user memory"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Pit2, "PIT"),
        (Cap::ImmediateExit, "immediate exit"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::Kvm(format!("/dev/kvm lacks a required capability: {name}")));
        }
    }
    Ok(kvm)
}

/// The eventfds the signal handlers poke, by [`SignalFds`] slot:
/// termination (SIGTERM, SIGINT, SIGHUP) and a vCPU state report (SIGUSR2).
static SIGNAL_FDS: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];
const TERMINATE: usize = 0;
const REPORT: usize = 1;

fn poke(slot: usize) {
    let fd = SIGNAL_FDS[slot].load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) on an eventfd is async-signal-safe.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    poke(TERMINATE);
}

extern "C" fn on_report(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    poke(REPORT);
}

/// The eventfds one run's event loop waits on for signals; dropping it
/// clears [`SIGNAL_FDS`] (if still its own), so a signal after `run`
/// returns cannot write into a descriptor number that was reused.
struct SignalFds {
    terminate: vmm_sys_util::eventfd::EventFd,
    report: vmm_sys_util::eventfd::EventFd,
}

impl Drop for SignalFds {
    fn drop(&mut self) {
        for (slot, fd) in [(TERMINATE, self.terminate.as_raw_fd()), (REPORT, self.report.as_raw_fd())] {
            let _ = SIGNAL_FDS[slot].compare_exchange(fd, -1, Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}

/// Points the signal handlers at fresh eventfds for the duration of one
/// run. Handlers and the panic hook are process-wide and installed once,
/// however many VMs a process runs.
fn install_signal_handlers() -> Result<SignalFds> {
    static INSTALL: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    INSTALL
        .get_or_init(|| {
            vcpu::install_kick_handler().map_err(|e| format!("installing the vCPU kick handler: {e}"))?;
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
                    .map_err(|e| format!("installing signal handlers: {e}"))?;
            }
            vmm_sys_util::signal::register_signal_handler(libc::SIGUSR2, on_report)
                .map_err(|e| format!("installing signal handlers: {e}"))?;
            // A panic must not leave the user's terminal in raw mode.
            let default_hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                console::restore_terminal();
                default_hook(info);
            }));
            Ok(())
        })
        .clone()
        .map_err(Error::Process)?;
    let new = || vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).map_err(error::os("eventfd"));
    let fds = SignalFds { terminate: new()?, report: new()? };
    SIGNAL_FDS[TERMINATE].store(fds.terminate.as_raw_fd(), Ordering::SeqCst);
    SIGNAL_FDS[REPORT].store(fds.report.as_raw_fd(), Ordering::SeqCst);
    Ok(fds)
}

/// Boots the VM described by `cfg` and runs it until it powers off, is
/// stopped, crashes, or reboots with `--on-reboot exit`.
///
/// Everything the VM uses from the host (kernel, firmware, disks, taps,
/// sockets, `/dev/kvm`) is opened first; then, as configured, the process
/// enters its jail and each thread its seccomp list, and nothing is opened
/// by path again except a CD-ROM's new disc on request.
pub fn run(cfg: &VmConfig) -> Result<VmExit> {
    // A restore takes the VM's shape from its snapshot, read (and checked)
    // before anything else is opened.
    let mut restore = None;
    let mut incoming = None;
    let restored_cfg;
    let cfg = match &cfg.boot {
        config::Boot::Incoming { uri } => {
            let listener = migration::Listener::bind(uri)?;
            tracing::info!("waiting for a migration at {uri}");
            let inc = migration::accept(&listener)?;
            let c = snapshot::restored_config(cfg, &inc.hello.config);
            let c = match c {
                Ok(c) => c,
                Err(e) => {
                    inc.refuse(&e.to_string());
                    return Err(e);
                }
            };
            incoming = Some(inc);
            restored_cfg = c;
            &restored_cfg
        }
        config::Boot::Restore { dir, copy_memory } => {
            let (snap, memory_file, base) = snapshot::read(dir)?;
            let c = snapshot::restored_config(cfg, &snap.config)?;
            let how = if *copy_memory { memory::FromFile::Copy } else { memory::FromFile::Map };
            restore = Some((snap, memory_file, how, base));
            restored_cfg = c;
            &restored_cfg
        }
        _ => cfg,
    };
    config::validate(cfg)?;
    rvirt_sandbox::seccomp::set_mode(config::sandbox_seccomp(cfg.seccomp))?;
    rvirt_sandbox::affinity::configure(cfg.emulator_pin.clone(), cfg.vcpu_pins.clone())?;
    // Check the files before taking any resources, so errors are about them.
    // A restored VM runs the image its snapshot kept; the file only serves a reboot.
    let firmware = match &cfg.boot {
        config::Boot::Kernel { .. } | config::Boot::Restore { .. } | config::Boot::Incoming { .. } => None,
        config::Boot::Firmware { path, .. } if restore.is_some() || incoming.is_some() => firmware::read_image(path)
            .inspect_err(|e| tracing::warn!("{e}: a guest reboot will end the restored VM"))
            .ok(),
        config::Boot::Firmware { path, .. } => Some(firmware::read_image(path)?),
    };
    memory::check_host_can_provide(cfg.memory_bytes)?;
    let restored = restore.is_some() || incoming.is_some();
    let backends = if incoming.is_some() {
        virtio::Backends::open_incoming(cfg)
    } else if restored {
        virtio::Backends::open_restored(cfg)
    } else {
        virtio::Backends::open(cfg)
    };
    // A destination that cannot open what the guest needs says so while the source still runs it.
    let mut backends = match (backends, incoming.take()) {
        (Ok(b), Some(inc)) => match inc.hello.check_disks(&b) {
            Ok(()) => {
                incoming = Some(inc);
                b
            }
            Err(e) => {
                inc.refuse(&e.to_string());
                return Err(e);
            }
        },
        (Err(e), Some(inc)) => {
            inc.refuse(&e.to_string());
            return Err(e);
        }
        (b, None) => b?,
    };
    let kvm = open_kvm()?;
    let api = cfg.api_socket.as_deref().map(ApiServer::listen).transpose()?;
    let signals = install_signal_handlers()?;
    let console = Console::open(&cfg.serial)?;
    // Every file is open: descriptors passed for names go (the copies stay).
    rvirt_block::file::forget_passed();
    if let Some(jail) = &cfg.jail {
        config::sandbox_jail(jail).enter()?;
    }
    // Snapshots ask it which pages the guest touched (the jail opened it for its VMM).
    memory::open_pagemap(rvirt_sandbox::jail::take_pagemap());
    let api = api.map(api_server::ApiListener::serve).transpose()?;
    rvirt_sandbox::seccomp::enter(rvirt_sandbox::ThreadKind::Main)?;
    if console.is_raw() {
        eprintln!("rvirt-vmm: console on this terminal; press Ctrl-A x to quit\r");
    }
    let mut escape = EscapeFilter::default();
    let mut booted_once = false;
    loop {
        let moved = restore.is_some() || incoming.is_some();
        let mut vm = match (restore.take(), incoming.take()) {
            (None, Some(inc)) => {
                let mem = migration::destination_memory(cfg)?;
                let rom = inc.hello.firmware_rom.clone();
                let mut vm = Vm::create_restored(&kvm, cfg, console.writer()?, &backends, mem.clone(), rom.as_deref())?;
                if let Err(e) = vm.check_cpuids(&inc.hello.cpuids) {
                    inc.refuse(&e.to_string());
                    return Err(e);
                }
                let (snap, finish) = inc.receive(&mem)?;
                // The source let go of its writable disks before it sent the
                // state; if this VMM cannot run the guest after all, it lets go
                // of them before the source hears so and takes them back.
                let taken = backends.handovers.iter().try_for_each(|d| d.take()).and_then(|()| vm.restore_snapshot(snap));
                if let Err(e) = taken {
                    for d in &backends.handovers {
                        let _ = d.release();
                    }
                    finish.refuse(&e.to_string());
                    return Err(e);
                }
                finish.done()?;
                tracing::info!("the migrated guest runs here");
                vm
            }
            (Some((snap, file, how, base)), _) => {
                let layout = rvirt_arch::MemoryLayout::new(cfg.memory_bytes).map_err(|e| Error::Config(format!("the snapshot's memory: {e}")))?;
                let mem = memory::guest_memory_from_file(&layout, &file, how, base)?;
                let rom = snap.firmware_rom.clone();
                let mut vm = Vm::create_restored(&kvm, cfg, console.writer()?, &backends, mem, rom.as_deref())?;
                vm.restore_snapshot(snap)?;
                vm
            }
            (None, None) if restored && backends.kernel.is_none() && firmware.is_none() => {
                tracing::info!("the guest reset; the restored VM's kernel or firmware could not be opened, so it ends");
                return Ok(VmExit::Reset);
            }
            (None, None) => Vm::create(&kvm, cfg, console.writer()?, &backends, firmware.as_deref())?,
        };
        vm.serial_pty = console.pty_path.clone();
        // Only the first run: a guest reboot later runs at once.
        if cfg.start_paused && !booted_once {
            vm.control().request_pause();
        }
        booted_once = true;
        vm.start()?;
        // A guest that arrived behind new taps: the network learns where it is.
        if moved {
            for (tap, mac) in &backends.nets {
                if let Err(e) = tap.announce(*mac) {
                    tracing::warn!("announcing {} on tap {}: {e}", format_mac(mac), tap.name());
                }
            }
        }
        let exit = event_loop(&vm, &console, api.as_ref(), &signals, &mut escape);
        vm.stop();
        for (index, medium) in vm.current_media() {
            if let Some(d) = backends.disks.get_mut(index) {
                d.image = medium;
            }
        }
        match exit {
            VmExit::Reset if cfg.on_reboot == OnReboot::Restart => {
                tracing::info!("guest rebooted; restarting");
                continue;
            }
            other => {
                if let Some(api) = &api {
                    api.flush(Duration::from_secs(1));
                }
                return Ok(other);
            }
        }
    }
}

fn format_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Waits for and handles console input, API requests, signals and the VM's exit.
fn event_loop(vm: &Vm, console: &Console, api: Option<&ApiServer>, signals: &SignalFds, escape: &mut EscapeFilter) -> VmExit {
    let exit_fd = vm.control().exit_eventfd().as_raw_fd();
    let mut input_fd = console.input_fd();
    let mut pending_input: Vec<u8> = Vec::new();
    loop {
        if let Some(why) = vm.control().exit_reason() {
            return why;
        }
        let mut fds = vec![
            libc::pollfd { fd: exit_fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: signals.terminate.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: signals.report.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: vm.migration_eventfd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        if let Some(a) = api {
            fds.push(libc::pollfd { fd: a.wakeup_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        // Only read more input when the guest has room for it.
        let input_slot = match input_fd {
            Some(fd) if pending_input.is_empty() => {
                fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
                Some(fds.len() - 1)
            }
            _ => None,
        };
        let timeout = if pending_input.is_empty() { -1 } else { 10 };
        // SAFETY: fds is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return VmExit::Crashed(format!("poll failed: {err}"));
        }
        if fds[1].revents != 0 {
            let _ = signals.terminate.read();
            eprintln!("rvirt-vmm: terminated by signal\r");
            return VmExit::Stopped;
        }
        if fds[3].revents != 0 {
            if let Some(exit) = vm.on_migration_event() {
                return exit;
            }
        }
        if fds[2].revents != 0 {
            let _ = signals.report.read();
            match vm.vcpu_reports() {
                Ok(reports) => eprintln!("{}\r", reports.join("\n").replace('\n', "\r\n")),
                Err(e) => eprintln!("rvirt-vmm: vCPU state report: {e}\r"),
            }
        }
        if let Some(a) = api {
            let mut stop = false;
            for mut call in a.drain() {
                stop |= call.request == rvirt_api::Request::Stop;
                let response = vm.handle_with(&call.request, call.fd.take());
                call.respond(response);
            }
            // Even when the guest reset at the same moment (its exit reason
            // is then Reset): a stop asked for is never lost to a reboot.
            if stop {
                return VmExit::Stopped;
            }
        }
        if let Some(slot) = input_slot {
            let revents = fds[slot].revents;
            if revents & libc::POLLIN != 0 {
                let mut buf = [0u8; 256];
                // SAFETY: reading into a stack buffer we own.
                let r = unsafe { libc::read(fds[slot].fd, buf.as_mut_ptr().cast(), buf.len()) };
                if r > 0 {
                    let bytes = &buf[..r as usize];
                    if console.is_raw() {
                        let (to_guest, quit) = escape.filter(bytes);
                        if quit {
                            return VmExit::Stopped;
                        }
                        pending_input.extend_from_slice(&to_guest);
                    } else {
                        pending_input.extend_from_slice(bytes);
                    }
                } else if r == 0 {
                    // End of input (stdin closed): the guest keeps running.
                    input_fd = None;
                }
            } else if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                input_fd = None;
            }
        }
        if !pending_input.is_empty() {
            let taken = lock(vm.serial()).enqueue_input(&pending_input);
            pending_input.drain(..taken);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_fds_are_cleared_when_the_run_ends() {
        let fds = install_signal_handlers().unwrap();
        assert_eq!(SIGNAL_FDS[TERMINATE].load(Ordering::SeqCst), fds.terminate.as_raw_fd());
        assert_eq!(SIGNAL_FDS[REPORT].load(Ordering::SeqCst), fds.report.as_raw_fd());
        // A second install (a second VM in the same process) reuses the handlers.
        let fds2 = install_signal_handlers().unwrap();
        assert_eq!(SIGNAL_FDS[TERMINATE].load(Ordering::SeqCst), fds2.terminate.as_raw_fd());
        // The older run ending must not clear the newer run's descriptors...
        drop(fds);
        assert_eq!(SIGNAL_FDS[TERMINATE].load(Ordering::SeqCst), fds2.terminate.as_raw_fd());
        assert_eq!(SIGNAL_FDS[REPORT].load(Ordering::SeqCst), fds2.report.as_raw_fd());
        // ...and the newer one ending leaves nothing behind.
        drop(fds2);
        assert_eq!(SIGNAL_FDS[TERMINATE].load(Ordering::SeqCst), -1);
        assert_eq!(SIGNAL_FDS[REPORT].load(Ordering::SeqCst), -1);
    }
}
