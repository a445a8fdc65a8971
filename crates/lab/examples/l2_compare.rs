//! What a Debian guest sees under rvirt-vmm and under QEMU (`-M microvm
//! -cpu host`) in one L1: raw CPUID leaves, the kernel's KVM, APIC and clock
//! messages, the clock event device and interrupt counts, prefixed `@@R`
//! and `@@Q` so the two can be diffed. This found the missing TSC-deadline
//! timer behind the lab's L2 triple faults (docs/design.md, "Known lab issues").
//! Each guest also reports the CPU flags and vulnerability mitigations its
//! kernel chose and runs `examples/guest/micro.c` twice (compute, system
//! call, page fault and pipe round-trip costs); the VMMs take turns twice,
//! so a VMM that slows every guest operation shows apart from the lab's noise.
//!
//! `cargo run --release -p rvirt-lab --example l2_compare > out; diff <(grep '^@@R ' out | cut -c5-) <(grep '^@@Q ' out | cut -c5-)`
use rvirt_lab::{compare, GuestPrograms, L1Spec, Lab};

const GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
INSMOD
/lib/modules/cpuid
grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | sed 's/^/@@FLAG /'
for f in /sys/devices/system/cpu/vulnerabilities/*; do echo "@@VULN $(basename $f): $(cat $f)"; done
/lib/modules/micro; /lib/modules/micro
dmesg | grep -i -E 'kvm|clock|apic|pv|tsc|timer|steal|spinlock|async|x2apic|hpet|pit|msi' | sed 's/^/@@DMESG /'
echo "@@CS=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "@@CE=$(cat /sys/devices/system/clockevents/clockevent0/current_device)"
grep -E 'LOC|PCI|IO-APIC|HYP|PIN|NMI|CAL|TLB' /proc/interrupts | sed 's/^/@@IRQ /'
poweroff -f
"#;

const L1: &str = r#"
# Output is piped until each VM ends: keep the console alive for the stall detector.
(while sleep 20; do echo "[l2-compare] running"; done) &
CMD="console=ttyS0 panic=-1 loglevel=7"
rvirt() {
echo "@@BEGIN RVIRT"
RVIRT_L2 RVIRT_DISK </dev/null 2>&1 | grep '@@' | sed 's/@@/@@R /'
}
qemu() {
echo "@@BEGIN QEMU"
QEMU_L2 QEMU_DISK </dev/null 2>&1 | grep '@@' | sed 's/@@/@@Q /'
}
rvirt; qemu; qemu; rvirt
"#;

fn main() -> anyhow::Result<()> {
    let lab = Lab::get()?;
    let programs = GuestPrograms::build(&["examples/guest/cpuid.c", "examples/guest/micro.c"])?;
    let initrd = lab.virtio_initramfs(GUEST, &["virtio_blk"], programs.paths())?;
    let l1 = format!("truncate -s 64M /tmp/disk.raw\n{}", compare::expand(L1));
    let mut spec = L1Spec::new("l2-compare", &l1).with_both_vmms(lab)?.blob("l2/initrd.gz", initrd);
    spec.timeout = std::time::Duration::from_secs(1200);
    let out = lab.run(&spec)?;
    for l in out.console.lines().filter(|l| l.contains("@@")) {
        println!("{l}");
    }
    Ok(())
}
