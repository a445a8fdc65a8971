//! The everyday commands on many running domains (`cargo bench -p rvirtd
//! --bench everyday`), hand-made guests on this host's /dev/kvm:
//! - `domstats` of 100 running idle domains (their vCPUs halted, as idle
//!   guests' are), each with a balloon: one libvirt-protocol call
//!   (`CONNECT_GET_ALL_DOMAIN_STATS`, every group), Debian's `virsh domstats`
//!   (a process and its connection included), and per domain;
//! - `dommemstat` of one domain whose balloon driver has the statistics
//!   queue (a fresh set of the driver's figures; that driver polls, so it
//!   keeps one host CPU busy);
//! - `setmem` from 512 to 256 MiB until the balloon reports the new size
//!   (the driver acknowledges at once: this is rvirt's own path, daemon,
//!   VMM and device; a Linux guest adds its own time to give pages up,
//!   measured in the lab: docs/BENCHMARKS.md).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rvirt_client::Connection;
use rvirt_domain::protocol::Request;
use rvirt_lab::guests::{bzimage_with, virtio_balloon_stats_driver};
use rvirt_lab::stats::upper_median;
use rvirt_libvirt_rpc::remote::proc_;
use rvirt_libvirt_rpc::Encoder;
use support::{domain_xml, kernels, scratch, Daemon, Libvirt};

/// Running domains for `domstats`.
const N: usize = 100;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn main() {
    let dir = scratch("everyday-bench");
    let d = Daemon::start(&dir);
    let kernel = dir.join("stats.bzImage");
    std::fs::write(&kernel, bzimage_with(&virtio_balloon_stats_driver())).unwrap();
    let k = kernels(&dir);
    let mut own = Connection::open(&d.socket).unwrap();
    for i in 0..N {
        let xml = domain_xml(&format!("d{i:03}"), &k.idle, "<devices><memballoon model='virtio'/></devices>");
        assert!(own.call(&Request::Define { xml }).unwrap().ok);
        let r = own.call(&Request::Start { domain: format!("d{i:03}") }).unwrap();
        assert!(r.ok, "{r:?}\n{}", d.log());
    }

    let mut lv = Libvirt::open(&d.libvirt_socket());
    let all_stats = |lv: &mut Libvirt| {
        let mut e = Encoder::new();
        // No domains named: all of them; no groups: every group; flag: active ones.
        e.u32(0).u32(0).u32(1);
        let ret = lv.call(proc_::CONNECT_GET_ALL_DOMAIN_STATS, e.into_bytes());
        assert_eq!(u32::from_be_bytes(ret[..4].try_into().unwrap()) as usize, N);
    };
    let one_call = upper_median(
        (0..9)
            .map(|_| {
                let t = Instant::now();
                all_stats(&mut lv);
                ms(t)
            })
            .collect(),
    );
    let uri = format!("qemu:///system?socket={}", d.libvirt_socket().display());
    let virsh = upper_median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                let out = Command::new("virsh").args(["-c", &uri, "domstats", "--list-active"]).stdin(Stdio::null()).output().expect("virsh");
                assert_eq!(String::from_utf8_lossy(&out.stdout).matches("Domain: '").count(), N);
                ms(t)
            })
            .collect(),
    );
    println!("domstats of {N} running domains, every group, upper median (ms):");
    println!("  one libvirt-protocol call {one_call:>8.1}   per domain {:>6.2}", one_call / N as f64);
    println!("  virsh domstats            {virsh:>8.1}");

    // One domain with the statistics driver, 512 MiB, for dommemstat and setmem.
    let big = domain_xml("big", &kernel, "<devices><memballoon model='virtio'/></devices>").replace("<memory unit='MiB'>64</memory>", "<memory unit='MiB'>512</memory>");
    assert!(own.call(&Request::Define { xml: big }).unwrap().ok);
    assert!(own.call(&Request::Start { domain: "big".into() }).unwrap().ok);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !own.call(&Request::MemStat { domain: "big".into() }).unwrap().memory_stats.is_some_and(|m| m.iter().any(|(k, _)| k == "unused")) {
        assert!(Instant::now() < deadline, "the driver posted no figures");
    }
    let memstat = upper_median(
        (0..21)
            .map(|_| {
                let t = Instant::now();
                let r = own.call(&Request::MemStat { domain: "big".into() }).unwrap();
                assert!(r.ok && r.memory_stats.is_some_and(|m| m.iter().any(|(k, _)| k == "unused")));
                ms(t)
            })
            .collect(),
    );
    println!("dommemstat of one domain, fresh figures from its driver, upper median (ms): {memstat:.2}");

    // setmem 512 -> 256 MiB until the balloon's size says so, and back.
    let mut setmem = |kib: u64| -> f64 {
        let t = Instant::now();
        let r = own.call(&Request::SetMemory { domain: "big".into(), kib, live: true, config: false }).unwrap();
        assert!(r.ok, "{r:?}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = own.call(&Request::DomInfo { domain: "big".into() }).unwrap().info.unwrap();
            if info.used_memory_kib == kib {
                return ms(t);
            }
            assert!(Instant::now() < deadline, "the balloon did not reach {kib} KiB");
        }
    };
    let times: Vec<f64> = (0..9)
        .map(|_| {
            let down = setmem(256 << 10);
            setmem(512 << 10);
            down
        })
        .collect();
    println!("setmem 512 -> 256 MiB until the balloon reports it, upper median (ms): {:.2}", upper_median(times));
    for i in 0..N {
        let _ = own.call(&Request::Destroy { domain: format!("d{i:03}") });
    }
    let _ = own.call(&Request::Destroy { domain: "big".into() });
}
