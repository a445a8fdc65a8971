//! Lab test of domain snapshots and saves through rvirtd and rvirt with a
//! stock Debian guest, in one L1. The guest counts once a second (each
//! count also written to its own sector of its qcow2 disk), keeps a file in
//! tmpfs and runs a second program; told through a shareable command disk,
//! it changes the file, writes a marker on its disk and starts a third
//! program. A snapshot taken before the change and reverted to after it
//! brings back the file, the disk without the marker, the programs that ran
//! then and not the one started since, and the count from that moment.
//! `qemu-img snapshot -l` sees the disk's snapshots and `qemu-img check`
//! finds the image clean. `save` → `restore` and `managedsave` → `start`
//! keep the count going; a `--disk-only` snapshot of the running guest
//! leaves the image at that count and the overlay takes the rest; the
//! snapshot tree survives a daemon restart.

use rvirt_lab::counting::{self, numbers, words};
use rvirt_lab::{insmod_lines, l2_initramfs, log, L1Spec, Lab};

/// The guest: markers are `%%` so they stay out of the L1 script's values.
const GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
MODULES
echo original > /tmp/file
(j=0; while true; do j=$((j + 1)); echo "%%EARLY=$j"; sleep 1; done) &
i=0
while true; do
  i=$((i + 1))
  echo "%%TICK=$i"
  printf 'tick %d' $i | dd of=/dev/vda bs=512 seek=$i count=1 conv=sync 2>/dev/null
  sync
  echo 3 > /proc/sys/vm/drop_caches
  echo "%%FILE=$(cat /tmp/file)"
  echo "%%MARK=[$(dd if=/dev/vda bs=512 skip=4000 count=1 2>/dev/null | tr -d '\000' | head -c 8)]"
  echo "%%LATE=$(cat /tmp/late.pid 2>/dev/null || echo none)"
  cmd=$(dd if=/dev/vdb bs=512 count=1 2>/dev/null | tr -d '\000 ' | head -c 16)
  if [ "$cmd" = "change" ] && [ ! -e /tmp/changed ]; then
    touch /tmp/changed
    echo changed > /tmp/file
    printf 'after' | dd of=/dev/vda bs=512 seek=4000 count=1 conv=sync 2>/dev/null
    sync
    (while true; do echo "%%LATE-RUNS"; sleep 1; done) &
    echo $! > /tmp/late.pid
    echo "%%CHANGED=$i"
  fi
  sleep 1
done
"#;

/// After [`counting::SHELL`].
const SCRIPT: &str = r#"
mkdir -p /var/lib /run
start_daemon() {
  rvirtd --allow-path /l2 --allow-path /tmp >> /tmp/rvirtd.log 2>&1 &
  for i in $(seq 1 100); do rvirt list >/dev/null 2>&1 && break; sleep 0.1; done
}
# Waits up to 5 minutes for $2 to appear $3 times in log $1.
wait_count() {
  for i in $(seq 1 600); do [ "$(grep -c "$2" "$1")" -ge "$3" ] && return 0; sleep 0.5; [ $((i % 40)) = 0 ] && echo "[lab] waiting for $2 in $1"; done
  return 1
}
cmd() { printf '%s' "$1" | dd of=/tmp/cmd.raw bs=512 count=1 conv=notrunc,sync 2>/dev/null; sync; }
# The log from byte $2 on, as a section named $1.
section() { echo "@@BEGIN-$1"; tail -c +$(($2 + 1)) /tmp/snap.log; echo "@@END-$1"; }
start_daemon
qemu-img create -q -f qcow2 /tmp/vda.qcow2 64M
truncate -s 1M /tmp/cmd.raw
cat > /tmp/snap.xml <<EOF
<domain type='kvm'>
  <name>snap</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>/l2/vmlinuz</kernel>
    <initrd>/l2/initrd.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/tmp/vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/tmp/cmd.raw'/><target dev='vdb' bus='virtio'/><shareable/></disk>
    <serial type='file'><source path='/tmp/snap.log'/></serial>
  </devices>
</domain>
EOF
echo "@@DEFINE=$(rvirt define /tmp/snap.xml 2>&1)"
echo "@@OFF=$(rvirt snapshot-create-as snap off 'before the first boot' 2>&1)"
echo "@@START=$(rvirt start snap 2>&1)"
wait_tick /tmp/snap.log 6 || echo "@@STALLED-BOOT=1"
echo "@@BEFORE-S1=$(ticks /tmp/snap.log)"
echo "@@S1=$(rvirt snapshot-create-as snap s1 'before the change' 2>&1)"
echo "@@AFTER-S1=$(ticks /tmp/snap.log)"
cmd change
wait_count /tmp/snap.log '%%LATE-RUNS' 3 || echo "@@STALLED-CHANGE=1"
wait_count /tmp/snap.log 'MARK=\[after\]' 1 || echo "@@STALLED-MARK=1"
cmd none
echo "@@QEMU-IMG-SNAPSHOTS=$(qemu-img snapshot -U -l /tmp/vda.qcow2 | awk 'NR > 2 {print $2}' | tr '\n' ' ')"
pos=$(wc -c < /tmp/snap.log)
echo "@@REVERT=$(rvirt snapshot-revert snap s1 2>&1)"
echo "@@STATE-AFTER-REVERT=$(rvirt domstate --reason snap)"
wait_count /tmp/snap.log '%%TICK' $(( $(grep -c '%%TICK' /tmp/snap.log) + 6 )) || echo "@@STALLED-REVERT=1"
section afterrevert $pos
echo "@@S2=$(rvirt snapshot-create-as snap s2 2>&1)"

echo "@@SAVE=$(rvirt save snap /tmp/snap.save 2>&1 | tr '\n' ' ')"
last=$(ticks /tmp/snap.log); pos=$(wc -c < /tmp/snap.log)
echo "@@SAVED-STATE=$(rvirt domstate --reason snap)"
sleep 3; echo "@@SAVED-GROWTH=$(( $(wc -c < /tmp/snap.log) - pos ))"
echo "@@SAVE-LAST=$last"
echo "@@RESTORE=$(rvirt restore /tmp/snap.save 2>&1)"
wait_tick /tmp/snap.log $((last + 3)) || echo "@@STALLED-RESTORE=1"
section afterrestore $pos

echo "@@MANAGEDSAVE=$(rvirt managedsave snap 2>&1 | tr '\n' ' ')"
last=$(ticks /tmp/snap.log); pos=$(wc -c < /tmp/snap.log)
echo "@@MANAGED-LIST=$(rvirt list --all --with-managed-save --name | tr '\n' ' ')"
echo "@@MANAGED-LAST=$last"
echo "@@MANAGED-START=$(rvirt start snap 2>&1)"
wait_tick /tmp/snap.log $((last + 3)) || echo "@@STALLED-MANAGED=1"
section aftermanaged $pos
echo "@@MANAGED-LIST-AFTER=$(rvirt list --all --with-managed-save --name | tr '\n' ' ')"

# A --disk-only snapshot of the running guest: its disk goes on in an overlay.
ext_tick=$(ticks /tmp/snap.log)
echo "@@EXT=$(rvirt snapshot-create-as snap ext --disk-only 2>&1)"
echo "@@EXT-TICK=$ext_tick"
wait_tick /tmp/snap.log $((ext_tick + 5)) || echo "@@STALLED-EXT=1"
echo "@@EXT-STATE=$(rvirt domstate snap)"
echo "@@EXT-DISK=$(rvirt domblklist snap | awk '$1 == "vda" {print $2}')"

kill -9 $(pidof rvirtd); sleep 1
start_daemon
echo "@@TREE-AFTER-RESTART=$(rvirt snapshot-list snap --parent | tail -n +3 | awk 'NF {print $1 "<" $NF}' | tr '\n' ' ')"
echo "@@CURRENT-AFTER-RESTART=$(rvirt snapshot-current --name snap)"
echo "@@STATE-AFTER-RESTART=$(rvirt domstate snap)"
rvirt destroy snap > /dev/null
echo "@@QEMU-IMG-SNAPSHOTS-END=$(qemu-img snapshot -l /tmp/vda.qcow2 | awk 'NR > 2 {print $2}' | tr '\n' ' ')"
echo "@@QEMU-IMG-CHECK=$(qemu-img check /tmp/vda.qcow2 > /tmp/check.out 2>&1 && echo clean || cat /tmp/check.out)"
echo "@@QEMU-IMG-CHECK-EXT=$(qemu-img check /tmp/vda.ext > /tmp/check.out 2>&1 && echo clean || cat /tmp/check.out)"
# The sectors 1, 2, ... of a disk holding 'tick N' without a gap: the base stopped at the snapshot, the overlay went on.
disk_ticks() {
  n=0
  while [ "$(dd if=$1 bs=512 skip=$((n + 1)) count=1 2>/dev/null | tr -d '\000' | head -c 16)" = "tick $((n + 1))" ]; do n=$((n + 1)); done
  echo $n
}
qemu-img convert -O raw /tmp/vda.qcow2 /tmp/base.raw && qemu-img convert -O raw /tmp/vda.ext /tmp/top.raw
echo "@@BASE-TICKS=$(disk_ticks /tmp/base.raw)"
echo "@@TOP-TICKS=$(disk_ticks /tmp/top.raw)"
echo "@@BEGIN-log"; cat /tmp/snap.log; echo "@@END-log"
tail -20 /tmp/rvirtd.log
"#;

#[test]
fn a_reverted_debian_guest_has_its_files_programs_and_count_of_the_snapshot_and_saves_resume_counting() {
    let lab = Lab::get().unwrap();
    let modules = lab.virtio_modules(&["virtio_blk"]);
    let guest = l2_initramfs(&GUEST.replace("MODULES", &insmod_lines(&modules)), &modules).unwrap();
    let mut spec = L1Spec::new("domain-snapshots", &format!("{}{SCRIPT}", counting::SHELL))
        .file(&lab.kernel, "l2/vmlinuz")
        .blob("l2/initrd.gz", guest)
        .binary(&lab.rvirtd, "bin/rvirtd")
        .binary(&lab.rvirt, "bin/rvirt")
        .binary("/usr/bin/qemu-img", "usr/bin/qemu-img");
    spec.timeout = std::time::Duration::from_secs(1500);
    let out = lab.run(&spec).unwrap();
    out.check_l1().unwrap();
    let v = out.values();
    for (k, val) in &v {
        log(&format!("{k} = {val}"));
    }
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| panic!("no {k} in output:\n{}", out.tail(80)));
    let whole = out.section("log").unwrap_or_default();
    let tail = |s: &str| s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    if let Some(k) = v.keys().find(|k| k.starts_with("STALLED") || k.starts_with("INSMOD-FAILED")) {
        panic!("{k}\n{}", tail(&whole));
    }
    assert!(get("OFF").contains("Domain snapshot off created"), "{}", get("OFF"));
    assert!(get("S1").contains("Domain snapshot s1 created"), "{}", get("S1"));
    assert_eq!(get("QEMU-IMG-SNAPSHOTS").split_whitespace().collect::<Vec<_>>(), ["off", "s1"], "qemu-img sees the disk's snapshots");

    // Before the revert the guest had changed: its file, its disk, a new program.
    assert!(words(&whole, "FILE").contains(&"changed".to_string()), "{}", tail(&whole));
    assert!(words(&whole, "MARK").contains(&"[after]".to_string()));
    // After it: all as at the snapshot.
    assert_eq!(get("STATE-AFTER-REVERT"), "running (from snapshot)");
    let (before_s1, after_s1): (u64, u64) = (get("BEFORE-S1").parse().unwrap(), get("AFTER-S1").parse().unwrap());
    // The section starts before the revert: the old VMM's last lines (its counts well past the snapshot's, the
    // change being 3 s old) come first; the restored guest's start with its first count of the snapshot's moment.
    let section = out.section("afterrevert").unwrap_or_default();
    // Lines with their ends: the parsers read only lines that ended.
    let lines: Vec<&str> = section.split_inclusive('\n').collect();
    let cut = lines.iter().position(|l| numbers(l, "TICK").first().is_some_and(|t| *t <= after_s1 + 1)).unwrap_or_else(|| panic!("no count of the snapshot's moment after the revert:\n{}", tail(&section)));
    let after = lines[cut..].concat();
    let ticks = numbers(&after, "TICK");
    assert!(
        ticks.first().is_some_and(|t| *t > before_s1 && *t <= after_s1 + 1),
        "the count goes on from the snapshot's moment ({before_s1}..={after_s1}): {ticks:?}\n{}",
        tail(&after)
    );
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1) && ticks.len() >= 5, "{ticks:?}");
    let files = words(&after, "FILE");
    assert!(!files.is_empty() && files.iter().all(|f| f == "original"), "the tmpfs file is as it was: {files:?}");
    let marks = words(&after, "MARK");
    assert!(!marks.is_empty() && marks.iter().all(|m| m == "[]"), "the disk is as it was (no marker): {marks:?}");
    assert!(words(&after, "LATE").iter().all(|l| l == "none"), "the program started since is gone: {}", tail(&after));
    assert!(!after.contains("%%LATE-RUNS"), "the program started after the snapshot does not run:\n{}", tail(&after));
    assert!(numbers(&after, "EARLY").len() >= 3, "the program running at the snapshot runs again:\n{}", tail(&after));

    // save -> restore and managedsave -> start: the count goes on from where it stopped.
    assert!(get("SAVE").contains("saved to /tmp/snap.save"), "{}", get("SAVE"));
    assert_eq!(get("SAVED-STATE"), "shut off (saved)");
    assert_eq!(get("SAVED-GROWTH"), "0", "a saved guest prints nothing more");
    let last: u64 = get("SAVE-LAST").parse().unwrap();
    let restored = numbers(&out.section("afterrestore").unwrap_or_default(), "TICK");
    assert_eq!(restored.first(), Some(&(last + 1)), "restore: {restored:?} after {last}");
    assert!(get("MANAGEDSAVE").contains("state saved"), "{}", get("MANAGEDSAVE"));
    assert_eq!(get("MANAGED-LIST").trim(), "snap");
    let last: u64 = get("MANAGED-LAST").parse().unwrap();
    let resumed = numbers(&out.section("aftermanaged").unwrap_or_default(), "TICK");
    assert_eq!(resumed.first(), Some(&(last + 1)), "start after managedsave: {resumed:?} after {last}");
    assert_eq!(get("MANAGED-LIST-AFTER").trim(), "", "the managed save is used up by the start");

    // --disk-only while it runs: the image stops at that moment, the overlay takes what follows.
    assert!(get("EXT").contains("Domain snapshot ext created"), "{}", get("EXT"));
    assert_eq!(get("EXT-STATE"), "running");
    assert_eq!(get("EXT-DISK"), "/tmp/vda.ext");
    let ext_tick: u64 = get("EXT-TICK").parse().unwrap();
    let (base, top): (u64, u64) = (get("BASE-TICKS").parse().unwrap(), get("TOP-TICKS").parse().unwrap());
    assert!((ext_tick..=ext_tick + 1).contains(&base), "the image holds the counts up to the snapshot ({ext_tick}): {base}");
    assert!(top >= ext_tick + 5, "the overlay (over the image) holds every count since: {top}");
    assert_eq!(get("QEMU-IMG-CHECK-EXT"), "clean");

    // The tree and the current snapshot survive the daemon's restart; the running domain is adopted.
    let tree = get("TREE-AFTER-RESTART");
    for edge in ["s1<off", "s2<s1", "ext<s2"] {
        assert!(tree.contains(edge), "{edge} in {tree}");
    }
    assert_eq!(get("CURRENT-AFTER-RESTART"), "ext");
    assert_eq!(get("STATE-AFTER-RESTART"), "running");
    assert_eq!(get("QEMU-IMG-SNAPSHOTS-END").split_whitespace().collect::<Vec<_>>(), ["off", "s1", "s2"]);
    assert_eq!(get("QEMU-IMG-CHECK"), "clean");
}
