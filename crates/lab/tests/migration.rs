//! Lab test of live migration with Debian's kernel, in one L1.
//!
//! First the snapshot test's guest (a 32 MiB random file in tmpfs whose
//! checksum it prints every few seconds, a count once a second written to
//! its own sector of a qcow2 virtio disk, a ping to its host each count,
//! its virtio-rng and balloon started too) also reads 8 MiB it wrote to
//! its disk over and over, page cache dropped, printing their checksum. It
//! moves over TCP between two rvirt-vmm while it runs, its dirty pages
//! tracked in KVM's dirty rings (`--dirty-ring`; the second guest's in
//! KVM's bitmaps): the count goes on
//! from the next number at the destination, every checksum holds, the
//! guest reaches its host and its host reaches it, its disk holds every
//! count without a gap and passes `qemu-img check`, and the source
//! reports the guest's pause.
//!
//! Then a guest that copies 32 MiB in tmpfs over and over migrates over an
//! 8 MiB/s link: without auto-converge it is still being sent after 45 s
//! (its destination is then killed: the source runs on, the status says
//! why); a second try is cancelled (the source runs on, the destination
//! ends); with auto-converge the vCPUs are throttled and it moves.

use rvirt_lab::counting::{numbers, sums, words};
use rvirt_api::MigrationStatus;
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
ip addr add 10.0.0.2/24 dev eth0 2>/dev/null
ip link set eth0 up 2>/dev/null
(while true; do echo "%%SUM=$(sha256sum /tmp/big | cut -c1-16)"; sleep 4; done) &
if grep -q rvirt.dirty /proc/cmdline; then
  (while true; do cp /tmp/big /tmp/dirt; done) &
  echo "%%DIRTYING=1"
fi
if [ -b /dev/vda ]; then
  dd if=/dev/urandom of=/dev/vda bs=1M count=8 2>/dev/null
  sync
  (while true; do
    echo 3 > /proc/sys/vm/drop_caches
    echo "%%DISK=$(dd if=/dev/vda bs=1M count=8 2>/dev/null | sha256sum | cut -c1-16)"
    sleep 1
  done) &
fi
i=0
while true; do
  i=$((i + 1))
  echo "%%TICK=$i"
  if [ -b /dev/vda ]; then
    printf 'tick %d' $i | dd of=/dev/vda bs=512 seek=$((32768 + i)) count=1 conv=sync 2>/dev/null
    sync
  fi
  head -c 16 /dev/hwrng >/dev/null 2>&1 && echo "%%RNG=$i"
  if ping -c 1 -W 2 10.0.0.1 >/dev/null 2>&1; then echo "%%NET=$i"; fi
  sleep 1
done
"#;

/// After [`nethost::PRELUDE`] (bridges, taps) and [`counting::SHELL`].
const SCRIPT: &str = r#"
api() { rvirt-lab-api "$1" "$2"; }
# Waits until something listens on TCP port $1 of this L1.
wait_listen() {
  for i in $(seq 1 100); do grep -q ":$(printf '%04X' $1) 00000000:0000 0A" /proc/net/tcp && return 0; sleep 0.2; done
  return 1
}
# Polls the migration of the VMM at $1 until it is no longer under way; prints its status.
settled() {
  for i in $(seq 1 600); do
    st=$(api $1 migrate-status 2>/dev/null)
    case "$st" in *'"state":"setup"'*|*'"state":"active"'*|*'"state":"switch-over"'*) sleep 0.5;; *) echo "$st"; return 0;; esac
  done
  echo "$st"
}
# The number of tick sectors 1, 2, ... (from sector 32769) of raw disk $1 without a gap.
disk_ticks() {
  n=0
  while [ "$(dd if=$1 bs=512 skip=$((32768 + n + 1)) count=1 2>/dev/null | tr -d '\000' | head -c 16)" = "tick $((n + 1))" ]; do n=$((n + 1)); done
  echo $n
}
/usr/sbin/ip link set lo up
/usr/sbin/ip link add br0 address 02:00:00:00:00:01 type bridge
/usr/sbin/ip addr add 10.0.0.1/24 dev br0
/usr/sbin/ip link set br0 up
cp /l2/disk.qcow2 /tmp/disk.qcow2

# 1. The guest with a disk moves; the destination takes the source's disk.
rvirt-vmm --incoming tcp:127.0.0.1:4444 --net tap=dst0,bridge=br0 \
  --serial file=/tmp/two.log --api-socket /tmp/two.sock </dev/null 2>/tmp/two.err &
two=$!
rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz --cpus 2 --memory 512M --cmdline "console=ttyS0 panic=-1 quiet" \
  --disk path=/tmp/disk.qcow2,format=qcow2 --net tap=src0,bridge=br0,mac=52:54:00:00:00:61 --rng --balloon --dirty-ring 4096 \
  --serial file=/tmp/one.log --api-socket /tmp/one.sock </dev/null 2>/tmp/one.err &
one=$!
wait_tick /tmp/one.log 6 || echo "@@ONE-STALLED=1"
for i in $(seq 1 60); do grep -q '%%SUM' /tmp/one.log && grep -q '%%NET' /tmp/one.log && [ "$(grep -c '%%DISK' /tmp/one.log)" -ge 2 ] && break; sleep 0.5; done
echo "@@MIGRATE=$(api /tmp/one.sock '{"command":"migrate","uri":"tcp:127.0.0.1:4444"}')"
for i in $(seq 1 600); do
  kill -0 $one 2>/dev/null || break
  st=$(api /tmp/one.sock migrate-status 2>/dev/null) && echo "[migration test] $st"
  sleep 0.5
done
wait $one
echo "@@ONE-EXIT=$?"
echo "@@ONE-SAID=$(grep 'rvirt-vmm: migrated' /tmp/one.err)"
last=$(ticks /tmp/one.log)
echo "@@LAST-TICK=$last"
wait_tick /tmp/two.log $((last + 8)) || echo "@@TWO-STALLED=1"
for i in $(seq 1 60); do [ "$(grep -c '%%SUM' /tmp/two.log)" -ge 2 ] && [ "$(grep -c '%%DISK' /tmp/two.log)" -ge 3 ] && break; sleep 0.5; done
# Up to 10 tries: under TCG an echo reply can take longer than one ping's wait.
reached=unreached
before=$(ticks /tmp/two.log)
for i in $(seq 1 10); do if ping -c 1 -W 2 10.0.0.2 >/dev/null 2>&1; then reached=reached; echo "@@HOST-TO-TWO-TRY=$i"; break; fi; done
echo "@@HOST-TO-TWO=$reached"
# A guest that also stopped counting meanwhile is stalled, not unreachable (the lab's known stall).
[ $reached = unreached ] && [ "$(ticks /tmp/two.log)" = "$before" ] && echo "@@TWO-STALLED=1"
echo "@@STATUS-TWO=$(api /tmp/two.sock status)"
echo "@@STOP-TWO=$(api /tmp/two.sock stop)"
wait $two; echo "@@TWO-EXIT=$?"
echo "@@TWO-LAST-TICK=$(ticks /tmp/two.log)"
echo "@@QCOW2-CHECK=$(qemu-img check /tmp/disk.qcow2 2>&1 | tr '\n' ' ')"
qemu-img convert -f qcow2 -O raw /tmp/disk.qcow2 /tmp/disk.raw
echo "@@DISK-TICKS=$(disk_ticks /tmp/disk.raw)"
rm -f /tmp/disk.raw

# 2. A guest dirtying faster than the link carries.
rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz --memory 256M --cmdline "console=ttyS0 panic=-1 quiet rvirt.dirty" \
  --serial file=/tmp/d.log --api-socket /tmp/d.sock </dev/null 2>/tmp/d.err &
d=$!
wait_tick /tmp/d.log 4 || echo "@@D-STALLED=1"
grep -q '%%DIRTYING' /tmp/d.log || echo "@@D-NOT-DIRTYING=1"
# 2a. Without auto-converge it is still being sent after 45 s; its destination is then killed.
rvirt-vmm --incoming tcp:127.0.0.1:4445 --serial file=/tmp/k.log </dev/null 2>/tmp/k.err &
k=$!
wait_listen 4445 || echo "@@K-NOT-LISTENING=1"
echo "@@PLAIN=$(api /tmp/d.sock '{"command":"migrate","uri":"tcp:127.0.0.1:4445","bandwidth_mib_s":8}')"
sleep 45
echo "@@PLAIN-AFTER-45S=$(api /tmp/d.sock migrate-status)"
kill -9 $k; wait $k
echo "@@KILLED=$(settled /tmp/d.sock)"
t=$(ticks /tmp/d.log); wait_tick /tmp/d.log $((t + 3)) || echo "@@D-STOPPED-AFTER-KILL=1"
# 2b. Cancelled: the source runs on, the destination ends.
rvirt-vmm --incoming tcp:127.0.0.1:4446 --serial file=/tmp/c.log </dev/null 2>/tmp/c.err &
c=$!
wait_listen 4446 || echo "@@C-NOT-LISTENING=1"
echo "@@CANCEL-MIGRATE=$(api /tmp/d.sock '{"command":"migrate","uri":"tcp:127.0.0.1:4446","bandwidth_mib_s":8}')"
sleep 5
echo "@@CANCEL=$(api /tmp/d.sock migrate-cancel)"
echo "@@CANCELLED=$(settled /tmp/d.sock)"
wait $c; echo "@@CANCEL-DEST-EXIT=$?"
t=$(ticks /tmp/d.log); wait_tick /tmp/d.log $((t + 3)) || echo "@@D-STOPPED-AFTER-CANCEL=1"
# 2c. With auto-converge it moves.
rvirt-vmm --incoming tcp:127.0.0.1:4447 --serial file=/tmp/a.log --api-socket /tmp/a.sock </dev/null 2>/tmp/a.err &
a=$!
wait_listen 4447 || echo "@@A-NOT-LISTENING=1"
echo "@@AC-MIGRATE=$(api /tmp/d.sock '{"command":"migrate","uri":"tcp:127.0.0.1:4447","bandwidth_mib_s":8,"auto_converge":true}')"
for i in $(seq 1 1200); do
  kill -0 $d 2>/dev/null || break
  st=$(api /tmp/d.sock migrate-status 2>/dev/null) && echo "[migration test] $st"
  case "$st" in *'"throttle_percent":0,'*|'') ;; *) echo "@@AC-THROTTLED=$st";; esac
  sleep 0.5
done
wait $d; echo "@@D-EXIT=$?"
echo "@@D-SAID=$(grep 'rvirt-vmm: migrated' /tmp/d.err)"
dlast=$(ticks /tmp/d.log)
echo "@@D-LAST-TICK=$dlast"
wait_tick /tmp/a.log $((dlast + 3)) || echo "@@A-STALLED=1"
echo "@@A-FIRST-TICK=$(grep -o '%%TICK=[0-9]*' /tmp/a.log | head -1 | cut -d= -f2)"
api /tmp/a.sock stop >/dev/null; wait $a; echo "@@A-EXIT=$?"
for n in one two d k c a; do echo "@@BEGIN-$n"; cat /tmp/$n.log; echo "@@END-$n"; echo "@@BEGIN-$n-err"; cat /tmp/$n.err; echo "@@END-$n-err"; done
"#;

/// The migration status in an API answer (`{"ok":true,"migration":{…}}`).
fn status(answer: &str) -> MigrationStatus {
    let v: serde_json::Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
    serde_json::from_value(v["migration"].clone()).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[test]
fn running_debian_guests_move_to_other_vmms_over_tcp() {
    let lab = Lab::get().unwrap();
    let modules = lab.virtio_modules(&["virtio_blk", "virtio_net", "virtio-rng", "virtio_balloon"]);
    let guest = l2_initramfs(&GUEST.replace("MODULES", &insmod_lines(&modules)), &modules).unwrap();
    let scratch = std::env::temp_dir().join(format!("rvirt-lab-migration-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let disk = scratch.join("disk.qcow2");
    drop(rvirt_block::Qcow2Image::create(&disk, 64 << 20, &Default::default()).unwrap());
    let mut spec = L1Spec::new("migration", &format!("{}{}{SCRIPT}", nethost::PRELUDE, counting::SHELL))
        .with_network_host(lab)
        .file(&lab.kernel, "l2/vmlinuz")
        .file(&disk, "l2/disk.qcow2")
        .binary("/usr/bin/qemu-img", "usr/bin/qemu-img")
        .blob("l2/initrd.gz", guest);
    spec.timeout = std::time::Duration::from_secs(1800);
    let out = lab.run(&spec).unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
    out.check_l1().unwrap();
    let v = out.values();
    for (k, val) in &v {
        log(&format!("{k} = {val}"));
    }
    let section = |n: &str| out.section(n).unwrap_or_default();
    let (one, two, d, a) = (section("one"), section("two"), section("d"), section("a"));
    // Each guest's serial log, then its VMM's stderr.
    let logs = || {
        let both = |n: &str| format!("--- {n}\n{}\n--- {n} stderr\n{}\n", section(n), section(&format!("{n}-err")));
        ["one", "two", "d", "a", "k", "c"].map(both).concat()
    };
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| panic!("no {k} in output:\n{}\n{}", out.tail(60), logs()));
    for stalled in [
        "ONE-STALLED",
        "TWO-STALLED",
        "INSMOD-FAILED",
        "D-STALLED",
        "D-NOT-DIRTYING",
        "K-NOT-LISTENING",
        "C-NOT-LISTENING",
        "A-NOT-LISTENING",
        "D-STOPPED-AFTER-KILL",
        "D-STOPPED-AFTER-CANCEL",
        "A-STALLED",
    ] {
        assert!(v.get(stalled).is_none(), "{stalled}\n{}", logs());
    }

    // 1. The guest with a disk.
    assert_eq!(get("MIGRATE"), r#"{"ok":true}"#);
    assert_eq!(get("ONE-EXIT"), "0", "{}", logs());
    let said = get("ONE-SAID");
    assert!(said.contains("rvirt-vmm: migrated: guest paused"), "{said}");
    log(&format!("the source said: {said}"));
    let last: u64 = get("LAST-TICK").parse().unwrap();
    let ticks = numbers(&two, "TICK");
    assert_eq!(ticks.first(), Some(&(last + 1)), "the count goes on from {last}\n{}", logs());
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1) && ticks.len() >= 8, "{ticks:?}");
    let (before, after) = (sums(&one), sums(&two));
    assert!(!before.is_empty() && !after.is_empty() && after.iter().all(|s| *s == before[0]), "the tmpfs file is unchanged: {before:?} {after:?}");
    // What the guest reads from its disk (page cache dropped) is the same before, during and after.
    let (disk_before, disk_after) = (words(&one, "DISK"), words(&two, "DISK"));
    assert!(disk_before.len() >= 2 && disk_after.len() >= 3, "{disk_before:?} {disk_after:?}\n{}", logs());
    assert!(disk_before.iter().chain(&disk_after).all(|s| *s == disk_before[0]), "the disk reads the same: {disk_before:?} {disk_after:?}");
    assert!(numbers(&two, "NET").iter().any(|n| *n > last), "the guest reaches its host from the destination\n{}", logs());
    assert!(numbers(&two, "RNG").iter().any(|n| *n > last), "its entropy device works there\n{}", logs());
    assert_eq!(get("HOST-TO-TWO"), "reached");
    assert!(get("STATUS-TWO").contains(r#""state":"running""#), "{}", get("STATUS-TWO"));
    assert_eq!(get("TWO-EXIT"), "0");
    // Both VMMs wrote the image in turn: every count is on it, in one consistent qcow2.
    assert!(get("QCOW2-CHECK").contains("No errors were found"), "{}", get("QCOW2-CHECK"));
    let (on_disk, counted): (u64, u64) = (get("DISK-TICKS").parse().unwrap(), get("TWO-LAST-TICK").parse().unwrap());
    assert!(on_disk > last && on_disk + 1 >= counted, "the disk holds counts 1..{on_disk}; the guest counted to {counted}, moving at {last}");

    // 2. The dirtying guest over an 8 MiB/s link.
    assert_eq!(get("PLAIN"), r#"{"ok":true}"#);
    // The first pass (all its memory that is not zero) takes some 20 s at
    // 8 MiB/s; each pass after it finds about as much dirtied again.
    let plain = status(&get("PLAIN-AFTER-45S"));
    assert_eq!(plain.state, rvirt_api::MigrationState::Active, "without auto-converge it does not converge: {plain:?}");
    assert!(plain.iteration >= 3 && plain.throttle_percent == 0 && plain.expected_downtime_ms > 1000, "{plain:?}");
    let killed = status(&get("KILLED"));
    assert_eq!(killed.state, rvirt_api::MigrationState::Failed, "{killed:?}");
    assert!(killed.error.as_deref().unwrap_or("").contains("migration:"), "the status says why: {killed:?}");
    assert_eq!(get("CANCEL"), r#"{"ok":true}"#);
    assert_eq!(status(&get("CANCELLED")).state, rvirt_api::MigrationState::Cancelled);
    assert_ne!(get("CANCEL-DEST-EXIT"), "0", "the destination of a cancelled migration ends, failed");
    assert_eq!(get("AC-MIGRATE"), r#"{"ok":true}"#);
    let throttled = status(&get("AC-THROTTLED"));
    assert!(throttled.throttle_percent >= 20, "{throttled:?}");
    assert_eq!(get("D-EXIT"), "0", "{}", logs());
    let d_said = get("D-SAID");
    assert!(d_said.contains("rvirt-vmm: migrated: guest paused"), "{d_said}");
    log(&format!("with auto-converge (last throttle {}%): {d_said}", throttled.throttle_percent));
    let d_last: u64 = get("D-LAST-TICK").parse().unwrap();
    assert_eq!(numbers(&a, "TICK").first(), Some(&(d_last + 1)), "{}", logs());
    assert_eq!(get("A-EXIT"), "0");
}
