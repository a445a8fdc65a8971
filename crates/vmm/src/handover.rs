//! Writable disks whose images change hands in a live migration.
//!
//! One process at a time may write an image: the VMM locks it as QEMU does
//! (see `rvirt_block::lock`). At the switch-over the source flushes and
//! closes such a disk after its devices stopped and before it sends the
//! guest's state; the destination opens it only once that state arrived,
//! so it takes the locks the source let go and reads a qcow2 image's
//! tables as the source left them (the clusters it allocated while the
//! guest ran). Until then the destination knows the disk from a look that
//! takes no locks, enough to refuse the migration early for a missing or
//! damaged file. Read-only and shareable disks need none of this: both
//! VMMs may hold them at once.

use std::sync::{Arc, RwLock};

use rvirt_api::config::DiskConfig;
use rvirt_block::{BlockBackend, Extent};

use crate::{Error, Result};

/// A writable disk that can let go of its image and take it again.
pub struct HandoverDisk {
    /// What it is now (a `--disk-only` snapshot moves it onto an overlay).
    config: RwLock<DiskConfig>,
    size: u64,
    /// None while another VMM holds the image.
    image: RwLock<Option<Arc<dyn BlockBackend>>>,
}

/// Whether `d` is a disk whose image must change hands.
pub fn needs_handover(d: &DiskConfig) -> bool {
    d.media == rvirt_api::config::Media::Disk && !d.read_only && !d.shareable && !d.path.as_os_str().is_empty()
}

impl HandoverDisk {
    /// Opens (and locks) the image now: a VM that boots or restores here.
    pub fn open(config: &DiskConfig) -> Result<Self> {
        let image = crate::virtio::open_disk(config)?;
        Ok(Self { config: RwLock::new(config.clone()), size: image.size(), image: RwLock::new(Some(image)) })
    }

    /// A disk another VMM still writes: the image is looked at read-only
    /// without locks (it must exist and be of its format) and left closed
    /// until [`HandoverDisk::take`].
    pub fn held_elsewhere(config: &DiskConfig) -> Result<Self> {
        let look = DiskConfig { read_only: true, ..config.clone() };
        let size = crate::virtio::open_disk_with(&look, rvirt_block::Locking::ForceShare)?.size();
        Ok(Self { config: RwLock::new(config.clone()), size, image: RwLock::new(None) })
    }

    /// Flushes and closes the image, dropping its locks (nothing is in
    /// flight: the devices stopped first).
    pub fn release(&self) -> Result<()> {
        let mut slot = self.image.write().unwrap_or_else(|p| p.into_inner());
        if let Some(image) = slot.as_ref() {
            image.flush().map_err(|e| Error::Device(format!("flushing {}: {e}", self.config().path.display())))?;
        }
        *slot = None;
        Ok(())
    }

    /// Opens and locks the image again; its size must be the one the
    /// devices were built with.
    pub fn take(&self) -> Result<()> {
        let mut slot = self.image.write().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Ok(());
        }
        let config = self.config();
        let image = crate::virtio::open_disk(&config)?;
        if image.size() != self.size {
            return Err(Error::Device(format!(
                "{}: its size changed from {} to {} bytes while it changed hands",
                config.path.display(),
                self.size,
                image.size()
            )));
        }
        *slot = Some(image);
        Ok(())
    }

    /// What the disk is now (its file, format and backing chain).
    pub fn config(&self) -> DiskConfig {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Continues the disk in the qcow2 overlay `file` (named `name`),
    /// whose backing file is the image it writes now (a `--disk-only`
    /// snapshot: the image stops changing). The VM must be paused and its
    /// devices stopped. The image stays open, as the overlay's backing.
    pub fn continue_in_overlay(&self, file: std::fs::File, name: &std::path::Path) -> Result<()> {
        use rvirt_api::config::{BackingFile, ImageFormat};
        let bad = |e: String| Error::Device(format!("overlay {}: {e}", name.display()));
        let mut slot = self.image.write().unwrap_or_else(|p| p.into_inner());
        let below = slot.clone().ok_or_else(|| bad("the disk's image is held by another VMM".into()))?;
        below.flush().map_err(|e| bad(e.to_string()))?;
        let perms = rvirt_block::lock::Permissions::for_image(false, true, rvirt_block::Locking::default());
        rvirt_block::lock::lock(&file, name, perms).map_err(|e| bad(e.to_string()))?;
        let overlay = rvirt_block::Qcow2Image::open_file(Box::new(file), &name.to_string_lossy(), false, Some(Box::new(Below(below)))).map_err(|e| bad(e.to_string()))?;
        if overlay.size() != self.size {
            return Err(bad(format!("{} bytes; the disk has {}", overlay.size(), self.size)));
        }
        *slot = Some(Arc::new(overlay));
        let mut c = self.config.write().unwrap_or_else(|p| p.into_inner());
        let base = BackingFile { path: c.path.clone(), format: c.format.unwrap_or(ImageFormat::Raw) };
        c.backing.insert(0, base);
        c.path = name.to_path_buf();
        c.format = Some(ImageFormat::Qcow2);
        c.probe_backing = false;
        Ok(())
    }

    fn image(&self) -> rvirt_block::Result<Arc<dyn BlockBackend>> {
        let slot = self.image.read().unwrap_or_else(|p| p.into_inner());
        slot.clone().ok_or_else(|| rvirt_block::Error::Request(format!("{}: the image is held by another VMM (a migration)", self.config().path.display())))
    }
}

/// A disk's former image, read as its overlay's backing file.
struct Below(Arc<dyn BlockBackend>);

impl BlockBackend for Below {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> rvirt_block::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, _: &[u8], _: u64) -> rvirt_block::Result<()> {
        Err(rvirt_block::Error::Request("a backing file is not written".into()))
    }
    fn flush(&self) -> rvirt_block::Result<()> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> rvirt_block::Result<()> {
        Err(rvirt_block::Error::Request("a backing file is not written".into()))
    }
    fn write_zeroes(&self, _: u64, _: u64) -> rvirt_block::Result<()> {
        Err(rvirt_block::Error::Request("a backing file is not written".into()))
    }
    fn map(&self, offset: u64, length: u64) -> rvirt_block::Result<Vec<Extent>> {
        self.0.map(offset, length)
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

impl BlockBackend for HandoverDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> rvirt_block::Result<()> {
        self.image()?.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> rvirt_block::Result<()> {
        self.image()?.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &mut [&mut [u8]], offset: u64) -> rvirt_block::Result<()> {
        self.image()?.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> rvirt_block::Result<()> {
        self.image()?.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> rvirt_block::Result<()> {
        self.image()?.flush()
    }
    fn discard(&self, offset: u64, length: u64) -> rvirt_block::Result<()> {
        self.image()?.discard(offset, length)
    }
    fn write_zeroes(&self, offset: u64, length: u64) -> rvirt_block::Result<()> {
        self.image()?.write_zeroes(offset, length)
    }
    fn map(&self, offset: u64, length: u64) -> rvirt_block::Result<Vec<Extent>> {
        self.image()?.map(offset, length)
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn create_snapshot(&self, name: &str) -> rvirt_block::Result<()> {
        self.image()?.create_snapshot(name)
    }
    fn delete_snapshot(&self, name: &str) -> rvirt_block::Result<()> {
        self.image()?.delete_snapshot(name)
    }
    fn has_snapshot(&self, name: &str) -> bool {
        self.image().is_ok_and(|i| i.has_snapshot(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rvirt_api::config::ImageFormat;

    fn scratch(test: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("rvirt-handover-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn qcow2(dir: &std::path::Path) -> DiskConfig {
        let path = dir.join("d.qcow2");
        drop(rvirt_block::qcow2::Qcow2Image::create(&path, 4 << 20, &Default::default()).unwrap());
        DiskConfig { format: Some(ImageFormat::Qcow2), ..DiskConfig::plain(path) }
    }

    #[test]
    fn the_image_changes_hands_and_the_new_holder_sees_what_the_old_one_wrote() {
        let dir = scratch("hands");
        let cfg = qcow2(&dir);
        let source = HandoverDisk::open(&cfg).unwrap();
        // The destination may look while the source holds it, not take it.
        let dest = HandoverDisk::held_elsewhere(&cfg).unwrap();
        assert_eq!(dest.size(), 4 << 20);
        assert!(dest.take().is_err(), "the source's locks keep the destination out");
        assert!(dest.read_at(&mut [0u8; 512], 0).unwrap_err().to_string().contains("held by another VMM"));
        // The source writes (a cluster qcow2 allocates after the look), then lets go.
        source.write_at(&[7u8; 512], 3 << 20).unwrap();
        source.release().unwrap();
        assert!(source.write_at(&[1u8; 512], 0).is_err());
        dest.take().unwrap();
        let mut buf = [0u8; 512];
        dest.read_at(&mut buf, 3 << 20).unwrap();
        assert_eq!(buf, [7u8; 512]);
        // And back: a failed migration's source takes it again.
        assert!(source.take().is_err(), "the destination holds it now");
        dest.release().unwrap();
        source.take().unwrap();
        source.read_at(&mut buf, 3 << 20).unwrap();
        assert_eq!(buf, [7u8; 512]);
        drop((source, dest));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_or_resized_image_is_an_error_not_a_disk() {
        let dir = scratch("resized");
        assert!(HandoverDisk::held_elsewhere(&DiskConfig::plain(dir.join("none"))).is_err());
        let raw = dir.join("raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let d = HandoverDisk::held_elsewhere(&DiskConfig::plain(raw.clone())).unwrap();
        std::fs::write(&raw, vec![0u8; 2 << 20]).unwrap();
        assert!(d.take().unwrap_err().to_string().contains("size changed"));
        assert!(d.read_at(&mut [0u8; 512], 0).is_err(), "a disk that could not be taken stays closed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
