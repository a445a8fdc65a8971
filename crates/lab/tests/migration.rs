//! Lab test of live migration with Debian's kernel: the snapshot test's
//! guest (a 32 MiB random file in tmpfs whose checksum it prints every few
//! seconds, a count once a second, a ping to its host over virtio-net each
//! count; its virtio-rng and balloon started too) moves over TCP between
//! two rvirt-vmm in one L1 while it runs. The count goes on from the next
//! number at the destination, the checksum holds, the guest reaches its
//! host and its host reaches it, and the source reports the guest's pause.

use rvirt_lab::counting::{numbers, sums};
use rvirt_lab::{counting, insmod_lines, l2_initramfs, log, nethost, L1Spec, Lab};

/// The guest: markers are `%%` so they stay out of the L1 script's values.
const GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp && mount -t tmpfs tmpfs /tmp
MODULES
dd if=/dev/urandom of=/tmp/big bs=1M count=32 2>/dev/null
ip link set lo up
ip addr add 10.0.0.2/24 dev eth0
ip link set eth0 up
(while true; do echo "%%SUM=$(sha256sum /tmp/big | cut -c1-16)"; sleep 4; done) &
i=0
while true; do
  i=$((i + 1))
  echo "%%TICK=$i"
  head -c 16 /dev/hwrng >/dev/null 2>&1 && echo "%%RNG=$i"
  if ping -c 1 -W 2 10.0.0.1 >/dev/null 2>&1; then echo "%%NET=$i"; fi
  sleep 1
done
"#;

/// After [`nethost::PRELUDE`] (bridges, taps) and [`counting::SHELL`].
const SCRIPT: &str = r#"
/usr/sbin/ip link set lo up
/usr/sbin/ip link add br0 address 02:00:00:00:00:01 type bridge
/usr/sbin/ip addr add 10.0.0.1/24 dev br0
/usr/sbin/ip link set br0 up
rvirt-vmm --incoming tcp:127.0.0.1:4444 --net tap=dst0,bridge=br0 \
  --serial file=/tmp/two.log --api-socket /tmp/two.sock </dev/null 2>/tmp/two.err &
two=$!
rvirt-vmm --kernel /l2/vmlinuz --initrd /l2/initrd.gz --cpus 2 --memory 512M --cmdline "console=ttyS0 panic=-1 quiet" \
  --net tap=src0,bridge=br0,mac=52:54:00:00:00:61 --rng --balloon \
  --serial file=/tmp/one.log --api-socket /tmp/one.sock </dev/null 2>/tmp/one.err &
one=$!
wait_tick /tmp/one.log 6 || echo "@@ONE-STALLED=1"
for i in $(seq 1 60); do grep -q '%%SUM' /tmp/one.log && grep -q '%%NET' /tmp/one.log && break; sleep 0.5; done
echo "@@MIGRATE=$(rvirt-lab-api /tmp/one.sock '{"command":"migrate","uri":"tcp:127.0.0.1:4444"}')"
for i in $(seq 1 600); do
  kill -0 $one 2>/dev/null || break
  st=$(rvirt-lab-api /tmp/one.sock migrate-status 2>/dev/null) && echo "[migration test] $st"
  sleep 0.5
done
wait $one
echo "@@ONE-EXIT=$?"
echo "@@ONE-SAID=$(grep 'rvirt-vmm: migrated' /tmp/one.err)"
last=$(ticks /tmp/one.log)
echo "@@LAST-TICK=$last"
wait_tick /tmp/two.log $((last + 8)) || echo "@@TWO-STALLED=1"
for i in $(seq 1 60); do [ "$(grep -c '%%SUM' /tmp/two.log)" -ge 2 ] && break; sleep 0.5; done
if ping -c 2 -W 2 10.0.0.2 >/dev/null 2>&1; then echo "@@HOST-TO-TWO=reached"; else echo "@@HOST-TO-TWO=unreached"; fi
echo "@@STATUS-TWO=$(rvirt-lab-api /tmp/two.sock status)"
echo "@@STOP-TWO=$(rvirt-lab-api /tmp/two.sock stop)"
wait $two; echo "@@TWO-EXIT=$?"
for n in one two; do echo "@@BEGIN-$n"; cat /tmp/$n.log; echo "--- stderr"; cat /tmp/$n.err; echo "@@END-$n"; done
"#;

#[test]
fn a_running_debian_guest_moves_to_another_vmm_over_tcp() {
    let lab = Lab::get().unwrap();
    let modules = lab.virtio_modules(&["virtio_net", "virtio-rng", "virtio_balloon"]);
    let guest = l2_initramfs(&GUEST.replace("MODULES", &insmod_lines(&modules)), &modules).unwrap();
    let mut spec = L1Spec::new("migration", &format!("{}{}{SCRIPT}", nethost::PRELUDE, counting::SHELL))
        .with_network_host(lab)
        .file(&lab.kernel, "l2/vmlinuz")
        .blob("l2/initrd.gz", guest);
    spec.timeout = std::time::Duration::from_secs(1200);
    let out = lab.run(&spec).unwrap();
    out.check_l1().unwrap();
    let v = out.values();
    for (k, val) in &v {
        log(&format!("{k} = {val}"));
    }
    let (one, two) = (out.section("one").unwrap_or_default(), out.section("two").unwrap_or_default());
    let logs = || format!("--- one\n{one}\n--- two\n{two}");
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| panic!("no {k} in output:\n{}\n{}", out.tail(60), logs()));
    for stalled in ["ONE-STALLED", "TWO-STALLED", "INSMOD-FAILED"] {
        assert!(v.get(stalled).is_none(), "{stalled}\n{}", logs());
    }
    assert_eq!(get("MIGRATE"), r#"{"ok":true}"#);
    assert_eq!(get("ONE-EXIT"), "0", "{}", logs());
    let said = get("ONE-SAID");
    assert!(said.contains("rvirt-vmm: migrated: guest paused"), "{said}");
    log(&format!("the source said: {said}"));
    let last: u64 = get("LAST-TICK").parse().unwrap();
    let ticks = numbers(&two, "TICK");
    assert_eq!(ticks.first(), Some(&(last + 1)), "the count goes on from {last}\n{}", logs());
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1) && ticks.len() >= 8, "{ticks:?}");
    let (before, after) = (sums(&one), sums(&two));
    assert!(!before.is_empty() && !after.is_empty() && after.iter().all(|s| *s == before[0]), "the tmpfs file is unchanged: {before:?} {after:?}");
    assert!(numbers(&two, "NET").iter().any(|n| *n > last), "the guest reaches its host from the destination\n{}", logs());
    assert!(numbers(&two, "RNG").iter().any(|n| *n > last), "its entropy device works there\n{}", logs());
    assert_eq!(get("HOST-TO-TWO"), "reached");
    assert!(get("STATUS-TWO").contains(r#""state":"running""#), "{}", get("STATUS-TWO"));
    assert_eq!(get("TWO-EXIT"), "0");
}
