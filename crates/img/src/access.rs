//! How rvirt-img opens and writes images: the command line's `-U` and
//! `--probe-backing`, `json:` names, outputs written under a temporary name,
//! and the refusal to write an image onto one of its own sources.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use rvirt_block::qcow2::Qcow2Image;
use rvirt_block::{BackingPolicy, BlockBackend, Format, ImageOptions, Locking};

static FORCE_SHARE: AtomicBool = AtomicBool::new(false);
static PROBE_BACKING: AtomicBool = AtomicBool::new(false);
static IMAGE_OPTS: AtomicBool = AtomicBool::new(false);

/// `--image-opts`: image names are `driver=FMT,file.filename=PATH` option strings.
pub fn set_image_opts(on: bool) {
    IMAGE_OPTS.store(on, Ordering::Relaxed);
}

/// `-U`/`--force-share`: read images other processes hold, taking no locks
/// (qemu-img's flag; read-only commands only).
pub fn set_force_share(on: bool) {
    FORCE_SHARE.store(on, Ordering::Relaxed);
}

/// `--probe-backing`: guess the format of backing files whose format the
/// image does not record. Off by default: a guest may have written what a
/// probe reads.
pub fn set_probe_backing(on: bool) {
    PROBE_BACKING.store(on, Ordering::Relaxed);
}

fn backing_policy() -> BackingPolicy {
    if PROBE_BACKING.load(Ordering::Relaxed) {
        BackingPolicy::Probe
    } else {
        BackingPolicy::RecordedFormat
    }
}

/// Options for an open of a user-named image; `chain` says whether its
/// backing chain is opened too.
pub(crate) fn options(read_only: bool, chain: bool) -> Result<ImageOptions> {
    let force = FORCE_SHARE.load(Ordering::Relaxed);
    if force && !read_only {
        bail!("-U (force-share) is for read-only commands; this one writes the image");
    }
    Ok(ImageOptions {
        read_only,
        locking: if force { Locking::ForceShare } else { Locking::Exclusive },
        backing: if chain { backing_policy() } else { BackingPolicy::Ignore },
        direct: false,
    })
}

/// Opens an image of `fmt` with its backing chain.
pub(crate) fn open(path: &Path, fmt: Format, read_only: bool) -> Result<Box<dyn BlockBackend>> {
    let img = rvirt_block::open_with(path, fmt, &options(read_only, true)?).with_context(|| path.display().to_string())?;
    warn_damage(path, img.as_ref());
    Ok(img)
}

/// Opens a qcow2 image, with or without its backing chain.
pub(crate) fn open_qcow2(path: &Path, read_only: bool, chain: bool) -> Result<Qcow2Image> {
    Qcow2Image::open_with(path, &options(read_only, chain)?).with_context(|| path.display().to_string())
}

/// Opens a qcow2 image alone for `check -r all` (see [`Qcow2Image::open_for_repair`]).
pub(crate) fn open_qcow2_for_repair(path: &Path) -> Result<Qcow2Image> {
    let opts = options(false, false)?;
    Qcow2Image::open_for_repair(path, opts.locking).with_context(|| path.display().to_string())
}

/// Says on stderr what a read-only open of `img` went on without (a
/// damaged snapshot table, refcount structure or bitmaps), as qemu-img warns.
pub(crate) fn warn_damage(path: &Path, img: &dyn BlockBackend) {
    for d in img.damage() {
        eprintln!("rvirt-img: warning: {}: {d}", path.display());
    }
}

/// The format the user gave, or (for an image the user named) a probe that
/// names formats rvirt does not read.
pub(crate) fn format_of(path: &Path, format: Option<&str>) -> Result<Format> {
    Ok(match format {
        Some(f) => Format::parse(f)?,
        None => rvirt_block::probe_format(path)?,
    })
}

/// The backing chain of a user-named image as the image records it.
pub(crate) fn chain_below(path: &Path, fmt: Format) -> Result<Vec<rvirt_block::Layer>> {
    rvirt_block::backing_chain(path, fmt, &backing_policy()).with_context(|| path.display().to_string())
}

/// A command-line image name: a path, or a `json:{…}` pseudo-name (accepted
/// here only, never inside an image) with `driver` raw or qcow2 over a
/// `file` driver's `filename`, nested or flattened as QEMU writes them.
pub fn image_arg(name: PathBuf, format: Option<String>) -> Result<(PathBuf, Option<String>)> {
    if IMAGE_OPTS.load(Ordering::Relaxed) {
        return image_opts(&name, format);
    }
    let Some(text) = name.to_str().and_then(|s| s.strip_prefix("json:")) else { return Ok((name, format)) };
    let v: serde_json::Value = serde_json::from_str(text).context("invalid json: image name")?;
    let get = |dotted: &str| -> Option<&serde_json::Value> {
        v.get(dotted).or_else(|| dotted.split('.').try_fold(&v, |node, key| node.get(key)))
    };
    let s = |dotted: &str| get(dotted).and_then(|x| x.as_str());
    let driver = s("driver").context("json: image name needs a \"driver\" (raw or qcow2)")?;
    if !matches!(driver, "raw" | "qcow2") {
        bail!("json: driver '{driver}' is not supported (raw or qcow2 over a file)");
    }
    if let Some(d) = s("file.driver").filter(|d| *d != "file") {
        bail!("json: file driver '{d}' is not supported (file only)");
    }
    let file = s("file.filename").context("json: image name needs \"file\": {\"filename\": …}")?;
    if let Some(f) = format.as_deref().filter(|f| *f != driver) {
        bail!("-f {f} contradicts the json: driver '{driver}'");
    }
    Ok((PathBuf::from(file), Some(driver.to_string())))
}

/// (device, inode) of a file, when it exists.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Refuses a destination that is one of the files `sources` (images and
/// everything in their backing chains) read from.
pub(crate) fn refuse_overlap(dest: &Path, sources: &[PathBuf], what: &str) -> Result<()> {
    let Some(id) = identity(dest) else { return Ok(()) };
    if let Some(s) = sources.iter().find(|s| identity(s) == Some(id)) {
        bail!("{what} {} is the same file as {} that it reads from; writing it would destroy the data being copied", dest.display(), s.display());
    }
    Ok(())
}

/// A new image file, written under a temporary name in the same directory
/// and renamed over the destination only when complete; removed if the
/// command fails (a full disk leaves nothing half-written behind). A block
/// device destination is written in place.
pub(crate) struct Output {
    dest: PathBuf,
    tmp: Option<PathBuf>,
}

impl Output {
    /// Prepares an output at `dest`, refusing one another process holds.
    /// An existing destination reached through a symlink is replaced where
    /// the link points, as writing through it would.
    pub(crate) fn new(dest: &Path) -> Result<Self> {
        let resolved = std::fs::canonicalize(dest).ok();
        let dest = resolved.as_deref().unwrap_or(dest);
        if let Ok(meta) = std::fs::metadata(dest) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_block_device() {
                return Ok(Self { dest: dest.to_path_buf(), tmp: None });
            }
            if !meta.is_file() {
                bail!("{}: not a regular file; an image is created only as a file", dest.display());
            }
            // qemu-img refuses to overwrite an image that is in use; so do we.
            let f = rvirt_block::file::open_checked(dest, true, rvirt_block::file::Kind::Regular, 0).with_context(|| dest.display().to_string())?;
            rvirt_block::lock::lock(&f, dest, rvirt_block::lock::Permissions::for_image(false, true, Locking::Exclusive))?;
        }
        let name = dest.file_name().with_context(|| format!("{}: not a file name", dest.display()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".rvirt-img-{}", std::process::id()));
        let tmp = dest.with_file_name(tmp_name);
        let _ = std::fs::remove_file(&tmp);
        Ok(Self { dest: dest.to_path_buf(), tmp: Some(tmp) })
    }

    /// Where to write.
    pub(crate) fn path(&self) -> &Path {
        self.tmp.as_deref().unwrap_or(&self.dest)
    }

    /// The image is complete: move it into place.
    pub(crate) fn finish(mut self) -> Result<()> {
        if let Some(tmp) = self.tmp.take() {
            if let Err(e) = std::fs::rename(&tmp, &self.dest) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e).with_context(|| format!("moving the new image to {}", self.dest.display()));
            }
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_nested_and_flattened() {
        let (p, f) = image_arg(PathBuf::from(r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/a/b.qcow2"}}"#), None).unwrap();
        assert_eq!((p, f.as_deref()), (PathBuf::from("/a/b.qcow2"), Some("qcow2")));
        let (p, f) = image_arg(PathBuf::from(r#"json:{"driver":"raw","file.filename":"x.img"}"#), Some("raw".into())).unwrap();
        assert_eq!((p, f.as_deref()), (PathBuf::from("x.img"), Some("raw")));
        for bad in [r#"json:{"driver":"vmdk","file.filename":"x"}"#, r#"json:{"driver":"raw","file":{"driver":"nbd"}}"#, "json:{", r#"json:{"driver":"raw"}"#] {
            assert!(image_arg(PathBuf::from(bad), None).is_err(), "{bad}");
        }
        assert!(image_arg(PathBuf::from(r#"json:{"driver":"raw","file.filename":"x"}"#), Some("qcow2".into())).is_err());
        assert_eq!(image_arg(PathBuf::from("plain.img"), None).unwrap().0, PathBuf::from("plain.img"));
    }
}

/// An `--image-opts` name: `driver=raw|qcow2,file.filename=PATH` (also
/// `file.driver=file`; a `,,` is a comma in the path), as qemu-img takes it.
fn image_opts(name: &Path, format: Option<String>) -> Result<(PathBuf, Option<String>)> {
    if format.is_some() {
        bail!("--image-opts and -f are mutually exclusive");
    }
    let text = name.to_str().context("--image-opts: the options are not UTF-8")?;
    let (mut driver, mut file) = (None, None);
    for part in rvirt_api::config::split_options(text).iter().filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("driver", d)) => driver = Some(d.to_string()),
            Some(("file.filename" | "filename", f)) => file = Some(f.to_string()),
            Some(("file.driver", "file")) => {}
            Some(("file.driver", d)) => bail!("--image-opts: file driver '{d}' is not supported (file only)"),
            Some((k, _)) => bail!("--image-opts: option '{k}' is not supported (driver, file.driver, file.filename)"),
            None => bail!("--image-opts: '{part}' is not key=value"),
        }
    }
    let driver = driver.context("--image-opts: driver=raw|qcow2 is needed")?;
    if !matches!(driver.as_str(), "raw" | "qcow2") {
        bail!("--image-opts: driver '{driver}' is not supported (raw or qcow2)");
    }
    let file = file.context("--image-opts: file.filename=PATH is needed")?;
    Ok((PathBuf::from(file), Some(driver)))
}
