//! `cargo bench -p rvirt-img --bench convert`: rvirt-img convert against
//! qemu-img convert, side by side on the same 1 GiB image holding data,
//! written zeros and unallocated space; raw -> qcow2, qcow2 -> raw and
//! compressed (-c), qemu-img with -m 8 -W. Prints the median wall time of
//! each tool and the ratio.

use std::path::Path;
use std::process::Command;

const SIZE: u64 = 1 << 30;
const ROUNDS: usize = 7;

fn make_source(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    // Per 64 MiB: 24 MiB of varied data, 16 MiB of written zeros, 24 MiB hole.
    let mut data = vec![0u8; 1 << 20];
    let mut x = 0x1234_5678u32;
    for stripe in 0..SIZE / (64 << 20) {
        let base = stripe * (64 << 20);
        for mib in 0..24u64 {
            for b in data.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = (x >> 24) as u8 & 0x0f; // compressible, never all-zero
            }
            f.write_all_at(&data, base + mib * (1 << 20)).unwrap();
        }
        let zeros = vec![0u8; 16 << 20];
        f.write_all_at(&zeros, base + (24 << 20)).unwrap();
    }
    f.sync_all().unwrap();
}

#[path = "shared/timing.rs"]
mod timing;
use timing::{median, time};

fn main() {
    let dir = std::env::temp_dir().join(format!("rvirt-bench-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("src.raw");
    make_source(&src);
    let ours = env!("CARGO_BIN_EXE_rvirt-img");
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let qsrc = p("src.qcow2");
    assert!(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2", src.to_str().unwrap(), &qsrc]).status().unwrap().success());
    println!("convert of a 1 GiB image (384 MiB data, 256 MiB written zeros, 384 MiB hole); qemu-img with -m 8 -W (its fastest), median of {ROUNDS}:");
    let cases: [(&str, String, String, &str, &str, &[&str], usize); 3] = [
        ("raw -> qcow2", src.to_str().unwrap().to_string(), p("o.qcow2"), "raw", "qcow2", &[], ROUNDS),
        ("qcow2 -> raw", qsrc.clone(), p("o.raw"), "qcow2", "raw", &[], ROUNDS),
        ("raw -> qcow2 -c", src.to_str().unwrap().to_string(), p("c.qcow2"), "raw", "qcow2", &["-c"], 3),
    ];
    for (label, from, to, sfmt, dfmt, extra, rounds) in cases {
        let (mut r, mut q) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let mut args = vec!["convert", "-f", sfmt, "-O", dfmt];
            args.extend_from_slice(extra);
            args.extend([from.as_str(), to.as_str()]);
            let _ = std::fs::remove_file(&to);
            r.push(time(ours, &args));
            let _ = std::fs::remove_file(&to);
            let mut qargs = vec!["convert", "-m", "8", "-W", "-f", sfmt, "-O", dfmt];
            qargs.extend_from_slice(extra);
            qargs.extend([from.as_str(), to.as_str()]);
            q.push(time("qemu-img", &qargs));
        }
        let (r, q) = (median(r), median(q));
        println!("  {label}: rvirt-img {r:.3} s, qemu-img {q:.3} s, ratio rvirt/qemu {:.2} (speed {:.2}x)", r / q, q / r);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
