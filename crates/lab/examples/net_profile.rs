//! Where guest->host TCP time goes, rvirt-vmm against QEMU in one L1: around
//! a 20 MiB transfer in 1 KiB writes (`benches/guest/tcpio.c`) it snapshots
//! L1's KVM exit statistics (debugfs), the VMM's per-thread CPU time, and in
//! the guest the packets sent, interrupts, TCP retransmissions and ping round
//! trips idle and under load. Two more transfers (64 KiB, then 8 KiB writes)
//! print the sender's TCP_INFO over time (RTT, cwnd, pacing rate, and the
//! kernel's busy / receive-window-limited / send-buffer-limited time).
//!
//! `cargo run --release -p rvirt-lab --example net_profile`

use rvirt_lab::{compare, GuestPrograms, L1Spec, Lab};

const GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
INSMOD
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
for i in $(seq 1 60); do ping -c 1 -W 1 10.0.2.1 >/dev/null 2>&1 && break; done
s() { echo "@@G$1 $(cat /sys/class/net/eth0/statistics/tx_packets) $(cat /sys/class/net/eth0/statistics/tx_bytes) $(cat /sys/class/net/eth0/statistics/rx_packets) $(cut -d' ' -f1 /proc/uptime)"; grep -E 'virtio|LOC|CAL|RES|TLB' /proc/interrupts | sed "s/^/@@G$1-IRQ /"; cat /proc/stat | head -3 | sed "s/^/@@G$1-STAT /"; grep Tcp: /proc/net/snmp | tail -1 | sed "s/^/@@G$1-TCP /"; }
echo "@@PING-IDLE $(ping -c 10 -i 0.2 10.0.2.1 | tail -1)"
s 0
ping -c 16 -i 0.5 10.0.2.1 > /tmp/p &
echo TX-START
/lib/modules/tcpio send 10.0.2.1 5000 20 1024 | sed "s/@@TCPIO/@@W1024/"
echo TX-END
wait
echo "@@PING-LOAD $(tail -1 /tmp/p)"
sleep 3
s 1
txp() { cat /sys/class/net/eth0/statistics/tx_packets; }
port=5002
for w in 65536 8192; do
  p0=$(txp)
  TCPIO_INFO=1 /lib/modules/tcpio send 10.0.2.1 $port 20 $w | sed "s/@@/@@W$w-/"
  echo "@@W$w-TXPKTS=$(( $(txp) - p0 ))"
  port=$((port + 1))
done
grep -E 'virtio' /proc/interrupts | sed "s/^/@@G2-IRQ /"
sleep 3
poweroff -f
"#;

const L1: &str = r#"
insmod /lib/modules/tun.ko
mount -t debugfs none /sys/kernel/debug
CMD="console=ttyS0 panic=-1 loglevel=4"
snap() {
  for f in /sys/kernel/debug/kvm/*; do [ -f $f ] && echo "@@$1-KVM $(basename $f) $(cat $f 2>/dev/null)"; done
  for t in /proc/$2/task/*; do echo "@@$1-THR $(cat $t/comm | tr ' ' _) $(cut -d')' -f2 $t/stat | awk '{print $12, $13}')"; done
  echo "@@$1-L1STAT $(head -1 /proc/stat)"
}
run() {
  name=$1; shift
  "$@" </dev/null > /tmp/vm.log 2>&1 &
  pid=$!
  for i in $(seq 1 300); do [ -e /sys/class/net/tap0 ] && break; sleep 0.2; done
  ip addr add 10.0.2.1/24 dev tap0; ip link set tap0 up
  tcpio sink 5000 & sink=$!
  tcpio sink 5002 & sink2=$!
  tcpio sink 5003 & sink3=$!
  while ! grep -q TX-START /tmp/vm.log; do sleep 0.2; kill -0 $pid || break; done
  snap $name-0 $pid
  while ! grep -q TX-END /tmp/vm.log; do sleep 0.2; kill -0 $pid || break; done
  snap $name-1 $pid
  grep tap0 /proc/net/dev | sed "s/^/@@$name-TAPDEV /"
  wait $pid
  grep '@@' /tmp/vm.log | sed "s/@@/@@$name-/"
  grep -E 'triple|crash' /tmp/vm.log
  kill $sink $sink2 $sink3
  sleep 1
}
run RVIRT RVIRT_L2 RVIRT_NET
run QEMU QEMU_L2 QEMU_NET
"#;

fn main() -> anyhow::Result<()> {
    let lab = Lab::get()?;
    let programs = GuestPrograms::build(&["benches/guest/tcpio.c"])?;
    let initrd = lab.virtio_initramfs(GUEST, &["virtio_net"], programs.paths())?;

    let mut spec = L1Spec::new("net-profile", &compare::expand(L1))
        .with_both_vmms(lab)?
        .file(lab.module_in_tree("drivers/net/tun.ko"), "lib/modules/tun.ko")
        .file(programs.path("tcpio"), "usr/bin/tcpio")
        .blob("l2/initrd.gz", initrd);
    spec.timeout = std::time::Duration::from_secs(1200);
    spec.retry_l2_crash = false;
    let out = lab.run(&spec)?;
    for l in out.console.lines().filter(|l| l.contains("@@") || l.contains("triple") || l.contains("crash")) {
        println!("{l}");
    }
    Ok(())
}
