//! A hostile local client against a real rvirtd: definitions built to
//! overflow the parser or cost minutes, waits that overflow, names that
//! shadow ids, a thousand idle connections, and a vagrant definition with
//! a namespace that must survive a daemon restart.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use support::*;

fn head(name: &str) -> String {
    format!("<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><os><kernel>/boot/vmlinuz</kernel></os>")
}

#[test]
fn definitions_built_to_crash_or_stall_the_parser_are_refused_and_the_daemon_carries_on() {
    let dir = scratch("deep");
    let d = Daemon::start(&dir);
    let deep = format!("{}<metadata>{}{}</metadata></domain>", head("deep"), "<a>".repeat(100_000), "</a>".repeat(100_000));
    let f = d.xml_file("deep", &deep);
    d.fails(&["define", f.to_str().unwrap()], "nested more than");
    // A 1 MiB definition of the most unknown elements kept: parsed at once, not in minutes.
    let filler = "x".repeat(1100);
    let big = format!("{}{}</domain>", head("big"), (0..1000).map(|i| format!("<unk{i}>{filler}</unk{i}>\n")).collect::<String>());
    assert!(big.len() > 1 << 20);
    let f = d.xml_file("big", &big);
    let t = Instant::now();
    let out = d.rvirt(&["define", f.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(t.elapsed() < Duration::from_secs(10), "defining a 1 MiB definition took {:?}", t.elapsed());
    // One more unknown element than kept is refused.
    let over = format!("{}{}</domain>", head("over"), (0..=rvirt_domain::MAX_UNKNOWN).map(|i| format!("<u{i}>x</u{i}>")).collect::<String>());
    let f = d.xml_file("over", &over);
    d.fails(&["define", f.to_str().unwrap()], "at most");
    // The daemon restarts with the big one stored, at once.
    let mut d = d;
    d.restart();
    assert!(d.ok(&["list", "--all"]).contains("big"));
}

#[test]
fn waits_and_names_from_clients_are_checked() {
    let dir = scratch("names");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    for bad in ["1234", "6f1e8a52-5d0c-4d3a-9a53-0c0e0b7c1f00"] {
        let f = d.xml_file("bad", &domain_xml(bad, &k.idle, ""));
        d.fails(&["define", f.to_str().unwrap()], "not all digits, not a UUID");
    }
    let f = d.xml_file("w", &domain_xml("w", &k.idle, ""));
    d.ok(&["define", f.to_str().unwrap()]);
    d.ok(&["start", "w"]);
    // u64::MAX seconds used to overflow an Instant and abort the daemon.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"{\"command\":\"shutdown\",\"domain\":\"w\",\"timeout_seconds\":18446744073709551615}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains("too long"), "{line}");
    assert_eq!(d.state("w"), "running (booted)");
    d.ok(&["destroy", "w"]);
}

#[test]
fn a_thousand_idle_connections_do_not_stop_the_daemon_answering() {
    let dir = scratch("idle");
    let d = Daemon::start(&dir);
    let pid = d.pid();
    let idle: Vec<UnixStream> = (0..1000).map(|_| UnixStream::connect(&d.socket).unwrap()).collect();
    // Half-sent requests too: they are bounded and timed out, not kept.
    let mut partial: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(&d.socket).unwrap()).collect();
    for p in &mut partial {
        let _ = p.write_all(&vec![b'{'; 512 << 10]);
    }
    let k = kernels(&dir);
    let f = d.xml_file("busy", &domain_xml("busy", &k.idle, ""));
    d.ok(&["define", f.to_str().unwrap()]);
    assert!(d.ok(&["list", "--all"]).contains("busy"));
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    assert!(threads < 64, "rvirtd has {threads} threads with 1,020 clients connected");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()).unwrap();
    assert!(rss_kib < 128 << 10, "rvirtd holds {rss_kib} KiB with 1,020 clients connected");
    drop(idle);
}

#[test]
fn a_namespaced_definition_survives_a_daemon_restart() {
    let dir = scratch("xmlns");
    let mut d = Daemon::start(&dir);
    let xml = "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n  <name>vagrant</name>\n  \
        <memory unit='MiB'>64</memory>\n  <os><kernel>/boot/vmlinuz</kernel></os>\n  \
        <qemu:commandline>\n    <qemu:arg value='-s'/>\n  </qemu:commandline>\n</domain>\n";
    let f = d.xml_file("vagrant", xml);
    d.ok(&["define", f.to_str().unwrap()]);
    d.restart();
    assert!(d.ok(&["list", "--all"]).contains("vagrant"), "the definition is still there after a restart");
    let back = d.ok(&["dumpxml", "vagrant"]);
    assert!(back.contains("xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'") && back.contains("<qemu:arg value='-s'/>"), "{back}");
    rvirt_domain::DomainXml::parse(&back).expect("dumpxml gives well-formed XML");
}

#[test]
fn symlinks_planted_in_the_state_directory_are_not_written_through() {
    let dir = scratch("plant");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let victim = dir.join("root-only.conf");
    std::fs::write(&victim, "precious\n").unwrap();
    let f = d.xml_file("p", &domain_xml("p", &k.idle, ""));
    // The log the VMM appends to, and the temporary file of the next define.
    std::os::unix::fs::symlink(&victim, d.state.join("log/p.log")).unwrap();
    let tmp = d.state.join("domains").join(format!(".p.xml.tmp{}", d.pid()));
    std::os::unix::fs::symlink(&victim, &tmp).unwrap();
    d.ok(&["define", f.to_str().unwrap()]);
    let out = d.rvirt(&["start", "p"]);
    assert_ne!(out.code, 0, "a start whose log is a symlink must fail");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n", "nothing was written through a planted symlink");
    assert!(d.ok(&["dumpxml", "p"]).contains("<name>p</name>"));
}

#[test]
fn a_state_directory_others_could_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("perm");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = std::process::Command::new(&bins().rvirtd)
        .arg("--no-libvirt-socket").arg("--state-dir").arg(&state).arg("--socket").arg(dir.join("s.sock")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("writable by group or others"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&state, Some(1), None).unwrap();
    let out = std::process::Command::new(&bins().rvirtd)
        .arg("--no-libvirt-socket").arg("--state-dir").arg(&state).arg("--socket").arg(dir.join("s.sock")).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to uid 1"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Inodes of the sockets and pipes process `pid` holds.
fn ipc_inodes(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| p.starts_with("socket:") || p.starts_with("pipe:"))
        .collect()
}

#[test]
fn the_daemon_s_descriptors_do_not_leak_into_vmms() {
    let dir = scratch("fds");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    // Clients connected while the VMM starts: their sockets must stay the daemon's.
    let _clients: Vec<UnixStream> = (0..5).map(|_| UnixStream::connect(&d.socket).unwrap()).collect();
    let f = d.xml_file("leak", &domain_xml("leak", &k.idle, ""));
    d.ok(&["define", f.to_str().unwrap()]);
    d.ok(&["start", "leak"]);
    // The process rvirtd started is the jail's reaper; the VMM is its child.
    let vmm = d.jailed_vmm_pid("leak");
    let daemon = ipc_inodes(d.pid());
    let shared: Vec<String> = ipc_inodes(vmm).into_iter().filter(|i| daemon.contains(i)).collect();
    let listing = |pid: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten().map(|e| format!("{} -> {}", e.file_name().to_string_lossy(), std::fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_default())).collect()
    };
    assert!(shared.is_empty(), "the VMM holds the daemon's {shared:?}\ndaemon: {:?}\nvmm: {:?}", listing(d.pid()), listing(vmm));
    let state = std::fs::canonicalize(&d.state).unwrap();
    for e in std::fs::read_dir(format!("/proc/{vmm}/fd")).unwrap().flatten() {
        let fd: u32 = e.file_name().to_string_lossy().parse().unwrap();
        let target = std::fs::read_link(e.path()).unwrap();
        if fd > 2 {
            assert!(!target.starts_with(state.join("domains")), "fd {fd} -> {}", target.display());
        }
    }
    let mode = std::fs::metadata(d.state.join("run").join(format!("{}.sock", 1))).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert!(matches!(mode, Ok(0o600) | Err(_)), "the VMM's socket is mode {mode:?}");
    d.ok(&["destroy", "leak"]);
}
