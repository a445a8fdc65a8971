//! Storage pool benchmark (`cargo bench -p rvirtd --bench storage`): what
//! a volume operation costs through rvirtd and Debian's virsh, side by side
//! with the tool libvirt's own directory pools run for it (qemu-img) or a
//! plain copy, median of 7 alternating runs:
//! - one virsh round trip (`pool-info`): what every figure below includes
//!   and its reference does not (libvirtd's clients pay it too);
//! - `vol-create-as` of a 10 GiB qcow2 against `qemu-img create`;
//! - `vol-clone` of a 256 MiB qcow2 (half data) against `qemu-img convert
//!   -O qcow2 -t writeback` (flushed at the end, as rvirtd's copy is);
//! - `vol-upload`/`vol-download` of a 256 MiB file against `dd bs=256K
//!   conv=fsync` (the upload is synced before its end is confirmed);
//! - `vol-list --details` of a pool of 1,000 qcow2 volumes (no reference:
//!   one figure, per volume).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use rvirt_lab::stats::upper_median;
use support::{scratch, virsh_ok, Daemon};

const RUNS: usize = 7;

/// Milliseconds `f` takes.
fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1000.0
}

fn run(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn qemu_img(args: &[&str]) {
    run(Command::new("qemu-img").args(args));
}

fn report(what: &str, ours: Vec<f64>, reference: Vec<f64>, reference_name: &str) {
    let (a, b) = (upper_median(ours), upper_median(reference));
    println!("{what:<44} rvirtd+virsh {a:8.1} ms   {reference_name} {b:8.1} ms   ratio {:.2}x", b / a);
}

fn main() {
    let dir = scratch("bench-storage");
    let d = Daemon::start(&dir);
    let images = dir.join("images");
    let (p, path) = (images.to_str().unwrap().to_string(), |n: &str| images.join(n).to_str().unwrap().to_string());
    virsh_ok(&d, &["pool-define-as", "images", "dir", "--target", &p]);
    virsh_ok(&d, &["pool-start", "images", "--build"]);
    let remove = |n: &str| {
        let _ = std::fs::remove_file(images.join(n));
    };

    let trip: Vec<f64> = (0..RUNS).map(|_| timed(|| drop(virsh_ok(&d, &["pool-info", "images"])))).collect();
    println!("{:<44} rvirtd+virsh {:8.1} ms", "one virsh round trip (pool-info)", upper_median(trip));

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        ours.push(timed(|| drop(virsh_ok(&d, &["vol-create-as", "images", "c.qcow2", "10G", "--format", "qcow2"]))));
        remove("c.qcow2");
        theirs.push(timed(|| qemu_img(&["create", "-q", "-f", "qcow2", &path("q.qcow2"), "10G"])));
        remove("q.qcow2");
    }
    report("vol-create-as 10 GiB qcow2", ours, theirs, "qemu-img create");

    // A source half full of data, half of zeros, as a used disk is.
    let src = path("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &src, "256M"]);
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 0 128M", &src]));
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        ours.push(timed(|| drop(virsh_ok(&d, &["vol-clone", "--pool", "images", "src.qcow2", "copy.qcow2"]))));
        remove("copy.qcow2");
        theirs.push(timed(|| qemu_img(&["convert", "-O", "qcow2", "-t", "writeback", &src, &path("q.qcow2")])));
        remove("q.qcow2");
    }
    report("vol-clone 256 MiB qcow2 (128 MiB data)", ours, theirs, "qemu-img convert");

    let file = dir.join("data.bin");
    let data: Vec<u8> = (0..256u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    virsh_ok(&d, &["vol-create-as", "images", "up.raw", "0"]);
    let (f, out) = (file.to_str().unwrap().to_string(), dir.join("down.bin").to_str().unwrap().to_string());
    let (mut up, mut down, mut cp) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        up.push(timed(|| drop(virsh_ok(&d, &["vol-upload", "--pool", "images", "up.raw", &f]))));
        down.push(timed(|| drop(virsh_ok(&d, &["vol-download", "--pool", "images", "up.raw", &out]))));
        cp.push(timed(|| run(Command::new("dd").arg(format!("if={f}")).arg(format!("of={out}")).args(["bs=256K", "conv=fsync", "status=none"]))));
    }
    assert!(std::fs::read(&out).unwrap() == data);
    report("vol-upload 256 MiB", up, cp.clone(), "dd");
    report("vol-download 256 MiB", down, cp, "dd");

    for i in 0..1000 {
        qemu_img(&["create", "-q", "-f", "qcow2", &path(&format!("v{i:04}.qcow2")), "1G"]);
    }
    let list: Vec<f64> = (0..RUNS).map(|_| timed(|| drop(virsh_ok(&d, &["vol-list", "images", "--details"])))).collect();
    let ms = upper_median(list);
    let n = std::fs::read_dir(&images).map(|r| r.count()).unwrap_or(0);
    println!("{:<44} rvirtd+virsh {ms:8.1} ms   ({:.3} ms per volume)", format!("vol-list --details, {n} volumes"), ms / n as f64);
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
