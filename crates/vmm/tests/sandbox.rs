//! The VMM's confinement on this host's /dev/kvm with hand-made guests:
//! each kind of thread is stopped by its seccomp list when it makes a call
//! outside it, and a jailed VMM holds no capability, no path to the host's
//! files and nothing but its own descriptors.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rvirt_lab::guests::{bzimage_with, print, virtio_balloon_chain_bomb, HALT_FOREVER};
use rvirt_lab::procfs::{children_of, open_files, status_field};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rvirt-sandbox-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// rvirt-vmm on `kernel` with a balloon (so a device worker starts when the
/// guest activates it), an API socket and serial output in `dir`.
fn vmm(dir: &Path, kernel: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rvirt-vmm"));
    cmd.args(["--memory", "64M", "--balloon", "--serial"])
        .arg(format!("file={}", dir.join("serial.log").display()))
        .arg("--api-socket")
        .arg(dir.join("api.sock"))
        .arg("--kernel")
        .arg(kernel)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("vmm.log")).unwrap());
    cmd
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn a_forbidden_call_on_each_kind_of_thread_stops_the_vmm() {
    let dir = tmpdir("kinds");
    let kernel = dir.join("bomb.bzImage");
    std::fs::write(&kernel, bzimage_with(&virtio_balloon_chain_bomb())).unwrap();
    // The main thread asks for a raw packet socket; every other kind opens /etc/shadow.
    for (kind, call) in [("main", libc::SYS_socket), ("vcpu", libc::SYS_openat), ("worker", libc::SYS_openat), ("api", libc::SYS_openat), ("reaper", libc::SYS_openat)] {
        let jail = dir.join("jail");
        let extra: &[&str] = if kind == "reaper" { &["--jail", jail.to_str().unwrap()] } else { &[] };
        let mut child = vmm(&dir, &kernel, extra).env("RVIRT_SECCOMP_SELFTEST", kind).spawn().unwrap();
        let status = wait_exit(&mut child, Duration::from_secs(60)).unwrap_or_else(|| panic!("{kind}: the VMM kept running"));
        let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap();
        assert_eq!(status.code(), Some(159), "{kind}: {log}");
        assert!(log.contains(&format!("seccomp: the {kind} thread made forbidden system call {call};")), "{kind}: {log}");
        // A jailed VMM dies with its reaper a moment later (PDEATHSIG): wait until its socket is dead.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(dir.join("api.sock")).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // With --seccomp log the same call is allowed (the kernel's audit log
    // records it) and the guest runs to its end; off installs nothing.
    for mode in ["log", "off"] {
        // The previous run's console output must not pass for this one's.
        let _ = std::fs::remove_file(dir.join("serial.log"));
        let mut child = vmm(&dir, &kernel, &["--seccomp", mode]).env("RVIRT_SECCOMP_SELFTEST", "worker").spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default().ends_with('\n') && Instant::now() < deadline {
            assert!(child.try_wait().unwrap().is_none(), "{mode}: {}", std::fs::read_to_string(dir.join("vmm.log")).unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(std::fs::read_to_string(dir.join("serial.log")).unwrap(), "used 2\n", "{mode}");
        let st = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let expected = if mode == "log" { "Seccomp:\t2" } else { "Seccomp:\t0" };
        assert!(st.contains(expected), "{mode}: {st}");
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn wait_for_serial(dir: &Path, text: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default().contains(text) {
        assert!(Instant::now() < deadline, "no '{text}' on the serial console");
        assert!(child.try_wait().unwrap().is_none(), "the VMM ended: {}", std::fs::read_to_string(dir.join("vmm.log")).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_jailed_vmm_holds_no_capability_no_host_path_and_only_its_own_descriptors() {
    let dir = tmpdir("jail");
    let kernel = dir.join("idle.bzImage");
    let mut code = print(b"up\n");
    code.extend(HALT_FOREVER);
    std::fs::write(&kernel, bzimage_with(&code)).unwrap();
    let jail = dir.join("jail-root");
    let mut reaper = vmm(&dir, &kernel, &["--jail", jail.to_str().unwrap(), "--jail-user", "4242:4343"]).spawn().unwrap();
    wait_for_serial(&dir, "up", &mut reaper);
    let mut api = rvirt_api::ApiClient::connect(&dir.join("api.sock"), Duration::from_secs(10)).unwrap();
    let status = api.call(&rvirt_api::Request::Status).unwrap();
    assert!(status.ok, "the API answers from inside the jail: {status:?}");

    let outer = reaper.id();
    let inner = children_of(outer);
    assert_eq!(inner.len(), 1, "the reaper has the VMM as its only child: {inner:?}");
    let inner = inner[0];
    for (pid, what) in [(outer, "reaper"), (inner, "VMM")] {
        assert_eq!(status_field(pid, "Seccomp:"), "2", "{what}");
        assert_eq!(status_field(pid, "NoNewPrivs:"), "1", "{what}");
        for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(status_field(pid, caps), "0000000000000000", "{what} {caps}");
        }
        assert_eq!(status_field(pid, "Uid:").split_whitespace().collect::<Vec<_>>(), ["4242"; 4], "{what}");
        assert_eq!(status_field(pid, "Gid:").split_whitespace().collect::<Vec<_>>(), ["4343"; 4], "{what}");
        for ns in ["mnt", "ipc", "uts", "net"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
            assert_ne!(theirs, ours, "{what} has its own {ns} namespace");
        }
    }
    let pid_ns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/pid")).unwrap();
    assert_ne!(pid_ns(inner), pid_ns(outer), "the VMM is in a PID namespace of its own");
    assert_eq!(status_field(inner, "NSpid:").split_whitespace().last(), Some("1"), "the VMM is PID 1 there");

    // Its root is an empty tmpfs: no /etc/shadow, nothing at all.
    let root = PathBuf::from(format!("/proc/{inner}/root"));
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0, "the jail's root is empty");
    assert!(!root.join("etc/shadow").exists());
    // The host's directory is untouched (the tmpfs is mounted in the VMM's namespace only).
    assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0);

    // Descriptors: what it was given and what it made, nothing else.
    let kernel_s = kernel.display().to_string();
    let serial_s = dir.join("serial.log").display().to_string();
    let log_s = dir.join("vmm.log").display().to_string();
    // Its own page map (read-only, about itself: which pages of guest RAM a snapshot must read).
    let pagemap_s = format!("/proc/{inner}/pagemap");
    for t in open_files(inner).iter().map(|p| p.display().to_string()) {
        let own = t == "/dev/null" || t == "/dev/kvm" || t == kernel_s || t == serial_s || t == log_s || t == pagemap_s
            || t.starts_with("anon_inode:") || t.starts_with("socket:") || t.starts_with("pipe:");
        assert!(own, "the VMM holds {t}");
    }
    let outer_fds = open_files(outer);
    assert_eq!(outer_fds.len(), 3, "the reaper keeps only stdin, stdout and stderr: {outer_fds:?}");

    // SIGTERM to the process rvirtd knows reaches the VMM, which stops as asked.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(outer as i32, libc::SIGTERM) };
    let st = wait_exit(&mut reaper, Duration::from_secs(30)).expect("the VMM stops on SIGTERM");
    assert_eq!(st.code(), Some(0), "{}", std::fs::read_to_string(dir.join("vmm.log")).unwrap());
    assert!(std::fs::read_to_string(dir.join("vmm.log")).unwrap().contains("stopped"));

    // Killing the reaper outright takes the VMM with it.
    // (The console file goes first: the new VMM may open it before this thread runs again.)
    std::fs::remove_file(dir.join("serial.log")).ok();
    let mut reaper = vmm(&dir, &kernel, &["--jail", jail.to_str().unwrap()]).spawn().unwrap();
    wait_for_serial(&dir, "up", &mut reaper);
    let inner = children_of(reaper.id());
    assert_eq!(inner.len(), 1);
    reaper.kill().unwrap();
    let _ = reaper.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{}", inner[0])).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!Path::new(&format!("/proc/{}/status", inner[0])).exists(), "the VMM outlived its reaper");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each thread of `pid` by name, with the host CPUs it may run on.
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string();
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let cpus = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("").trim().to_string();
            (comm, cpus)
        })
        .collect()
}

#[test]
fn vcpus_and_the_other_threads_run_on_the_cpus_they_are_pinned_to() {
    let all = std::fs::read_to_string("/proc/self/status").unwrap();
    let all = all.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string();
    assert_ne!(all, "0", "this test needs two host CPUs");
    let dir = tmpdir("pins");
    let kernel = dir.join("bomb.bzImage");
    // The balloon bomb starts a device worker (on a vCPU thread) and then idles.
    std::fs::write(&kernel, bzimage_with(&virtio_balloon_chain_bomb())).unwrap();
    let mut vmm = vmm(&dir, &kernel, &["--cpus", "2", "--vcpu-pin", "1:1", "--emulator-pin", "0"]).spawn().unwrap();
    wait_for_serial(&dir, "used 2", &mut vmm);
    let threads = thread_cpus(vmm.id());
    let cpus_of = |prefix: &str| -> Vec<String> { threads.iter().filter(|(n, _)| n.starts_with(prefix)).map(|(_, c)| c.clone()).collect() };
    assert_eq!(cpus_of("vcpu1"), ["1"], "{threads:?}");
    assert_eq!(cpus_of("vcpu0"), [all.clone()], "an unpinned vCPU gets every CPU back: {threads:?}");
    assert_eq!(cpus_of("rvirt-vmm"), ["0"], "main: {threads:?}");
    assert!(!cpus_of("virtio-balloon").is_empty() && cpus_of("virtio-balloon").iter().all(|c| c == "0"), "the worker a vCPU started: {threads:?}");
    assert!(cpus_of("lineserver").iter().all(|c| c == "0") && !cpus_of("lineserver").is_empty(), "{threads:?}");
    let _ = vmm.kill();
    let _ = vmm.wait();
    // A CPU the host does not have is refused before anything starts.
    let out = Command::new(env!("CARGO_BIN_EXE_rvirt-vmm")).args(["--kernel", kernel.to_str().unwrap(), "--vcpu-pin", "0:1000"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--vcpu-pin 0") && err.contains("none this process may run on"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_jailed_vmm_takes_a_disc_only_as_a_descriptor_and_checks_what_it_gets() {
    use rvirt_api::{ApiClient, Request};
    let dir = tmpdir("jailed-media");
    let kernel = dir.join("idle.bzImage");
    let mut code = print(b"up\n");
    code.extend(HALT_FOREVER);
    std::fs::write(&kernel, bzimage_with(&code)).unwrap();
    let iso = dir.join("disc.iso");
    std::fs::write(&iso, vec![0u8; 64 << 10]).unwrap();
    let jail = dir.join("jail-root");
    let mut reaper = vmm(&dir, &kernel, &["--jail", jail.to_str().unwrap(), "--disk", "media=cdrom"]).spawn().unwrap();
    wait_for_serial(&dir, "up", &mut reaper);
    let mut api = ApiClient::connect(&dir.join("api.sock"), Duration::from_secs(10)).unwrap();
    let insert = |fd: bool| Request::ChangeMedia { device: "disk0".into(), path: Some(iso.clone()), force: false, fd };
    // By path: refused, saying how to do it instead (the path does not exist in the jail anyway).
    let r = api.call(&insert(false)).unwrap();
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("a jailed VMM can open no path"), "{r:?}");
    // fd:true with no descriptor attached.
    let r = api.call(&insert(true)).unwrap();
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("no descriptor came with the request"), "{r:?}");
    // A directory's descriptor is no disc.
    let d = std::fs::File::open(&dir).unwrap();
    let r = api.call_with_fd(&insert(true), std::os::fd::AsFd::as_fd(&d)).unwrap();
    assert!(!r.ok && r.error.as_deref().unwrap_or("").contains("is a directory"), "{r:?}");
    // The disc's own descriptor goes in, and the VMM holds that file from then on.
    let f = std::fs::File::open(&iso).unwrap();
    let r = api.call_with_fd(&insert(true), std::os::fd::AsFd::as_fd(&f)).unwrap();
    assert!(r.ok, "{r:?}");
    let inner = children_of(reaper.id())[0];
    assert!(open_files(inner).contains(&iso), "{:?}", open_files(inner));
    let _ = reaper.kill();
    let _ = reaper.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// rvirt-vmm with `args`, inheriting each of `files` (opened here) at its
/// own descriptor number; its stderr goes to `log`.
fn vmm_inheriting(args: &[String], files: &[&std::fs::File], log: &Path) -> Command {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rvirt-vmm"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(log).unwrap());
    // SAFETY: fcntl is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

#[test]
fn a_vmm_given_descriptors_opens_no_file_by_name() {
    use std::os::fd::AsRawFd;
    let dir = tmpdir("passed");
    let kernel = dir.join("idle.bzImage");
    let mut code = print(b"up\n");
    code.extend(HALT_FOREVER);
    std::fs::write(&kernel, bzimage_with(&code)).unwrap();
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let serial = dir.join("serial.log");
    let log = dir.join("vmm.log");
    // The names the VMM is given lead nowhere: only the descriptors can work.
    let (k_name, d_name, s_name) = ("/nonexistent/rvirt/kernel", "/nonexistent/rvirt/disk.raw", "/nonexistent/rvirt/serial.log");
    let k = std::fs::File::open(&kernel).unwrap();
    let d = std::fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
    let s = std::fs::OpenOptions::new().create(true).append(true).open(&serial).unwrap();
    let args = |extra: &[String]| -> Vec<String> {
        let mut a: Vec<String> = ["--memory", "64M", "--only-passed-files", "--kernel", k_name, "--serial"].iter().map(|s| s.to_string()).collect();
        a.push(format!("file={s_name}"));
        a.extend(extra.iter().cloned());
        a
    };
    let pass = |f: &std::fs::File, name: &str| vec!["--pass-fd".to_string(), format!("{}={name}", f.as_raw_fd())];
    let base: Vec<String> = [pass(&k, k_name), pass(&s, s_name)].concat();
    let disk_arg = vec!["--disk".to_string(), format!("path={d_name},format=raw")];
    let mut child = vmm_inheriting(&args(&[base.clone(), pass(&d, d_name), disk_arg.clone()].concat()), &[&k, &d, &s], &log).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&serial).unwrap_or_default().contains("up") {
        assert!(Instant::now() < deadline, "no 'up' on the console");
        assert!(child.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(&log).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    // It holds the files it was given (by their real names) and no name it was told.
    let held = open_files(child.id());
    for f in [&kernel, &disk, &serial] {
        assert!(held.contains(f), "{} not held: {held:?}", f.display());
    }
    assert!(held.iter().all(|p| !p.starts_with("/nonexistent")), "{held:?}");
    let _ = child.kill();
    let _ = child.wait();

    // Each mistake is refused before the VM starts, with one clear line.
    let ro = std::fs::File::open(&disk).unwrap();
    let dir_fd = std::fs::File::open(&dir).unwrap();
    let cases: Vec<(Vec<String>, Vec<&std::fs::File>, &str)> = vec![
        // A disk named but not passed.
        ([base.clone(), disk_arg.clone()].concat(), vec![&k, &s], "was not passed as a descriptor"),
        // A writable disk passed read-only.
        ([base.clone(), pass(&ro, d_name), disk_arg.clone()].concat(), vec![&k, &s, &ro], "not open for reading and writing"),
        // A directory passed as a (read-only) disk.
        ([base.clone(), pass(&dir_fd, d_name), vec!["--disk".into(), format!("path={d_name},format=raw,readonly=on")]].concat(), vec![&k, &s, &dir_fd], "is a directory"),
        // A descriptor that was never passed (not inherited: close-on-exec here).
        ([base.clone(), pass(&d, d_name), disk_arg.clone()].concat(), vec![&k, &s], "not open"),
        // A relative name, and the same name twice.
        ([base.clone(), vec!["--pass-fd".into(), format!("{}=disk.raw", d.as_raw_fd())]].concat(), vec![&k, &s, &d], "absolute path"),
        ([base.clone(), pass(&d, k_name)].concat(), vec![&k, &s, &d], "already passed"),
    ];
    for (i, (a, files, want)) in cases.into_iter().enumerate() {
        let mut c = vmm_inheriting(&args(&a), &files, &log).spawn().unwrap();
        let st = wait_exit(&mut c, Duration::from_secs(30)).expect("a refused VMM exits");
        let err = std::fs::read_to_string(&log).unwrap();
        assert!(!st.success() && err.contains(want) && err.lines().count() == 1, "case {i}: want '{want}': {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
