//! Lab test of snapshots with Debian's kernel: a guest keeps a 32 MiB
//! random file in tmpfs (its checksum printed every few seconds) and counts
//! once a second, writing each count to its own sector of a virtio disk
//! (flushed) and pinging its host over a virtio card. The VM is snapshotted
//! through the API and stopped; `rvirt-vmm --restore` continues it in a new
//! process (same disk, a new tap) where the count left off, and a second
//! clone of the same snapshot runs beside it in a network namespace of its
//! own, on a copy of the disk, from memory copied rather than mapped. Both
//! keep the file's checksum, count on from the next number, write their
//! disks without a gap and reach their hosts, and their hosts reach them.

use rvirt_lab::counting::{numbers, sums};
use rvirt_lab::{counting, insmod_lines, l2_initramfs, log, nethost, L1Spec, Lab};

/// The guest: markers are `%%` so they stay out of the L1 script's values.
const GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
MODULES
dd if=/dev/urandom of=/tmp/big bs=1M count=32 2>/dev/null
ip link set lo up
ip addr add 10.0.0.2/24 dev eth0
ip link set eth0 up
(while true; do echo "%%SUM=$(sha256sum /tmp/big | cut -c1-16)"; sleep 4; done) &
i=0
while true; do
  i=$((i + 1))
  echo "%%TICK=$i"
  printf 'tick %d' $i | dd of=/dev/vda bs=512 seek=$i count=1 conv=sync 2>/dev/null
  sync
  if ping -c 1 -W 2 10.0.0.1 >/dev/null 2>&1; then echo "%%NET=$i"; fi
  sleep 1
done
"#;

/// After [`nethost::PRELUDE`] (bridges, taps) and [`counting::SHELL`].
const SCRIPT: &str = r#"
api() { rvirt-lab-api "$1" "$2"; }
# The number of sectors 1, 2, ... of disk $1 holding 'tick N' without a gap.
disk_ticks() {
  n=0
  while [ "$(dd if=$1 bs=512 skip=$((n + 1)) count=1 2>/dev/null | tr -d '\000' | head -c 16)" = "tick $((n + 1))" ]; do n=$((n + 1)); done
  echo $n
}
# A host's bridge keeps its address (libvirt sets it); left alone, a bridge
# takes its lowest port's, and the guest's ARP entry for its host would
# point at the tap a stopped VMM took with it.
/usr/sbin/ip link add br0 address 02:00:00:00:00:01 type bridge
/usr/sbin/ip addr add 10.0.0.1/24 dev br0
/usr/sbin/ip link set br0 up
unshare -n sleep 100000 & NS=$!
sleep 1
inns() { nsenter --net=/proc/$NS/ns/net "$@"; }
inns /usr/sbin/ip link set lo up
inns /usr/sbin/ip link add br0 address 02:00:00:00:00:01 type bridge
inns /usr/sbin/ip addr add 10.0.0.1/24 dev br0
inns /usr/sbin/ip link set br0 up
truncate -s 64M /tmp/disk.raw
rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz --cpus 2 --memory 512M --cmdline "console=ttyS0 panic=-1 quiet" \
  --disk path=/tmp/disk.raw --net tap=snap0,bridge=br0,mac=52:54:00:00:00:51 \
  --serial file=/tmp/one.log --api-socket /tmp/one.sock </dev/null &
one=$!
wait_tick /tmp/one.log 6 || echo "@@ONE-STALLED=1"
for i in $(seq 1 60); do grep -q '%%SUM' /tmp/one.log && grep -q '%%NET' /tmp/one.log && break; sleep 0.5; done
echo "@@SNAPSHOT=$(api /tmp/one.sock '{"command":"snapshot","path":"/tmp/snap"}')"
s1=$(wc -c < /tmp/one.log); sleep 3; s2=$(wc -c < /tmp/one.log)
echo "@@PAUSED-GROWTH=$((s2 - s1))"
echo "@@LAST-TICK=$(ticks /tmp/one.log)"
echo "@@STOP-ONE=$(api /tmp/one.sock stop)"
wait $one
echo "@@ONE-EXIT=$?"
echo "@@SNAP-FILES=$(ls /tmp/snap | tr '\n' ' ')"
echo "@@SNAP-MEMORY-KB=$(du -k /tmp/snap/memory | cut -f1)"
# The second clone writes its own copy of the disk as it was at the snapshot.
cp /tmp/disk.raw /tmp/disk-b.raw
rvirt-vmm --restore /tmp/snap --serial file=/tmp/a.log --api-socket /tmp/a.sock --net tap=snapa,bridge=br0 </dev/null &
a=$!
inns rvirt-vmm --restore /tmp/snap --restore-copy-memory --serial file=/tmp/b.log --api-socket /tmp/b.sock \
  --disk path=/tmp/disk-b.raw --net tap=snapb,bridge=br0 </dev/null &
b=$!
last=$(ticks /tmp/one.log)
wait_tick /tmp/a.log $((last + 8)) || echo "@@A-STALLED=1"
wait_tick /tmp/b.log $((last + 8)) || echo "@@B-STALLED=1"
for i in $(seq 1 60); do [ "$(grep -c '%%SUM' /tmp/a.log)" -ge 2 ] && [ "$(grep -c '%%SUM' /tmp/b.log)" -ge 2 ] && break; sleep 0.5; done
if ping -c 2 -W 2 10.0.0.2 >/dev/null 2>&1; then echo "@@HOST-TO-A=reached"; else echo "@@HOST-TO-A=unreached"; fi
if inns ping -c 2 -W 2 10.0.0.2 >/dev/null 2>&1; then echo "@@HOST-TO-B=reached"; else echo "@@HOST-TO-B=unreached"; fi
echo "@@STATUS-A=$(api /tmp/a.sock status)"
echo "@@STOP-A=$(api /tmp/a.sock stop)"
echo "@@STOP-B=$(api /tmp/b.sock stop)"
wait $a; echo "@@A-EXIT=$?"
wait $b; echo "@@B-EXIT=$?"
echo "@@DISK-A-TICKS=$(disk_ticks /tmp/disk.raw)"
echo "@@DISK-B-TICKS=$(disk_ticks /tmp/disk-b.raw)"
for n in one a b; do echo "@@BEGIN-$n"; cat /tmp/$n.log; echo "@@END-$n"; done
"#;

#[test]
fn a_snapshotted_debian_guest_continues_in_a_new_process_and_two_clones_run_side_by_side() {
    let lab = Lab::get().unwrap();
    let modules = lab.virtio_modules(&["virtio_blk", "virtio_net"]);
    let guest = l2_initramfs(&GUEST.replace("MODULES", &insmod_lines(&modules)), &modules).unwrap();
    let mut spec = L1Spec::new("snapshot", &format!("{}{}{SCRIPT}", nethost::PRELUDE, counting::SHELL))
        .with_network_host(lab)
        .file(&lab.kernel, "l2/vmlinuz")
        .blob("l2/initrd.gz", guest);
    spec.timeout = std::time::Duration::from_secs(1200);
    let out = lab.run(&spec).unwrap();
    out.check_l1().unwrap();
    let v = out.values();
    for (k, val) in &v {
        log(&format!("{k} = {val}"));
    }
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| panic!("no {k} in output:\n{}", out.tail(80)));
    let (one, a, b) = (out.section("one").unwrap_or_default(), out.section("a").unwrap_or_default(), out.section("b").unwrap_or_default());
    let logs = || format!("--- one\n{}\n--- a\n{}\n--- b\n{}", tail(&one), tail(&a), tail(&b));
    for stalled in ["ONE-STALLED", "A-STALLED", "B-STALLED", "INSMOD-FAILED"] {
        assert!(v.get(stalled).is_none(), "{stalled}\n{}", logs());
    }
    assert!(get("SNAPSHOT").starts_with(r#"{"ok":true"#), "{}", get("SNAPSHOT"));
    assert_eq!(get("PAUSED-GROWTH"), "0", "the VM stays paused after the snapshot");
    assert_eq!(get("SNAP-FILES").trim(), "memory state");
    let last: u64 = get("LAST-TICK").parse().unwrap();
    assert_eq!(numbers(&one, "TICK").last(), Some(&last));
    assert!(numbers(&one, "NET").iter().any(|n| *n < last), "the guest reached its host before the snapshot\n{}", logs());

    let reference = sums(&one);
    assert!(!reference.is_empty(), "{}", logs());
    for (name, log) in [("a", &a), ("b", &b)] {
        let ticks = numbers(log, "TICK");
        assert_eq!(ticks.first(), Some(&(last + 1)), "{name} counts on from the snapshot's {last}\n{}", logs());
        assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{name} counts without a gap: {ticks:?}");
        assert!(ticks.len() >= 8, "{name} ran: {ticks:?}");
        let s = sums(log);
        assert!(!s.is_empty() && s.iter().all(|x| *x == reference[0]), "{name}'s tmpfs file is unchanged: {s:?} vs {reference:?}");
        assert!(numbers(log, "NET").iter().any(|n| *n > last), "{name} reaches its host after the restore\n{}", logs());
    }
    assert_eq!(get("HOST-TO-A"), "reached");
    assert_eq!(get("HOST-TO-B"), "reached", "the clone in its own namespace is reached by its host");
    assert!(get("STATUS-A").contains(r#""state":"running""#) && get("STATUS-A").contains(r#""memory_bytes":536870912"#), "{}", get("STATUS-A"));
    for k in ["ONE-EXIT", "A-EXIT", "B-EXIT"] {
        assert_eq!(get(k), "0", "{k}");
    }
    // Each disk holds every count its VMs wrote, in order, with nothing lost at the snapshot.
    let (disk_a, disk_b): (u64, u64) = (get("DISK-A-TICKS").parse().unwrap(), get("DISK-B-TICKS").parse().unwrap());
    let (a_last, b_last) = (*numbers(&a, "TICK").last().unwrap_or(&0), *numbers(&b, "TICK").last().unwrap_or(&0));
    assert!(disk_a + 1 >= a_last && disk_a > last, "disk A holds ticks 1..{disk_a}; A counted to {a_last}");
    assert!(disk_b + 1 >= b_last && disk_b > last, "disk B holds ticks 1..{disk_b}; B counted to {b_last}");
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
