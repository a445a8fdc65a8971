//! Lab test: rvirtd and rvirt manage stock Debian guests in L1 with their
//! default paths (/var/lib/rvirt, /run/rvirt/rvirtd.sock): define, start,
//! suspend/resume, ACPI shutdown, destroy, a killed VMM, and a daemon
//! restart while a domain runs.

use rvirt_lab::{l2_initramfs, log, L1Spec, Lab, ACPID_GUEST};

const SCRIPT: &str = r#"
mkdir -p /var/lib /run
start_daemon() {
  rvirtd --allow-path /l2 --allow-path /tmp --allow-path /var/lib/rvirt >> /tmp/rvirtd.log 2>&1 &
  for i in $(seq 1 100); do rvirt list >/dev/null 2>&1 && break; sleep 0.1; done
}
start_daemon
domain() {
cat > /tmp/$1.xml <<EOF
<domain type='kvm'>
  <name>$1</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>/l2/vmlinuz</kernel>
    <initrd>/l2/initrd.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
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
echo "@@BEGIN-LOGS"
cat /tmp/rvirtd.log
tail -5 /var/lib/rvirt/log/*.log
echo "@@END-LOGS"
"#;

#[test]
fn rvirtd_manages_debian_guests_through_their_lifecycle() {
    let lab = Lab::get().unwrap();
    let initrd = l2_initramfs(ACPID_GUEST, &lab.acpid_modules()).unwrap();
    let mut spec = L1Spec::new("rvirtd", SCRIPT)
        .file(&lab.kernel, "l2/vmlinuz")
        .blob("l2/initrd.gz", initrd)
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
}
