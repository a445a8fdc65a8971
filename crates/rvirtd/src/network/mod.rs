//! Virtual networks like libvirt's (issue 22): definitions kept in the
//! state directory and autostarted like domains, each brought up and down
//! by [`runtime`] in the daemon's network namespace. A network that was up
//! when the daemon stopped is found up again (its bridge and dnsmasq
//! outlive the daemon, as libvirt's do), neither lost nor started twice.

pub mod macvtap;
pub mod runtime;

use std::collections::BTreeMap;
use std::sync::Mutex;

use rvirt_domain::protocol::{LeaseInfo, NetworkSummary, Request, Response};
use rvirt_domain::NetworkDef;

use crate::store::Store;
use runtime::NetworkFiles;

/// libvirt's `default` network (its `networks/default.xml`): NAT on
/// virbr0, 192.168.122.0/24, DHCP for .2 to .254.
pub const DEFAULT_NETWORK_XML: &str = "<network>\n  <name>default</name>\n  <forward mode='nat'/>\n  <bridge name='virbr0' stp='on' delay='0'/>\n  <ip address='192.168.122.1' netmask='255.255.255.0'>\n    <dhcp>\n      <range start='192.168.122.2' end='192.168.122.254'/>\n    </dhcp>\n  </ip>\n</network>\n";

/// How `net-update` changes a network's fixed leases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostChange {
    /// Add after the others.
    AddLast,
    /// Add before the others.
    AddFirst,
    /// Replace the one with the same MAC (or name).
    Modify,
    /// Remove the one with the same MAC (or name, or address).
    Delete,
}

/// The part of a network `net-update` changes (libvirt's section names and numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateSection {
    /// `ip-dhcp-host` (4): a fixed lease of the IPv4 DHCP.
    DhcpHost,
    /// `ip-dhcp-range` (5): an address range of the IPv4 DHCP.
    DhcpRange,
    /// `dns-host` (10): a name DNS answers for.
    DnsHost,
}

impl UpdateSection {
    /// The section named `name` as virsh spells it, or why not.
    pub fn from_name(name: &str) -> Result<Self, String> {
        match name {
            "ip-dhcp-host" => Ok(Self::DhcpHost),
            "ip-dhcp-range" => Ok(Self::DhcpRange),
            "dns-host" => Ok(Self::DnsHost),
            s => Err(format!("net-update changes the ip-dhcp-host, ip-dhcp-range and dns-host sections, not '{s}'")),
        }
    }

    /// The section numbered `n` in libvirt's protocol.
    pub fn from_libvirt(n: u32) -> Option<Self> {
        match n {
            4 => Some(Self::DhcpHost),
            5 => Some(Self::DhcpRange),
            10 => Some(Self::DnsHost),
            _ => None,
        }
    }
}

/// Applies `change` with the `<range start end/>` element `range_xml` to the
/// IPv4 DHCP of `def`, validated as a definition's ranges are. As in
/// libvirt, a range is added or deleted, never modified; the last one stays
/// (without it the network would lease nothing).
fn edit_dhcp_ranges(def: &mut NetworkDef, change: HostChange, range_xml: &str) -> Result<(), String> {
    let ip = def.ips.iter_mut().find(|i| i.address.is_ipv4() && !i.dhcp_ranges.is_empty()).ok_or_else(|| format!("network '{}' has no IPv4 DHCP", def.name))?;
    let probe = format!("<network><name>probe</name><ip address='{}' prefix='{}'><dhcp>{range_xml}</dhcp></ip></network>", ip.address, ip.prefix);
    let parsed = NetworkDef::parse(&probe).map_err(|e| format!("the range element: {}", e.message))?;
    let (start, end) = parsed.ips.into_iter().next().and_then(|i| i.dhcp_ranges.into_iter().next()).ok_or("the update holds no <range start=... end=.../>")?;
    let number = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(v) => u128::from(u32::from(v)),
        std::net::IpAddr::V6(v) => u128::from(v),
    };
    match change {
        HostChange::AddLast | HostChange::AddFirst => {
            if let Some((s, e)) = ip.dhcp_ranges.iter().find(|(s, e)| number(start) <= number(*e) && number(*s) <= number(end)) {
                return Err(format!("{start}-{end} overlaps the range {s}-{e}"));
            }
            let at = if change == HostChange::AddFirst { 0 } else { ip.dhcp_ranges.len() };
            ip.dhcp_ranges.insert(at, (start, end));
        }
        HostChange::Modify => return Err("DHCP ranges cannot be modified, only added or deleted".into()),
        HostChange::Delete => {
            let at = ip.dhcp_ranges.iter().position(|r| *r == (start, end)).ok_or_else(|| format!("no DHCP range {start}-{end} to delete"))?;
            if ip.dhcp_ranges.len() == 1 {
                return Err(format!("{start}-{end} is the network's only DHCP range: add another first"));
            }
            ip.dhcp_ranges.remove(at);
        }
    }
    Ok(())
}

/// Applies `change` with the `<host ip=...><hostname>...</host>` element
/// `host_xml` to the DNS names of `def`, validated as a definition's are.
/// As in libvirt, a DNS host is added or deleted, never modified in place.
fn edit_dns_hosts(def: &mut NetworkDef, change: HostChange, host_xml: &str) -> Result<(), String> {
    let probe = format!("<network><name>probe</name><dns>{host_xml}</dns></network>");
    let parsed = NetworkDef::parse(&probe).map_err(|e| format!("the host element: {}", e.message))?;
    let host = parsed.dns_hosts.into_iter().next().ok_or("the update holds no <host ip=...><hostname>...</hostname></host>")?;
    match change {
        HostChange::AddLast | HostChange::AddFirst => {
            if let Some(h) = def.dns_hosts.iter().find(|h| h.ip == host.ip || h.hostnames.iter().any(|n| host.hostnames.contains(n))) {
                return Err(format!("there is already a DNS host for {} or one of its names ({})", host.ip, h.hostnames.join(", ")));
            }
            if change == HostChange::AddFirst {
                def.dns_hosts.insert(0, host);
            } else {
                def.dns_hosts.push(host);
            }
        }
        HostChange::Modify => return Err("DNS hosts cannot be modified, only added or deleted".into()),
        HostChange::Delete => {
            let before = def.dns_hosts.len();
            def.dns_hosts.retain(|h| h.ip != host.ip);
            if def.dns_hosts.len() == before {
                return Err(format!("no DNS host with address {} to delete", host.ip));
            }
        }
    }
    Ok(())
}

/// Applies `change` with the `<host .../>` element `host_xml` to the IPv4
/// DHCP of `def`, validated as a definition's hosts are.
fn edit_dhcp_hosts(def: &mut NetworkDef, change: HostChange, host_xml: &str) -> Result<(), String> {
    let ip = def.ips.iter_mut().find(|i| i.address.is_ipv4() && !i.dhcp_ranges.is_empty()).ok_or_else(|| format!("network '{}' has no IPv4 DHCP", def.name))?;
    // The element parsed inside a stand-in network with this subnet: the same checks as at define.
    let probe = format!("<network><name>probe</name><ip address='{}' prefix='{}'><dhcp>{host_xml}</dhcp></ip></network>", ip.address, ip.prefix);
    let parsed = NetworkDef::parse(&probe).map_err(|e| format!("the host element: {}", e.message))?;
    let host = parsed.ips.into_iter().next().and_then(|i| i.dhcp_hosts.into_iter().next()).ok_or("the update holds no <host .../>")?;
    let same = |h: &rvirt_domain::DhcpHost| (h.mac.is_some() && h.mac == host.mac) || (h.mac.is_none() && h.name.is_some() && h.name == host.name);
    match change {
        HostChange::AddLast | HostChange::AddFirst => {
            if let Some(h) = ip.dhcp_hosts.iter().find(|h| same(h) || h.ip == host.ip) {
                return Err(format!("there is already a fixed lease for {} or {} ({})", host.mac.as_deref().or(host.name.as_deref()).unwrap_or("?"), host.ip, h.ip));
            }
            if change == HostChange::AddFirst {
                ip.dhcp_hosts.insert(0, host);
            } else {
                ip.dhcp_hosts.push(host);
            }
        }
        HostChange::Modify => {
            let h = ip.dhcp_hosts.iter_mut().find(|h| same(h)).ok_or("no fixed lease with that MAC address or name to modify")?;
            *h = host;
        }
        HostChange::Delete => {
            let before = ip.dhcp_hosts.len();
            ip.dhcp_hosts.retain(|h| !(same(h) || h.ip == host.ip));
            if ip.dhcp_hosts.len() == before {
                return Err("no fixed lease with that MAC address, name or address to delete".into());
            }
        }
    }
    Ok(())
}

/// A network's identity and state at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkBrief {
    /// Its name.
    pub name: String,
    /// Its UUID's bytes.
    pub uuid: [u8; 16],
    /// Whether it is up.
    pub active: bool,
    /// Whether its definition is stored.
    pub persistent: bool,
    /// Whether it starts with the daemon.
    pub autostart: bool,
    /// Its bridge.
    pub bridge: String,
}

struct Net {
    /// The stored definition: what the next start uses.
    def: NetworkDef,
    persistent: bool,
    /// The definition the network runs with, while it is up (an edit
    /// while up changes `def` only, as with libvirt).
    live: Option<NetworkDef>,
}

impl Net {
    fn active(&self) -> bool {
        self.live.is_some()
    }

    /// The bridge it runs on, else the one it will.
    fn bridge(&self) -> &str {
        self.live.as_ref().unwrap_or(&self.def).bridge.as_deref().unwrap_or("")
    }
}

/// The daemon's networks.
pub struct Networks {
    store: Store,
    nets: Mutex<BTreeMap<String, Net>>,
}

/// A random MAC address in the 52:54:00 range QEMU and libvirt users expect.
pub(crate) fn random_mac() -> String {
    let mut b = [0u8; 3];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

impl Networks {
    /// Loads the stored definitions; a network whose bridge and dnsmasq
    /// are still there is active.
    pub fn open(store: Store) -> Self {
        let mut nets = BTreeMap::new();
        for (name, text) in store.network_definitions() {
            let def = match text.map_err(|e| e.to_string()).and_then(|t| NetworkDef::parse(&t).map_err(|e| e.to_string())) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("network definition '{name}' is unreadable, left alone: {e}");
                    continue;
                }
            };
            let files = NetworkFiles::new(&store.network_run_dir(), &def.name);
            let active = def.bridge.as_deref().is_some_and(|b| runtime::is_active(&def, b, &files));
            if active {
                tracing::info!("network '{name}' is up (bridge {})", def.bridge.as_deref().unwrap_or(""));
            }
            let live = active.then(|| def.clone());
            nets.insert(def.name.clone(), Net { def, persistent: true, live });
        }
        Self { store, nets: Mutex::new(nets) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Net>> {
        self.nets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn files(&self, name: &str) -> NetworkFiles {
        NetworkFiles::new(&self.store.network_run_dir(), name)
    }

    /// Finds a network by name or UUID.
    fn find(nets: &BTreeMap<String, Net>, key: &str) -> Result<String, String> {
        if nets.contains_key(key) {
            return Ok(key.to_string());
        }
        nets.iter()
            .find(|(_, n)| n.def.uuid.to_string().eq_ignore_ascii_case(key))
            .map(|(n, _)| n.clone())
            .ok_or_else(|| format!("no network with a matching name or uuid '{key}'"))
    }

    /// Stores a new definition or updates one (same name and UUID). A
    /// bridge name (`virbrN`, the first free) and a MAC address are given
    /// when the XML has none. Returns the name and the elements rvirt ignores.
    pub fn define(&self, xml: &str) -> Result<(String, Vec<String>), String> {
        let mut def = NetworkDef::parse(xml).map_err(|e| e.to_string())?;
        let mut nets = self.lock();
        if let Some(old) = nets.get(&def.name) {
            if old.def.uuid != def.uuid && xml.contains("<uuid>") {
                return Err(format!("network '{}' already exists with uuid {}", def.name, old.def.uuid));
            }
            // An update keeps the identity and bridge rvirt gave it.
            def.uuid = old.def.uuid;
            if def.bridge.is_none() {
                def.bridge = old.def.bridge.clone();
            }
            if def.mac.is_none() {
                def.mac = old.def.mac.clone();
            }
        }
        if let Some((other, _)) = nets.iter().find(|(n, o)| **n != def.name && o.def.uuid == def.uuid) {
            return Err(format!("uuid {} is already used by network '{other}'", def.uuid));
        }
        let bridge = match def.bridge.clone() {
            Some(b) => b,
            None => (0..).map(|i| format!("virbr{i}")).find(|b| !nets.values().any(|n| n.bridge() == b) && !runtime::link_exists(b)).unwrap_or_default(),
        };
        if let Some((other, _)) = nets.iter().find(|(n, o)| **n != def.name && o.bridge() == bridge) {
            return Err(format!("bridge {bridge} is already used by network '{other}'"));
        }
        def.bridge = Some(bridge);
        def.mac.get_or_insert_with(random_mac);
        let warnings = def.unknown.iter().map(|u| format!("<{}> (line {}) is kept but not used by rvirt", u.name, u.line)).collect();
        self.store.save_network(&def.name, &def.to_xml()).map_err(|e| format!("{e:#}"))?;
        let name = def.name.clone();
        match nets.get_mut(&name) {
            Some(n) => {
                n.def = def;
                n.persistent = true;
            }
            None => {
                nets.insert(name.clone(), Net { def, persistent: true, live: None });
            }
        }
        Ok((name, warnings))
    }

    /// Removes a definition. An active network stays up as a transient one
    /// (gone when destroyed), as with libvirt.
    pub fn undefine(&self, key: &str) -> Result<String, String> {
        let mut nets = self.lock();
        let name = Self::find(&nets, key)?;
        if !nets[&name].persistent {
            return Err(format!("network '{name}' is transient: it has no definition to remove"));
        }
        self.store.remove_network(&name).map_err(|e| format!("{e:#}"))?;
        if nets[&name].active() {
            if let Some(n) = nets.get_mut(&name) {
                n.persistent = false;
            }
        } else {
            nets.remove(&name);
        }
        Ok(name)
    }

    /// Brings a network up.
    pub fn start(&self, key: &str) -> Result<String, String> {
        let mut nets = self.lock();
        let name = Self::find(&nets, key)?;
        let n = &nets[&name];
        if n.active() {
            return Err(format!("network '{name}' is already active"));
        }
        runtime::start(&n.def, n.bridge(), &self.files(&name))?;
        let live = n.def.clone();
        for t in runtime::dropping_forward_tables() {
            tracing::warn!("network '{name}': nftables table {t} drops forwarded traffic by default; it may drop this network's too");
        }
        if let Some(n) = nets.get_mut(&name) {
            n.live = Some(live);
        }
        Ok(name)
    }

    /// Takes a network down. Domains on it lose their connection (their
    /// taps stay, unattached), as with libvirt; a transient network is gone.
    pub fn destroy(&self, key: &str) -> Result<String, String> {
        let mut nets = self.lock();
        let name = Self::find(&nets, key)?;
        let n = &nets[&name];
        let Some(live) = &n.live else {
            return Err(format!("network '{name}' is not active"));
        };
        runtime::stop(live, n.bridge(), &self.files(&name))?;
        if nets[&name].persistent {
            if let Some(n) = nets.get_mut(&name) {
                n.live = None;
            }
        } else {
            nets.remove(&name);
        }
        Ok(name)
    }

    /// Marks a defined network to start with the daemon, or not.
    pub fn set_autostart(&self, key: &str, on: bool) -> Result<String, String> {
        let nets = self.lock();
        let name = Self::find(&nets, key)?;
        if !nets[&name].persistent {
            return Err(format!("network '{name}' is transient: only defined networks can autostart"));
        }
        self.store.set_network_autostart(&name, on).map_err(|e| format!("{e:#}"))?;
        Ok(name)
    }

    /// `net-update`: adds (`first`: before the others), replaces or deletes
    /// a fixed lease or range of the network's IPv4 DHCP or a DNS host, in
    /// the running network (`live`: dnsmasq re-reads its host files on
    /// SIGHUP, and restarts for a range) and/or its stored definition
    /// (`config`).
    pub fn update(&self, key: &str, section: UpdateSection, change: HostChange, host_xml: &str, live: bool, config: bool) -> Result<String, String> {
        let mut nets = self.lock();
        let name = Self::find(&nets, key)?;
        let n = nets.get_mut(&name).ok_or_else(|| format!("no network '{name}'"))?;
        if live && n.live.is_none() {
            return Err(format!("network '{name}' is not active: only its definition can change (--config)"));
        }
        // Both changed on copies first: either change is refused before anything is kept.
        let edit = |mut def: NetworkDef| -> Result<NetworkDef, String> {
            match section {
                UpdateSection::DhcpHost => edit_dhcp_hosts(&mut def, change, host_xml)?,
                UpdateSection::DhcpRange => edit_dhcp_ranges(&mut def, change, host_xml)?,
                UpdateSection::DnsHost => edit_dns_hosts(&mut def, change, host_xml)?,
            }
            Ok(def)
        };
        let stored = if config { Some(edit(n.def.clone())?) } else { None };
        let running = match (&n.live, live) {
            (Some(l), true) => Some(edit(l.clone())?),
            _ => None,
        };
        if let Some(d) = stored {
            self.store.save_network(&name, &d.to_xml()).map_err(|e| format!("{e:#}"))?;
            n.def = d;
        }
        if let Some(l) = running {
            let files = self.files(&name);
            let (path, text) = match section {
                UpdateSection::DhcpHost => (&files.hosts, runtime::dhcp_hosts(&l)),
                UpdateSection::DnsHost => (&files.addn_hosts, runtime::addn_hosts(&l)),
                // dnsmasq reads its ranges only at start; when the new ones
                // fail, it is brought back with the old.
                UpdateSection::DhcpRange => {
                    if let Err(e) = runtime::restart_dnsmasq(&l, n.bridge(), &files) {
                        if let Some(old) = &n.live {
                            if let Err(again) = runtime::restart_dnsmasq(old, n.bridge(), &files) {
                                tracing::error!("network '{name}': dnsmasq did not come back with its old ranges: {again}");
                            }
                        }
                        return Err(e);
                    }
                    n.live = Some(l);
                    return Ok(name);
                }
            };
            std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
            n.live = Some(l);
            if let Some(pid) = runtime::dnsmasq_pid(&files) {
                // SAFETY: kill has no memory effects; the pid is dnsmasq's (checked by name).
                unsafe { libc::kill(pid, libc::SIGHUP) };
            }
        }
        Ok(name)
    }

    /// Defines libvirt's `default` network, marked for autostart, unless a
    /// network of that name exists (`rvirtd --default-network`, as libvirt
    /// packages do on real hosts). Starting it is refused, with the reason,
    /// when its subnet or bridge is in use.
    pub fn ensure_default(&self) -> Result<(), String> {
        if self.brief("default").is_ok() {
            return Ok(());
        }
        self.define(DEFAULT_NETWORK_XML)?;
        self.set_autostart("default", true).map(|_| ())
    }

    /// Starts the networks marked for autostart that are not up.
    pub fn autostart(&self) {
        let names: Vec<String> = self.lock().iter().filter(|(n, x)| !x.active() && self.store.network_autostart(n)).map(|(n, _)| n.clone()).collect();
        for n in names {
            match self.start(&n) {
                Ok(_) => tracing::info!("autostarted network '{n}'"),
                Err(e) => tracing::error!("autostart of network '{n}' failed: {e}"),
            }
        }
    }

    /// A network's identity and state.
    pub fn brief(&self, key: &str) -> Result<NetworkBrief, String> {
        let nets = self.lock();
        let name = Self::find(&nets, key)?;
        Ok(self.brief_of(&name, &nets[&name]))
    }

    /// Every network, by name.
    pub fn briefs(&self) -> Vec<NetworkBrief> {
        self.lock().iter().map(|(n, x)| self.brief_of(n, x)).collect()
    }

    fn brief_of(&self, name: &str, n: &Net) -> NetworkBrief {
        NetworkBrief {
            name: name.to_string(),
            uuid: *n.def.uuid.as_bytes(),
            active: n.active(),
            persistent: n.persistent,
            autostart: n.persistent && self.store.network_autostart(name),
            bridge: n.bridge().to_string(),
        }
    }

    /// The bridge of network `name` for a domain's card; refused when the
    /// network does not exist or is down.
    pub fn active_bridge(&self, name: &str) -> Result<String, String> {
        let nets = self.lock();
        match nets.get(name) {
            Some(n) if n.active() => Ok(n.bridge().to_string()),
            Some(_) => Err(format!("network '{name}' is not active (start it: virsh net-start {name})")),
            None => Err(format!("network '{name}' does not exist (define it: virsh net-define FILE)")),
        }
    }

    /// The leases an active network's dnsmasq handed out, with the
    /// network's bridge and the prefix length of each address's subnet.
    pub fn leases(&self, key: &str) -> Result<(String, Vec<(runtime::Lease, u8)>), String> {
        let nets = self.lock();
        let name = Self::find(&nets, key)?;
        let n = &nets[&name];
        let Some(live) = &n.live else {
            return Err(format!("network '{name}' is not active"));
        };
        let leases = runtime::read_leases(&self.files(&name))
            .into_iter()
            .map(|l| {
                let prefix = live.ips.iter().find(|i| i.contains(l.ip)).map_or(0, |i| i.prefix);
                (l, prefix)
            })
            .collect();
        Ok((n.bridge().to_string(), leases))
    }

    /// Carries out one network request of rvirtd's own protocol.
    pub fn handle(&self, req: Request) -> Response {
        let done = |r: Result<String, String>| match r {
            Ok(n) => Response::done(&n),
            Err(e) => Response::error(e),
        };
        match req {
            Request::NetList { all } => {
                let rows = self
                    .briefs()
                    .into_iter()
                    .filter(|b| all || b.active)
                    .map(|b| NetworkSummary {
                        uuid: uuid::Uuid::from_bytes(b.uuid).hyphenated().to_string(),
                        name: b.name,
                        active: b.active,
                        autostart: b.autostart,
                        persistent: b.persistent,
                        bridge: b.bridge,
                    })
                    .collect();
                Response { networks: Some(rows), ..Response::ok() }
            }
            Request::NetDefine { xml } => match self.define(&xml) {
                Ok((n, w)) => Response { warnings: w, ..Response::done(&n) },
                Err(e) => Response::error(e),
            },
            Request::NetUndefine { network } => done(self.undefine(&network)),
            Request::NetStart { network } => done(self.start(&network)),
            Request::NetDestroy { network } => done(self.destroy(&network)),
            Request::NetAutostart { network, enable } => done(self.set_autostart(&network, enable)),
            Request::NetUpdate { network, action, section, xml, live, config } => {
                let section = match UpdateSection::from_name(&section) {
                    Ok(s) => s,
                    Err(e) => return Response::error(e),
                };
                let change = match action.as_str() {
                    "add" | "add-last" => HostChange::AddLast,
                    "add-first" => HostChange::AddFirst,
                    "modify" => HostChange::Modify,
                    "delete" => HostChange::Delete,
                    c => return Response::error(format!("net-update: unknown command '{c}' (add, add-first, add-last, modify, delete)")),
                };
                // Neither: the network as it is now (virsh's --current).
                let (live, config) = if live || config {
                    (live, config)
                } else {
                    let active = self.brief(&network).is_ok_and(|b| b.active);
                    (active, !active)
                };
                done(self.update(&network, section, change, &xml, live, config))
            }
            Request::NetDumpXml { network, inactive } => match self.dump_xml(&network, inactive) {
                Ok(x) => Response { xml: Some(x), ..Response::ok() },
                Err(e) => Response::error(e),
            },
            Request::NetDhcpLeases { network } => match self.leases(&network) {
                Ok((_, leases)) => {
                    let rows = leases
                        .into_iter()
                        .map(|(l, p)| LeaseInfo { expiry: l.expiry, mac: l.mac, address: format!("{}/{p}", l.ip), hostname: l.hostname })
                        .collect();
                    Response { leases: Some(rows), ..Response::ok() }
                }
                Err(e) => Response::error(e),
            },
            other => Response::error(format!("'{}' is not a network request", other.name())),
        }
    }

    /// The definition as `net-dumpxml` shows it: the one it runs with while
    /// up, unless `inactive` (the stored one, which its next start uses).
    pub fn dump_xml(&self, key: &str, inactive: bool) -> Result<String, String> {
        let nets = self.lock();
        let name = Self::find(&nets, key)?;
        let n = &nets[&name];
        Ok(n.live.as_ref().filter(|_| !inactive).unwrap_or(&n.def).to_xml())
    }
}
