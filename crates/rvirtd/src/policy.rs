//! What rvirtd lets a domain touch and how its VMM is confined: the path
//! policy (directories disks, kernels, firmware and discs may come from)
//! and the jail each VMM is started in.

use std::path::{Path, PathBuf};

use rvirt_domain::{CharDevice, DomainXml};

/// Directories whose files a domain may use in every way (disk images), when none are given.
pub const DEFAULT_ALLOW: &[&str] = &["/var/lib/rvirt/images", "/var/lib/libvirt/images"];
/// Directories whose files a domain may only read (kernels, firmware,
/// installer discs, read-only disks), when none are given.
pub const DEFAULT_ALLOW_READ_ONLY: &[&str] = &["/boot", "/usr/share/seabios", "/usr/share/qemu", "/var/lib/libvirt/boot"];
/// The first uid (and gid) of jailed VMMs: domain id N runs as base + N.
pub const DEFAULT_JAIL_UID_BASE: u32 = 1_000_000_000;

/// The daemon's rules for domains.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Canonical directories for any use.
    pub allow: Vec<PathBuf>,
    /// Canonical directories for reading only.
    pub allow_read_only: Vec<PathBuf>,
    /// Jail VMMs (rvirtd runs as root); their uids start here (`None`: keep uid 0, no capabilities).
    pub jail: Option<Option<u32>>,
}

impl Policy {
    /// A policy from the daemon's options: directories are made canonical
    /// (a symlink in a configured path is followed once, here); ones that
    /// do not exist are left out.
    pub fn new(allow: &[PathBuf], allow_read_only: &[PathBuf], jail: Option<Option<u32>>) -> Self {
        let canon = |v: &[PathBuf]| v.iter().filter_map(|p| std::fs::canonicalize(p).ok()).collect();
        Self { allow: canon(allow), allow_read_only: canon(allow_read_only), jail }
    }

    /// Whether `path`, resolved through every symlink, lies in an allowed
    /// directory (`write`: one for any use). The error names the file, the
    /// directories and the option that adds one.
    pub fn check(&self, what: &str, path: &Path, write: bool) -> Result<PathBuf, String> {
        let real = std::fs::canonicalize(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
        self.judge(what, path, real, write)
    }

    /// Whether the file open as `file` (opened for `path`) lies in an allowed
    /// directory: judged by where the descriptor really leads, so a symlink
    /// swapped in after [`Policy::check`] gains nothing. `parent`: judge its
    /// directory instead (a console log may be created there).
    pub fn check_opened(&self, what: &str, path: &Path, file: &std::fs::File, write: bool, parent: bool) -> Result<PathBuf, String> {
        use std::os::fd::AsRawFd;
        let link = format!("/proc/self/fd/{}", file.as_raw_fd());
        let real = std::fs::read_link(&link).map_err(|e| format!("{what} {}: where it leads ({link}): {e}", path.display()))?;
        if !real.is_absolute() || real.to_string_lossy().ends_with(" (deleted)") {
            return Err(format!("{what} {}: it was removed or is not a file ({})", path.display(), real.display()));
        }
        if parent {
            let dir = real.parent().unwrap_or(Path::new("/")).to_path_buf();
            return self.judge(what, path.parent().unwrap_or(path), dir, write).map(|_| real);
        }
        self.judge(what, path, real, write)
    }

    fn judge(&self, what: &str, path: &Path, real: PathBuf, write: bool) -> Result<PathBuf, String> {
        let dirs: Vec<&PathBuf> = if write { self.allow.iter().collect() } else { self.allow.iter().chain(&self.allow_read_only).collect() };
        if dirs.iter().any(|d| real.starts_with(d)) {
            return Ok(real);
        }
        let list = |v: &[&PathBuf]| if v.is_empty() { "none".to_string() } else { v.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ") };
        let shown = if real == path { path.display().to_string() } else { format!("{} (which is {})", path.display(), real.display()) };
        Err(if write {
            format!(
                "{what} {shown} is outside the directories domains may write ({}); rvirtd --allow-path DIR adds one",
                list(&self.allow.iter().collect::<Vec<_>>())
            )
        } else {
            format!("{what} {shown} is outside the directories domains may use ({}); rvirtd --allow-path DIR or --allow-path-ro DIR adds one", list(&dirs))
        })
    }

    /// Checks every file `def` names: kernel, initramfs, firmware, disks
    /// (writable ones in a directory for any use) and console log files.
    pub fn check_domain(&self, def: &DomainXml) -> Result<(), String> {
        if let Some(k) = &def.kernel {
            self.check("kernel", k, false)?;
        }
        if let Some(i) = &def.initrd {
            self.check("initrd", i, false)?;
        }
        if let Some(l) = &def.firmware.loader {
            self.check("firmware (<loader>)", l, false)?;
        }
        for d in def.disks.iter().filter(|d| !d.path.as_os_str().is_empty()) {
            self.check(&format!("disk ({})", d.target), &d.path, !(d.readonly || d.cdrom))?;
        }
        for c in [&def.serial, &def.virtio_console].into_iter().flatten() {
            if let CharDevice::File(p) = c {
                // The log need not exist yet: its directory must be one for any use.
                let dir = p.parent().unwrap_or(Path::new("/"));
                self.check("console log directory", dir, true)?;
            }
        }
        Ok(())
    }

    /// The jail of domain `id`'s VMM, under `root`, when VMMs are jailed.
    pub fn jail(&self, root: &Path, id: u32) -> Option<rvirt_api::config::JailConfig> {
        let base = self.jail?;
        let user = base.map(|b| {
            let uid = b.saturating_add(id);
            (uid, uid)
        });
        Some(rvirt_api::config::JailConfig { root: root.to_path_buf(), user })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_judged_after_resolving_symlinks() {
        let d = std::env::temp_dir().join(format!("rvirt-policy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("images")).unwrap();
        std::fs::create_dir_all(d.join("isos")).unwrap();
        std::fs::write(d.join("images/a.raw"), b"").unwrap();
        std::fs::write(d.join("isos/b.iso"), b"").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("images/evil.raw")).unwrap();
        let p = Policy::new(&[d.join("images")], &[d.join("isos")], None);
        assert!(p.check("disk", &d.join("images/a.raw"), true).is_ok());
        assert!(p.check("disk", &d.join("isos/b.iso"), false).is_ok());
        let e = p.check("disk (vda)", &d.join("isos/b.iso"), true).unwrap_err();
        assert!(e.contains("outside the directories domains may write") && e.contains("--allow-path"), "{e}");
        let e = p.check("disk (vdb)", &d.join("images/evil.raw"), false).unwrap_err();
        assert!(e.contains("which is /etc/passwd"), "{e}");
        let e = p.check("disk (vdc)", &d.join("images/../../../../etc/shadow"), false).unwrap_err();
        assert!(e.contains("outside"), "{e}");
        assert!(p.check("kernel", &d.join("missing"), false).unwrap_err().contains("No such file"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn jail_arguments_give_each_domain_its_own_uid() {
        let p = Policy::new(&[], &[], Some(Some(DEFAULT_JAIL_UID_BASE)));
        assert_eq!(p.jail(Path::new("/run/j"), 7), Some(rvirt_api::config::JailConfig { root: "/run/j".into(), user: Some((1000000007, 1000000007)) }));
        assert!(Policy::new(&[], &[], None).jail(Path::new("/j"), 1).is_none());
    }
}
