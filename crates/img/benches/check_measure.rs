//! `cargo bench -p rvirt-img --bench check_measure`: rvirt-img check and
//! measure against qemu-img's on a 100 GiB sparse qcow2 image holding one
//! compressed 64 KiB cluster in every MiB (102,400 clusters, 200 L2 tables,
//! a file of ~25 MiB), side by side. Prints the median wall time of each
//! tool and the ratio.


use rvirt_block::qcow2::{CreateOptions, Qcow2Image};

const SIZE: u64 = 100 << 30;
const ROUNDS: usize = 5;

#[path = "shared/timing.rs"]
mod timing;
use timing::{median, time};

fn main() {
    let dir = std::env::temp_dir().join(format!("rvirt-bench-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("big.qcow2");
    {
        let q = Qcow2Image::create(&img, SIZE, &CreateOptions::default()).unwrap();
        q.set_cache_unsafe(true);
        // Compressed, so 102,400 clusters fit in a small file.
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        for mib in 0..SIZE >> 20 {
            q.write_compressed(mib << 20, &data).unwrap();
        }
        q.close().unwrap();
    }
    let ours = env!("CARGO_BIN_EXE_rvirt-img");
    let path = img.to_str().unwrap();
    println!("100 GiB qcow2, one compressed 64 KiB cluster per MiB (102,400 clusters), median of {ROUNDS}:");
    for (label, args) in [("check", vec!["check", path]), ("measure -O qcow2", vec!["measure", "-O", "qcow2", path])] {
        let (mut r, mut q) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            r.push(time(ours, &args));
            q.push(time("qemu-img", &args));
        }
        let (r, q) = (median(r), median(q));
        println!("  {label}: rvirt-img {r:.3} s, qemu-img {q:.3} s, ratio rvirt/qemu {:.2}", r / q);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
