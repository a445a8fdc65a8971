//! Lab tests of the virtio devices: Debian's stock kernel (its own virtio
//! modules, loaded by the L2 init) drives rvirt-vmm's virtio-pci devices.

use rvirt_lab::{insmod_lines, l2_initramfs, log, L1Spec, Lab, LabOutput};

/// The start of every guest's init: the usual mounts; the virtio modules are loaded after it.
const MOUNTS: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /mnt /tmp
mount -t tmpfs tmpfs /tmp
"#;

fn guest_initrd(lab: &Lab, drivers: &[&str], script: &str) -> Vec<u8> {
    let modules = lab.virtio_modules(drivers);
    let init = format!("{MOUNTS}{}{script}", insmod_lines(&modules));
    l2_initramfs(&init, &modules).unwrap()
}

fn show(out: &LabOutput) {
    for line in out.console.lines().filter(|l| l.contains("@@")) {
        log(line);
    }
}

/// L2: a filesystem on a raw disk and on a qcow2 disk, a read-only disk,
/// the disk serial, discard.
const STORAGE_GUEST: &str = r#"
echo "@@L2-DISKS=$(ls /sys/block | grep vd | tr '\n' ' ')"
echo "@@L2-VDA-SERIAL=$(cat /sys/block/vda/serial)"
echo "@@L2-VDB-RO=$(cat /sys/block/vdb/ro)"
echo "@@L2-IRQ-MODE=$(grep -c PCI-MSI /proc/interrupts)"
dd if=/dev/urandom of=/tmp/payload bs=1M count=3 2>/dev/null
echo "@@L2-PAYLOAD=$(sha256sum /tmp/payload | cut -d' ' -f1)"
for d in vda vdc; do
  mke2fs -q /dev/$d && mount -t ext4 /dev/$d /mnt && cp /tmp/payload /mnt/payload && sync && umount /mnt && echo "@@L2-WROTE-$d=ok"
done
echo "@@L2-VDB-HEAD=$(dd if=/dev/vdb bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync 2>/dev/null; then echo "@@L2-RO-WRITE=accepted"; else echo "@@L2-RO-WRITE=refused"; fi
blkdiscard -o 33554432 -l 4194304 /dev/vda && echo "@@L2-DISCARD=ok"
sync
poweroff -f
"#;

const STORAGE_L1: &str = r#"
insmod /lib/modules/loop.ko
mkdir -p /mnt
truncate -s 64M /tmp/disk.raw
dd if=/dev/urandom of=/tmp/ro.raw bs=1M count=1 2>/dev/null
ro_before=$(sha256sum /tmp/ro.raw | cut -d' ' -f1)
echo "@@RO-HEAD=$(dd if=/tmp/ro.raw bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
qemu-img create -q -f qcow2 /tmp/disk.qcow2 64M
# Data in the discarded range must come back as a hole.
dd if=/dev/urandom of=/tmp/disk.raw bs=1M seek=32 count=4 conv=notrunc 2>/dev/null
echo "@@BEGIN-L2"
rvirt-vmm --jail --kernel /l2/vmlinuz --initrd /l2/initrd.gz --memory 512M --cpus 2 \
  --cmdline "console=ttyS0 panic=-1" \
  --disk path=/tmp/disk.raw,serial=rvirt-disk-0 --disk path=/tmp/ro.raw,readonly=on \
  --disk path=/tmp/disk.qcow2,format=qcow2 </dev/null
echo "@@VMM-EXIT=$?"
echo "@@END-L2"
mount -o loop,ro /tmp/disk.raw /mnt && echo "@@HOST-RAW-PAYLOAD=$(sha256sum /mnt/payload | cut -d' ' -f1)"; umount /mnt
echo "@@RO-UNCHANGED=$([ "$(sha256sum /tmp/ro.raw | cut -d' ' -f1)" = "$ro_before" ] && echo yes || echo no)"
echo "@@RAW-ALLOCATED-KB=$(du -k /tmp/disk.raw | cut -f1)"
qemu-img check /tmp/disk.qcow2 > /tmp/check.txt 2>&1; echo "@@QCOW2-CHECK-EXIT=$?"
cat /tmp/check.txt
qemu-img convert -O raw /tmp/disk.qcow2 /tmp/q.raw
mount -o loop,ro /tmp/q.raw /mnt && echo "@@HOST-QCOW2-PAYLOAD=$(sha256sum /mnt/payload | cut -d' ' -f1)"; umount /mnt
"#;

#[test]
fn guest_filesystems_on_raw_and_qcow2_disks_reach_the_host_images() {
    let lab = Lab::get().unwrap();
    let initrd = guest_initrd(lab, &["virtio_blk"], STORAGE_GUEST);
    let spec = L1Spec::new("virtio-storage", STORAGE_L1)
        .file(&lab.kernel, "l2/vmlinuz")
        .file(lab.module_in_tree("drivers/block/loop.ko"), "lib/modules/loop.ko")
        .binary("/usr/bin/qemu-img", "usr/bin/qemu-img")
        .blob("l2/initrd.gz", initrd);
    let out = lab.run(&spec).unwrap();
    out.check_l1().unwrap();
    show(&out);
    let v = out.values();
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| panic!("no {k} in output:\n{}", out.tail(80)));
    assert_eq!(get("VMM-EXIT"), "0");
    assert!(v.get("L2-INSMOD-FAILED").is_none(), "{}", out.tail(60));
    assert_eq!(get("L2-DISKS").split_whitespace().collect::<Vec<_>>(), ["vda", "vdb", "vdc"]);
    assert_eq!(get("L2-VDA-SERIAL"), "rvirt-disk-0");
    assert_eq!(get("L2-VDB-RO"), "1");
    assert_ne!(get("L2-IRQ-MODE"), "0", "virtio interrupts use MSI-X");
    let payload = get("L2-PAYLOAD");
    assert_eq!(get("L2-WROTE-vda"), "ok");
    assert_eq!(get("L2-WROTE-vdc"), "ok");
    assert_eq!(get("HOST-RAW-PAYLOAD"), payload, "the file read back from the raw image");
    assert_eq!(get("HOST-QCOW2-PAYLOAD"), payload, "the file read back from the qcow2 image");
    assert_eq!(get("QCOW2-CHECK-EXIT"), "0", "qemu-img check of the guest-written qcow2:\n{}", out.tail(30));
    assert_eq!(get("L2-VDB-HEAD"), get("RO-HEAD"), "the guest reads the read-only disk");
    assert_eq!(get("L2-RO-WRITE"), "refused");
    assert_eq!(get("RO-UNCHANGED"), "yes");
    assert_eq!(get("L2-DISCARD"), "ok");
    // 4 MiB of data the guest discarded plus the 3 MiB payload and ext2
    // metadata: without the hole punched the file would hold over 8 MiB.
    let kb: u64 = get("RAW-ALLOCATED-KB").parse().unwrap();
    assert!(kb < 8 * 1024, "discard left {kb} KiB allocated");
}

/// L2 for the device test, booted with `pci=nomsi` so every interrupt takes
/// the INTx path: network (ping and a TCP transfer), hwrng, hvc0, balloon.
const DEVICES_GUEST: &str = r#"
echo "@@L2-IRQ-MSI=$(grep -c PCI-MSI /proc/interrupts)"
echo "@@L2-IRQ-IOAPIC=$(grep -c 'IO-APIC.*virtio' /proc/interrupts)"
echo "@@L2-MAC=$(cat /sys/class/net/eth0/address)"
echo "@@L2-FEATURES=$(cat /sys/class/net/eth0/device/features)"
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
echo "@@L2-RNG=$(cat /sys/class/misc/hw_random/rng_current)"
echo "@@L2-HWRNG-BYTES=$(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c)"
echo hello-from-hvc0 > /dev/hvc0
dd if=/dev/urandom of=/tmp/blob bs=1M count=8 2>/dev/null
echo "@@L2-BLOB=$(sha256sum /tmp/blob | cut -d' ' -f1)"
for i in $(seq 1 60); do ping -c 1 -W 1 10.0.2.1 >/dev/null 2>&1 && break; done
echo "@@L2-PING=$(ping -c 3 10.0.2.1 | grep -o '[0-9]* packets received')"
nc 10.0.2.1 5000 < /tmp/blob && echo "@@L2-SENT=ok"
rm /tmp/blob
# Host -> guest: nc's stdin must stay open (it ends the connection at EOF)
# without a pipeline the shell would wait for; a read-write fifo never ends.
mkfifo /tmp/open; exec 3<>/tmp/open
nc 10.0.2.1 5001 <&3 > /tmp/got
exec 3>&-
echo "@@L2-GOT=$(sha256sum /tmp/got | cut -d' ' -f1)"
echo "@@L2-GOT-BYTES=$(wc -c < /tmp/got)"
rm /tmp/got
# Dirty 200 MiB of RAM, then free it: the host still holds those pages.
dd if=/dev/zero of=/tmp/fill bs=1M count=200 2>/dev/null
rm /tmp/fill
echo "@@L2-MEMFREE-BEFORE=$(awk '/MemFree/ {print $2}' /proc/meminfo)"
echo "@@L2-FILLED=1"
for i in $(seq 1 60); do
  sleep 1
  b=$(cat /sys/bus/virtio/drivers/virtio_balloon/virtio*/balloon 2>/dev/null)
  f=$(awk '/MemFree/ {print $2}' /proc/meminfo)
  [ "$f" -lt 200000 ] && break
done
echo "@@L2-MEMFREE-AFTER=$(awk '/MemFree/ {print $2}' /proc/meminfo)"
echo "@@L2-DONE=1"
for i in $(seq 1 60); do [ "$(cat /sys/class/net/eth0/carrier)" = 0 ] && break; sleep 0.5; done
echo "@@L2-CARRIER=$(cat /sys/class/net/eth0/carrier)"
sleep 1000
"#;

const DEVICES_L1: &str = r#"
insmod /lib/modules/tun.ko
rvirt-vmm --jail --kernel /l2/vmlinuz --initrd /l2/initrd.gz --memory 512M --cpus 2 \
  --cmdline "console=ttyS0 panic=-1 pci=nomsi" --serial file=/tmp/l2.log --api-socket /tmp/vm.sock \
  --net tap=tap0,mac=52:54:00:12:34:56 --rng --balloon --console file=/tmp/hvc0.log </dev/null &
vmm=$!
# $vmm is the jail's reaper; the VMM itself (guest memory, devices) is its child.
child_of() { for p in /proc/[0-9]*; do [ "$(awk '{print $4}' $p/stat 2>/dev/null)" = "$1" ] && echo ${p#/proc/}; done; }
for i in $(seq 1 100); do inner=$(child_of $vmm | head -1); [ -n "$inner" ] && break; sleep 0.1; done
echo "@@JAILED-SECCOMP=$(awk '/^Seccomp:/ {print $2}' /proc/$inner/status)"
echo "@@JAILED-CAPEFF=$(awk '/^CapEff:/ {print $2}' /proc/$inner/status)"
for i in $(seq 1 100); do [ -e /sys/class/net/tap0 ] && break; sleep 0.2; done
ip addr add 10.0.2.1/24 dev tap0
ip link set tap0 up
# The listener's stdin must stay open: busybox nc ends the connection at stdin EOF.
sleep 600 | nc -l -p 5000 > /tmp/recv &
listener=$!
dd if=/dev/urandom of=/tmp/hblob bs=1M count=8 2>/dev/null
echo "@@HOST-BLOB=$(sha256sum /tmp/hblob | cut -d' ' -f1)"
nc -l -p 5001 < /tmp/hblob &
for i in $(seq 1 600); do grep -q '@@L2-FILLED' /tmp/l2.log 2>/dev/null && break; sleep 0.5; done
for i in $(seq 1 120); do kill -0 $listener 2>/dev/null || break; sleep 0.5; done
echo "@@HOST-RECV=$(sha256sum /tmp/recv | cut -d' ' -f1)"
echo "@@HOST-RECV-BYTES=$(wc -c < /tmp/recv)"
echo "@@RSS-BEFORE-KB=$(awk '/VmRSS/ {print $2}' /proc/$inner/status)"
echo "@@API-BALLOON=$(rvirt-lab-api /tmp/vm.sock '{"command":"balloon","target_bytes":268435456}')"
for i in $(seq 1 600); do grep -q '@@L2-DONE' /tmp/l2.log 2>/dev/null && break; sleep 0.5; done
echo "@@RSS-AFTER-KB=$(awk '/VmRSS/ {print $2}' /proc/$inner/status)"
echo "@@API-LINK-DOWN=$(rvirt-lab-api /tmp/vm.sock '{"command":"set-link","device":"net0","up":false}')"
echo "@@API-LINK-BAD=$(rvirt-lab-api /tmp/vm.sock '{"command":"set-link","device":"net7","up":false}')"
for i in $(seq 1 120); do grep -q '@@L2-CARRIER' /tmp/l2.log 2>/dev/null && break; sleep 0.5; done
echo "@@API-STATUS=$(rvirt-lab-api /tmp/vm.sock status)"
echo "@@API-STATS=$(rvirt-lab-api /tmp/vm.sock stats)"
echo "@@HVC0=$(cat /tmp/hvc0.log)"
rvirt-lab-api /tmp/vm.sock stop >/dev/null
wait $vmm
echo "@@VMM-EXIT=$?"
echo "@@BEGIN-L2"
cat /tmp/l2.log
echo "@@END-L2"
"#;

#[test]
fn network_entropy_console_and_balloon_work_over_intx() {
    let lab = Lab::get().unwrap();
    let initrd = guest_initrd(lab, &["virtio_net", "virtio-rng", "virtio_console", "virtio_balloon"], DEVICES_GUEST);
    let spec = L1Spec::new("virtio-devices", DEVICES_L1)
        .file(&lab.kernel, "l2/vmlinuz")
        .file(lab.module_in_tree("drivers/net/tun.ko"), "lib/modules/tun.ko")
        .blob("l2/initrd.gz", initrd);
    let out = lab.run(&spec).unwrap();
    out.check_l1().unwrap();
    show(&out);
    let v = out.values();
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| panic!("no {k} in output:\n{}", out.tail(80)));
    assert!(v.get("L2-INSMOD-FAILED").is_none(), "{}", out.tail(60));
    assert_eq!(get("L2-IRQ-MSI"), "0", "pci=nomsi: no MSI-X");
    assert_ne!(get("L2-IRQ-IOAPIC"), "0", "virtio interrupts arrive over INTx");
    assert_eq!(get("L2-MAC"), "52:54:00:12:34:56");
    assert_eq!(get("L2-PING"), "3 packets received");
    assert_eq!(get("L2-SENT"), "ok");
    assert_eq!(get("HOST-RECV"), get("L2-BLOB"), "8 MiB over TCP arrived intact");
    assert_eq!(get("L2-GOT"), get("HOST-BLOB"), "8 MiB host->guest over TCP arrived intact");
    assert_eq!(get("L2-GOT-BYTES"), "8388608");
    let features = get("L2-FEATURES");
    assert_eq!(features.as_bytes().get(15), Some(&b'1'), "the guest took mergeable receive buffers: {features}");
    assert_eq!(get("L2-RNG"), "virtio_rng.0");
    assert_eq!(get("L2-HWRNG-BYTES"), "256");
    assert_eq!(get("HVC0"), "hello-from-hvc0");
    assert_eq!(get("API-BALLOON"), r#"{"ok":true}"#);
    let before: u64 = get("L2-MEMFREE-BEFORE").parse().unwrap();
    let after: u64 = get("L2-MEMFREE-AFTER").parse().unwrap();
    assert!(after + 200 * 1024 < before, "inflating 256 MiB lowers the guest's free memory: {before} -> {after} kB");
    assert_eq!(get("JAILED-SECCOMP"), "2", "the VMM runs under its seccomp lists");
    assert_eq!(get("JAILED-CAPEFF"), "0000000000000000", "and without capabilities");
    let rss_before: u64 = get("RSS-BEFORE-KB").parse().unwrap();
    let rss_after: u64 = get("RSS-AFTER-KB").parse().unwrap();
    assert!(rss_after + 100 * 1024 < rss_before, "the VMM returned memory to the host: RSS {rss_before} -> {rss_after} kB");
    assert!(get("API-STATUS").contains(r#""target_bytes":268435456"#), "{}", get("API-STATUS"));
    let stats: serde_json::Value = serde_json::from_str(&get("API-STATS")).unwrap();
    let dev = |name: &str, field: &str| stats["stats"]["devices"][name][field].as_u64().unwrap_or(0);
    assert!(dev("net0", "bytes_from_guest") > 8 << 20, "{stats}");
    assert!(dev("net0", "bytes_to_guest") > 8 << 20, "{stats}");
    assert!(dev("rng", "bytes_to_guest") >= 256);
    assert!(dev("console", "bytes_from_guest") >= 16);
    assert!(dev("balloon", "bytes_from_guest") >= 200 << 20);
    assert_eq!(get("API-LINK-DOWN"), r#"{"ok":true}"#);
    assert!(get("API-LINK-BAD").contains("no network device named 'net7'"));
    assert_eq!(get("L2-CARRIER"), "0", "the guest saw the link go down");
    assert_eq!(get("VMM-EXIT"), "0");
}
