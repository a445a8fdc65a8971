//! The daemon's view of disk images: it resolves each disk's backing chain
//! itself (as libvirt does) and hands the VMM the whole chain, so no VMM
//! opens a file by a name found inside an image; and it refuses to start a
//! domain whose disks another running domain would write underneath it.

pub mod pools;
mod requests;
pub mod volumes;

pub use pools::{PoolBrief, Pools, StorageError};
pub use volumes::VolumeBrief;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rvirt_block::{BackingPolicy, Format};
use rvirt_domain::{DomainXml, ImageFormat};

/// One backing chain per disk, top first, as the VMM receives it.
pub type Chains = Vec<Vec<(PathBuf, ImageFormat)>>;

/// The image library's name for a definition's disk format.
pub fn block_format(f: ImageFormat) -> Format {
    match f {
        ImageFormat::Raw => Format::Raw,
        ImageFormat::Qcow2 => Format::Qcow2,
    }
}

/// A definition's name for the image library's format.
pub(crate) fn domain_format(f: Format) -> ImageFormat {
    match f {
        Format::Raw => ImageFormat::Raw,
        Format::Qcow2 => ImageFormat::Qcow2,
    }
}

/// The backing chains of `def`'s disks, read from the qcow2 headers. A disk
/// without a format is raw and has none (its bytes are the guest's); every
/// backing file's format must be recorded by the image above it.
pub fn resolve_chains(def: &DomainXml) -> Result<Chains, String> {
    def.disks
        .iter()
        .map(|d| {
            // A CD-ROM drive without a disc has no file.
            if d.path.as_os_str().is_empty() {
                return Ok(Vec::new());
            }
            let fmt = block_format(d.format.unwrap_or(ImageFormat::Raw));
            let chain = rvirt_block::backing_chain(&d.path, fmt, &BackingPolicy::RecordedFormat)
                .map_err(|e| format!("disk {} ({}): {e}", d.target, d.path.display()))?;
            Ok(chain.into_iter().map(|l| (l.path, domain_format(l.format))).collect())
        })
        .collect()
}

/// A file a domain's disk uses.
struct FileUse {
    id: (u64, u64),
    path: PathBuf,
    target: String,
    writable: bool,
    shareable: bool,
    backing: bool,
}

fn uses(def: &DomainXml, chains: &Chains) -> Vec<FileUse> {
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let mut out = Vec::new();
    for (i, d) in def.disks.iter().enumerate() {
        if let Some(top) = id(&d.path) {
            out.push(FileUse { id: top, path: d.path.clone(), target: d.target.clone(), writable: !d.readonly, shareable: d.shareable, backing: false });
        }
        for (p, _) in chains.get(i).map(Vec::as_slice).unwrap_or_default() {
            if let Some(b) = id(p) {
                out.push(FileUse { id: b, path: p.clone(), target: d.target.clone(), writable: false, shareable: d.shareable, backing: true });
            }
        }
    }
    out
}

/// Refuses to start `name` (`def`, with `chains`) when a file one of its
/// disks uses is also used by a running domain in `running` (name,
/// definition, the chains it started with), and either of them writes it,
/// unless both declare the disk `<shareable/>`.
pub fn check_disk_conflicts<'a>(
    name: &str,
    def: &DomainXml,
    chains: &Chains,
    running: impl Iterator<Item = (&'a str, &'a DomainXml, &'a Chains)>,
) -> Result<(), String> {
    let mine = uses(def, chains);
    if mine.is_empty() {
        return Ok(());
    }
    for (other, odef, ochains) in running {
        for theirs in uses(odef, ochains) {
            for m in mine.iter().filter(|m| m.id == theirs.id) {
                if !(m.writable || theirs.writable) || (m.shareable && theirs.shareable) {
                    continue;
                }
                let role = |u: &FileUse| if u.backing { format!("backing file of its disk {}", u.target) } else { format!("its disk {}", u.target) };
                return Err(format!(
                    "disk {} of domain '{name}' ({}) is in use by running domain '{other}' as {} ({}); \
                     two domains may share a writable disk only if both mark it <shareable/>",
                    m.target,
                    m.path.display(),
                    role(&theirs),
                    theirs.path.display()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(name: &str, disks: &str) -> DomainXml {
        DomainXml::parse(&format!(
            "<domain type='kvm'><name>{name}</name><memory>65536</memory><os><kernel>/k</kernel></os><devices>{disks}</devices></domain>"
        ))
        .unwrap()
    }

    fn disk(path: &Path, extra: &str) -> String {
        format!("<disk type='file' device='disk'><source file='{}'/><target dev='vda'/>{extra}</disk>", path.display())
    }

    #[test]
    fn writers_conflict_unless_both_share_and_readers_do_not() {
        let dir = std::env::temp_dir().join(format!("rvirtd-storage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("one.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        let a = domain("a", &disk(&img, ""));
        let b = domain("b", &disk(&img, ""));
        let none: Chains = vec![Vec::new()];
        let e = check_disk_conflicts("b", &b, &resolve_chains(&b).unwrap(), [("a", &a, &none)].into_iter()).unwrap_err();
        assert!(e.contains("domain 'b'") && e.contains("running domain 'a'") && e.contains("one.img"), "{e}");
        let (ra, rb) = (domain("a", &disk(&img, "<readonly/>")), domain("b", &disk(&img, "<readonly/>")));
        check_disk_conflicts("b", &rb, &resolve_chains(&rb).unwrap(), [("a", &ra, &none)].into_iter()).unwrap();
        assert!(check_disk_conflicts("b", &b, &resolve_chains(&b).unwrap(), [("a", &ra, &none)].into_iter()).is_err(), "a writer under a reader");
        let (sa, sb) = (domain("a", &disk(&img, "<shareable/>")), domain("b", &disk(&img, "<shareable/>")));
        check_disk_conflicts("b", &sb, &resolve_chains(&sb).unwrap(), [("a", &sa, &none)].into_iter()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
