//! The daemon's state directory: definitions, autostart marks, records of
//! running domains and VMM logs. Every file is written atomically (a
//! temporary file, fsync, rename, fsync of the directory), so a crash leaves
//! either the old or the new version, never half of one.
//!
//! ```text
//! DIR/domains/NAME.xml    persistent definitions
//! DIR/autostart/NAME      present: start NAME with the daemon
//! DIR/run/NAME.json       a running domain: VMM pid, socket, live XML
//! DIR/run/ID.sock         that VMM's control socket
//! DIR/log/NAME.log        that VMM's output, appended across starts
//! DIR/networks/NAME.xml   persistent network definitions
//! DIR/networks/autostart/NAME   present: start network NAME with the daemon
//! DIR/networks/run/       a running network's dnsmasq files
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Size past which a domain's log is rotated when its VMM starts.
pub const LOG_ROTATE_BYTES: u64 = 32 << 20;

/// Paths inside the state directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

/// What the daemon remembers about a running domain, so that a restarted
/// daemon finds its VMM again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The domain's id.
    pub id: u32,
    /// The VMM's pid.
    pub pid: u32,
    /// The VMM's start time in clock ticks since boot (`/proc/PID/stat`),
    /// so a recycled pid is not mistaken for it.
    pub start_ticks: u64,
    /// The VMM's control socket.
    pub api_socket: PathBuf,
    /// Where this run's output starts in the domain's log.
    pub log_offset: u64,
    /// The XML the domain was started with.
    pub xml: String,
    /// False for `create`d domains, which vanish when they stop.
    pub persistent: bool,
    /// Taps the VMM uses, one per interface.
    pub taps: Vec<String>,
    /// Paused by `suspend`.
    pub paused: bool,
    /// `reboot` asked the guest to power off: start it again when it does.
    pub reboot_pending: bool,
    /// The serial console's pty, once the VMM reported it.
    pub serial_pty: Option<String>,
}

/// Creates (`on`) or removes the empty marker file `p`.
fn mark(p: &Path, on: bool) -> Result<()> {
    if on {
        write_atomic(p, b"").with_context(|| format!("writing {}", p.display()))
    } else {
        match fs::remove_file(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("removing {}", p.display())),
            _ => Ok(()),
        }
    }
}

/// What the state directory remembers of a storage pool beside its definition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMark {
    /// It starts with the daemon.
    Autostart,
    /// It was active: a restarted daemon keeps it so.
    Active,
}

impl PoolMark {
    fn dir(self) -> &'static str {
        match self {
            Self::Autostart => "pools/autostart",
            Self::Active => "pools/active",
        }
    }
}

/// Writes `bytes` to `path` atomically. The temporary file is created new
/// (`O_EXCL`, which also refuses a symlink planted in its place), mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("file"), std::process::id()));
    // A leftover of a crashed write (or anything planted there) goes first; a symlink is removed, not followed.
    let _ = fs::remove_file(&tmp);
    {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

/// Renames `from` (a file already synced) to `to` and syncs the directory:
/// once this returns, a crash leaves the new file in place.
pub fn rename_durable(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::rename(from, to)?;
    File::open(to.parent().unwrap_or(Path::new(".")))?.sync_all()
}

impl Store {
    /// Opens (creating, mode 0700) the state directory at `root`. A
    /// directory (or subdirectory) that is a symlink, belongs to another
    /// user or is writable by group or others is refused: whoever can write
    /// there can plant a symlink and have the daemon, as root, write through it.
    pub fn open(root: &Path) -> Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let check = |d: &Path| -> Result<()> {
            let m = fs::symlink_metadata(d).with_context(|| format!("state directory {}", d.display()))?;
            if m.file_type().is_symlink() || !m.is_dir() {
                anyhow::bail!("state directory {} is not a directory (a symlink or a file): refusing it", d.display());
            }
            if m.uid() != me {
                anyhow::bail!("state directory {} belongs to uid {}, not to rvirtd's user (uid {me}): refusing it", d.display(), m.uid());
            }
            if m.mode() & 0o022 != 0 {
                anyhow::bail!("state directory {} is writable by group or others (mode {:o}): refusing it", d.display(), m.mode() & 0o7777);
            }
            Ok(())
        };
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        if fs::symlink_metadata(root).is_err() {
            builder.create(root).with_context(|| format!("creating {}", root.display()))?;
        }
        check(root)?;
        for sub in ["domains", "autostart", "run", "log", "networks", "networks/autostart", "networks/run", "snapshots", "save", "pools", "pools/autostart", "pools/active"] {
            let d = root.join(sub);
            if fs::symlink_metadata(&d).is_err() {
                builder.create(&d).with_context(|| format!("creating {}", d.display()))?;
            }
            check(&d)?;
        }
        use std::os::unix::fs::PermissionsExt;
        // Definitions name disk images and kernels: not for everyone's eyes
        // (their directories stay 0700). The way to networks/run is only
        // passable (0711, nothing listable): dnsmasq, once it drops root,
        // re-reads its hosts files there on SIGHUP.
        for (d, mode) in [(root.to_path_buf(), 0o711), (root.join("networks"), 0o711), (root.join("networks/run"), 0o711)] {
            let _ = fs::set_permissions(&d, fs::Permissions::from_mode(mode));
        }
        Ok(Self { root: root.to_path_buf() })
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn run_record(&self, name: &str) -> PathBuf {
        self.root.join("run").join(format!("{name}.json"))
    }

    /// Where domain `name`'s managed save is kept (`managedsave`).
    pub fn managed_save(&self, name: &str) -> PathBuf {
        self.root.join("save").join(format!("{name}.save"))
    }

    /// The directory of every domain's snapshots.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// The VMM control socket for domain id `id`.
    pub fn api_socket(&self, id: u32) -> PathBuf {
        self.root.join("run").join(format!("{id}.sock"))
    }

    /// The VM configuration rvirtd wrote for run `id`'s VMM (`--config`).
    pub fn vm_config(&self, id: u32) -> PathBuf {
        self.root.join("run").join(format!("{id}.json"))
    }

    /// The directory each jailed VMM mounts its empty root over (in its own
    /// mount namespace; it stays empty here).
    pub fn jail_dir(&self) -> PathBuf {
        self.root.join("jail")
    }

    /// The log of domain `name`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.root.join("log").join(format!("{name}.log"))
    }

    /// Before a VMM starts: a log past [`LOG_ROTATE_BYTES`] becomes
    /// `NAME.log.1` (replacing the previous one) and the run starts a new
    /// file. With each run's own output capped by the VMM, a domain's logs
    /// stay bounded however often its guest floods them or restarts.
    pub fn rotate_log(&self, name: &str) {
        let log = self.log(name);
        if fs::symlink_metadata(&log).is_ok_and(|m| m.is_file() && m.len() > LOG_ROTATE_BYTES) {
            let _ = fs::rename(&log, log.with_extension("log.1"));
        }
    }

    /// Stored definitions: (file stem, XML text), or why a file could not be read.
    pub fn definitions(&self) -> Vec<(String, std::io::Result<String>)> {
        self.xml_files("domains")
    }

    fn list(&self, sub: &str, suffix: &str) -> Vec<String> {
        let Ok(rd) = fs::read_dir(self.root.join(sub)) else { return Vec::new() };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .filter_map(|n| n.strip_suffix(suffix).map(str::to_string).or_else(|| suffix.is_empty().then_some(n)))
            .collect();
        names.sort();
        names
    }

    /// Stores a definition.
    pub fn save_definition(&self, name: &str, xml: &str) -> Result<()> {
        self.save_xml("domains", name, xml)
    }

    /// Forgets a definition and its autostart mark.
    pub fn remove_definition(&self, name: &str) -> Result<()> {
        self.remove_xml("domains", name)?;
        let _ = self.set_autostart(name, false);
        File::open(self.root.join("domains")).and_then(|d| d.sync_all()).ok();
        Ok(())
    }

    /// Whether `name` starts with the daemon.
    pub fn autostart(&self, name: &str) -> bool {
        self.root.join("autostart").join(name).exists()
    }

    /// Marks or unmarks `name` for autostart.
    pub fn set_autostart(&self, name: &str, on: bool) -> Result<()> {
        mark(&self.root.join("autostart").join(name), on)
    }

    /// Stored network definitions: (file stem, XML text), or why a file could not be read.
    pub fn network_definitions(&self) -> Vec<(String, std::io::Result<String>)> {
        self.xml_files("networks")
    }

    /// Stores a network definition.
    pub fn save_network(&self, name: &str, xml: &str) -> Result<()> {
        self.save_xml("networks", name, xml)
    }

    /// Forgets a network definition and its autostart mark.
    pub fn remove_network(&self, name: &str) -> Result<()> {
        self.remove_xml("networks", name)?;
        let _ = self.set_network_autostart(name, false);
        Ok(())
    }

    /// Whether network `name` starts with the daemon.
    pub fn network_autostart(&self, name: &str) -> bool {
        self.root.join("networks/autostart").join(name).exists()
    }

    /// Marks or unmarks network `name` for autostart.
    pub fn set_network_autostart(&self, name: &str, on: bool) -> Result<()> {
        mark(&self.root.join("networks/autostart").join(name), on)
    }

    /// Stored storage pool definitions: (file stem, XML text), or why a file could not be read.
    pub fn pool_definitions(&self) -> Vec<(String, std::io::Result<String>)> {
        self.xml_files("pools")
    }

    /// Stores a storage pool definition.
    pub fn save_pool(&self, name: &str, xml: &str) -> Result<()> {
        self.save_xml("pools", name, xml)
    }

    /// Forgets a storage pool definition and its autostart mark.
    pub fn remove_pool(&self, name: &str) -> Result<()> {
        self.remove_xml("pools", name)?;
        self.set_pool_mark(name, PoolMark::Autostart, false)
    }

    /// The `NAME.xml` files of subdirectory `sub`: (NAME, text or why it could not be read).
    fn xml_files(&self, sub: &str) -> Vec<(String, std::io::Result<String>)> {
        self.list(sub, ".xml").into_iter().map(|name| {
            let text = fs::read_to_string(self.root.join(sub).join(format!("{name}.xml")));
            (name, text)
        }).collect()
    }

    /// Writes `sub/NAME.xml` atomically.
    fn save_xml(&self, sub: &str, name: &str, xml: &str) -> Result<()> {
        let p = self.root.join(sub).join(format!("{name}.xml"));
        write_atomic(&p, xml.as_bytes()).with_context(|| format!("writing {}", p.display()))
    }

    /// Removes `sub/NAME.xml`.
    fn remove_xml(&self, sub: &str, name: &str) -> Result<()> {
        let p = self.root.join(sub).join(format!("{name}.xml"));
        fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
    }

    /// Whether storage pool `name` carries mark `which`.
    pub fn pool_mark(&self, name: &str, which: PoolMark) -> bool {
        self.root.join(which.dir()).join(name).exists()
    }

    /// Sets or clears storage pool `name`'s mark `which`.
    pub fn set_pool_mark(&self, name: &str, which: PoolMark, on: bool) -> Result<()> {
        mark(&self.root.join(which.dir()).join(name), on)
    }

    /// Where running networks keep dnsmasq's files.
    pub fn network_run_dir(&self) -> PathBuf {
        self.root.join("networks/run")
    }

    /// Records of domains that were running: (name, record or why unreadable).
    pub fn run_records(&self) -> Vec<(String, Result<RunRecord>)> {
        self.list("run", ".json")
            .into_iter()
            .map(|name| {
                let p = self.run_record(&name);
                let r = fs::read(&p)
                    .with_context(|| format!("reading {}", p.display()))
                    .and_then(|b| serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display())));
                (name, r)
            })
            .collect()
    }

    /// Stores the record of a running domain.
    pub fn save_run(&self, name: &str, r: &RunRecord) -> Result<()> {
        let p = self.run_record(name);
        let bytes = serde_json::to_vec_pretty(r)?;
        write_atomic(&p, &bytes).with_context(|| format!("writing {}", p.display()))
    }

    /// Forgets a run record, its socket and its VM configuration.
    pub fn remove_run(&self, name: &str, r: &RunRecord) {
        let _ = fs::remove_file(self.run_record(name));
        let _ = fs::remove_file(&r.api_socket);
        let _ = fs::remove_file(self.vm_config(r.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty scratch directory for one test.
    fn fresh_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("rvirtd-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn writes_are_atomic_and_listings_skip_temporaries() {
        let dir = fresh_dir("store");
        let s = Store::open(&dir).unwrap();
        s.save_definition("a", "<domain/>").unwrap();
        // A temporary left by a crash mid-write is not a definition.
        fs::write(dir.join("domains/.b.xml.tmp1"), "<dom").unwrap();
        let defs = s.definitions();
        assert_eq!(defs.len(), 1);
        assert_eq!(defs[0].0, "a");
        s.set_autostart("a", true).unwrap();
        assert!(s.autostart("a"));
        s.remove_definition("a").unwrap();
        assert!(!s.autostart("a") && s.definitions().is_empty());
        let r = RunRecord {
            id: 3,
            pid: 1,
            start_ticks: 5,
            api_socket: s.api_socket(3),
            log_offset: 0,
            xml: String::new(),
            persistent: true,
            taps: vec![],
            paused: false,
            reboot_pending: false,
            serial_pty: None,
        };
        s.save_run("a", &r).unwrap();
        assert_eq!(s.run_records()[0].1.as_ref().unwrap(), &r);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_past_the_limit_is_rotated_when_a_run_starts() {
        let dir = fresh_dir("rotate");
        let s = Store::open(&dir).unwrap();
        let log = s.log("d");
        fs::write(&log, vec![b'x'; 1000]).unwrap();
        s.rotate_log("d");
        assert_eq!(fs::metadata(&log).unwrap().len(), 1000, "a small log is kept");
        let f = fs::OpenOptions::new().write(true).open(&log).unwrap();
        f.set_len(LOG_ROTATE_BYTES + 1).unwrap();
        s.rotate_log("d");
        assert!(!log.exists());
        assert_eq!(fs::metadata(dir.join("log/d.log.1")).unwrap().len(), LOG_ROTATE_BYTES + 1);
        // The previous .1 is replaced, so two files at most.
        fs::write(&log, vec![b'y'; 10]).unwrap();
        fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(LOG_ROTATE_BYTES + 2).unwrap();
        s.rotate_log("d");
        assert_eq!(fs::metadata(dir.join("log/d.log.1")).unwrap().len(), LOG_ROTATE_BYTES + 2);
        fs::remove_dir_all(&dir).unwrap();
    }
}
