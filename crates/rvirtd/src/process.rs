//! VMM processes: starting them detached from the daemon (so they outlive
//! it), recognising them again by pid and start time, and reading how they
//! ended from their log.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Start time (clock ticks since boot) and user+system CPU ticks of `pid`,
/// from `/proc/PID/stat`; `None` when there is no such process or it is a zombie.
pub fn proc_stat(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name: state is field 3 (index 0 here), utime 14, stime 15, starttime 22.
    if f.first() == Some(&"Z") {
        return None;
    }
    let num = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
    Some((num(22)?, num(14)? + num(15)?))
}

/// Whether the process `pid` that started at `start_ticks` still runs.
pub fn alive(pid: u32, start_ticks: u64) -> bool {
    proc_stat(pid).is_some_and(|(t, _)| t == start_ticks)
}

/// CPU seconds `pid` and its children used: a jailed VMM is the child of
/// the process rvirtd started (its reaper), which itself uses next to none.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let own = proc_stat(pid)?.1;
    let theirs: u64 = children(pid).into_iter().filter_map(|c| proc_stat(c).map(|(_, t)| t)).sum();
    Some((own + theirs) as f64 / hz)
}

/// The children of `pid` (a jailed VMM is its reaper's only child).
pub fn children(pid: u32) -> Vec<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    text.split_whitespace().filter_map(|c| c.parse().ok()).collect()
}

/// Resident memory of `pid` and its children (a jailed VMM runs under its
/// reaper), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let rss = |p: u32| -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()
    };
    let own = rss(pid)?;
    Some(own + children(pid).into_iter().filter_map(rss).sum::<u64>())
}

/// Starts `vmm` with `args`, output appended to `log`, in a session of its
/// own: signals aimed at the daemon (Ctrl-C, SIGTERM, SIGHUP) do not reach
/// it, and it keeps running when the daemon exits. With `cgroup_procs` it
/// joins that cgroup before it runs.
pub fn spawn_vmm(vmm: &Path, args: &[String], log: &Path, cgroup_procs: Option<&Path>, inherit: &[RawFd]) -> std::io::Result<Child> {
    use std::os::unix::fs::OpenOptionsExt;
    // Never through a symlink, and only a regular file: the log is appended to as root.
    let out = OpenOptions::new().create(true).append(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(log)?;
    if !out.metadata()?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} is not a regular file", log.display())));
    }
    let err = out.try_clone()?;
    let mut cmd = Command::new(vmm);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // Sorted before the fork: between fork and exec nothing may allocate.
    let mut inherit = inherit.to_vec();
    inherit.sort_unstable();
    inherit.dedup();
    let procs = cgroup_procs
        .map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()))
        .transpose()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "cgroup path with a NUL byte"))?;
    // SAFETY: setsid, open, write, fcntl, close_range and close are
    // async-signal-safe and touch no memory of ours but what was made above.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(procs) = &procs {
                // "0": the writing process itself; its threads and children follow.
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
            // Only stdin, stdout, stderr and the handed-over descriptors cross
            // into the VMM: not client sockets, nor anything the daemon itself
            // inherited without close-on-exec (a jobserver pipe, a service
            // manager's sockets).
            let mut from = 3;
            for &fd in inherit.iter() {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                close_from_to(from, fd);
                from = fd + 1;
            }
            close_from_to(from, i32::MAX);
            Ok(())
        });
    }
    cmd.spawn()
}

/// Closes descriptors `from..to` (async-signal-safe: used between fork and exec).
fn close_from_to(from: RawFd, to: RawFd) {
    if from >= to {
        return;
    }
    // SAFETY: closing descriptors in the child before exec; close_range and
    // close touch no memory.
    unsafe {
        if libc::syscall(libc::SYS_close_range, from as u32, (to - 1) as u32, 0u32) != 0 {
            for fd in from..to.min(4096) {
                libc::close(fd);
            }
        }
    }
}

/// Sends `sig` to `pid` if it is still the process that started at `start_ticks`.
pub fn signal(pid: u32, start_ticks: u64, sig: i32) {
    if alive(pid, start_ticks) {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

/// How a VMM run ended, from the last words it logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmEnd {
    /// `rvirt-vmm: guest powered off`.
    PowerOff,
    /// `rvirt-vmm: guest rebooted` (with `--on-reboot exit`).
    Reboot,
    /// `rvirt-vmm: stopped` (API `stop` or a signal it handled).
    Stopped,
    /// The guest crashed, or the VMM died without a word (killed): the message says how.
    Crashed(String),
    /// The VMM could not run the guest (bad kernel, no /dev/kvm, ...): its error.
    Failed(String),
}

/// The log from `offset` on, at most its final 64 KiB (what a run said last
/// is all anyone reads), bytes that are not UTF-8 replaced.
fn log_since(log: &Path, offset: u64) -> String {
    let Ok(mut f) = std::fs::File::open(log) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut bytes = Vec::new();
    if f.seek(SeekFrom::Start(offset.max(len.saturating_sub(64 << 10)))).is_ok() {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads the log from `offset` and classifies the end of the run.
pub fn read_end(log: &Path, offset: u64) -> VmmEnd {
    for line in log_since(log, offset).lines().rev() {
        let Some(what) = line.trim().strip_prefix("rvirt-vmm: ") else { continue };
        return match what {
            "guest powered off" => VmmEnd::PowerOff,
            "guest rebooted" => VmmEnd::Reboot,
            "stopped" => VmmEnd::Stopped,
            w if w.starts_with("serial console on") || w.starts_with("console on") => continue,
            w if w.starts_with("guest crashed") => VmmEnd::Crashed(w.to_string()),
            w => VmmEnd::Failed(w.to_string()),
        };
    }
    VmmEnd::Crashed("the VMM exited without saying why (killed?)".into())
}

/// The last `n` lines of the log from `offset`, for error messages.
pub fn log_tail(log: &Path, offset: u64, n: usize) -> String {
    let text = log_since(log, offset);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_recognised_by_start_time() {
        let me = std::process::id();
        let (start, _) = proc_stat(me).unwrap();
        assert!(alive(me, start));
        assert!(!alive(me, start + 1), "another start time is another process");
        assert!(!alive(u32::MAX - 1, start));
        assert!(cpu_seconds(me).is_some());
    }

    #[test]
    fn cpu_time_counts_the_child_that_does_the_work() {
        // A shell that only waits, and a child of it that spins: the jail's reaper and its VMM.
        let mut sh = std::process::Command::new("sh").args(["-c", "while :; do :; done & wait"]).spawn().unwrap();
        let pid = sh.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while cpu_seconds(pid).unwrap_or(0.0) < 0.2 {
            assert!(std::time::Instant::now() < deadline, "the child's CPU time was not counted");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // SAFETY: sysconf has no memory effects.
        let own = proc_stat(pid).unwrap().1 as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        assert!(own < 0.2, "the waiting shell itself used {own} s");
        let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        for k in kids.split_whitespace() {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(k.parse().unwrap(), libc::SIGKILL) };
        }
        let _ = sh.kill();
        let _ = sh.wait();
    }

    #[test]
    fn the_end_of_a_run_is_read_from_the_log() {
        let p = std::env::temp_dir().join(format!("rvirtd-log-{}", std::process::id()));
        let old = "rvirt-vmm: guest powered off\n";
        std::fs::write(&p, format!("{old}rvirt-vmm: serial console on /dev/pts/4\n[ 1.0] boot\nrvirt-vmm: guest crashed: vCPU 0: triple fault\n")).unwrap();
        assert_eq!(read_end(&p, 0), VmmEnd::Crashed("guest crashed: vCPU 0: triple fault".into()));
        std::fs::write(&p, format!("{old}rvirt-vmm: serial console on /dev/pts/4\n")).unwrap();
        assert!(matches!(read_end(&p, old.len() as u64), VmmEnd::Crashed(w) if w.contains("killed")), "an older run's words do not count");
        std::fs::write(&p, "rvirt-vmm: kernel /k: not a bzImage or ELF\n").unwrap();
        assert_eq!(read_end(&p, 0), VmmEnd::Failed("kernel /k: not a bzImage or ELF".into()));
        std::fs::write(&p, "x\nrvirt-vmm: guest rebooted\n").unwrap();
        assert_eq!(read_end(&p, 0), VmmEnd::Reboot);
        assert_eq!(log_tail(&p, 0, 1), "rvirt-vmm: guest rebooted");
        std::fs::remove_file(&p).unwrap();
    }
}
