//! Virtual networks brought up and down for real (a bridge, dnsmasq,
//! nftables) inside network namespaces the test makes, never the
//! machine's: a stand-in guest (a veth on the bridge, in a namespace of its
//! own, asking with busybox's DHCP client) gets a lease, resolves a name the
//! network serves, reaches an "outside" namespace through NAT while the
//! outside cannot reach it; an isolated network reaches nothing outside;
//! on an IPv6 network it gets its route from router advertisements and an
//! address by DHCPv6 (ISC's dhclient); taking a network down leaves no
//! bridge, process or rule behind.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use rvirt_domain::NetworkDef;
use rvirtd::network::runtime::{self, NetworkFiles};
use support::Netns;

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(format!("/tmp/rvnet-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `body` on a thread in a network namespace of its own (the tools it
/// starts inherit it); `None` when this machine cannot make one.
fn in_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        sh("ip link set lo up");
        Some(body())
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Runs a shell command; its success and output (stdout and stderr).
fn sh(cmd: &str) -> (bool, String) {
    let o = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

fn ok(cmd: &str) -> String {
    let (good, out) = sh(cmd);
    assert!(good, "{cmd}: {out}");
    out
}

/// A stand-in guest: a namespace whose `eth0` is a veth on `bridge`; it
/// asks for a lease with busybox's udhcpc and returns the address it got.
fn guest_on(bridge: &str, dir: &Path, n: u32) -> (Netns, Option<String>) {
    let g = Netns::new();
    ok(&format!("ip link add vg{n} type veth peer name vh{n} && ip link set vg{n} netns {} && ip link set vh{n} master {bridge} up", g.pid()));
    let script = dir.join("udhcpc.sh");
    std::fs::write(&script, "#!/bin/sh\n[ \"$1\" = bound ] && ip addr add $ip/$mask dev $interface && { [ -n \"$router\" ] && ip route add default via $router; echo \"LEASE $ip\"; }\nexit 0\n").unwrap();
    ok(&format!("chmod +x {}", script.display()));
    // With spanning tree on (libvirt's default) a new port forwards after
    // the kernel's least forward delay, 2 s twice: ask for up to 15 s.
    let (_, out) = g.sh(&format!("ip link set lo up && ip link set vg{n} name eth0 && ip link set eth0 up && busybox udhcpc -i eth0 -q -n -t 15 -T 1 -s {}", script.display()));
    let ip = out.lines().find_map(|l| l.strip_prefix("LEASE ")).map(str::to_string);
    if ip.is_none() {
        eprintln!("udhcpc said:\n{out}");
    }
    (g, ip)
}

/// The "outside": a namespace at 198.51.100.2 behind the uplink 198.51.100.1.
fn outside() -> Netns {
    let o = Netns::new();
    ok(&format!("ip link add up0 type veth peer name out0 && ip link set out0 netns {} && ip addr add 198.51.100.1/24 dev up0 && ip link set up0 up", o.pid()));
    let (good, out) = o.sh("ip link set lo up && ip addr add 198.51.100.2/24 dev out0 && ip link set out0 up");
    assert!(good, "{out}");
    o
}

fn pinged(from: &Netns, to: &str) -> bool {
    from.sh(&format!("busybox ping -c 1 -W 2 {to}")).1.contains("1 packets received")
}

#[test]
fn a_nat_network_leases_resolves_and_masquerades_and_leaves_nothing_behind() {
    let dir = scratch("nat");
    let ran = in_netns(move || {
        let def = NetworkDef::parse(
            "<network><name>default</name><forward mode='nat'/><bridge name='rvbr0'/><domain name='lab.test'/>\
             <dns><host ip='10.77.0.9'><hostname>db</hostname></host></dns>\
             <ip address='10.77.0.1' netmask='255.255.255.0'><dhcp><range start='10.77.0.100' end='10.77.0.150'/></dhcp></ip></network>",
        )
        .unwrap();
        let files = NetworkFiles::new(&dir, "default");
        let out = outside();
        runtime::start(&def, "rvbr0", &files).unwrap();
        assert!(runtime::is_active(&def, "rvbr0", &files));
        let e = runtime::start(&def, "rvbr0", &files).unwrap_err();
        assert!(e.contains("rvbr0 already exists"), "{e}");

        let (guest, ip) = guest_on("rvbr0", &dir, 1);
        let ip = ip.expect("the guest got a lease");
        let n: u8 = ip.rsplit('.').next().unwrap().parse().unwrap();
        assert!(ip.starts_with("10.77.0.") && (100..=150).contains(&n), "{ip}");
        assert!(std::fs::read_to_string(&files.leases).unwrap().contains(&ip), "dnsmasq's lease file has it");
        let (_, dns) = guest.sh("busybox nslookup -type=a db 10.77.0.1");
        assert!(dns.contains("10.77.0.9"), "the network's DNS answers for its names: {dns}");
        // Out through NAT; never in.
        assert!(pinged(&guest, "198.51.100.2"), "the guest reaches the outside");
        out.sh("ip route add 10.77.0.0/24 via 198.51.100.1");
        assert!(!pinged(&out, &ip), "the outside cannot reach a guest behind NAT");
        let rules = ok("nft list table inet rvirt_rvbr0");
        assert!(rules.contains("masquerade"), "{rules}");

        let pid = runtime::dnsmasq_pid(&files).unwrap();
        runtime::stop(&def, "rvbr0", &files).unwrap();
        assert!(!runtime::link_exists("rvbr0"), "no bridge left");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "no dnsmasq left");
        assert!(!sh("nft list table inet rvirt_rvbr0").0, "no rules left");
        assert!(!runtime::is_active(&def, "rvbr0", &files));
        // Down twice is not an error.
        runtime::stop(&def, "rvbr0", &files).unwrap();
    });
    if ran.is_none() {
        eprintln!("note: no network namespace here; networks not exercised");
    }
}

#[test]
fn an_ipv6_network_advertises_leases_by_dhcpv6_and_routes_both_ways() {
    let dir = scratch("six");
    let ran = in_netns(move || {
        let Ok(dhclient) = which("dhclient") else {
            panic!("dhclient (Debian package isc-dhcp-client) is needed for the DHCPv6 client; .ci/run installs it");
        };
        let def = NetworkDef::parse(
            "<network><name>six</name><forward mode='route'/><bridge name='rvbr6' stp='off'/>\
             <ip family='ipv6' address='fd00:77::1' prefix='64'><dhcp><range start='fd00:77::100' end='fd00:77::1ff'/></dhcp></ip></network>",
        )
        .unwrap();
        let files = NetworkFiles::new(&dir, "six");
        let out = Netns::new();
        ok(&format!("ip link add up0 type veth peer name out0 && ip link set out0 netns {} && ip addr add fd00:51::1/64 dev up0 nodad && ip link set up0 up", out.pid()));
        let (good, said) = out.sh("ip link set lo up && ip addr add fd00:51::2/64 dev out0 nodad && ip link set out0 up && ip -6 route add fd00:77::/64 via fd00:51::1");
        assert!(good, "{said}");
        runtime::start(&def, "rvbr6", &files).unwrap();
        assert_eq!(std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").unwrap().trim(), "1");
        let conf = std::fs::read_to_string(&files.conf).unwrap();
        assert!(conf.contains("dhcp-range=fd00:77::100,fd00:77::1ff,64") && conf.contains("enable-ra"), "{conf}");

        // The stand-in guest: router advertisements give it its default
        // route, DHCPv6 (ISC's dhclient) its address.
        let g = Netns::new();
        ok(&format!("ip link add vg6 type veth peer name vh6 && ip link set vg6 netns {} && ip link set vh6 master rvbr6 up", g.pid()));
        // dhclient stays to renew: stopped when the test ends, however it ends
        // (its own script would release the address).
        struct StopDhclient(PathBuf);
        impl Drop for StopDhclient {
            fn drop(&mut self) {
                sh(&format!("kill $(cat {}) 2>/dev/null", self.0.display()));
            }
        }
        let _dhclient = StopDhclient(dir.join("dh6.pid"));
        let script = dir.join("dhclient6.sh");
        std::fs::write(&script, "#!/bin/sh\ncase $reason in BOUND6|REBOOT6) ip -6 addr add $new_ip6_address/128 dev $interface nodad && echo \"LEASE6 $new_ip6_address\";; esac\nexit 0\n").unwrap();
        ok(&format!("chmod +x {}", script.display()));
        let (_, said) = g.sh(&format!(
            "sysctl -qw net.ipv6.conf.vg6.accept_dad=0 && ip link set lo up && ip link set vg6 address 52:54:00:00:06:06 && ip link set vg6 up && sleep 0.5 && \
             timeout 30 {dhclient} -6 -1 -v -sf {s} -lf {d}/dh6.leases -pf {d}/dh6.pid vg6",
            s = script.display(),
            d = dir.display()
        ));
        let ip = said.lines().find_map(|l| l.strip_prefix("LEASE6 ")).unwrap_or_else(|| panic!("no DHCPv6 lease: {said}")).to_string();
        let addr: std::net::Ipv6Addr = ip.parse().unwrap();
        let low = u128::from(addr) & 0xffff;
        assert!(ip.starts_with("fd00:77::") && (0x100..=0x1ff).contains(&low), "{ip}");
        let leases = runtime::read_leases(&files);
        let lease = leases.iter().find(|l| l.ip.to_string() == ip).unwrap_or_else(|| panic!("dnsmasq's lease file has it: {leases:?}"));
        assert_eq!(lease.mac, "52:54:00:00:06:06", "the MAC read from the client's DUID");
        // The default route came from the network's router advertisements.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let (_, routes) = g.sh("ip -6 route show default");
            if routes.contains("proto ra") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no default route from an RA: {routes}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let ping6 = |from: &Netns, to: &str| from.sh(&format!("busybox ping6 -c 1 -W 2 {to}")).1.contains("1 packets received");
        assert!(ping6(&g, "fd00:77::1"), "the guest reaches the host on the bridge");
        assert!(ping6(&g, "fd00:51::2"), "and, routed, the outside");
        assert!(ping6(&out, &ip), "a routed network is reachable from the outside");
        runtime::stop(&def, "rvbr6", &files).unwrap();
        assert!(!runtime::link_exists("rvbr6"));
        drop(g);
    });
    if ran.is_none() {
        eprintln!("note: no network namespace here; networks not exercised");
    }
}

/// The full path of `tool` in the usual directories, or why not.
fn which(tool: &str) -> Result<String, String> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().map(|d| format!("{d}/{tool}")).find(|p| Path::new(p).is_file()).ok_or_else(|| format!("{tool} not found"))
}

#[test]
fn an_isolated_network_reaches_nothing_outside_and_bad_starts_leave_nothing() {
    let dir = scratch("iso");
    let ran = in_netns(move || {
        let def = NetworkDef::parse(
            "<network><name>iso</name><bridge name='rvbr1'/><ip address='10.78.0.1' prefix='24'><dhcp><range start='10.78.0.10' end='10.78.0.20'/></dhcp></ip></network>",
        )
        .unwrap();
        let files = NetworkFiles::new(&dir, "iso");
        let _outside = outside();
        runtime::start(&def, "rvbr1", &files).unwrap();
        let (guest, ip) = guest_on("rvbr1", &dir, 2);
        assert!(ip.is_some_and(|i| i.starts_with("10.78.0.")), "isolated networks still lease");
        assert!(pinged(&guest, "10.78.0.1"), "the guest reaches the host on the bridge");
        assert!(!pinged(&guest, "198.51.100.2"), "but nothing beyond it");
        runtime::stop(&def, "rvbr1", &files).unwrap();

        // Another table whose forward chain drops by default (as Docker's does) is found, so rvirtd can warn of it.
        assert!(runtime::dropping_forward_tables().is_empty());
        ok("nft add table inet dockerlike && nft add chain inet dockerlike blocked '{ type filter hook forward priority 0 ; policy drop ; }'");
        assert_eq!(runtime::dropping_forward_tables(), ["inet dockerlike"]);
        ok("nft delete table inet dockerlike");
        // A subnet the host already routes is refused, and nothing is left half-made.
        ok("ip link add busy0 type bridge && ip addr add 10.79.0.1/16 dev busy0 && ip link set busy0 up");
        let clash = NetworkDef::parse("<network><name>clash</name><forward/><bridge name='rvbr2'/><ip address='10.79.5.1' prefix='24'/></network>").unwrap();
        let e = runtime::start(&clash, "rvbr2", &NetworkFiles::new(&dir, "clash")).unwrap_err();
        assert!(e.contains("overlaps the host's route 10.79.0.0/16 (dev busy0)"), "{e}");
        // A bridge name in use.
        let taken = NetworkDef::parse("<network><name>taken</name><bridge name='busy0'/><ip address='10.80.0.1' prefix='24'/></network>").unwrap();
        let e = runtime::start(&taken, "busy0", &NetworkFiles::new(&dir, "taken")).unwrap_err();
        assert!(e.contains("busy0 already exists"), "{e}");
        assert!(!runtime::link_exists("rvbr2"));
        assert!(!sh("nft list table inet rvirt_rvbr2").0);
        // A failure half-way (dnsmasq's files cannot be written once the
        // bridge and rules are made) takes down what was made.
        let half = NetworkDef::parse("<network><name>half</name><forward/><bridge name='rvbr3'/><ip address='10.81.0.1' prefix='24'/></network>").unwrap();
        let e = runtime::start(&half, "rvbr3", &NetworkFiles::new(Path::new("/nonexistent/rvirt"), "half")).unwrap_err();
        assert!(e.contains("/nonexistent/rvirt/half.conf"), "{e}");
        assert!(!runtime::link_exists("rvbr3"), "the bridge was taken down");
        assert!(!sh("nft list table inet rvirt_rvbr3").0, "the rules were taken down");
        drop(guest);
    });
    if ran.is_none() {
        eprintln!("note: no network namespace here; networks not exercised");
    }
}

#[test]
fn rvirt_s_net_commands_and_the_default_network_on_a_daemon_in_its_own_namespace() {
    let dir = support::scratch("net-cli");
    let mut d = support::Daemon::start_in_netns(&dir);
    d.kill();
    // --default-network: libvirt's default network, defined and autostarted.
    d.extra_args = vec!["--default-network".into()];
    d.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let list = d.ok(&["net-list", "--all"]);
        if list.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["default", "active", "yes", "yes"]) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{list}\n{}", d.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let xml = d.ok(&["net-dumpxml", "default"]);
    assert!(xml.contains("<bridge name='virbr0'") && xml.contains("192.168.122.1"), "{xml}");
    let in_ns = |cmd: &str| sh(&format!("nsenter --net=/proc/{}/ns/net sh -c '{cmd}'", d.pid()));
    assert!(in_ns("ip -o link show dev virbr0").0, "virbr0 is up in the daemon's namespace");

    // rvirt install without --network puts the card on the default network, as virt-install does.
    let k = support::kernels(&dir);
    let disk = format!("path={},size=0.001,format=raw", dir.join("inst.raw").display());
    d.ok(&["install", "--name", "inst", "--memory", "64", "--kernel", k.idle.to_str().unwrap(), "--disk", &disk]);
    let xml = d.ok(&["dumpxml", "inst"]);
    assert!(xml.contains("<interface type='network'>") && xml.contains("<source network='default'/>"), "{xml}");
    let (_, on_bridge) = in_ns("ip -o link show master virbr0");
    assert!(on_bridge.contains("rv"), "the installed domain's tap is on virbr0: {on_bridge}");
    d.ok(&["destroy", "inst"]);

    // <interface type='direct'>: a macvtap on a host interface, made at
    // start with the card's MAC, its /dev/tapN handed to the VMM, deleted
    // when the VMM ends.
    assert!(in_ns("ip link add lower0 type veth peer name lower1 && ip link set lower1 up && ip link set lower0 up").0);
    let xml = support::domain_xml("dir", &k.idle, "<devices><interface type='direct'><source dev='lower0' mode='bridge'/><mac address='52:54:00:00:0d:01'/></interface></devices>");
    let f = d.xml_file("dir", &xml);
    d.ok(&["define", f.to_str().unwrap()]);
    assert!(d.ok(&["dumpxml", "dir"]).contains("<source dev='lower0' mode='bridge'/>"));
    d.ok(&["start", "dir"]);
    let (_, link) = in_ns("ip -d -o link show type macvtap");
    assert!(link.contains("@lower0") && link.contains("52:54:00:00:0d:01") && link.contains("macvtap mode bridge"), "{link}");
    let vmm = d.jailed_vmm_pid("dir");
    let (_, held) = sh(&format!("ls -l /proc/{vmm}/fd"));
    let index = link.split(':').next().unwrap_or_default().to_string();
    assert!(held.contains(&format!("/dev/tap{}", index.trim())), "the VMM holds /dev/tap{}: {held}", index.trim());
    d.ok(&["destroy", "dir"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !in_ns("ip -o link show type macvtap").1.trim().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the macvtap was not deleted");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // A host interface that does not exist: refused, nothing made.
    let f = d.xml_file("dir2", &support::domain_xml("dir2", &k.idle, "<devices><interface type='direct'><source dev='nosuch0'/></interface></devices>"));
    d.ok(&["define", f.to_str().unwrap()]);
    d.fails(&["start", "dir2"], "host interface 'nosuch0' does not exist");
    // A name taken by an interface rvirtd did not make is not deleted.
    let f = d.xml_file("dir3", &support::domain_xml("dir3", &k.idle, "<devices><interface type='direct'><source dev='lower0'/><target dev='lower0'/></interface></devices>"));
    d.ok(&["define", f.to_str().unwrap()]);
    d.fails(&["start", "dir3"], "'lower0' already exists, not a macvtap");
    assert!(in_ns("ip link show lower0").0);
    // Nor is a macvtap someone else made (another VM's): refused, left alone,
    // and the card before it that this start made is undone.
    assert!(in_ns("ip link add link lower0 name theirs0 type macvtap mode bridge").0);
    let f = d.xml_file("dir4", &support::domain_xml("dir4", &k.idle, "<devices><interface type='direct'><source dev='lower0'/><target dev='mine0'/></interface><interface type='direct'><source dev='lower0'/><target dev='theirs0'/></interface></devices>"));
    d.ok(&["define", f.to_str().unwrap()]);
    d.fails(&["start", "dir4"], "'theirs0' already exists, a macvtap");
    assert!(in_ns("ip link show theirs0").0, "another's macvtap is left alone");
    assert!(!in_ns("ip link show mine0").0, "the one this start made is deleted");
    assert!(in_ns("ip link del theirs0").0);
    for n in ["dir", "dir2", "dir3", "dir4"] {
        d.ok(&["undefine", n]);
    }
    // A second network through rvirt's own commands.
    let f = dir.join("lab.xml");
    std::fs::write(&f, "<network><name>lab</name><forward mode='route'/><ip address='10.91.0.1' prefix='24'><dhcp><range start='10.91.0.10' end='10.91.0.20'/></dhcp></ip></network>").unwrap();
    assert_eq!(d.ok(&["net-define", f.to_str().unwrap()]).trim(), format!("Network lab defined from {}", f.display()));
    assert_eq!(d.ok(&["net-start", "lab"]).trim(), "Network lab started");
    d.fails(&["net-start", "lab"], "is already active");
    assert!(d.ok(&["net-list"]).contains("lab"));
    let info = d.ok(&["net-info", "lab"]);
    assert!(info.contains("Active:         yes") && info.contains("Bridge:         virbr1"), "{info}");
    // net-update: a fixed lease, live and in the definition.
    let host = "<host mac='52:54:00:00:00:91' ip='10.91.0.91'/>";
    assert_eq!(d.ok(&["net-update", "lab", "add", "ip-dhcp-host", host, "--live", "--config"]).trim(), "Updated network lab");
    assert!(d.ok(&["net-dumpxml", "lab"]).contains("ip='10.91.0.91'") && d.ok(&["net-dumpxml", "--inactive", "lab"]).contains("ip='10.91.0.91'"));
    d.fails(&["net-update", "lab", "add", "ip-dhcp-host", host, "--live"], "already a fixed lease");
    d.fails(&["net-update", "lab", "add", "forward", "<forward mode='route'/>"], "ip-dhcp-host, ip-dhcp-range and dns-host sections, not 'forward'");
    // A DNS name, live and in the definition; added or deleted, never modified.
    let name = "<host ip='10.91.0.9'><hostname>files</hostname></host>";
    assert_eq!(d.ok(&["net-update", "lab", "add-last", "dns-host", name, "--live", "--config"]).trim(), "Updated network lab");
    assert!(d.ok(&["net-dumpxml", "lab"]).contains("<hostname>files</hostname>") && d.ok(&["net-dumpxml", "--inactive", "lab"]).contains("<hostname>files</hostname>"));
    d.fails(&["net-update", "lab", "add", "dns-host", "<host ip='10.91.0.10'><hostname>files</hostname></host>", "--live"], "already a DNS host");
    d.fails(&["net-update", "lab", "modify", "dns-host", name, "--live"], "cannot be modified");
    d.fails(&["net-update", "lab", "add", "dns-host", "<host ip='10.91.0.11'/>", "--live"], "needs at least one <hostname>");
    assert_eq!(d.ok(&["net-update", "lab", "delete", "dns-host", name, "--config"]).trim(), "Updated network lab");
    assert!(!d.ok(&["net-dumpxml", "--inactive", "lab"]).contains("files") && d.ok(&["net-dumpxml", "lab"]).contains("files"), "config only");
    // Refused in the running network, so not kept in the definition either.
    d.fails(&["net-update", "lab", "add", "dns-host", name, "--live", "--config"], "already a DNS host");
    assert!(!d.ok(&["net-dumpxml", "--inactive", "lab"]).contains("files"), "nothing half-applied");
    // A DHCP range, live: dnsmasq reads ranges only at start, so it is restarted with them.
    let pid_file = d.state.join("networks/run/lab.pid");
    let before = std::fs::read_to_string(&pid_file).unwrap();
    let range = "<range start='10.91.0.100' end='10.91.0.110'/>";
    assert_eq!(d.ok(&["net-update", "lab", "add", "ip-dhcp-range", range, "--live"]).trim(), "Updated network lab");
    let after = std::fs::read_to_string(&pid_file).unwrap();
    assert_ne!(before, after, "a new dnsmasq");
    assert!(in_ns(&format!("kill -0 {}", after.trim())).0, "it runs");
    let conf = std::fs::read_to_string(d.state.join("networks/run/lab.conf")).unwrap();
    assert!(conf.contains("dhcp-range=10.91.0.10,10.91.0.20") && conf.contains("dhcp-range=10.91.0.100,10.91.0.110"), "{conf}");
    assert!(d.ok(&["net-dumpxml", "lab"]).contains("start='10.91.0.100'") && !d.ok(&["net-dumpxml", "--inactive", "lab"]).contains("10.91.0.100"), "live only");
    d.fails(&["net-update", "lab", "add", "ip-dhcp-range", "<range start='10.91.0.105' end='10.91.0.120'/>", "--live"], "overlaps the range 10.91.0.100-10.91.0.110");
    d.fails(&["net-update", "lab", "add", "ip-dhcp-range", "<range start='10.92.0.5' end='10.92.0.9'/>", "--live"], "is not a range inside 10.91.0.0/24");
    d.fails(&["net-update", "lab", "modify", "ip-dhcp-range", range, "--live"], "cannot be modified");
    assert_eq!(d.ok(&["net-update", "lab", "delete", "ip-dhcp-range", range, "--live"]).trim(), "Updated network lab");
    d.fails(&["net-update", "lab", "delete", "ip-dhcp-range", range, "--live"], "no DHCP range 10.91.0.100-10.91.0.110 to delete");
    d.fails(&["net-update", "lab", "delete", "ip-dhcp-range", "<range start='10.91.0.10' end='10.91.0.20'/>", "--live"], "only DHCP range");
    assert!(!std::fs::read_to_string(d.state.join("networks/run/lab.conf")).unwrap().contains("10.91.0.100"));
    // net-edit: the stored definition through $EDITOR; the running network keeps its own.
    let o = d.rvirt_with(&["net-edit", "lab"], &[("EDITOR", "sed -i 's#10.91.0.20#10.91.0.30#'")], None);
    assert!(o.code == 0 && o.stdout.contains("Network lab XML configuration edited."), "{o:?}");
    assert!(d.ok(&["net-dumpxml", "--inactive", "lab"]).contains("end='10.91.0.30'"));
    assert!(d.ok(&["net-dumpxml", "lab"]).contains("end='10.91.0.20'"));
    assert!(d.ok(&["net-dhcp-leases", "lab"]).contains("MAC address"), "an empty lease table");
    d.fails(&["net-dhcp-leases", "nosuch"], "no network with a matching name");
    assert_eq!(d.ok(&["net-autostart", "lab"]).trim(), "Network lab marked as autostarted");
    // The read-only socket shows networks and changes none.
    let ro = Command::new(&support::bins().rvirt).arg("--connect").arg(dir.join("rvirtd-ro.sock")).args(["net-destroy", "lab"]).output().unwrap();
    assert!(!ro.status.success() && String::from_utf8_lossy(&ro.stderr).contains("read-only socket"), "{ro:?}");
    assert_eq!(d.ok(&["net-destroy", "lab"]).trim(), "Network lab destroyed");
    assert_eq!(d.ok(&["net-undefine", "lab"]).trim(), "Network lab has been undefined");
    assert!(!d.ok(&["net-list", "--all"]).contains("lab"));
    d.ok(&["net-destroy", "default"]);
    assert!(!in_ns("ip -o link show dev virbr0").0, "virbr0 is gone");
}

