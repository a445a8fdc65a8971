//! Snapshot and restore, side by side in one lab run
//! (`cargo bench -p rvirt-lab --bench snapshot`): the same guest (Debian's
//! kernel, 2 vCPUs, 128 MiB of random data in tmpfs, counting every tenth of
//! a second on its serial port) with 512 MiB and 2 GiB of RAM, saved and
//! restored by rvirt-vmm (API `snapshot`, `--restore`) and by QEMU, the
//! reference (`migrate "exec:cat > FILE"`, `-incoming "exec:cat FILE"`,
//! microvm as in `rvirt_lab::compare`). Reported: the time from the request
//! to the files being written, their size, and the time from starting the
//! restoring process to the guest's next count on its serial port.
//!
//! Times inside the lab are TCG times: only the ratio between the two VMMs
//! in the same run means anything.

use rvirt_lab::stats::rounds;
use rvirt_lab::{l2_initramfs, L1Spec, Lab};

const GUEST: &str = "#!/bin/sh
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
dd if=/dev/urandom of=/tmp/fill bs=1M count=128 2>/dev/null
echo %%READY
i=0
while true; do i=$((i + 1)); echo \"%%T=$i\"; sleep 0.1; done
";

const ROUNDS: u32 = 2;

fn script() -> String {
    format!(
        r#"
CMD="console=ttyS0 panic=-1 quiet"
up() {{ cut -d' ' -f1 /proc/uptime; }}
since() {{ echo "$(up) $1" | awk '{{printf "%.2f", $1 - $2}}'; }}
# Waits for log $1 to match $2 (10 minutes at most).
wait_for() {{ for i in $(seq 1 6000); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }}
kb() {{ du -k -c $@ | tail -1 | cut -f1; }}
QEMU_BASE="qemu-system-x86_64 -M microvm,pcie=on,accel=kvm -cpu host -bios /usr/share/qemu/bios-microvm.bin -smp 2 -no-reboot -display none -kernel /l2/vmlinuz -initrd /l2/initrd.gz"
for mem in 512 2048; do
for r in $(seq 1 {ROUNDS}); do
  # rvirt-vmm
  rm -rf /tmp/snap /tmp/r*.log
  rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz --cpus 2 --memory ${{mem}}M --cmdline "$CMD" \
    --serial file=/tmp/r1.log --api-socket /tmp/r1.sock </dev/null &
  p=$!
  wait_for /tmp/r1.log '%%T=5' || echo "@@STALLED-RVIRT-$mem-$r=1"
  t0=$(up); rvirt-lab-api /tmp/r1.sock '{{"command":"snapshot","path":"/tmp/snap"}}' >/dev/null; t1=$(since $t0)
  echo "@@RVIRT-SAVE-$mem-$r=$t1 $(kb /tmp/snap/state /tmp/snap/memory)"
  rvirt-lab-api /tmp/r1.sock stop >/dev/null; wait $p
  t0=$(up)
  rvirt-vmm --restore /tmp/snap --serial file=/tmp/r2.log --api-socket /tmp/r2.sock </dev/null &
  p=$!
  wait_for /tmp/r2.log '%%T=' || echo "@@STALLED-RVIRT-RESTORE-$mem-$r=1"
  echo "@@RVIRT-RESTORE-$mem-$r=$(since $t0)"
  rvirt-lab-api /tmp/r2.sock stop >/dev/null; wait $p
  rm -rf /tmp/snap
  # QEMU, its monitor on a FIFO kept open by this shell.
  rm -f /tmp/q*.log /tmp/q.state /tmp/qmon; mkfifo /tmp/qmon
  $QEMU_BASE -m ${{mem}}M -append "$CMD" -serial file:/tmp/q1.log -monitor stdio </tmp/qmon >/tmp/qmon.out 2>&1 &
  p=$!
  exec 3>/tmp/qmon
  wait_for /tmp/q1.log '%%T=5' || echo "@@STALLED-QEMU-$mem-$r=1"
  t0=$(up); echo 'migrate "exec:cat > /tmp/q.state"' >&3; echo 'info status' >&3
  wait_for /tmp/qmon.out 'postmigrate' || echo "@@STALLED-QEMU-SAVE-$mem-$r=1"
  echo "@@QEMU-SAVE-$mem-$r=$(since $t0) $(kb /tmp/q.state)"
  echo quit >&3; exec 3>&-; wait $p
  t0=$(up)
  $QEMU_BASE -m ${{mem}}M -append "$CMD" -serial file:/tmp/q2.log -monitor none -incoming "exec:cat /tmp/q.state" </dev/null >/tmp/q2.out 2>&1 &
  p=$!
  wait_for /tmp/q2.log '%%T=' || {{ echo "@@STALLED-QEMU-RESTORE-$mem-$r=1"; cat /tmp/q2.out; }}
  echo "@@QEMU-RESTORE-$mem-$r=$(since $t0)"
  kill $p; wait $p
  rm -f /tmp/q.state
done
done
"#
    )
}

fn main() -> anyhow::Result<()> {
    let lab = Lab::get()?;
    let initrd = l2_initramfs(GUEST, &[])?;
    let mut spec = L1Spec::new("bench-snapshot", &script()).file(&lab.kernel, "l2/vmlinuz").blob("l2/initrd.gz", initrd);
    spec.timeout = std::time::Duration::from_secs(3600);
    spec.l1_memory_mib = 6144;
    spec.binaries.push(("/usr/bin/qemu-system-x86_64".into(), "usr/bin/qemu-system-x86_64".into()));
    spec = spec.file("/usr/share/qemu/bios-microvm.bin", "usr/share/qemu/bios-microvm.bin");
    let out = lab.run(&spec)?;
    out.check_l1()?;
    let v = out.values();
    if let Some(k) = v.keys().find(|k| k.starts_with("STALLED")) {
        anyhow::bail!("{k}:\n{}", out.tail(60));
    }
    let runs = |what: &str, mem: u32| rounds(&v, what, mem, ROUNDS).map_err(|e| anyhow::anyhow!("{e}:\n{}", out.tail(40)));
    println!("snapshot and restore, 2 vCPUs, 128 MiB of guest data, {ROUNDS} rounds (L1 seconds, TCG, medians):");
    for mem in [512, 2048] {
        let (rs, rk) = runs("RVIRT-SAVE", mem)?;
        let (qs, qk) = runs("QEMU-SAVE", mem)?;
        let (rr, _) = runs("RVIRT-RESTORE", mem)?;
        let (qr, _) = runs("QEMU-RESTORE", mem)?;
        println!("  {mem} MiB: save     rvirt {rs:.2} s ({:.0} MiB)  qemu {qs:.2} s ({:.0} MiB)  ratio {:.2}", rk / 1024.0, qk / 1024.0, rs / qs);
        println!("  {mem} MiB: restore  rvirt {rr:.2} s  qemu {qr:.2} s  ratio {:.2} (start to the guest's next count)", rr / qr);
    }
    Ok(())
}
