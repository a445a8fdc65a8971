//! Remote management: rvirtd in one network namespace, clients in another
//! (joined by a veth the test makes), reached the two ways libvirt's
//! clients reach a remote host: TLS with certificates (made here with
//! openssl, with the extensions libvirt's GnuTLS checks) and ssh through a
//! real sshd (Debian's openssh-server) running our `virt-ssh-helper`.
//! Debian's virsh and rvirt are the clients.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{domain_xml, field, kernels, make_pki, scratch, sh_ok, virsh_console, Daemon, Netns, Out};

const SERVER: &str = "10.77.0.1";
const TLS_PORT: u16 = 16514;
const SSH_PORT: u16 = 2222;
const ALLOWED: &str = "C=GB,O=rvirt test,CN=admin*";

/// Two "hosts": the server's namespace and the client's, joined by a veth.
fn two_hosts() -> (Netns, Netns) {
    let (server, client) = (Netns::new(), Netns::new());
    let (p1, p2) = (server.pid(), client.pid());
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("ip link add rvs{p1} type veth peer name rvc{p1} && ip link set rvs{p1} netns {p1} && ip link set rvc{p1} netns {p2}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "veth: {}", String::from_utf8_lossy(&o.stderr));
    let up = |ns: &Netns, dev: String, ip: &str| {
        let (ok, out) = ns.sh(&format!("ip link set lo up && ip link set {dev} name eth0 && ip addr add {ip}/24 dev eth0 && ip link set eth0 up"));
        assert!(ok, "{out}");
    };
    up(&server, format!("rvs{p1}"), SERVER);
    up(&client, format!("rvc{p1}"), "10.77.0.2");
    (server, client)
}

/// Runs `program args` in the client's namespace with extra environment.
fn client_run(ns: &Netns, program: &str, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{}/ns/net", ns.pid())).arg(program).args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    Out { code: o.status.code().unwrap_or(-1), stdout: String::from_utf8_lossy(&o.stdout).into_owned(), stderr: String::from_utf8_lossy(&o.stderr).into_owned() }
}

fn tls_uri(pki: &Path, who: &str) -> String {
    format!("qemu+tls://{SERVER}/system?pkipath={}", pki.join(who).display())
}

fn ok(o: Out, what: &str, d: &Daemon) -> String {
    assert_eq!(o.code, 0, "{what}: {}{}\n--- daemon log ---\n{}", o.stdout, o.stderr, d.log());
    o.stdout
}

/// Waits until `cond` holds (up to 10 s).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Debian's sshd in the server's namespace on port 2222, key login for
/// root only; its sessions find our virt-ssh-helper first on PATH and the
/// test daemon's sockets in the environment. Returns it and the directory
/// of an `ssh` that uses the test's key and known_hosts (virsh runs `ssh`
/// from PATH; this keeps the machine's ~/.ssh out of it).
struct Sshd(std::process::Child);

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_sshd(dir: &Path, server: &Netns, d: &Daemon) -> (Sshd, PathBuf) {
    let sshd = Path::new("/usr/sbin/sshd");
    assert!(sshd.exists(), "Debian's openssh-server is needed (.ci/run installs it)");
    let s = dir.join("ssh");
    std::fs::create_dir_all(&s).unwrap();
    let sd = s.display();
    sh_ok(&format!("cd {sd} && ssh-keygen -q -t ed25519 -N '' -f host_key && ssh-keygen -q -t ed25519 -N '' -f id && cp id.pub authorized_keys"));
    let host_key = std::fs::read_to_string(s.join("host_key.pub")).unwrap();
    std::fs::write(s.join("known_hosts"), format!("[{SERVER}]:{SSH_PORT} {host_key}")).unwrap();
    let helper_dir = Path::new(env!("CARGO_BIN_EXE_virt-ssh-helper")).parent().unwrap().to_path_buf();
    std::fs::write(
        s.join("sshd_config"),
        format!(
            "Port {SSH_PORT}\nListenAddress {SERVER}\nHostKey {sd}/host_key\nPidFile {sd}/sshd.pid\nAuthorizedKeysFile {sd}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             SetEnv PATH={}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin RVIRT_LIBVIRT_SOCKET={} RVIRT_SOCKET={}\n",
            helper_dir.display(),
            d.libvirt_socket().display(),
            d.socket.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let log = std::fs::File::create(s.join("sshd.log")).unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", server.pid()))
        .arg(sshd)
        .args(["-D", "-e", "-f"])
        .arg(s.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let sshd = Sshd(child);
    wait_for("sshd did not start listening", || server.sh(&format!("ss -ltn | grep -q '{SERVER}:{SSH_PORT}'")).0);
    std::fs::write(
        s.join("client_config"),
        format!("Host *\n  UserKnownHostsFile {sd}/known_hosts\n  StrictHostKeyChecking yes\n  IdentityFile {sd}/id\n  IdentitiesOnly yes\n  BatchMode yes\n"),
    )
    .unwrap();
    let bin = s.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("ssh"), format!("#!/bin/sh\nexec /usr/bin/ssh -F {sd}/client_config \"$@\"\n")).unwrap();
    sh_ok(&format!("chmod +x {}", bin.join("ssh").display()));
    (sshd, bin)
}

/// Connects, sends nothing, prints how long until the server hung up.
const IDLE_CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
t = time.time()
s.settimeout(30)
while s.recv(4096):
    pass
print(round(time.time() - t, 1))
"#;

/// Sends a libvirt AUTH_LIST call without TLS; prints whether the answer
/// is a TLS alert (record type 21) or something else.
const PLAIN_CALL: &str = r#"
import socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.settimeout(10)
s.sendall(struct.pack(">IIIiiii", 28, 0x20008086, 1, 66, 0, 1, 0))
got = s.recv(4096)
print("alert" if got[:1] == b"\x15" else ("eof" if not got else "other %r" % got[:8]))
"#;

#[test]
fn virsh_and_rvirt_manage_a_remote_rvirtd_over_tls_and_ssh() {
    let dir = scratch("remote");
    let (server, client) = two_hosts();
    let pki = make_pki(&dir, SERVER);
    let args = vec![
        "--listen-tls".to_string(),
        format!("{SERVER}:{TLS_PORT}"),
        "--pki-dir".into(),
        pki.join("server").display().to_string(),
        "--tls-allowed-dn".into(),
        ALLOWED.into(),
    ];
    let d = Daemon::start_with(&dir, server.enter(), args);
    wait_for("the TLS listener did not come up", || server.sh(&format!("ss -ltn | grep -q '{SERVER}:{TLS_PORT}'")).0);
    let k = kernels(&dir);
    let xml = d.xml_file("far", &domain_xml("far", &k.chatter, "<devices><serial type='pty'/></devices>"));
    let xml = xml.to_str().unwrap();

    // TLS, with the allowed certificate: the everyday commands.
    let admin = tls_uri(&pki, "admin");
    let virsh = |uri: &str, args: &[&str]| client_run(&client, "virsh", &[&["-c", uri], args].concat(), &[]);
    ok(virsh(&admin, &["define", xml]), "virsh define over TLS", &d);
    ok(virsh(&admin, &["start", "far"]), "virsh start over TLS", &d);
    let list = ok(virsh(&admin, &["list"]), "virsh list over TLS", &d);
    assert!(list.contains("far") && list.contains("running"), "{list}");
    assert_eq!(field(&ok(virsh(&admin, &["dominfo", "far"]), "dominfo", &d), "State:"), "running");
    // rvirt takes the same URI (its own protocol, over the same listener).
    let rvirt = |uri: &str, args: &[&str], env: &[(&str, &str)]| client_run(&client, support::bins().rvirt.to_str().unwrap(), &[&["--connect", uri], args].concat(), env);
    let listed = ok(rvirt(&admin, &["list"], &[]), "rvirt list over TLS", &d);
    assert!(listed.contains("far") && listed.contains("running"), "{listed}");
    let console = rvirt(&admin, &["console", "far"], &[]);
    assert!(console.code != 0 && console.stderr.contains("virsh -c"), "rvirt console over TLS: {console:?}");
    let install = rvirt(&admin, &["install", "--name", "x", "--memory", "64", "--vcpus", "1", "--kernel", "/k", "--disk", "path=/tmp/x.img,size=1"], &[]);
    assert!(install.code != 0 && install.stderr.contains("creates disk images on this host"), "rvirt install over TLS: {install:?}");
    ok(virsh(&admin, &["destroy", "far"]), "virsh destroy over TLS", &d);
    assert_eq!(ok(virsh(&admin, &["domstate", "far"]), "domstate", &d).trim(), "shut off");

    // A client that connects and never starts a handshake is dropped after
    // 10 s (checked at the end of the refusals, which take longer).
    let mut idle = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", client.pid()))
        .args(["/usr/bin/python3", "-c", IDLE_CLIENT, SERVER, &TLS_PORT.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let idle_since = Instant::now();

    // Refused: a DN outside the allow-list (virsh sees the server's missing byte).
    let o = virsh(&tls_uri(&pki, "other"), &["list"]);
    assert_ne!(o.code, 0, "a client outside the allow-list got in: {}", o.stdout);
    assert!(o.stderr.contains("server verification") || o.stderr.contains("TLS confirmation"), "{}", o.stderr);
    assert!(d.log().contains("dn=C=GB,O=rvirt test,CN=someone") && d.log().contains("not in --tls-allowed-dn"), "{}", d.log());
    let o = rvirt(&tls_uri(&pki, "other"), &["list"], &[]);
    assert!(o.code != 0 && o.stderr.contains("server verification failed"), "{o:?}");
    // An expired certificate: virsh will not even offer it; rvirt offers it and the server refuses.
    let o = virsh(&tls_uri(&pki, "expired"), &["list"]);
    assert!(o.code != 0 && o.stderr.contains("expired"), "{o:?}");
    let o = rvirt(&tls_uri(&pki, "expired"), &["list"], &[]);
    assert!(o.code != 0 && o.stderr.contains("handshake"), "{o:?}");
    wait_for("the server logged the expired certificate", || d.log().contains("Expired"));
    // A certificate the CRL revokes.
    let o = virsh(&tls_uri(&pki, "revoked"), &["list"]);
    assert_ne!(o.code, 0, "a revoked certificate got in: {}", o.stdout);
    wait_for("the server logged the revoked certificate", || d.log().contains("Revoked"));
    // Plain TCP: virsh's qemu+tcp to the TLS port gets no service, and
    // nothing without a handshake reaches the daemon.
    let o = virsh(&format!("qemu+tcp://{SERVER}:{TLS_PORT}/system"), &["list"]);
    assert_ne!(o.code, 0, "plain TCP got in: {}", o.stdout);
    assert!(!d.log().contains("uri=qemu+tcp"), "{}", d.log());
    let o = rvirt(&format!("qemu+tcp://{SERVER}:{TLS_PORT}/system"), &["list"], &[]);
    assert!(o.code != 0 && o.stderr.contains("plain TCP"), "{o:?}");
    // A libvirt call in the clear is answered by a TLS alert, never by libvirt.
    let o = client_run(&client, "/usr/bin/python3", &["-c", PLAIN_CALL, SERVER, &TLS_PORT.to_string()], &[]);
    assert_eq!(o.stdout.trim(), "alert", "{o:?}");
    let waited = idle_since.elapsed();
    let mut said = String::new();
    std::io::Read::read_to_string(idle.stdout.as_mut().unwrap(), &mut said).unwrap();
    let _ = idle.wait();
    let closed_after: f64 = said.trim().parse().unwrap_or_else(|_| panic!("idle client said {said:?}"));
    assert!((9.0..20.0).contains(&closed_after), "an idle client was dropped after {closed_after} s (waited {waited:?})");

    // ssh: virsh and rvirt through a real sshd running virt-ssh-helper.
    let (_sshd, ssh_bin) = start_sshd(&dir, &server, &d);
    let path = format!("{}:{}", ssh_bin.display(), std::env::var("PATH").unwrap_or_default());
    let ssh_uri = format!("qemu+ssh://root@{SERVER}:{SSH_PORT}/system");
    let over_ssh = |args: &[&str]| client_run(&client, "virsh", &[&["-c", ssh_uri.as_str()], args].concat(), &[("PATH", &path)]);
    let o = over_ssh(&["list", "--all"]);
    assert_eq!(o.code, 0, "virsh over ssh: {}{}\nsshd: {}", o.stdout, o.stderr, std::fs::read_to_string(dir.join("ssh/sshd.log")).unwrap_or_default());
    assert!(o.stdout.contains("far"), "{}", o.stdout);
    ok(over_ssh(&["start", "far"]), "virsh start over ssh", &d);
    let listed = ok(rvirt(&ssh_uri, &["list"], &[("PATH", &path)]), "rvirt list over ssh", &d);
    assert!(listed.contains("far") && listed.contains("running"), "{listed}");
    // virsh console over ssh (a libvirt stream through sshd and the helper).
    virsh_console(&client.enter(), &ssh_uri, "far", &[("PATH", &path)], &d);
    ok(over_ssh(&["destroy", "far"]), "virsh destroy over ssh", &d);
    ok(over_ssh(&["undefine", "far"]), "virsh undefine over ssh", &d);
}

/// rvirtd refuses to start the TLS listener without usable certificates,
/// naming the file, before it serves anything.
#[test]
fn missing_or_malformed_certificates_stop_the_daemon_naming_the_file() {
    let dir = scratch("badpki");
    let run = |pki: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_rvirtd"))
            .args(["--no-libvirt-socket", "--no-read-only-socket", "--listen-tls", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(dir.join("rvirtd.sock"))
            .arg("--pki-dir")
            .arg(pki)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{o:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run(&dir.join("nowhere"));
    assert!(e.contains("nowhere/cacert.pem"), "{e}");
    let pki = make_pki(&dir, "127.0.0.1");
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["cacert.pem", "servercert.pem", "serverkey.pem"] {
        std::fs::copy(pki.join("server").join(f), broken.join(f)).unwrap();
    }
    std::fs::write(broken.join("serverkey.pem"), "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n").unwrap();
    let e = run(&broken);
    assert!(e.contains("serverkey.pem") || e.contains("private key"), "{e}");
    std::fs::write(broken.join("servercert.pem"), "no certificate here\n").unwrap();
    let e = run(&broken);
    assert!(e.contains("servercert.pem") && e.contains("no certificate"), "{e}");
    assert!(!dir.join("rvirtd.sock").exists(), "nothing was served");
}
