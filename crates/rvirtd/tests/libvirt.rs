//! rvirtd through libvirt's remote protocol, checked with the clients
//! people use: Debian's `virsh` (package libvirt-clients) and
//! python3-libvirt, on hand-made guests on this host's /dev/kvm; and
//! hostile bytes on the libvirt socket.

mod support;

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

#[test]
fn virsh_manages_a_domain_through_its_whole_life() {
    let dir = scratch("lv-virsh");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let disk = dir.join("web.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let devices = format!(
        "<devices><disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk><serial type='pty'/></devices>",
        disk.display()
    );
    let f = d.xml_file("web", &domain_xml("web", &k.idle, &devices));
    let out = virsh_ok(&d, &["define", f.to_str().unwrap()]);
    assert!(out.contains("Domain 'web' defined from"), "{out}");
    let list = virsh_ok(&d, &["list", "--all"]);
    assert!(list.lines().any(|l| l.contains("web") && l.contains("shut off") && l.trim_start().starts_with('-')), "{list}");
    assert!(virsh_ok(&d, &["list", "--name"]).trim().is_empty(), "nothing runs yet");

    let out = virsh_ok(&d, &["start", "web"]);
    assert!(out.contains("Domain 'web' started"), "{out}");
    let info = virsh_ok(&d, &["dominfo", "web"]);
    assert_eq!(field(&info, "Name:"), "web");
    assert_eq!(field(&info, "State:"), "running");
    assert_eq!(field(&info, "OS Type:"), "hvm");
    assert_eq!(field(&info, "CPU(s):"), "1");
    assert_eq!(field(&info, "Max memory:"), "65536 KiB");
    assert_eq!(field(&info, "Persistent:"), "yes");
    assert_eq!(field(&info, "Autostart:"), "disable");
    let id = field(&info, "Id:");
    let uuid = field(&info, "UUID:");
    assert_eq!(virsh_ok(&d, &["domstate", "--reason", "web"]).trim(), "running (booted)");
    // Lookups by name, id and UUID agree.
    assert_eq!(virsh_ok(&d, &["domid", "web"]).trim(), id);
    assert_eq!(virsh_ok(&d, &["domname", &id]).trim(), "web");
    assert_eq!(virsh_ok(&d, &["domuuid", "web"]).trim(), uuid);
    assert_eq!(virsh_ok(&d, &["domname", &uuid]).trim(), "web");
    let list = virsh_ok(&d, &["list"]);
    assert!(list.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == [id.as_str(), "web", "running"]), "{list}");

    virsh_ok(&d, &["suspend", "web"]);
    assert_eq!(virsh_ok(&d, &["domstate", "--reason", "web"]).trim(), "paused (user)");
    virsh_fails(&d, &["suspend", "web"], "domain is already paused");
    virsh_ok(&d, &["resume", "web"]);
    assert_eq!(virsh_ok(&d, &["domstate", "--reason", "web"]).trim(), "running (unpaused)");

    // The disk's counters (the idle guest moves no bytes); an unknown device is named.
    let stats = virsh_ok(&d, &["domblkstat", "web", "vda"]);
    for want in ["vda rd_req 0", "vda rd_bytes 0", "vda wr_req 0", "vda wr_bytes 0", "vda errs 0"] {
        assert!(stats.contains(want), "{stats}");
    }
    virsh_fails(&d, &["domifstat", "web", "vnet9"], "has no disk or interface 'vnet9'");
    let stats = virsh_ok(&d, &["domstats", "web"]);
    for want in ["Domain: 'web'", "state.state=1", "state.reason=5", "vcpu.current=1", "balloon.maximum=65536", "block.count=1", "block.0.name=vda", "block.0.rd.reqs=0", "block.0.rd.bytes=0", "net.count=0", "cpu.time="] {
        assert!(stats.contains(want), "'{want}' in:\n{stats}");
    }
    let some = virsh_ok(&d, &["domstats", "--state", "--list-active"]);
    assert!(some.contains("state.state=1") && !some.contains("vcpu.current"), "{some}");
    // Facts about the host and what rvirt offers, as virt-install reads them.
    let version = virsh_ok(&d, &["version"]);
    assert!(version.contains("Running hypervisor: QEMU"), "{version}");
    assert!(virsh_ok(&d, &["nodeinfo"]).contains("CPU(s):"));
    assert!(!virsh_ok(&d, &["hostname"]).trim().is_empty());
    let caps = virsh_ok(&d, &["capabilities"]);
    assert!(caps.contains("<os_type>hvm</os_type>") && caps.contains("<domain type='kvm'/>"), "{caps}");
    let dcaps = virsh_ok(&d, &["domcapabilities"]);
    assert!(dcaps.contains("<domain>kvm</domain>") && dcaps.contains("<value>virtio</value>"), "{dcaps}");
    let xml = virsh_ok(&d, &["dumpxml", "web"]);
    assert!(xml.contains("<name>web</name>") && xml.contains(&format!("<uuid>{uuid}</uuid>")), "{xml}");
    assert!(virsh_ok(&d, &["dumpxml", "--inactive", "web"]).contains("<name>web</name>"));

    // virsh edit: the stored definition through $EDITOR, defined back.
    let o = Command::new("virsh")
        .args(["-c", &uri(&d, false), "edit", "web"])
        .env("EDITOR", "sed -i 's#<vcpu>1</vcpu>#<vcpu>2</vcpu>#'")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("Domain 'web' XML configuration edited"), "{o:?}");
    assert!(virsh_ok(&d, &["dumpxml", "--inactive", "web"]).contains("<vcpu>2</vcpu>"));
    assert!(virsh_ok(&d, &["dumpxml", "web"]).contains("<vcpu>1</vcpu>"), "the running domain keeps its live definition");

    virsh_ok(&d, &["autostart", "web"]);
    assert_eq!(field(&virsh_ok(&d, &["dominfo", "web"]), "Autostart:"), "enable");
    assert!(virsh_ok(&d, &["list", "--all", "--autostart", "--name"]).lines().any(|l| l.trim() == "web"));
    virsh_ok(&d, &["autostart", "--disable", "web"]);
    assert_eq!(field(&virsh_ok(&d, &["dominfo", "web"]), "Autostart:"), "disable");

    // What cannot be done is refused saying why, and no harm done.
    virsh_fails(&d, &["snapshot-create-as", "web", "s1"], "raw images have no internal snapshots");
    virsh_fails(&d, &["start", "web"], "Domain is already active");
    virsh_fails(&d, &["dominfo", "nosuch"], "failed to get domain 'nosuch'");

    // rvirt's own URI scheme reaches the same daemon.
    let o = virsh_at(&format!("rvirt:///system?socket={}", d.libvirt_socket().display()), &["domstate", "web"]);
    assert!(o.code == 0 && o.stdout.trim() == "running", "{o:?}");
    // A second daemon on the same libvirt socket is refused, naming it.
    let second = Command::new(&bins().rvirtd)
        .arg("--state-dir")
        .arg(dir.join("state2"))
        .arg("--socket")
        .arg(dir.join("second.sock"))
        .arg("--no-read-only-socket")
        .arg("--libvirt-socket")
        .arg(d.libvirt_socket())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("already answers on") && err.contains("--no-libvirt-socket"), "{err}");
    // The read-only socket answers questions and refuses changes.
    let ro = uri(&d, true);
    let o = virsh_at(&ro, &["-r", "list", "--all"]);
    assert!(o.code == 0 && o.stdout.contains("web"), "{o:?}");
    let o = virsh_at(&ro, &["destroy", "web"]);
    assert!(o.code != 0 && o.stderr.contains("read only access prevents"), "{o:?}");
    assert_eq!(virsh_ok(&d, &["domstate", "web"]).trim(), "running");

    let out = virsh_ok(&d, &["reboot", "web"]);
    assert!(out.contains("Domain 'web' is being rebooted"), "{out}");
    let out = virsh_ok(&d, &["shutdown", "web"]);
    assert!(out.contains("Domain 'web' is being shutdown"), "{out}");
    // This guest ignores the power button: it runs on until destroyed.
    assert_eq!(virsh_ok(&d, &["domstate", "web"]).trim(), "running");
    let out = virsh_ok(&d, &["destroy", "web"]);
    assert!(out.contains("Domain 'web' destroyed"), "{out}");
    let o = virsh_at(&ro, &["start", "web"]);
    assert!(o.code != 0 && o.stderr.contains("read only access prevents"), "the read-only socket refuses start: {o:?}");
    assert_eq!(virsh_ok(&d, &["domstate", "--reason", "web"]).trim(), "shut off (destroyed)");
    virsh_fails(&d, &["destroy", "web"], "domain is not running");
    let out = virsh_ok(&d, &["undefine", "web"]);
    assert!(out.contains("Domain 'web' has been undefined"), "{out}");
    assert!(!virsh_ok(&d, &["list", "--all"]).contains("web"));
    // rvirt's own client sees the same manager.
    assert!(!d.ok(&["list", "--all"]).contains("web"));
}

#[test]
fn virsh_event_reports_each_lifecycle_change() {
    let dir = scratch("lv-event");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let mut ev = Command::new("virsh")
        .args(["-q", "-c", &uri(&d, false), "event", "--loop", "--event", "lifecycle"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("virsh event");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let stdout = ev.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    // virsh registers its callback after connecting: wait until it has.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.log().contains("libvirt client connected") {
        assert!(Instant::now() < deadline, "virsh event did not connect:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let f = d.xml_file("ev", &domain_xml("ev", &k.idle, ""));
    virsh_ok(&d, &["define", f.to_str().unwrap()]);
    virsh_ok(&d, &["start", "ev"]);
    virsh_ok(&d, &["suspend", "ev"]);
    virsh_ok(&d, &["resume", "ev"]);
    virsh_ok(&d, &["destroy", "ev"]);
    virsh_ok(&d, &["undefine", "ev"]);
    // A guest that powers itself off: Stopped Shutdown.
    let f = d.xml_file("off", &domain_xml("off", &k.poweroff, ""));
    virsh_ok(&d, &["create", f.to_str().unwrap()]);
    let want = [
        "'lifecycle' for domain 'ev': Defined Added",
        "'lifecycle' for domain 'ev': Started Booted",
        "'lifecycle' for domain 'ev': Suspended Paused",
        "'lifecycle' for domain 'ev': Resumed Unpaused",
        "'lifecycle' for domain 'ev': Stopped Destroyed",
        "'lifecycle' for domain 'ev': Undefined Removed",
        "'lifecycle' for domain 'off': Started Booted",
        "'lifecycle' for domain 'off': Stopped Shutdown",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = lines.lock().unwrap().clone();
        let mut it = got.iter();
        // In order: each wanted line after the one before.
        if want.iter().all(|w| it.any(|l| l.contains(w))) {
            break;
        }
        assert!(Instant::now() < deadline, "virsh event printed:\n{}\n--- daemon log ---\n{}", got.join("\n"), d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = ev.kill();
    let _ = ev.wait();
}

#[test]
fn virsh_console_joins_the_serial_port_until_ctrl_close_bracket() {
    let dir = scratch("lv-console");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let f = d.xml_file("con", &domain_xml("con", &k.chatter, "<devices><serial type='pty'/></devices>"));
    virsh_ok(&d, &["define", f.to_str().unwrap()]);
    virsh_ok(&d, &["start", "con"]);
    virsh_console(&[], &uri(&d, false), "con", &[], &d);
    // The console is free again for the next client, and the domain runs on.
    assert_eq!(virsh_ok(&d, &["domstate", "con"]).trim(), "running");
    virsh_ok(&d, &["destroy", "con"]);
}

#[test]
fn python_libvirt_drives_rvirtd() {
    let dir = scratch("lv-python");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let xml = domain_xml("py", &k.idle, "<devices><serial type='pty'/></devices>");
    let script = r#"
import sys, threading, time, libvirt
uri, xml = sys.argv[1], sys.argv[2]
libvirt.virEventRegisterDefaultImpl()
events = []
def loop():
    while True:
        libvirt.virEventRunDefaultImpl()
threading.Thread(target=loop, daemon=True).start()
conn = libvirt.openAuth(uri, [[libvirt.VIR_CRED_AUTHNAME], lambda c, d: 0, None], 0)
assert conn.getType() == "QEMU", conn.getType()
def cb(conn, dom, event, detail, opaque):
    events.append((dom.name(), event, detail))
conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, cb, None)
dom = conn.defineXML(xml)
uuid = dom.UUIDString()
assert conn.lookupByName("py").UUIDString() == uuid
assert conn.lookupByUUIDString(uuid).name() == "py"
assert "py" in [d.name() for d in conn.listAllDomains(0)]
assert [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)] == []
dom.create()
state, maxmem, mem, vcpus, cputime = dom.info()
assert state == libvirt.VIR_DOMAIN_RUNNING and maxmem == 65536 and vcpus == 1, dom.info()
assert dom.isActive() == 1 and dom.isPersistent() == 1 and dom.ID() > 0
assert "<name>py</name>" in dom.XMLDesc(0)
assert dom.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED], dom.state()
# The everyday calls applications make.
info = dom.vcpus()
assert len(info[0]) == 1 and info[0][0][0] == 0 and info[0][0][1] == libvirt.VIR_VCPU_RUNNING, info
assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == 1
stats = dom.memoryStats()
assert stats["actual"] == 65536 and stats["rss"] > 0, stats
dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<app><role>db</role></app>", "app", "http://example.org/app", libvirt.VIR_DOMAIN_AFFECT_CONFIG)
assert "<role>db</role>" in dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "http://example.org/app", libvirt.VIR_DOMAIN_AFFECT_CONFIG)
dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_TITLE, "Python's", None, None, libvirt.VIR_DOMAIN_AFFECT_LIVE)
assert dom.metadata(libvirt.VIR_DOMAIN_METADATA_TITLE, None, 0) == "Python's"
try:
    dom.setVcpusFlags(2, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    raise SystemExit("vCPU hotplug succeeded")
except libvirt.libvirtError as e:
    assert e.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT, e
# One console client at a time; VIR_DOMAIN_CONSOLE_FORCE takes it, ending the holder's stream.
st1 = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
dom.openConsole(None, st1, 0)
try:
    dom.openConsole(None, conn.newStream(0), 0)
    raise SystemExit("a second console opened")
except libvirt.libvirtError as e:
    assert "Active console session" in str(e), e
st2 = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
dom.openConsole(None, st2, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
def ends(st):
    """Whether a non-blocking stream reaches its end within 10 s."""
    end = time.time() + 10
    while time.time() < end:
        r = st.recv(4096)
        if r == b"":
            return True
        if r == -2:
            time.sleep(0.05)
    return False
assert ends(st1), "the forced-away stream did not end"
dom.destroy()
assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
# The domain stopping ends its console stream; finishing it is confirmed.
assert ends(st2), "the console stream did not end with the domain"
st2.finish()
try:
    conn.lookupByName("nosuch")
    raise SystemExit("lookup of a missing domain succeeded")
except libvirt.libvirtError as e:
    assert e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN, e.get_error_code()
assert dom.hasCurrentSnapshot() == 0 and dom.listAllSnapshots() == [] and dom.snapshotNum() == 0
assert dom.hasManagedSaveImage() == 0
try:
    dom.snapshotCreateXML("<domainsnapshot/>", 0)
    raise SystemExit("a snapshot of a domain without disks succeeded")
except libvirt.libvirtError as e:
    assert e.get_error_code() == libvirt.VIR_ERR_OPERATION_FAILED and "no writable disk" in str(e), (e.get_error_code(), str(e))
try:
    dom.snapshotLookupByName("nope")
    raise SystemExit("a missing snapshot was found")
except libvirt.libvirtError as e:
    assert e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT, e.get_error_code()
dom.undefine()
end = time.time() + 10
want = [("py", libvirt.VIR_DOMAIN_EVENT_DEFINED), ("py", libvirt.VIR_DOMAIN_EVENT_STARTED), ("py", libvirt.VIR_DOMAIN_EVENT_STOPPED), ("py", libvirt.VIR_DOMAIN_EVENT_UNDEFINED)]
while time.time() < end and [(n, e) for n, e, _ in events] != want:
    time.sleep(0.05)
assert [(n, e) for n, e, _ in events] == want, events
conn.close()
print("python-libvirt ok")
"#;
    let out = Command::new("/usr/bin/python3").arg("-c").arg(script).arg(uri(&d, false)).arg(&xml).output().expect("python3 (Debian's, with python3-libvirt)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("python-libvirt ok"), "{text}{}\n--- daemon log ---\n{}", String::from_utf8_lossy(&out.stderr), d.log());
}

/// A frame of libvirt's `remote` program: length, header, payload.
fn frame(prog: u32, vers: u32, proc_: i32, kind: i32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&((28 + payload.len()) as u32).to_be_bytes());
    for w in [prog, vers, proc_ as u32, kind as u32, 1, 0] {
        f.extend_from_slice(&w.to_be_bytes());
    }
    f.extend_from_slice(payload);
    f
}

/// Sends `bytes` and says whether the daemon hung up (rather than waiting for more).
fn hung_up_after(d: &Daemon, bytes: &[u8]) -> bool {
    let mut s = UnixStream::connect(d.libvirt_socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => panic!("the daemon neither answered nor hung up: {e}"),
        }
    }
}

#[test]
fn hostile_frames_on_the_libvirt_socket_close_that_connection_only() {
    let dir = scratch("lv-hostile");
    // libvirt's modular daemon's socket beside ours: clients would prefer it, so rvirtd says so.
    std::fs::write(dir.join("virtqemud-sock"), b"").unwrap();
    let d = Daemon::start(&dir);
    assert!(d.log().contains("virtqemud-sock exists"), "{}", d.log());
    const REMOTE: u32 = 0x2000_8086;
    // A client that holds a half frame is cut off after the frame timeout; others are served meanwhile.
    let mut half = UnixStream::connect(d.libvirt_socket()).unwrap();
    half.write_all(&frame(REMOTE, 1, 66, 0, &[])[..10]).unwrap();
    for (what, bytes) in [
        ("a length below the header", 8u32.to_be_bytes().to_vec()),
        ("an absurd length", u32::MAX.to_be_bytes().to_vec()),
        ("a length over the call limit", (64u32 << 20).to_be_bytes().to_vec()),
        ("an unknown message type", frame(REMOTE, 1, 66, 9, &[])),
    ] {
        assert!(hung_up_after(&d, &bytes), "{what}");
    }
    // Wrong program or version, and unknown procedures, get error replies on a connection that stays usable.
    let mut s = UnixStream::connect(d.libvirt_socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for (prog, vers, proc_, code) in [(0x1234_5678u32, 1u32, 1i32, 39u32), (REMOTE, 7, 1, 39), (REMOTE, 1, 66, 0), (REMOTE, 1, 9999, 5)] {
        s.write_all(&frame(prog, vers, proc_, 0, &[])).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
        s.read_exact(&mut body).unwrap();
        let status = u32::from_be_bytes(body[20..24].try_into().unwrap());
        if code == 0 {
            assert_eq!(status, 0, "AUTH_LIST works before open");
        } else {
            assert_eq!(status, 1, "program {prog:#x} v{vers} proc {proc_}: an error reply");
            assert_eq!(u32::from_be_bytes(body[24..28].try_into().unwrap()), code, "error code");
        }
    }
    // A keepalive ping is answered with a pong.
    const KEEPALIVE: u32 = 0x6b65_6570;
    s.write_all(&frame(KEEPALIVE, 1, 1, 2, &[])).unwrap();
    let mut reply = [0u8; 28];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), KEEPALIVE);
    assert_eq!(u32::from_be_bytes(reply[12..16].try_into().unwrap()), 2, "PONG");
    // The daemon serves others, over both protocols, and is alive.
    assert!(virsh(&d, &["list", "--all"]).code == 0);
    d.ok(&["list"]);
    let start = Instant::now();
    let mut buf = [0u8; 16];
    half.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(half.read(&mut buf).unwrap_or(0), 0, "the half frame's connection is closed");
    assert!(start.elapsed() < Duration::from_secs(45));
}

#[test]
fn virt_install_defines_and_starts_a_domain() {
    let dir = scratch("lv-install");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let out = Command::new("virt-install")
        .args(["--connect", &uri(&d, false), "--name", "vi", "--memory", "64", "--vcpus", "1", "--import"])
        .arg("--boot")
        .arg(format!("kernel={}", k.idle.display()))
        .args(["--disk", "none", "--network", "none", "--graphics", "none", "--noautoconsole", "--osinfo", "linux2022"])
        .stdin(Stdio::null())
        .output()
        .expect("running virt-install (Debian package virtinst)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("Domain creation completed"), "{text}\n--- daemon log ---\n{}", d.log());
    // virt-install starts it transient and then defines it: running and persistent.
    let info = virsh_ok(&d, &["dominfo", "vi"]);
    assert_eq!(field(&info, "State:"), "running");
    assert_eq!(field(&info, "Persistent:"), "yes");
    let xml = virsh_ok(&d, &["dumpxml", "vi"]);
    assert!(xml.contains(&format!("<kernel>{}</kernel>", k.idle.display())) && xml.contains("libosinfo"), "{xml}");
    virsh_ok(&d, &["destroy", "vi"]);
    assert_eq!(virsh_ok(&d, &["domstate", "vi"]).trim(), "shut off");
}

#[test]
fn virsh_manages_networks_in_the_daemon_s_own_namespace() {
    let dir = scratch("lv-net");
    let mut d = Daemon::start_in_netns(&dir);
    let in_daemon_ns = |pid: u32, cmd: &str| {
        let o = Command::new("nsenter").arg(format!("--net=/proc/{pid}/ns/net")).args(["sh", "-c", cmd]).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    assert!(virsh_ok(&d, &["net-list", "--all", "--name"]).trim().is_empty());
    // libvirt's default network, on a subnet of the test's own.
    let xml = "<network>\n  <name>default</name>\n  <forward/>\n  <ip address='10.90.0.1' netmask='255.255.255.0'>\n    <dhcp>\n      <range start='10.90.0.2' end='10.90.0.254'/>\n    </dhcp>\n  </ip>\n</network>\n";
    let f = dir.join("default-net.xml");
    std::fs::write(&f, xml).unwrap();
    let out = virsh_ok(&d, &["net-define", f.to_str().unwrap()]);
    assert!(out.contains("Network default defined from"), "{out}");
    let list = virsh_ok(&d, &["net-list", "--all"]);
    assert!(list.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["default", "inactive", "no", "yes"]), "{list}");
    // rvirtd gave it a bridge and a MAC, as libvirt does.
    let dumped = virsh_ok(&d, &["net-dumpxml", "default"]);
    assert!(dumped.contains("<bridge name='virbr0'") && dumped.contains("<mac address='52:54:00:"), "{dumped}");

    let out = virsh_ok(&d, &["net-start", "default"]);
    assert!(out.contains("Network default started"), "{out}");
    let info = virsh_ok(&d, &["net-info", "default"]);
    assert_eq!(field(&info, "Active:"), "yes");
    assert_eq!(field(&info, "Bridge:"), "virbr0");
    let pid = d.pid();
    let (up, addr) = in_daemon_ns(pid, "ip -4 -o addr show dev virbr0");
    assert!(up && addr.contains("10.90.0.1/24"), "the bridge is up in the daemon's namespace: {addr}");
    virsh_fails(&d, &["net-start", "default"], "network is already active");
    let ro = virsh_at(&uri(&d, true), &["net-destroy", "default"]);
    assert!(ro.code != 0 && ro.stderr.contains("read only access prevents"), "{ro:?}");
    virsh_ok(&d, &["net-autostart", "default"]);
    assert!(virsh_ok(&d, &["net-list", "--autostart", "--name"]).lines().any(|l| l.trim() == "default"));

    // A domain's card on the network: rvirtd makes the tap, the VMM puts it on the network's bridge.
    let k = kernels(&dir);
    let card = "<devices><interface type='network'><source network='default'/><mac address='52:54:00:00:00:77'/><target dev='vnet7'/></interface></devices>";
    let f = d.xml_file("onnet", &domain_xml("onnet", &k.idle, card));
    virsh_ok(&d, &["define", f.to_str().unwrap()]);
    virsh_ok(&d, &["start", "onnet"]);
    let (_, link) = in_daemon_ns(pid, "ip -o link show master virbr0");
    assert!(link.contains("vnet7"), "the card's tap is on the network's bridge: {link}");
    assert!(virsh_ok(&d, &["dumpxml", "onnet"]).contains("<source network='default'/>"));
    // A fixed lease for the card, added to the running network (dnsmasq re-reads its hosts on SIGHUP) and its definition.
    let host = "<host mac='52:54:00:00:00:77' name='onnet' ip='10.90.0.77'/>";
    let out = virsh_ok(&d, &["net-update", "default", "add", "ip-dhcp-host", host, "--live", "--config"]);
    assert!(out.contains("Updated network default"), "{out}");
    assert!(virsh_ok(&d, &["net-dumpxml", "default"]).contains("ip='10.90.0.77'"));
    assert!(virsh_ok(&d, &["net-dumpxml", "--inactive", "default"]).contains("ip='10.90.0.77'"));
    virsh_fails(&d, &["net-update", "default", "add", "ip-dhcp-host", host, "--live"], "already a fixed lease");
    virsh_fails(&d, &["net-update", "default", "add", "ip-dhcp-host", "<host mac='52:54:00:00:00:78' ip='10.99.0.1'/>", "--live"], "not a guest address inside 10.90.0.0/24");
    // A stand-in for the guest's DHCP client, with the card's MAC (the
    // hand-made guest has no network stack): its lease is the domain's address.
    let guest = Command::new("unshare").args(["-n", "sleep", "120"]).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let g = guest.id();
    let (made, why) = in_daemon_ns(pid, &format!("ip link add vs0 type veth peer name vs1 && ip link set vs1 netns {g} && ip link set vs0 master virbr0 up"));
    assert!(made, "{why}");
    let script = dir.join("udhcpc.sh");
    std::fs::write(&script, "#!/bin/sh\n[ \"$1\" = bound ] && ip addr add $ip/$mask dev $interface && echo \"LEASE $ip\"\nexit 0\n").unwrap();
    let (_, lease) = in_daemon_ns(g, &format!("chmod +x {0} && ip link set vs1 address 52:54:00:00:00:77 && ip link set vs1 up && busybox udhcpc -i vs1 -q -n -t 15 -T 1 -s {0}", script.display()));
    let ip = lease.lines().find_map(|l| l.strip_prefix("LEASE ")).unwrap_or_else(|| panic!("no lease: {lease}")).to_string();
    assert_eq!(ip, "10.90.0.77", "the fixed lease added while the network ran");
    let leases = virsh_ok(&d, &["net-dhcp-leases", "default"]);
    assert!(leases.contains("52:54:00:00:00:77") && leases.contains(&format!("{ip}/24")), "{leases}");
    let addrs = virsh_ok(&d, &["domifaddr", "onnet"]);
    assert!(addrs.lines().any(|l| l.contains("vnet7") && l.contains("52:54:00:00:00:77") && l.contains(&format!("{ip}/24"))), "{addrs}");
    // The same through rvirt's own socket.
    let ours = d.ok(&["domifaddr", "onnet"]);
    assert!(ours.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["vnet7", "52:54:00:00:00:77", "ipv4", &format!("{ip}/24")]), "{ours}");
    // A DNS name added to the running network answers at once (dnsmasq re-reads its hosts on SIGHUP).
    let name = "<host ip='10.90.0.200'><hostname>files.test</hostname></host>";
    assert!(virsh_ok(&d, &["net-update", "default", "add-first", "dns-host", name, "--live"]).contains("Updated network default"));
    let (_, answer) = in_daemon_ns(g, "busybox nslookup -type=a files.test 10.90.0.1");
    assert!(answer.contains("10.90.0.200"), "{answer}");
    assert!(virsh_ok(&d, &["net-dumpxml", "default"]).contains("<hostname>files.test</hostname>"));
    assert!(!virsh_ok(&d, &["net-dumpxml", "--inactive", "default"]).contains("files.test"), "live only");
    virsh_fails(&d, &["net-update", "default", "add", "forward", "<forward mode='route'/>", "--live"], "not supported");
    virsh_fails(&d, &["net-update", "default", "delete", "ip-dhcp-range", "<range start='10.90.0.2' end='10.90.0.254'/>", "--live"], "the network's only DHCP range");
    virsh_ok(&d, &["net-update", "default", "delete", "dns-host", name, "--live"]);
    let (_, answer) = in_daemon_ns(g, "busybox nslookup -type=a files.test 10.90.0.1");
    assert!(!answer.contains("10.90.0.200"), "{answer}");
    let mut guest = guest;
    let _ = guest.kill();
    let _ = guest.wait();
    virsh_ok(&d, &["net-update", "default", "delete", "ip-dhcp-host", host, "--live", "--config"]);
    assert!(!virsh_ok(&d, &["net-dumpxml", "--inactive", "default"]).contains("10.90.0.77"));
    virsh_ok(&d, &["destroy", "onnet"]);
    let f = d.xml_file("offnet", &domain_xml("offnet", &k.idle, "<devices><interface type='network'><source network='nosuch'/></interface></devices>"));
    virsh_ok(&d, &["define", f.to_str().unwrap()]);
    virsh_fails(&d, &["start", "offnet"], "network 'nosuch' does not exist");

    // A restarted daemon (in the same namespace, which dnsmasq keeps) finds it up: not lost, not doubled.
    let before = std::fs::read_to_string(d.state.join("networks/run/default.pid")).unwrap().trim().to_string();
    d.kill();
    d.prefix = vec!["nsenter".into(), format!("--net=/proc/{before}/ns/net")];
    d.restart();
    let list = virsh_ok(&d, &["net-list", "--all"]);
    assert!(list.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["default", "active", "yes", "yes"]), "{list}\n{}", d.log());
    let after = std::fs::read_to_string(d.state.join("networks/run/default.pid")).unwrap().trim().to_string();
    assert_eq!(before, after, "the same dnsmasq serves it");

    // virsh net-edit: the definition through $EDITOR, defined back (the running network keeps its range until restarted).
    let o = Command::new("virsh")
        .args(["-c", &uri(&d, false), "net-edit", "default"])
        .env("EDITOR", "sed -i 's#10.90.0.254#10.90.0.200#'")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("Network default XML configuration edited"), "{o:?}");
    assert!(virsh_ok(&d, &["net-dumpxml", "--inactive", "default"]).contains("end='10.90.0.200'"), "the stored definition changed");
    assert!(virsh_ok(&d, &["net-dumpxml", "default"]).contains("end='10.90.0.254'"), "the running network keeps its own until restarted");
    let out = virsh_ok(&d, &["net-destroy", "default"]);
    assert!(out.contains("Network default destroyed"), "{out}");
    let (up, _) = in_daemon_ns(d.pid(), "ip link show dev virbr0");
    assert!(!up, "the bridge is gone");
    assert!(!std::path::Path::new(&format!("/proc/{before}")).exists(), "dnsmasq is gone");
    virsh_fails(&d, &["net-destroy", "default"], "network is not active");
    let out = virsh_ok(&d, &["net-undefine", "default"]);
    assert!(out.contains("Network default has been undefined"), "{out}");
    assert!(virsh_ok(&d, &["net-list", "--all", "--name"]).trim().is_empty());
    virsh_fails(&d, &["net-info", "nosuch"], "failed to get network 'nosuch'");
}
