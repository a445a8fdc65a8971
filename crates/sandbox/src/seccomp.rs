//! Per-thread seccomp allow-lists (x86_64).
//!
//! Each kind of thread in `rvirt-vmm` installs the list for its kind when it
//! starts ([`enter`]). A thread inherits the filters of the thread that made
//! it and the kernel applies all of them, so the lists nest: the main thread
//! (which builds VMs and starts everything else) holds the widest list, a
//! vCPU thread (which starts device workers when the guest activates a
//! device) a narrower one, a device worker the narrowest of the three. The
//! API threads answer sockets and nothing else.
//!
//! In [`SeccompMode::Kill`] a forbidden call raises `SIGSYS`; the handler
//! installed by [`set_mode`] names the thread kind and the call on stderr and
//! ends the process with status 159 (128 + SIGSYS). [`SeccompMode::Log`]
//! allows the call and lets the kernel's audit log record it.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The exit status of a VMM stopped by its seccomp filter (128 + SIGSYS).
pub const KILLED_STATUS: i32 = 128 + libc::SIGSYS;

/// The environment variable that makes the first thread of a kind make a
/// forbidden call right after installing its list (tests prove the list
/// holds with it); its value is a [`ThreadKind`] name.
pub const SELFTEST_ENV: &str = "RVIRT_SECCOMP_SELFTEST";

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules (a bug in the lists).
    #[error("building the {kind} seccomp filter: {source}")]
    Build {
        /// The thread kind.
        kind: ThreadKind,
        /// seccompiler's reason.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("installing the {kind} seccomp filter: {source}")]
    Install {
        /// The thread kind.
        kind: ThreadKind,
        /// seccompiler's reason.
        #[source]
        source: seccompiler::Error,
    },
    /// Seccomp lists exist for x86_64 only.
    #[error("seccomp filters are written for x86_64; run with --seccomp off on this architecture")]
    Arch,
    /// The SIGSYS handler could not be installed.
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
}

/// What a forbidden system call does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SeccompMode {
    /// Stop the VMM (the default).
    #[default]
    Kill,
    /// Allow it and let the kernel's audit log record it (for finding what a
    /// new feature needs).
    Log,
    /// No filters at all.
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(Self::Kill),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            _ => Err(format!("--seccomp must be kill, log or off, not '{s}'")),
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kill => "kill",
            Self::Log => "log",
            Self::Off => "off",
        })
    }
}

/// The kinds of thread, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: builds the VM (again on reboot), runs the event loop
    /// and the API requests.
    Main,
    /// A vCPU on `KVM_RUN`, emulating the devices the guest touches.
    Vcpu,
    /// A device worker serving virtio queues, or the RTC's ticker.
    Worker,
    /// The API socket's poll and worker threads.
    Api,
    /// The jail's outer process, which only waits for the VMM and forwards signals.
    Reaper,
}

impl ThreadKind {
    const ALL: [ThreadKind; 5] = [Self::Main, Self::Vcpu, Self::Worker, Self::Api, Self::Reaper];

    /// The name used in messages and by [`SELFTEST_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Vcpu => "vcpu",
            Self::Worker => "worker",
            Self::Api => "api",
            Self::Reaper => "reaper",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const MODE_UNSET: u8 = 0;
static MODE: AtomicU8 = AtomicU8::new(MODE_UNSET);
static SELFTEST: OnceLock<Option<ThreadKind>> = OnceLock::new();

thread_local! {
    /// This thread's kind, for the SIGSYS handler (0: none yet).
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Sets the process-wide mode, once, before any [`enter`]; in `Kill` mode
/// installs the SIGSYS handler that reports a forbidden call.
pub fn set_mode(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode != SeccompMode::Off && !cfg!(target_arch = "x86_64") {
        return Err(SeccompError::Arch);
    }
    if mode == SeccompMode::Kill {
        install_sigsys_handler()?;
    }
    if mode != SeccompMode::Off {
        // glibc's malloc reads /sys/devices/system/cpu/online the first time
        // a thread needs an arena of its own, which may be a device worker
        // long after every list forbids opening files; a fixed limit (its
        // default, 8 per CPU) spares it the look.
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        // SAFETY: mallopt only sets an allocator parameter.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, i32::try_from(cpus * 8).unwrap_or(64)) };
    }
    let _ = SELFTEST.set(std::env::var(SELFTEST_ENV).ok().and_then(|v| ThreadKind::ALL.into_iter().find(|k| k.name() == v)));
    MODE.store(mode as u8 + 1, Ordering::SeqCst);
    Ok(())
}

/// The mode [`set_mode`] chose; `Off` when it was never called (libraries
/// and their tests run unfiltered).
pub fn mode() -> SeccompMode {
    match MODE.load(Ordering::SeqCst) {
        1 => SeccompMode::Kill,
        2 => SeccompMode::Log,
        _ => SeccompMode::Off,
    }
}

/// Installs the list for `kind` on the calling thread (nothing in `Off`
/// mode). The main thread also installs the filter that makes `clone3`
/// answer ENOSYS, so threads are made with `clone`, whose flags the lists
/// can check.
pub fn enter(kind: ThreadKind) -> Result<(), SeccompError> {
    // Pinned first, under the parent's list (a vCPU pins itself in run_vcpu).
    if matches!(kind, ThreadKind::Worker | ThreadKind::Api) {
        if let Err(e) = crate::affinity::pin_emulator_thread() {
            tracing::warn!("{kind} thread: {e}");
        }
    }
    let mode = mode();
    if mode == SeccompMode::Off {
        return Ok(());
    }
    static PROGRAMS: [OnceLock<BpfProgram>; 5] = [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()];
    if kind == ThreadKind::Main || kind == ThreadKind::Reaper {
        let no_clone3 = no_clone3_filter().map_err(|source| SeccompError::Build { kind, source })?;
        seccompiler::apply_filter(&no_clone3).map_err(|source| SeccompError::Install { kind, source })?;
    }
    let program = match PROGRAMS[kind.index()].get() {
        Some(p) => p,
        None => {
            let built = build(kind, mode).map_err(|source| SeccompError::Build { kind, source })?;
            PROGRAMS[kind.index()].get_or_init(|| built)
        }
    };
    KIND.with(|k| k.set(kind.index() as u8 + 1));
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { kind, source })?;
    if SELFTEST.get().copied().flatten() == Some(kind) {
        selftest(kind);
    }
    Ok(())
}

/// [`enter`] for threads that have no one to return an error to: a thread
/// that cannot be confined stops the process rather than run unconfined.
pub fn enter_or_exit(kind: ThreadKind) {
    if let Err(e) = enter(kind) {
        eprintln!("rvirt-vmm: {e}");
        // SAFETY: ends the process; nothing is left half-done that matters more than confinement.
        unsafe { libc::_exit(1) };
    }
}

/// Makes the call a compromised thread of `kind` would want and its list
/// forbids: opening `/etc/shadow`, or for the main thread (which may open
/// files, and Unix and IP sockets for a migration) a raw packet socket.
fn selftest(kind: ThreadKind) {
    // SAFETY: plain system calls on constant arguments; their results are not used.
    unsafe {
        match kind {
            ThreadKind::Main => libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0),
            _ => libc::open(c"/etc/shadow".as_ptr(), libc::O_RDONLY),
        };
    }
}

fn no_clone3_filter() -> Result<BpfProgram, seccompiler::BackendError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), TargetArch::x86_64)?
        .try_into()
}

fn build(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, seccompiler::BackendError> {
    let mismatch = if mode == SeccompMode::Log { SeccompAction::Log } else { SeccompAction::Trap };
    // None: allowed whatever the arguments; Some: allowed when one rule matches.
    let mut per_call: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for (nr, rule) in allow_list(kind)? {
        let entry = per_call.entry(nr).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), rule) {
            (_, None) => *entry = None,
            (Some(rules), Some(r)) => rules.push(r),
            (None, Some(_)) => {}
        }
    }
    let rules = per_call.into_iter().map(|(nr, r)| (nr, r.unwrap_or_default())).collect();
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)?.try_into()
}

/// The calls `kind` may make whatever their arguments.
#[cfg(test)]
fn allowed_any(kind: ThreadKind) -> Vec<i64> {
    allow_list(kind).map(|l| l.into_iter().filter(|(_, r)| r.is_none()).map(|(n, _)| n).collect()).unwrap_or_default()
}

type Entry = (i64, Option<SeccompRule>);

fn any(nr: i64) -> Entry {
    (nr, None)
}

/// Allowed when argument `arg` equals one of `values`.
fn arg_in(nr: i64, arg: u8, values: &[u64]) -> Result<Vec<Entry>, seccompiler::BackendError> {
    values.iter().map(|&v| Ok((nr, Some(SeccompRule::new(vec![Cond::new(arg, Len::Qword, Op::Eq, v)?])?)))).collect()
}

/// Allowed when the bits of argument `arg` under `mask` equal `value`.
fn arg_masked(nr: i64, arg: u8, mask: u64, value: u64) -> Result<Entry, seccompiler::BackendError> {
    Ok((nr, Some(SeccompRule::new(vec![Cond::new(arg, Len::Qword, Op::MaskedEq(mask), value)?])?)))
}

/// The `_IOC_TYPE` byte of ioctl request numbers.
const IOCTL_TYPE_MASK: u64 = 0xff00;
/// KVM's ioctls (on /dev/kvm, VM and vCPU descriptors).
const KVM_IO: u64 = 0xae00;
/// Terminal and tun ioctls share type 'T'.
const TTY_TUN_IO: u64 = 0x5400;
/// Block device ioctls (a disk's size).
const BLOCK_IO: u64 = 0x1200;

/// What Rust's runtime, the allocator, logging and thread exit need on every thread.
fn common() -> Result<Vec<Entry>, seccompiler::BackendError> {
    use libc::*;
    let mut v: Vec<Entry> = [
        SYS_brk, SYS_mmap, SYS_munmap, SYS_mremap, SYS_mprotect, SYS_madvise, SYS_futex, SYS_sched_yield,
        SYS_sched_getaffinity, SYS_clock_gettime, SYS_clock_nanosleep, SYS_nanosleep, SYS_gettid, SYS_getpid,
        SYS_rt_sigreturn, SYS_rt_sigprocmask, SYS_sigaltstack, SYS_exit, SYS_exit_group, SYS_write, SYS_writev,
        SYS_close, SYS_restart_syscall, SYS_getrandom, SYS_rseq, SYS_set_robust_list,
        // A thread adds its own list under its parent's (filters only ever narrow).
        SYS_seccomp,
    ]
    .into_iter()
    .map(any)
    .collect();
    // A thread names itself as it starts and sets no_new_privs before its
    // filter; a panic aborts through tgkill.
    v.extend(arg_in(SYS_prctl, 0, &[PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64, PR_SET_SECCOMP as u64])?);
    v.extend(arg_in(SYS_tgkill, 2, &[SIGABRT as u64])?);
    // Descriptor flags and duplicates (Rust checks descriptors with F_GETFD).
    v.extend(arg_in(SYS_fcntl, 1, &[F_DUPFD_CLOEXEC as u64, F_GETFD as u64, F_SETFD as u64, F_GETFL as u64, F_SETFL as u64])?);
    Ok(v)
}

/// A device worker: queue I/O on images, taps, eventfds and guest memory.
fn worker() -> Result<Vec<Entry>, seccompiler::BackendError> {
    use libc::*;
    let mut v = common()?;
    v.extend(
        [
            SYS_read, SYS_readv, SYS_pread64, SYS_preadv, SYS_preadv2, SYS_pwrite64, SYS_pwritev, SYS_pwritev2,
            SYS_lseek, SYS_fsync, SYS_fdatasync, SYS_fallocate, SYS_ftruncate, SYS_fstat, SYS_newfstatat, SYS_statx,
            SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_wait, SYS_epoll_pwait, SYS_poll, SYS_ppoll,
        ]
        .into_iter()
        .map(any),
    );
    Ok(v)
}

/// A vCPU: KVM's ioctls, device emulation, and starting device workers
/// (threads only: `clone` must carry CLONE_THREAD, so no fork and no namespaces).
fn vcpu() -> Result<Vec<Entry>, seccompiler::BackendError> {
    use libc::*;
    let mut v = worker()?;
    // sched_setaffinity: the workers it starts pin themselves to the emulator's CPUs.
    v.extend([SYS_eventfd2, SYS_clone3, SYS_sched_setaffinity].into_iter().map(any));
    v.push(arg_masked(SYS_clone, 0, CLONE_THREAD as u64, CLONE_THREAD as u64)?);
    v.push(arg_masked(SYS_ioctl, 1, IOCTL_TYPE_MASK, KVM_IO)?);
    v.push(arg_masked(SYS_ioctl, 1, IOCTL_TYPE_MASK, TTY_TUN_IO)?);
    Ok(v)
}

/// The API socket's threads: accept, read, answer.
fn api() -> Result<Vec<Entry>, seccompiler::BackendError> {
    use libc::*;
    let mut v = common()?;
    v.extend(
        [
            SYS_read, SYS_recvfrom, SYS_recvmsg, SYS_sendto, SYS_sendmsg, SYS_accept4, SYS_shutdown, SYS_getsockopt,
            SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_wait, SYS_epoll_pwait, SYS_poll, SYS_ppoll,
        ]
        .into_iter()
        .map(any),
    );
    v.extend(arg_in(SYS_ioctl, 1, &[FIONBIO as u64, FIOCLEX as u64])?);
    Ok(v)
}

/// The main thread: everything the others do (they start from it), and
/// building VMs: KVM's ioctls, the terminal, opening a CD-ROM's new disc
/// or a migrated disk's image, image locks, kicking vCPUs, making a snapshot's directory.
fn main_thread() -> Result<Vec<Entry>, seccompiler::BackendError> {
    use libc::*;
    let mut v = vcpu()?;
    v.extend(api()?);
    v.extend(
        [
            SYS_openat, SYS_fcntl, SYS_dup, SYS_dup3, SYS_pipe2, SYS_unlink, SYS_unlinkat, SYS_sched_setaffinity,
            SYS_getuid, SYS_geteuid, SYS_getgid, SYS_getegid, SYS_sysinfo, SYS_uname, SYS_flock, SYS_mkdir, SYS_mkdirat,
            // Taking back (or over) a migrated disk reopens its image: a
            // qcow2 chain's paths are made canonical to catch loops.
            SYS_readlink, SYS_readlinkat,
        ]
        .into_iter()
        .map(any),
    );
    v.push(arg_masked(SYS_ioctl, 1, IOCTL_TYPE_MASK, BLOCK_IO)?);
    // glibc installs its two internal handlers (cancellation, setxid: the
    // real-time signals 32 and 33) when the process makes its first thread.
    v.extend(arg_in(SYS_rt_sigaction, 0, &[32, 33])?);
    // vCPUs are kicked out of KVM_RUN with a real-time signal.
    v.extend(arg_in(SYS_tgkill, 2, &[SIGRTMIN() as u64])?);
    // A live migration's thread connects to the destination (Unix or TCP
    // socket, with timeouts): no other kind of socket.
    v.extend(arg_in(SYS_socket, 0, &[AF_UNIX as u64, AF_INET as u64, AF_INET6 as u64])?);
    v.extend([SYS_connect, SYS_setsockopt].into_iter().map(any));
    Ok(v)
}

/// The jail's outer process: wait, forward signals, exit with the VMM's status.
fn reaper() -> Result<Vec<Entry>, seccompiler::BackendError> {
    use libc::*;
    let mut v = common()?;
    v.extend([SYS_wait4, SYS_kill, SYS_rt_sigaction].into_iter().map(any));
    Ok(v)
}

fn allow_list(kind: ThreadKind) -> Result<Vec<Entry>, seccompiler::BackendError> {
    match kind {
        ThreadKind::Main => main_thread(),
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::Worker => worker(),
        ThreadKind::Api => api(),
        ThreadKind::Reaper => reaper(),
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO is valid.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Writes "rvirt-vmm: seccomp: the <kind> thread made forbidden system call
/// <nr>; stopping" and ends the process. Async-signal-safe: a stack buffer,
/// write(2) and exit_group(2), both on every list.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The kernel's SIGSYS siginfo holds the call number as an int 8 bytes
    // into the union after the three leading ints and their padding (offset 24).
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let kind = KIND.with(|k| k.get());
    let name = match kind.checked_sub(1).and_then(|i| ThreadKind::ALL.get(usize::from(i))) {
        Some(k) => k.name(),
        // A thread that has not installed its own list yet runs under its parent's.
        None => "new",
    };
    let mut buf = [0u8; 160];
    let mut n = 0;
    for part in [b"rvirt-vmm: seccomp: the ".as_slice(), name.as_bytes(), b" thread made forbidden system call ".as_slice()] {
        let take = part.len().min(buf.len() - n);
        buf[n..n + take].copy_from_slice(&part[..take]);
        n += take;
    }
    let mut digits = [0u8; 12];
    let mut d = digits.len();
    let mut x = i64::from(nr).unsigned_abs();
    loop {
        d -= 1;
        digits[d] = b'0' + (x % 10) as u8;
        x /= 10;
        if x == 0 || d == 0 {
            break;
        }
    }
    for part in [&digits[d..], b"; stopping (see --seccomp)\n".as_slice()] {
        let take = part.len().min(buf.len() - n);
        buf[n..n + take].copy_from_slice(&part[..take]);
        n += take;
    }
    // SAFETY: write(2) from a stack buffer and exit_group(2) are async-signal-safe.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::syscall(libc::SYS_exit_group, KILLED_STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_builds() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::Kill, SeccompMode::Log] {
                build(kind, mode).unwrap_or_else(|e| panic!("{kind} {mode}: {e}"));
            }
        }
    }

    #[test]
    fn lists_nest_as_threads_are_made() {
        // A thread's effective list is its own within its parent's: each
        // unconditional entry of a child must be allowed by its parent.
        let names = |k| allowed_any(k);
        for (child, parent) in [(ThreadKind::Vcpu, ThreadKind::Main), (ThreadKind::Worker, ThreadKind::Vcpu), (ThreadKind::Api, ThreadKind::Main)] {
            let p = allow_list(parent).unwrap();
            for nr in names(child) {
                assert!(p.iter().any(|(n, _)| *n == nr), "{child} allows call {nr} that {parent} does not");
            }
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for m in [SeccompMode::Kill, SeccompMode::Log, SeccompMode::Off] {
            assert_eq!(m.to_string().parse::<SeccompMode>().unwrap(), m);
        }
        assert!("strict".parse::<SeccompMode>().unwrap_err().contains("kill, log or off"));
    }
}
