//! rvirtd's libvirt protocol against its own (`cargo bench -p rvirtd --bench
//! libvirt`), side by side on one daemon:
//! - define of 1,000 domains, one call each, over each protocol's socket;
//! - `list --all` of those 1,000: Debian's `virsh` (which also asks each
//!   domain's state, a call per domain) against `rvirt`, and one protocol
//!   round trip each (`CONNECT_LIST_ALL_DOMAINS` against `list`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::Instant;

use rvirt_client::Connection;
use rvirt_domain::protocol::Request;
use rvirt_libvirt_rpc::remote::proc_;
use rvirt_libvirt_rpc::Encoder;
use rvirt_lab::stats::upper_median;
use support::{domain_xml, kernels, scratch, Daemon, Libvirt};

fn main() {
    let dir = scratch("lvbench");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    const N: usize = 1000;
    let xmls: Vec<String> = (0..N).map(|i| domain_xml(&format!("d{i:04}"), &k.idle, "")).collect();

    let mut own = Connection::open(&d.socket).unwrap();
    let t0 = Instant::now();
    for x in &xmls {
        assert!(own.call(&Request::Define { xml: x.clone() }).unwrap().ok);
    }
    let own_define = t0.elapsed().as_secs_f64() * 1000.0 / N as f64;
    for i in 0..N {
        assert!(own.call(&Request::Undefine { domain: format!("d{i:04}"), managed_save: false, snapshots_metadata: false }).unwrap().ok);
    }
    let mut lv = Libvirt::open(&d.libvirt_socket());
    let t0 = Instant::now();
    for x in &xmls {
        let mut e = Encoder::new();
        e.string(x);
        lv.call(proc_::DOMAIN_DEFINE_XML, e.into_bytes());
    }
    let lv_define = t0.elapsed().as_secs_f64() * 1000.0 / N as f64;
    println!("define, per domain, {N} domains (ms):");
    println!("  rvirtd's protocol {own_define:>8.3}   libvirt's {lv_define:>8.3}   ratio {:>5.2}x", lv_define / own_define);

    let uri = format!("qemu:///system?socket={}", d.libvirt_socket().display());
    let timed = |f: &mut dyn FnMut()| -> f64 {
        upper_median(
            (0..9)
                .map(|_| {
                    let t0 = Instant::now();
                    f();
                    t0.elapsed().as_secs_f64() * 1000.0
                })
                .collect(),
        )
    };
    let virsh = timed(&mut || {
        let out = Command::new("virsh").args(["-c", &uri, "list", "--all", "--name"]).stdin(Stdio::null()).output().expect("virsh");
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).count(), N);
    });
    let rvirt = timed(&mut || {
        assert_eq!(d.ok(&["list", "--all"]).lines().count(), N + 2);
    });
    let lv_list = timed(&mut || {
        let mut e = Encoder::new();
        e.i32(1).u32(0);
        let ret = lv.call(proc_::CONNECT_LIST_ALL_DOMAINS, e.into_bytes());
        assert_eq!(u32::from_be_bytes(ret[..4].try_into().unwrap()) as usize, N);
    });
    let own_list = timed(&mut || {
        assert_eq!(own.call(&Request::List { all: true }).unwrap().domains.unwrap().len(), N);
    });
    println!("list --all with {N} domains, median of 9 (ms):");
    println!("  virsh {virsh:>8.1}   rvirt {rvirt:>8.1}   ratio {:>5.2}x", virsh / rvirt);
    println!("  one round trip: libvirt's {lv_list:>7.2}   rvirtd's {own_list:>7.2}   ratio {:>5.2}x", lv_list / own_list);
}
