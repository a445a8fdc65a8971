//! The `remote` program's everyday domain procedures beyond the lifecycle
//! (virsh setmem, setmaxmem, setvcpus, vcpucount, vcpuinfo, vcpupin
//! --query, reset, domrename, desc, metadata, attach/detach/update-device,
//! domif-setlink, dommemstat, domblkinfo): each decodes its arguments, calls
//! the [`crate::manager::Manager`] as rvirtd's own socket does, and encodes
//! libvirt's reply.

use rvirt_domain::protocol::Affect;
use rvirt_libvirt_rpc::remote::{err, proc_ as p, FROM_QEMU};
use rvirt_libvirt_rpc::{Decoder, RemoteError};

use super::dispatch::{bad_args, encode, ret_int, Reply};
use super::Session;

/// `VIR_DOMAIN_AFFECT_LIVE`.
const AFFECT_LIVE: u32 = 1;
/// `VIR_DOMAIN_AFFECT_CONFIG`.
const AFFECT_CONFIG: u32 = 2;
/// `VIR_DOMAIN_MEM_MAXIMUM` (and `VIR_DOMAIN_VCPU_MAXIMUM`, the same bit).
const MAXIMUM: u32 = 4;
/// `VIR_DOMAIN_VCPU_GUEST`: the guest agent's view, which rvirt has not.
const VCPU_GUEST: u32 = 8;
/// `VIR_DOMAIN_METADATA_DESCRIPTION`, `_TITLE`, `_ELEMENT`.
const META_DESCRIPTION: i32 = 0;
const META_TITLE: i32 = 1;
const META_ELEMENT: i32 = 2;
/// libvirt's bound on `virDomainMemoryStats` (`REMOTE_DOMAIN_MEMORY_STATS_MAX`).
const MEMORY_STATS_MAX: u32 = 1024;
/// libvirt's bounds on vCPU info and CPU maps (`REMOTE_VCPUINFO_MAX`, `REMOTE_CPUMAPS_MAX`).
const VCPUINFO_MAX: i32 = 16384;
const CPUMAPS_MAX: i64 = 8_388_608;
/// `VIR_VCPU_RUNNING`.
const VCPU_RUNNING: i32 = 1;

/// The procedures of this module, and whether each changes anything
/// (those are refused on read-only connections).
const PROCEDURES: &[(i32, bool)] = &[
    (p::DOMAIN_SET_MAX_MEMORY, true),
    (p::DOMAIN_SET_MEMORY, true),
    (p::DOMAIN_SET_MEMORY_FLAGS, true),
    (p::DOMAIN_SET_VCPUS, true),
    (p::DOMAIN_SET_VCPUS_FLAGS, true),
    (p::DOMAIN_GET_VCPUS_FLAGS, false),
    (p::DOMAIN_GET_MAX_VCPUS, false),
    (p::DOMAIN_GET_VCPUS, false),
    (p::DOMAIN_GET_VCPU_PIN_INFO, false),
    (p::DOMAIN_RESET, true),
    (p::DOMAIN_RENAME, true),
    (p::DOMAIN_GET_METADATA, false),
    (p::DOMAIN_SET_METADATA, true),
    (p::DOMAIN_ATTACH_DEVICE, true),
    (p::DOMAIN_ATTACH_DEVICE_FLAGS, true),
    (p::DOMAIN_DETACH_DEVICE, true),
    (p::DOMAIN_DETACH_DEVICE_FLAGS, true),
    (p::DOMAIN_UPDATE_DEVICE_FLAGS, true),
    (p::DOMAIN_MEMORY_STATS, false),
    (p::DOMAIN_SET_MEMORY_STATS_PERIOD, true),
    (p::DOMAIN_GET_BLOCK_INFO, false),
];

/// Whether procedure `proc_` is one of these and changes anything.
pub(super) fn changes(proc_: i32) -> bool {
    PROCEDURES.iter().any(|(p, c)| *p == proc_ && *c)
}

fn error(code: i32, message: impl Into<String>) -> RemoteError {
    RemoteError { domain: FROM_QEMU, ..RemoteError::new(code, message) }
}

/// A manager refusal: "not valid" when it is about the domain's state,
/// "not supported" when rvirt lacks the feature, else "failed".
fn refused(message: String) -> RemoteError {
    if message.contains("hotplug") {
        error(err::NO_SUPPORT, format!("this function is not supported by the connection driver: {message}"))
    } else if message.contains("is not running") || message.contains("is running") || message.contains("is transient") {
        error(err::OPERATION_INVALID, format!("Requested operation is not valid: {message}"))
    } else if message.starts_with("metadata not found") {
        error(err::NO_DOMAIN_METADATA, message)
    } else {
        error(err::OPERATION_FAILED, format!("operation failed: {message}"))
    }
}

fn affect(flags: u32) -> Affect {
    Affect { live: flags & AFFECT_LIVE != 0, config: flags & AFFECT_CONFIG != 0 }
}

/// Flags outside `known` are refused, as libvirt refuses them.
fn check_flags(flags: u32, known: u32, api: &str) -> Result<(), RemoteError> {
    if flags & !known != 0 {
        return Err(error(err::INVALID_ARG, format!("invalid argument: unsupported flags ({:#x}) in function {api}", flags & !known)));
    }
    Ok(())
}

/// Host CPUs in a list like `0-3,6`, as a bitmap of `maplen` bytes.
fn cpumap(list: &str, maplen: usize) -> Vec<u8> {
    let mut map = vec![0u8; maplen];
    let cpus = rvirt_domain::CpuSet::parse(list).map(|s| s.cpus).unwrap_or_default();
    for cpu in cpus.into_iter().filter(|c| *c < maplen * 8) {
        map[cpu / 8] |= 1 << (cpu % 8);
    }
    map
}

/// libvirt's memory statistic tags by virsh's names.
fn memory_tag(name: &str) -> Option<i32> {
    Some(match name {
        "swap_in" => 0,
        "swap_out" => 1,
        "major_fault" => 2,
        "minor_fault" => 3,
        "unused" => 4,
        "available" => 5,
        "actual" => 6,
        "rss" => 7,
        "usable" => 8,
        "last_update" => 9,
        "disk_caches" => 10,
        "hugetlb_pgalloc" => 11,
        "hugetlb_pgfail" => 12,
        _ => return None,
    })
}

impl Session {
    /// Answers one of these procedures; `None` when `proc_` is not one.
    pub(super) fn domain_call(&mut self, proc_: i32, d: &mut Decoder) -> Option<Reply> {
        let known = PROCEDURES.iter().any(|(p, _)| *p == proc_);
        known.then(|| self.domain_procedure(proc_, d))
    }

    fn domain_procedure(&mut self, proc_: i32, d: &mut Decoder) -> Reply {
        let mgr = self.mgr.clone();
        let b = self.domain(d)?;
        let name = b.name.clone();
        match proc_ {
            p::DOMAIN_SET_MAX_MEMORY | p::DOMAIN_SET_MEMORY | p::DOMAIN_SET_MEMORY_FLAGS => {
                let kib = d.u64().map_err(bad_args)?;
                let flags = match proc_ {
                    p::DOMAIN_SET_MAX_MEMORY => MAXIMUM,
                    p::DOMAIN_SET_MEMORY => AFFECT_LIVE,
                    _ => d.u32().map_err(bad_args)?,
                };
                check_flags(flags, AFFECT_LIVE | AFFECT_CONFIG | MAXIMUM, "virDomainSetMemoryFlags")?;
                if flags & MAXIMUM != 0 {
                    mgr.set_max_memory(&name, kib, affect(flags)).map_err(refused)?;
                } else {
                    mgr.set_memory(&name, kib, affect(flags)).map_err(refused)?;
                }
                Ok(Vec::new())
            }
            p::DOMAIN_SET_VCPUS | p::DOMAIN_SET_VCPUS_FLAGS => {
                let n = d.u32().map_err(bad_args)?;
                let flags = if proc_ == p::DOMAIN_SET_VCPUS { AFFECT_LIVE } else { d.u32().map_err(bad_args)? };
                check_flags(flags, AFFECT_LIVE | AFFECT_CONFIG | MAXIMUM | VCPU_GUEST, "virDomainSetVcpusFlags")?;
                if flags & VCPU_GUEST != 0 {
                    return Err(error(err::NO_SUPPORT, "this function is not supported by the connection driver: vCPUs as the guest agent sees them (rvirt has no guest agent channel)"));
                }
                mgr.set_vcpus(&name, n, affect(flags)).map_err(refused)?;
                Ok(Vec::new())
            }
            p::DOMAIN_GET_VCPUS_FLAGS | p::DOMAIN_GET_MAX_VCPUS => {
                let flags = if proc_ == p::DOMAIN_GET_VCPUS_FLAGS { d.u32().map_err(bad_args)? } else { MAXIMUM };
                check_flags(flags, AFFECT_LIVE | AFFECT_CONFIG | MAXIMUM | VCPU_GUEST, "virDomainGetVcpusFlags")?;
                if flags & VCPU_GUEST != 0 {
                    return Err(error(err::NO_SUPPORT, "this function is not supported by the connection driver: vCPUs as the guest agent sees them"));
                }
                let c = mgr.vcpu_counts(&name).map_err(refused)?;
                let running = b.id.is_some();
                let n = match (flags & AFFECT_LIVE != 0, flags & AFFECT_CONFIG != 0) {
                    (true, true) => return Err(error(err::INVALID_ARG, "invalid argument: flags 'affect live' and 'affect config' are mutually exclusive")),
                    (true, false) => c.live.ok_or_else(|| error(err::OPERATION_INVALID, "Requested operation is not valid: domain is not running"))?,
                    (false, true) => c.config.ok_or_else(|| error(err::OPERATION_INVALID, "Requested operation is not valid: transient domains do not have any persistent config"))?,
                    (false, false) => if running { c.live } else { c.config }.or(c.live).unwrap_or(1),
                };
                ret_int(n as i32)
            }
            p::DOMAIN_GET_VCPUS => {
                let maxinfo = d.i32().map_err(bad_args)?;
                let maplen = d.i32().map_err(bad_args)?;
                if !(0..=VCPUINFO_MAX).contains(&maxinfo) || maplen < 0 || i64::from(maxinfo) * i64::from(maplen) > CPUMAPS_MAX {
                    return Err(error(err::RPC, "maxinfo or maplen is out of bounds"));
                }
                if b.id.is_none() {
                    return Err(error(err::OPERATION_INVALID, "Requested operation is not valid: cannot list vcpu pinning for an inactive domain"));
                }
                let threads = mgr.vcpu_threads(&name).map_err(refused)?;
                let shown: Vec<_> = threads.into_iter().take(maxinfo as usize).collect();
                encode(|e| {
                    e.u32(shown.len() as u32);
                    for t in &shown {
                        e.u32(t.vcpu).i32(VCPU_RUNNING).u64((t.cpu_seconds * 1e9) as u64).i32(t.cpu as i32);
                    }
                    let maps: Vec<u8> = shown.iter().flat_map(|t| cpumap(&t.affinity, maplen as usize)).collect();
                    e.opaque(&maps);
                })
            }
            p::DOMAIN_GET_VCPU_PIN_INFO => {
                let ncpumaps = d.i32().map_err(bad_args)?;
                let maplen = d.i32().map_err(bad_args)?;
                let flags = d.u32().map_err(bad_args)?;
                check_flags(flags, AFFECT_LIVE | AFFECT_CONFIG, "virDomainGetVcpuPinInfo")?;
                if !(0..=VCPUINFO_MAX).contains(&ncpumaps) || maplen <= 0 || i64::from(ncpumaps) * i64::from(maplen) > CPUMAPS_MAX {
                    return Err(error(err::RPC, "ncpumaps or maplen is out of bounds"));
                }
                let pins = mgr.vcpu_pins(&name, affect(flags)).map_err(refused)?;
                let n = pins.len().min(ncpumaps as usize);
                encode(|e| {
                    let maps: Vec<u8> = pins.iter().take(n).flat_map(|list| cpumap(list, maplen as usize)).collect();
                    e.opaque(&maps);
                    e.i32(n as i32);
                })
            }
            p::DOMAIN_RESET => {
                let flags = d.u32().map_err(bad_args)?;
                check_flags(flags, 0, "virDomainReset")?;
                mgr.reset(&name).map_err(refused)?;
                Ok(Vec::new())
            }
            p::DOMAIN_RENAME => {
                let new_name = d.opt_string().map_err(bad_args)?.map(str::to_string);
                let flags = d.u32().map_err(bad_args)?;
                check_flags(flags, 0, "virDomainRename")?;
                let new_name = new_name.ok_or_else(|| error(err::INVALID_ARG, "invalid argument: new_name in virDomainRename must not be NULL"))?;
                mgr.rename(&name, &new_name).map_err(refused)?;
                ret_int(0)
            }
            p::DOMAIN_GET_METADATA => {
                let kind = d.i32().map_err(bad_args)?;
                let uri = d.opt_string().map_err(bad_args)?.map(str::to_string);
                let flags = d.u32().map_err(bad_args)?;
                check_flags(flags, AFFECT_LIVE | AFFECT_CONFIG, "virDomainGetMetadata")?;
                let text = match kind {
                    META_DESCRIPTION | META_TITLE => mgr.desc(&name, kind == META_TITLE, None, affect(flags)).map_err(refused)?.1,
                    META_ELEMENT => {
                        let uri = uri.ok_or_else(|| error(err::INVALID_ARG, "invalid argument: a namespace URI is required for element metadata"))?;
                        mgr.metadata(&name, &uri, None, affect(flags)).map_err(refused)?.1
                    }
                    k => return Err(error(err::INVALID_ARG, format!("invalid argument: unknown metadata type {k}"))),
                };
                let text = text.ok_or_else(|| error(err::NO_DOMAIN_METADATA, "metadata not found: Requested metadata element is not present"))?;
                encode(|e| {
                    e.string(&text);
                })
            }
            p::DOMAIN_SET_METADATA => {
                let kind = d.i32().map_err(bad_args)?;
                let metadata = d.opt_string().map_err(bad_args)?.map(str::to_string);
                let key = d.opt_string().map_err(bad_args)?.map(str::to_string);
                let uri = d.opt_string().map_err(bad_args)?.map(str::to_string);
                let flags = d.u32().map_err(bad_args)?;
                check_flags(flags, AFFECT_LIVE | AFFECT_CONFIG, "virDomainSetMetadata")?;
                match kind {
                    META_DESCRIPTION | META_TITLE => {
                        mgr.desc(&name, kind == META_TITLE, Some(metadata.as_deref().unwrap_or("")), affect(flags)).map_err(refused)?;
                    }
                    META_ELEMENT => {
                        let uri = uri.ok_or_else(|| error(err::INVALID_ARG, "invalid argument: a namespace URI is required for element metadata"))?;
                        let change = match metadata.as_deref() {
                            Some(x) => (key.as_deref().ok_or_else(|| error(err::INVALID_ARG, "invalid argument: a key (namespace prefix) is required to set element metadata"))?, Some(x)),
                            None => ("x", None),
                        };
                        mgr.metadata(&name, &uri, Some(change), affect(flags)).map_err(refused)?;
                    }
                    k => return Err(error(err::INVALID_ARG, format!("invalid argument: unknown metadata type {k}"))),
                }
                Ok(Vec::new())
            }
            p::DOMAIN_ATTACH_DEVICE | p::DOMAIN_ATTACH_DEVICE_FLAGS | p::DOMAIN_DETACH_DEVICE | p::DOMAIN_DETACH_DEVICE_FLAGS | p::DOMAIN_UPDATE_DEVICE_FLAGS => {
                let xml = d.string().map_err(bad_args)?.to_string();
                let flags = match proc_ {
                    p::DOMAIN_ATTACH_DEVICE | p::DOMAIN_DETACH_DEVICE => AFFECT_LIVE,
                    _ => d.u32().map_err(bad_args)?,
                };
                // VIR_DOMAIN_DEVICE_MODIFY_FORCE (4) lets update eject a locked tray.
                check_flags(flags, AFFECT_LIVE | AFFECT_CONFIG | 4, "virDomainModifyDeviceFlags")?;
                match proc_ {
                    p::DOMAIN_ATTACH_DEVICE | p::DOMAIN_ATTACH_DEVICE_FLAGS => mgr.attach_device(&name, &xml, affect(flags)),
                    p::DOMAIN_DETACH_DEVICE | p::DOMAIN_DETACH_DEVICE_FLAGS => mgr.detach_device(&name, &xml, affect(flags)),
                    _ => mgr.update_device(&name, &xml, affect(flags), flags & 4 != 0),
                }
                .map_err(refused)?;
                Ok(Vec::new())
            }
            p::DOMAIN_MEMORY_STATS => {
                let max = d.u32().map_err(bad_args)?;
                let flags = d.u32().map_err(bad_args)?;
                check_flags(flags, 0, "virDomainMemoryStats")?;
                if max > MEMORY_STATS_MAX {
                    return Err(error(err::RPC, format!("maxStats {max} is more than {MEMORY_STATS_MAX}")));
                }
                if b.id.is_none() {
                    return Err(error(err::OPERATION_INVALID, "Requested operation is not valid: domain is not running"));
                }
                let stats = mgr.memory_stats(&name).map_err(refused)?;
                let tagged: Vec<(i32, u64)> = stats.iter().filter_map(|(k, v)| memory_tag(k).map(|t| (t, *v))).take(max as usize).collect();
                encode(|e| {
                    e.u32(tagged.len() as u32);
                    for (t, v) in &tagged {
                        e.i32(*t).u64(*v);
                    }
                })
            }
            p::DOMAIN_SET_MEMORY_STATS_PERIOD => {
                let period = d.i32().map_err(bad_args)?;
                let flags = d.u32().map_err(bad_args)?;
                check_flags(flags, AFFECT_LIVE | AFFECT_CONFIG, "virDomainSetMemoryStatsPeriod")?;
                if period < 0 {
                    return Err(error(err::INVALID_ARG, "invalid argument: the period must be 0 or more seconds"));
                }
                // rvirt asks the guest for fresh figures whenever they are read: no period to keep.
                Ok(Vec::new())
            }
            p::DOMAIN_GET_BLOCK_INFO => {
                let path = d.string().map_err(bad_args)?.to_string();
                let flags = d.u32().map_err(bad_args)?;
                check_flags(flags, 0, "virDomainGetBlockInfo")?;
                let i = mgr.block_info(&name, &path).map_err(|e| error(err::INVALID_ARG, format!("invalid argument: {e}")))?;
                encode(|e| {
                    e.u64(i.allocation).u64(i.capacity).u64(i.physical);
                })
            }
            other => Err(error(err::NO_SUPPORT, format!("this function is not supported by the connection driver: procedure {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_become_libvirt_s_bitmaps() {
        assert_eq!(cpumap("0-3,6", 2), vec![0b0100_1111, 0]);
        assert_eq!(cpumap("9", 2), vec![0, 0b10]);
        assert_eq!(cpumap("0-100", 1), vec![0xff], "CPUs past the map are left out");
        assert_eq!(cpumap("", 1), vec![0]);
        assert_eq!(memory_tag("rss"), Some(7));
        assert_eq!(memory_tag("bogus"), None);
    }
}
