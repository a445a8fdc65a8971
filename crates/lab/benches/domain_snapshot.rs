//! Domain snapshots through rvirtd against QEMU's `savevm`/`loadvm`, side by
//! side in one lab run (`cargo bench -p rvirt-lab --bench domain_snapshot`):
//! the same guest (Debian's kernel, 2 vCPUs, 128 MiB of random data in
//! tmpfs, counting every tenth of a second on its serial port, a 64 MiB
//! qcow2 virtio disk) with 512 MiB and 2 GiB of RAM. rvirt: `rvirt
//! snapshot-create-as` (memory, devices and the disk's internal snapshot)
//! and `rvirt snapshot-revert`, through rvirtd; QEMU: HMP `savevm` and
//! `loadvm` (memory and devices inside the qcow2 image), microvm as in
//! `rvirt_lab::compare`. Reported: from the request to the snapshot taken
//! (QEMU: to its monitor's next answer), and from the revert request to the
//! guest's next count on its serial port.
//!
//! Times inside the lab are TCG times: only the ratio between the two in
//! the same run means anything.

use rvirt_lab::stats::rounds;
use rvirt_lab::{insmod_lines, l2_initramfs, L1Spec, Lab};

const GUEST: &str = "#!/bin/sh
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
MODULES
dd if=/dev/urandom of=/tmp/fill bs=1M count=128 2>/dev/null
echo %%READY
i=0
while true; do i=$((i + 1)); echo \"%%T=$i\"; sleep 0.1; done
";

const ROUNDS: u32 = 2;

fn script() -> String {
    format!(
        r#"
mkdir -p /var/lib /run
rvirtd --allow-path /l2 --allow-path /tmp >> /tmp/rvirtd.log 2>&1 &
for i in $(seq 1 100); do rvirt list >/dev/null 2>&1 && break; sleep 0.1; done
CMD="console=ttyS0 panic=-1 quiet"
up() {{ cut -d' ' -f1 /proc/uptime; }}
since() {{ echo "$(up) $1" | awk '{{printf "%.2f", $1 - $2}}'; }}
wait_for() {{ for i in $(seq 1 6000); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; return 1; }}
# Waits until log $1 has a count after byte $2.
wait_count_after() {{ for i in $(seq 1 12000); do tail -c +$(($2 + 1)) "$1" | grep -q '%%T=' && return 0; sleep 0.05; done; return 1; }}
QEMU_BASE="qemu-system-x86_64 -M microvm,pcie=on,accel=kvm -cpu host -bios /usr/share/qemu/bios-microvm.bin -smp 2 -no-reboot -display none -kernel /l2/vmlinuz -initrd /l2/initrd.gz"
for mem in 512 2048; do
for r in $(seq 1 {ROUNDS}); do
  rm -f /tmp/r.log /tmp/r.qcow2; qemu-img create -q -f qcow2 /tmp/r.qcow2 64M
  cat > /tmp/r.xml <<EOF
<domain type='kvm'><name>b</name><memory unit='MiB'>$mem</memory><vcpu>2</vcpu>
<os><type arch='x86_64'>hvm</type><kernel>/l2/vmlinuz</kernel><initrd>/l2/initrd.gz</initrd><cmdline>$CMD</cmdline></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/tmp/r.qcow2'/><target dev='vda' bus='virtio'/></disk>
<serial type='file'><source path='/tmp/r.log'/></serial></devices></domain>
EOF
  rvirt define /tmp/r.xml >/dev/null; rvirt start b >/dev/null
  wait_for /tmp/r.log '%%T=5' || echo "@@STALLED-RVIRT-$mem-$r=1"
  t0=$(up); rvirt snapshot-create-as b s1 >/dev/null || echo "@@FAILED-RVIRT-$mem-$r=1"; t1=$(since $t0)
  echo "@@RVIRT-CREATE-$mem-$r=$t1 $(du -k /var/lib/rvirt/snapshots/b/s1.save | cut -f1)"
  sleep 2
  pos=$(wc -c < /tmp/r.log); t0=$(up)
  rvirt snapshot-revert b s1 >/dev/null || echo "@@FAILED-RVIRT-REVERT-$mem-$r=1"
  wait_count_after /tmp/r.log $pos || echo "@@STALLED-RVIRT-REVERT-$mem-$r=1"
  echo "@@RVIRT-REVERT-$mem-$r=$(since $t0)"
  rvirt destroy b >/dev/null; rvirt undefine b --snapshots-metadata >/dev/null
  # QEMU, its monitor on a FIFO kept open by this shell.
  rm -f /tmp/q.log /tmp/q.qcow2 /tmp/qmon /tmp/qmon.out; qemu-img create -q -f qcow2 /tmp/q.qcow2 64M; mkfifo /tmp/qmon
  $QEMU_BASE -m ${{mem}}M -append "$CMD" -serial file:/tmp/q.log -monitor stdio \
    -drive file=/tmp/q.qcow2,if=none,id=d0,format=qcow2 -device virtio-blk-device,drive=d0 </tmp/qmon >/tmp/qmon.out 2>&1 &
  p=$!
  exec 3>/tmp/qmon
  wait_for /tmp/q.log '%%T=5' || echo "@@STALLED-QEMU-$mem-$r=1"
  t0=$(up); echo 'savevm s1' >&3; echo 'info status' >&3
  wait_for /tmp/qmon.out 'VM status' || echo "@@STALLED-QEMU-SAVE-$mem-$r=1"
  echo "@@QEMU-CREATE-$mem-$r=$(since $t0) $(du -k /tmp/q.qcow2 | cut -f1)"
  sleep 2
  pos=$(wc -c < /tmp/q.log); t0=$(up)
  echo 'loadvm s1' >&3
  wait_count_after /tmp/q.log $pos || {{ echo "@@STALLED-QEMU-LOAD-$mem-$r=1"; cat /tmp/qmon.out; }}
  echo "@@QEMU-REVERT-$mem-$r=$(since $t0)"
  echo quit >&3; exec 3>&-; wait $p
done
done
tail -5 /tmp/rvirtd.log
"#
    )
}

fn main() -> anyhow::Result<()> {
    let lab = Lab::get()?;
    let modules = lab.virtio_modules(&["virtio_blk"]);
    let initrd = l2_initramfs(&GUEST.replace("MODULES", &insmod_lines(&modules)), &modules)?;
    let mut spec = L1Spec::new("bench-domain-snapshot", &script())
        .file(&lab.kernel, "l2/vmlinuz")
        .blob("l2/initrd.gz", initrd)
        .binary(&lab.rvirtd, "bin/rvirtd")
        .binary(&lab.rvirt, "bin/rvirt");
    spec.timeout = std::time::Duration::from_secs(3600);
    spec.l1_memory_mib = 6144;
    spec.binaries.push(("/usr/bin/qemu-system-x86_64".into(), "usr/bin/qemu-system-x86_64".into()));
    spec.binaries.push(("/usr/bin/qemu-img".into(), "usr/bin/qemu-img".into()));
    spec = spec.file("/usr/share/qemu/bios-microvm.bin", "usr/share/qemu/bios-microvm.bin");
    let out = lab.run(&spec)?;
    out.check_l1()?;
    let v = out.values();
    if let Some(k) = v.keys().find(|k| k.starts_with("STALLED") || k.starts_with("FAILED")) {
        anyhow::bail!("{k}:\n{}", out.tail(60));
    }
    let runs = |what: &str, mem: u32| rounds(&v, what, mem, ROUNDS).map_err(|e| anyhow::anyhow!("{e}:\n{}", out.tail(40)));
    println!("domain snapshot create and revert, 2 vCPUs, 128 MiB of guest data, {ROUNDS} rounds (L1 seconds, TCG, upper medians):");
    for mem in [512, 2048] {
        let (rc, rk) = runs("RVIRT-CREATE", mem)?;
        let (qc, qk) = runs("QEMU-CREATE", mem)?;
        let (rr, _) = runs("RVIRT-REVERT", mem)?;
        let (qr, _) = runs("QEMU-REVERT", mem)?;
        println!("  {mem} MiB: create  rvirt {rc:.2} s (memory file {:.0} MiB)  qemu savevm {qc:.2} s (image {:.0} MiB)  ratio {:.2}", rk / 1024.0, qk / 1024.0, rc / qc);
        println!("  {mem} MiB: revert  rvirt {rr:.2} s  qemu loadvm {qr:.2} s  ratio {:.2} (request to the guest's next count)", rr / qr);
    }
    Ok(())
}
