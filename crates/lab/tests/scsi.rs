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
# Not jailed: this run inserts a disc by path through the VMM's own API,
# which a jailed VMM cannot open (rvirtd passes a descriptor instead; its
# host tests cover that on a jailed VMM).
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

/// What the guest booted from a CD reports: the disc it booted from and the
/// SCSI disk beside it.
const CD_GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /mnt
INSMOD
for i in $(seq 1 100); do [ -e /sys/block/sda ] && [ -e /sys/block/sr0 ] && break; sleep 0.1; done
echo "@@L2-CMDLINE=$(sed -n 's/.*rvirt.iso=\([a-z]*\).*/\1/p' /proc/cmdline)"
mount -t iso9660 -o ro /dev/sr0 /mnt && echo "@@L2-SR0-HAS=$(ls /mnt/isolinux | grep -c isolinux.bin)" && umount /mnt
echo "@@L2-SDA-HEAD=$(dd if=/dev/sda bs=16 count=1 2>/dev/null)"
poweroff -f
"#;

/// A plain and a hybrid El Torito ISO with ISOLINUX, Debian's kernel and an
/// initramfs (made with xorriso from Debian packages) boot from the CD-ROM
/// drive through SeaBIOS; the booted guest reads its disc and the SCSI disk.
#[test]
fn linux_boots_from_plain_and_hybrid_isos_on_the_cdrom() {
    let lab = Lab::get().unwrap();
    let modules = lab.virtio_modules(&["virtio_scsi"]);
    let init = CD_GUEST.replace("INSMOD\n", &insmod_lines(&modules));
    let dir = std::env::temp_dir().join(format!("rvirt-cd-lab-{}", std::process::id()));
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("isolinux")).unwrap();
    std::fs::copy("/usr/lib/ISOLINUX/isolinux.bin", tree.join("isolinux/isolinux.bin")).unwrap();
    std::fs::copy("/usr/lib/syslinux/modules/bios/ldlinux.c32", tree.join("isolinux/ldlinux.c32")).unwrap();
    std::fs::copy(&lab.kernel, tree.join("vmlinuz")).unwrap();
    std::fs::write(tree.join("initrd.gz"), l2_initramfs(&init, &modules).unwrap()).unwrap();
    let mut spec = L1Spec::new("cd-boot", CD_L1);
    for (name, hybrid) in [("plain", false), ("hybrid", true)] {
        std::fs::write(
            tree.join("isolinux/isolinux.cfg"),
            format!("SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /vmlinuz\n  INITRD /initrd.gz\n  APPEND console=ttyS0 panic=-1 rvirt.iso={name}\n"),
        )
        .unwrap();
        let iso = dir.join(format!("{name}.iso"));
        let mut cmd = std::process::Command::new("xorriso");
        cmd.args(["-as", "mkisofs", "-quiet", "-R", "-J", "-V", "RVIRT_CD", "-o"]).arg(&iso);
        if hybrid {
            cmd.args(["-isohybrid-mbr", "/usr/lib/ISOLINUX/isohdpfx.bin"]);
        }
        cmd.args(["-c", "isolinux/boot.cat", "-b", "isolinux/isolinux.bin", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table"]).arg(&tree);
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "xorriso: {}", String::from_utf8_lossy(&o.stderr));
        spec = spec.file(&iso, &format!("l2/{name}.iso"));
    }
    let spec = spec.file(rvirt_lab::SEABIOS, &rvirt_lab::SEABIOS[1..]);
    let out = lab.run(&spec).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out.check_l1().unwrap();
    let v = out.values();
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| panic!("no {k}:\n{}", out.tail(80)));
    for name in ["plain", "hybrid"] {
        let k = |s: &str| format!("{}-{s}", name.to_uppercase());
        log(&format!("{name}: exit {} cmdline {} isolinux {} sda {}", get(&k("EXIT")), get(&k("CMDLINE")), get(&k("SR0-HAS")), get(&k("SDA-HEAD"))));
        assert_eq!(get(&k("EXIT")), "0", "{name}: the guest powered off");
        assert_eq!(get(&k("ISOLINUX")), "1", "{name}: ISOLINUX ran from the disc");
        assert_eq!(get(&k("CMDLINE")), name, "{name}: the kernel ISOLINUX loaded from this disc");
        assert_eq!(get(&k("SR0-HAS")), "1", "{name}: the guest reads the disc it booted from");
        assert_eq!(get(&k("SDA-HEAD")), "rvirt-scsi-disk!", "{name}: and the SCSI disk beside it");
    }
}

const CD_L1: &str = r#"
printf 'rvirt-scsi-disk!' > /tmp/sd.raw
truncate -s 16M /tmp/sd.raw
for name in plain hybrid; do
  N=$(echo $name | tr a-z A-Z)
  rvirt-vmm --jail --memory 512M --cpus 1 --boot-order dc --disk path=/l2/$name.iso,media=cdrom --disk path=/tmp/sd.raw,bus=scsi \
    --serial file=/tmp/$name.log </dev/null > /tmp/vmm-$name.log 2>&1 &
  vmm=$!
  n=0
  while kill -0 $vmm 2>/dev/null; do sleep 0.2; n=$((n + 1)); [ $((n % 50)) = 0 ] && echo "[cd test] $name running"; done
  wait $vmm
  echo "@@$N-EXIT=$?"
  grep -q ISOLINUX /tmp/$name.log && echo "@@$N-ISOLINUX=1"
  sed -n "s/.*@@L2-\([A-Z0-9-]*\)=\(.*\)/@@$N-\1=\2/p" /tmp/$name.log | tr -d '\r'
  grep -q "@@L2-CMDLINE" /tmp/$name.log || { tail -c 3000 /tmp/$name.log; tail -20 /tmp/vmm-$name.log; }
done
"#;
