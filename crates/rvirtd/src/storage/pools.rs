//! Storage pools (libvirt's `pool-*`): named directories of disk images
//! inside the path policy's writable directories. A pool's definition is
//! stored like a network's; its volumes are the regular files in its
//! directory, read afresh on every call (a file copied in by hand is a
//! volume at once, as after libvirt's `pool-refresh`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rvirt_domain::{PoolDef, PoolSizes, XmlError};

use crate::policy::Policy;
use crate::store::{PoolMark, Store};

/// Why a pool or volume call failed; front ends map each kind to their own errors.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// No pool has that name or UUID.
    #[error("no storage pool with matching name or uuid '{0}'")]
    NoPool(String),
    /// The pool has no volume of that name, key or path.
    #[error("no storage vol with matching {0}")]
    NoVolume(String),
    /// The call does not fit the pool's or volume's state (not active, already exists...).
    #[error("{0}")]
    Invalid(String),
    /// The XML does not describe a pool or volume rvirt can have.
    #[error("{0}")]
    Xml(#[from] XmlError),
    /// The path policy does not allow the directory or file.
    #[error("{0}")]
    Denied(String),
    /// The host refused a file operation.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// The host's error.
        source: std::io::Error,
    },
    /// Reading or changing an image failed.
    #[error(transparent)]
    Block(#[from] rvirt_block::Error),
    /// Creating or copying an image (rvirt-img's code), or storing a definition, failed.
    #[error("{0:#}")]
    Image(anyhow::Error),
}

/// Shorthand for results of pool and volume calls.
pub type Result<T> = std::result::Result<T, StorageError>;

/// An I/O error with what was being done.
pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StorageError {
    let what = what.into();
    move |source| StorageError::Io { what, source }
}

/// What front ends list and look up about a pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolBrief {
    /// Its name.
    pub name: String,
    /// Its UUID.
    pub uuid: [u8; 16],
    /// Whether it is started (its volumes can be used).
    pub active: bool,
    /// Whether its definition is stored.
    pub persistent: bool,
    /// Whether it starts with the daemon.
    pub autostart: bool,
    /// Its directory.
    pub target: PathBuf,
}

pub(super) struct Pool {
    pub(super) def: PoolDef,
    persistent: bool,
    pub(super) active: bool,
}

/// The daemon's storage pools.
pub struct Pools {
    store: Store,
    pub(super) policy: Policy,
    pub(super) pools: Mutex<BTreeMap<String, Pool>>,
}

/// `VIR_STORAGE_POOL_BUILD_NO_OVERWRITE` and `_OVERWRITE`: the only build flags a directory has.
const BUILD_FLAGS: u32 = 4 | 8;
/// `VIR_STORAGE_POOL_CREATE_WITH_BUILD` (and its overwrite variants): build, then start.
const CREATE_WITH_BUILD: u32 = 1 | 2 | 4;

/// The mode libvirt gives a pool directory it builds.
const DEFAULT_POOL_MODE: u32 = 0o711;

/// The sizes of the filesystem `dir` is on.
fn fs_sizes(dir: &Path) -> Result<PoolSizes> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| StorageError::Invalid(format!("{}: a NUL in the path", dir.display())))?;
    // SAFETY: statvfs writes into the zeroed struct it is given; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io(format!("statvfs {}", dir.display()))(std::io::Error::last_os_error()));
    }
    let unit = st.f_frsize;
    Ok(PoolSizes { capacity: st.f_blocks.saturating_mul(unit), allocation: st.f_blocks.saturating_sub(st.f_bfree).saturating_mul(unit), available: st.f_bavail.saturating_mul(unit) })
}

impl Pool {
    fn brief(&self, store: &Store) -> PoolBrief {
        PoolBrief {
            name: self.def.name.clone(),
            uuid: *self.def.uuid.as_bytes(),
            active: self.active,
            persistent: self.persistent,
            autostart: self.persistent && store.pool_mark(&self.def.name, PoolMark::Autostart),
            target: self.def.target.clone(),
        }
    }
}

impl Pools {
    /// Loads the stored definitions; a pool marked active whose directory is still there is active.
    pub fn open(store: Store, policy: Policy) -> Self {
        let mut pools = BTreeMap::new();
        for (name, text) in store.pool_definitions() {
            match text.map_err(|e| e.to_string()).and_then(|t| PoolDef::parse(&t).map_err(|e| e.to_string())) {
                Ok(def) if def.name == name => {
                    // The path policy may have changed since: a pool outside it stays inactive.
                    let allowed = || match policy.check(&format!("storage pool '{name}' directory"), &def.target, true) {
                        Ok(_) => true,
                        Err(e) => {
                            tracing::warn!("not started again: {e}");
                            false
                        }
                    };
                    let active = store.pool_mark(&name, PoolMark::Active) && def.target.is_dir() && allowed();
                    pools.insert(name, Pool { def, persistent: true, active });
                }
                Ok(def) => tracing::error!("pool definition '{name}' holds pool '{}'; ignored", def.name),
                Err(e) => tracing::error!("pool definition '{name}' is unreadable, left alone: {e}"),
            }
        }
        Self { store, policy, pools: Mutex::new(pools) }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The name of the pool called or identified `key`.
    pub(super) fn find(pools: &BTreeMap<String, Pool>, key: &str) -> Result<String> {
        if pools.contains_key(key) {
            return Ok(key.to_string());
        }
        pools.iter().find(|(_, p)| p.def.uuid.to_string().eq_ignore_ascii_case(key)).map(|(n, _)| n.clone()).ok_or_else(|| StorageError::NoPool(key.to_string()))
    }

    /// The pool's directory, when it is active.
    pub(super) fn active_dir(pools: &BTreeMap<String, Pool>, key: &str) -> Result<PathBuf> {
        let name = Self::find(pools, key)?;
        let p = &pools[&name];
        if !p.active {
            return Err(StorageError::Invalid(format!("storage pool '{name}' is not active")));
        }
        Ok(p.def.target.clone())
    }

    /// Parses `xml` and checks it against the other pools: the same name
    /// keeps its UUID, a UUID or directory belongs to one pool.
    fn admit(&self, pools: &BTreeMap<String, Pool>, xml: &str) -> Result<PoolDef> {
        let mut def = PoolDef::parse(xml)?;
        if let Some(old) = pools.get(&def.name) {
            if old.def.uuid != def.uuid && xml.contains("<uuid>") {
                return Err(StorageError::Invalid(format!("pool '{}' already exists with uuid {}", def.name, old.def.uuid)));
            }
            def.uuid = old.def.uuid;
            if old.active && old.def.target != def.target {
                return Err(StorageError::Invalid(format!("pool '{}' is active: its target path cannot change", def.name)));
            }
        }
        for (other, p) in pools.iter().filter(|(n, _)| **n != def.name) {
            if p.def.uuid == def.uuid {
                return Err(StorageError::Invalid(format!("pool '{other}' already exists with uuid {}", def.uuid)));
            }
            if p.def.target == def.target {
                return Err(StorageError::Invalid(format!("Storage source conflict with pool: '{other}' (both use {})", def.target.display())));
            }
        }
        Ok(def)
    }

    /// Stores a new definition or updates one (same name and UUID).
    pub fn define(&self, xml: &str) -> Result<PoolBrief> {
        let mut pools = self.lock();
        let def = self.admit(&pools, xml)?;
        self.store.save_pool(&def.name, &def.to_xml(PoolSizes::default())).map_err(StorageError::Image)?;
        let name = def.name.clone();
        let active = pools.get(&name).is_some_and(|p| p.active);
        pools.insert(name.clone(), Pool { def, persistent: true, active });
        Ok(pools[&name].brief(&self.store))
    }

    /// Starts a pool that is not stored (`pool-create`): gone when destroyed.
    pub fn create_transient(&self, xml: &str, flags: u32) -> Result<PoolBrief> {
        let mut pools = self.lock();
        let def = self.admit(&pools, xml)?;
        if pools.contains_key(&def.name) {
            return Err(StorageError::Invalid(format!("storage pool '{}' already exists", def.name)));
        }
        if flags & CREATE_WITH_BUILD != 0 {
            self.build_dir(&def)?;
        }
        self.check_dir(&def)?;
        let name = def.name.clone();
        pools.insert(name.clone(), Pool { def, persistent: false, active: true });
        Ok(pools[&name].brief(&self.store))
    }

    /// The directory must exist and lie where domains may write.
    fn check_dir(&self, def: &PoolDef) -> Result<()> {
        let meta = std::fs::metadata(&def.target).map_err(io(format!("cannot open directory '{}'", def.target.display())))?;
        if !meta.is_dir() {
            return Err(StorageError::Invalid(format!("target path '{}' is not a directory", def.target.display())));
        }
        self.policy.check(&format!("storage pool '{}' directory", def.name), &def.target, true).map_err(StorageError::Denied)?;
        Ok(())
    }

    /// Makes the pool's directory (and missing parents) with its permissions,
    /// only below a directory domains may write.
    fn build_dir(&self, def: &PoolDef) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let existing = def.target.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
        self.policy.check(&format!("storage pool '{}' directory", def.name), existing, true).map_err(StorageError::Denied)?;
        let mode = def.permissions.mode.unwrap_or(DEFAULT_POOL_MODE);
        if !def.target.exists() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&def.target).map_err(io(format!("cannot create directory '{}'", def.target.display())))?;
        }
        // Judged again where it really is, now that it exists.
        self.check_dir(def)?;
        std::fs::set_permissions(&def.target, std::fs::Permissions::from_mode(mode)).map_err(io(format!("cannot set mode of '{}'", def.target.display())))?;
        if def.permissions.owner.is_some() || def.permissions.group.is_some() {
            std::os::unix::fs::chown(&def.target, def.permissions.owner, def.permissions.group).map_err(io(format!("cannot set owner of '{}'", def.target.display())))?;
        }
        Ok(())
    }

    /// `pool-build`: makes the directory of an inactive pool.
    pub fn build(&self, key: &str, flags: u32) -> Result<String> {
        let pools = self.lock();
        let name = Self::find(&pools, key)?;
        let p = &pools[&name];
        if p.active {
            return Err(StorageError::Invalid(format!("storage pool '{name}' is already active")));
        }
        if flags & !BUILD_FLAGS != 0 || flags == BUILD_FLAGS {
            return Err(StorageError::Invalid(format!("build flags {flags:#x} are not supported for a directory pool")));
        }
        self.build_dir(&p.def)?;
        Ok(name)
    }

    /// `pool-start`: its directory must exist (or be built first, with the build flag).
    pub fn start(&self, key: &str, flags: u32) -> Result<String> {
        let mut pools = self.lock();
        let name = Self::find(&pools, key)?;
        let p = &pools[&name];
        if p.active {
            return Err(StorageError::Invalid(format!("storage pool '{name}' is already active")));
        }
        if flags & CREATE_WITH_BUILD != 0 {
            self.build_dir(&p.def)?;
        }
        self.check_dir(&p.def)?;
        self.store.set_pool_mark(&name, PoolMark::Active, true).map_err(StorageError::Image)?;
        if let Some(p) = pools.get_mut(&name) {
            p.active = true;
        }
        Ok(name)
    }

    /// `pool-destroy`: stops using the pool (its files stay); a transient pool is gone.
    pub fn destroy(&self, key: &str) -> Result<String> {
        let mut pools = self.lock();
        let name = Self::find(&pools, key)?;
        if !pools[&name].active {
            return Err(StorageError::Invalid(format!("storage pool '{name}' is not active")));
        }
        let _ = self.store.set_pool_mark(&name, PoolMark::Active, false);
        if pools[&name].persistent {
            if let Some(p) = pools.get_mut(&name) {
                p.active = false;
            }
        } else {
            pools.remove(&name);
        }
        Ok(name)
    }

    /// `pool-undefine`: forgets the definition; an active pool stays, transient.
    pub fn undefine(&self, key: &str) -> Result<String> {
        let mut pools = self.lock();
        let name = Self::find(&pools, key)?;
        if !pools[&name].persistent {
            return Err(StorageError::Invalid(format!("storage pool '{name}' is transient: it has no definition to remove")));
        }
        self.store.remove_pool(&name).map_err(StorageError::Image)?;
        // A transient pool is not brought back by a restarted daemon.
        let _ = self.store.set_pool_mark(&name, PoolMark::Active, false);
        if pools[&name].active {
            if let Some(p) = pools.get_mut(&name) {
                p.persistent = false;
            }
        } else {
            pools.remove(&name);
        }
        Ok(name)
    }

    /// `pool-delete`: removes the directory of an inactive pool, which must be empty.
    pub fn delete(&self, key: &str) -> Result<String> {
        let pools = self.lock();
        let name = Self::find(&pools, key)?;
        let p = &pools[&name];
        if p.active {
            return Err(StorageError::Invalid(format!("storage pool '{name}' is still active")));
        }
        self.policy.check(&format!("storage pool '{name}' directory"), &p.def.target, true).map_err(StorageError::Denied)?;
        std::fs::remove_dir(&p.def.target).map_err(io(format!("cannot remove directory '{}'", p.def.target.display())))?;
        Ok(name)
    }

    /// `pool-refresh`: volumes are read on every call, so this only checks the pool is usable.
    pub fn refresh(&self, key: &str) -> Result<String> {
        let pools = self.lock();
        let name = Self::find(&pools, key)?;
        Self::active_dir(&pools, &name)?;
        self.check_dir(&pools[&name].def)?;
        Ok(name)
    }

    /// Marks a defined pool to start with the daemon, or not.
    pub fn set_autostart(&self, key: &str, on: bool) -> Result<String> {
        let pools = self.lock();
        let name = Self::find(&pools, key)?;
        if !pools[&name].persistent {
            return Err(StorageError::Invalid(format!("storage pool '{name}' is transient: only defined pools can autostart")));
        }
        self.store.set_pool_mark(&name, PoolMark::Autostart, on).map_err(StorageError::Image)?;
        Ok(name)
    }

    /// Starts the pools marked for autostart, at the daemon's start.
    pub fn autostart(&self) {
        let names: Vec<String> = self.briefs().into_iter().filter(|b| b.autostart && !b.active).map(|b| b.name).collect();
        for name in names {
            match self.start(&name, 0) {
                Ok(_) => tracing::info!("storage pool '{name}' autostarted"),
                Err(e) => tracing::error!("storage pool '{name}' did not autostart: {e}"),
            }
        }
    }

    /// One pool, as it is now.
    pub fn brief(&self, key: &str) -> Result<PoolBrief> {
        let pools = self.lock();
        let name = Self::find(&pools, key)?;
        Ok(pools[&name].brief(&self.store))
    }

    /// Every pool, by name.
    pub fn briefs(&self) -> Vec<PoolBrief> {
        self.lock().values().map(|p| p.brief(&self.store)).collect()
    }

    /// Whether it is active, and its filesystem's sizes (zeros when inactive, as libvirt).
    pub fn info(&self, key: &str) -> Result<(bool, PoolSizes)> {
        let pools = self.lock();
        let name = Self::find(&pools, key)?;
        let p = &pools[&name];
        Ok((p.active, if p.active { fs_sizes(&p.def.target)? } else { PoolSizes::default() }))
    }

    /// `pool-dumpxml`: an active pool shows its directory's owner and mode as they are.
    pub fn dump_xml(&self, key: &str) -> Result<String> {
        use std::os::unix::fs::MetadataExt;
        let (active, sizes) = self.info(key)?;
        let pools = self.lock();
        let name = Self::find(&pools, key)?;
        let mut def = pools[&name].def.clone();
        if let Some(m) = std::fs::metadata(&def.target).ok().filter(|_| active) {
            def.permissions = rvirt_domain::Permissions { mode: Some(m.mode() & 0o7777), owner: Some(m.uid()), group: Some(m.gid()) };
        }
        Ok(def.to_xml(sizes))
    }
}
