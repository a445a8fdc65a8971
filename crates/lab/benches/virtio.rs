//! Virtio I/O benchmark, rvirt-vmm against QEMU's virtio-pci devices, side by
//! side in one lab run (`cargo bench -p rvirt-lab --bench virtio`):
//! - virtio-blk: sequential 1 MiB reads and writes, random 4 KiB reads and
//!   writes, all O_DIRECT in the guest (`benches/guest/diskio.c`), on a raw
//!   image in L1's page cache (both VMMs use the page cache: QEMU's default
//!   `cache=writeback`, rvirt's default);
//! - virtio-scsi: the same four measures on the same image as a SCSI disk
//!   (`sda`), rvirt against QEMU's virtio-scsi-pci + scsi-hd, and against
//!   rvirt's own virtio-blk in the same L1 (`RVIRT_BENCH_ONLY=scsi`);
//! - virtio-net: TCP throughput guest->host and host->guest over a tap
//!   (QEMU with `vhost=off`: both VMMs move packets in user space), by
//!   `benches/guest/tcpio.c` at both ends, 256 MiB in 64 KiB writes each
//!   way, and guest->host 64 MiB in 1 KiB writes (many small packets);
//!   transfers of a few seconds, as one of a second is mostly slow start.
//!
//! Same kernel, initramfs, 2 vCPUs, 512 MiB; QEMU runs `-M microvm,pcie=on`.
//! A round is one L1 that runs one kind (disk or network) under both VMMs,
//! one after the other, the order alternating between rounds: single
//! figures move by up to 5x between L1s (the host's load reaches TCG), so
//! the figure that counts is the median of each round's rvirt/QEMU ratio.
//! A guest that stops is killed after 6 minutes and costs its round's ratio.
//! `RVIRT_BENCH_ROUNDS` (default 3) sets the rounds; `RVIRT_BENCH_ONLY=disk`,
//! `=net` or `=net1k` (only the 1 KiB-write transfer) runs one kind.
//! `RVIRT_BENCH_VERSUS=jailed` compares rvirt-vmm with itself jailed
//! (`--jail --jail-user`) instead of QEMU: what confinement costs the guest.

use rvirt_lab::stats::median;
use rvirt_lab::{compare, GuestPrograms, L1Spec, Lab};

const GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
INSMOD
up() { cut -d' ' -f1 /proc/uptime; }
if [ -e /sys/class/net/eth0 ]; then
  only_1k=$(grep -c rvirt_bench=net1k /proc/cmdline)
  ip link set lo up
  ip addr add 10.0.2.15/24 dev eth0
  ip link set eth0 up
  for i in $(seq 1 60); do ping -c 1 -W 1 10.0.2.1 >/dev/null 2>&1 && break; done
  # 64 KiB writes, as iperf-like tools make; then 1 KiB writes, busybox nc's
  # size, where the guest's per-packet cost decides. Several seconds each.
  [ $only_1k = 1 ] || /tcpio send 10.0.2.1 5000 256 | sed -n 's/@@TCPIO-MIBS=/@@NET-TX=/p'
  /tcpio send 10.0.2.1 5002 64 1024 | sed -n 's/@@TCPIO-MIBS=/@@NET-TX1K=/p'
  [ $only_1k = 1 ] || /tcpio recv 10.0.2.1 5001 | sed -n 's/@@TCPIO-MIBS=/@@NET-RX=/p'
fi
for dev in vda sda; do
  [ -e /dev/$dev ] || continue
  p=BLK; [ $dev = sda ] && p=SCSI
  for m in seqread seqwrite; do echo "@@$(/diskio $m /dev/$dev 1048576 8 | awk -v p=$p '{print p "-" toupper($1) "=" $3}')"; done
  for m in randread randwrite; do echo "@@$(/diskio $m /dev/$dev 4096 8 | awk -v p=$p '{print p "-" toupper($1) "=" $2}')"; done
done
poweroff -f
"#;

const L1: &str = r#"
insmod /lib/modules/tun.ko
# nokaslr: L1's trace then names where a triple-faulting L2 was.
CMD="console=ttyS0 panic=-1 loglevel=4 nokaslr EXTRA"
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
    tcpio source 5001 256 & source=$!
  fi
  wait $pid
  rc=$?
  echo "@@$name-$kind-R$round-EXIT=$rc"
  grep '@@' /tmp/$name-$kind.log | sed "s/@@/@@$name-R$round-/"
  [ $rc = 0 ] || tail -40 /tmp/$name-$kind.log
  [ $kind = net ] && kill $sink $sink1k $source 2>/dev/null
}
disk() { dd if=/dev/urandom of=/tmp/disk.raw bs=1M count=256 2>/dev/null; }
rvirt_disk() { disk; bench RVIRT disk $1 RVIRT_L2 RVIRT_DISK; }
qemu_disk() { disk; bench QEMU disk $1 QEMU_L2 QEMU_DISK; }
rvirt_scsi() { disk; bench RVIRT scsi $1 RVIRT_L2 RVIRT_SCSI; }
qemu_scsi() { disk; bench QEMU scsi $1 QEMU_L2 QEMU_SCSI; }
rvirt_net() { bench RVIRT net $1 RVIRT_L2 RVIRT_NET; }
qemu_net() { bench QEMU net $1 QEMU_L2 QEMU_NET; }
jailed_disk() { disk; bench JAILED disk $1 RVIRT_L2 --jail --jail-user 4242:4242 RVIRT_DISK; }
jailed_scsi() { disk; bench JAILED scsi $1 RVIRT_L2 --jail --jail-user 4242:4242 RVIRT_SCSI; }
jailed_net() { bench JAILED net $1 RVIRT_L2 --jail --jail-user 4242:4242 RVIRT_NET; }
RUN
"#;

fn main() -> anyhow::Result<()> {
    let lab = Lab::get()?;
    let programs = GuestPrograms::build(&["benches/guest/diskio.c", "benches/guest/tcpio.c"])?;
    let guest = GUEST.replace("/diskio", "/lib/modules/diskio").replace("/tcpio", "/lib/modules/tcpio");
    let initrd = lab.virtio_initramfs(&guest, &["virtio_blk", "virtio_scsi", "virtio_net"], programs.paths())?;
    let rounds: usize = match std::env::var("RVIRT_BENCH_ROUNDS") {
        Ok(v) => v.parse().ok().filter(|n| *n > 0).ok_or_else(|| anyhow::anyhow!("RVIRT_BENCH_ROUNDS={v}: want a whole number above 0"))?,
        Err(_) => 3,
    };
    let only = std::env::var("RVIRT_BENCH_ONLY").ok();
    if let Some(k) = only.as_deref().filter(|k| !["disk", "scsi", "net", "net1k"].contains(k)) {
        anyhow::bail!("RVIRT_BENCH_ONLY={k}: want disk, scsi, net or net1k");
    }
    let only_1k = only.as_deref() == Some("net1k");
    let versus = match std::env::var("RVIRT_BENCH_VERSUS").as_deref() {
        Err(_) | Ok("qemu") => "qemu",
        Ok("jailed") => "jailed",
        Ok(o) => anyhow::bail!("RVIRT_BENCH_VERSUS={o}: want qemu or jailed"),
    };
    let other = versus.to_uppercase();
    let kinds: Vec<&str> = ["disk", "scsi", "net"].into_iter().filter(|k| only.as_deref().is_none_or(|o| o.starts_with(k))).collect();
    // One L1 per round and kind, both VMMs in it; rounds alternate which
    // goes first, so drift inside an L1 (the page cache, the host's load)
    // does not always favour the same one.
    let mut runs = Vec::new();
    for r in 1..=rounds {
        for kind in &kinds {
            let order = if r % 2 == 1 { ["rvirt", versus] } else { [versus, "rvirt"] };
            let mut script = format!("{}_{kind} {r}\n{}_{kind} {r}", order[0], order[1]);
            if *kind == "scsi" && versus == "qemu" {
                // rvirt's virtio-blk on the same image in the same L1: SCSI against block.
                script.push_str(&format!("\nrvirt_disk {r}"));
            }
            runs.push((format!("{kind}-{r}"), script));
        }
    }
    let mut v = std::collections::HashMap::new();
    let mut failed = Vec::new();
    let extra = if only_1k { "rvirt_bench=net1k" } else { "" };
    for (run, script) in &runs {
        let name = format!("bench-virtio-{run}");
        let mut spec = L1Spec::new(&name, &compare::expand(&L1.replace("RUN", script).replace("EXTRA", extra)))
            .with_both_vmms(lab)?
            .file(lab.module_in_tree("drivers/net/tun.ko"), "lib/modules/tun.ko")
            .file(programs.path("tcpio"), "usr/bin/tcpio")
            .blob("l2/initrd.gz", initrd.clone());
        spec.timeout = std::time::Duration::from_secs(1500);
        // A crashed guest is a result here (counted below), not a reason to rerun.
        spec.retry_l2_crash = false;
        let out = lab.run(&spec)?;
        if let Err(e) = out.check_l1() {
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            println!("note: L1 for '{run}' failed ({first}); that round is missing (target/lab-logs/{name}.log)");
            failed.push(format!("{run}: L1 {first}"));
            continue;
        }
        let values = out.values();
        // The VMM-prefixed figures; a failed VM's log tail repeats them unprefixed.
        let figures: Vec<String> = values
            .iter()
            .filter(|(k, _)| k.starts_with("RVIRT-") || k.starts_with(&format!("{other}-")))
            .map(|(k, x)| format!("{k}={x}"))
            .collect();
        println!("{run}: {}", figures.join(" "));
        // QEMU with -no-reboot exits 0 after a triple fault: L1's trace is
        // what shows it (the round's figures are then missing).
        for s in out.l2_shutdowns() {
            println!("note: {run}: an L2 triple-faulted at {s}");
            failed.push(format!("{run}: L2 triple fault in {}", s.thread));
        }
        v.extend(values);
    }
    let get = |k: &str| -> f64 { v.get(k).and_then(|s| s.parse().ok()).unwrap_or(f64::NAN) };
    // A VMM that failed mid-run leaves that round's figures missing.
    for vmm in ["RVIRT", other.as_str()] {
        for kind in &kinds {
            let bad = (1..=rounds).filter(|r| v.get(&format!("{vmm}-{kind}-R{r}-EXIT")).map(String::as_str) != Some("0")).count();
            if bad > 0 {
                failed.push(format!("{vmm} {kind}: {bad} of {rounds} rounds did not finish"));
            }
        }
    }
    println!("virtio in the lab, 2 vCPUs, 512 MiB, {rounds} rounds, rvirt and {versus} in each round's L1 (L2 figures under TCG; compare ratios only):");
    println!("  {:<26} {:>10} {:>10} {:>30}", "", "rvirt med.", format!("{versus} med."), "ratio: median of rounds (each)");
    for (kind, key, what) in [
        ("disk", "BLK-SEQREAD", "blk seq read 1M (MiB/s)"),
        ("disk", "BLK-SEQWRITE", "blk seq write 1M (MiB/s)"),
        ("disk", "BLK-RANDREAD", "blk rand read 4K (IOPS)"),
        ("disk", "BLK-RANDWRITE", "blk rand write 4K (IOPS)"),
        ("scsi", "SCSI-SEQREAD", "scsi seq read 1M (MiB/s)"),
        ("scsi", "SCSI-SEQWRITE", "scsi seq write 1M (MiB/s)"),
        ("scsi", "SCSI-RANDREAD", "scsi rand read 4K (IOPS)"),
        ("scsi", "SCSI-RANDWRITE", "scsi rand write 4K (IOPS)"),
        ("net", "NET-TX", "net guest->host (MiB/s)"),
        ("net", "NET-TX1K", "net g->h 1K writes (MiB/s)"),
        ("net", "NET-RX", "net host->guest (MiB/s)"),
    ] {
        if !kinds.contains(&kind) || (only_1k && key != "NET-TX1K") {
            continue;
        }
        let each = |vmm: &str| -> Vec<f64> { (1..=rounds).map(|r| get(&format!("{vmm}-R{r}-{key}"))).collect() };
        let (r, q) = (each("RVIRT"), each(&other));
        let ratios: Vec<f64> = r.iter().zip(&q).map(|(a, b)| a / b).collect();
        let list = |xs: &[f64], p: usize| xs.iter().map(|x| format!("{x:.p$}")).collect::<Vec<_>>().join(" ");
        println!(
            "  {what:<26} {:>10.1} {:>10.1} {:>30}",
            median(r.clone()),
            median(q.clone()),
            format!("{:.2}x ({})", median(ratios.clone()), list(&ratios, 2))
        );
        println!("  {:<26} rvirt ({}) / {versus} ({})", "", list(&r, 1), list(&q, 1));
    }
    if kinds.contains(&"scsi") && versus == "qemu" {
        println!("  rvirt virtio-scsi against rvirt virtio-blk in the same L1 (median of rounds' ratios):");
        for m in ["SEQREAD", "SEQWRITE", "RANDREAD", "RANDWRITE"] {
            let ratios: Vec<f64> = (1..=rounds).map(|r| get(&format!("RVIRT-R{r}-SCSI-{m}")) / get(&format!("RVIRT-R{r}-BLK-{m}"))).collect();
            println!("  {:<26} {:.2}x", m.to_lowercase(), median(ratios));
        }
    }
    for f in &failed {
        println!("note: {f}; see target/lab-logs/bench-virtio-*.log");
    }
    Ok(())
}
