//! Virtio I/O benchmark, rvirt-vmm against QEMU's virtio-pci devices, side by
//! side in one lab run (`cargo bench -p rvirt-lab --bench virtio`):
//! - virtio-blk: sequential 1 MiB reads and writes, random 4 KiB reads and
//!   writes, all O_DIRECT in the guest (`benches/guest/diskio.c`), on a raw
//!   image in L1's page cache (both VMMs use the page cache: QEMU's default
//!   `cache=writeback`, rvirt's default);
//! - virtio-net: TCP throughput guest->host and host->guest over a tap
//!   (QEMU with `vhost=off`: both VMMs move packets in user space).
//!
//! Same kernel, initramfs, 2 vCPUs, 512 MiB; QEMU runs `-M microvm,pcie=on`.
//! Disk and network are measured in separate VMs.
//! Figures inside the lab are TCG figures: only the ratio between the two
//! VMMs in the same run means anything.

use std::process::Command;

use rvirt_lab::{insmod_lines, l2_initramfs, L1Spec, Lab};

const GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
INSMOD
up() { cut -d' ' -f1 /proc/uptime; }
if [ -e /sys/class/net/eth0 ]; then
  ip link set lo up
  ip addr add 10.0.2.15/24 dev eth0
  ip link set eth0 up
  for i in $(seq 1 60); do ping -c 1 -W 1 10.0.2.1 >/dev/null 2>&1 && break; done
  t0=$(up); dd if=/dev/zero bs=64k count=1024 2>/dev/null | nc 10.0.2.1 5000; t1=$(up)
  echo "@@NET-TX=$(echo "$t0 $t1" | awk '{printf "%.1f", 64 / ($2 - $1)}')"
  t0=$(up); sleep 120 | nc 10.0.2.1 5001 > /dev/null; t1=$(up)
  echo "@@NET-RX=$(echo "$t0 $t1" | awk '{printf "%.1f", 64 / ($2 - $1)}')"
fi
if [ -e /dev/vda ]; then
  for m in seqread seqwrite; do echo "@@$(/diskio $m /dev/vda 1048576 8 | awk '{print "BLK-" toupper($1) "=" $3}')"; done
  for m in randread randwrite; do echo "@@$(/diskio $m /dev/vda 4096 8 | awk '{print "BLK-" toupper($1) "=" $2}')"; done
fi
poweroff -f
"#;

const L1: &str = r#"
insmod /lib/modules/tun.ko
truncate -s 256M /tmp/disk.raw
dd if=/dev/urandom of=/tmp/disk.raw bs=1M count=256 conv=notrunc 2>/dev/null
CMD="console=ttyS0 panic=-1 loglevel=4"
# bench NAME KIND COMMAND...: runs one VM; KIND net sets up the tap and the
# TCP peers in L1. Disk and network run in separate VMs (see docs/BENCHMARKS.md:
# rvirt's L2 triple-faults with both under load).
bench() {
  name=$1; kind=$2; shift 2
  "$@" </dev/null > /tmp/$name-$kind.log 2>&1 &
  pid=$!
  # Keep the console busy so the lab's stall detector knows L1 is alive.
  (while kill -0 $pid 2>/dev/null; do sleep 20; echo "[bench] $name $kind running"; done) &
  if [ $kind = net ]; then
    for i in $(seq 1 300); do [ -e /sys/class/net/tap0 ] && break; sleep 0.2; done
    ip addr add 10.0.2.1/24 dev tap0; ip link set tap0 up
    sleep 600 | nc -l -p 5000 > /dev/null &
    dd if=/dev/zero bs=64k count=1024 2>/dev/null | nc -l -p 5001 &
  fi
  wait $pid
  rc=$?
  echo "@@$name-$kind-EXIT=$rc"
  grep '@@' /tmp/$name-$kind.log | sed "s/@@/@@$name-/"
  [ $rc = 0 ] || tail -40 /tmp/$name-$kind.log
  [ $kind = net ] && kill %3 %4 2>/dev/null
}
RVIRT="rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz --cpus 2 --memory 512M --cmdline"
QEMU="qemu-system-x86_64 -M microvm,pcie=on,accel=kvm -cpu host -bios /usr/share/qemu/bios-microvm.bin -smp 2 -m 512M -no-reboot -nographic -kernel /l2/vmlinuz -initrd /l2/initrd.gz -append"
bench RVIRT disk $RVIRT "$CMD" --disk path=/tmp/disk.raw
bench QEMU disk $QEMU "$CMD" -drive file=/tmp/disk.raw,format=raw,if=none,id=d0 -device virtio-blk-pci,drive=d0
bench RVIRT net $RVIRT "$CMD" --net tap=tap0
bench QEMU net $QEMU "$CMD" -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off -device virtio-net-pci,netdev=n0,romfile=
"#;

fn main() -> anyhow::Result<()> {
    let lab = Lab::get()?;
    let dir = std::env::temp_dir().join(format!("rvirt-bench-virtio-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let diskio = dir.join("diskio");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/guest/diskio.c");
    let st = Command::new("gcc").args(["-O2", "-static", "-o"]).arg(&diskio).arg(src).status()?;
    anyhow::ensure!(st.success(), "compiling diskio.c failed");
    let modules = lab.virtio_modules(&["virtio_blk", "virtio_net"]);
    let guest = GUEST.replace("INSMOD\n", &insmod_lines(&modules));
    let mut initrd_mods = modules.clone();
    initrd_mods.push(diskio.clone());
    let initrd = l2_initramfs(&guest.replace("/diskio", "/lib/modules/diskio"), &initrd_mods)?;
    let mut spec = L1Spec::new("bench-virtio", L1)
        .file(&lab.kernel, "l2/vmlinuz")
        .file(lab.module_in_tree("drivers/net/tun.ko"), "lib/modules/tun.ko")
        .file(std::fs::canonicalize("/usr/share/qemu/bios-microvm.bin")?, "usr/share/qemu/bios-microvm.bin")
        .blob("l2/initrd.gz", initrd)
        .binary("/usr/bin/qemu-system-x86_64", "usr/bin/qemu-system-x86_64");
    spec.timeout = std::time::Duration::from_secs(1800);
    let out = lab.run(&spec)?;
    out.check_l1()?;
    let v = out.values();
    // A VMM that failed mid-run leaves some figures missing: print what there is.
    let get = |k: &str| -> f64 { v.get(k).and_then(|s| s.parse().ok()).unwrap_or(f64::NAN) };
    for run in ["RVIRT-disk", "QEMU-disk", "RVIRT-net", "QEMU-net"] {
        if v.get(&format!("{run}-EXIT")).map(String::as_str) != Some("0") {
            println!("note: {run} did not finish cleanly (exit {:?}); see target/lab-logs/bench-virtio.log", v.get(&format!("{run}-EXIT")));
        }
    }
    println!("virtio in the lab, 2 vCPUs, 512 MiB (L2 figures under TCG; compare ratios only):");
    println!("  {:<28} {:>10} {:>10} {:>8}", "", "rvirt", "qemu", "ratio");
    for (key, what) in [
        ("BLK-SEQREAD", "blk seq read 1M (MiB/s)"),
        ("BLK-SEQWRITE", "blk seq write 1M (MiB/s)"),
        ("BLK-RANDREAD", "blk rand read 4K (IOPS)"),
        ("BLK-RANDWRITE", "blk rand write 4K (IOPS)"),
        ("NET-TX", "net guest->host (MiB/s)"),
        ("NET-RX", "net host->guest (MiB/s)"),
    ] {
        let (r, q) = (get(&format!("RVIRT-{key}")), get(&format!("QEMU-{key}")));
        println!("  {what:<28} {r:>10.1} {q:>10.1} {:>7.2}x", r / q);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
