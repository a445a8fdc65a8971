//! Storage volumes (libvirt's `vol-*`): the regular files of an active
//! pool's directory. New ones are made by rvirt-img's code (raw or qcow2,
//! preallocated, over a backing file, or cloned from another volume); a
//! symlink or hidden file is never a volume, so no call reaches a file
//! outside the pool's directory through one.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rvirt_block::qcow2::Preallocation;
use rvirt_block::{BackingPolicy, ImageOptions, Locking, Qcow2Image, RawImage};
use rvirt_domain::{valid_volume_name, ImageFormat, Permissions, VolumeBacking, VolumeDef};

use super::pools::{io, Pools, Result, StorageError};

/// What front ends list and look up about a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeBrief {
    /// The pool it is in.
    pub pool: String,
    /// Its file name.
    pub name: String,
    /// Its key: the file's path.
    pub key: String,
}

/// `VIR_STORAGE_VOL_CREATE_PREALLOC_METADATA`.
pub const CREATE_PREALLOC_METADATA: u32 = 1;
/// `VIR_STORAGE_VOL_RESIZE_ALLOCATE`, `_DELTA` and `_SHRINK`.
pub const RESIZE_ALLOCATE: u32 = 1;
/// See [`RESIZE_ALLOCATE`].
pub const RESIZE_DELTA: u32 = 2;
/// See [`RESIZE_ALLOCATE`].
pub const RESIZE_SHRINK: u32 = 4;
/// `VIR_STORAGE_VOL_DELETE_ZEROED`: wipe before removing.
pub const DELETE_ZEROED: u32 = 1;

/// Bytes written per call when a volume is wiped.
const WIPE_CHUNK: usize = 1 << 20;

/// The format a volume's contents say it has (raw when they name none rvirt reads).
fn probe(path: &Path) -> ImageFormat {
    rvirt_block::probe_format(path).map_or(ImageFormat::Raw, super::domain_format)
}

/// How a volume is opened: alone (never its backing file), for a look or a change.
fn open_alone(write: bool) -> ImageOptions {
    ImageOptions { read_only: !write, locking: if write { Locking::Exclusive } else { Locking::ForceShare }, backing: BackingPolicy::Ignore, direct: false }
}

/// The size a resize asks for (`capacity`, or `current` plus or minus it
/// with `RESIZE_DELTA`), rounded up to `unit`; smaller only with `RESIZE_SHRINK`.
fn new_capacity(current: u64, capacity: u64, flags: u32, unit: u64) -> Result<u64> {
    let shrink = flags & RESIZE_SHRINK != 0;
    let new = match (flags & RESIZE_DELTA != 0, shrink) {
        (false, _) => Some(capacity),
        (true, false) => current.checked_add(capacity),
        (true, true) => current.checked_sub(capacity),
    };
    let new = new.and_then(|n| n.checked_next_multiple_of(unit)).filter(|n| i64::try_from(*n).is_ok()).ok_or_else(|| StorageError::Invalid("the new capacity is out of range".into()))?;
    if new < current && !shrink {
        return Err(StorageError::Invalid(format!("Can't shrink capacity below current capacity ({current} bytes) unless shrink flag explicitly specified")));
    }
    Ok(new)
}

impl Pools {
    /// The file of volume `name` in active pool `pool`: a regular file, not a link.
    fn volume_path(&self, pool: &str, name: &str) -> Result<(String, PathBuf)> {
        let pools = self.lock();
        let pool = Self::find(&pools, pool)?;
        let dir = Self::active_dir(&pools, &pool)?;
        if !valid_volume_name(name) {
            return Err(StorageError::NoVolume(format!("name '{name}'")));
        }
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok((pool, path)),
            _ => Err(StorageError::NoVolume(format!("name '{name}'"))),
        }
    }

    /// The volumes of an active pool, by name.
    pub fn volume_names(&self, pool: &str) -> Result<Vec<String>> {
        let dir = Self::active_dir(&self.lock(), pool)?;
        let entries = std::fs::read_dir(&dir).map_err(io(format!("cannot read directory '{}'", dir.display())))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_volume_name(n))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Volume `name` of pool `pool`.
    pub fn volume(&self, pool: &str, name: &str) -> Result<VolumeBrief> {
        let (pool, path) = self.volume_path(pool, name)?;
        Ok(VolumeBrief { pool, name: name.to_string(), key: path.to_string_lossy().into_owned() })
    }

    /// The volume whose key or path is `path` (a file directly in an active pool's directory).
    pub fn volume_by_path(&self, path: &str) -> Result<VolumeBrief> {
        let p = Path::new(path);
        let missing = || StorageError::NoVolume(format!("path '{path}'"));
        let (dir, name) = (p.parent().ok_or_else(missing)?, p.file_name().and_then(|n| n.to_str()).ok_or_else(missing)?);
        let real_dir = std::fs::canonicalize(dir).ok();
        let pool = {
            let pools = self.lock();
            let found = pools.values().find(|x| x.active && (x.def.target == dir || real_dir.is_some() && std::fs::canonicalize(&x.def.target).ok() == real_dir));
            found.map(|x| x.def.name.clone()).ok_or_else(missing)?
        };
        self.volume(&pool, name).map_err(|_| missing())
    }

    /// What `vol-info` and `vol-dumpxml` show: the file's sizes and, for
    /// qcow2, its header (read without opening its backing file).
    pub fn volume_def(&self, pool: &str, name: &str) -> Result<VolumeDef> {
        let (_, path) = self.volume_path(pool, name)?;
        let meta = std::fs::symlink_metadata(&path).map_err(io(path.display().to_string()))?;
        let format = probe(&path);
        let mut v = VolumeDef {
            name: name.to_string(),
            capacity: Some(meta.len()),
            allocation: Some(meta.blocks() * 512),
            format: Some(format),
            path: Some(path.clone()),
            physical: Some(meta.len()),
            permissions: Permissions { mode: Some(meta.mode() & 0o7777), owner: Some(meta.uid()), group: Some(meta.gid()) },
            ..Default::default()
        };
        if format == ImageFormat::Qcow2 {
            let img = Qcow2Image::open_with(&path, &open_alone(false))?;
            let h = img.header();
            v.capacity = Some(h.size);
            v.cluster_size = Some(1u64 << h.cluster_bits);
            v.compat = Some(if h.version >= 3 { "1.1" } else { "0.10" }.to_string());
            v.lazy_refcounts = h.compatible_features & 1 != 0;
            v.extended_l2 = h.incompatible_features & (1 << 4) != 0;
            v.backing = img.backing_file().map(|b| {
                let bp = Path::new(b);
                let shown = if bp.is_absolute() { bp.to_path_buf() } else { path.parent().unwrap_or(Path::new("/")).join(bp) };
                VolumeBacking { path: shown, format: img.backing_format().map(super::domain_format) }
            });
        }
        Ok(v)
    }

    /// `vol-create` (or, with `clone`, `vol-create-from`/`vol-clone`): the
    /// name is taken at once (a file made with `O_EXCL`), the image written
    /// beside it and moved into place; on failure nothing is left.
    pub fn create_volume(&self, pool: &str, xml: &str, flags: u32, clone: Option<(&str, &str)>) -> Result<VolumeBrief> {
        if flags & !CREATE_PREALLOC_METADATA != 0 {
            return Err(StorageError::Invalid(format!("volume creation flags {flags:#x} are not supported")));
        }
        let def = VolumeDef::parse(xml)?;
        let source = clone.map(|(p, n)| self.volume_path(p, n)).transpose()?;
        let (pool, dir) = {
            let pools = self.lock();
            let pool = Self::find(&pools, pool)?;
            let dir = Self::active_dir(&pools, &pool)?;
            (pool, dir)
        };
        let path = dir.join(&def.name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| if e.kind() == std::io::ErrorKind::AlreadyExists { StorageError::Invalid(format!("storage volume '{}' already exists in pool '{pool}'", def.name)) } else { io(format!("cannot create '{}'", path.display()))(e) })?;
        let made = match &source {
            Some((_, src)) => self.clone_into(&def, src, &path),
            None => self.make(&def, flags, &path),
        };
        // rvirt-img writes under the process umask: a volume is the owner's alone, as libvirt makes it.
        let private = || -> Result<()> {
            let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&path).map_err(io(path.display().to_string()))?;
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(io(format!("cannot set mode of '{}'", path.display())))
        };
        if let Err(e) = made.and_then(|_| private()) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(VolumeBrief { pool, name: def.name.clone(), key: path.to_string_lossy().into_owned() })
    }

    /// qemu-img's `-o` options for what `def` asks of a qcow2 image.
    fn qcow2_options(def: &VolumeDef, flags: u32, capacity: u64) -> Vec<String> {
        let mut o = Vec::new();
        if let Some(c) = &def.compat {
            o.push(format!("compat={c}"));
        }
        if let Some(c) = def.cluster_size {
            o.push(format!("cluster_size={c}"));
        }
        if def.lazy_refcounts {
            o.push("lazy_refcounts=on".into());
        }
        if def.extended_l2 {
            o.push("extended_l2=on".into());
        }
        // As libvirt: metadata when asked, every byte when the allocation is the whole capacity.
        if flags & CREATE_PREALLOC_METADATA != 0 {
            o.push("preallocation=metadata".into());
        } else if def.allocation.is_some_and(|a| a >= capacity && a > 0) {
            o.push("preallocation=falloc".into());
        }
        o
    }

    fn make(&self, def: &VolumeDef, flags: u32, path: &Path) -> Result<()> {
        let capacity = def.capacity.ok_or_else(|| StorageError::Invalid("a new volume needs a <capacity>".into()))?;
        let format = def.format.unwrap_or(ImageFormat::Raw);
        if flags & CREATE_PREALLOC_METADATA != 0 && format != ImageFormat::Qcow2 {
            return Err(StorageError::Invalid("metadata preallocation is only for qcow2 volumes".into()));
        }
        let mut req = rvirt_img::CreateRequest { path: path.to_path_buf(), format: Some(format.name().into()), size: Some(capacity), ..Default::default() };
        if let Some(b) = &def.backing {
            self.policy.check("backing store", &b.path, false).map_err(StorageError::Denied)?;
            let bf = match b.format {
                Some(f) => f,
                // Named by the caller, who may write this pool: its format may be probed, and is recorded.
                None => probe(&b.path),
            };
            req.backing_file = Some(b.path.to_string_lossy().into_owned());
            req.backing_format = Some(bf.name().into());
        }
        if format == ImageFormat::Qcow2 {
            req.options = Self::qcow2_options(def, flags, capacity);
        }
        rvirt_img::create(&req).map_err(StorageError::Image)?;
        if format == ImageFormat::Raw {
            if let Some(a) = def.allocation.filter(|a| *a > 0) {
                let f = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(io(path.display().to_string()))?;
                let len = libc::off_t::try_from(a.min(capacity)).map_err(|_| StorageError::Invalid(format!("allocation {a} is out of range")))?;
                // SAFETY: fallocate on a file this function opened, over a range within off_t.
                if unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, len) } != 0 {
                    return Err(io(format!("allocating {a} bytes for {}", path.display()))(std::io::Error::last_os_error()));
                }
            }
        }
        Ok(())
    }

    /// A copy of `src` (and what its backing chain shows) as `def` asks: its
    /// format, or the source's; its capacity, if larger.
    fn clone_into(&self, def: &VolumeDef, src: &Path, path: &Path) -> Result<()> {
        let src_format = probe(src);
        // Every file the copy reads must be one domains may use.
        let chain = rvirt_block::backing_chain(src, super::block_format(src_format), &BackingPolicy::RecordedFormat)?;
        for layer in &chain {
            self.policy.check("volume to clone (or its backing file)", &layer.path, false).map_err(StorageError::Denied)?;
        }
        let format = def.format.unwrap_or(src_format);
        let req = rvirt_img::ConvertRequest {
            source: src.to_path_buf(),
            source_format: Some(src_format.name().into()),
            dest: path.to_path_buf(),
            dest_format: Some(format.name().into()),
            options: if format == ImageFormat::Qcow2 { Self::qcow2_options(def, 0, u64::MAX) } else { Vec::new() },
            flush: true,
            ..Default::default()
        };
        rvirt_img::convert(&req).map_err(StorageError::Image)?;
        // As libvirt: a larger capacity grows the copy; a smaller one is the source's.
        let copied = rvirt_block::open_with(path, super::block_format(format), &open_alone(false))?.size();
        match def.capacity {
            Some(c) if c > copied => self.resize_file(path, format, c, 0),
            _ => Ok(()),
        }
    }

    /// Sets the virtual size of the image at `path` (never smaller unless `RESIZE_SHRINK`).
    fn resize_file(&self, path: &Path, format: ImageFormat, capacity: u64, flags: u32) -> Result<()> {
        match format {
            ImageFormat::Qcow2 => {
                let img = Qcow2Image::open_with(path, &open_alone(true))?;
                let current = img.header().size;
                // qcow2 sizes are whole sectors.
                let new = new_capacity(current, capacity, flags, 512)?;
                if new == current {
                    return Ok(());
                }
                img.resize(new, flags & RESIZE_SHRINK != 0)?;
                if flags & RESIZE_ALLOCATE != 0 && new > current {
                    img.preallocate_from(Preallocation::Falloc, current)?;
                }
                Ok(img.close()?)
            }
            ImageFormat::Raw => {
                let mut img = RawImage::open_with(path, &open_alone(true))?;
                let current = std::fs::metadata(path).map_err(io(path.display().to_string()))?.len();
                let new = new_capacity(current, capacity, flags, 1)?;
                img.resize(new)?;
                if flags & RESIZE_ALLOCATE != 0 && new > current {
                    img.preallocate_from(current, false)?;
                }
                Ok(())
            }
        }
    }

    /// `vol-resize`.
    pub fn resize_volume(&self, pool: &str, name: &str, capacity: u64, flags: u32) -> Result<()> {
        if flags & !(RESIZE_ALLOCATE | RESIZE_DELTA | RESIZE_SHRINK) != 0 {
            return Err(StorageError::Invalid(format!("resize flags {flags:#x} are not supported")));
        }
        let (_, path) = self.volume_path(pool, name)?;
        self.resize_file(&path, probe(&path), capacity, flags)
    }

    /// `vol-wipe`: every byte of the file is overwritten with zeros (a
    /// volume in use is refused by its lock); a qcow2 volume is then a new,
    /// empty image of the same size, options and backing file.
    pub fn wipe_volume(&self, pool: &str, name: &str) -> Result<()> {
        let (pool, path) = self.volume_path(pool, name)?;
        let before = self.volume_def(&pool, name)?;
        // The new image records its backing file without opening it, which needs the format: found out before anything is lost.
        if before.backing.as_ref().is_some_and(|b| b.format.is_none()) {
            return Err(StorageError::Invalid(format!("volume '{name}' does not record its backing file's format: it cannot be made again after a wipe")));
        }
        {
            // Readable too: the lock's shared bytes need a descriptor open for reading.
            let mut f = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(&path).map_err(io(path.display().to_string()))?;
            // Locked as an image writer: a running domain's disk is not wiped under it.
            rvirt_block::lock::lock(&f, &path, rvirt_block::lock::Permissions::for_image(false, true, Locking::Exclusive))?;
            let zeros = vec![0u8; WIPE_CHUNK];
            let mut left = before.physical.unwrap_or(0);
            while left > 0 {
                let n = left.min(WIPE_CHUNK as u64) as usize;
                f.write_all(&zeros[..n]).map_err(io(format!("wiping {}", path.display())))?;
                left -= n as u64;
            }
            f.sync_all().map_err(io(format!("wiping {}", path.display())))?;
        }
        if before.format == Some(ImageFormat::Qcow2) {
            let mut fresh = before.clone();
            fresh.allocation = None;
            let req = rvirt_img::CreateRequest {
                path: path.clone(),
                format: Some("qcow2".into()),
                size: before.capacity,
                backing_file: before.backing.as_ref().map(|b| b.path.to_string_lossy().into_owned()),
                backing_format: before.backing.as_ref().and_then(|b| b.format).map(|f| f.name().to_string()),
                options: Self::qcow2_options(&fresh, 0, u64::MAX),
                unsafe_backing: true,
            };
            rvirt_img::create(&req).map_err(StorageError::Image)?;
        }
        Ok(())
    }

    /// `vol-delete` (with `DELETE_ZEROED`, wiped first).
    pub fn delete_volume(&self, pool: &str, name: &str, flags: u32) -> Result<()> {
        if flags & !DELETE_ZEROED != 0 {
            return Err(StorageError::Invalid(format!("volume deletion flags {flags:#x} are not supported")));
        }
        if flags & DELETE_ZEROED != 0 {
            self.wipe_volume(pool, name)?;
        }
        let (_, path) = self.volume_path(pool, name)?;
        std::fs::remove_file(&path).map_err(io(format!("cannot remove '{}'", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resizes_grow_and_shrink_only_when_asked() {
        assert_eq!(new_capacity(100, 1000, 0, 512).unwrap(), 1024);
        assert_eq!(new_capacity(1024, 512, RESIZE_DELTA, 512).unwrap(), 1536);
        assert_eq!(new_capacity(1024, 512, RESIZE_DELTA | RESIZE_SHRINK, 1).unwrap(), 512);
        assert!(new_capacity(1024, 512, 0, 1).unwrap_err().to_string().contains("shrink flag"));
        assert!(new_capacity(10, 20, RESIZE_DELTA | RESIZE_SHRINK, 1).unwrap_err().to_string().contains("out of range"));
        assert!(new_capacity(1, u64::MAX, RESIZE_DELTA, 1).is_err() && new_capacity(1, u64::MAX, 0, 1).is_err());
    }
}
