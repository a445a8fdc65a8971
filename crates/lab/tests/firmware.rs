//! Lab test: disks with their own bootloader boot through SeaBIOS under
//! rvirt-vmm, as the VMs users bring do. The disks are made here from Debian
//! packages (crates/lab/src/disk.rs): MBR, SYSLINUX on a FAT partition,
//! Debian's kernel, an ext4 root filesystem. One L1 boot: rvirt-vmm with
//! 1 and 2 vCPUs, a qcow2 copy, the boot order between two disks; then
//! rvirtd with a virt-install-style definition and `rvirt install --import`.

use std::collections::BTreeMap;

use rvirt_lab::{log, L1Spec, Lab};

/// The root filesystem's init: what the guest sees, then power off through ACPI.
const ROOT_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "@@L2-DISK=$(sed -n 's/.*rvirt.disk=\([a-z]*\).*/\1/p' /proc/cmdline)"
echo "@@L2-ROOT=$(awk '$2 == "/" {print $1}' /proc/mounts)"
echo "@@L2-NPROC=$(nproc)"
echo "@@L2-ACPI=$(ls /sys/firmware/acpi/tables | grep -c -E '^(APIC|DSDT|FACP)$')"
echo "@@L2-BIOS=$(cat /sys/class/dmi/id/bios_vendor)"
echo "@@L2-UUID=$(cat /sys/class/dmi/id/product_uuid)"
echo "@@L2-CANT-CLAIM=$(dmesg | grep -c "can't claim")"
echo "@@L2-UPTIME=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"#;

const UUID: &str = "5f1d3c2a-8e4b-4c6d-9a7f-0123456789ab";

/// Each run boots with its serial console in a file; the guest's `@@L2-`
/// lines come back as `@@RUN-KEY=` so the runs do not mix.
const SCRIPT: &str = r#"
boot() {
  run=$1; shift
  rm -f /tmp/serial.log
  t0=$(cut -d' ' -f1 /proc/uptime)
  rvirt-vmm --jail --memory 512M --serial file=/tmp/serial.log --uuid UUID "$@" </dev/null > /tmp/vmm-$run.log 2>&1 &
  vmm=$!
  # Progress on L1's console (the lab counts a silent console as a stall).
  n=0
  while kill -0 $vmm 2>/dev/null; do
    sleep 0.2; n=$((n + 1)); [ $((n % 50)) = 0 ] || continue; echo "[firmware test] $run: $(wc -c < /tmp/serial.log) bytes: $(tr -d '\r' < /tmp/serial.log | grep -v '^ *$' | tail -n 1 | cut -c1-100)"
  done
  wait $vmm
  echo "@@$run-EXIT=$?"
  t1=$(cut -d' ' -f1 /proc/uptime)
  echo "@@$run-SECONDS=$(awk -v a=$t0 -v b=$t1 'BEGIN {print b - a}')"
  grep -q SeaBIOS /tmp/serial.log && echo "@@$run-SEABIOS=1"
  grep -q SYSLINUX /tmp/serial.log && echo "@@$run-SYSLINUX=1"
  sed -n "s/.*@@L2-\([A-Z-]*\)=\(.*\)/@@$run-\1=\2/p" /tmp/serial.log | tr -d '\r'
  grep -q "@@L2-DISK" /tmp/serial.log || { echo "@@BEGIN-FAILED-$run"; tail -c 3000 /tmp/serial.log; tail -20 /tmp/vmm-$run.log; echo "@@END-FAILED-$run"; }
}
boot ONE --cpus 1 --disk path=/l2/a.raw
boot TWO --cpus 2 --disk path=/l2/a.raw
qemu-img convert -O qcow2 /l2/a.raw /tmp/a.qcow2
boot QCOW2 --cpus 2 --disk path=/tmp/a.qcow2,format=qcow2
boot ORDER --cpus 1 --disk path=/l2/a.raw --disk path=/l2/b.raw,boot=1

# rvirtd: a definition as virt-install writes it (no <kernel>, boot order on
# the disk, a screen rvirt does not have), and rvirt install --import.
mkdir -p /var/lib /run
rvirtd --allow-path /l2 --allow-path /tmp --allow-path /var/lib/rvirt > /tmp/rvirtd.log 2>&1 &
for i in $(seq 1 100); do rvirt list >/dev/null 2>&1 && break; sleep 0.1; done
cp /l2/b.raw /tmp/virt-install.raw
cat > /tmp/virt-install.xml <<XML
<domain type="kvm">
  <name>virt-install</name>
  <uuid>UUID</uuid>
  <memory>524288</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch="x86_64" machine="q35">hvm</type>
  </os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="raw"/>
      <source file="/tmp/virt-install.raw"/>
      <target dev="vda" bus="virtio"/>
      <boot order="1"/>
    </disk>
    <serial type="file"><source path="/tmp/virt-install.log"/></serial>
    <graphics type="vnc" port="-1"/>
    <video><model type="virtio"/></video>
  </devices>
</domain>
XML
domain() {
  run=$1; dom=$2; log=$3
  for i in $(seq 1 1200); do rvirt domstate $dom | grep -q 'shut off' && break; sleep 0.2; [ $((i % 50)) = 0 ] && echo "[firmware test] $run: waiting"; done
  echo "@@$run-STATE=$(rvirt domstate $dom)"
  sed -n "s/.*@@L2-\([A-Z-]*\)=\(.*\)/@@$run-\1=\2/p" $log | tr -d '\r'
}
echo "@@XML-DEFINE=$(rvirt define /tmp/virt-install.xml 2>&1 | tr '\n' ' ')"
rvirt start virt-install >/dev/null
domain XML virt-install /tmp/virt-install.log
# The same kind of definition with the disk on bus='sata': a SCSI unit.
cp /l2/a.raw /tmp/sata.raw
sed -e 's/virt-install/sata/g' -e 's/dev="vda" bus="virtio"/dev="sda" bus="sata"/' -e 's/<uuid>[^<]*<.uuid>//' /tmp/virt-install.xml > /tmp/sata.xml
rvirt define /tmp/sata.xml >/dev/null && rvirt start sata >/dev/null
domain SATA sata /tmp/sata.log
cp /l2/a.raw /tmp/import.raw
rvirt install --name import --memory 512 --vcpus 1 --import --disk path=/tmp/import.raw --print-xml > /tmp/import.xml
sed -i "s|<serial type='pty'>|<serial type='file'><source path='/tmp/import.log'/>|" /tmp/import.xml
echo "@@IMPORT-BOOT=$(grep -c "<boot dev='hd'/>" /tmp/import.xml)"
rvirt define /tmp/import.xml >/dev/null && rvirt start import >/dev/null
domain IMPORT import /tmp/import.log
echo "@@BEGIN-RVIRTD-LOG"; cat /tmp/rvirtd.log /tmp/import.xml; tail -5 /var/lib/rvirt/log/*.log; echo "@@END-RVIRTD-LOG"
"#;

#[test]
fn disks_with_their_own_bootloader_boot_through_seabios() {
    let lab = Lab::get().unwrap();
    let dir = std::env::temp_dir().join(format!("rvirt-firmware-lab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.raw"), dir.join("b.raw"));
    lab.boot_disk("root-a", "rvirt.disk=a", ROOT_INIT, 0xa11c_e001).write(&a).unwrap();
    lab.boot_disk("root-b", "rvirt.disk=b", ROOT_INIT, 0xb0b0_0002).write(&b).unwrap();
    let mut spec = L1Spec::new("firmware-boot", &SCRIPT.replace("UUID", UUID))
        .file(&a, "l2/a.raw")
        .file(&b, "l2/b.raw")
        .file(rvirt_lab::SEABIOS, &rvirt_lab::SEABIOS[1..])
        .binary("/usr/bin/qemu-img", "usr/bin/qemu-img")
        .binary(&lab.rvirtd, "bin/rvirtd")
        .binary(&lab.rvirt, "bin/rvirt");
    spec.timeout = std::time::Duration::from_secs(1500);
    let out = lab.run(&spec).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out.check_l1().unwrap();
    let v: BTreeMap<String, String> = out.values();
    for (k, val) in &v {
        log(&format!("{k}={val}"));
    }
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| panic!("no {k}:\n{}", out.tail(80)));
    for (run, cpus, disk, root) in [("ONE", "1", "a", "/dev/vda2"), ("TWO", "2", "a", "/dev/vda2"), ("QCOW2", "2", "a", "/dev/vda2"), ("ORDER", "1", "b", "/dev/vdb2")] {
        let k = |s: &str| format!("{run}-{s}");
        assert_eq!(get(&k("EXIT")), "0", "{run}: the guest powers off through ACPI\n{}", out.section(&format!("FAILED-{run}")).unwrap_or_default());
        assert_eq!(get(&k("SEABIOS")), "1", "{run}: SeaBIOS on the serial console");
        assert_eq!(get(&k("SYSLINUX")), "1", "{run}: the disk's bootloader on the serial console");
        assert_eq!(get(&k("DISK")), disk, "{run}: the disk that booted");
        assert_eq!(get(&k("ROOT")), root, "{run}: the root device");
        assert_eq!(get(&k("NPROC")), cpus, "{run}: every vCPU answered");
        assert_eq!(get(&k("ACPI")), "3", "{run}: MADT, DSDT and FADT reached the guest through the table loader");
        // SeaBIOS builds the SMBIOS tables itself (its legacy builder names the vendor "Bochs").
        assert_eq!(get(&k("BIOS")), "Bochs", "{run}: SMBIOS from the firmware");
        assert_eq!(get(&k("UUID")), UUID, "{run}: the domain UUID in SMBIOS type 1");
        assert_eq!(get(&k("CANT-CLAIM")), "0", "{run}: every BAR inside the host bridge's windows");
    }
    let logs = || out.section("RVIRTD-LOG").unwrap_or_default();
    let define = get("XML-DEFINE");
    assert!(define.contains("Domain 'virt-install' defined") && define.matches("warning:").count() == 2, "features and the screen: {define}");
    assert!(define.contains("rvirt has no display"), "{define}");
    assert_eq!(get("IMPORT-BOOT"), "1", "rvirt install --import boots the disk");
    for (run, cpus, disk, uuid) in [("XML", "2", "b", Some(UUID)), ("IMPORT", "1", "a", None), ("SATA", "2", "a", None)] {
        let k = |s: &str| format!("{run}-{s}");
        assert_eq!(v.get(&k("STATE")).map(String::as_str), Some("shut off"), "{run}: the guest powered off\n{}", logs());
        assert_eq!(v.get(&k("DISK")).map(String::as_str), Some(disk), "{run}: booted its disk through firmware\n{}", logs());
        assert_eq!(get(&k("ROOT")), if run == "SATA" { "/dev/sda2" } else { "/dev/vda2" }, "{run}: the root device");
        assert_eq!(get(&k("NPROC")), cpus);
        if let Some(u) = uuid {
            assert_eq!(get(&k("UUID")), u, "the definition's UUID reaches SMBIOS");
        }
    }
}
