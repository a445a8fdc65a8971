//! Virtio I/O benchmark, rvirt-vmm against QEMU's virtio-pci devices, side by
//! side in one lab run (`cargo bench -p rvirt-lab --bench virtio`):
//! - virtio-blk: sequential 1 MiB reads and writes, random 4 KiB reads and
//!   writes, all O_DIRECT in the guest (`benches/guest/diskio.c`), on a raw
//!   image in L1's page cache (both VMMs use the page cache: QEMU's default
//!   `cache=writeback`, rvirt's default);
//! - virtio-net: TCP throughput guest->host and host->guest over a tap
//!   (QEMU with `vhost=off`: both VMMs move packets in user space), by
//!   `benches/guest/tcpio.c` at both ends in 64 KiB writes, and guest->host
//!   once more in 1 KiB writes (many small packets).
//!
//! Same kernel, initramfs, 2 vCPUs, 512 MiB; QEMU runs `-M microvm,pcie=on`.
//! Disk and network are measured in separate VMs, each VM in an L1 of its
//! own (an L1 that stalls, as QEMU's network VM sometimes makes it do, then
//! costs one figure, not the run), in `RVIRT_BENCH_ROUNDS` (default 3)
//! rounds that alternate which VMM goes first; the medians are compared.
//! `RVIRT_BENCH_ONLY=disk` or `=net` runs one kind. Figures inside the lab are TCG figures and move by up to 2x
//! between runs: only the ratio between the two VMMs in one run means anything.

use rvirt_lab::{GuestPrograms, L1Spec, Lab};

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
  # 64 KiB writes, as iperf-like tools make; then 1 KiB writes, busybox nc's
  # size, where the guest's per-packet cost decides.
  /tcpio send 10.0.2.1 5000 64 | sed -n 's/@@TCPIO-MIBS=/@@NET-TX=/p'
  /tcpio send 10.0.2.1 5002 16 1024 | sed -n 's/@@TCPIO-MIBS=/@@NET-TX1K=/p'
  /tcpio recv 10.0.2.1 5001 | sed -n 's/@@TCPIO-MIBS=/@@NET-RX=/p'
fi
if [ -e /dev/vda ]; then
  for m in seqread seqwrite; do echo "@@$(/diskio $m /dev/vda 1048576 8 | awk '{print "BLK-" toupper($1) "=" $3}')"; done
  for m in randread randwrite; do echo "@@$(/diskio $m /dev/vda 4096 8 | awk '{print "BLK-" toupper($1) "=" $2}')"; done
fi
poweroff -f
"#;

const L1: &str = r#"
insmod /lib/modules/tun.ko
CMD="console=ttyS0 panic=-1 loglevel=4"
# bench NAME KIND ROUND COMMAND...: runs one VM; KIND net sets up the tap and
# the TCP peers in L1. Figures come out as @@NAME-RROUND-KEY=VALUE, the exit
# status as @@NAME-KIND-RROUND-EXIT.
bench() {
  name=$1; kind=$2; round=$3; shift 3
  # A guest that stops (see "Known lab issues" in docs/design.md) is killed
  # after 6 minutes; a normal run takes 1-3.
  timeout -s KILL 360 "$@" </dev/null > /tmp/$name-$kind.log 2>&1 &
  pid=$!
  # Keep the console busy so the lab's stall detector knows L1 is alive.
  (while kill -0 $pid 2>/dev/null; do sleep 20; echo "[bench] $name $kind round $round running"; done) &
  if [ $kind = net ]; then
    for i in $(seq 1 300); do [ -e /sys/class/net/tap0 ] && break; sleep 0.2; done
    ip addr add 10.0.2.1/24 dev tap0; ip link set tap0 up
    tcpio sink 5000 & sink=$!
    tcpio sink 5002 & sink1k=$!
    tcpio source 5001 64 & source=$!
  fi
  wait $pid
  rc=$?
  echo "@@$name-$kind-R$round-EXIT=$rc"
  grep '@@' /tmp/$name-$kind.log | sed "s/@@/@@$name-R$round-/"
  [ $rc = 0 ] || tail -40 /tmp/$name-$kind.log
  [ $kind = net ] && kill $sink $sink1k $source 2>/dev/null
}
RVIRT="rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz --cpus 2 --memory 512M --cmdline"
QEMU="qemu-system-x86_64 -M microvm,pcie=on,accel=kvm -cpu host -bios /usr/share/qemu/bios-microvm.bin -smp 2 -m 512M -no-reboot -nographic -kernel /l2/vmlinuz -initrd /l2/initrd.gz -append"
disk() { dd if=/dev/urandom of=/tmp/disk.raw bs=1M count=256 2>/dev/null; }
rvirt_disk() { disk; bench RVIRT disk $1 $RVIRT "$CMD" --disk path=/tmp/disk.raw; }
qemu_disk() { disk; bench QEMU disk $1 $QEMU "$CMD" -drive file=/tmp/disk.raw,format=raw,if=none,id=d0 -device virtio-blk-pci,drive=d0; }
rvirt_net() { bench RVIRT net $1 $RVIRT "$CMD" --net tap=tap0; }
qemu_net() { bench QEMU net $1 $QEMU "$CMD" -netdev tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off -device virtio-net-pci,netdev=n0,romfile=; }
RUN
"#;

/// The median of the figures that exist (NaN when none do).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.retain(|x| x.is_finite());
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

fn main() -> anyhow::Result<()> {
    let lab = Lab::get()?;
    let programs = GuestPrograms::build(&["benches/guest/diskio.c", "benches/guest/tcpio.c"])?;
    let guest = GUEST.replace("/diskio", "/lib/modules/diskio").replace("/tcpio", "/lib/modules/tcpio");
    let initrd = lab.virtio_initramfs(&guest, &["virtio_blk", "virtio_net"], programs.paths())?;
    let rounds: usize = match std::env::var("RVIRT_BENCH_ROUNDS") {
        Ok(v) => v.parse().ok().filter(|n| *n > 0).ok_or_else(|| anyhow::anyhow!("RVIRT_BENCH_ROUNDS={v}: want a whole number above 0"))?,
        Err(_) => 3,
    };
    let only = std::env::var("RVIRT_BENCH_ONLY").ok();
    if let Some(k) = only.as_deref().filter(|k| !["disk", "net"].contains(k)) {
        anyhow::bail!("RVIRT_BENCH_ONLY={k}: want disk or net");
    }
    // Rounds alternate which VMM goes first, so drift (the host's load, the
    // page cache) does not always favour the same one.
    let mut runs = Vec::new();
    for r in 1..=rounds {
        let order: [&str; 4] =
            if r % 2 == 1 { ["rvirt_disk", "qemu_disk", "qemu_net", "rvirt_net"] } else { ["qemu_disk", "rvirt_disk", "rvirt_net", "qemu_net"] };
        runs.extend(order.iter().filter(|f| only.as_deref().is_none_or(|k| f.ends_with(k))).map(|f| format!("{f} {r}")));
    }
    let microvm_bios = std::fs::canonicalize("/usr/share/qemu/bios-microvm.bin")?;
    let mut v = std::collections::HashMap::new();
    let mut failed = Vec::new();
    for run in &runs {
        let name = format!("bench-virtio-{}", run.replace(' ', "-"));
        let mut spec = L1Spec::new(&name, &L1.replace("RUN", run))
            .file(&lab.kernel, "l2/vmlinuz")
            .file(lab.module_in_tree("drivers/net/tun.ko"), "lib/modules/tun.ko")
            .file(&microvm_bios, "usr/share/qemu/bios-microvm.bin")
            .file(programs.path("tcpio"), "usr/bin/tcpio")
            .blob("l2/initrd.gz", initrd.clone())
            .binary("/usr/bin/qemu-system-x86_64", "usr/bin/qemu-system-x86_64");
        spec.timeout = std::time::Duration::from_secs(900);
        // A crashed guest is a result here (counted below), not a reason to rerun.
        spec.retry_l2_crash = false;
        let out = lab.run(&spec)?;
        if let Err(e) = out.check_l1() {
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            println!("note: L1 for '{run}' failed ({first}); that figure is missing (target/lab-logs/{name}.log)");
            failed.push(format!("{run}: L1 {first}"));
            continue;
        }
        let values = out.values();
        // The VMM-prefixed figures; a failed VM's log tail repeats them unprefixed.
        let figures: Vec<String> = values
            .iter()
            .filter(|(k, _)| k.starts_with("RVIRT-") || k.starts_with("QEMU-"))
            .map(|(k, x)| format!("{k}={x}"))
            .collect();
        println!("{run}: {}", figures.join(" "));
        v.extend(values);
    }
    let get = |k: &str| -> f64 { v.get(k).and_then(|s| s.parse().ok()).unwrap_or(f64::NAN) };
    // A VMM that failed mid-run leaves that round's figures missing.
    for vmm in ["RVIRT", "QEMU"] {
        for kind in ["disk", "net"].into_iter().filter(|k| only.as_deref().is_none_or(|o| o == *k)) {
            let bad = (1..=rounds).filter(|r| v.get(&format!("{vmm}-{kind}-R{r}-EXIT")).map(String::as_str) != Some("0")).count();
            if bad > 0 {
                failed.push(format!("{vmm} {kind}: {bad} of {rounds} rounds did not finish"));
            }
        }
    }
    println!("virtio in the lab, 2 vCPUs, 512 MiB, {rounds} alternating rounds (L2 figures under TCG; compare ratios only):");
    println!("  {:<26} {:>22} {:>22} {:>8}", "", "rvirt median (each)", "qemu median (each)", "ratio");
    for (kind, key, what) in [
        ("disk", "BLK-SEQREAD", "blk seq read 1M (MiB/s)"),
        ("disk", "BLK-SEQWRITE", "blk seq write 1M (MiB/s)"),
        ("disk", "BLK-RANDREAD", "blk rand read 4K (IOPS)"),
        ("disk", "BLK-RANDWRITE", "blk rand write 4K (IOPS)"),
        ("net", "NET-TX", "net guest->host (MiB/s)"),
        ("net", "NET-TX1K", "net g->h 1K writes (MiB/s)"),
        ("net", "NET-RX", "net host->guest (MiB/s)"),
    ] {
        if only.as_deref().is_some_and(|k| k != kind) {
            continue;
        }
        let each = |vmm: &str| -> Vec<f64> { (1..=rounds).map(|r| get(&format!("{vmm}-R{r}-{key}"))).collect() };
        let (r, q) = (each("RVIRT"), each("QEMU"));
        let list = |xs: &[f64]| xs.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(" ");
        let (rm, qm) = (median(r.clone()), median(q.clone()));
        println!("  {what:<26} {:>22} {:>22} {:>7.2}x", format!("{rm:.1} ({})", list(&r)), format!("{qm:.1} ({})", list(&q)), rm / qm);
    }
    for f in &failed {
        println!("note: {f}; see target/lab-logs/bench-virtio-*.log");
    }
    Ok(())
}
