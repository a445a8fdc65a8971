//! A virtual network's start-up (`cargo bench -p rvirtd --bench network`,
//! root; in a network namespace of its own): from `start` (bridge,
//! nftables, dnsmasq) to a stand-in guest's first lease (a veth on the
//! bridge asking with busybox's udhcpc, which waits out the bridge's
//! spanning-tree forward delay as a guest's card does). libvirt's default
//! network settings (NAT, STP on, delay 0), and STP off for comparison.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use rvirt_domain::NetworkDef;
use rvirt_lab::stats::upper_median;
use rvirtd::network::runtime::{self, NetworkFiles};

fn sh(cmd: &str) -> String {
    let o = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(o.status.success(), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// (ms to start the network, ms from start to the stand-in's lease).
fn round(dir: &std::path::Path, stp: &str, n: u32) -> (f64, f64) {
    let def = NetworkDef::parse(&format!(
        "<network><name>bench</name><forward/><bridge name='rvbench0' stp='{stp}'/><ip address='10.92.0.1' prefix='24'><dhcp><range start='10.92.0.10' end='10.92.0.200'/></dhcp></ip></network>"
    ))
    .unwrap();
    let files = NetworkFiles::new(dir, "bench");
    let mut guest = Command::new("unshare").args(["-n", "sleep", "60"]).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let t0 = Instant::now();
    runtime::start(&def, "rvbench0", &files).unwrap();
    let started = t0.elapsed().as_secs_f64() * 1000.0;
    sh(&format!("ip link add bv{n} type veth peer name bg{n} && ip link set bg{n} netns {} && ip link set bv{n} master rvbench0 up", guest.id()));
    let script = dir.join("udhcpc.sh");
    let out = sh(&format!(
        "nsenter --net=/proc/{}/ns/net sh -c 'ip link set bg{n} up && busybox udhcpc -i bg{n} -q -n -t 30 -T 1 -s {}'",
        guest.id(),
        script.display()
    ));
    let leased = t0.elapsed().as_secs_f64() * 1000.0;
    assert!(out.contains("LEASE"), "no lease: {out}");
    runtime::stop(&def, "rvbench0", &files).unwrap();
    let _ = guest.kill();
    let _ = guest.wait();
    (started, leased)
}

fn main() {
    let dir = PathBuf::from(format!("/tmp/rvnet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("udhcpc.sh"), "#!/bin/sh\n[ \"$1\" = bound ] && echo LEASE $ip\nexit 0\n").unwrap();
    sh(&format!("chmod +x {}", dir.join("udhcpc.sh").display()));
    let d = dir.clone();
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "a network namespace (root)");
        sh("ip link set lo up");
        const ROUNDS: u32 = 5;
        println!("network start and first lease, median of {ROUNDS} (ms):");
        for stp in ["on", "off"] {
            let (s, l): (Vec<f64>, Vec<f64>) = (0..ROUNDS).map(|n| round(&d, stp, n)).unzip();
            println!("  stp={stp:<3}  start {:>7.1}   start -> lease {:>7.1}", upper_median(s), upper_median(l));
        }
    })
    .join()
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
