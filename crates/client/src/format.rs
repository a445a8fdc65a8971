//! What the commands print, in virsh's layout.

use rvirt_domain::protocol::{DomainInfo, DomainSummary, InterfaceAddress, LeaseInfo, NetworkSummary};

/// The `list` table.
pub fn list(rows: &[DomainSummary]) -> String {
    let name_w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    let mut out = format!(" {:<4} {:<name_w$}   {}\n", "Id", "Name", "State");
    out += &"-".repeat(name_w + 18);
    out.push('\n');
    for r in rows {
        let id = r.id.map_or("-".to_string(), |i| i.to_string());
        out += &format!(" {id:<4} {:<name_w$}   {}\n", r.name, r.state);
    }
    out
}

/// The `net-list` table.
pub fn net_list(rows: &[NetworkSummary]) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" };
    let name_w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    let mut out = format!(" {:<name_w$}   {:<8}   {:<9}   {}\n", "Name", "State", "Autostart", "Persistent");
    out += &"-".repeat(name_w + 40);
    out.push('\n');
    for r in rows {
        let state = if r.active { "active" } else { "inactive" };
        out += &format!(" {:<name_w$}   {state:<8}   {:<9}   {}\n", r.name, yes(r.autostart), yes(r.persistent));
    }
    out
}

/// The `net-info` table.
pub fn net_info(n: &NetworkSummary) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
    let rows = [("Name", n.name.clone()), ("UUID", n.uuid.clone()), ("Active", yes(n.active)), ("Persistent", yes(n.persistent)), ("Autostart", yes(n.autostart)), ("Bridge", n.bridge.clone())];
    rows.iter().map(|(k, v)| format!("{:<16}{v}\n", format!("{k}:"))).collect()
}

/// The `net-dhcp-leases` table.
pub fn leases(rows: &[LeaseInfo]) -> String {
    let mut out = format!(" {:<19}   {:<17}   {:<18}   {}\n", "Expiry (UTC, s)", "MAC address", "IP address", "Hostname");
    out += &"-".repeat(72);
    out.push('\n');
    for l in rows {
        let expiry = if l.expiry == 0 { "never".to_string() } else { l.expiry.to_string() };
        out += &format!(" {expiry:<19}   {:<17}   {:<18}   {}\n", l.mac, l.address, l.hostname.as_deref().unwrap_or("-"));
    }
    out
}

/// The `domifaddr` table.
pub fn addresses(rows: &[InterfaceAddress]) -> String {
    let mut out = format!(" {:<10} {:<19} {:<8} {}\n", "Name", "MAC address", "Protocol", "Address");
    out += &"-".repeat(64);
    out.push('\n');
    for a in rows {
        let proto = if a.address.contains(':') { "ipv6" } else { "ipv4" };
        out += &format!(" {:<10} {:<19} {proto:<8} {}\n", a.name, a.mac, a.address);
    }
    out
}

fn kib(v: u64) -> String {
    format!("{v} KiB")
}

/// The `dominfo` table.
pub fn info(i: &DomainInfo) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
    let rows: Vec<(&str, String)> = vec![
        ("Id", i.id.map_or("-".into(), |v| v.to_string())),
        ("Name", i.name.clone()),
        ("UUID", i.uuid.clone()),
        ("OS Type", i.os_type.clone()),
        ("State", i.state.to_string()),
        ("CPU(s)", i.vcpus.to_string()),
        ("CPU time", i.cpu_time_seconds.map_or("-".into(), |s| format!("{s:.1}s"))),
        ("Max memory", kib(i.max_memory_kib)),
        ("Used memory", kib(i.used_memory_kib)),
        ("Persistent", yes(i.persistent)),
        ("Autostart", if i.autostart { "enable" } else { "disable" }.into()),
        ("VMM pid", i.pid.map_or("-".into(), |p| p.to_string())),
    ];
    rows.iter().map(|(k, v)| format!("{:<16}{v}\n", format!("{k}:"))).collect()
}

#[cfg(test)]
mod tests {
    use rvirt_domain::protocol::DomainState;

    use super::*;

    #[test]
    fn networks_and_leases_are_laid_out_like_virsh() {
        let n = NetworkSummary { name: "default".into(), uuid: "u".into(), active: true, autostart: true, persistent: true, bridge: "virbr0".into() };
        let t = net_list(std::slice::from_ref(&n));
        assert_eq!(net_info(&n).lines().nth(5), Some("Bridge:         virbr0"));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["Name", "State", "Autostart", "Persistent"]);
        assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["default", "active", "yes", "yes"]);
        let l = leases(&[LeaseInfo { expiry: 0, mac: "52:54:00:00:00:01".into(), address: "10.0.0.5/24".into(), hostname: None }]);
        assert_eq!(l.lines().nth(2).unwrap().split_whitespace().collect::<Vec<_>>(), ["never", "52:54:00:00:00:01", "10.0.0.5/24", "-"]);
    }

    #[test]
    fn list_is_laid_out_like_virsh() {
        let rows = vec![
            DomainSummary { id: Some(3), name: "web".into(), state: DomainState::Running, uuid: String::new(), persistent: true, autostart: false, managed_save: false, snapshots: 0 },
            DomainSummary { id: None, name: "database".into(), state: DomainState::ShutOff, uuid: String::new(), persistent: true, autostart: false, managed_save: false, snapshots: 0 },
        ];
        let t = list(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], " Id   Name       State");
        assert_eq!(lines[2], " 3    web        running");
        assert_eq!(lines[3], " -    database   shut off");
    }
}
