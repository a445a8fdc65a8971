//! The files and taps rvirtd opens for a domain's VMM and hands it as
//! descriptors, so the VMM (jailed, unprivileged) opens nothing by name:
//! each file is opened here, judged by the path policy by where its
//! descriptor really leads (a symlink swapped in after the check gains
//! nothing), and passed with `--pass-fd N=PATH`; taps are created and
//! attached here and passed with `--net ...,fd=N`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rvirt_block::file::{open_checked, Kind};
use rvirt_domain::{CharDevice, DomainXml, ImageFormat, InterfaceKind};

use crate::policy::Policy;

/// How a file is handed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// Read only: kernels, initramfs, firmware, discs, read-only disks, backing files.
    Read,
    /// Read and written in place: writable disks.
    ReadWrite,
    /// Appended to, created when missing: console logs.
    Log,
}

/// Descriptors opened for one VMM, alive until it has been started.
#[derive(Debug, Default)]
pub struct Handoff {
    files: Vec<(PathBuf, File)>,
    taps: Vec<OwnedFd>,
}

impl Handoff {
    /// Opens every file `def` names (with the backing `chains` rvirtd
    /// resolved) and every tap in `taps`, checking each file against
    /// `policy`. The error names the file and why.
    pub fn open(def: &DomainXml, chains: &[Vec<(PathBuf, ImageFormat)>], taps: &[String], policy: &Policy) -> Result<Self, String> {
        // One descriptor per file, with the widest use any device makes of it.
        let mut want: BTreeMap<PathBuf, (String, Use)> = BTreeMap::new();
        let mut add = |what: String, path: &Path, u: Use| {
            let e = want.entry(path.to_path_buf()).or_insert((what, u));
            if u != Use::Read {
                e.1 = u;
            }
        };
        if let Some(k) = &def.kernel {
            add("kernel".into(), k, Use::Read);
            if let Some(i) = &def.initrd {
                add("initrd".into(), i, Use::Read);
            }
        } else {
            let fw = def.firmware.loader.clone().unwrap_or_else(|| PathBuf::from(rvirt_api::DEFAULT_FIRMWARE));
            add("firmware".into(), &fw, Use::Read);
        }
        for (i, d) in def.disks.iter().enumerate().filter(|(_, d)| !d.path.as_os_str().is_empty()) {
            let u = if d.readonly || d.cdrom { Use::Read } else { Use::ReadWrite };
            add(format!("disk ({})", d.target), &d.path, u);
            for (layer, _) in chains.get(i).map(Vec::as_slice).unwrap_or_default() {
                add(format!("backing file of disk ({})", d.target), layer, Use::Read);
            }
        }
        for c in [&def.serial, &def.virtio_console].into_iter().flatten() {
            if let CharDevice::File(p) = c {
                add("console log".into(), p, Use::Log);
            }
        }
        let mut h = Handoff::default();
        for (path, (what, u)) in want {
            let file = open_for(&path, u).map_err(|e| format!("{what} {}: {e}", path.display()))?;
            policy.check_opened(&what, &path, &file, u != Use::Read, u == Use::Log)?;
            h.files.push((path, file));
        }
        // Macvtaps outlive their descriptors: those made here are undone on failure.
        let mut made: Vec<&str> = Vec::new();
        for (n, name) in taps.iter().enumerate() {
            let fd = match def.interfaces.get(n).map(|i| (&i.kind, i.mac.as_deref())) {
                Some((InterfaceKind::Direct { dev, mode }, mac)) => match mac {
                    Some(mac) => crate::network::macvtap::create_and_open(dev, name, mac, mode).inspect(|_| made.push(name)),
                    None => Err(format!("direct interface on '{dev}' has no MAC address (rvirtd gives one at define)")),
                },
                _ => rvirt_tap::open_device(name).map_err(|e| e.to_string()),
            };
            match fd {
                Ok(fd) => h.taps.push(fd),
                Err(e) => {
                    crate::network::macvtap::remove(&made);
                    return Err(e);
                }
            }
        }
        Ok(h)
    }

    /// Adds a file rvirtd opened itself (a saved VM to continue), passed
    /// under the name `path`.
    pub fn add_file(&mut self, path: PathBuf, file: File) {
        self.files.push((path, file));
    }

    /// The `--pass-fd` options naming each file's descriptor, and
    /// `--only-passed-files`.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["--only-passed-files".to_string()];
        for (path, f) in &self.files {
            a.extend(["--pass-fd".into(), format!("{}={}", f.as_raw_fd(), path.to_string_lossy())]);
        }
        a
    }

    /// Each tap's descriptor, in the order of the taps given to [`Handoff::open`].
    pub fn tap_fds(&self) -> Vec<RawFd> {
        self.taps.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Every descriptor the VMM must inherit.
    pub fn inherited(&self) -> Vec<RawFd> {
        self.files.iter().map(|(_, f)| f.as_raw_fd()).chain(self.tap_fds()).collect()
    }
}

/// Opens `path` for `u` without blocking or following a FIFO's lead, of a
/// kind a VMM accepts (a log: a regular file, never through a symlink).
fn open_for(path: &Path, u: Use) -> std::io::Result<File> {
    match u {
        Use::Read => open_checked(path, false, Kind::RegularOrBlock, 0),
        Use::ReadWrite => open_checked(path, true, Kind::RegularOrBlock, 0),
        Use::Log => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
                .open(path)?;
            rvirt_block::file::check_kind(&f, Kind::Regular)?;
            Ok(f)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch() -> PathBuf {
        let d = std::env::temp_dir().join(format!("rvirt-handoff-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("images")).unwrap();
        std::fs::canonicalize(&d).unwrap()
    }

    fn def(kernel: &Path, disk: &Path, serial: &Path) -> DomainXml {
        DomainXml::parse(&format!(
            "<domain type='kvm'><name>h</name><memory unit='MiB'>64</memory><os><type>hvm</type><kernel>{}</kernel></os><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda'/></disk>\
             <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb'/><readonly/></disk>\
             <serial type='file'><source path='{}'/></serial><console type='file'><source path='{}'/><target type='virtio'/></console>\
             </devices></domain>",
            kernel.display(),
            disk.display(),
            disk.display(),
            serial.display(),
            serial.display()
        ))
        .unwrap()
    }

    #[test]
    fn each_file_is_opened_once_for_its_widest_use_and_judged_by_where_it_leads() {
        let d = scratch();
        let (kernel, disk, serial) = (d.join("images/k"), d.join("images/disk.raw"), d.join("images/serial.log"));
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let policy = Policy::new(&[d.join("images")], &[], None);
        let h = Handoff::open(&def(&kernel, &disk, &serial), &[], &[], &policy).unwrap();
        // The same disk twice (once read-only) and the same log for two consoles: one descriptor each.
        assert_eq!(h.files.len(), 3, "{h:?}");
        let args = h.args().join(" ");
        assert!(args.starts_with("--only-passed-files"), "{args}");
        for (path, f) in &h.files {
            assert!(args.contains(&format!("--pass-fd {}={}", f.as_raw_fd(), path.display())), "{args}");
            // SAFETY: F_GETFL on a descriptor the handoff owns.
            let mode = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) } & libc::O_ACCMODE;
            let want = if *path == kernel { libc::O_RDONLY } else if *path == disk { libc::O_RDWR } else { libc::O_WRONLY };
            assert_eq!(mode, want, "{}", path.display());
        }
        assert_eq!(h.inherited().len(), 3);
        // The console log was created by the daemon, for root only.
        assert_eq!(std::fs::metadata(&serial).unwrap().permissions().mode() & 0o777, 0o600);

        // A symlink in the allowed directory leading out of it is refused, by where it leads.
        let evil = d.join("images/evil.raw");
        std::os::unix::fs::symlink("/etc/passwd", &evil).unwrap();
        let e = Handoff::open(&def(&kernel, &evil, &serial), &[], &[], &policy).unwrap_err();
        assert!(e.contains("(which is /etc/passwd) is outside"), "{e}");
        // A console log is never created through a symlink.
        let evil_log = d.join("images/evil.log");
        std::os::unix::fs::symlink(d.join("elsewhere.log"), &evil_log).unwrap();
        let e = Handoff::open(&def(&kernel, &disk, &evil_log), &[], &[], &policy).unwrap_err();
        assert!(e.contains("console log") && !d.join("elsewhere.log").exists(), "{e}");
        // A descriptor judged after the file was swapped: the policy sees the file it holds.
        let outside = d.join("outside.raw");
        std::fs::write(&outside, b"").unwrap();
        let f = File::open(&outside).unwrap();
        let e = policy.check_opened("disk (vda)", &disk, &f, true, false).unwrap_err();
        assert!(e.contains(&format!("(which is {})", outside.display())), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
