//! libvirt's network XML (`<network>`): what rvirtd needs to build a
//! virtual network (a bridge, dnsmasq for DHCP and DNS, NAT or routing
//! rules), parsed with line-numbered errors and written back the way
//! `virsh net-dumpxml` shows it. Elements rvirt does not use are kept
//! verbatim and reported, as in domain definitions.

use std::fmt::Write;
use std::net::IpAddr;

use roxmltree::Node;
use uuid::Uuid;

use super::{checked_document, elements, escape, limits, valid_ifname, valid_mac, valid_name, Cx, UnknownElement, XmlError};

/// How a network reaches beyond its bridge (`<forward mode>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardMode {
    /// No `<forward>`: guests reach each other and the host, nothing else.
    Isolated,
    /// Masqueraded behind the host's address (libvirt's default network).
    Nat,
    /// Routed without translation (the outside needs a route back).
    Route,
    /// Forwarded with no firewall rules of rvirt's at all.
    Open,
}

impl ForwardMode {
    /// libvirt's name (`none` for isolated, which has no `<forward>`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Isolated => "none",
            Self::Nat => "nat",
            Self::Route => "route",
            Self::Open => "open",
        }
    }
}

/// A fixed lease (`<dhcp><host mac name ip/>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpHost {
    /// The guest card's MAC address (IPv4 hosts need one or a name).
    pub mac: Option<String>,
    /// The name the guest gets (and DNS answers for).
    pub name: Option<String>,
    /// The address it always gets.
    pub ip: IpAddr,
}

/// One `<ip>` of the network: the host's address on the bridge, its subnet, and DHCP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpDef {
    /// The host's address on the bridge (the guests' gateway and DNS server).
    pub address: IpAddr,
    /// Prefix length of the subnet.
    pub prefix: u8,
    /// Whether `netmask=` (IPv4) rather than `prefix=` was written (kept for dumpxml).
    pub netmask_written: bool,
    /// Address ranges dnsmasq leases from, inclusive.
    pub dhcp_ranges: Vec<(IpAddr, IpAddr)>,
    /// Fixed leases.
    pub dhcp_hosts: Vec<DhcpHost>,
}

impl IpDef {
    /// Whether `a` lies in this subnet.
    pub fn contains(&self, a: IpAddr) -> bool {
        prefix_of(a, self.prefix) == prefix_of(self.address, self.prefix) && a.is_ipv4() == self.address.is_ipv4()
    }

    /// The subnet's first address (`192.168.122.0`).
    pub fn network(&self) -> IpAddr {
        match self.address {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(prefix_of(self.address, self.prefix) as u32)),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(prefix_of(self.address, self.prefix))),
        }
    }
}

/// The address `a` with only its first `prefix` bits kept, as a number.
fn prefix_of(a: IpAddr, prefix: u8) -> u128 {
    let (bits, width) = match a {
        IpAddr::V4(v) => (u128::from(u32::from(v)), 32u32),
        IpAddr::V6(v) => (u128::from(v), 128u32),
    };
    let keep = u32::from(prefix).min(width);
    if keep == 0 {
        return 0;
    }
    let mask = (u128::MAX >> (128 - width)) & !((1u128 << (width - keep)) - 1);
    bits & mask
}

/// The host part of `a` in a /`prefix` subnet, and the largest host part there is.
fn host_part(a: IpAddr, prefix: u8) -> (u128, u128) {
    let width = if a.is_ipv4() { 32 } else { 128 };
    let bits = match a {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    };
    let host_bits = width - u32::from(prefix).min(width);
    let max = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
    (bits & max, max)
}

/// A name DNS answers for (`<dns><host ip><hostname>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsHost {
    /// The address.
    pub ip: IpAddr,
    /// Its names.
    pub hostnames: Vec<String>,
}

/// A virtual network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkDef {
    /// Its name (`default`).
    pub name: String,
    /// Its UUID (made up when the XML has none).
    pub uuid: Uuid,
    /// How it reaches beyond its bridge.
    pub forward: ForwardMode,
    /// The host interface forwarded traffic must leave by (`<forward dev>`), if any.
    pub forward_dev: Option<String>,
    /// The bridge's name (`virbr0`); assigned by rvirtd when not given.
    pub bridge: Option<String>,
    /// Spanning tree on the bridge (libvirt's default: on).
    pub stp: bool,
    /// The bridge's forward delay in seconds.
    pub delay: u32,
    /// The bridge's MAC address; assigned by rvirtd when not given.
    pub mac: Option<String>,
    /// The bridge's MTU, if set.
    pub mtu: Option<u32>,
    /// The DNS domain dnsmasq serves (`<domain name>`).
    pub domain: Option<String>,
    /// Extra names DNS answers for.
    pub dns_hosts: Vec<DnsHost>,
    /// The host's addresses on the bridge, with DHCP.
    pub ips: Vec<IpDef>,
    /// Elements rvirt does not use, kept verbatim.
    pub unknown: Vec<UnknownElement>,
}

fn ip(cx: &Cx, n: Node, path: &str, text: &str) -> Result<IpAddr, XmlError> {
    text.parse().map_err(|_| cx.err(n, path, format!("'{text}' is not an IP address")))
}

/// The prefix length of an IPv4 netmask (`255.255.255.0` is 24); none for a mask that is not contiguous.
fn netmask_prefix(mask: std::net::Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

impl NetworkDef {
    /// Parses and validates a network definition.
    pub fn parse(xml: &str) -> Result<Self, XmlError> {
        let doc = checked_document(xml)?;
        let cx = Cx::new(xml);
        let root = doc.root_element();
        if root.tag_name().name() != "network" {
            return Err(cx.err(root, root.tag_name().name(), "the root element must be <network>"));
        }
        let mut n = NetworkDef {
            name: String::new(),
            uuid: Uuid::new_v4(),
            forward: ForwardMode::Isolated,
            forward_dev: None,
            bridge: None,
            stp: true,
            delay: 0,
            mac: None,
            mtu: None,
            domain: None,
            dns_hosts: Vec::new(),
            ips: Vec::new(),
            unknown: Vec::new(),
        };
        for c in elements(root) {
            let tag = c.tag_name().name();
            match tag {
                "name" => {
                    let t = cx.text(c, "name")?;
                    if !valid_name(&t) {
                        return Err(cx.err(c, "name", format!("'{t}' is not a usable name (letters, digits and -_.+:, at most 64, not all digits or a UUID)")));
                    }
                    n.name = t;
                }
                "uuid" => {
                    let t = cx.text(c, "uuid")?;
                    n.uuid = Uuid::parse_str(&t).map_err(|_| cx.err(c, "uuid", format!("'{t}' is not a UUID")))?;
                }
                "forward" => {
                    n.forward = match c.attribute("mode").unwrap_or("nat") {
                        "nat" => ForwardMode::Nat,
                        "route" => ForwardMode::Route,
                        "open" => ForwardMode::Open,
                        m => return Err(cx.err(c, "forward", format!("mode='{m}' is not supported (nat, route, open, or no <forward> for an isolated network)"))),
                    };
                    if let Some(dev) = c.attribute("dev") {
                        if !valid_ifname(dev) {
                            return Err(cx.err(c, "forward", format!("dev='{dev}' is not an interface name")));
                        }
                        n.forward_dev = Some(dev.to_string());
                    }
                }
                "bridge" => {
                    if let Some(b) = c.attribute("name") {
                        if !valid_ifname(b) {
                            return Err(cx.err(c, "bridge", format!("name='{b}' is not an interface name (1-15 letters, digits, -_.)")));
                        }
                        n.bridge = Some(b.to_string());
                    }
                    n.stp = match c.attribute("stp").unwrap_or("on") {
                        "on" | "yes" => true,
                        "off" | "no" => false,
                        v => return Err(cx.err(c, "bridge", format!("stp='{v}' must be on or off"))),
                    };
                    if let Some(d) = c.attribute("delay") {
                        n.delay = d.parse().map_err(|_| cx.err(c, "bridge", format!("delay='{d}' is not a number of seconds")))?;
                    }
                }
                "mac" => {
                    let m = cx.attr(c, "mac", "address")?;
                    if !valid_mac(m) {
                        return Err(cx.err(c, "mac", format!("'{m}' is not a unicast MAC address")));
                    }
                    n.mac = Some(m.to_ascii_lowercase());
                }
                "mtu" => {
                    let s = cx.attr(c, "mtu", "size")?;
                    n.mtu = Some(s.parse().ok().filter(|m| (68..=65535).contains(m)).ok_or_else(|| cx.err(c, "mtu", format!("size='{s}' is not an MTU (68-65535)")))?);
                }
                "domain" => n.domain = Some(cx.attr(c, "domain", "name")?.to_string()),
                "dns" => {
                    for h in elements(c) {
                        if h.tag_name().name() != "host" {
                            n.unknown.push(cx.unknown("dns", h));
                            continue;
                        }
                        let a = ip(&cx, h, "dns/host", cx.attr(h, "dns/host", "ip")?)?;
                        let names: Vec<String> = elements(h).filter(|x| x.tag_name().name() == "hostname").map(|x| cx.text(x, "dns/host/hostname")).collect::<Result<_, _>>()?;
                        if names.is_empty() {
                            return Err(cx.err(h, "dns/host", "needs at least one <hostname>"));
                        }
                        n.dns_hosts.push(DnsHost { ip: a, hostnames: names });
                    }
                }
                "ip" => n.ips.push(Self::ip_def(&cx, c)?),
                _ => n.unknown.push(cx.unknown("network", c)),
            }
            if n.unknown.len() > limits::MAX_UNKNOWN {
                return Err(cx.err(c, tag, format!("more than {} elements rvirt does not use", limits::MAX_UNKNOWN)));
            }
        }
        if n.name.is_empty() {
            return Err(XmlError { line: 0, element: "name".into(), message: "a network needs a <name>".into() });
        }
        if n.forward != ForwardMode::Isolated && n.ips.is_empty() && n.forward != ForwardMode::Open {
            return Err(cx.err(root, "network", format!("a {} network needs an <ip> for the bridge", n.forward.name())));
        }
        for (i, a) in n.ips.iter().enumerate() {
            for b in &n.ips[i + 1..] {
                if a.address.is_ipv4() == b.address.is_ipv4() && (a.contains(b.address) || b.contains(a.address)) {
                    return Err(XmlError { line: 0, element: "ip".into(), message: format!("{}/{} and {}/{} overlap", a.address, a.prefix, b.address, b.prefix) });
                }
            }
        }
        if n.ips.iter().filter(|i| i.address.is_ipv4() && !i.dhcp_ranges.is_empty()).count() > 1 {
            return Err(XmlError { line: 0, element: "ip/dhcp".into(), message: "only one IPv4 <ip> may have DHCP (as with libvirt)".into() });
        }
        Ok(n)
    }

    fn ip_def(cx: &Cx, c: Node) -> Result<IpDef, XmlError> {
        let address = ip(cx, c, "ip", cx.attr(c, "ip", "address")?)?;
        if let Some(f) = c.attribute("family") {
            let ok = matches!((f, address), ("ipv4", IpAddr::V4(_)) | ("ipv6", IpAddr::V6(_)));
            if !ok {
                return Err(cx.err(c, "ip", format!("family='{f}' does not match address {address}")));
            }
        }
        let (prefix, netmask_written) = match (c.attribute("prefix"), c.attribute("netmask"), address) {
            (Some(p), None, _) => (p.parse::<u8>().map_err(|_| cx.err(c, "ip", format!("prefix='{p}' is not a prefix length")))?, false),
            (None, Some(m), IpAddr::V4(_)) => {
                let mask: std::net::Ipv4Addr = m.parse().map_err(|_| cx.err(c, "ip", format!("netmask='{m}' is not an address")))?;
                (netmask_prefix(mask).ok_or_else(|| cx.err(c, "ip", format!("netmask='{m}' is not contiguous")))?, true)
            }
            (None, Some(_), IpAddr::V6(_)) => return Err(cx.err(c, "ip", "IPv6 takes prefix=, not netmask=")),
            (Some(_), Some(_), _) => return Err(cx.err(c, "ip", "give prefix= or netmask=, not both")),
            (None, None, IpAddr::V4(_)) => (24, false),
            (None, None, IpAddr::V6(_)) => (64, false),
        };
        let max = if address.is_ipv4() { 30 } else { 126 };
        if !(8..=max).contains(&prefix) {
            return Err(cx.err(c, "ip", format!("a /{prefix} subnet is not usable for a network (8 to {max})")));
        }
        let mut d = IpDef { address, prefix, netmask_written, dhcp_ranges: Vec::new(), dhcp_hosts: Vec::new() };
        let (host, max_host) = host_part(address, prefix);
        if host == 0 || (address.is_ipv4() && host == max_host) {
            return Err(cx.err(c, "ip", format!("{address} is the subnet's network or broadcast address, not a host's")));
        }
        for x in elements(c) {
            match x.tag_name().name() {
                "dhcp" => {
                    for y in elements(x) {
                        match y.tag_name().name() {
                            "range" => {
                                let s = ip(cx, y, "ip/dhcp/range", cx.attr(y, "ip/dhcp/range", "start")?)?;
                                let e = ip(cx, y, "ip/dhcp/range", cx.attr(y, "ip/dhcp/range", "end")?)?;
                                if !d.contains(s) || !d.contains(e) || prefix_of(s, 128) > prefix_of(e, 128) {
                                    return Err(cx.err(y, "ip/dhcp/range", format!("{s}-{e} is not a range inside {}/{prefix}", d.network())));
                                }
                                if (prefix_of(s, 128)..=prefix_of(e, 128)).contains(&prefix_of(address, 128)) {
                                    return Err(cx.err(y, "ip/dhcp/range", format!("{s}-{e} includes the host's own address {address}")));
                                }
                                d.dhcp_ranges.push((s, e));
                            }
                            "host" => {
                                let a = ip(cx, y, "ip/dhcp/host", cx.attr(y, "ip/dhcp/host", "ip")?)?;
                                if !d.contains(a) || a == address {
                                    return Err(cx.err(y, "ip/dhcp/host", format!("{a} is not a guest address inside {}/{prefix}", d.network())));
                                }
                                let mac = y.attribute("mac").map(str::to_ascii_lowercase);
                                if let Some(m) = &mac {
                                    if !valid_mac(m) {
                                        return Err(cx.err(y, "ip/dhcp/host", format!("mac='{m}' is not a unicast MAC address")));
                                    }
                                }
                                let name = y.attribute("name").map(str::to_string);
                                if mac.is_none() && name.is_none() {
                                    return Err(cx.err(y, "ip/dhcp/host", "needs mac= or name="));
                                }
                                d.dhcp_hosts.push(DhcpHost { mac, name, ip: a });
                            }
                            other => return Err(cx.err(y, "ip/dhcp", format!("<{other}> is not supported in <dhcp> (range, host)"))),
                        }
                    }
                }
                "tftp" => return Err(cx.err(x, "ip/tftp", "TFTP (network boot) is not supported")),
                other => return Err(cx.err(x, "ip", format!("<{other}> is not supported in <ip> (dhcp)"))),
            }
        }
        Ok(d)
    }

    /// The definition as libvirt writes it (`virsh net-dumpxml`).
    pub fn to_xml(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "<network>");
        let _ = writeln!(o, "  <name>{}</name>", self.name);
        let _ = writeln!(o, "  <uuid>{}</uuid>", self.uuid);
        match (self.forward, &self.forward_dev) {
            (ForwardMode::Isolated, _) => {}
            (m, Some(dev)) => {
                let _ = writeln!(o, "  <forward mode='{}' dev='{dev}'/>", m.name());
            }
            (m, None) => {
                let _ = writeln!(o, "  <forward mode='{}'/>", m.name());
            }
        }
        let name = self.bridge.as_deref().map(|b| format!(" name='{b}'")).unwrap_or_default();
        let _ = writeln!(o, "  <bridge{name} stp='{}' delay='{}'/>", if self.stp { "on" } else { "off" }, self.delay);
        if let Some(m) = &self.mac {
            let _ = writeln!(o, "  <mac address='{m}'/>");
        }
        if let Some(m) = self.mtu {
            let _ = writeln!(o, "  <mtu size='{m}'/>");
        }
        if let Some(d) = &self.domain {
            let _ = writeln!(o, "  <domain name='{}'/>", escape(d));
        }
        if !self.dns_hosts.is_empty() {
            let _ = writeln!(o, "  <dns>");
            for h in &self.dns_hosts {
                let _ = writeln!(o, "    <host ip='{}'>", h.ip);
                for n in &h.hostnames {
                    let _ = writeln!(o, "      <hostname>{}</hostname>", escape(n));
                }
                let _ = writeln!(o, "    </host>");
            }
            let _ = writeln!(o, "  </dns>");
        }
        for i in &self.ips {
            let mask = match (i.netmask_written, i.address) {
                (true, IpAddr::V4(_)) => format!("netmask='{}'", std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(i.prefix)).unwrap_or(0))),
                _ => format!("prefix='{}'", i.prefix),
            };
            let family = if i.address.is_ipv6() { "family='ipv6' " } else { "" };
            if i.dhcp_ranges.is_empty() && i.dhcp_hosts.is_empty() {
                let _ = writeln!(o, "  <ip {family}address='{}' {mask}/>", i.address);
                continue;
            }
            let _ = writeln!(o, "  <ip {family}address='{}' {mask}>", i.address);
            let _ = writeln!(o, "    <dhcp>");
            for (s, e) in &i.dhcp_ranges {
                let _ = writeln!(o, "      <range start='{s}' end='{e}'/>");
            }
            for h in &i.dhcp_hosts {
                let mac = h.mac.as_deref().map(|m| format!("mac='{m}' ")).unwrap_or_default();
                let name = h.name.as_deref().map(|n| format!("name='{}' ", escape(n))).unwrap_or_default();
                let _ = writeln!(o, "      <host {mac}{name}ip='{}'/>", h.ip);
            }
            let _ = writeln!(o, "    </dhcp>");
            let _ = writeln!(o, "  </ip>");
        }
        for u in &self.unknown {
            let _ = writeln!(o, "  {}", u.xml);
        }
        let _ = writeln!(o, "</network>");
        o
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    /// libvirt's default network, as `/usr/share/libvirt/networks/default.xml` has it.
    const DEFAULT: &str = "<network>\n  <name>default</name>\n  <bridge name='virbr0'/>\n  <forward/>\n  <ip address='192.168.122.1' netmask='255.255.255.0'>\n    <dhcp>\n      <range start='192.168.122.2' end='192.168.122.254'/>\n    </dhcp>\n  </ip>\n</network>\n";

    #[test]
    fn libvirt_s_default_network_parses_and_writes_back_the_same_way() {
        let n = NetworkDef::parse(DEFAULT).unwrap();
        assert_eq!((n.name.as_str(), n.forward, n.bridge.as_deref(), n.stp), ("default", ForwardMode::Nat, Some("virbr0"), true));
        let ip = &n.ips[0];
        assert_eq!((ip.address.to_string(), ip.prefix), ("192.168.122.1".into(), 24));
        assert_eq!(ip.network().to_string(), "192.168.122.0");
        assert_eq!(ip.dhcp_ranges, [("192.168.122.2".parse().unwrap(), "192.168.122.254".parse().unwrap())]);
        let xml = n.to_xml();
        assert!(xml.contains("<forward mode='nat'/>") && xml.contains("netmask='255.255.255.0'") && xml.contains(&format!("<uuid>{}</uuid>", n.uuid)), "{xml}");
        let again = NetworkDef::parse(&xml).unwrap();
        assert_eq!(again, n);
        assert_eq!(again.to_xml(), xml);
    }

    #[test]
    fn every_kind_of_network_and_its_parts_round_trip() {
        let xml = "<network><name>lab</name><uuid>8b3b7a1e-2d3c-4a5b-9c6d-7e8f9a0b1c2d</uuid><forward mode='route' dev='eth0'/>\
                   <bridge name='rvbr1' stp='off' delay='2'/><mac address='52:54:00:AA:bb:01'/><mtu size='9000'/><domain name='lab.test'/>\
                   <dns><host ip='10.1.0.9'><hostname>db</hostname><hostname>db.lab.test</hostname></host></dns>\
                   <ip address='10.1.0.1' prefix='24'><dhcp><range start='10.1.0.100' end='10.1.0.200'/><host mac='52:54:00:00:00:07' name='web' ip='10.1.0.7'/></dhcp></ip>\
                   <ip family='ipv6' address='fd00:1::1' prefix='64'/><portgroup name='x'/></network>";
        let n = NetworkDef::parse(xml).unwrap();
        assert_eq!((n.forward, n.forward_dev.as_deref(), n.stp, n.delay, n.mtu), (ForwardMode::Route, Some("eth0"), false, 2, Some(9000)));
        assert_eq!(n.mac.as_deref(), Some("52:54:00:aa:bb:01"));
        assert_eq!(n.dns_hosts[0].hostnames, ["db", "db.lab.test"]);
        assert_eq!(n.ips[0].dhcp_hosts[0], DhcpHost { mac: Some("52:54:00:00:00:07".into()), name: Some("web".into()), ip: "10.1.0.7".parse().unwrap() });
        assert!(n.ips[1].address.is_ipv6() && n.ips[1].prefix == 64);
        assert_eq!(n.unknown.len(), 1, "<portgroup> is kept");
        // (Equal but for the line the kept element stood on.)
        assert_eq!(NetworkDef::parse(&n.to_xml()).unwrap().to_xml(), n.to_xml());
        // Isolated: no <forward>; open needs no address.
        let iso = NetworkDef::parse("<network><name>iso</name><ip address='10.9.0.1' prefix='24'/></network>").unwrap();
        assert_eq!(iso.forward, ForwardMode::Isolated);
        assert!(!iso.to_xml().contains("<forward"));
        assert!(NetworkDef::parse("<network><name>o</name><forward mode='open'/></network>").is_ok());
    }

    #[test]
    fn bad_network_definitions_say_where_and_what() {
        for (xml, want) in [
            ("<domain/>", "root element must be <network>"),
            ("<network><name>a</name><forward mode='bridge'/></network>", "mode='bridge' is not supported"),
            ("<network><name>a</name><forward/></network>", "a nat network needs an <ip>"),
            ("<network><name>1234</name></network>", "not a usable name"),
            ("<network><bridge name='virbr0'/></network>", "needs a <name>"),
            ("<network><name>a</name><bridge name='a-very-long-bridge-name'/></network>", "not an interface name"),
            ("<network><name>a</name><ip address='10.0.0.1' netmask='255.0.255.0'/></network>", "not contiguous"),
            ("<network><name>a</name><ip address='10.0.0.0' prefix='24'/></network>", "network or broadcast address"),
            ("<network><name>a</name><ip address='10.0.0.255' prefix='24'/></network>", "network or broadcast address"),
            ("<network><name>a</name><ip address='10.0.0.1' prefix='31'/></network>", "not usable"),
            ("<network><name>a</name><ip address='10.0.0.1' prefix='24'><dhcp><range start='10.0.1.2' end='10.0.1.9'/></dhcp></ip></network>", "not a range inside 10.0.0.0/24"),
            ("<network><name>a</name><ip address='10.0.0.1' prefix='24'><dhcp><range start='10.0.0.9' end='10.0.0.2'/></dhcp></ip></network>", "not a range inside"),
            ("<network><name>a</name><ip address='10.0.0.5' prefix='24'><dhcp><range start='10.0.0.2' end='10.0.0.9'/></dhcp></ip></network>", "includes the host's own address"),
            ("<network><name>a</name><ip address='10.0.0.1' prefix='24'><dhcp><host ip='10.0.0.7'/></dhcp></ip></network>", "needs mac= or name="),
            ("<network><name>a</name><ip address='10.0.0.1' prefix='24'/><ip address='10.0.0.9' prefix='16'/></network>", "overlap"),
            ("<network><name>a</name><ip address='fd00::1' netmask='255.255.255.0'/></network>", "IPv6 takes prefix="),
            ("<network><name>a</name><ip address='10.0.0.1' prefix='24'><tftp root='/srv'/></ip></network>", "TFTP"),
            ("<network><name>a</name><mac address='01:00:00:00:00:01'/></network>", "not a unicast MAC"),
            ("<network><name>a</name><mtu size='9'/></network>", "not an MTU"),
            ("<network><name>a", "not well-formed"),
        ] {
            let e = NetworkDef::parse(xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: wanted '{want}', got: {e}");
        }
        let e = NetworkDef::parse("<network>\n<name>a</name>\n<forward mode='x'/>\n</network>").unwrap_err();
        assert_eq!((e.line, e.element.as_str()), (3, "forward"));
    }
}
