//! A real rvirtd in a scratch directory, the real `rvirt` client and real
//! `rvirt-vmm` processes on this host's `/dev/kvm` running hand-made guests.

#![allow(dead_code)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rvirt_lab::guests;
use rvirt_libvirt_rpc::message::{REMOTE_PROGRAM, REMOTE_VERSION};
use rvirt_libvirt_rpc::remote::proc_;
use rvirt_libvirt_rpc::{Encoder, Header, MessageStatus, MessageType, Packet};

/// Paths of the binaries under test.
pub struct Bins {
    pub rvirtd: PathBuf,
    pub rvirt: PathBuf,
    pub vmm: PathBuf,
    pub img: PathBuf,
}

/// Builds rvirt, rvirt-vmm and rvirt-img (same profile as this test) once.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let rvirtd = PathBuf::from(env!("CARGO_BIN_EXE_rvirtd"));
        let dir = rvirtd.parent().expect("bin dir").to_path_buf();
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .args(["build", "--quiet", "-p", "rvirt", "-p", "rvirt-vmm", "-p", "rvirt-img", "--bins"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().expect("cargo build").success(), "building rvirt, rvirt-vmm and rvirt-img");
        Bins { rvirt: dir.join("rvirt"), vmm: dir.join("rvirt-vmm"), img: dir.join("rvirt-img"), rvirtd }
    })
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    // Short: VMM control sockets live under it and socket paths are limited.
    let d = PathBuf::from(format!("/tmp/rvd-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One daemon.
pub struct Daemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    /// More rvirtd options (kept across restarts).
    pub extra_args: Vec<String>,
    /// A command the daemon runs under (`unshare -n`: a network namespace of its own).
    pub prefix: Vec<String>,
    child: Option<Child>,
}

/// What a client command did.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Daemon {
    /// Starts rvirtd on `dir/state` and `dir/rvirtd.sock` and waits until it answers.
    pub fn start(dir: &Path) -> Self {
        Self::start_with_state(dir, &dir.join("state"))
    }

    /// Starts rvirtd in a network namespace of its own (its sockets are
    /// files, so clients reach it from anywhere), for tests of networks.
    pub fn start_in_netns(dir: &Path) -> Self {
        let mut d = Daemon { dir: dir.to_path_buf(), socket: dir.join("rvirtd.sock"), state: dir.join("state"), extra_args: Vec::new(), prefix: vec!["unshare".into(), "-n".into()], child: None };
        d.restart();
        d
    }

    /// Starts rvirtd with its state directory at `state`.
    pub fn start_with_state(dir: &Path, state: &Path) -> Self {
        let mut d = Daemon { dir: dir.to_path_buf(), socket: dir.join("rvirtd.sock"), state: state.to_path_buf(), extra_args: Vec::new(), prefix: Vec::new(), child: None };
        d.restart();
        d
    }

    /// Starts (again) the daemon process, killing the running one first (a
    /// daemon left running would keep answering on the socket, and the test
    /// would talk to it instead of the restarted one).
    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("rvirtd.log")).unwrap();
        // A prefix (unshare, nsenter) runs the daemon in another namespace.
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bins().rvirtd);
                c
            }
            None => Command::new(&bins().rvirtd),
        };
        let child = cmd
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--vmm")
            .arg(&bins().vmm)
            // Domains use files the tests make in their directory.
            .arg("--allow-path")
            .arg(&self.dir)
            .arg("--read-only-socket")
            .arg(self.dir.join("rvirtd-ro.sock"))
            .arg("--libvirt-socket")
            .arg(self.libvirt_socket())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning rvirtd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "rvirtd did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts rvirtd under `prefix` (nsenter into a namespace) with more options.
    pub fn start_with(dir: &Path, prefix: Vec<String>, extra_args: Vec<String>) -> Self {
        let mut d = Daemon { dir: dir.to_path_buf(), socket: dir.join("rvirtd.sock"), state: dir.join("state"), extra_args, prefix, child: None };
        d.restart();
        d
    }

    /// The daemon's libvirt socket (its read-only one is beside it, `-ro`).
    pub fn libvirt_socket(&self) -> PathBuf {
        self.dir.join("libvirt-sock")
    }

    /// Kills the daemon with SIGKILL (a crash): its VMMs keep running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("rvirtd.log")).unwrap_or_default()
    }

    /// Runs `rvirt --connect SOCKET args...`.
    pub fn rvirt(&self, args: &[&str]) -> Out {
        self.rvirt_with(args, &[], None)
    }

    /// Runs the client with extra environment and optional stdin bytes.
    pub fn rvirt_with(&self, args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Out {
        let mut cmd = Command::new(&bins().rvirt);
        cmd.arg("--connect").arg(&self.socket).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawning rvirt");
        if let Some(bytes) = stdin {
            let _ = child.stdin.take().unwrap().write_all(bytes);
        }
        let out = child.wait_with_output().unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs the client and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.rvirt(args);
        assert_eq!(o.code, 0, "rvirt {args:?} failed: {}{}\n--- daemon log ---\n{}", o.stdout, o.stderr, self.log());
        o.stdout
    }

    /// Runs the client and insists on failure with `needle` in the one error line.
    pub fn fails(&self, args: &[&str], needle: &str) {
        let o = self.rvirt(args);
        assert_eq!(o.code, 1, "rvirt {args:?} should fail: {}{}", o.stdout, o.stderr);
        assert!(o.stderr.starts_with("error: ") && o.stderr.contains(needle), "rvirt {args:?}: wanted '{needle}', got: {}", o.stderr);
    }

    /// `domstate --reason` text.
    pub fn state(&self, dom: &str) -> String {
        self.ok(&["domstate", "--reason", dom]).trim().to_string()
    }

    /// Waits until `domstate --reason` of `dom` starts with `want`.
    pub fn wait_state(&self, dom: &str, want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.state(dom);
            if s.starts_with(want) {
                return s;
            }
            assert!(Instant::now() < deadline, "'{dom}' stayed '{s}', wanted '{want}'\n--- daemon log ---\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of a running domain's VMM.
    pub fn vmm_pid(&self, dom: &str) -> i32 {
        let j: serde_json::Value = serde_json::from_str(&self.ok(&["--json", "dominfo", dom])).unwrap();
        j["info"]["pid"].as_i64().expect("a running domain has a VMM pid") as i32
    }

    /// The jailed VMM of a running domain: the only child of the process
    /// rvirtd started (the jail's reaper), which holds its descriptors.
    pub fn jailed_vmm_pid(&self, dom: &str) -> u32 {
        let reaper = self.vmm_pid(dom) as u32;
        let kids = rvirt_lab::procfs::children_of(reaper);
        assert_eq!(kids.len(), 1, "the jail's reaper {reaper} has one child, the VMM: {kids:?}");
        kids[0]
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    /// Writes a domain XML file and returns its path.
    pub fn xml_file(&self, name: &str, xml: &str) -> PathBuf {
        let p = self.dir.join(format!("{name}.xml"));
        std::fs::write(&p, xml).unwrap();
        p
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // VMMs outlive the daemon by design: stop this test's ones here.
        if let Ok(rd) = std::fs::read_dir(self.state.join("run")) {
            for e in rd.flatten() {
                if let Ok(text) = std::fs::read_to_string(e.path()) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                        if let Some(pid) = v["pid"].as_i64() {
                            // SAFETY: kill has no memory effects.
                            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        }
                    }
                }
            }
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Hand-made guests written as kernel files into `dir`.
pub struct Kernels {
    /// Prints "hello" and halts until stopped.
    pub idle: PathBuf,
    /// Prints and powers off at once.
    pub poweroff: PathBuf,
    /// Triple-faults at once.
    pub crash: PathBuf,
    /// Prints 'x' for ever.
    pub chatter: PathBuf,
}

pub fn kernels(dir: &Path) -> Kernels {
    let write = |name: &str, code: Vec<u8>| {
        let p = dir.join(name);
        std::fs::write(&p, guests::bzimage_with(&code)).unwrap();
        p
    };
    let mut idle = guests::print(b"hello\n");
    idle.extend(guests::HALT_FOREVER);
    let mut off = guests::print(b"bye\n");
    off.extend(guests::power_off());
    off.extend(guests::HALT_FOREVER);
    let mut crash = guests::print(b"X");
    crash.extend(guests::TRIPLE_FAULT);
    Kernels {
        idle: write("idle.bzImage", idle),
        poweroff: write("poweroff.bzImage", off),
        crash: write("crash.bzImage", crash),
        chatter: write("chatter.bzImage", guests::print_forever(b'x')),
    }
}

/// A small domain: 64 MiB, one vCPU, the given kernel, `extra` inside <domain>.
pub fn domain_xml(name: &str, kernel: &Path, extra: &str) -> String {
    format!(
        "<domain type='kvm'>\n  <name>{name}</name>\n  <memory unit='MiB'>64</memory>\n  <vcpu>1</vcpu>\n  <os>\n    <type>hvm</type>\n    <kernel>{}</kernel>\n  </os>\n{extra}\n</domain>\n",
        kernel.display()
    )
}

/// A domain's `<devices>` with one file disk `vda` at `path`, `driver`
/// (a `<driver .../>` element or nothing) and `extra` inside `<disk>`.
pub fn disk_xml(path: &Path, driver: &str, extra: &str) -> String {
    format!("<devices><disk type='file' device='disk'>{driver}<source file='{}'/><target dev='vda'/>{extra}</disk></devices>", path.display())
}

// Debian's virsh (package libvirt-clients) against a test's daemon.

/// The URI that reaches this test's daemon (`ro`: its read-only socket).
pub fn uri(d: &Daemon, ro: bool) -> String {
    let mut s = d.libvirt_socket().display().to_string();
    if ro {
        s.push_str("-ro");
    }
    format!("qemu:///system?socket={s}")
}

/// Runs Debian's virsh against the daemon.
pub fn virsh(d: &Daemon, args: &[&str]) -> Out {
    virsh_at(&uri(d, false), args)
}

pub fn virsh_at(uri: &str, args: &[&str]) -> Out {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running virsh (Debian package libvirt-clients; .ci/run installs it)");
    Out { code: out.status.code().unwrap_or(-1), stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

pub fn virsh_ok(d: &Daemon, args: &[&str]) -> String {
    let o = virsh(d, args);
    assert_eq!(o.code, 0, "virsh {args:?}: {}{}\n--- daemon log ---\n{}", o.stdout, o.stderr, d.log());
    o.stdout
}

pub fn virsh_fails(d: &Daemon, args: &[&str], needle: &str) {
    let o = virsh(d, args);
    assert_ne!(o.code, 0, "virsh {args:?} should fail: {}", o.stdout);
    assert!(o.stderr.contains(needle), "virsh {args:?}: wanted '{needle}' in: {}", o.stderr);
}

/// `virsh -c URI console DOMAIN` on a domain whose guest prints 'x' over
/// and over: virsh wants a terminal, which Debian's python3 gives it
/// (pty.fork); three 'x' must come through, then Ctrl-] must make virsh
/// leave with status 0. `prefix` runs it elsewhere (nsenter), `env` adds
/// to its environment.
pub fn virsh_console(prefix: &[String], uri: &str, domain: &str, env: &[(&str, &str)], d: &Daemon) {
    let script = r#"
import os, pty, sys, time, select
pid, fd = pty.fork()
if pid == 0:
    os.execvp("virsh", ["virsh", "-c", sys.argv[1], "console", sys.argv[2]])
out = b""
end = time.time() + 30
while time.time() < end and out.count(b"x") < 3:
    r, _, _ = select.select([fd], [], [], 0.5)
    if r:
        try:
            out += os.read(fd, 4096)
        except OSError:
            break
os.write(fd, b"\x1d")
status = None
end = time.time() + 10
while time.time() < end:
    p, st = os.waitpid(pid, os.WNOHANG)
    if p:
        status = os.waitstatus_to_exitcode(st)
        break
    r, _, _ = select.select([fd], [], [], 0.2)
    if r:
        try:
            os.read(fd, 4096)
        except OSError:
            pass
print("connected" if b"Connected to domain" in out else "no banner", out.count(b"x"), status)
"#;
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg("/usr/bin/python3");
            c
        }
        None => Command::new("/usr/bin/python3"),
    };
    cmd.arg("-c").arg(script).arg(uri).arg(domain).envs(env.iter().copied());
    let out = cmd.output().expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"connected"), "{text}{}\n{}", String::from_utf8_lossy(&out.stderr), d.log());
    assert!(words.get(1).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0) >= 3, "the guest's output came through: {text}\n--- daemon log ---\n{}", d.log());
    assert_eq!(words.get(2), Some(&"0"), "virsh left on Ctrl-] with status 0: {text}");
}

/// The value of `Key:` in virsh's two-column output.
pub fn field(text: &str, key: &str) -> String {
    text.lines().find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string())).unwrap_or_else(|| panic!("no '{key}' in:\n{text}"))
}

/// The least of libvirt's client (for benchmarks without virsh's own
/// cost): one call at a time, each expected to succeed.
pub struct Libvirt {
    s: UnixStream,
    serial: u32,
}

impl Libvirt {
    pub fn open(path: &std::path::Path) -> Self {
        let mut c = Self { s: UnixStream::connect(path).expect("libvirt socket"), serial: 0 };
        c.call(proc_::AUTH_LIST, Vec::new());
        let mut e = Encoder::new();
        e.opt_string(Some("qemu:///system")).u32(0);
        c.call(proc_::CONNECT_OPEN, e.into_bytes());
        c
    }

    pub fn call(&mut self, p: i32, payload: Vec<u8>) -> Vec<u8> {
        self.serial += 1;
        let header = Header { prog: REMOTE_PROGRAM, vers: REMOTE_VERSION, proc_: p, kind: MessageType::Call, serial: self.serial, status: MessageStatus::Ok };
        std::io::Write::write_all(&mut self.s, &Packet { header, payload }.encode()).unwrap();
        let reply = Packet::read_from(&mut self.s).unwrap();
        assert_eq!((reply.header.serial, reply.header.status), (self.serial, MessageStatus::Ok), "procedure {p}");
        reply.payload
    }
}

/// A process holding a network namespace of its own (a guest, the outside,
/// a remote host); the namespace goes with it.
pub struct Netns(Child);

impl Netns {
    pub fn new() -> Self {
        let c = Command::new("unshare").args(["-n", "sleep", "600"]).stdin(Stdio::null()).spawn().unwrap();
        // The namespace exists once unshare has exec'd sleep.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{}/comm", c.id())).unwrap_or_default().trim() != "sleep" {
            assert!(Instant::now() < deadline, "unshare did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        Self(c)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// The command prefix that runs a program inside this namespace.
    pub fn enter(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net=/proc/{}/ns/net", self.pid())]
    }

    /// Runs `cmd` inside this namespace: its success and output (stdout and stderr).
    pub fn sh(&self, cmd: &str) -> (bool, String) {
        let o = Command::new("nsenter").arg(format!("--net=/proc/{}/ns/net", self.pid())).args(["sh", "-c", cmd]).output().unwrap();
        (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a shell command, which must succeed.
pub fn sh_ok(cmd: &str) {
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(o.status.success(), "{cmd}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

/// A CA and certificates, as libvirt's PKI guide makes them: a CA
/// (CA:TRUE, keyCertSign, cRLSign), a server certificate for `server`
/// (an IP address: serverAuth, the address in subjectAltName), and client certificates:
/// `admin` (in the allow-list), `other` (outside it), `expired` and
/// `revoked` (both in it by name). Each client's files are a `pkipath`
/// directory; the server's directory has the CRL revoking `revoked`.
pub fn make_pki(dir: &Path, server: &str) -> PathBuf {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let d = pki.display();
    sh_ok(&format!(
        "cd {d} && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null && \
         openssl req -x509 -new -key ca.key -out cacert.pem -days 30 -subj '/C=GB/O=rvirt test/CN=rvirt test CA' \
           -addext 'basicConstraints=critical,CA:TRUE' -addext 'keyUsage=critical,keyCertSign,cRLSign' && \
         printf '[ca]\\ndefault_ca=d\\n[d]\\ndatabase={d}/index.txt\\ncrlnumber={d}/crlnumber\\ndefault_md=sha256\\ndefault_crl_days=30\\ncertificate={d}/cacert.pem\\nprivate_key={d}/ca.key\\n' > ca.cnf && \
         : > index.txt && echo 01 > crlnumber"
    ));
    let sign = |name: &str, cn: &str, ext: &str, days: i32| {
        sh_ok(&format!(
            "cd {d} && mkdir -p {name} && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {name}/key.pem 2>/dev/null && \
             openssl req -new -key {name}/key.pem -subj '/C=GB/O=rvirt test/CN={cn}' -out {name}/req.csr && \
             printf 'basicConstraints=critical,CA:FALSE\\nkeyUsage=critical,digitalSignature,keyEncipherment\\n{ext}' > {name}/ext && \
             openssl x509 -req -in {name}/req.csr -CA cacert.pem -CAkey ca.key -CAcreateserial -days {days} -out {name}/cert.pem -extfile {name}/ext 2>/dev/null && \
             cp cacert.pem {name}/cacert.pem"
        ));
    };
    sign("server", server, &format!("extendedKeyUsage=serverAuth\\nsubjectAltName=IP:{server},DNS:server.test\\n"), 30);
    for (name, days) in [("admin", 30), ("other", 30), ("expired", -1), ("revoked", 30)] {
        let cn = if name == "other" { "someone" } else { "admin" };
        sign(name, cn, "extendedKeyUsage=clientAuth\\n", days);
        sh_ok(&format!("cd {d}/{name} && mv cert.pem clientcert.pem && mv key.pem clientkey.pem"));
    }
    sh_ok(&format!(
        "cd {d} && mv server/cert.pem server/servercert.pem && mv server/key.pem server/serverkey.pem && \
         openssl ca -config ca.cnf -revoke revoked/clientcert.pem 2>/dev/null && openssl ca -config ca.cnf -gencrl -out server/cacrl.pem 2>/dev/null"
    ));
    pki
}
