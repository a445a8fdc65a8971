//! Counts how many of `NVMS` (default 4) disk-loaded rvirt VMs in one L1 run
//! to the end, triple-fault or hang (killed after 5 minutes): the lab's
//! nested SVM misbehaved under some guest setups (docs/design.md, "Known lab
//! issues"). `VMM` overrides the VMM command line, e.g. to run QEMU instead.
//!
//! `NVMS=8 cargo run --release -p rvirt-lab --example fault_count`
use rvirt_lab::{GuestPrograms, L1Spec, Lab};

const GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
INSMOD
echo "@@CE=$(cat /sys/devices/system/clockevents/clockevent0/current_device)"
for m in seqread seqwrite; do echo "@@$(/lib/modules/diskio $m /dev/vda 1048576 8 | awk '{print "BLK-" toupper($1) "=" $3}')"; done
for m in randread randwrite; do echo "@@$(/lib/modules/diskio $m /dev/vda 4096 8 | awk '{print "BLK-" toupper($1) "=" $2}')"; done
poweroff -f
"#;

const L1: &str = r#"
CMD="console=ttyS0 panic=-1 loglevel=4"
dd if=/dev/urandom of=/tmp/disk.raw bs=1M count=256 2>/dev/null
for i in $(seq 1 NVMS); do
  timeout -s KILL 300 VMM </dev/null > /tmp/vm.log 2>&1 &
  pid=$!
  (while kill -0 $pid 2>/dev/null; do sleep 20; echo "[faults] vm $i running"; done) &
  wait $pid; rc=$?
  echo "@@VM$i-EXIT=$rc"
  grep '@@' /tmp/vm.log | sed "s/@@/@@VM$i-/"
  grep -E 'triple|crashed|stall' /tmp/vm.log | head -3
done
"#;

fn main() -> anyhow::Result<()> {
    let lab = Lab::get()?;
    let n: usize = std::env::var("NVMS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let vmm = std::env::var("VMM").unwrap_or_else(|_| "rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz --cpus 2 --memory 512M --cmdline \"$CMD\" --disk path=/tmp/disk.raw".into());
    let programs = GuestPrograms::build(&["benches/guest/diskio.c"])?;
    let initrd = lab.virtio_initramfs(GUEST, &["virtio_blk"], programs.paths())?;
    let microvm_bios = std::fs::canonicalize("/usr/share/qemu/bios-microvm.bin")?;
    let mut spec = L1Spec::new("fault-count", &L1.replace("NVMS", &n.to_string()).replace("VMM", &vmm))
        .file(&lab.kernel, "l2/vmlinuz")
        .file(&microvm_bios, "usr/share/qemu/bios-microvm.bin")
        .blob("l2/initrd.gz", initrd)
        .binary("/usr/bin/qemu-system-x86_64", "usr/bin/qemu-system-x86_64");
    spec.timeout = std::time::Duration::from_secs(60 + 300 * n as u64);
    spec.retry_l2_crash = false;
    let out = lab.run(&spec)?;
    for l in out.console.lines().filter(|l| l.contains("@@") || l.contains("triple") || l.contains("crash")) {
        println!("{l}");
    }
    println!("timed_out={} stalled={}", out.timed_out, out.stalled);
    Ok(())
}
