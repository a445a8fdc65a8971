//! Lab test of virtio-scsi: Debian's kernel (its own virtio_scsi, sd and sr
//! modules) finds a SCSI disk (`sda`) and a CD-ROM drive (`sr0`), writes a
//! filesystem on the disk, mounts the disc (a cloud-init seed written by
//! rvirt-block's ISO 9660 writer) and reads it whole, and sees the host
//! eject it and insert another while it runs.

use rvirt_lab::{insmod_lines, l2_initramfs, log, L1Spec, Lab};

const GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /mnt /tmp && mount -t tmpfs tmpfs /tmp
INSMOD
for i in $(seq 1 100); do [ -e /sys/block/sda ] && [ -e /sys/block/sr0 ] && break; sleep 0.1; done
echo "@@L2-BLOCKS=$(ls /sys/block | grep -E '^(sd|sr|vd)' | tr '\n' ' ')"
echo "@@L2-SDA-MODEL=$(cat /sys/block/sda/device/vendor | tr -d ' ')/$(cat /sys/block/sda/device/model | tr -d ' ')"
echo "@@L2-SR0-MODEL=$(cat /sys/block/sr0/device/vendor | tr -d ' ')/$(cat /sys/block/sr0/device/model | tr -d ' ')"
echo "@@L2-SDA-SECTORS=$(cat /sys/block/sda/size)"
echo "@@L2-SDA-DISCARD=$(cat /sys/block/sda/queue/discard_max_bytes)"
echo "@@L2-SR0-RO=$(cat /sys/block/sr0/ro)"
echo "@@L2-SR0-SUM=$(dd if=/dev/sr0 bs=2048 2>/dev/null | sha256sum | cut -d' ' -f1)"
# The disc is a cloud-init seed written by rvirt-block: its files by their real names.
mount -t iso9660 -o ro /dev/sr0 /mnt && {
  echo "@@L2-SEED-FILES=$(ls /mnt | tr '\n' ' ')"
  echo "@@L2-SEED-USER-DATA=$(head -n 1 /mnt/user-data)"
  echo "@@L2-SEED-LABEL=$(dd if=/dev/sr0 bs=1 skip=32808 count=6 2>/dev/null)"
  umount /mnt
}
dd if=/dev/urandom of=/tmp/payload bs=1M count=3 2>/dev/null
echo "@@L2-PAYLOAD=$(sha256sum /tmp/payload | cut -d' ' -f1)"
mke2fs -q /dev/sda && mount -t ext4 /dev/sda /mnt && cp /tmp/payload /mnt/payload && sync && umount /mnt && echo "@@L2-SDA-WROTE=ok"
mount -t ext4 /dev/sda /mnt && echo "@@L2-SDA-READ=$(sha256sum /mnt/payload | cut -d' ' -f1)" && umount /mnt
echo "@@L2-READY-FOR-EJECT=1"
# The host ejects: the next open of the drive finds no medium.
for i in $(seq 1 600); do dd if=/dev/sr0 of=/dev/null bs=2048 count=1 2>/dev/null || break; sleep 0.2; done
echo "@@L2-SAW-EJECT=$(dd if=/dev/sr0 of=/dev/null bs=2048 count=1 2>&1 | grep -o -i 'no medium found' | head -1)"
# The host inserts another disc: reads come from it.
for i in $(seq 1 600); do dd if=/dev/sr0 of=/dev/null bs=2048 count=1 2>/dev/null && break; sleep 0.2; done
echo "@@L2-NEW-SR0-SUM=$(dd if=/dev/sr0 bs=2048 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo "@@L2-ERRORS=$(dmesg | grep -c -i -E 'critical medium error|I/O error, dev sda|Buffer I/O error on dev sda')"
poweroff -f
"#;

const L1: &str = r#"
dd if=/dev/urandom of=/tmp/sd.raw bs=1M count=64 2>/dev/null
cp /l2/seed.iso /tmp/disc1.iso
dd if=/dev/urandom of=/tmp/disc2.iso bs=2048 count=700 2>/dev/null
echo "@@DISC1=$(sha256sum /tmp/disc1.iso | cut -d' ' -f1)"
echo "@@DISC2=$(sha256sum /tmp/disc2.iso | cut -d' ' -f1)"
rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz --memory 512M --cpus 2 --cmdline "console=ttyS0 panic=-1" \
  --serial file=/tmp/l2.log --api-socket /tmp/vm.sock \
  --disk path=/tmp/sd.raw,bus=scsi,serial=scsi-disk-0 --disk path=/tmp/disc1.iso,media=cdrom </dev/null &
vmm=$!
wait_for() { for i in $(seq 1 900); do grep -q "$1" /tmp/l2.log 2>/dev/null && return 0; sleep 0.2; done; return 1; }
wait_for '@@L2-READY-FOR-EJECT'
echo "@@API-NOT-A-CD=$(rvirt-lab-api /tmp/vm.sock '{"command":"change-media","device":"disk0"}')"
# Linux's sr locks the tray while the drive is open (the guest polls it):
# an eject then fails, as on QEMU, and is tried again.
for i in $(seq 1 50); do
  r=$(rvirt-lab-api /tmp/vm.sock '{"command":"change-media","device":"disk1"}') && break
  echo "$r" | grep -q 'locked the tray' && echo "@@API-EJECT-LOCKED=1"
  sleep 0.1
done
echo "@@API-EJECT=$r"
wait_for '@@L2-SAW-EJECT'
echo "@@API-INSERT=$(rvirt-lab-api /tmp/vm.sock '{"command":"change-media","device":"disk1","path":"/tmp/disc2.iso"}')"
wait $vmm
echo "@@VMM-EXIT=$?"
echo "@@BEGIN-L2"
cat /tmp/l2.log
echo "@@END-L2"
"#;

#[test]
fn linux_drives_scsi_disks_and_a_cdrom_whose_disc_changes() {
    let lab = Lab::get().unwrap();
    let modules = lab.virtio_modules(&["virtio_scsi"]);
    let init = GUEST.replace("INSMOD\n", &insmod_lines(&modules));
    let spec = L1Spec::new("virtio-scsi", L1)
        .file(&lab.kernel, "l2/vmlinuz")
        .blob("l2/initrd.gz", l2_initramfs(&init, &modules).unwrap())
        .blob("l2/seed.iso", rvirt_block::iso9660::cloud_init_seed(b"#cloud-config\nhostname: seeded\n", None, None).unwrap());
    let out = lab.run(&spec).unwrap();
    out.check_l1().unwrap();
    let v = out.values();
    for (k, val) in &v {
        log(&format!("{k}={val}"));
    }
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| panic!("no {k}:\n{}", out.tail(80)));
    assert!(v.get("L2-INSMOD-FAILED").is_none(), "{}", out.tail(60));
    assert_eq!(get("L2-BLOCKS"), "sda sr0");
    assert_eq!(get("L2-SDA-MODEL"), "RVIRT/VIRTUALDISK");
    assert_eq!(get("L2-SR0-MODEL"), "RVIRT/VIRTUALCD-ROM");
    assert_eq!(get("L2-SDA-SECTORS"), "131072", "64 MiB");
    assert_ne!(get("L2-SDA-DISCARD"), "0", "UNMAP offered through the VPD pages");
    assert_eq!(get("L2-SR0-RO"), "1");
    assert_eq!(get("L2-SR0-SUM"), get("DISC1"), "the guest reads the whole disc");
    assert_eq!(get("L2-SEED-FILES"), "meta-data user-data", "Rock Ridge names in the guest");
    assert_eq!(get("L2-SEED-USER-DATA"), "#cloud-config");
    assert_eq!(get("L2-SEED-LABEL"), "cidata", "the volume id cloud-init looks for, read through the drive");
    assert_eq!(get("L2-SDA-WROTE"), "ok");
    assert_eq!(get("L2-SDA-READ"), get("L2-PAYLOAD"));
    assert!(get("API-NOT-A-CD").contains("only a CD-ROM drive has removable media"), "{}", get("API-NOT-A-CD"));
    assert_eq!(get("API-EJECT"), r#"{"ok":true}"#);
    assert_eq!(get("L2-SAW-EJECT").to_lowercase(), "no medium found");
    assert_eq!(get("API-INSERT"), r#"{"ok":true}"#);
    assert_eq!(get("L2-NEW-SR0-SUM"), get("DISC2"), "the guest reads the new disc");
    assert_eq!(get("L2-ERRORS"), "0", "no errors on sda:\n{}", out.section("L2").unwrap_or_default());
    assert_eq!(get("VMM-EXIT"), "0");
}
