//! rvirtd against real libvirtd (`cargo bench -p rvirtd --bench remote`,
//! root; Debian's `libvirt-daemon` and `libvirt-daemon-driver-qemu`, not
//! libvirt-daemon-system). Both daemons run side by side in a network
//! namespace of the benchmark's own, libvirtd with its configuration,
//! sockets and state in a scratch directory (a private mount namespace
//! binds it over /etc/libvirt, /var/lib/libvirt, … and gives it the
//! `libvirt-qemu` user its QEMU driver insists on). Domains are defined,
//! never started. For each daemon, over its local socket and over TLS
//! (127.0.0.1, the same certificates):
//! - Debian's virsh defining 1,000 domains (one virsh, 1,000 `define`s);
//! - `virsh list --all` of those 1,000;
//! - python-libvirt opening a connection, `listAllDomains()` and `info()`
//!   on each domain.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rvirt_lab::stats::upper_median;
use support::{domain_xml, kernels, make_pki, scratch, Daemon, Netns};

const N: usize = 1000;
const ROUNDS: usize = 5;
const ALLOWED: &str = "C=GB,O=rvirt test,CN=admin";
const LIBVIRTD: &str = "/usr/sbin/libvirtd";

/// libvirtd with everything of its own in `dir`, inside `ns`.
struct Libvirtd {
    child: Child,
    sock: PathBuf,
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_libvirtd(dir: &Path, ns: &Netns, pki: &Path) -> Libvirtd {
    let t = dir.join("libvirtd");
    for sub in ["etc", "lib", "run", "cache", "log", "sock"] {
        std::fs::create_dir_all(t.join(sub)).unwrap();
    }
    let srv = pki.join("server");
    std::fs::write(
        t.join("etc/libvirtd.conf"),
        format!(
            "unix_sock_dir = \"{sock}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nlisten_tls = 1\nlisten_tcp = 0\nlisten_addr = \"127.0.0.1\"\n\
             tls_port = \"16515\"\nauth_tls = \"none\"\nkey_file = \"{s}/serverkey.pem\"\ncert_file = \"{s}/servercert.pem\"\nca_file = \"{s}/cacert.pem\"\n\
             crl_file = \"{s}/cacrl.pem\"\ntls_allowed_dn_list = [\"{ALLOWED}\"]\nmax_clients = 5000\n",
            sock = t.join("sock").display(),
            s = srv.display()
        ),
    )
    .unwrap();
    std::fs::write(t.join("etc/qemu.conf"), "user = \"root\"\ngroup = \"root\"\n").unwrap();
    // The QEMU driver looks its default user up before reading qemu.conf.
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap() + "libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n";
    let group = std::fs::read_to_string("/etc/group").unwrap() + "libvirt-qemu:x:64055:\n";
    std::fs::write(t.join("passwd"), passwd).unwrap();
    std::fs::write(t.join("group"), group).unwrap();
    let td = t.display();
    let script = format!(
        "mount --bind {td}/passwd /etc/passwd && mount --bind {td}/group /etc/group && \
         for d in etc:/etc/libvirt lib:/var/lib/libvirt run:/run/libvirt cache:/var/cache/libvirt log:/var/log/libvirt; do \
           mkdir -p ${{d#*:}} && mount --bind {td}/${{d%%:*}} ${{d#*:}} || exit 1; done; \
         exec {LIBVIRTD} --listen -f {td}/etc/libvirtd.conf"
    );
    let log = std::fs::File::create(t.join("libvirtd.log")).unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", ns.pid()))
        .args(["unshare", "-m", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let l = Libvirtd { child, sock: t.join("sock/libvirt-sock") };
    // The first call waits for its probe of QEMU's capabilities.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = l.sock.exists() && virsh(ns, &format!("qemu:///system?socket={}", l.sock.display()), &["version"]).0;
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "libvirtd did not come up:\n{}", std::fs::read_to_string(t.join("libvirtd.log")).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(200));
    }
    l
}

/// Runs virsh in `ns`: success and stdout.
fn virsh(ns: &Netns, uri: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new("nsenter").arg(format!("--net=/proc/{}/ns/net", ns.pid())).args(["virsh", "-q", "-c", uri]).args(args).output().unwrap();
    if !o.status.success() {
        eprintln!("virsh {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned())
}

/// One virsh running `command` for every name; its wall time.
fn batch(ns: &Netns, uri: &str, items: &[String], command: &str) -> Duration {
    let line = items.iter().map(|i| format!("{command} {i}")).collect::<Vec<_>>().join(" ; ");
    let t = Instant::now();
    let (ok, _) = virsh(ns, uri, &[&line]);
    let took = t.elapsed();
    assert!(ok, "virsh {command} batch on {uri}");
    took
}

const PYTHON: &str = r#"
import sys, time, libvirt
uri, rounds, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times = []
for _ in range(rounds):
    t = time.perf_counter()
    c = libvirt.open(uri)
    doms = c.listAllDomains(0)
    for d in doms:
        d.info()
    c.close()
    times.append(time.perf_counter() - t)
    assert len(doms) == want, len(doms)
print(" ".join(str(x) for x in times))
"#;

/// Measures one daemon over one URI: (define per domain, list --all, python loop), in ms.
fn measure(ns: &Netns, uri: &str, files: &[String], names: &[String]) -> [f64; 3] {
    let define = batch(ns, uri, files, "define").as_secs_f64() * 1000.0 / N as f64;
    let mut lists = Vec::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let (ok, out) = virsh(ns, uri, &["list", "--all"]);
        lists.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(ok && out.lines().filter(|l| l.contains("shut off")).count() == N, "list --all on {uri}");
    }
    let o = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", ns.pid()))
        .args(["/usr/bin/python3", "-c", PYTHON, uri, &ROUNDS.to_string(), &N.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "python-libvirt on {uri}: {}", String::from_utf8_lossy(&o.stderr));
    let py: Vec<f64> = String::from_utf8_lossy(&o.stdout).split_whitespace().map(|x| x.parse::<f64>().unwrap() * 1000.0).collect();
    // Leave the daemon empty for the next transport.
    batch(ns, uri, names, "undefine");
    [define, upper_median(lists), upper_median(py)]
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new(LIBVIRTD).exists() {
        eprintln!("this benchmark runs as root beside Debian's libvirtd: apt-get install --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu");
        std::process::exit(2);
    }
    let dir = scratch("rbench");
    let ns = Netns::new();
    let (up, out) = ns.sh("ip link set lo up");
    assert!(up, "{out}");
    let pki = make_pki(&dir, "127.0.0.1");
    let args = vec!["--listen-tls".to_string(), "127.0.0.1:16514".into(), "--pki-dir".into(), pki.join("server").display().to_string(), "--tls-allowed-dn".into(), ALLOWED.into()];
    let d = Daemon::start_with(&dir, ns.enter(), args);
    let lv = start_libvirtd(&dir, &ns, &pki);
    let k = kernels(&dir);
    let xml_dir = dir.join("xml");
    std::fs::create_dir_all(&xml_dir).unwrap();
    let names: Vec<String> = (0..N).map(|i| format!("d{i:04}")).collect();
    let files: Vec<String> = names
        .iter()
        .map(|n| {
            let f = xml_dir.join(format!("{n}.xml"));
            std::fs::write(&f, domain_xml(n, &k.idle, "")).unwrap();
            f.display().to_string()
        })
        .collect();
    let client = pki.join("admin").display().to_string();
    let runs = [
        ("local socket", format!("qemu:///system?socket={}", lv.sock.display()), format!("qemu:///system?socket={}", d.libvirt_socket().display())),
        ("TLS", format!("qemu+tls://127.0.0.1:16515/system?pkipath={client}"), format!("qemu+tls://127.0.0.1:16514/system?pkipath={client}")),
    ];
    println!("| measure ({N} defined domains) | transport | libvirtd 9.0 | rvirtd | libvirtd / rvirtd |");
    println!("|---|---|---|---|---|");
    for (transport, lv_uri, rv_uri) in &runs {
        let a = measure(&ns, lv_uri, &files, &names);
        let b = measure(&ns, rv_uri, &files, &names);
        for (i, what) in ["virsh define, per domain", "virsh list --all", "python listAllDomains + info() each"].iter().enumerate() {
            println!("| {what} | {transport} | {:.2} ms | {:.2} ms | {:.1}x |", a[i], b[i], a[i] / b[i]);
        }
    }
    drop(lv);
    drop(d);
}
