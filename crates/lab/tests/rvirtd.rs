//! Lab test: rvirtd and rvirt manage stock Debian guests in L1 with their
//! default paths (/var/lib/rvirt, /run/rvirt/rvirtd.sock): define, start,
//! suspend/resume, ACPI shutdown, destroy, a killed VMM, and a daemon
//! restart while a domain runs; then, with cgroup v2 mounted (L1 can; the
//! machines it runs on are hybrid v1), `<memtune>`/`<cputune>` limits in
//! the domain's cgroup, CPU pins on the VMM's threads, and a memory limit
//! enforced on a guest that fills its RAM.

use rvirt_lab::{l2_initramfs, log, L1Spec, Lab, ACPID_GUEST};

const SCRIPT: &str = r#"
mkdir -p /var/lib /run
start_daemon() {
  rvirtd --allow-path /l2 --allow-path /tmp --allow-path /var/lib/rvirt >> /tmp/rvirtd.log 2>&1 &
  for i in $(seq 1 100); do rvirt list >/dev/null 2>&1 && break; sleep 0.1; done
}
start_daemon
# domain NAME [MiB] [vCPUs] [initrd] [more kernel command line] [more XML]
domain() {
cat > /tmp/$1.xml <<EOF
<domain type='kvm'>
  <name>$1</name>
  <memory unit='MiB'>${2:-256}</memory>
  <vcpu>${3:-1}</vcpu>
  $6
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>/l2/vmlinuz</kernel>
    <initrd>/l2/${4:-initrd.gz}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet $5</cmdline>
  </os>
  <devices>
    <serial type='file'><source path='/tmp/$1-serial.log'/></serial>
  </devices>
</domain>
EOF
}
ready() {
  for i in $(seq 1 600); do grep -q '@@L2-READY' /tmp/$1-serial.log 2>/dev/null && return 0; sleep 0.5; echo "[rvirtd test] waiting for $1" ; done
  return 1
}
state() { rvirt domstate --reason $1; }
domain web; domain db
echo "@@DEFINE=$(rvirt define /tmp/web.xml) / $(rvirt define /tmp/db.xml)"
echo "@@START=$(rvirt start web)"
echo "@@LIST-RUNNING=$(rvirt list | grep web | tr -s ' ')"
ready web && echo "@@WEB-READY=1"
echo "@@SUSPEND=$(rvirt suspend web)"
echo "@@STATE-PAUSED=$(state web)"
s1=$(wc -c < /tmp/web-serial.log); sleep 3; s2=$(wc -c < /tmp/web-serial.log)
echo "@@PAUSED-GROWTH=$((s2 - s1))"
echo "@@RESUME=$(rvirt resume web)"
sleep 3; s3=$(wc -c < /tmp/web-serial.log)
echo "@@RESUMED-GROWTH=$((s3 - s2))"
echo "@@SHUTDOWN=$(rvirt shutdown web --timeout 240 2>&1)"
echo "@@STATE-AFTER-SHUTDOWN=$(state web)"
grep -q 'L2-POWER-BUTTON=pressed' /tmp/web-serial.log && echo "@@WEB-BUTTON=1"

echo "@@DB-START=$(rvirt start db)"
echo "@@DB-DESTROY=$(rvirt destroy db)"
echo "@@DB-STATE=$(state db)"

rm -f /tmp/web-serial.log
rvirt start web > /dev/null
pid=$(rvirt dominfo web | grep 'VMM pid' | tr -s ' ' | cut -d' ' -f3)
kill -9 $pid
for i in $(seq 1 100); do state web | grep -q 'shut off' && break; sleep 0.1; done
echo "@@KILLED-STATE=$(state web)"
echo "@@KILLED-LIST=$(rvirt list --all | grep web | tr -s ' ')"

rm -f /tmp/web-serial.log
rvirt start web > /dev/null
ready web && echo "@@WEB-READY-AGAIN=1"
kill -9 $(pidof rvirtd)
sleep 1
start_daemon
echo "@@ADOPTED=$(rvirt list | grep web | tr -s ' ')"
echo "@@ADOPTED-SUSPEND=$(rvirt suspend web) $(state web)"
echo "@@ADOPTED-RESUME=$(rvirt resume web)"
echo "@@ADOPTED-SHUTDOWN=$(rvirt shutdown web --timeout 240 2>&1)"
echo "@@ADOPTED-STATE=$(state web)"
# The guest's own words from its serial file (the console is not L1's).
echo "@@GUEST-SAID=$(grep -o '@@L2-[A-Z-]*=[a-z0-9]*' /tmp/web-serial.log | sed 's/@@//' | tr '\n' ' ')"

# cgroup v2: limits, pins, and an enforced memory limit.
mount -t cgroup2 none /sys/fs/cgroup && echo "@@CG2=1"
# limited NAME MiB HARD-LIMIT-MiB [more kernel command line]: 2 vCPUs, the hog guest, limits and pins.
limited() {
domain $1 $2 2 hog.gz "$4" "<memtune><hard_limit unit='MiB'>$3</hard_limit></memtune><cputune><shares>2048</shares><period>100000</period><quota>150000</quota><vcpupin vcpu='1' cpuset='1'/><emulatorpin cpuset='0'/></cputune>"
rvirt define /tmp/$1.xml > /dev/null
}
limited tuned 256 400 ""
echo "@@TUNED-START=$(rvirt start tuned 2>&1)"
ready tuned && echo "@@TUNED-READY=1"
cg=/sys/fs/cgroup/rvirt/tuned
echo "@@CG-MEMORY-MAX=$(cat $cg/memory.max)"
echo "@@CG-CPU-MAX=$(cat $cg/cpu.max)"
echo "@@CG-CPU-WEIGHT=$(cat $cg/cpu.weight)"
echo "@@CG-PIDS-MAX=$(cat $cg/pids.max)"
pid=$(rvirt dominfo tuned | grep 'VMM pid' | tr -s ' ' | cut -d' ' -f3)
inner=$(for p in /proc/[0-9]*; do [ "$(awk '{print $4}' $p/stat 2>/dev/null)" = "$pid" ] && echo ${p#/proc/}; done | head -1)
grep -qx "$pid" $cg/cgroup.procs && grep -qx "$inner" $cg/cgroup.procs && echo "@@CG-HOLDS-VMM=1"
echo "@@PINS=$(for t in /proc/$inner/task/*; do echo "$(cat $t/comm)=$(awk '/Cpus_allowed_list/ {print $2}' $t/status)"; done | sort -u | tr '\n' ' ')"
rvirt destroy tuned > /dev/null
limited hog 512 160 hog
echo "@@HOG-START=$(rvirt start hog 2>&1)"
for i in $(seq 1 600); do state hog | grep -q 'shut off' && break; grep -q '@@L2-HOG-SURVIVED' /tmp/hog-serial.log && break; sleep 0.5; [ $((i % 20)) = 0 ] && echo "[rvirtd test] hog: $(state hog), $(cat /sys/fs/cgroup/rvirt/hog/memory.current) bytes"; done
echo "@@HOG-STATE=$(state hog)"
echo "@@HOG-OOM-KILLS=$(awk '/^oom_kill / {print $2}' /sys/fs/cgroup/rvirt/hog/memory.events)"
grep -q '@@L2-HOG-FILLING' /tmp/hog-serial.log && echo "@@HOG-FILLING=1"
grep -q '@@L2-HOG-SURVIVED' /tmp/hog-serial.log && echo "@@HOG-SURVIVED=1"

# The balloon with Debian's own driver: its statistics, and setmem.
domain mem 512 1 balloon.gz
rvirt define /tmp/mem.xml > /dev/null
echo "@@MEM-START=$(rvirt start mem 2>&1)"
ready mem && echo "@@MEM-READY=1"
for i in $(seq 1 100); do rvirt dommemstat mem | grep -q '^unused ' && break; sleep 0.2; done
rvirt dommemstat mem > /tmp/memstat1
sleep 1
rvirt dommemstat mem > /tmp/memstat2
echo "@@MEMSTAT1=$(tr '\n' ' ' < /tmp/memstat1)"
echo "@@MEMSTAT2=$(tr '\n' ' ' < /tmp/memstat2)"
echo "@@MEM-DOMSTATS=$(rvirt domstats mem --balloon --vcpu --block | tr '\n' ' ')"
echo "@@SETMEM=$(rvirt setmem mem 256M --live 2>&1)"
for i in $(seq 1 600); do [ "$(rvirt dommemstat mem | awk '/^actual / {print $2}')" = 262144 ] && break; sleep 0.1; done
echo "@@MEM-ACTUAL=$(rvirt dommemstat mem | awk '/^actual / {print $2}')"
echo "@@MEMSTAT3=$(rvirt dommemstat mem | tr '\n' ' ')"
echo "@@MEM-USED=$(rvirt dominfo mem | grep 'Used memory' | tr -s ' ' | cut -d' ' -f3)"
rvirt destroy mem > /dev/null
echo "@@BEGIN-LOGS"
cat /tmp/rvirtd.log
tail -5 /var/lib/rvirt/log/*.log
echo "@@END-LOGS"
"#;

/// A guest that says it is ready and idles; with `hog` on its command line
/// it first fills 400 MiB of its RAM through a tmpfs.
const HOG_GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
echo "@@L2-READY=1"
if grep -q hog /proc/cmdline; then
  mkdir -p /mnt && mount -t tmpfs -o size=450m none /mnt
  echo "@@L2-HOG-FILLING=1"
  dd if=/dev/zero of=/mnt/fill bs=1M count=400 2>/dev/null
  echo "@@L2-HOG-SURVIVED=1"
fi
while true; do sleep 1; done
"#;

/// A guest with Debian's virtio-balloon driver, which says it is ready and idles.
const BALLOON_GUEST: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
INSMOD
echo "@@L2-READY=1"
while true; do sleep 1; done
"#;

#[test]
fn rvirtd_manages_debian_guests_through_their_lifecycle() {
    let lab = Lab::get().unwrap();
    let initrd = l2_initramfs(ACPID_GUEST, &lab.acpid_modules()).unwrap();
    let mut spec = L1Spec::new("rvirtd", SCRIPT)
        .file(&lab.kernel, "l2/vmlinuz")
        .blob("l2/initrd.gz", initrd)
        .blob("l2/hog.gz", l2_initramfs(HOG_GUEST, &[]).unwrap())
        .blob("l2/balloon.gz", lab.virtio_initramfs(BALLOON_GUEST, &["virtio_balloon"], &[]).unwrap())
        .binary(&lab.rvirtd, "bin/rvirtd")
        .binary(&lab.rvirt, "bin/rvirt");
    spec.timeout = std::time::Duration::from_secs(1500);
    let out = lab.run(&spec).unwrap();
    out.check_l1().unwrap();
    let v = out.values();
    let get = |k: &str| {
        v.get(k).cloned().unwrap_or_else(|| panic!("no {k} in output:\n{}\n{}", out.tail(60), out.section("LOGS").unwrap_or_default()))
    };
    for (k, val) in &v {
        log(&format!("{k} = {val}"));
    }
    let logs = out.section("LOGS").unwrap_or_default();
    assert_eq!(get("DEFINE"), "Domain 'web' defined from /tmp/web.xml / Domain 'db' defined from /tmp/db.xml");
    assert_eq!(get("START"), "Domain 'web' started");
    assert_eq!(get("LIST-RUNNING"), " 1 web running");
    assert_eq!(get("WEB-READY"), "1", "the Debian guest booted:\n{logs}");
    assert_eq!(get("STATE-PAUSED"), "paused (user)");
    assert_eq!(get("PAUSED-GROWTH"), "0", "a suspended guest prints nothing");
    assert!(get("RESUMED-GROWTH").parse::<i64>().unwrap() > 0, "a resumed guest prints again");
    assert_eq!(get("SHUTDOWN"), "Domain 'web' is shut off", "{logs}");
    assert_eq!(get("STATE-AFTER-SHUTDOWN"), "shut off (shutdown)");
    assert_eq!(get("WEB-BUTTON"), "1", "the guest's acpid saw the power button");
    assert_eq!(get("DB-START"), "Domain 'db' started");
    assert_eq!(get("DB-DESTROY"), "Domain 'db' destroyed");
    assert_eq!(get("DB-STATE"), "shut off (destroyed)");
    assert_eq!(get("KILLED-STATE"), "shut off (crashed)");
    assert_eq!(get("KILLED-LIST"), " - web shut off");
    assert_eq!(get("WEB-READY-AGAIN"), "1");
    assert!(get("ADOPTED").ends_with(" web running"), "the restarted daemon found the running domain");
    assert_eq!(get("ADOPTED-SUSPEND"), "Domain 'web' suspended paused (user)");
    assert_eq!(get("ADOPTED-RESUME"), "Domain 'web' resumed");
    assert_eq!(get("ADOPTED-SHUTDOWN"), "Domain 'web' is shut off", "{logs}");
    assert_eq!(get("ADOPTED-STATE"), "shut off (shutdown)");
    assert_eq!(get("GUEST-SAID").trim(), "L2-READY=1 L2-POWER-BUTTON=pressed", "the adopted guest's own serial output");
    // cgroup v2 in L1.
    assert_eq!(get("CG2"), "1");
    assert_eq!(get("TUNED-START"), "Domain 'tuned' started", "{logs}");
    assert_eq!(get("TUNED-READY"), "1");
    assert_eq!(get("CG-MEMORY-MAX"), (400u64 << 20).to_string());
    assert_eq!(get("CG-CPU-MAX"), "150000 100000");
    assert_eq!(get("CG-CPU-WEIGHT"), "79", "2048 shares");
    assert_eq!(get("CG-PIDS-MAX"), "1024");
    assert_eq!(get("CG-HOLDS-VMM"), "1", "the reaper and the jailed VMM are in the domain's group");
    let pins = get("PINS");
    let pins: Vec<&str> = pins.split_whitespace().collect();
    for want in ["vcpu1=1", "vcpu0=0-1", "rvirt-vmm=0", "lineserver-poll=0"] {
        assert!(pins.contains(&want), "{want} in {pins:?}");
    }
    assert_eq!(get("HOG-START"), "Domain 'hog' started");
    assert_eq!(get("HOG-FILLING"), "1", "the guest began filling its memory");
    assert!(v.get("HOG-SURVIVED").is_none(), "a guest filling 400 MiB under a 160 MiB limit must not get there");
    assert_eq!(get("HOG-STATE"), "shut off (crashed)", "{logs}");
    assert!(get("HOG-OOM-KILLS").parse::<u32>().unwrap_or(0) >= 1, "the cgroup's OOM killer stopped the VMM");
    // Debian's balloon driver through rvirtd.
    assert_eq!(get("MEM-START"), "Domain 'mem' started", "{logs}");
    assert_eq!(get("MEM-READY"), "1");
    let stat = |text: &str, k: &str| -> u64 {
        let t: Vec<&str> = text.split_whitespace().collect();
        t.iter().position(|w| *w == k).and_then(|i| t.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {k} in {text}"))
    };
    let (m1, m2) = (get("MEMSTAT1"), get("MEMSTAT2"));
    let total = stat(&m1, "available");
    assert!((300 << 10..=512 << 10).contains(&total), "the guest's MemTotal, in KiB: {m1}");
    assert!(stat(&m1, "unused") > 0 && stat(&m1, "unused") < total, "{m1}");
    assert!(stat(&m1, "usable") > 0 && stat(&m1, "disk_caches") < total, "{m1}");
    assert_eq!(stat(&m1, "actual"), 512 << 10, "{m1}");
    assert!(stat(&m1, "rss") > 0, "{m1}");
    assert!(stat(&m2, "last_update") >= stat(&m1, "last_update"), "fresh figures each call: {m1} / {m2}");
    let ds = get("MEM-DOMSTATS");
    for want in ["Domain: 'mem'", "balloon.current=524288", "balloon.unused=", "balloon.available=", "vcpu.0.state=1", "vcpu.0.time=", "block.count=0"] {
        assert!(ds.contains(want), "'{want}' in {ds}");
    }
    assert_eq!(get("SETMEM"), "");
    assert_eq!(get("MEM-ACTUAL"), "262144", "the guest gave up 256 MiB: {logs}");
    let m3 = get("MEMSTAT3");
    assert!(stat(&m3, "unused") + (200 << 10) < stat(&m1, "unused"), "the driver's own free memory fell by the 256 MiB it gave up: {m1} / {m3}");
    assert_eq!(get("MEM-USED"), "262144");
}
