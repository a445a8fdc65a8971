//! The jail: once a VMM has opened every file it was given, it moves into
//! mount, PID, IPC, UTS and network namespaces of its own whose root is an
//! empty read-only tmpfs, drops every capability (and the bounding set),
//! switches to an unprivileged uid/gid when given one, and sets
//! `no_new_privs`. From then on no path leads anywhere on the host.
//!
//! A new PID namespace only takes effect for children, so [`Jail::enter`]
//! forks: the child becomes PID 1 of the namespace and carries on as the
//! VMM; the caller's process stays outside as the *reaper*, equally
//! confined, which forwards signals to it and exits with its status (and
//! the VMM dies with it if the reaper is killed).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::seccomp::{self, ThreadKind};

/// Why the jail could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Namespaces and mounts need root.
    #[error("--jail needs root (it makes namespaces and mounts); run as root or without --jail")]
    NotRoot,
    /// Threads would stay behind outside the namespaces.
    #[error("the jail must be entered before any thread starts ({0} threads running)")]
    Threads(usize),
    /// A step failed.
    #[error("jail: {step}: {source}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// The system's reason.
        #[source]
        source: io::Error,
    },
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> JailError {
    move |source| JailError::Step { step, source }
}

fn check(rc: libc::c_int, what: &'static str) -> Result<(), JailError> {
    if rc < 0 {
        Err(JailError::Step { step: what, source: io::Error::last_os_error() })
    } else {
        Ok(())
    }
}

fn cstring(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Step {
        step: "jail directory",
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}

/// Where and as whom a VMM is confined.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jail {
    /// A directory (created if missing) over which the VMM mounts, in its
    /// own mount namespace, the empty tmpfs that becomes its root; the host
    /// sees the directory unchanged.
    pub root: PathBuf,
    /// The uid and gid to run as; `None` keeps uid 0 without capabilities.
    pub user: Option<(u32, u32)>,
}

/// The default [`Jail::root`].
pub const DEFAULT_JAIL_ROOT: &str = "/run/rvirt/jail";

/// Set in the VMM once it is inside its jail.
static JAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether this process is a VMM inside its jail (where no host path resolves).
pub fn jailed() -> bool {
    JAILED.load(Ordering::SeqCst)
}

/// The VMM's own `/proc/self/pagemap`, opened as it entered the jail (which
/// has no /proc): read-only, about itself (which pages of its memory were
/// ever touched, so a snapshot need not read the others).
static PAGEMAP: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

/// Takes the page map [`Jail::enter`] opened for the jailed VMM.
pub fn take_pagemap() -> Option<std::fs::File> {
    PAGEMAP.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// The VMM's pid as the reaper sees it, for forwarding signals.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

impl Jail {
    /// Enters the jail. Returns `Ok` in the VMM, which is now PID 1 of its
    /// namespaces; the calling process becomes the reaper and never returns.
    /// Must be called before any thread is started.
    pub fn enter(&self) -> Result<(), JailError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(JailError::NotRoot);
        }
        let threads = thread_count();
        if threads > 1 {
            return Err(JailError::Threads(threads));
        }
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(63);
        std::fs::create_dir_all(&self.root).map_err(step("creating the jail directory"))?;
        // The host's /proc, held only until the VMM (after the fork) has
        // opened its own page map through it: nothing else runs meanwhile.
        let proc_dir = std::fs::File::open("/proc").ok();
        let root = cstring(&self.root)?;
        let old = cstring(&self.root.join(".old"))?;
        // SAFETY: plain system calls on NUL-terminated strings we own; each result is checked.
        unsafe {
            check(
                libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET),
                "unshare (mount, PID, IPC, UTS and network namespaces)",
            )?;
            // Nothing mounted from here on reaches the host.
            check(libc::mount(std::ptr::null(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()), "making mounts private")?;
            check(
                libc::mount(
                    c"rvirt-jail".as_ptr(),
                    root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"size=16k,nr_inodes=8,mode=0755".as_ptr().cast(),
                ),
                "mounting the jail's tmpfs",
            )?;
            check(libc::mkdir(old.as_ptr(), 0o700), "making the jail's pivot directory")?;
            if libc::syscall(libc::SYS_pivot_root, root.as_ptr(), old.as_ptr()) == 0 {
                check(libc::chdir(c"/".as_ptr()), "chdir /")?;
                check(libc::umount2(c"/.old".as_ptr(), libc::MNT_DETACH), "detaching the host's root")?;
                check(libc::rmdir(c"/.old".as_ptr()), "removing the pivot directory")?;
            } else if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                // The root is the initial ramfs (an initramfs-only host such
                // as the lab's L1), which cannot be pivoted away: move the
                // tmpfs over it and chroot, as switch_root does. Without
                // CAP_SYS_CHROOT (dropped below) there is no way back out.
                check(libc::rmdir(old.as_ptr()), "removing the pivot directory")?;
                check(libc::chdir(root.as_ptr()), "chdir to the jail")?;
                check(libc::mount(c".".as_ptr(), c"/".as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()), "moving the jail over /")?;
                check(libc::chroot(c".".as_ptr()), "chroot")?;
                check(libc::chdir(c"/".as_ptr()), "chdir /")?;
            } else {
                return Err(JailError::Step { step: "pivot_root", source: io::Error::last_os_error() });
            }
            check(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ),
                "making the jail read-only",
            )?;
            let host = b"rvirt-vmm";
            check(libc::sethostname(host.as_ptr().cast(), host.len()), "sethostname")?;
        }
        // A handle on the reaper, which the VMM looks at once its death
        // signal is armed: the reaper may already have died before, and the
        // signal would then never come (getppid says nothing here: the VMM's
        // parent is outside its PID namespace).
        // SAFETY: pidfd_open on our own pid; the result is checked.
        let reaper = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) } as libc::c_int;
        check(reaper, "pidfd_open")?;
        // SAFETY: the process has one thread (checked above), so the child
        // may go on running Rust code.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => {
                let source = io::Error::last_os_error();
                // SAFETY: closing the descriptor opened above.
                unsafe { libc::close(reaper) };
                Err(JailError::Step { step: "fork", source })
            }
            0 => {
                if let Some(dir) = proc_dir {
                    use std::os::fd::{AsRawFd, FromRawFd};
                    // "self" in the host's procfs is this process by its host pid.
                    // SAFETY: openat on a directory descriptor we own with a constant path.
                    let fd = unsafe { libc::openat(dir.as_raw_fd(), c"self/pagemap".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
                    drop(dir);
                    if fd >= 0 {
                        // SAFETY: a descriptor just opened and owned by nothing else.
                        *PAGEMAP.lock().unwrap_or_else(|p| p.into_inner()) = Some(unsafe { std::fs::File::from_raw_fd(fd) });
                    }
                }
                drop_privileges(self.user, last_cap)?;
                JAILED.store(true, Ordering::SeqCst);
                // After the uid change, which would clear it: the VMM dies with the reaper.
                // SAFETY: prctl with constant arguments.
                check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) }, "PR_SET_PDEATHSIG")?;
                let mut pfd = libc::pollfd { fd: reaper, events: libc::POLLIN, revents: 0 };
                // SAFETY: poll without waiting on one descriptor we own, then closing it.
                let gone = unsafe {
                    let n = libc::poll(&mut pfd, 1, 0);
                    libc::close(reaper);
                    n != 0
                };
                if gone {
                    // The reaper ended (or cannot be watched) before the signal was armed.
                    // SAFETY: ends this process only.
                    unsafe { libc::_exit(1) };
                }
                Ok(())
            }
            child => {
                drop(proc_dir);
                reap(child, self.user, last_cap)
            }
        }
    }
}

/// Threads in this process.
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(1)
}

/// Drops every capability, including the bounding and ambient sets, and
/// becomes `user` when given; sets `no_new_privs` and forbids core dumps
/// (they would hold guest memory).
pub fn drop_privileges(user: Option<(u32, u32)>, last_cap: u32) -> Result<(), JailError> {
    // SAFETY: prctl, setgroups, setres[ug]id, capset and setrlimit on values we own; results checked.
    unsafe {
        for cap in 0..=last_cap {
            // EINVAL for capabilities this kernel does not know.
            libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
        }
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0);
        match user {
            Some((uid, gid)) => {
                check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
                check(libc::setresgid(gid, gid, gid), "setresgid")?;
                // Leaving uid 0 for good clears the permitted and effective sets.
                check(libc::setresuid(uid, uid, uid), "setresuid")?;
            }
            None => {
                #[repr(C)]
                struct Header {
                    version: u32,
                    pid: i32,
                }
                #[repr(C)]
                #[derive(Clone, Copy)]
                struct Data {
                    effective: u32,
                    permitted: u32,
                    inheritable: u32,
                }
                const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
                let mut header = Header { version: CAPABILITY_VERSION_3, pid: 0 };
                let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
                check(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int, "capset")?;
            }
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")?;
        let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        check(libc::setrlimit(libc::RLIMIT_CORE, &none), "RLIMIT_CORE")?;
    }
    Ok(())
}

/// The reaper: holds nothing but stderr, forwards termination and report
/// signals to the VMM, and exits as it did.
fn reap(child: libc::pid_t, user: Option<(u32, u32)>, last_cap: u32) -> ! {
    CHILD.store(child, Ordering::SeqCst);
    // SAFETY: installing an async-signal-safe handler, closing descriptors
    // the VMM holds its own copies of, and waiting; the process only exits.
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR2, libc::SIGQUIT] {
            libc::signal(sig, forward as extern "C" fn(libc::c_int) as libc::sighandler_t);
        }
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let confined = drop_privileges(user, last_cap).map_err(|e| e.to_string()).and_then(|()| {
            seccomp::enter(ThreadKind::Reaper).map_err(|e| e.to_string())
        });
        if let Err(e) = confined {
            eprintln!("rvirt-vmm: {e}");
            libc::kill(child, libc::SIGKILL);
        }
        let mut status = 0;
        loop {
            let r = libc::waitpid(child, &mut status, 0);
            if r == child {
                break;
            }
            if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                libc::_exit(1);
            }
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(libc::WEXITSTATUS(status));
    }
}
