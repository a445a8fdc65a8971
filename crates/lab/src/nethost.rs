//! L1 as a host for rvirt's virtual networks: iproute2, nftables and
//! dnsmasq (with the libraries they link), the kernel modules for bridges,
//! taps, veths, macvtaps and nftables NAT, and a shell prelude that loads them and
//! makes an "outside" host (a network namespace at 198.51.100.2 behind
//! L1's uplink 198.51.100.1) for guests to reach through NAT.

use crate::{L1Spec, Lab};

/// L1 modules for bridges, taps, veths, macvtaps and nftables NAT, in load order.
const MODULES: &[&str] = &[
    "net/llc/llc.ko",
    "net/802/stp.ko",
    "net/bridge/bridge.ko",
    "drivers/net/tun.ko",
    "drivers/net/veth.ko",
    "drivers/net/macvlan.ko",
    "drivers/net/tap.ko",
    "drivers/net/macvtap.ko",
    "lib/libcrc32c.ko",
    "net/netfilter/nfnetlink.ko",
    "net/netfilter/nf_tables.ko",
    "net/ipv4/netfilter/nf_defrag_ipv4.ko",
    "net/ipv6/netfilter/nf_defrag_ipv6.ko",
    "net/netfilter/nf_conntrack.ko",
    "net/netfilter/nf_nat.ko",
    "net/netfilter/nft_chain_nat.ko",
    "net/netfilter/nft_masq.ko",
    "net/netfilter/nft_ct.ko",
    "net/ipv4/netfilter/nf_reject_ipv4.ko",
    "net/ipv6/netfilter/nf_reject_ipv6.ko",
    "net/netfilter/nft_reject.ko",
    "net/netfilter/nft_reject_inet.ko",
];

/// The start of an L1 script for network tests: modules loaded (a failure
/// prints `@@INSMOD-FAILED=`), the users dnsmasq drops to, iproute2 ahead of
/// busybox for rvirtd (this shell prefers its own applets, so scripts name
/// `/usr/sbin/ip`), and the outside host, whose namespace `$OUT` holds
/// (`@@OUTSIDE-LINKS=` says what it has; a failure prints `@@SETUP-FAILED=`).
pub const PRELUDE: &str = r#"
for m in /lib/modules/net-*.ko; do insmod $m 2>/dev/null || echo "@@INSMOD-FAILED=$m"; done
mkdir -p /var/lib /run /etc
echo 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >> /etc/passwd
echo 'nogroup:x:65534:' >> /etc/group
export PATH=/usr/sbin:/usr/bin:$PATH
unshare -n sleep 100000 & OUT=$!
sleep 1
/usr/sbin/ip link add up0 type veth peer name out0 || echo "@@SETUP-FAILED=veth"
/usr/sbin/ip link set out0 netns $OUT || echo "@@SETUP-FAILED=netns"
/usr/sbin/ip addr add 198.51.100.1/24 dev up0
/usr/sbin/ip link set up0 up
nsenter --net=/proc/$OUT/ns/net /usr/sbin/ip link set lo up
nsenter --net=/proc/$OUT/ns/net /usr/sbin/ip addr add 198.51.100.2/24 dev out0
nsenter --net=/proc/$OUT/ns/net /usr/sbin/ip link set out0 up
echo "@@OUTSIDE-LINKS=$(nsenter --net=/proc/$OUT/ns/net /usr/sbin/ip -4 -o addr | awk '{print $2 "=" $4}' | tr '\n' ' ')"
"#;

impl L1Spec {
    /// Adds what [`PRELUDE`] needs: rvirtd and rvirt, iproute2, nftables,
    /// dnsmasq and the network modules.
    pub fn with_network_host(self, lab: &Lab) -> Self {
        let mut spec = self
            .binary(&lab.rvirtd, "bin/rvirtd")
            .binary(&lab.rvirt, "bin/rvirt")
            .binary("/usr/sbin/dnsmasq", "usr/sbin/dnsmasq")
            .binary("/usr/sbin/nft", "usr/sbin/nft")
            .binary("/usr/sbin/ip", "usr/sbin/ip");
        for (i, m) in MODULES.iter().enumerate() {
            // Numbered, so the prelude's glob loads them in this order.
            spec = spec.file(lab.module_in_tree(m), &format!("lib/modules/net-{i:02}.ko"));
        }
        spec
    }
}
