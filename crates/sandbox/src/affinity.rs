//! CPU pinning (libvirt's `<vcpupin>` and `<emulatorpin>`): each vCPU
//! thread on its own host CPUs, every other thread of the VMM on the
//! emulator's. Threads pin themselves as they start, before their seccomp
//! list, so no list needs more than the vCPU's `sched_setaffinity`.

use std::sync::OnceLock;

/// Why a pin cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    /// A CPU set names no CPU this process may run on.
    #[error("{what}: CPUs {asked:?} include none this process may run on (it may use {allowed:?})")]
    Unavailable {
        /// Which pin.
        what: String,
        /// What was asked.
        asked: Vec<usize>,
        /// What the host allows.
        allowed: Vec<usize>,
    },
    /// sched_getaffinity or sched_setaffinity failed.
    #[error("CPU affinity: {0}")]
    Os(#[source] std::io::Error),
}

struct Pins {
    /// The CPUs the process could use before any pin: unpinned vCPUs go back to them.
    all: Vec<usize>,
    emulator: Option<Vec<usize>>,
    vcpus: Vec<(u8, Vec<usize>)>,
}

static PINS: OnceLock<Pins> = OnceLock::new();

/// The CPUs the calling thread may run on.
pub fn current() -> Result<Vec<usize>, AffinityError> {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity fills at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most the set's size into the set we own.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Err(AffinityError::Os(std::io::Error::last_os_error()));
    }
    // SAFETY: CPU_ISSET reads the set we own, for CPUs below its capacity.
    Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

/// Runs the calling thread on `cpus` only.
pub fn pin(cpus: &[usize]) -> Result<(), AffinityError> {
    // SAFETY: as in `current`; CPU_SET writes only CPUs below the set's capacity.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: the CPU is below the set's capacity (filtered above).
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: sched_setaffinity reads the set we own.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(AffinityError::Os(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Records the pins (once, before any thread starts), checks each can be
/// honoured, and pins the calling (main) thread to the emulator's CPUs.
pub fn configure(emulator: Option<Vec<usize>>, vcpus: Vec<(u8, Vec<usize>)>) -> Result<(), AffinityError> {
    if emulator.is_none() && vcpus.is_empty() {
        return Ok(());
    }
    let all = current()?;
    let check = |what: String, cpus: &[usize]| {
        if cpus.iter().any(|c| all.contains(c)) {
            Ok(())
        } else {
            Err(AffinityError::Unavailable { what, asked: cpus.to_vec(), allowed: all.clone() })
        }
    };
    if let Some(e) = &emulator {
        check("--emulator-pin".into(), e)?;
    }
    for (v, cpus) in &vcpus {
        check(format!("--vcpu-pin {v}"), cpus)?;
    }
    let _ = PINS.set(Pins { all, emulator, vcpus });
    pin_emulator_thread()
}

/// Pins a thread that is not a vCPU (main, device worker, API) to the
/// emulator's CPUs, when pinned.
pub fn pin_emulator_thread() -> Result<(), AffinityError> {
    match PINS.get().and_then(|p| p.emulator.as_deref()) {
        Some(cpus) => pin(cpus),
        None => Ok(()),
    }
}

/// Pins vCPU `id`'s thread to its CPUs; an unpinned vCPU gets back every
/// CPU the process had (it would otherwise inherit the emulator's pin).
pub fn pin_vcpu_thread(id: u8) -> Result<(), AffinityError> {
    let Some(p) = PINS.get() else { return Ok(()) };
    match p.vcpus.iter().find(|(v, _)| *v == id) {
        Some((_, cpus)) => pin(cpus),
        None if p.emulator.is_some() => pin(&p.all),
        None => Ok(()),
    }
}
