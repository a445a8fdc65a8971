//! rvirtd and rvirt without running guests: definitions, validation,
//! persistence, many clients at once, and hostile requests on the socket.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use rvirt_client::Connection;
use rvirt_domain::protocol::{DomainState, Request};
use support::{domain_xml, kernels, scratch, Daemon};

#[test]
fn definitions_round_trip_through_the_client() {
    let dir = scratch("defs");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let extra = "  <features><acpi/></features>\n  <devices>\n    <graphics type='vnc'/>\n    <serial type='pty'/>\n  </devices>";
    let file = d.xml_file("a", &domain_xml("a", &k.idle, extra));
    let o = d.rvirt(&["define", file.to_str().unwrap()]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim(), format!("Domain 'a' defined from {}", file.display()));
    assert!(o.stderr.contains("warning: line 9: <features> in <domain> is not supported"), "{}", o.stderr);
    assert!(o.stderr.contains("warning: <graphics> (line 11): rvirt has no display"), "{}", o.stderr);

    assert_eq!(d.ok(&["list"]).lines().count(), 2, "no running domains: header only");
    let all = d.ok(&["list", "--all"]);
    assert!(all.lines().nth(2).unwrap().split_whitespace().collect::<Vec<_>>() == ["-", "a", "shut", "off"], "{all}");
    let json: serde_json::Value = serde_json::from_str(&d.ok(&["--json", "list", "--all"])).unwrap();
    assert_eq!(json["domains"][0]["state"], "shut-off");

    let xml = d.ok(&["dumpxml", "a"]);
    assert!(xml.contains("<graphics type='vnc'/>") && xml.contains("<features><acpi/></features>"), "unknown elements kept:\n{xml}");
    let uuid = xml.split("<uuid>").nth(1).unwrap().split("</uuid>").next().unwrap().to_string();
    // Lookup by UUID as well as by name.
    assert!(d.ok(&["dominfo", &uuid]).contains("State:          shut off"));
    assert_eq!(d.ok(&["domstate", "a"]).trim(), "shut off");

    // Redefining with the same name and UUID updates; clashes are refused.
    let again = d.xml_file("a2", &xml.replace("<vcpu>1</vcpu>", "<vcpu>2</vcpu>"));
    d.ok(&["define", again.to_str().unwrap()]);
    assert!(d.ok(&["dumpxml", "a"]).contains("<vcpu>2</vcpu>"));
    let other_uuid = d.xml_file("a3", &domain_xml("a", &k.idle, ""));
    d.fails(&["define", other_uuid.to_str().unwrap()], "domain 'a' already exists with uuid");
    let same_uuid = d.xml_file("b", &xml.replace("<name>a</name>", "<name>b</name>"));
    d.fails(&["define", same_uuid.to_str().unwrap()], "is already used by domain 'a'");

    // Invalid XML: the error names the line and element; nothing is stored.
    let bad = d.xml_file("bad", "<domain type='kvm'>\n<name>c</name>\n<memory>lots</memory>\n</domain>");
    d.fails(&["define", bad.to_str().unwrap()], "line 3: <memory>: 'lots' is not a whole number");
    let broken = d.xml_file("broken", "<domain type='kvm'>\n<name>c</name>\n<memory>1</memroy>\n</domain>");
    d.fails(&["define", broken.to_str().unwrap()], "line 3");
    d.fails(&["define", "/nonexistent.xml"], "/nonexistent.xml");
    d.fails(&["dumpxml", "c"], "no domain with a matching name, id or uuid 'c'");

    // edit: a change is validated and saved; a broken edit changes nothing.
    let edit = |script: &str| {
        let p = dir.join("editor.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::process::Command::new("chmod").arg("+x").arg(&p).status().unwrap();
        d.rvirt_with(&["edit", "a"], &[("EDITOR", p.to_str().unwrap()), ("VISUAL", p.to_str().unwrap())], None)
    };
    let o = edit(r#"sed -i 's/<vcpu>2</<vcpu>3</' "$1""#);
    assert_eq!((o.code, o.stdout.trim()), (0, "Domain 'a' XML configuration edited."), "{}", o.stderr);
    assert!(d.ok(&["dumpxml", "a"]).contains("<vcpu>3</vcpu>"));
    let o = edit(r#"sed -i 's/<vcpu>3</<vcpu>zero</' "$1""#);
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("<vcpu>: 'zero' is not a vCPU count") && o.stderr.contains("unchanged"), "{}", o.stderr);
    assert!(d.ok(&["dumpxml", "a"]).contains("<vcpu>3</vcpu>"), "a failed edit keeps the old definition");
    let o = edit("true");
    assert_eq!(o.stdout.trim(), "Domain 'a' XML configuration not changed.");
    let o = edit("exit 3");
    assert_eq!(o.code, 1);
    assert!(o.stderr.contains("failed"), "{}", o.stderr);

    d.ok(&["autostart", "a"]);
    assert!(d.ok(&["dominfo", "a"]).contains("Autostart:      enable"));
    d.ok(&["autostart", "--disable", "a"]);
    assert_eq!(d.ok(&["undefine", "a"]).trim(), "Domain 'a' has been undefined");
    d.fails(&["undefine", "a"], "no domain");
    assert_eq!(std::fs::read_dir(d.state.join("domains")).unwrap().count(), 0, "the definition file is gone");
    d.fails(&["start", "a"], "no domain");
}

#[test]
fn definitions_survive_a_daemon_crash() {
    let dir = scratch("persist");
    let mut d = Daemon::start(&dir);
    let k = kernels(&dir);
    for name in ["p1", "p2"] {
        let f = d.xml_file(name, &domain_xml(name, &k.idle, ""));
        d.ok(&["define", f.to_str().unwrap()]);
    }
    d.ok(&["autostart", "p2"]);
    let before = d.ok(&["dumpxml", "p1"]);
    d.kill();
    // What a crash in the middle of a write would leave: a temporary file.
    std::fs::write(d.state.join("domains/.p3.xml.tmp999"), "<domain type='kvm'><na").unwrap();
    d.restart();
    assert_eq!(d.ok(&["dumpxml", "p1"]), before, "definitions are kept byte for byte");
    let all = d.ok(&["list", "--all"]);
    assert!(!all.contains("p3"), "a half-written temporary is not a domain:\n{all}");
    // p2 was marked for autostart: the new daemon started it (a real KVM guest).
    d.wait_state("p2", "running");
    d.ok(&["destroy", "p2"]);
    assert_eq!(d.state("p1"), "shut off (unknown)");
}

#[test]
fn many_clients_define_and_list_at_once() {
    let dir = scratch("conc");
    let d = Daemon::start(&dir);
    let kernel = dir.join("k");
    std::fs::write(&kernel, b"not needed: nothing starts").unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let socket = d.socket.clone();
            let kernel = kernel.clone();
            std::thread::spawn(move || {
                let mut c = Connection::open(&socket).unwrap();
                for i in 0..20 {
                    let name = format!("t{t}-{i}");
                    let r = c.call(&Request::Define { xml: domain_xml(&name, &kernel, "") }).unwrap();
                    assert!(r.ok, "{r:?}");
                    let l = c.call(&Request::List { all: true }).unwrap();
                    let rows = l.domains.unwrap();
                    assert!(rows.iter().any(|r| r.name == name), "a client sees its own definition at once");
                    assert!(rows.iter().all(|r| r.state == DomainState::ShutOff));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let mut c = Connection::open(&d.socket).unwrap();
    let rows = c.call(&Request::List { all: true }).unwrap().domains.unwrap();
    assert_eq!(rows.len(), 160);
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "inactive domains are listed by name");
    assert_eq!(std::fs::read_dir(d.state.join("domains")).unwrap().count(), 160);
}

#[test]
fn malformed_requests_get_errors_and_the_daemon_carries_on() {
    let dir = scratch("junk");
    let d = Daemon::start(&dir);
    let s = UnixStream::connect(&d.socket).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut ask = |bytes: &[u8]| -> serde_json::Value {
        w.write_all(bytes).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    for junk in [&b"hello\n"[..], b"{\"command\":\"fly\"}\n", b"{\"command\":\"start\"}\n", b"\xff\xfe\n", b"[]\n", b"{\"command\":\"define\",\"xml\":\"<x/>\"}\n"] {
        let v = ask(junk);
        assert_eq!(v["ok"], false, "{v}");
        assert!(!v["error"].as_str().unwrap().is_empty());
    }
    assert_eq!(ask(b"{\"command\":\"list\",\"all\":true}\n")["ok"], true, "the same connection still works");
    // An overlong request is refused and its connection closed; others are unaffected.
    let mut big = UnixStream::connect(&d.socket).unwrap();
    let huge = vec![b'x'; rvirt_domain::protocol::MAX_REQUEST_BYTES + (1 << 20)];
    let _ = big.write_all(&huge);
    let mut answer = String::new();
    let _ = BufReader::new(big).read_line(&mut answer);
    assert!(answer.contains("longer than"), "{answer}");
    // A client that connects and vanishes does no harm.
    drop(UnixStream::connect(&d.socket).unwrap());
    let out = d.ok(&["list", "--all"]);
    assert!(out.starts_with(" Id"), "{out}");
    // A second daemon on the same socket is refused; the first keeps serving.
    let st = std::process::Command::new(&support::bins().rvirtd)
        .arg("--no-libvirt-socket")
        .arg("--state-dir")
        .arg(dir.join("other"))
        .arg("--socket")
        .arg(&d.socket)
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&st.stderr).contains("already listening"));
    d.ok(&["list"]);
    // Without a daemon, the client says so in one line.
    let o = std::process::Command::new(&support::bins().rvirt).args(["--connect", "/nonexistent.sock", "list"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot connect to rvirtd at /nonexistent.sock"));
}

#[test]
fn the_socket_is_private_unless_a_group_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("perm");
    let d = Daemon::start(&dir);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let sock = dir.join("g.sock");
    let mut child = std::process::Command::new(&support::bins().rvirtd)
        .arg("--no-libvirt-socket")
        .arg("--state-dir")
        .arg(dir.join("g"))
        .arg("--socket")
        .arg(&sock)
        .args(["--group", "0"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.gid(), 0);
    let _ = child.kill();
    let _ = child.wait();
    let o = std::process::Command::new(&support::bins().rvirtd)
        .arg("--no-libvirt-socket")
        .arg("--state-dir")
        .arg(dir.join("x"))
        .arg("--socket")
        .arg(dir.join("y.sock"))
        .args(["--group", "no-such-group-rvirt"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("no group named 'no-such-group-rvirt'"));
}

/// Every real libvirt definition in ../shared/libvirt-xml-corpus that rvirt
/// accepts goes through the daemon and Debian's virsh: define, dumpxml,
/// define the dump, dumpxml again: the same bytes.
#[test]
fn the_libvirt_corpus_round_trips_byte_for_byte_through_virsh() {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = std::env::var_os("RVIRT_LIBVIRT_CORPUS")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain(here.ancestors().map(|a| a.join("shared/libvirt-xml-corpus")))
        .chain([std::path::PathBuf::from("/work/shared/libvirt-xml-corpus")])
        .find(|p| p.is_dir());
    let Some(corpus) = corpus else {
        eprintln!("WARNING: the libvirt corpus was not found (set RVIRT_LIBVIRT_CORPUS); skipped");
        return;
    };
    let dir = support::scratch("corpus-virsh");
    let d = support::Daemon::start(&dir);
    let mut files: Vec<_> = std::fs::read_dir(&corpus).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "xml")).collect();
    files.sort();
    let mut round_tripped = 0;
    for path in files {
        let xml = std::fs::read_to_string(&path).unwrap();
        let Ok(def) = rvirt_domain::DomainXml::parse(&xml) else { continue };
        let name = def.name.clone();
        support::virsh_ok(&d, &["define", path.to_str().unwrap()]);
        let first = support::virsh_ok(&d, &["dumpxml", "--inactive", &name]);
        let again = dir.join("again.xml");
        std::fs::write(&again, &first).unwrap();
        support::virsh_ok(&d, &["define", again.to_str().unwrap()]);
        let second = support::virsh_ok(&d, &["dumpxml", "--inactive", &name]);
        assert_eq!(second, first, "{}: dumpxml -> define -> dumpxml changed the definition", path.display());
        // rvirt's own client reads the same bytes.
        assert_eq!(d.ok(&["dumpxml", "--inactive", &name]), first.trim_end_matches('\n').to_string() + "\n");
        support::virsh_ok(&d, &["undefine", &name]);
        round_tripped += 1;
    }
    assert!(round_tripped >= 28, "{round_tripped} corpus definitions went round");
}
