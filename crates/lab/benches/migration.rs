//! Live migration, side by side in one lab run
//! (`cargo bench -p rvirt-lab --bench migration`): the same guest (Debian's
//! kernel, 2 vCPUs, 512 MiB, 128 MiB of random data in tmpfs, counting on
//! its serial port) moved over TCP on L1's loopback between two rvirt-vmm
//! and between two QEMUs (microvm, as in `rvirt_lab::compare`), with the
//! same limits for both (QEMU 7.2's defaults: 128 MiB/s, 300 ms): once idle,
//! once while the guest rewrites 64 MiB over and over. Reported: total time
//! and the guest's pause (downtime) measured as QEMU does (from the pause to
//! the last byte sent), and rvirt's pause until the destination said it
//! holds the guest (QEMU does not wait for that).
//!
//! Times inside the lab are TCG times: only the ratio between the two VMMs
//! in the same run means anything.

use rvirt_lab::stats::upper_median;
use rvirt_lab::{l2_initramfs, L1Spec, Lab};

const GUEST: &str = "#!/bin/sh
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
dd if=/dev/urandom of=/tmp/fill bs=1M count=128 2>/dev/null
grep -q dirty /proc/cmdline && (while true; do dd if=/dev/zero of=/tmp/dirty bs=1M count=64 2>/dev/null; done) &
echo %%READY
i=0
while true; do i=$((i + 1)); echo \"%%T=$i\"; sleep 0.1; done
";

const ROUNDS: u32 = 4;

fn script() -> String {
    format!(
        r#"
/usr/sbin/ip link set lo up 2>/dev/null || ip link set lo up
wait_for() {{ for i in $(seq 1 3000); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.2; [ $((i % 100)) = 0 ] && echo "[migration bench] waiting for $2 in $1"; done; return 1; }}
QEMU_BASE="qemu-system-x86_64 -M microvm,pcie=on,accel=kvm -cpu host -bios /usr/share/qemu/bios-microvm.bin -smp 2 -m 512M -no-reboot -display none -kernel /l2/vmlinuz -initrd /l2/initrd.gz"
for load in idle dirty; do
CMD="console=ttyS0 panic=-1 quiet $load"
for r in $(seq 1 {ROUNDS}); do
  rm -f /tmp/*.log /tmp/*.err
  rvirt-vmm --incoming tcp:127.0.0.1:4444 --serial file=/tmp/r2.log --api-socket /tmp/r2.sock </dev/null 2>/tmp/r2.err &
  d=$!
  RVIRT_LOG=rvirt_vmm::migration=info rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz --cpus 2 --memory 512M --cmdline "$CMD" \
    --serial file=/tmp/r1.log --api-socket /tmp/r1.sock </dev/null 2>/tmp/r1.err &
  s=$!
  wait_for /tmp/r1.log '%%T=20' || echo "@@STALLED-RVIRT-$load-$r=1"
  rvirt-lab-api /tmp/r1.sock '{{"command":"migrate","uri":"tcp:127.0.0.1:4444","max_downtime_ms":300,"bandwidth_mib_s":128}}' >/dev/null
  for i in $(seq 1 1500); do kill -0 $s 2>/dev/null || break; sleep 0.2; [ $((i % 100)) = 0 ] && echo "[migration bench] rvirt $load still migrating"; done
  kill $s 2>/dev/null; wait $s
  said=$(sed -n 's/.*rvirt-vmm: migrated: guest paused \([0-9.]*\) ms (\([0-9.]*\) ms until its last byte left), \([0-9]*\) passes, .* in \([0-9]*\) ms/\4 \2 \1 \3/p' /tmp/r1.err)
  echo "@@RVIRT-$load-$r=${{said:-failed}}"
  echo "@@RVIRT-PAUSE-$load-$r=$(sed -n 's/.*guest paused [0-9.]* ms: //p' /tmp/r1.err)"
  [ -n "$said" ] || cat /tmp/r1.err
  rvirt-lab-api /tmp/r2.sock stop >/dev/null 2>&1; wait $d
  # QEMU, each monitor on a FIFO this shell keeps open.
  rm -f /tmp/qs /tmp/qd; mkfifo /tmp/qs /tmp/qd
  $QEMU_BASE -append "$CMD" -serial file:/tmp/q2.log -monitor stdio -incoming tcp:127.0.0.1:4445 </tmp/qd >/tmp/qd.out 2>&1 &
  d=$!; exec 4>/tmp/qd
  $QEMU_BASE -append "$CMD" -serial file:/tmp/q1.log -monitor stdio </tmp/qs >/tmp/qs.out 2>&1 &
  s=$!; exec 3>/tmp/qs
  wait_for /tmp/q1.log '%%T=20' || echo "@@STALLED-QEMU-$load-$r=1"
  echo 'migrate_set_parameter max-bandwidth 128M' >&3
  echo 'migrate_set_parameter downtime-limit 300' >&3
  echo 'migrate -d tcp:127.0.0.1:4445' >&3
  for i in $(seq 1 1500); do
    echo 'info migrate' >&3; sleep 0.2
    grep -q 'Migration status: \(completed\|failed\)' /tmp/qs.out && break
    [ $((i % 100)) = 0 ] && echo "[migration bench] qemu $load still migrating"
  done
  total=$(grep -o 'total time: [0-9]*' /tmp/qs.out | tail -1 | grep -o '[0-9]*$')
  down=$(grep -o '^downtime: [0-9]*' /tmp/qs.out | tail -1 | grep -o '[0-9]*$')
  echo "@@QEMU-$load-$r=${{total:-failed}} ${{down:-failed}}"
  grep -q 'status: completed' /tmp/qs.out || tail -20 /tmp/qs.out
  echo quit >&3; exec 3>&-; wait $s
  echo quit >&4; exec 4>&-; wait $d
done
done
"#
    )
}

fn main() -> anyhow::Result<()> {
    let lab = Lab::get()?;
    let initrd = l2_initramfs(GUEST, &[])?;
    let mut spec = L1Spec::new("bench-migration", &script()).file(&lab.kernel, "l2/vmlinuz").blob("l2/initrd.gz", initrd).binary("/usr/sbin/ip", "usr/sbin/ip");
    spec.timeout = std::time::Duration::from_secs(3600);
    spec.l1_memory_mib = 4096;
    spec.binaries.push(("/usr/bin/qemu-system-x86_64".into(), "usr/bin/qemu-system-x86_64".into()));
    spec = spec.file("/usr/share/qemu/bios-microvm.bin", "usr/share/qemu/bios-microvm.bin");
    let out = lab.run(&spec)?;
    out.check_l1()?;
    let v = out.values();
    if let Some(k) = v.keys().find(|k| k.starts_with("STALLED")) {
        anyhow::bail!("{k}:\n{}", out.tail(60));
    }
    // (total ms, downtime ms as QEMU counts it, rvirt's own: until the
    // destination holds the guest) per round; QEMU has no third figure.
    let runs = |who: &str, load: &str| -> anyhow::Result<(f64, f64, f64)> {
        let (mut total, mut down, mut held) = (Vec::new(), Vec::new(), Vec::new());
        for r in 1..=ROUNDS {
            let raw = v.get(&format!("{who}-{load}-{r}")).ok_or_else(|| anyhow::anyhow!("no {who}-{load}-{r}:\n{}", out.tail(40)))?;
            let mut f = raw.split_whitespace();
            let t: f64 = f.next().unwrap_or("").parse().map_err(|_| anyhow::anyhow!("{who} {load} round {r}: {raw}\n{}", out.tail(40)))?;
            let d: f64 = f.next().unwrap_or("").parse().map_err(|_| anyhow::anyhow!("{who} {load} round {r}: {raw}"))?;
            held.push(f.next().and_then(|h| h.parse().ok()).unwrap_or(d));
            total.push(t);
            down.push(d);
        }
        Ok((upper_median(total), upper_median(down), upper_median(held)))
    };
    println!("live migration over L1's loopback, 2 vCPUs, 512 MiB, 128 MiB/s cap, 300 ms limit, {ROUNDS} rounds (L1 ms, TCG, medians):");
    for load in ["idle", "dirty"] {
        let (rt, rd, rh) = runs("RVIRT", load)?;
        let (qt, qd, _) = runs("QEMU", load)?;
        println!("  {load:5}: total   rvirt {rt:.0} ms  qemu {qt:.0} ms  ratio {:.2}", rt / qt);
        println!("  {load:5}: downtime (pause to last byte sent) rvirt {rd:.0} ms  qemu {qd:.0} ms  ratio {:.2}", rd / qd.max(1.0));
        println!("  {load:5}: rvirt's pause until the destination holds the guest {rh:.0} ms");
        for r in 1..=ROUNDS {
            println!("  {load:5}: rvirt round {r}: {}", v.get(&format!("RVIRT-PAUSE-{load}-{r}")).map_or("", |s| s.as_str()));
        }
    }
    Ok(())
}
