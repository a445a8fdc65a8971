//! Saved domains: `save` / `restore` (a file the user names) and
//! `managedsave` (rvirtd's own file, continued by the next `start`).
//!
//! A save is the VMM's one-file snapshot (`rvirt_api::saved`) written into
//! a descriptor rvirtd opened (the jailed VMM opens nothing), with the
//! domain's live XML and whether it was paused as the note. The guest is
//! paused for it and never runs again in that VMM: the disks stay as the
//! memory knows them. A restore passes the file back as a descriptor.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use rvirt_api::Request as VmmRequest;
use rvirt_domain::protocol::DomainState;

use super::{lock, parse_checked, vmm_call_with_fd, Manager};
use crate::events::StopReason;

/// How long a save may take (writing guest RAM to disk).
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);

/// What rvirtd keeps in a saved VM's note.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SavedNote {
    /// The domain's live definition.
    pub xml: String,
    /// Whether it continues paused.
    pub paused: bool,
}

/// A saved VM a VMM is to continue.
pub(super) struct RestoreFrom {
    /// The name it is passed under.
    pub path: PathBuf,
    /// The file, open for reading.
    pub file: File,
    /// Read the memory at once rather than map it (a file the user owns
    /// and may change while the guest runs from it).
    pub copy_memory: bool,
    /// The vCPUs wait for `resume`.
    pub paused: bool,
}

/// Opens a saved VM and reads its note.
pub(super) fn open_saved(path: &Path) -> Result<(File, SavedNote), String> {
    let file = rvirt_block::file::open_checked(path, false, rvirt_block::file::Kind::Regular, 0).map_err(|e| format!("{}: {e}", path.display()))?;
    let layout = rvirt_api::saved::Layout::read(&file).map_err(|e| format!("{}: {e}", path.display()))?;
    let note = layout.read_note(&file).map_err(|e| format!("{}: {e}", path.display()))?;
    let note: SavedNote = serde_json::from_str(&note).map_err(|e| format!("{}: not saved by rvirtd ({e})", path.display()))?;
    Ok((file, note))
}

/// Creates `path` for a VMM to write a saved VM into: a new file, mode
/// 0600, never through a symlink; the caller renames it into place.
pub(super) fn create_saved(path: &Path) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A temporary name beside `path` (a dot file: ignored if left behind).
pub(super) fn temporary_beside(path: &Path) -> Result<PathBuf, String> {
    let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
        return Err(format!("{}: not a file name", path.display()));
    };
    Ok(dir.join(format!(".{}.{}.tmp", file.to_string_lossy(), std::process::id())))
}

impl Manager {
    /// Asks the VMM at `socket` to write the domain into `file` (and take
    /// the disks' internal snapshot `disk_snapshot`); `resume`: the guest
    /// runs on (a snapshot) or stays paused (a save).
    pub(super) fn write_saved(&self, socket: &Path, file: &File, note: &SavedNote, resume: bool, disk_snapshot: Option<&str>) -> Result<rvirt_api::SnapshotInfo, String> {
        use std::os::fd::AsFd;
        let note = serde_json::to_string(note).map_err(|e| e.to_string())?;
        let req = VmmRequest::Snapshot { path: PathBuf::from("saved"), resume, fd: true, note: Some(note), disk_snapshot: disk_snapshot.map(str::to_string) };
        let r = vmm_call_with_fd(socket, &req, Some(file.as_fd()), SAVE_TIMEOUT)?;
        r.snapshot.ok_or_else(|| "the VMM did not say what it wrote".to_string())
    }

    /// The running domain `key`'s name, control socket and note.
    fn saved_note_of(&self, key: &str, running: bool, paused: bool) -> Result<(String, PathBuf, SavedNote), String> {
        let g = lock(&self.inner);
        let name = g.find(key)?;
        let d = &g.domains[&name];
        let Some(run) = d.run.as_ref() else { return Err(format!("domain '{name}' is not running")) };
        let paused = if running || paused { paused } else { d.state == DomainState::Paused };
        Ok((name.clone(), run.record.api_socket.clone(), SavedNote { xml: run.def.to_xml(), paused }))
    }

    /// `save`: the running domain `key` into `path`, then stopped.
    pub fn save(&self, key: &str, path: &Path, running: bool, paused: bool) -> Result<String, String> {
        let _one = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !path.is_absolute() {
            return Err(format!("'{}' must be an absolute path (rvirtd does not share your working directory)", path.display()));
        }
        let (name, socket, note) = self.saved_note_of(key, running, paused)?;
        let dir = path.parent().ok_or("the save file needs a directory")?;
        self.policy.check("save file's directory", dir, true)?;
        if std::fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
            return Err(format!("{} exists and is not a regular file", path.display()));
        }
        self.save_and_stop(&name, &socket, &note, path)
    }

    /// Has the VMM at `socket` write domain `name` into `path` (under a
    /// temporary name, renamed once whole) and ends it; on failure the
    /// guest runs on as it was.
    fn save_and_stop(&self, name: &str, socket: &Path, note: &SavedNote, path: &Path) -> Result<String, String> {
        let tmp = temporary_beside(path)?;
        let _ = std::fs::remove_file(&tmp);
        let file = create_saved(&tmp)?;
        let result = self.write_saved(socket, &file, note, false, None).and_then(|_| crate::store::rename_durable(&tmp, path).map_err(|e| format!("{}: {e}", path.display())));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            if !note.paused {
                let _ = vmm_call_with_fd(socket, &VmmRequest::Resume, None, Duration::from_secs(10));
            }
            return Err(format!("saving domain '{name}': {e}"));
        }
        self.end_run(name, StopReason::Saved)
    }

    /// `managedsave`: as `save`, into rvirtd's own file for the domain.
    pub fn managed_save(&self, key: &str, running: bool, paused: bool) -> Result<String, String> {
        let _one = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (name, socket, note) = self.saved_note_of(key, running, paused)?;
        {
            let g = lock(&self.inner);
            if !g.domains[&name].persistent {
                return Err(format!("domain '{name}' is transient: a managed save needs a definition to start again (use save FILE)"));
            }
        }
        self.save_and_stop(&name, &socket, &note, &self.store.managed_save(&name))
    }

    /// `managedsave-remove`.
    pub fn managed_save_remove(&self, key: &str) -> Result<String, String> {
        let name = lock(&self.inner).find(key)?;
        match std::fs::remove_file(self.store.managed_save(&name)) {
            Ok(()) => Ok(name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!("domain '{name}' has no managed save")),
            Err(e) => Err(format!("removing domain '{name}''s managed save: {e}")),
        }
    }

    /// `start` of a domain with a managed save: continues it (the file is
    /// removed once the guest runs again, as libvirt does).
    pub(super) fn start_managed_save(&self, name: &str) -> Result<String, String> {
        let path = self.store.managed_save(name);
        let (file, note) = open_saved(&path)?;
        let def = parse_checked(&note.xml).map_err(|e| format!("the managed save's definition: {e}"))?;
        // Rvirtd's own file, which nobody changes: mapped, so the guest starts at once.
        self.start_restored(name, def, RestoreFrom { path: path.clone(), file, copy_memory: false, paused: note.paused }, "restored")?;
        let _ = std::fs::remove_file(&path);
        Ok(name.to_string())
    }

    /// `restore`: the domain saved in `path` runs again (defined if it was,
    /// else transient).
    pub fn restore(&self, path: &Path, running: bool, paused: bool) -> Result<String, String> {
        let _one = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !path.is_absolute() {
            return Err(format!("'{}' must be an absolute path (rvirtd does not share your working directory)", path.display()));
        }
        self.policy.check("save file", path, false)?;
        let (file, note) = open_saved(path)?;
        let def = parse_checked(&note.xml).map_err(|e| format!("the saved definition: {e}"))?;
        let name = def.name.clone();
        {
            let g = lock(&self.inner);
            if let Some(d) = g.domains.get(&name) {
                if d.def.uuid != def.uuid {
                    return Err(format!("a domain called '{name}' with another UUID exists"));
                }
            } else if let Some((other, _)) = g.domains.iter().find(|(_, d)| d.def.uuid == def.uuid) {
                return Err(format!("domain '{other}' has the saved domain's UUID"));
            }
        }
        let paused = if running || paused { paused } else { note.paused };
        // The user's file: read into fresh RAM, so changing it later cannot reach the guest.
        self.start_restored(&name, def, RestoreFrom { path: path.to_path_buf(), file, copy_memory: true, paused }, "restored")?;
        Ok(name)
    }

    /// The domain XML kept in the saved VM at `path` (`save-image-dumpxml`).
    pub fn saved_xml(&self, path: &Path) -> Result<String, String> {
        self.policy.check("save file", path, false)?;
        Ok(open_saved(path)?.1.xml)
    }

    /// Starts a VMM continuing `from` for domain `name` with definition
    /// `def` (its live one; a stored one stays as it is), paused or
    /// running as `from` says.
    pub(super) fn start_restored(&self, name: &str, def: rvirt_domain::DomainXml, from: RestoreFrom, reason: &str) -> Result<(), String> {
        let paused = from.paused;
        let (socket, offset) = {
            let mut g = lock(&self.inner);
            if g.domains.get(name).is_some_and(|d| d.state.is_active()) {
                return Err(format!("domain '{name}' is already running"));
            }
            let started = self.spawn_with(&mut g, name, def, Some(from))?;
            if let Some(d) = g.domains.get_mut(name) {
                d.reason = reason.into();
                if let Some(r) = d.run.as_mut().filter(|_| paused) {
                    d.state = DomainState::Paused;
                    r.record.paused = true;
                    let _ = self.store.save_run(name, &r.record);
                }
            }
            started
        };
        self.finish_start(name, &socket, offset)
    }

    /// The snapshot, save and restore requests.
    pub(super) fn handle_saved_state(&self, req: rvirt_domain::protocol::Request) -> rvirt_domain::protocol::Response {
        use rvirt_domain::protocol::{Request, Response};
        let done = |r: Result<String, String>| match r {
            Ok(n) => Response::done(&n),
            Err(e) => Response::error(e),
        };
        match req {
            Request::Save { domain, path, running, paused } => done(self.save(&domain, &path, running, paused)),
            Request::Restore { path, running, paused } => done(self.restore(&path, running, paused)),
            Request::ManagedSave { domain, running, paused } => done(self.managed_save(&domain, running, paused)),
            Request::ManagedSaveRemove { domain } => done(self.managed_save_remove(&domain)),
            other => self.handle_snapshot(other),
        }
    }
}
