//! Boot benchmark, run side by side in one lab run (`cargo bench -p rvirt-lab --bench boot`):
//! - boot-to-userspace-and-poweroff time of rvirt-vmm and of QEMU `-M microvm`
//!   (the reference), same kernel, initramfs, command line, 2 vCPUs, 512 MiB;
//! - the same boot with rvirt-vmm jailed (`--jail --jail-user`), for what
//!   confinement costs;
//! - resident memory of each VMM beyond guest RAM, with the guest idle.
//!
//! Times inside the lab are TCG times: only the ratio between the two VMMs
//! in the same run means anything.

use rvirt_lab::{l2_initramfs, L1Spec, Lab};

const POWEROFF_AT_ONCE: &str = "#!/bin/sh\npoweroff -f\n";
const IDLE: &str = "#!/bin/sh\nmount -t proc proc /proc\necho BENCH-READY\nexec sleep 100000\n";
const ROUNDS: u32 = 5;

fn script() -> String {
    format!(
        r#"
CMD="console=ttyS0 quiet panic=-1"
QEMU="qemu-system-x86_64 -M microvm,accel=kvm -cpu host -bios /usr/share/qemu/bios-microvm.bin -smp 2 -m 512M -no-reboot"
up() {{ cut -d' ' -f1 /proc/uptime; }}
for i in $(seq 1 {ROUNDS}); do
  t0=$(up); rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/off.gz --cpus 2 --memory 512M --cmdline "$CMD" </dev/null >/dev/null; rc=$?; t1=$(up)
  echo "@@RVIRT-$i=$(echo "$t1 $t0" | awk '{{printf "%.2f", $1 - $2}}') rc=$rc"
  t0=$(up); $QEMU -nographic -kernel /l2/vmlinuz -initrd /l2/off.gz -append "$CMD" </dev/null >/dev/null; rc=$?; t1=$(up)
  echo "@@QEMU-$i=$(echo "$t1 $t0" | awk '{{printf "%.2f", $1 - $2}}') rc=$rc"
  t0=$(up); rvirt-vmm --jail --jail-user 4242:4242 --kernel /l2/vmlinuz --initrd /l2/off.gz --cpus 2 --memory 512M --cmdline "$CMD" </dev/null >/dev/null; rc=$?; t1=$(up)
  echo "@@JAILED-$i=$(echo "$t1 $t0" | awk '{{printf "%.2f", $1 - $2}}') rc=$rc"
done
# Resident memory beyond guest RAM: all of the process's RSS except the
# 512 MiB guest-RAM mapping.
overhead() {{ awk '/^Size:/ {{ guest = ($2 == 524288) }} /^Rss:/ {{ if (!guest) s += $2 }} END {{ print s }}' /proc/$1/smaps; }}
wait_ready() {{ for i in $(seq 1 600); do grep -q BENCH-READY $1 2>/dev/null && return; sleep 0.2; done; }}
rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/idle.gz --cpus 2 --memory 512M --cmdline "$CMD" --serial file=/tmp/r.log </dev/null &
pid=$!; wait_ready /tmp/r.log; sleep 2
echo "@@RVIRT-RSS-KB=$(overhead $pid)"; echo "@@RVIRT-RSS-TOTAL-KB=$(awk '/VmRSS/ {{print $2}}' /proc/$pid/status)"
kill $pid; wait $pid
$QEMU -display none -monitor none -serial file:/tmp/q.log -kernel /l2/vmlinuz -initrd /l2/idle.gz -append "$CMD" </dev/null 2>/tmp/q.err &
pid=$!; wait_ready /tmp/q.log; sleep 2
kill -0 $pid 2>/dev/null || {{ echo "@@QEMU-IDLE-DIED=$(cat /tmp/q.err | tr '\n' ' ')"; tail -5 /tmp/q.log; }}
echo "@@QEMU-RSS-KB=$(overhead $pid)"; echo "@@QEMU-RSS-TOTAL-KB=$(awk '/VmRSS/ {{print $2}}' /proc/$pid/status)"
kill $pid; wait $pid
"#
    )
}

fn stats(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[s.len() / 2], s[0])
}

fn main() -> anyhow::Result<()> {
    let lab = Lab::get()?;
    let qemu = std::path::Path::new("/usr/bin/qemu-system-x86_64");
    let bios = std::fs::canonicalize("/usr/share/qemu/bios-microvm.bin")?;
    let option_rom = std::fs::canonicalize("/usr/share/qemu/linuxboot_dma.bin")?;
    let mut spec = L1Spec::new("bench-boot", &script())
        .file(&lab.kernel, "l2/vmlinuz")
        .blob("l2/off.gz", l2_initramfs(POWEROFF_AT_ONCE, &[])?)
        .blob("l2/idle.gz", l2_initramfs(IDLE, &[])?)
        .file(bios, "usr/share/qemu/bios-microvm.bin")
        .file(option_rom, "usr/share/qemu/linuxboot_dma.bin");
    spec.timeout = std::time::Duration::from_secs(1800);
    spec.binaries.push((qemu.to_path_buf(), "usr/bin/qemu-system-x86_64".into()));
    let out = lab.run(&spec)?;
    out.check_l1()?;
    let v = out.values();
    let times = |prefix: &str| -> anyhow::Result<Vec<f64>> {
        (1..=ROUNDS)
            .map(|i| {
                let raw = v.get(&format!("{prefix}-{i}")).ok_or_else(|| anyhow::anyhow!("no {prefix}-{i}:\n{}", out.tail(40)))?;
                let (t, rc) = raw.split_once(" rc=").unwrap_or((raw, "?"));
                anyhow::ensure!(rc == "0", "{prefix} run {i} exited with {rc}");
                Ok(t.parse()?)
            })
            .collect()
    };
    let (r_med, r_min) = stats(&times("RVIRT")?);
    let (q_med, q_min) = stats(&times("QEMU")?);
    println!("boot to userspace and poweroff, 2 vCPUs, 512 MiB, {ROUNDS} rounds (L1 seconds, TCG):");
    println!("  rvirt-vmm      median {r_med:.2} s  min {r_min:.2} s");
    println!("  qemu microvm   median {q_med:.2} s  min {q_min:.2} s");
    println!("  ratio rvirt/qemu (median): {:.2}", r_med / q_med);
    let (j_med, j_min) = stats(&times("JAILED")?);
    println!("  rvirt jailed   median {j_med:.2} s  min {j_min:.2} s  (jailed/unjailed {:.2})", j_med / r_med);
    if let Some(why) = v.get("QEMU-IDLE-DIED") {
        println!("note: the idle QEMU exited before it could be measured: {why}");
    }
    let kb = |k: &str| v.get(k).and_then(|s| s.parse::<f64>().ok()).unwrap_or(f64::NAN);
    println!("resident memory beyond guest RAM (guest idle at a shell):");
    println!("  rvirt-vmm      {:.1} MiB (total RSS {:.1} MiB)", kb("RVIRT-RSS-KB") / 1024.0, kb("RVIRT-RSS-TOTAL-KB") / 1024.0);
    println!("  qemu microvm   {:.1} MiB (total RSS {:.1} MiB)", kb("QEMU-RSS-KB") / 1024.0, kb("QEMU-RSS-TOTAL-KB") / 1024.0);
    Ok(())
}
