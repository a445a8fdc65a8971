//! Guest-to-outside TCP through rvirtd's default NAT network, rvirt-vmm
//! against QEMU on the same network in one L1 (`cargo bench -p rvirt-lab
//! --bench nat`): rvirtd brings up libvirt's default network (virbr0,
//! dnsmasq, nftables masquerade); each VMM's guest gets a lease with its own
//! DHCP client and sends 256 MiB in 64 KiB writes (`benches/guest/tcpio.c`)
//! to a host outside L1's bridge (a network namespace behind an uplink),
//! through the NAT. Both VMMs move packets in user space (QEMU `vhost=off`),
//! on a tap on virbr0; the order alternates between rounds and the figure
//! that counts is the median of each round's rvirt/QEMU ratio (single
//! figures move between L1s with the host's load). `RVIRT_BENCH_ROUNDS`
//! (default 3) sets the rounds. Also printed: each guest's time from its
//! start to its lease.

use rvirt_lab::stats::median;
use rvirt_lab::{compare, nethost, GuestPrograms, L1Spec, Lab};

const GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
INSMOD
cat > /udhcpc.sh <<'EOS'
#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr add $ip/$mask dev $interface
[ -n "$router" ] && ip route add default via $router
echo "@@LEASE=$ip"
EOS
chmod +x /udhcpc.sh
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -q -n -t 30 -T 1 -s /udhcpc.sh >/dev/null 2>&1
echo "@@LEASE-AT=$(cut -d' ' -f1 /proc/uptime)"
/lib/modules/tcpio send 198.51.100.2 5000 256 | sed -n 's/@@TCPIO-MIBS=/@@NAT-TX=/p'
poweroff -f
"#;

/// After [`nethost::PRELUDE`]: the default network, then `nat NAME ROUND VMM...` per VMM.
const L1: &str = r#"
rvirtd --default-network --allow-path /l2 --allow-path /tmp > /tmp/rvirtd.log 2>&1 &
for i in $(seq 1 200); do rvirt net-list 2>/dev/null | grep -q 'default *active' && break; sleep 0.2; done
echo "@@NET=$(rvirt net-list | grep default | tr -s ' ')"
CMD="console=ttyS0 panic=-1 loglevel=4"
# nat NAME ROUND COMMAND...: one guest on tap "tn" on virbr0, the sink outside.
nat() {
  name=$1; round=$2; shift 2
  /usr/sbin/ip tuntap add tn mode tap
  /usr/sbin/ip link set tn master virbr0 up
  nsenter --net=/proc/$OUT/ns/net tcpio sink 5000 & sink=$!
  timeout -s KILL 360 "$@" </dev/null > /tmp/$name.log 2>&1 &
  pid=$!
  (while kill -0 $pid 2>/dev/null; do sleep 20; echo "[bench] $name round $round running"; done) &
  wait $pid
  echo "@@$name-R$round-EXIT=$?"
  grep '@@' /tmp/$name.log | sed "s/@@/@@$name-R$round-/"
  kill $sink 2>/dev/null
  /usr/sbin/ip link del tn
}
rvirt_nat() { nat RVIRT $1 RVIRT_L2 --net tap=tn,mac=52:54:00:00:00:51; }
qemu_nat() { nat QEMU $1 QEMU_L2 -netdev tap,id=n0,ifname=tn,script=no,downscript=no,vhost=off -device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:52,romfile=; }
RUN
"#;

fn main() -> anyhow::Result<()> {
    let lab = Lab::get()?;
    let programs = GuestPrograms::build(&["benches/guest/tcpio.c"])?;
    let initrd = lab.virtio_initramfs(GUEST, &["virtio_net"], programs.paths())?;
    let rounds: usize = std::env::var("RVIRT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).filter(|n| *n > 0).unwrap_or(3);
    let (mut r, mut q, mut lr, mut lq) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let run = if round % 2 == 1 { format!("rvirt_nat {round}\nqemu_nat {round}") } else { format!("qemu_nat {round}\nrvirt_nat {round}") };
        let script = format!("{}{}", nethost::PRELUDE, compare::expand(&L1.replace("RUN", &run)));
        let mut spec = L1Spec::new(&format!("bench-nat-{round}"), &script)
            .with_both_vmms(&lab)?
            .with_network_host(&lab)
            .file(programs.path("tcpio"), "usr/bin/tcpio")
            .blob("l2/initrd.gz", initrd.clone());
        spec.timeout = std::time::Duration::from_secs(1200);
        spec.retry_l2_crash = false;
        let out = lab.run(&spec)?;
        if let Err(e) = out.check_l1() {
            println!("note: round {round}: L1 failed ({}); see target/lab-logs/bench-nat-{round}.log", e.to_string().lines().next().unwrap_or(""));
            continue;
        }
        let v = out.values();
        let get = |k: &str| v.get(k).and_then(|s| s.parse::<f64>().ok()).unwrap_or(f64::NAN);
        let (a, b) = (get(&format!("RVIRT-R{round}-NAT-TX")), get(&format!("QEMU-R{round}-NAT-TX")));
        println!("round {round}: rvirt {a:.1} MiB/s, QEMU {b:.1} MiB/s (leases at {} s / {} s of guest uptime)", get(&format!("RVIRT-R{round}-LEASE-AT")), get(&format!("QEMU-R{round}-LEASE-AT")));
        r.push(a);
        q.push(b);
        lr.push(get(&format!("RVIRT-R{round}-LEASE-AT")));
        lq.push(get(&format!("QEMU-R{round}-LEASE-AT")));
    }
    let ratios: Vec<f64> = r.iter().zip(&q).map(|(a, b)| a / b).collect();
    println!("guest -> outside through the default network's NAT, 64 KiB writes, {rounds} rounds (L2 under TCG; compare ratios only):");
    println!("  rvirt median {:.1} MiB/s, QEMU median {:.1} MiB/s, ratio {:.2}x ({})", median(r), median(q), median(ratios.clone()), ratios.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" "));
    println!("  lease at guest uptime: rvirt median {:.1} s, QEMU median {:.1} s", median(lr), median(lq));
    Ok(())
}
