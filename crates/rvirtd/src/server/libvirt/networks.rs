//! The `remote` program's network procedures (`virsh net-*`, and `domifaddr`,
//! which reads a network's leases): each a thin
//! call into the daemon's [`crate::network::Networks`].

use rvirt_libvirt_rpc::remote::{err, list_networks as list, proc_ as p, RemoteNetwork, DOMAIN_LIST_MAX, FROM_NETWORK, UUID_LEN};
use rvirt_libvirt_rpc::{Decoder, RemoteError};

use super::dispatch::{bad_args, encode, flag_group, list_all, ret_int, Reply};
use super::Session;
use crate::network::{HostChange, NetworkBrief, UpdateSection};

/// Whether network procedure `proc_` changes anything (refused on read-only connections).
pub(super) fn changes(proc_: i32) -> bool {
    matches!(proc_, p::NETWORK_CREATE | p::NETWORK_DEFINE_XML | p::NETWORK_DESTROY | p::NETWORK_SET_AUTOSTART | p::NETWORK_UNDEFINE | p::NETWORK_UPDATE)
}

fn error(code: i32, message: impl Into<String>) -> RemoteError {
    RemoteError { domain: FROM_NETWORK, ..RemoteError::new(code, message) }
}

fn failed(message: String) -> RemoteError {
    error(err::OPERATION_FAILED, format!("operation failed: {message}"))
}

fn remote(b: &NetworkBrief) -> RemoteNetwork {
    RemoteNetwork { name: b.name.clone(), uuid: b.uuid }
}

fn ret_network(b: &NetworkBrief) -> Reply {
    encode(|e| remote(b).encode(e))
}

/// Whether `b` passes `virConnectListAllNetworks` filter `flags`.
fn list_matches(b: &NetworkBrief, flags: u32) -> bool {
    let group = |mask: u32, pass: &[(u32, bool)]| flag_group(flags, mask, pass);
    group(list::ACTIVE | list::INACTIVE, &[(list::ACTIVE, b.active), (list::INACTIVE, !b.active)])
        && group(list::PERSISTENT | list::TRANSIENT, &[(list::PERSISTENT, b.persistent), (list::TRANSIENT, !b.persistent)])
        && group(list::AUTOSTART | list::NO_AUTOSTART, &[(list::AUTOSTART, b.autostart), (list::NO_AUTOSTART, !b.autostart)])
}

impl Session {
    /// The network a call names, as it is now.
    fn network(&self, d: &mut Decoder) -> Result<NetworkBrief, RemoteError> {
        let n = RemoteNetwork::decode(d).map_err(bad_args)?;
        let uuid = uuid::Uuid::from_bytes(n.uuid).hyphenated().to_string();
        self.mgr.networks().brief(&uuid).map_err(|_| error(err::NO_NETWORK, format!("Network not found: no network with matching uuid '{uuid}' ({})", n.name)))
    }

    /// Answers a network procedure; `None` when `proc_` is not one.
    pub(super) fn network_call(&mut self, proc_: i32, d: &mut Decoder) -> Option<Reply> {
        let nets = self.mgr.clone();
        let nets = nets.networks();
        Some(match proc_ {
            p::CONNECT_LIST_ALL_NETWORKS => (|| {
                let need = d.i32().map_err(bad_args)?;
                let flags = d.u32().map_err(bad_args)?;
                let found: Vec<NetworkBrief> = nets.briefs().into_iter().filter(|b| list_matches(b, flags)).collect();
                encode(|e| list_all(e, need, &found, |b, e| remote(b).encode(e)))
            })(),
            p::CONNECT_NUM_OF_NETWORKS => ret_int(nets.briefs().iter().filter(|b| b.active).count() as i32),
            p::CONNECT_NUM_OF_DEFINED_NETWORKS => ret_int(nets.briefs().iter().filter(|b| !b.active).count() as i32),
            p::CONNECT_LIST_NETWORKS | p::CONNECT_LIST_DEFINED_NETWORKS => (|| {
                let max = d.i32().map_err(bad_args)?;
                let max = usize::try_from(max).ok().filter(|m| *m <= DOMAIN_LIST_MAX).ok_or_else(|| error(err::RPC, format!("too many names asked for: {max}")))?;
                let active = proc_ == p::CONNECT_LIST_NETWORKS;
                let names: Vec<String> = nets.briefs().into_iter().filter(|b| b.active == active).map(|b| b.name).take(max).collect();
                encode(|e| {
                    e.u32(names.len() as u32);
                    for n in &names {
                        e.string(n);
                    }
                })
            })(),
            p::NETWORK_LOOKUP_BY_NAME => (|| {
                let name = d.string().map_err(bad_args)?;
                let b = nets.brief(name).ok().filter(|b| b.name == name);
                ret_network(&b.ok_or_else(|| error(err::NO_NETWORK, format!("Network not found: no network with matching name '{name}'")))?)
            })(),
            p::NETWORK_LOOKUP_BY_UUID => (|| {
                let mut u = [0u8; UUID_LEN];
                u.copy_from_slice(d.fixed_opaque(UUID_LEN).map_err(bad_args)?);
                let s = uuid::Uuid::from_bytes(u).hyphenated().to_string();
                ret_network(&nets.brief(&s).map_err(|_| error(err::NO_NETWORK, format!("Network not found: no network with matching uuid '{s}'")))?)
            })(),
            p::NETWORK_DEFINE_XML => (|| {
                let xml = d.string().map_err(bad_args)?;
                let (name, warnings) = nets.define(xml).map_err(|e| error(err::XML_ERROR, format!("XML error: {e}")))?;
                for w in warnings {
                    tracing::warn!("network '{name}': {w}");
                }
                ret_network(&nets.brief(&name).map_err(failed)?)
            })(),
            p::NETWORK_UNDEFINE => (|| {
                let b = self.network(d)?;
                nets.undefine(&b.name).map_err(|e| error(err::OPERATION_INVALID, format!("Requested operation is not valid: {e}")))?;
                Ok(Vec::new())
            })(),
            p::NETWORK_CREATE => (|| {
                let b = self.network(d)?;
                if b.active {
                    return Err(error(err::OPERATION_INVALID, "Requested operation is not valid: network is already active"));
                }
                nets.start(&b.name).map_err(failed)?;
                Ok(Vec::new())
            })(),
            p::NETWORK_DESTROY => (|| {
                let b = self.network(d)?;
                if !b.active {
                    return Err(error(err::OPERATION_INVALID, "Requested operation is not valid: network is not active"));
                }
                nets.destroy(&b.name).map_err(failed)?;
                Ok(Vec::new())
            })(),
            p::NETWORK_GET_XML_DESC => (|| {
                let b = self.network(d)?;
                // VIR_NETWORK_XML_INACTIVE: the stored definition.
                let inactive = d.u32().map_err(bad_args)? & 1 != 0;
                let xml = nets.dump_xml(&b.name, inactive).map_err(failed)?;
                encode(|e| {
                    e.string(&xml);
                })
            })(),
            p::NETWORK_GET_BRIDGE_NAME => (|| {
                let b = self.network(d)?;
                encode(|e| {
                    e.string(&b.bridge);
                })
            })(),
            p::NETWORK_GET_AUTOSTART => (|| ret_int(i32::from(self.network(d)?.autostart)))(),
            p::NETWORK_SET_AUTOSTART => (|| {
                let b = self.network(d)?;
                let on = d.i32().map_err(bad_args)? != 0;
                nets.set_autostart(&b.name, on).map_err(|e| error(err::OPERATION_INVALID, format!("Requested operation is not valid: {e}")))?;
                Ok(Vec::new())
            })(),
            p::NETWORK_GET_DHCP_LEASES => (|| {
                let b = self.network(d)?;
                let mac = d.opt_string().map_err(bad_args)?.map(str::to_ascii_lowercase);
                let need = d.i32().map_err(bad_args)?;
                let _flags = d.u32().map_err(bad_args)?;
                let (bridge, leases) = nets.leases(&b.name).map_err(|e| error(err::OPERATION_INVALID, format!("Requested operation is not valid: {e}")))?;
                let leases: Vec<_> = leases.into_iter().filter(|(l, _)| mac.as_ref().is_none_or(|m| *m == l.mac)).collect();
                encode(|e| {
                    list_all(e, need, &leases, |(l, prefix), e| {
                        e.string(&bridge).i64(l.expiry).i32(i32::from(l.ip.is_ipv6()));
                        e.opt_string(Some(&l.mac)).opt_string(None).string(&l.ip.to_string()).u32(u32::from(*prefix));
                        e.opt_string(l.hostname.as_deref()).opt_string(l.client_id.as_deref());
                    })
                })
            })(),
            p::DOMAIN_INTERFACE_ADDRESSES => (|| {
                let dom = rvirt_libvirt_rpc::RemoteDomain::decode(d).map_err(bad_args)?;
                let source = d.u32().map_err(bad_args)?;
                let _flags = d.u32().map_err(bad_args)?;
                // 0: from the network's leases; the guest agent (1) and ARP (2) are not served.
                if source != 0 {
                    return Err(error(err::NO_SUPPORT, "this function is not supported by the connection driver: only --source lease is served"));
                }
                let uuid = uuid::Uuid::from_bytes(dom.uuid).hyphenated().to_string();
                let found = self.mgr.interface_addresses(&uuid).map_err(|_| RemoteError { domain: rvirt_libvirt_rpc::remote::FROM_QEMU, ..RemoteError::new(err::NO_DOMAIN, format!("Domain not found: no domain with matching uuid '{uuid}'")) })?;
                encode(|e| {
                    e.u32(found.len() as u32);
                    for (tap, mac, addrs) in &found {
                        e.string(tap).opt_string(Some(mac)).u32(addrs.len() as u32);
                        for (ip, prefix) in addrs {
                            e.i32(i32::from(ip.is_ipv6())).string(&ip.to_string()).u32(u32::from(*prefix));
                        }
                    }
                })
            })(),
            p::NETWORK_UPDATE => (|| {
                let b = self.network(d)?;
                let (a, c) = (d.u32().map_err(bad_args)?, d.u32().map_err(bad_args)?);
                let _parent = d.i32().map_err(bad_args)?;
                let xml = d.string().map_err(bad_args)?;
                let flags = d.u32().map_err(bad_args)?;
                // libvirt's client sends section and command in either order
                // (the protocol swapped them once); commands are 1 to 4 and the
                // sections rvirt serves are ip-dhcp-host (4), ip-dhcp-range (5)
                // and dns-host (10).
                let served = |n: u32| UpdateSection::from_libvirt(n);
                let command = |n: u32| (1..=4).contains(&n);
                let (section, command) = if command(c) && served(a).is_some() {
                    (served(a), c)
                } else if command(a) && served(c).is_some() {
                    (served(c), a)
                } else {
                    (None, 0)
                };
                let Some(section) = section else {
                    return Err(error(err::NO_SUPPORT, "this function is not supported by the connection driver: rvirt updates the ip-dhcp-host, ip-dhcp-range and dns-host sections only"));
                };
                let change = match command {
                    1 => HostChange::Modify,
                    2 => HostChange::Delete,
                    3 => HostChange::AddLast,
                    _ => HostChange::AddFirst,
                };
                // AFFECT_LIVE 1, AFFECT_CONFIG 2; neither: the network as it is now.
                let (live, config) = match flags & 3 {
                    0 => (b.active, !b.active),
                    f => (f & 1 != 0, f & 2 != 0),
                };
                nets.update(&b.name, section, change, xml, live, config).map_err(|e| error(err::OPERATION_INVALID, format!("Requested operation is not valid: {e}")))?;
                Ok(Vec::new())
            })(),
            p::NETWORK_IS_ACTIVE => (|| ret_int(i32::from(self.network(d)?.active)))(),
            p::NETWORK_IS_PERSISTENT => (|| ret_int(i32::from(self.network(d)?.persistent)))(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_list_filters_combine_as_libvirt_s_do() {
        let b = |active, persistent, autostart| NetworkBrief { name: "n".into(), uuid: [0; 16], active, persistent, autostart, bridge: "virbr0".into() };
        assert!(list_matches(&b(true, true, true), 0));
        assert!(list_matches(&b(true, true, false), list::ACTIVE) && !list_matches(&b(false, true, false), list::ACTIVE));
        assert!(list_matches(&b(false, true, false), list::INACTIVE | list::ACTIVE));
        assert!(list_matches(&b(true, false, false), list::TRANSIENT) && !list_matches(&b(true, false, false), list::PERSISTENT));
        assert!(list_matches(&b(false, true, true), list::AUTOSTART) && !list_matches(&b(false, true, true), list::NO_AUTOSTART));
    }
}
