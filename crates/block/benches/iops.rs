//! `cargo bench -p rvirt-block --bench iops`: 4 KiB read and write IOPS
//! through the library against `qemu-img bench`, side by side on the same
//! 1 GiB qcow2 image (metadata preallocated, so writes land in place); then
//! allocating writes into a fresh image with a flush every 32 requests (what
//! the write barriers cost), with lazy refcounts off (the default) and on.
//!
//! `qemu-img bench` has no random mode; both sides use its strided pattern
//! instead: each request 1 MiB + 4 KiB past the last, wrapping at the end,
//! so consecutive requests touch different clusters and L2 regions. Page
//! cache on both sides (qemu-img `-t writeback`; our buffered file).

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rvirt_block::qcow2::{CreateOptions, Preallocation, Qcow2Image};
use rvirt_block::BlockBackend;

const SIZE: u64 = 1 << 30;
const REQUESTS: u64 = 20_000;
const STEP: u64 = (1 << 20) + 4096;
const ROUNDS: usize = 5;

/// Runs `REQUESTS` 4 KiB requests with `threads` threads, each taking the next offset in the pattern.
fn ours(img: &Qcow2Image, write: bool, threads: usize) -> f64 {
    let next = AtomicU64::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0x5au8; 4096];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= REQUESTS {
                        break;
                    }
                    let off = (i * STEP) % (SIZE - 4096) / 4096 * 4096;
                    if write {
                        img.write_at(&buf, off).expect("write");
                    } else {
                        img.read_at(&mut buf, off).expect("read");
                    }
                }
            });
        }
    });
    t.elapsed().as_secs_f64()
}

fn qemu(path: &std::path::Path, write: bool) -> f64 {
    let mut args = vec!["bench", "-c", "20000", "-s", "4k", "-S", "1052672", "-t", "writeback", "-f", "qcow2"];
    if write {
        args.push("-w");
    }
    let out = Command::new("qemu-img").args(&args).arg(path).output().expect("qemu-img");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Run completed in ").and_then(|r| r.strip_suffix(" seconds.")).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("qemu-img bench: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// `REQUESTS` 4 KiB writes into a fresh image, one at a time, flushing every
/// `FLUSH_EVERY`: every write allocates, so every flush writes tables.
fn ours_allocating(path: &std::path::Path, lazy: bool) -> f64 {
    let _ = std::fs::remove_file(path);
    drop(Qcow2Image::create(path, SIZE, &CreateOptions { lazy_refcounts: lazy, ..Default::default() }).unwrap());
    let img = Qcow2Image::open(path, false).unwrap();
    let buf = vec![0x5au8; 4096];
    let t = Instant::now();
    for i in 0..REQUESTS {
        img.write_at(&buf, (i * STEP) % (SIZE - 4096) / 4096 * 4096).expect("write");
        if (i + 1) % FLUSH_EVERY == 0 {
            img.flush().expect("flush");
        }
    }
    img.flush().expect("flush");
    t.elapsed().as_secs_f64()
}

fn qemu_allocating(path: &std::path::Path, lazy: bool) -> f64 {
    let _ = std::fs::remove_file(path);
    let lazy = format!("lazy_refcounts={}", if lazy { "on" } else { "off" });
    let ok = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-o", &lazy]).arg(path).arg(SIZE.to_string()).status().expect("qemu-img");
    assert!(ok.success());
    let n = REQUESTS.to_string();
    let every = FLUSH_EVERY.to_string();
    let args = ["bench", "-w", "-c", &n, "-d", "1", "-s", "4k", "-S", "1052672", "-t", "writeback", "--flush-interval", &every, "-f", "qcow2"];
    let out = Command::new("qemu-img").args(args).arg(path).output().expect("qemu-img");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Run completed in ").and_then(|r| r.strip_suffix(" seconds.")).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("qemu-img bench: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

const FLUSH_EVERY: u64 = 32;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let dir = std::env::temp_dir().join(format!("rvirt-bench-iops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("iops.qcow2");
    let opts = CreateOptions { preallocation: Preallocation::Metadata, ..Default::default() };
    drop(Qcow2Image::create(&path, SIZE, &opts).unwrap());
    println!("4 KiB requests on a 1 GiB qcow2 (metadata preallocated), {REQUESTS} per run, stride {STEP} B, median of {ROUNDS}:");
    for write in [false, true] {
        let label = if write { "write" } else { "read" };
        let (mut one, mut four, mut q) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            {
                let img = Qcow2Image::open(&path, false).unwrap();
                one.push(ours(&img, write, 1));
                four.push(ours(&img, write, 4));
            }
            q.push(qemu(&path, write));
        }
        let iops = |t: f64| REQUESTS as f64 / t;
        let (o1, o4, qm) = (iops(median(one)), iops(median(four)), iops(median(q)));
        println!("  {label}: rvirt-block {o1:.0} IOPS (1 thread), {o4:.0} IOPS (4 threads); qemu-img bench {qm:.0} IOPS (64 in flight); ratio rvirt/qemu {:.2}", o1.max(o4) / qm);
    }
    println!("allocating 4 KiB writes into a fresh 1 GiB qcow2, one in flight, a flush every {FLUSH_EVERY}, median of {ROUNDS}:");
    let fresh = dir.join("fresh.qcow2");
    for lazy in [false, true] {
        let (mut o, mut q) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            o.push(ours_allocating(&fresh, lazy));
            q.push(qemu_allocating(&fresh, lazy));
        }
        let iops = |t: f64| REQUESTS as f64 / t;
        let (om, qm) = (iops(median(o)), iops(median(q)));
        println!("  lazy_refcounts={}: rvirt-block {om:.0} IOPS; qemu-img bench {qm:.0} IOPS; ratio rvirt/qemu {:.2}", if lazy { "on" } else { "off" }, om / qm);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
