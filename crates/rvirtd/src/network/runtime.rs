//! Bringing a virtual network up and down, as libvirt does: a Linux bridge
//! with the host's address, dnsmasq for DHCP and DNS (its own config file,
//! `bind-dynamic`, `except-interface=lo`, a hosts file reloaded on SIGHUP,
//! a lease file, a pid file), and for every kind but `open` an nftables
//! table of rvirt's own (masquerading for NAT, forwarding for the
//! network, DHCP and DNS let in). The tools are iproute2's `ip`,
//! nftables' `nft` and dnsmasq, run in the daemon's network namespace.
//! Whatever fails half-way is taken down again before the error is returned.

use std::fmt::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rvirt_domain::{ForwardMode, IpDef, NetworkDef};

/// The files of one running network, under the daemon's state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkFiles {
    /// dnsmasq's configuration.
    pub conf: PathBuf,
    /// dnsmasq's pid file.
    pub pid: PathBuf,
    /// Fixed leases (`mac,ip,name`), re-read on SIGHUP.
    pub hosts: PathBuf,
    /// Extra DNS names (`ip name...`).
    pub addn_hosts: PathBuf,
    /// dnsmasq's lease file.
    pub leases: PathBuf,
}

impl NetworkFiles {
    /// The files of network `name` in `dir`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let f = |ext: &str| dir.join(format!("{name}.{ext}"));
        Self { conf: f("conf"), pid: f("pid"), hosts: f("hostsfile"), addn_hosts: f("addnhosts"), leases: f("leases") }
    }
}

/// Runs `tool args`, returning its output or an error naming the command
/// and what it printed (and the package when the tool is missing).
fn run(tool: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(tool).args(args).output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{tool} is not installed ({})", package_of(tool)),
        _ => format!("running {tool}: {e}"),
    })?;
    if !out.status.success() {
        return Err(format!("{tool} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Debian package that has `tool`.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "nft" => "Debian package nftables",
        "dnsmasq" => "Debian package dnsmasq-base",
        _ => "Debian package iproute2",
    }
}

/// Loads a ruleset into nftables (`nft -f -`), in one transaction.
fn load_nft(rules: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut c = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nft: {e} ({})", package_of("nft")))?;
    if let Some(mut i) = c.stdin.take() {
        i.write_all(rules.as_bytes()).map_err(|e| format!("feeding nft: {e}"))?;
    }
    let out = c.wait_with_output().map_err(|e| format!("running nft: {e}"))?;
    if !out.status.success() {
        return Err(format!("nft refused the network's rules: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Refuses a network whose tools are missing, naming the package.
pub fn check_tools(def: &NetworkDef) -> Result<(), String> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin".into(), "/sbin".into()]);
    check_tools_in(def, &dirs)
}

/// [`check_tools`] over an explicit list of directories to look in.
fn check_tools_in(def: &NetworkDef, dirs: &[PathBuf]) -> Result<(), String> {
    let mut need = vec!["ip"];
    if def.forward != ForwardMode::Open {
        need.push("nft");
    }
    if !def.ips.is_empty() {
        need.push("dnsmasq");
    }
    for t in need {
        if !dirs.iter().any(|d| d.join(t).is_file()) {
            return Err(format!("network '{}' needs {t}, which is not installed ({})", def.name, package_of(t)));
        }
    }
    Ok(())
}

/// The nftables table of a network: named after its bridge.
pub fn table_name(bridge: &str) -> String {
    format!("rvirt_{}", bridge.replace(['-', '.'], "_"))
}

fn subnet(i: &IpDef) -> String {
    format!("{}/{}", i.network(), i.prefix)
}

/// The nftables table for `def` on `bridge` (an `inet` table, so one holds
/// IPv4 and IPv6): NAT masquerades the network's IPv4 traffic leaving for
/// elsewhere (not multicast 224.0.0.0/24 nor broadcast); NAT and route
/// forward the network's traffic out and (NAT: established only) back in;
/// every kind lets bridge-to-bridge traffic pass, rejects the rest in or
/// out of the bridge, and lets DHCP and DNS reach dnsmasq.
pub fn nft_rules(def: &NetworkDef, bridge: &str) -> String {
    let t = table_name(bridge);
    let mut o = String::new();
    let _ = writeln!(o, "table inet {t} {{");
    if def.forward == ForwardMode::Nat {
        let _ = writeln!(o, "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;");
        for i in def.ips.iter().filter(|i| i.address.is_ipv4()) {
            let s = subnet(i);
            let _ = writeln!(o, "    ip saddr {s} ip daddr 224.0.0.0/24 return");
            let _ = writeln!(o, "    ip saddr {s} ip daddr 255.255.255.255 return");
            let _ = writeln!(o, "    ip saddr {s} ip daddr != {s} masquerade");
        }
        let _ = writeln!(o, "  }}");
    }
    let _ = writeln!(o, "  chain forward {{\n    type filter hook forward priority filter; policy accept;");
    let _ = writeln!(o, "    iifname \"{bridge}\" oifname \"{bridge}\" accept");
    if matches!(def.forward, ForwardMode::Nat | ForwardMode::Route) {
        let out_dev = def.forward_dev.as_deref().map(|d| format!(" oifname \"{d}\"")).unwrap_or_default();
        let in_dev = def.forward_dev.as_deref().map(|d| format!(" iifname \"{d}\"")).unwrap_or_default();
        for i in &def.ips {
            let fam = if i.address.is_ipv4() { "ip" } else { "ip6" };
            let s = subnet(i);
            let _ = writeln!(o, "    iifname \"{bridge}\"{out_dev} {fam} saddr {s} accept");
            // IPv6 is never translated: under NAT it is routed, as libvirt does.
            let back = if def.forward == ForwardMode::Nat && i.address.is_ipv4() { " ct state established,related" } else { "" };
            let _ = writeln!(o, "   {in_dev} oifname \"{bridge}\" {fam} daddr {s}{back} accept");
        }
    }
    let _ = writeln!(o, "    iifname \"{bridge}\" reject\n    oifname \"{bridge}\" reject\n  }}");
    let _ = writeln!(o, "  chain input {{\n    type filter hook input priority filter; policy accept;");
    let _ = writeln!(o, "    iifname \"{bridge}\" udp dport {{ 53, 67, 547 }} accept\n    iifname \"{bridge}\" tcp dport 53 accept\n  }}");
    let _ = writeln!(o, "}}");
    o
}

/// dnsmasq's configuration for `def` on `bridge`.
pub fn dnsmasq_conf(def: &NetworkDef, bridge: &str, files: &NetworkFiles) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# rvirt network '{}': written by rvirtd, rewritten at each start", def.name);
    let _ = writeln!(o, "strict-order\npid-file={}\nexcept-interface=lo\nbind-dynamic\ninterface={bridge}", files.pid.display());
    // Drop root once the sockets and the lease file are open (Debian's
    // unprivileged group is nogroup, other systems' nobody).
    let group = if group_exists("nogroup") { "nogroup" } else { "nobody" };
    let _ = writeln!(o, "user=nobody\ngroup={group}");
    if let Some(d) = &def.domain {
        let _ = writeln!(o, "domain={d}\nlocal=/{d}/\nexpand-hosts");
    }
    let mut leases = 0u128;
    for i in &def.ips {
        for (s, e) in &i.dhcp_ranges {
            match i.address {
                IpAddr::V4(_) => {
                    let mask = std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(i.prefix)).unwrap_or(0));
                    let _ = writeln!(o, "dhcp-range={s},{e},{mask}");
                }
                IpAddr::V6(_) => {
                    let _ = writeln!(o, "dhcp-range={s},{e},{}", i.prefix);
                }
            }
            leases += number(*e).saturating_sub(number(*s)) + 1;
        }
    }
    if leases > 0 {
        let _ = writeln!(o, "dhcp-no-override\ndhcp-authoritative\ndhcp-lease-max={}", leases.min(1 << 20));
        let _ = writeln!(o, "dhcp-leasefile={}\ndhcp-hostsfile={}", files.leases.display(), files.hosts.display());
    }
    if def.ips.iter().any(|i| i.address.is_ipv6()) {
        let _ = writeln!(o, "enable-ra");
    }
    let _ = writeln!(o, "addn-hosts={}", files.addn_hosts.display());
    o
}

/// Whether the system has group `name`.
fn group_exists(name: &str) -> bool {
    std::fs::read_to_string("/etc/group").is_ok_and(|g| g.lines().any(|l| l.split(':').next() == Some(name)))
}

fn number(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

/// The fixed leases in dnsmasq's `dhcp-hostsfile` format (`mac,ip,name`).
pub fn dhcp_hosts(def: &NetworkDef) -> String {
    let mut o = String::new();
    for h in def.ips.iter().flat_map(|i| &i.dhcp_hosts) {
        let parts: Vec<String> = [h.mac.clone(), Some(match h.ip {
            IpAddr::V6(v) => format!("[{v}]"),
            v4 => v4.to_string(),
        }), h.name.clone()]
        .into_iter()
        .flatten()
        .collect();
        let _ = writeln!(o, "{}", parts.join(","));
    }
    o
}

/// The extra DNS names in hosts-file format.
pub fn addn_hosts(def: &NetworkDef) -> String {
    def.dns_hosts.iter().map(|h| format!("{} {}\n", h.ip, h.hostnames.join(" "))).collect()
}

/// The host's routes (`10.0.0.0/24`, ...), from `ip route`, of both families.
fn host_routes() -> Result<Vec<(IpAddr, u8, String)>, String> {
    let mut v = Vec::new();
    for fam in ["-4", "-6"] {
        for line in run("ip", &[fam, "-o", "route", "show"])?.lines() {
            let mut w = line.split_whitespace();
            let Some(dest) = w.next().filter(|d| *d != "default") else { continue };
            let (a, p) = dest.split_once('/').unwrap_or((dest, if fam == "-4" { "32" } else { "128" }));
            let dev = line.split_whitespace().skip_while(|x| *x != "dev").nth(1).unwrap_or("").to_string();
            if let (Ok(a), Ok(p)) = (a.parse::<IpAddr>(), p.parse::<u8>()) {
                v.push((a, p, dev));
            }
        }
    }
    Ok(v)
}

/// The first interface with routes learnt from router advertisements
/// (`proto ra` in `ip -6 route`) whose `accept_ra` is not 2: turning on
/// IPv6 forwarding makes the kernel ignore its advertisements, and its
/// default route would expire (libvirt refuses the same way).
fn ra_uplink_losing_routes(routes: &str, accept_ra: impl Fn(&str) -> Option<u32>) -> Option<String> {
    routes
        .lines()
        .filter(|l| l.split_whitespace().collect::<Vec<_>>().windows(2).any(|w| w == ["proto", "ra"]))
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "dev").nth(1).map(str::to_string))
        .find(|dev| accept_ra(dev) != Some(2))
}

/// Whether two subnets overlap.
fn overlaps(a: IpAddr, ap: u8, b: IpAddr, bp: u8) -> bool {
    if a.is_ipv4() != b.is_ipv4() {
        return false;
    }
    let shorter = ap.min(bp);
    let da = IpDef { address: a, prefix: shorter, netmask_written: false, dhcp_ranges: Vec::new(), dhcp_hosts: Vec::new() };
    da.contains(b)
}

/// Whether interface `name` exists in this namespace.
pub fn link_exists(name: &str) -> bool {
    Command::new("ip").args(["-o", "link", "show", "dev", name]).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Brings `def` up on `bridge`. Refused when the bridge exists or a subnet
/// overlaps a route the host has; anything half-made is taken down again.
pub fn start(def: &NetworkDef, bridge: &str, files: &NetworkFiles) -> Result<(), String> {
    check_tools(def)?;
    if link_exists(bridge) {
        return Err(format!("network '{}': an interface named {bridge} already exists", def.name));
    }
    let routes = host_routes()?;
    for i in &def.ips {
        if let Some((a, p, dev)) = routes.iter().find(|(a, p, _)| overlaps(i.address, i.prefix, *a, *p)) {
            return Err(format!("network '{}': its subnet {}/{} overlaps the host's route {a}/{p} (dev {dev})", def.name, i.network(), i.prefix));
        }
    }
    if matches!(def.forward, ForwardMode::Nat | ForwardMode::Route | ForwardMode::Open) && def.ips.iter().any(|i| i.address.is_ipv6()) {
        let routes = run("ip", &["-6", "route", "show"])?;
        let accept_ra = |dev: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{dev}/accept_ra")).ok().and_then(|v| v.trim().parse().ok());
        if let Some(dev) = ra_uplink_losing_routes(&routes, accept_ra) {
            return Err(format!(
                "network '{}': turning on IPv6 forwarding would drop the routes {dev} learns from router advertisements (its accept_ra is not 2); set it first: sysctl net.ipv6.conf.{dev}.accept_ra=2",
                def.name
            ));
        }
    }
    let r = bring_up(def, bridge, files);
    if r.is_err() {
        let _ = stop(def, bridge, files);
    }
    r
}

fn bring_up(def: &NetworkDef, bridge: &str, files: &NetworkFiles) -> Result<(), String> {
    let stp = if def.stp { "1" } else { "0" };
    let delay = (def.delay.min(30) * 100).to_string();
    run("ip", &["link", "add", bridge, "type", "bridge", "stp_state", stp, "forward_delay", &delay])?;
    if let Some(m) = &def.mac {
        run("ip", &["link", "set", bridge, "address", m])?;
    }
    if let Some(m) = def.mtu {
        run("ip", &["link", "set", bridge, "mtu", &m.to_string()])?;
    }
    for i in &def.ips {
        // IPv6 duplicate address detection would hold the address back for a second.
        let dad = if i.address.is_ipv6() { vec!["nodad"] } else { vec![] };
        let mut args = vec!["addr".to_string(), "add".into(), format!("{}/{}", i.address, i.prefix), "dev".into(), bridge.into()];
        args.extend(dad.into_iter().map(String::from));
        run("ip", &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    run("ip", &["link", "set", bridge, "up"])?;
    if def.forward != ForwardMode::Open {
        load_nft(&nft_rules(def, bridge))?;
    }
    if matches!(def.forward, ForwardMode::Nat | ForwardMode::Route | ForwardMode::Open) {
        if def.ips.iter().any(|i| i.address.is_ipv4()) {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|e| format!("turning on IPv4 forwarding: {e}"))?;
        }
        if def.ips.iter().any(|i| i.address.is_ipv6()) {
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").map_err(|e| format!("turning on IPv6 forwarding: {e}"))?;
        }
    }
    if !def.ips.is_empty() {
        start_dnsmasq(def, bridge, files)?;
    }
    Ok(())
}

/// Writes dnsmasq's files for the network and starts it, waiting for its pid.
fn start_dnsmasq(def: &NetworkDef, bridge: &str, files: &NetworkFiles) -> Result<(), String> {
    let write = |p: &Path, text: String| std::fs::write(p, text).map_err(|e| format!("writing {}: {e}", p.display()));
    write(&files.conf, dnsmasq_conf(def, bridge, files))?;
    write(&files.hosts, dhcp_hosts(def))?;
    write(&files.addn_hosts, addn_hosts(def))?;
    let _ = std::fs::remove_file(&files.pid);
    run("dnsmasq", &[&format!("--conf-file={}", files.conf.display())])?;
    // dnsmasq writes its pid file once it runs in the background.
    let deadline = Instant::now() + Duration::from_secs(5);
    while dnsmasq_pid(files).is_none() {
        if Instant::now() > deadline {
            return Err(format!("network '{}': dnsmasq did not start (no pid in {})", def.name, files.pid.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The pid of the network's dnsmasq, if it runs.
pub fn dnsmasq_pid(files: &NetworkFiles) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(&files.pid).ok()?.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "dnsmasq").then_some(pid)
}

/// Whether the network is up: its bridge exists (and its dnsmasq runs, when it has one).
pub fn is_active(def: &NetworkDef, bridge: &str, files: &NetworkFiles) -> bool {
    link_exists(bridge) && (def.ips.is_empty() || dnsmasq_pid(files).is_some())
}

/// Stops the network's dnsmasq: SIGTERM, SIGKILL after 5 s, an error if it
/// survives that too.
fn stop_dnsmasq(def: &NetworkDef, files: &NetworkFiles) -> Result<(), String> {
    let mut result = Ok(());
    if let Some(pid) = dnsmasq_pid(files) {
        let gone = |limit: Duration| {
            let deadline = Instant::now() + limit;
            while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            true
        };
        // SAFETY: kill has no memory effects; the pid is dnsmasq's (checked by name).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if !gone(Duration::from_secs(5)) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            if !gone(Duration::from_secs(5)) {
                result = Err(format!("network '{}': dnsmasq (pid {pid}) did not exit", def.name));
            }
        }
    }
    let _ = std::fs::remove_file(&files.pid);
    result
}

/// Restarts a running network's dnsmasq with its configuration rewritten
/// (a changed DHCP range; leases live on in the lease file).
pub fn restart_dnsmasq(def: &NetworkDef, bridge: &str, files: &NetworkFiles) -> Result<(), String> {
    stop_dnsmasq(def, files)?;
    start_dnsmasq(def, bridge, files)
}

/// Takes the network down: dnsmasq, the nftables table, the bridge. Every
/// step is tried; the first failure is returned.
pub fn stop(def: &NetworkDef, bridge: &str, files: &NetworkFiles) -> Result<(), String> {
    let mut first: Option<String> = None;
    let mut note = |r: Result<(), String>| {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    };
    note(stop_dnsmasq(def, files));
    if def.forward != ForwardMode::Open {
        let t = table_name(bridge);
        if run("nft", &["list", "table", "inet", &t]).is_ok() {
            note(run("nft", &["delete", "table", "inet", &t]).map(|_| ()));
        }
    }
    if link_exists(bridge) {
        note(run("ip", &["link", "del", bridge]).map(|_| ()));
    }
    first.map_or(Ok(()), Err)
}

/// One lease dnsmasq handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// When it expires (seconds since the epoch; 0: never).
    pub expiry: i64,
    /// The client's MAC address.
    pub mac: String,
    /// The address leased.
    pub ip: IpAddr,
    /// The name the client gave, if any.
    pub hostname: Option<String>,
    /// The client id it sent, if any.
    pub client_id: Option<String>,
}

/// The leases in dnsmasq's lease file (`expiry mac ip name clientid`, `*`
/// for none); lines that do not read so are skipped.
pub fn read_leases(files: &NetworkFiles) -> Vec<Lease> {
    let text = std::fs::read_to_string(&files.leases).unwrap_or_default();
    let opt = |s: Option<&str>| s.filter(|v| *v != "*").map(str::to_string);
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let expiry = w.next()?.parse().ok()?;
            let second = w.next()?.to_ascii_lowercase();
            let ip: IpAddr = w.next()?.parse().ok()?;
            let (hostname, client_id) = (opt(w.next()), opt(w.next()));
            // A DHCPv6 lease has the IAID where IPv4's has the MAC; the MAC
            // is in the client's DUID when it is link-layer based.
            let mac = if ip.is_ipv6() { client_id.as_deref().and_then(mac_of_duid).unwrap_or_default() } else { second };
            Some(Lease { expiry, mac, ip, hostname, client_id })
        })
        .collect()
}

/// The Ethernet address inside a DHCPv6 DUID written `00:01:...`: DUID-LLT
/// (type 1: hardware type, time, address) or DUID-LL (type 3: hardware
/// type, address) with hardware type 1.
fn mac_of_duid(duid: &str) -> Option<String> {
    let b: Vec<u8> = duid.split(':').map(|x| u8::from_str_radix(x, 16)).collect::<Result<_, _>>().ok()?;
    let mac = match b.get(..4)? {
        [0, 1, 0, 1] if b.len() == 14 => &b[8..],
        [0, 3, 0, 1] if b.len() == 10 => &b[4..],
        _ => return None,
    };
    Some(mac.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":"))
}

/// Tables of others whose forward chain drops by default (Docker,
/// firewalld): they would drop the network's traffic whatever rvirt allows.
pub fn dropping_forward_tables() -> Vec<String> {
    let Ok(rules) = run("nft", &["list", "ruleset"]) else { return Vec::new() };
    let mut found = Vec::new();
    let mut table = String::new();
    for line in rules.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix("table ") {
            table = t.trim_end_matches(" {").to_string();
        } else if line.contains("hook forward") && line.contains("policy drop") && !table.contains("rvirt_") {
            found.push(table.clone());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(xml: &str) -> NetworkDef {
        NetworkDef::parse(xml).unwrap()
    }

    #[test]
    fn dhcpv6_leases_take_their_mac_from_the_client_s_duid() {
        let dir = std::env::temp_dir().join(format!("rvirt-leases-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = NetworkFiles::new(&dir, "n");
        std::fs::write(
            &files.leases,
            "1700000000 52:54:00:AA:bb:01 10.0.0.5 vm1 01:52:54:00:aa:bb:01\n\
             duid 00:01:00:01:32:a7:52:a5:5a:f8:d0:79:9f:61\n\
             1700000001 1542 fd00:77::159 * 00:01:00:01:32:a7:52:ac:52:54:00:00:06:06\n\
             1700000002 7 fd00:77::160 vm3 00:03:00:01:52:54:00:00:06:07\n\
             1700000003 8 fd00:77::161 * 00:02:00:00:ab:11:01:02\n\
             garbage line\n",
        )
        .unwrap();
        let l = read_leases(&files);
        std::fs::remove_dir_all(&dir).unwrap();
        let got: Vec<(&str, String)> = l.iter().map(|x| (x.mac.as_str(), x.ip.to_string())).collect();
        assert_eq!(
            got,
            [
                ("52:54:00:aa:bb:01", "10.0.0.5".to_string()),
                ("52:54:00:00:06:06", "fd00:77::159".to_string()),
                ("52:54:00:00:06:07", "fd00:77::160".to_string()),
                ("", "fd00:77::161".to_string()),
            ]
        );
        assert_eq!(l[2].hostname.as_deref(), Some("vm3"));
        assert_eq!(l[1].client_id.as_deref(), Some("00:01:00:01:32:a7:52:ac:52:54:00:00:06:06"));
    }

    #[test]
    fn a_missing_tool_is_named_with_its_debian_package() {
        let dir = std::env::temp_dir().join(format!("rvirt-tools-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dirs = vec![dir.clone()];
        let nat = def("<network><name>n</name><forward/><ip address='10.9.0.1' prefix='24'><dhcp><range start='10.9.0.2' end='10.9.0.9'/></dhcp></ip></network>");
        let open = def("<network><name>o</name><forward mode='open'/></network>");
        let e = check_tools_in(&nat, &dirs).unwrap_err();
        assert_eq!(e, "network 'n' needs ip, which is not installed (Debian package iproute2)");
        std::fs::write(dir.join("ip"), "").unwrap();
        assert_eq!(check_tools_in(&open, &dirs), Ok(()), "an open network without addresses needs only ip");
        let e = check_tools_in(&nat, &dirs).unwrap_err();
        assert_eq!(e, "network 'n' needs nft, which is not installed (Debian package nftables)");
        std::fs::write(dir.join("nft"), "").unwrap();
        let e = check_tools_in(&nat, &dirs).unwrap_err();
        assert_eq!(e, "network 'n' needs dnsmasq, which is not installed (Debian package dnsmasq-base)");
        std::fs::create_dir(dir.join("dnsmasq")).unwrap();
        assert!(check_tools_in(&nat, &dirs).is_err(), "a directory is not the tool");
        std::fs::remove_dir(dir.join("dnsmasq")).unwrap();
        std::fs::write(dir.join("dnsmasq"), "").unwrap();
        assert_eq!(check_tools_in(&nat, &dirs), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nat_rules_masquerade_all_but_multicast_and_broadcast_and_admit_dhcp_and_dns() {
        let d = def("<network><name>default</name><forward/><ip address='192.168.122.1' netmask='255.255.255.0'><dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip></network>");
        let r = nft_rules(&d, "virbr0");
        for want in [
            "table inet rvirt_virbr0 {",
            "type nat hook postrouting priority srcnat",
            "ip saddr 192.168.122.0/24 ip daddr 224.0.0.0/24 return",
            "ip saddr 192.168.122.0/24 ip daddr 255.255.255.255 return",
            "ip saddr 192.168.122.0/24 ip daddr != 192.168.122.0/24 masquerade",
            "iifname \"virbr0\" ip saddr 192.168.122.0/24 accept",
            "oifname \"virbr0\" ip daddr 192.168.122.0/24 ct state established,related accept",
            "iifname \"virbr0\" reject",
            "udp dport { 53, 67, 547 } accept",
        ] {
            assert!(r.contains(want), "'{want}' in:\n{r}");
        }
        // Isolated: no masquerade, nothing forwarded but bridge to bridge.
        let iso = nft_rules(&def("<network><name>iso</name><ip address='10.1.0.1' prefix='24'/></network>"), "rvbr1");
        assert!(!iso.contains("masquerade") && !iso.contains("saddr 10.1.0.0/24 accept") && iso.contains("iifname \"rvbr1\" reject"), "{iso}");
        // Route: both directions without translation or connection state.
        let route = nft_rules(&def("<network><name>r</name><forward mode='route' dev='eth1'/><ip address='10.2.0.1' prefix='24'/></network>"), "rvbr2");
        assert!(!route.contains("masquerade") && route.contains("iifname \"rvbr2\" oifname \"eth1\" ip saddr 10.2.0.0/24 accept") && route.contains("iifname \"eth1\" oifname \"rvbr2\" ip daddr 10.2.0.0/24 accept"), "{route}");
        assert_eq!(table_name("vir-br.1"), "rvirt_vir_br_1");
    }

    #[test]
    fn dnsmasq_is_configured_as_libvirt_configures_it() {
        let d = def("<network><name>lab</name><forward/><domain name='lab.test'/><dns><host ip='10.3.0.9'><hostname>db</hostname></host></dns>\
                     <ip address='10.3.0.1' prefix='24'><dhcp><range start='10.3.0.10' end='10.3.0.19'/><host mac='52:54:00:00:00:07' name='web' ip='10.3.0.7'/></dhcp></ip></network>");
        let files = NetworkFiles::new(Path::new("/run/x"), "lab");
        let c = dnsmasq_conf(&d, "rvbr3", &files);
        for want in [
            "strict-order",
            "pid-file=/run/x/lab.pid",
            "except-interface=lo",
            "bind-dynamic",
            "interface=rvbr3",
            "domain=lab.test",
            "dhcp-range=10.3.0.10,10.3.0.19,255.255.255.0",
            "dhcp-lease-max=10",
            "dhcp-hostsfile=/run/x/lab.hostsfile",
            "dhcp-leasefile=/run/x/lab.leases",
            "addn-hosts=/run/x/lab.addnhosts",
        ] {
            assert!(c.lines().any(|l| l == want), "'{want}' in:\n{c}");
        }
        assert_eq!(dhcp_hosts(&d), "52:54:00:00:00:07,10.3.0.7,web\n");
        assert_eq!(addn_hosts(&d), "10.3.0.9 db\n");
    }

    #[test]
    fn dnsmasq_s_lease_file_is_read() {
        let dir = std::env::temp_dir().join(format!("rvirt-leases-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = NetworkFiles::new(&dir, "n");
        std::fs::write(&files.leases, "1796510484 52:54:00:AA:00:01 10.77.0.69 web 01:52:54:00:aa:00:01\n0 52:54:00:aa:00:02 10.77.0.70 * *\ngarbage\n").unwrap();
        let l = read_leases(&files);
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].mac.as_str(), l[0].ip.to_string(), l[0].hostname.as_deref()), ("52:54:00:aa:00:01", "10.77.0.69".into(), Some("web")));
        assert_eq!((l[1].hostname.clone(), l[1].client_id.clone(), l[1].expiry), (None, None, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ipv6_forwarding_is_refused_while_an_uplink_takes_routes_from_advertisements() {
        let routes = "fd00::/64 dev br0 proto kernel metric 256 pref medium\ndefault via fe80::1 dev eth0 proto ra metric 1024 expires 1790sec hoplimit 64 pref medium\n";
        assert_eq!(ra_uplink_losing_routes(routes, |_| Some(1)), Some("eth0".to_string()));
        assert_eq!(ra_uplink_losing_routes(routes, |_| Some(2)), None);
        assert_eq!(ra_uplink_losing_routes("fd00::/64 dev br0 proto kernel metric 256\n", |_| Some(0)), None);
    }

    #[test]
    fn subnets_overlap_when_one_holds_the_other() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(overlaps(a("10.0.0.1"), 24, a("10.0.0.0"), 16));
        assert!(overlaps(a("10.0.0.0"), 8, a("10.200.0.1"), 24));
        assert!(!overlaps(a("10.0.0.1"), 24, a("10.0.1.0"), 24));
        assert!(!overlaps(a("10.0.0.1"), 24, a("fd00::1"), 64));
    }
}
