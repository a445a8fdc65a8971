//! What confinement costs a VMM's start: a guest that powers off at its
//! first instruction, run through the whole VMM (open files, build the VM,
//! boot, exit) on this host's /dev/kvm, unconfined, with seccomp only, and
//! with seccomp and the jail (namespaces, empty root, own uid), interleaved
//! round by round. Prints the median wall time of each and the ratios.
//!
//! `cargo bench -p rvirt-vmm --bench jail` (root; `RVIRT_BENCH_ROUNDS=N`, default 30).

use std::process::{Command, Stdio};
use std::time::Instant;

use rvirt_lab::stats::upper_median;
use rvirt_lab::guests::{bzimage_with, power_off, print};

fn main() {
    let dir = std::env::temp_dir().join(format!("rvirt-bench-jail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("off.bzImage");
    let mut code = print(b"x");
    code.extend(power_off());
    std::fs::write(&kernel, bzimage_with(&code)).unwrap();
    let rounds: usize = std::env::var("RVIRT_BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let jail = dir.join("jail");
    let jail_s = jail.to_str().unwrap();
    let variants: [(&str, Vec<&str>); 3] = [
        ("unconfined", vec!["--seccomp", "off"]),
        ("seccomp", vec![]),
        ("seccomp+jail", vec!["--jail", jail_s, "--jail-user", "4242:4242"]),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (i, (name, extra)) in variants.iter().enumerate() {
            let t = Instant::now();
            let st = Command::new(env!("CARGO_BIN_EXE_rvirt-vmm"))
                .args(["--memory", "64M", "--serial", "null", "--kernel"])
                .arg(&kernel)
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "{name}: {st}");
            times[i].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let base = upper_median(times[0].clone());
    println!("VMM start to guest power-off, median of {rounds} rounds (interleaved):");
    for (i, (name, _)) in variants.iter().enumerate() {
        let m = upper_median(times[i].clone());
        println!("  {name:<14} {m:7.2} ms  {:.2}x", m / base);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
