//! The `remote` program's snapshot and save procedures (virsh
//! snapshot-create/-create-as/-list/-info/-current/-dumpxml/-edit/-parent/
//! -revert/-delete, save, restore, save-image-dumpxml, managedsave,
//! managedsave-remove, dominfo's "Managed save"): each decodes its
//! arguments, calls the [`crate::manager::Manager`] as rvirtd's own socket
//! does, and encodes libvirt's reply.

use rvirt_domain::protocol::{SnapshotCreateFlags, SnapshotFilter, SnapshotSummary};
use rvirt_libvirt_rpc::remote::{err, proc_ as p, RemoteDomain, FROM_QEMU};
use rvirt_libvirt_rpc::{Decoder, Encoder, RemoteError};

use super::dispatch::{bad_args, encode, ret_int, Reply};
use super::Session;
use crate::manager::DomainBrief;

/// libvirt's bound on snapshot lists (`REMOTE_DOMAIN_SNAPSHOT_LIST_MAX`).
const SNAPSHOT_LIST_MAX: i32 = 16384;

/// `virDomainSnapshotCreateFlags`.
mod create {
    pub const REDEFINE: u32 = 1;
    pub const CURRENT: u32 = 2;
    pub const NO_METADATA: u32 = 4;
    pub const HALT: u32 = 8;
    pub const DISK_ONLY: u32 = 16;
    pub const ATOMIC: u32 = 128;
    pub const VALIDATE: u32 = 512;
}

/// `virDomainSnapshotListFlags` (ROOTS and DESCENDANTS share the first bit).
mod listing {
    pub const ROOTS_OR_DESCENDANTS: u32 = 1;
    pub const METADATA: u32 = 2;
    pub const LEAVES: u32 = 4;
    pub const NO_LEAVES: u32 = 8;
    pub const NO_METADATA: u32 = 16;
    pub const INACTIVE: u32 = 32;
    pub const ACTIVE: u32 = 64;
    pub const DISK_ONLY: u32 = 128;
    pub const INTERNAL: u32 = 256;
    pub const EXTERNAL: u32 = 512;
    /// Parents before children: every listing here is.
    pub const TOPOLOGICAL: u32 = 1024;
    pub const ALL: u32 = ROOTS_OR_DESCENDANTS | METADATA | LEAVES | NO_LEAVES | NO_METADATA | INACTIVE | ACTIVE | DISK_ONLY | INTERNAL | EXTERNAL | TOPOLOGICAL;
}

/// `VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING`, `_PAUSED`, `_FORCE`.
const REVERT_RUNNING: u32 = 1;
const REVERT_PAUSED: u32 = 2;
const REVERT_FORCE: u32 = 4;
/// `VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN`, `_METADATA_ONLY`, `_CHILDREN_ONLY`.
const DELETE_CHILDREN: u32 = 1;
const DELETE_METADATA_ONLY: u32 = 2;
const DELETE_CHILDREN_ONLY: u32 = 4;
/// `VIR_DOMAIN_SAVE_BYPASS_CACHE`, `_RUNNING`, `_PAUSED`.
const SAVE_BYPASS_CACHE: u32 = 1;
const SAVE_RUNNING: u32 = 2;
const SAVE_PAUSED: u32 = 4;
/// `VIR_DOMAIN_SNAPSHOT_XML_SECURE`.
const XML_SECURE: u32 = 1;

/// The procedures of this module, and whether each changes anything.
const PROCEDURES: &[(i32, bool)] = &[
    (p::DOMAIN_SNAPSHOT_CREATE_XML, true),
    (p::DOMAIN_SNAPSHOT_GET_XML_DESC, false),
    (p::DOMAIN_SNAPSHOT_NUM, false),
    (p::DOMAIN_SNAPSHOT_LIST_NAMES, false),
    (p::DOMAIN_SNAPSHOT_LOOKUP_BY_NAME, false),
    (p::DOMAIN_HAS_CURRENT_SNAPSHOT, false),
    (p::DOMAIN_SNAPSHOT_CURRENT, false),
    (p::DOMAIN_REVERT_TO_SNAPSHOT, true),
    (p::DOMAIN_SNAPSHOT_DELETE, true),
    (p::DOMAIN_SNAPSHOT_GET_PARENT, false),
    (p::DOMAIN_SNAPSHOT_NUM_CHILDREN, false),
    (p::DOMAIN_SNAPSHOT_LIST_CHILDREN_NAMES, false),
    (p::DOMAIN_SNAPSHOT_IS_CURRENT, false),
    (p::DOMAIN_SNAPSHOT_HAS_METADATA, false),
    (p::DOMAIN_LIST_ALL_SNAPSHOTS, false),
    (p::DOMAIN_SNAPSHOT_LIST_ALL_CHILDREN, false),
    (p::DOMAIN_SAVE, true),
    (p::DOMAIN_SAVE_FLAGS, true),
    (p::DOMAIN_RESTORE, true),
    (p::DOMAIN_RESTORE_FLAGS, true),
    (p::DOMAIN_SAVE_IMAGE_GET_XML_DESC, true),
    (p::DOMAIN_MANAGED_SAVE, true),
    (p::DOMAIN_HAS_MANAGED_SAVE_IMAGE, false),
    (p::DOMAIN_MANAGED_SAVE_REMOVE, true),
];

/// Whether procedure `proc_` is one of these and changes anything.
pub(super) fn changes(proc_: i32) -> bool {
    PROCEDURES.iter().any(|(p, c)| *p == proc_ && *c)
}

fn error(code: i32, message: impl Into<String>) -> RemoteError {
    RemoteError { domain: FROM_QEMU, ..RemoteError::new(code, message) }
}

/// A manager refusal in libvirt's terms.
fn refused(message: String) -> RemoteError {
    if message.contains("has no snapshot named") || message.contains("no snapshot named") {
        error(err::NO_DOMAIN_SNAPSHOT, format!("Domain snapshot not found: {message}"))
    } else if message.contains("is not running") || message.contains("is running") || message.contains("is transient") || message.contains("already") {
        error(err::OPERATION_INVALID, format!("Requested operation is not valid: {message}"))
    } else if message.contains("not supported") || message.contains("cannot yet") {
        error(err::NO_SUPPORT, format!("this function is not supported by the connection driver: {message}"))
    } else {
        error(err::OPERATION_FAILED, format!("operation failed: {message}"))
    }
}

fn check_flags(flags: u32, known: u32, api: &str) -> Result<(), RemoteError> {
    if flags & !known != 0 {
        return Err(error(err::INVALID_ARG, format!("invalid argument: unsupported flags ({:#x}) in function {api}", flags & !known)));
    }
    Ok(())
}

/// The filter libvirt's listing flags ask for; `of` lists below a snapshot.
fn filter_of(flags: u32, of: Option<&str>) -> Result<SnapshotFilter, RemoteError> {
    use listing::*;
    check_flags(flags, ALL, "virDomainListAllSnapshots")?;
    let both = |a: u32, b: u32| flags & (a | b) == (a | b);
    Ok(SnapshotFilter {
        roots: of.is_none() && flags & ROOTS_OR_DESCENDANTS != 0,
        descendants: of.is_some() && flags & ROOTS_OR_DESCENDANTS != 0,
        of: of.map(str::to_string),
        leaves: flags & LEAVES != 0 && !both(LEAVES, NO_LEAVES),
        no_leaves: flags & NO_LEAVES != 0 && !both(LEAVES, NO_LEAVES),
        active: flags & ACTIVE != 0,
        inactive: flags & INACTIVE != 0,
        disk_only: flags & DISK_ONLY != 0,
        internal: flags & INTERNAL != 0,
        external: flags & EXTERNAL != 0,
    })
}

/// Every snapshot rvirtd knows has metadata: `NO_METADATA` alone selects none.
fn none_without_metadata(flags: u32) -> bool {
    flags & listing::NO_METADATA != 0 && flags & listing::METADATA == 0
}

fn put_snapshot(e: &mut Encoder, name: &str, dom: &DomainBrief) {
    e.string(name);
    RemoteDomain { name: dom.name.clone(), uuid: dom.uuid, id: dom.id.map_or(-1, |i| i as i32) }.encode(e);
}

fn ret_snapshot(name: &str, dom: &DomainBrief) -> Reply {
    encode(|e| put_snapshot(e, name, dom))
}

fn ret_names(names: &[String], max: i32) -> Reply {
    if !(0..=SNAPSHOT_LIST_MAX).contains(&max) {
        return Err(error(err::RPC, format!("too many snapshot names asked for: {max}")));
    }
    encode(|e| {
        let shown = &names[..names.len().min(max as usize)];
        e.u32(shown.len() as u32);
        for n in shown {
            e.string(n);
        }
    })
}

/// How a listing procedure answers.
enum Listing {
    /// `int num` (`_NUM`, `_NUM_CHILDREN`).
    Count,
    /// At most `max` names (`_LIST_NAMES`, `_LIST_CHILDREN_NAMES`).
    Names,
    /// The snapshots when `max` (need_results) is not 0, then their count
    /// (`LIST_ALL_SNAPSHOTS`, `_LIST_ALL_CHILDREN`).
    Snapshots,
}

fn listing(how: Listing, names: &[String], max: i32, dom: &DomainBrief) -> Reply {
    match how {
        Listing::Count => ret_int(names.len() as i32),
        Listing::Names => ret_names(names, max),
        Listing::Snapshots => encode(|e| {
            if max != 0 {
                e.u32(names.len() as u32);
                for n in names {
                    put_snapshot(e, n, dom);
                }
            } else {
                e.u32(0);
            }
            e.i32(names.len() as i32);
        }),
    }
}

impl Session {
    /// Answers one of these procedures; `None` when `proc_` is not one.
    pub(super) fn snapshot_call(&mut self, proc_: i32, d: &mut Decoder) -> Option<Reply> {
        let known = PROCEDURES.iter().any(|(p, _)| *p == proc_);
        known.then(|| self.snapshot_procedure(proc_, d))
    }

    /// A `remote_nonnull_domain_snapshot`: its name and its domain.
    fn snapshot_arg(&self, d: &mut Decoder) -> Result<(String, DomainBrief), RemoteError> {
        let name = d.string().map_err(bad_args)?.to_string();
        let dom = self.domain(d)?;
        Ok((name, dom))
    }

    /// The snapshots of `dom` a filter selects.
    fn snapshots(&self, dom: &DomainBrief, filter: &SnapshotFilter) -> Result<Vec<SnapshotSummary>, RemoteError> {
        self.mgr.snapshot_list(&dom.name, filter).map_err(refused)
    }

    /// One snapshot of `dom` (libvirt's "not found" when it has none of that name).
    fn snapshot(&self, dom: &DomainBrief, name: &str) -> Result<SnapshotSummary, RemoteError> {
        self.snapshots(dom, &SnapshotFilter::default())?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| error(err::NO_DOMAIN_SNAPSHOT, format!("Domain snapshot not found: no domain snapshot with matching name '{name}'")))
    }

    fn snapshot_procedure(&mut self, proc_: i32, d: &mut Decoder) -> Reply {
        let mgr = self.mgr.clone();
        match proc_ {
            p::DOMAIN_SNAPSHOT_CREATE_XML => {
                let dom = self.domain(d)?;
                let xml = d.string().map_err(bad_args)?.to_string();
                let flags = d.u32().map_err(bad_args)?;
                use create::*;
                if flags & 32 != 0 {
                    return Err(error(err::NO_SUPPORT, "this function is not supported by the connection driver: --reuse-external (rvirt makes its own overlays)"));
                }
                if flags & 64 != 0 {
                    return Err(error(err::NO_SUPPORT, "this function is not supported by the connection driver: --quiesce needs a guest agent, which rvirt has not"));
                }
                if flags & 256 != 0 {
                    return Err(error(err::NO_SUPPORT, "this function is not supported by the connection driver: --live (rvirt pauses the guest for a snapshot)"));
                }
                check_flags(flags, REDEFINE | CURRENT | NO_METADATA | HALT | DISK_ONLY | ATOMIC | VALIDATE, "virDomainSnapshotCreateXML")?;
                let f = SnapshotCreateFlags {
                    disk_only: flags & DISK_ONLY != 0,
                    redefine: flags & REDEFINE != 0,
                    current: flags & CURRENT != 0,
                    no_metadata: flags & NO_METADATA != 0,
                    halt: flags & HALT != 0,
                    atomic: flags & ATOMIC != 0,
                };
                let name = mgr.snapshot_create(&dom.name, &xml, f).map_err(|e| if e.contains("line ") || e.contains("XML") { error(err::XML_ERROR, format!("XML error: {e}")) } else { refused(e) })?;
                // The domain as it is now (a --halt stopped it).
                let dom = mgr.brief(&dom.name).unwrap_or(dom);
                ret_snapshot(&name, &dom)
            }
            p::DOMAIN_SNAPSHOT_GET_XML_DESC => {
                let (name, dom) = self.snapshot_arg(d)?;
                check_flags(d.u32().map_err(bad_args)?, XML_SECURE, "virDomainSnapshotGetXMLDesc")?;
                let xml = mgr.snapshot_xml(&dom.name, &name).map_err(refused)?;
                encode(|e| {
                    e.string(&xml);
                })
            }
            p::DOMAIN_SNAPSHOT_NUM | p::DOMAIN_SNAPSHOT_LIST_NAMES | p::DOMAIN_LIST_ALL_SNAPSHOTS => {
                let dom = self.domain(d)?;
                let max = if proc_ == p::DOMAIN_SNAPSHOT_NUM { 0 } else { d.i32().map_err(bad_args)? };
                let flags = d.u32().map_err(bad_args)?;
                let found = if none_without_metadata(flags) { Vec::new() } else { self.snapshots(&dom, &filter_of(flags, None)?)? };
                let names: Vec<String> = found.into_iter().map(|s| s.name).collect();
                let how = match proc_ {
                    p::DOMAIN_SNAPSHOT_NUM => Listing::Count,
                    p::DOMAIN_SNAPSHOT_LIST_NAMES => Listing::Names,
                    _ => Listing::Snapshots,
                };
                listing(how, &names, max, &dom)
            }
            p::DOMAIN_SNAPSHOT_NUM_CHILDREN | p::DOMAIN_SNAPSHOT_LIST_CHILDREN_NAMES | p::DOMAIN_SNAPSHOT_LIST_ALL_CHILDREN => {
                let (name, dom) = self.snapshot_arg(d)?;
                let max = if proc_ == p::DOMAIN_SNAPSHOT_NUM_CHILDREN { 0 } else { d.i32().map_err(bad_args)? };
                let flags = d.u32().map_err(bad_args)?;
                self.snapshot(&dom, &name)?;
                let found = if none_without_metadata(flags) { Vec::new() } else { self.snapshots(&dom, &filter_of(flags, Some(&name))?)? };
                let names: Vec<String> = found.into_iter().map(|s| s.name).collect();
                let how = match proc_ {
                    p::DOMAIN_SNAPSHOT_NUM_CHILDREN => Listing::Count,
                    p::DOMAIN_SNAPSHOT_LIST_CHILDREN_NAMES => Listing::Names,
                    _ => Listing::Snapshots,
                };
                listing(how, &names, max, &dom)
            }
            p::DOMAIN_SNAPSHOT_LOOKUP_BY_NAME => {
                let dom = self.domain(d)?;
                let name = d.string().map_err(bad_args)?.to_string();
                check_flags(d.u32().map_err(bad_args)?, 0, "virDomainSnapshotLookupByName")?;
                self.snapshot(&dom, &name)?;
                ret_snapshot(&name, &dom)
            }
            p::DOMAIN_HAS_CURRENT_SNAPSHOT | p::DOMAIN_SNAPSHOT_CURRENT => {
                let dom = self.domain(d)?;
                check_flags(d.u32().map_err(bad_args)?, 0, "virDomainSnapshotCurrent")?;
                let current = self.snapshots(&dom, &SnapshotFilter::default())?.into_iter().find(|s| s.current);
                match (proc_, current) {
                    (p::DOMAIN_HAS_CURRENT_SNAPSHOT, c) => ret_int(i32::from(c.is_some())),
                    (_, Some(c)) => ret_snapshot(&c.name, &dom),
                    (_, None) => Err(error(err::NO_DOMAIN_SNAPSHOT, format!("Domain snapshot not found: the domain '{}' does not have a current snapshot", dom.name))),
                }
            }
            p::DOMAIN_SNAPSHOT_GET_PARENT => {
                let (name, dom) = self.snapshot_arg(d)?;
                check_flags(d.u32().map_err(bad_args)?, 0, "virDomainSnapshotGetParent")?;
                match self.snapshot(&dom, &name)?.parent {
                    Some(parent) => ret_snapshot(&parent, &dom),
                    None => Err(error(err::NO_DOMAIN_SNAPSHOT, format!("Domain snapshot not found: snapshot '{name}' does not have a parent"))),
                }
            }
            p::DOMAIN_SNAPSHOT_IS_CURRENT | p::DOMAIN_SNAPSHOT_HAS_METADATA => {
                let (name, dom) = self.snapshot_arg(d)?;
                check_flags(d.u32().map_err(bad_args)?, 0, "virDomainSnapshotIsCurrent")?;
                let s = self.snapshot(&dom, &name)?;
                ret_int(i32::from(proc_ == p::DOMAIN_SNAPSHOT_HAS_METADATA || s.current))
            }
            p::DOMAIN_REVERT_TO_SNAPSHOT => {
                let (name, dom) = self.snapshot_arg(d)?;
                let flags = d.u32().map_err(bad_args)?;
                check_flags(flags, REVERT_RUNNING | REVERT_PAUSED | REVERT_FORCE, "virDomainRevertToSnapshot")?;
                if flags & REVERT_RUNNING != 0 && flags & REVERT_PAUSED != 0 {
                    return Err(error(err::INVALID_ARG, "invalid argument: flags 'running' and 'paused' are mutually exclusive"));
                }
                mgr.snapshot_revert(&dom.name, &name, flags & REVERT_RUNNING != 0, flags & REVERT_PAUSED != 0).map_err(refused)?;
                Ok(Vec::new())
            }
            p::DOMAIN_SNAPSHOT_DELETE => {
                let (name, dom) = self.snapshot_arg(d)?;
                let flags = d.u32().map_err(bad_args)?;
                check_flags(flags, DELETE_CHILDREN | DELETE_METADATA_ONLY | DELETE_CHILDREN_ONLY, "virDomainSnapshotDelete")?;
                mgr.snapshot_delete(&dom.name, &name, flags & DELETE_CHILDREN != 0, flags & DELETE_CHILDREN_ONLY != 0, flags & DELETE_METADATA_ONLY != 0).map_err(refused)?;
                Ok(Vec::new())
            }
            p::DOMAIN_SAVE | p::DOMAIN_SAVE_FLAGS => {
                let dom = self.domain(d)?;
                let to = d.string().map_err(bad_args)?.to_string();
                let flags = if proc_ == p::DOMAIN_SAVE_FLAGS {
                    if d.opt_string().map_err(bad_args)?.is_some() {
                        return Err(error(err::NO_SUPPORT, "this function is not supported by the connection driver: saving with another domain XML (--xml)"));
                    }
                    d.u32().map_err(bad_args)?
                } else {
                    0
                };
                check_flags(flags, SAVE_BYPASS_CACHE | SAVE_RUNNING | SAVE_PAUSED, "virDomainSaveFlags")?;
                mgr.save(&dom.name, std::path::Path::new(&to), flags & SAVE_RUNNING != 0, flags & SAVE_PAUSED != 0).map_err(refused)?;
                Ok(Vec::new())
            }
            p::DOMAIN_RESTORE | p::DOMAIN_RESTORE_FLAGS => {
                let from = d.string().map_err(bad_args)?.to_string();
                let flags = if proc_ == p::DOMAIN_RESTORE_FLAGS {
                    if d.opt_string().map_err(bad_args)?.is_some() {
                        return Err(error(err::NO_SUPPORT, "this function is not supported by the connection driver: restoring with another domain XML (--xml)"));
                    }
                    d.u32().map_err(bad_args)?
                } else {
                    0
                };
                check_flags(flags, SAVE_BYPASS_CACHE | SAVE_RUNNING | SAVE_PAUSED, "virDomainRestoreFlags")?;
                mgr.restore(std::path::Path::new(&from), flags & SAVE_RUNNING != 0, flags & SAVE_PAUSED != 0).map_err(refused)?;
                Ok(Vec::new())
            }
            p::DOMAIN_SAVE_IMAGE_GET_XML_DESC => {
                let file = d.string().map_err(bad_args)?.to_string();
                check_flags(d.u32().map_err(bad_args)?, XML_SECURE, "virDomainSaveImageGetXMLDesc")?;
                let xml = mgr.saved_xml(std::path::Path::new(&file)).map_err(refused)?;
                encode(|e| {
                    e.string(&xml);
                })
            }
            p::DOMAIN_MANAGED_SAVE => {
                let dom = self.domain(d)?;
                let flags = d.u32().map_err(bad_args)?;
                check_flags(flags, SAVE_BYPASS_CACHE | SAVE_RUNNING | SAVE_PAUSED, "virDomainManagedSave")?;
                mgr.managed_save(&dom.name, flags & SAVE_RUNNING != 0, flags & SAVE_PAUSED != 0).map_err(refused)?;
                Ok(Vec::new())
            }
            p::DOMAIN_HAS_MANAGED_SAVE_IMAGE => {
                let dom = self.domain(d)?;
                check_flags(d.u32().map_err(bad_args)?, 0, "virDomainHasManagedSaveImage")?;
                ret_int(i32::from(dom.managed_save))
            }
            p::DOMAIN_MANAGED_SAVE_REMOVE => {
                let dom = self.domain(d)?;
                check_flags(d.u32().map_err(bad_args)?, 0, "virDomainManagedSaveRemove")?;
                // libvirt succeeds when there is none.
                if dom.managed_save {
                    mgr.managed_save_remove(&dom.name).map_err(refused)?;
                }
                Ok(Vec::new())
            }
            _ => Err(error(err::NO_SUPPORT, format!("procedure {proc_} is not supported"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_flags_become_the_filter_virsh_means() {
        // snapshot-list --roots; --from s1 --descendants; --leaves --no-leaves (both: all).
        assert!(filter_of(listing::ROOTS_OR_DESCENDANTS | listing::TOPOLOGICAL, None).unwrap().roots);
        let f = filter_of(listing::ROOTS_OR_DESCENDANTS, Some("s1")).unwrap();
        assert!(f.descendants && !f.roots && f.of.as_deref() == Some("s1"));
        let f = filter_of(listing::LEAVES | listing::NO_LEAVES, None).unwrap();
        assert!(!f.leaves && !f.no_leaves);
        assert!(filter_of(1 << 20, None).unwrap_err().message.unwrap_or_default().contains("unsupported flags"));
        assert!(none_without_metadata(listing::NO_METADATA) && !none_without_metadata(listing::NO_METADATA | listing::METADATA));
    }
}
