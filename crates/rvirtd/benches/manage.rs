//! rvirtd benchmark (`cargo bench -p rvirtd --bench manage`), on this host's
//! /dev/kvm with a hand-made guest that prints one line first thing:
//! - start latency: from running `rvirt start` to the guest's first serial
//!   byte (its first vCPU is running guest code), and to `rvirt start`
//!   returning; side by side with `rvirt-vmm` started directly, so the
//!   daemon's own cost is the difference;
//! - `list --all` with 10, 100 and 1,000 defined domains: the client command
//!   and one protocol round trip.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rvirt_client::Connection;
use rvirt_domain::protocol::Request;
use rvirt_lab::stats::upper_median;
use support::{bins, domain_xml, kernels, scratch, Daemon};

/// Waits until `path` has content; returns when it first did.
fn first_output(path: &Path, from: Instant) -> f64 {
    loop {
        if std::fs::metadata(path).map(|m| m.len() > 0).unwrap_or(false) {
            return from.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(from.elapsed() < Duration::from_secs(20), "no guest output in {}", path.display());
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn main() {
    let dir = scratch("bench");
    let d = Daemon::start(&dir);
    let k = kernels(&dir);
    let serial = dir.join("serial.log");
    let xml = domain_xml("b", &k.idle, &format!("  <devices><serial type='file'><source path='{}'/></serial><memballoon model='none'/></devices>", serial.display()));
    let f = d.xml_file("b", &xml);
    d.ok(&["define", f.to_str().unwrap()]);
    const RUNS: usize = 15;
    let (mut to_vcpu, mut to_return, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let _ = std::fs::remove_file(&serial);
        let t0 = Instant::now();
        let mut c = Command::new(&bins().rvirt).arg("--connect").arg(&d.socket).args(["start", "b"]).stdout(Stdio::null()).spawn().unwrap();
        to_vcpu.push(first_output(&serial, t0));
        assert!(c.wait().unwrap().success());
        to_return.push(t0.elapsed().as_secs_f64() * 1000.0);
        d.ok(&["destroy", "b"]);

        let _ = std::fs::remove_file(&serial);
        let t0 = Instant::now();
        let mut vmm = Command::new(&bins().vmm)
            .arg("--kernel")
            .arg(&k.idle)
            .args(["--memory", "64M", "--serial"])
            .arg(format!("file={}", serial.display()))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        direct.push(first_output(&serial, t0));
        let _ = vmm.kill();
        let _ = vmm.wait();
    }
    println!("start latency on host KVM, median of {RUNS} (ms):");
    println!("  rvirt start -> first guest output    {:>8.1}", upper_median(to_vcpu.clone()));
    println!("  rvirt start -> command returns       {:>8.1}", upper_median(to_return));
    println!("  rvirt-vmm alone -> first guest output {:>7.1}", upper_median(direct.clone()));
    println!("  daemon overhead (ratio)              {:>8.2}x", upper_median(to_vcpu) / upper_median(direct));

    println!("list --all with N defined domains (ms):");
    println!("  {:>6} {:>14} {:>16}", "N", "rvirt list", "protocol list");
    let mut conn = Connection::open(&d.socket).unwrap();
    let mut defined = 1;
    for n in [10usize, 100, 1000] {
        while defined < n {
            let name = format!("d{defined:04}");
            assert!(conn.call(&Request::Define { xml: domain_xml(&name, &k.idle, "") }).unwrap().ok);
            defined += 1;
        }
        let cli: Vec<f64> = (0..9)
            .map(|_| {
                let t0 = Instant::now();
                let out = d.ok(&["list", "--all"]);
                assert_eq!(out.lines().count(), n + 2);
                t0.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        let proto: Vec<f64> = (0..9)
            .map(|_| {
                let t0 = Instant::now();
                let r = conn.call(&Request::List { all: true }).unwrap();
                assert_eq!(r.domains.unwrap().len(), n);
                t0.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        println!("  {n:>6} {:>14.2} {:>16.2}", upper_median(cli), upper_median(proto));
    }
}
