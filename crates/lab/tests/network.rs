//! Lab test: a Debian guest on rvirtd's default network. In L1 (a KVM host
//! of its own), rvirtd with `--default-network` brings up libvirt's default
//! NAT network (virbr0, dnsmasq, nftables); a guest with
//! `<interface type='network'><source network='default'/>` asks for a lease
//! with its own DHCP client, reaches a host outside L1's bridge (a network
//! namespace behind an uplink) through the NAT, and that host cannot reach
//! it back; the lease shows in `net-dhcp-leases` and `domifaddr`; a second
//! card, `<interface type='direct'>` (a macvtap on L1's uplink), reaches
//! the outside's wire directly and is reached from it; destroying the
//! domain deletes the macvtap, destroying the network leaves no bridge or
//! dnsmasq behind.

use rvirt_lab::{insmod_lines, l2_initramfs, log, nethost, L1Spec, Lab};

/// After [`nethost::PRELUDE`].
const SCRIPT: &str = r#"
rvirtd --default-network --allow-path /l2 --allow-path /tmp > /tmp/rvirtd.log 2>&1 &
for i in $(seq 1 200); do rvirt net-list 2>/dev/null | grep -q 'default *active' && break; sleep 0.2; done
echo "@@NET-LIST=$(rvirt net-list --all | grep default | tr -s ' ')"
echo "@@BRIDGE=$(/usr/sbin/ip -4 -o addr show dev virbr0 | awk '{print $4}')"
cat > /tmp/g.xml <<EOF
<domain type='kvm'>
  <name>g</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>/l2/vmlinuz</kernel>
    <initrd>/l2/net.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <devices>
    <interface type='network'><source network='default'/><mac address='52:54:00:00:00:42'/></interface>
    <interface type='direct'><source dev='up0' mode='bridge'/><mac address='52:54:00:00:00:43'/></interface>
    <serial type='file'><source path='/tmp/g-serial.log'/></serial>
  </devices>
</domain>
EOF
echo "@@DEFINE=$(rvirt define /tmp/g.xml 2>&1)"
# In the background, with word of it every 10 s: the lab's stall detector
# must not take a slow start (TCG) for a hung L1.
rvirt start g > /tmp/start.out 2>&1 &
sp=$!
for i in $(seq 1 240); do kill -0 $sp 2>/dev/null || break; sleep 1; [ $((i % 10)) = 0 ] && echo "[network test] rvirt start g still running after $i s"; done
wait $sp
echo "@@START=$(cat /tmp/start.out)"
for i in $(seq 1 600); do grep -q '@@L2-DONE' /tmp/g-serial.log 2>/dev/null && break; sleep 0.5; [ $((i % 20)) = 0 ] && echo "[network test] waiting for the guest"; done
echo "@@GUEST-SAID=$(grep -o '@@L2-[A-Z-]*=[a-z0-9.]*' /tmp/g-serial.log | sed 's/@@//' | tr '\n' ' ')"
echo "@@LEASES=$(rvirt net-dhcp-leases default | grep 52:54:00:00:00:42 | tr -s ' ')"
echo "@@DOMIFADDR=$(rvirt domifaddr g | grep 52:54:00:00:00:42 | tr -s ' ')"
echo "@@FORWARDING=$(cat /proc/sys/net/ipv4/ip_forward)"
if ping -c 1 -W 2 198.51.100.2 >/dev/null 2>&1; then echo "@@L1-TO-OUTSIDE=reached"; else echo "@@L1-TO-OUTSIDE=unreached"; fi
echo "@@RULES=$(nft list table inet rvirt_virbr0 2>&1 | tr -s ' \n\t' ' ')"
gip=$(grep -o '@@L2-LEASE=[0-9.]*' /tmp/g-serial.log | cut -d= -f2)
nsenter --net=/proc/$OUT/ns/net /usr/sbin/ip route add 192.168.122.0/24 via 198.51.100.1
if nsenter --net=/proc/$OUT/ns/net ping -c 1 -W 2 $gip >/dev/null 2>&1; then echo "@@OUTSIDE-TO-GUEST=reached"; else echo "@@OUTSIDE-TO-GUEST=blocked"; fi
echo "@@MACVTAP=$(/usr/sbin/ip -d -o link show type macvtap | grep '@up0' | grep -o 'macvtap mode [a-z]*')"
if nsenter --net=/proc/$OUT/ns/net ping -c 1 -W 2 198.51.100.50 >/dev/null 2>&1; then echo "@@OUTSIDE-TO-DIRECT=reached"; else echo "@@OUTSIDE-TO-DIRECT=unreached"; fi
echo "@@DESTROY=$(rvirt destroy g 2>&1)"
echo "@@NET-DESTROY=$(rvirt net-destroy default 2>&1)"
[ -z "$(/usr/sbin/ip -o link show type macvtap)" ] && echo "@@MACVTAP-GONE=1"
/usr/sbin/ip link show virbr0 >/dev/null 2>&1 || echo "@@BRIDGE-GONE=1"
pidof dnsmasq >/dev/null || echo "@@DNSMASQ-GONE=1"
nft list tables | grep -q rvirt_ || echo "@@RULES-GONE=1"
echo "@@BEGIN-LOGS"
cat /tmp/rvirtd.log
tail -5 /var/lib/rvirt/log/g.log
echo "@@END-LOGS"
"#;

/// The guest: asks for a lease with busybox's udhcpc, then pings the outside.
const GUEST: &str = r#"
cat > /udhcpc.sh <<'EOS'
#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr add $ip/$mask dev $interface
[ -n "$router" ] && ip route add default via $router
echo "@@L2-LEASE=$ip"
echo "@@L2-ROUTER=$router"
EOS
chmod +x /udhcpc.sh
ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -q -n -t 30 -T 1 -s /udhcpc.sh 2>/dev/null || echo "@@L2-LEASE=none"
if ping -c 1 -W 3 192.168.122.1 >/dev/null 2>&1; then echo "@@L2-GATEWAY=reached"; else echo "@@L2-GATEWAY=unreached"; fi
if ping -c 3 -W 3 198.51.100.2 >/dev/null 2>&1; then echo "@@L2-OUTSIDE=reached"; else echo "@@L2-OUTSIDE=unreached"; fi
# The second card is a macvtap on L1's uplink: straight onto the outside's wire.
ip link set eth1 up
ip addr add 198.51.100.50/24 dev eth1
if ping -I eth1 -c 3 -W 3 198.51.100.2 >/dev/null 2>&1; then echo "@@L2-DIRECT=reached"; else echo "@@L2-DIRECT=unreached"; fi
echo "@@L2-DONE=1"
while true; do sleep 1; done
"#;

const MOUNTS: &str = "#!/bin/sh\nmount -t proc proc /proc\nmount -t sysfs sysfs /sys\nmount -t devtmpfs devtmpfs /dev\n";

#[test]
fn a_debian_guest_on_the_default_network_leases_and_reaches_the_outside_through_nat() {
    let lab = Lab::get().unwrap();
    let modules = lab.virtio_modules(&["virtio_net"]);
    let guest = l2_initramfs(&format!("{MOUNTS}{}{GUEST}", insmod_lines(&modules)), &modules).unwrap();
    let mut spec = L1Spec::new("network", &format!("{}{SCRIPT}", nethost::PRELUDE))
        .with_network_host(lab)
        .file(&lab.kernel, "l2/vmlinuz")
        .blob("l2/net.gz", guest);
    spec.timeout = std::time::Duration::from_secs(900);
    let out = lab.run(&spec).unwrap();
    out.check_l1().unwrap();
    let v = out.values();
    for (k, val) in &v {
        log(&format!("{k} = {val}"));
    }
    let logs = out.section("LOGS").unwrap_or_default();
    let get = |k: &str| v.get(k).cloned().unwrap_or_else(|| panic!("no {k} in output:\n{}\n{logs}", out.tail(60)));
    assert!(v.get("INSMOD-FAILED").is_none(), "a module did not load: {:?}", v.get("INSMOD-FAILED"));
    assert!(v.get("SETUP-FAILED").is_none(), "the outside could not be set up: {:?}", v.get("SETUP-FAILED"));
    assert_eq!(get("OUTSIDE-LINKS").trim(), "lo=127.0.0.1/8 out0=198.51.100.2/24");
    assert_eq!(get("FORWARDING"), "1");
    assert_eq!(get("NET-LIST"), " default active yes yes", "{logs}");
    assert_eq!(get("BRIDGE"), "192.168.122.1/24");
    assert_eq!(get("START"), "Domain 'g' started", "{logs}");
    let said = get("GUEST-SAID");
    let lease = said.split_whitespace().find_map(|w| w.strip_prefix("L2-LEASE=")).unwrap_or("none").to_string();
    assert!(lease.starts_with("192.168.122."), "the guest got a lease from the network's dnsmasq: {said}\n{logs}");
    assert!(said.contains("L2-ROUTER=192.168.122.1") && said.contains("L2-GATEWAY=reached"), "{said}");
    assert!(said.contains("L2-OUTSIDE=reached"), "the guest reaches the outside through NAT: {said}\n{logs}");
    assert!(get("LEASES").contains(&format!("{lease}/24")), "net-dhcp-leases shows the guest's lease");
    assert!(get("DOMIFADDR").ends_with(&format!("52:54:00:00:00:42 ipv4 {lease}/24")), "domifaddr shows the guest's address: {}", get("DOMIFADDR"));
    assert_eq!(get("OUTSIDE-TO-GUEST"), "blocked", "the outside cannot reach a guest behind NAT");
    assert_eq!(get("MACVTAP"), "macvtap mode bridge", "the direct card's macvtap is on the uplink");
    assert!(said.contains("L2-DIRECT=reached"), "the direct card reaches the outside's wire: {said}\n{logs}");
    assert_eq!(get("OUTSIDE-TO-DIRECT"), "reached", "and is reached from it");
    assert_eq!(get("MACVTAP-GONE"), "1", "the macvtap is deleted with the domain");
    assert_eq!(get("DESTROY"), "Domain 'g' destroyed");
    assert_eq!(get("NET-DESTROY"), "Network default destroyed");
    assert_eq!(get("BRIDGE-GONE"), "1");
    assert_eq!(get("DNSMASQ-GONE"), "1");
    assert_eq!(get("RULES-GONE"), "1");
}
