//! The `remote` program's storage procedures (`virsh pool-*` and `vol-*`,
//! and virt-install's disk creation): each a thin call into the daemon's
//! [`crate::storage::Pools`].

use rvirt_libvirt_rpc::remote::{err, list_pools as list, proc_ as p, RemoteStoragePool, RemoteStorageVol, FROM_STORAGE, STORAGE_POOL_LIST_MAX, STORAGE_VOL_LIST_MAX, UUID_LEN};
use rvirt_libvirt_rpc::{Decoder, RemoteError};

use super::dispatch::{bad_args, encode, flag_group, list_all, ret_int, Reply};
use super::Session;
use crate::storage::{PoolBrief, Pools, StorageError, VolumeBrief};

/// Whether storage procedure `proc_` changes anything (refused on read-only connections).
pub(super) fn changes(proc_: i32) -> bool {
    matches!(
        proc_,
        p::STORAGE_POOL_CREATE_XML
            | p::STORAGE_POOL_DEFINE_XML
            | p::STORAGE_POOL_CREATE
            | p::STORAGE_POOL_BUILD
            | p::STORAGE_POOL_DESTROY
            | p::STORAGE_POOL_DELETE
            | p::STORAGE_POOL_UNDEFINE
            | p::STORAGE_POOL_REFRESH
            | p::STORAGE_POOL_SET_AUTOSTART
            | p::STORAGE_VOL_CREATE_XML
            | p::STORAGE_VOL_CREATE_XML_FROM
            | p::STORAGE_VOL_DELETE
            | p::STORAGE_VOL_WIPE
            | p::STORAGE_VOL_RESIZE
            // A download reads a whole disk: as libvirt, not for read-only connections either.
            | p::STORAGE_VOL_UPLOAD
            | p::STORAGE_VOL_DOWNLOAD
    )
}

fn error(code: i32, message: impl Into<String>) -> RemoteError {
    RemoteError { domain: FROM_STORAGE, ..RemoteError::new(code, message) }
}

/// libvirt's error for what the pools said.
fn remote_error(e: StorageError) -> RemoteError {
    match e {
        StorageError::NoPool(_) => error(err::NO_STORAGE_POOL, format!("Storage pool not found: {e}")),
        StorageError::NoVolume(_) => error(err::NO_STORAGE_VOL, format!("Storage volume not found: {e}")),
        StorageError::Invalid(m) => error(err::OPERATION_INVALID, format!("Requested operation is not valid: {m}")),
        StorageError::Xml(x) => error(err::XML_ERROR, format!("XML error: {x}")),
        StorageError::Denied(m) => error(err::OPERATION_DENIED, format!("operation forbidden: {m}")),
        other => error(err::OPERATION_FAILED, format!("operation failed: {other}")),
    }
}

fn remote_pool(b: &PoolBrief) -> RemoteStoragePool {
    RemoteStoragePool { name: b.name.clone(), uuid: b.uuid }
}

fn remote_vol(v: &VolumeBrief) -> RemoteStorageVol {
    RemoteStorageVol { pool: v.pool.clone(), name: v.name.clone(), key: v.key.clone() }
}

fn ret_pool(b: &PoolBrief) -> Reply {
    encode(|e| remote_pool(b).encode(e))
}

fn ret_vol(v: &VolumeBrief) -> Reply {
    encode(|e| remote_vol(v).encode(e))
}

fn ret_string(s: &str) -> Reply {
    encode(|e| {
        e.string(s);
    })
}

/// A list of names, at most `max` (as the caller asked) of them.
fn ret_names(names: &[String], max: i32, limit: usize) -> Reply {
    let max = usize::try_from(max).ok().filter(|m| *m <= limit).ok_or_else(|| error(err::RPC, format!("too many names asked for: {max}")))?;
    encode(|e| {
        let names = &names[..names.len().min(max)];
        e.u32(names.len() as u32);
        for n in names {
            e.string(n);
        }
    })
}

/// Whether `b` passes `virConnectListAllStoragePools` filter `flags`.
fn list_matches(b: &PoolBrief, flags: u32) -> bool {
    let group = |mask: u32, pass: &[(u32, bool)]| flag_group(flags, mask, pass);
    group(list::ACTIVE | list::INACTIVE, &[(list::ACTIVE, b.active), (list::INACTIVE, !b.active)])
        && group(list::PERSISTENT | list::TRANSIENT, &[(list::PERSISTENT, b.persistent), (list::TRANSIENT, !b.persistent)])
        && group(list::AUTOSTART | list::NO_AUTOSTART, &[(list::AUTOSTART, b.autostart), (list::NO_AUTOSTART, !b.autostart)])
        && group(list::TYPES, &[(list::DIR, true)])
}

impl Session {
    /// The pool a call names, as it is now.
    fn pool(&self, d: &mut Decoder) -> Result<PoolBrief, RemoteError> {
        let r = RemoteStoragePool::decode(d).map_err(bad_args)?;
        let uuid = uuid::Uuid::from_bytes(r.uuid).hyphenated().to_string();
        self.mgr.pools().brief(&uuid).map_err(|_| error(err::NO_STORAGE_POOL, format!("Storage pool not found: no storage pool with matching uuid '{uuid}' ({})", r.name)))
    }

    /// The volume a call names (by its pool and name), as it is now.
    fn vol(&self, d: &mut Decoder) -> Result<VolumeBrief, RemoteError> {
        let v = RemoteStorageVol::decode(d).map_err(bad_args)?;
        self.mgr.pools().volume(&v.pool, &v.name).map_err(remote_error)
    }

    /// `vol-upload` and `vol-download`: the stream of call `h` joined to the volume's file.
    pub(super) fn volume_stream(&mut self, h: &rvirt_libvirt_rpc::Header, proc_: i32, d: &mut Decoder) -> Reply {
        let v = self.vol(d)?;
        let offset = d.u64().map_err(bad_args)?;
        let length = d.u64().map_err(bad_args)?;
        let flags = d.u32().map_err(bad_args)?;
        if flags != 0 {
            return Err(error(err::NO_SUPPORT, "this function is not supported by the connection driver: sparse volume streams"));
        }
        let path = std::path::PathBuf::from(v.key);
        if proc_ == p::STORAGE_VOL_UPLOAD {
            self.volume_streams.open_upload(h, &path, offset, length)?;
            tracing::info!("volume '{}' of pool '{}': upload from {offset}", v.name, v.pool);
        } else {
            self.volume_streams.open_download(h, &path, offset, length)?;
        }
        Ok(Vec::new())
    }

    /// Answers a storage procedure; `None` when `proc_` is not one.
    pub(super) fn storage_call(&mut self, proc_: i32, d: &mut Decoder) -> Option<Reply> {
        let mgr = self.mgr.clone();
        let pools: &Pools = mgr.pools();
        let count = |active: bool| ret_int(pools.briefs().iter().filter(|b| b.active == active).count() as i32);
        Some(match proc_ {
            p::CONNECT_NUM_OF_STORAGE_POOLS => count(true),
            p::CONNECT_NUM_OF_DEFINED_STORAGE_POOLS => count(false),
            p::CONNECT_LIST_STORAGE_POOLS | p::CONNECT_LIST_DEFINED_STORAGE_POOLS => (|| {
                let max = d.i32().map_err(bad_args)?;
                let active = proc_ == p::CONNECT_LIST_STORAGE_POOLS;
                let names: Vec<String> = pools.briefs().into_iter().filter(|b| b.active == active).map(|b| b.name).collect();
                ret_names(&names, max, STORAGE_POOL_LIST_MAX)
            })(),
            p::CONNECT_LIST_ALL_STORAGE_POOLS => (|| {
                let need = d.i32().map_err(bad_args)?;
                let flags = d.u32().map_err(bad_args)?;
                let found: Vec<PoolBrief> = pools.briefs().into_iter().filter(|b| list_matches(b, flags)).collect();
                encode(|e| list_all(e, need, &found, |b, e| remote_pool(b).encode(e)))
            })(),
            p::STORAGE_POOL_LOOKUP_BY_NAME => (|| {
                let name = d.string().map_err(bad_args)?;
                let b = pools.brief(name).ok().filter(|b| b.name == name);
                ret_pool(&b.ok_or_else(|| error(err::NO_STORAGE_POOL, format!("Storage pool not found: no storage pool with matching name '{name}'")))?)
            })(),
            p::STORAGE_POOL_LOOKUP_BY_UUID => (|| {
                let mut u = [0u8; UUID_LEN];
                u.copy_from_slice(d.fixed_opaque(UUID_LEN).map_err(bad_args)?);
                let s = uuid::Uuid::from_bytes(u).hyphenated().to_string();
                ret_pool(&pools.brief(&s).map_err(|_| error(err::NO_STORAGE_POOL, format!("Storage pool not found: no storage pool with matching uuid '{s}'")))?)
            })(),
            p::STORAGE_POOL_LOOKUP_BY_VOLUME => (|| {
                let v = self.vol(d)?;
                ret_pool(&pools.brief(&v.pool).map_err(remote_error)?)
            })(),
            p::STORAGE_POOL_DEFINE_XML | p::STORAGE_POOL_CREATE_XML => (|| {
                let xml = d.string().map_err(bad_args)?;
                let flags = d.u32().map_err(bad_args)?;
                let b = if proc_ == p::STORAGE_POOL_DEFINE_XML { pools.define(xml) } else { pools.create_transient(xml, flags) };
                ret_pool(&b.map_err(remote_error)?)
            })(),
            p::STORAGE_POOL_CREATE | p::STORAGE_POOL_BUILD | p::STORAGE_POOL_DELETE | p::STORAGE_POOL_REFRESH => (|| {
                let b = self.pool(d)?;
                let flags = d.u32().map_err(bad_args)?;
                match proc_ {
                    p::STORAGE_POOL_CREATE => pools.start(&b.name, flags),
                    p::STORAGE_POOL_BUILD => pools.build(&b.name, flags),
                    p::STORAGE_POOL_DELETE => pools.delete(&b.name),
                    _ => pools.refresh(&b.name),
                }
                .map_err(remote_error)?;
                Ok(Vec::new())
            })(),
            p::STORAGE_POOL_DESTROY | p::STORAGE_POOL_UNDEFINE => (|| {
                let b = self.pool(d)?;
                if proc_ == p::STORAGE_POOL_DESTROY { pools.destroy(&b.name) } else { pools.undefine(&b.name) }.map_err(remote_error)?;
                Ok(Vec::new())
            })(),
            p::STORAGE_POOL_GET_INFO => (|| {
                let b = self.pool(d)?;
                let (active, s) = pools.info(&b.name).map_err(remote_error)?;
                // virStoragePoolState: inactive 0, running 2.
                encode(|e| {
                    e.u32(if active { 2 } else { 0 }).u64(s.capacity).u64(s.allocation).u64(s.available);
                })
            })(),
            p::STORAGE_POOL_GET_XML_DESC => (|| {
                let b = self.pool(d)?;
                let _flags = d.u32().map_err(bad_args)?;
                ret_string(&pools.dump_xml(&b.name).map_err(remote_error)?)
            })(),
            p::STORAGE_POOL_GET_AUTOSTART => (|| ret_int(i32::from(self.pool(d)?.autostart)))(),
            p::STORAGE_POOL_SET_AUTOSTART => (|| {
                let b = self.pool(d)?;
                let on = d.i32().map_err(bad_args)? != 0;
                pools.set_autostart(&b.name, on).map_err(remote_error)?;
                Ok(Vec::new())
            })(),
            p::STORAGE_POOL_IS_ACTIVE => (|| ret_int(i32::from(self.pool(d)?.active)))(),
            p::STORAGE_POOL_IS_PERSISTENT => (|| ret_int(i32::from(self.pool(d)?.persistent)))(),
            p::STORAGE_POOL_NUM_OF_VOLUMES => (|| {
                let b = self.pool(d)?;
                ret_int(pools.volume_names(&b.name).map_err(remote_error)?.len() as i32)
            })(),
            p::STORAGE_POOL_LIST_VOLUMES => (|| {
                let b = self.pool(d)?;
                let max = d.i32().map_err(bad_args)?;
                ret_names(&pools.volume_names(&b.name).map_err(remote_error)?, max, STORAGE_VOL_LIST_MAX)
            })(),
            p::STORAGE_POOL_LIST_ALL_VOLUMES => (|| {
                let b = self.pool(d)?;
                let need = d.i32().map_err(bad_args)?;
                let _flags = d.u32().map_err(bad_args)?;
                let names = pools.volume_names(&b.name).map_err(remote_error)?;
                let vols: Vec<VolumeBrief> = names.iter().filter_map(|n| pools.volume(&b.name, n).ok()).take(STORAGE_VOL_LIST_MAX).collect();
                encode(|e| list_all(e, need, &vols, |v, e| remote_vol(v).encode(e)))
            })(),
            p::STORAGE_VOL_CREATE_XML | p::STORAGE_VOL_CREATE_XML_FROM => (|| {
                let b = self.pool(d)?;
                let xml = d.string().map_err(bad_args)?.to_string();
                let from = if proc_ == p::STORAGE_VOL_CREATE_XML_FROM { Some(self.vol(d)?) } else { None };
                let flags = d.u32().map_err(bad_args)?;
                let v = pools.create_volume(&b.name, &xml, flags, from.as_ref().map(|f| (f.pool.as_str(), f.name.as_str()))).map_err(remote_error)?;
                tracing::info!("volume '{}' created in pool '{}'", v.name, v.pool);
                ret_vol(&v)
            })(),
            p::STORAGE_VOL_DELETE | p::STORAGE_VOL_WIPE => (|| {
                let v = self.vol(d)?;
                let flags = d.u32().map_err(bad_args)?;
                if proc_ == p::STORAGE_VOL_DELETE {
                    pools.delete_volume(&v.pool, &v.name, flags)
                } else if flags != 0 {
                    Err(StorageError::Invalid("wipe flags are not supported".into()))
                } else {
                    pools.wipe_volume(&v.pool, &v.name)
                }
                .map_err(remote_error)?;
                Ok(Vec::new())
            })(),
            p::STORAGE_VOL_RESIZE => (|| {
                let v = self.vol(d)?;
                let capacity = d.u64().map_err(bad_args)?;
                let flags = d.u32().map_err(bad_args)?;
                pools.resize_volume(&v.pool, &v.name, capacity, flags).map_err(remote_error)?;
                Ok(Vec::new())
            })(),
            p::STORAGE_VOL_LOOKUP_BY_NAME => (|| {
                let b = self.pool(d)?;
                let name = d.string().map_err(bad_args)?;
                ret_vol(&pools.volume(&b.name, name).map_err(remote_error)?)
            })(),
            p::STORAGE_VOL_LOOKUP_BY_KEY | p::STORAGE_VOL_LOOKUP_BY_PATH => (|| {
                let path = d.string().map_err(bad_args)?;
                let v = pools.volume_by_path(path).map_err(|e| match e {
                    StorageError::NoVolume(_) if proc_ == p::STORAGE_VOL_LOOKUP_BY_KEY => error(err::NO_STORAGE_VOL, format!("Storage volume not found: no storage vol with matching key {path}")),
                    other => remote_error(other),
                })?;
                ret_vol(&v)
            })(),
            p::STORAGE_VOL_GET_INFO => (|| {
                let v = self.vol(d)?;
                let def = pools.volume_def(&v.pool, &v.name).map_err(remote_error)?;
                // virStorageVolType: file 0.
                encode(|e| {
                    e.i32(0).u64(def.capacity.unwrap_or(0)).u64(def.allocation.unwrap_or(0));
                })
            })(),
            p::STORAGE_VOL_GET_XML_DESC => (|| {
                let v = self.vol(d)?;
                let _flags = d.u32().map_err(bad_args)?;
                ret_string(&pools.volume_def(&v.pool, &v.name).map_err(remote_error)?.to_xml())
            })(),
            p::STORAGE_VOL_GET_PATH => (|| ret_string(&self.vol(d)?.key))(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_list_filters_combine_as_libvirt_s_do() {
        let b = |active, persistent, autostart| PoolBrief { name: "p".into(), uuid: [0; 16], active, persistent, autostart, target: "/p".into() };
        assert!(list_matches(&b(true, true, true), 0));
        assert!(list_matches(&b(true, true, false), list::ACTIVE) && !list_matches(&b(false, true, false), list::ACTIVE));
        assert!(list_matches(&b(false, false, false), list::TRANSIENT | list::INACTIVE));
        assert!(list_matches(&b(true, true, true), list::DIR) && !list_matches(&b(true, true, true), 128), "only directory pools");
        assert!(list_matches(&b(true, true, true), list::AUTOSTART) && !list_matches(&b(true, true, true), list::NO_AUTOSTART));
    }

    #[test]
    fn errors_keep_libvirt_s_codes() {
        assert_eq!(remote_error(StorageError::NoPool("x".into())).code, err::NO_STORAGE_POOL);
        assert_eq!(remote_error(StorageError::NoVolume("name 'v'".into())).code, err::NO_STORAGE_VOL);
        assert_eq!(remote_error(StorageError::Invalid("no".into())).code, err::OPERATION_INVALID);
        assert_eq!(remote_error(StorageError::Denied("no".into())).code, err::OPERATION_DENIED);
    }
}
