//! Domain snapshots: taking, listing, reverting and deleting them.
//!
//! An internal snapshot keeps every writable disk's state as a qcow2
//! internal snapshot named as the domain snapshot; of a running domain it
//! also keeps memory and device state (a saved VM in rvirtd's state
//! directory), taken by the VMM in the same pause as the disks'. A
//! `--disk-only` snapshot of a shut-off domain continues each disk in a
//! new qcow2 overlay. The metadata lives in [`crate::snapshots`].

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rvirt_block::Qcow2Image;
use rvirt_domain::protocol::{Request, Response, SnapshotCreateFlags, SnapshotFilter, SnapshotSummary};
use rvirt_domain::{DomainXml, ImageFormat, SnapshotDef, SnapshotDisk, SnapshotDiskKind, SnapshotState};

use super::saves::{create_saved, open_saved, RestoreFrom, SavedNote};
use super::{lock, parse_checked, vmm_call, Manager};
use crate::events::StopReason;
use crate::snapshots::Tree;

/// How long the VMM may take for a disk operation (deleting a disk
/// snapshot, flushing a disk onto an overlay).
const VMM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A domain as a snapshot sees it at one moment.
struct Moment {
    name: String,
    /// The definition in force: the live one of a running domain.
    def: DomainXml,
    /// The control socket of its VMM, while one runs it.
    socket: Option<PathBuf>,
    paused: bool,
    persistent: bool,
}

/// Reads the internal snapshot `name` of the image at `path` by name
/// (never by id), for `f` to act on with the image open read-write.
fn with_image<T>(path: &Path, f: impl FnOnce(&Qcow2Image) -> rvirt_block::Result<T>) -> Result<T, String> {
    let image = Qcow2Image::open(path, false).map_err(|e| e.to_string())?;
    f(&image).map_err(|e| format!("{}: {e}", path.display()))
}

fn snapshot_id(image: &Qcow2Image, name: &str) -> rvirt_block::Result<String> {
    image.snapshots().into_iter().find(|s| s.name == name).map(|s| s.id).ok_or_else(|| rvirt_block::Error::Request(format!("no internal snapshot named '{name}'")))
}

impl Manager {
    fn moment(&self, key: &str) -> Result<Moment, String> {
        let g = lock(&self.inner);
        let name = g.find(key)?;
        let d = &g.domains[&name];
        Ok(Moment {
            name: name.clone(),
            def: d.run.as_ref().map_or_else(|| d.def.clone(), |r| r.def.clone()),
            socket: d.run.as_ref().map(|r| r.record.api_socket.clone()),
            paused: d.state == rvirt_domain::protocol::DomainState::Paused,
            persistent: d.persistent,
        })
    }

    /// What each disk of `m` keeps in a snapshot `req` asks for.
    fn plan_disks(m: &Moment, req: &SnapshotDef, disk_only: bool, snapshot: &str) -> Result<Vec<SnapshotDisk>, String> {
        for x in &req.disks {
            if !m.def.disks.iter().any(|d| d.target == x.name) {
                return Err(format!("domain '{}' has no disk '{}'", m.name, x.name));
            }
        }
        let mut out = Vec::new();
        for d in &m.def.disks {
            let said = req.disks.iter().find(|x| x.name == d.target).map(|x| &x.kind);
            let takes_none = d.cdrom || d.readonly || d.shareable || d.path.as_os_str().is_empty();
            let kind = match said {
                Some(SnapshotDiskKind::No) => SnapshotDiskKind::No,
                Some(_) if takes_none => return Err(format!("disk '{}' is read-only, shareable or a CD-ROM: it takes no snapshot", d.target)),
                None if takes_none => SnapshotDiskKind::No,
                Some(SnapshotDiskKind::Internal) if disk_only => {
                    return Err(format!("disk '{}': a --disk-only snapshot puts every disk in an overlay; 'internal' cannot be mixed in", d.target))
                }
                Some(SnapshotDiskKind::External { file }) => SnapshotDiskKind::External { file: Some(file.clone().unwrap_or_else(|| SnapshotDef::default_overlay(&d.path, snapshot))) },
                Some(SnapshotDiskKind::Internal) | None if disk_only => SnapshotDiskKind::External { file: Some(SnapshotDef::default_overlay(&d.path, snapshot)) },
                Some(SnapshotDiskKind::Internal) | None => SnapshotDiskKind::Internal,
            };
            if kind == SnapshotDiskKind::Internal && d.format != Some(ImageFormat::Qcow2) {
                return Err(format!(
                    "disk '{}' ({}) is raw: raw images have no internal snapshots. Convert it to qcow2 (rvirt-img convert -O qcow2), take a --disk-only snapshot, or leave it out with --diskspec {},snapshot=no",
                    d.target,
                    d.path.display(),
                    d.target
                ));
            }
            if kind == SnapshotDiskKind::No && !takes_none && m.socket.is_some() && !disk_only {
                return Err(format!("disk '{}': the snapshot of a running domain keeps every writable disk with its memory", d.target));
            }
            out.push(SnapshotDisk { name: d.target.clone(), kind });
        }
        Ok(out)
    }

    /// `snapshot-create`: takes the snapshot `xml` describes (or stores the
    /// one given with `redefine`); answers its name.
    pub fn snapshot_create(&self, key: &str, xml: &str, flags: SnapshotCreateFlags) -> Result<String, String> {
        let _one = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut req = SnapshotDef::parse(xml).map_err(|e| e.to_string())?;
        let m = self.moment(key)?;
        let tree = self.snapshots.load(&m.name);
        if flags.redefine {
            return self.snapshot_redefine(&m, &tree, req, flags.current);
        }
        if req.name.is_empty() {
            req.name = now().to_string();
        }
        if tree.snaps.contains_key(&req.name) {
            return Err(format!("domain '{}' has a snapshot named '{}' already", m.name, req.name));
        }
        let disk_only = flags.disk_only || req.disks.iter().any(|d| matches!(d.kind, SnapshotDiskKind::External { .. }));
        let running = m.socket.is_some();
        if req.memory_internal == Some(true) && (!running || disk_only) {
            return Err("memory can only be kept from a running domain, and not in a --disk-only snapshot".into());
        }
        if running && !disk_only && flags.no_metadata {
            return Err("--no-metadata: a running domain's snapshot keeps its memory in rvirtd's record, which it cannot go without".into());
        }
        let disks = Self::plan_disks(&m, &req, disk_only, &req.name)?;
        if !running && disks.iter().all(|d| d.kind == SnapshotDiskKind::No) {
            return Err(format!("domain '{}' is shut off and has no writable disk: a snapshot would hold nothing", m.name));
        }
        let state = match (running, m.paused, disk_only) {
            (true, _, true) => SnapshotState::DiskSnapshot,
            (true, true, false) => SnapshotState::Paused,
            (true, false, false) => SnapshotState::Running,
            (false, _, _) => SnapshotState::ShutOff,
        };
        let snap = SnapshotDef {
            name: req.name.clone(),
            description: req.description.clone(),
            state: Some(state),
            parent: tree.current.clone(),
            creation_time: Some(now()),
            memory_internal: Some(running && !disk_only),
            disks,
            domain: Some(m.def.to_xml()),
        };
        if !flags.no_metadata {
            // The record first: a crash midway leaves a record to delete, never data without one.
            self.snapshots.save(&m.name, &snap)?;
        }
        let taken = match (&m.socket, disk_only) {
            (_, true) => self.take_overlays(&m, &snap),
            (Some(socket), false) => self.take_running(&m, socket, &snap),
            (None, false) => Self::take_internal(&snap),
        };
        if let Err(e) = taken {
            let _ = self.snapshots.remove(&m.name, &snap.name);
            return Err(format!("snapshot '{}' of domain '{}': {e}", snap.name, m.name));
        }
        if !flags.no_metadata {
            self.snapshots.set_current(&m.name, Some(&snap.name))?;
        }
        if flags.halt && running {
            self.end_run(&m.name, StopReason::Destroyed)?;
        }
        Ok(snap.name)
    }

    fn take_running(&self, m: &Moment, socket: &Path, snap: &SnapshotDef) -> Result<(), String> {
        let path = self.snapshots.memory_file(&m.name, &snap.name);
        let _ = std::fs::remove_file(&path);
        let file = create_saved(&path)?;
        let note = SavedNote { xml: m.def.to_xml(), paused: m.paused };
        self.write_saved(socket, &file, &note, true, Some(&snap.name)).map(drop).inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })
    }

    /// Internal snapshots of a shut-off domain's disks: all or none.
    fn take_internal(snap: &SnapshotDef) -> Result<(), String> {
        let def = DomainXml::parse(snap.domain.as_deref().unwrap_or_default()).map_err(|e| e.to_string())?;
        let paths: Vec<&Path> = snap.disks.iter().filter(|d| d.kind == SnapshotDiskKind::Internal).filter_map(|d| def.disks.iter().find(|x| x.target == d.name)).map(|d| d.path.as_path()).collect();
        for (i, path) in paths.iter().enumerate() {
            if let Err(e) = with_image(path, |img| img.create_snapshot(&snap.name)) {
                for done in &paths[..i] {
                    let _ = with_image(done, |img| snapshot_id(img, &snap.name).and_then(|id| img.delete_snapshot(&id)));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Makes the qcow2 overlay `overlay` over disk `d`'s image (its format
    /// recorded), of the same size; refused if the file exists or its
    /// directory is outside the path policy.
    fn make_overlay(&self, d: &rvirt_domain::VirtioDisk, overlay: &Path) -> Result<(), String> {
        if std::fs::symlink_metadata(overlay).is_ok() {
            return Err(format!("{} exists already", overlay.display()));
        }
        let dir = overlay.parent().ok_or("an overlay needs a directory")?;
        self.policy.check(&format!("overlay of disk ({})", d.target), dir, true)?;
        let format = crate::storage::block_format(d.format.unwrap_or(ImageFormat::Raw));
        let size = rvirt_block::open_with(&d.path, format, &rvirt_block::ImageOptions { locking: rvirt_block::Locking::ForceShare, ..rvirt_block::ImageOptions::read_only() })
            .map_err(|e| e.to_string())?
            .size();
        let opts = rvirt_block::qcow2::CreateOptions { backing: Some((d.path.to_string_lossy().into_owned(), format)), ..Default::default() };
        // Not opened here: a running VMM holds the image's write lock, and opens the overlay over it.
        Qcow2Image::create_unopened(overlay, size, &opts).map_err(|e| e.to_string())
    }

    /// `--disk-only`: each disk continues in a new qcow2 overlay on top of
    /// its image, which the definitions (stored and, while it runs, live)
    /// name from now on. A running domain is paused meanwhile, so every
    /// disk's image stops at the same moment, and its VMM switches.
    fn take_overlays(&self, m: &Moment, snap: &SnapshotDef) -> Result<(), String> {
        let mut def = m.def.clone();
        let mut made: Vec<PathBuf> = Vec::new();
        let pause = m.socket.as_deref().filter(|_| !m.paused);
        if let Some(socket) = pause {
            vmm_call(socket, &rvirt_api::Request::Pause, VMM_TIMEOUT)?;
        }
        let mut result = Ok(());
        for sd in &snap.disks {
            let SnapshotDiskKind::External { file: Some(overlay) } = &sd.kind else { continue };
            let Some((index, d)) = def.disks.iter_mut().enumerate().find(|(_, d)| d.target == sd.name) else { continue };
            let step = self.make_overlay(d, overlay).and_then(|()| match &m.socket {
                Some(socket) => {
                    use std::os::fd::AsFd;
                    let req = rvirt_api::Request::DiskOverlay { device: format!("disk{index}"), path: overlay.clone() };
                    let switched = rvirt_block::file::open_checked(overlay, true, rvirt_block::file::Kind::Regular, 0)
                        .map_err(|e| format!("{}: {e}", overlay.display()))
                        .and_then(|file| super::vmm_call_with_fd(socket, &req, Some(file.as_fd()), VMM_TIMEOUT).map(drop));
                    // An overlay the VMM did not take is nobody's.
                    if switched.is_err() {
                        let _ = std::fs::remove_file(overlay);
                    }
                    switched
                }
                None => {
                    made.push(overlay.clone());
                    Ok(())
                }
            });
            match step {
                Ok(()) => {
                    d.path = overlay.clone();
                    d.format = Some(ImageFormat::Qcow2);
                }
                Err(e) => {
                    result = Err(format!("disk '{}': {e}", sd.name));
                    break;
                }
            }
        }
        if let Some(socket) = pause {
            let _ = vmm_call(socket, &rvirt_api::Request::Resume, VMM_TIMEOUT);
        }
        if result.is_err() && m.socket.is_none() {
            // Nothing uses them yet.
            made.iter().for_each(|p| drop(std::fs::remove_file(p)));
            return result;
        }
        // A running domain's disks that switched stay switched: the definitions follow them.
        self.follow_overlays(m, &def)?;
        result
    }

    /// Stores `def` (the disks on their overlays) as the domain's definition
    /// and, while it runs, as its live one with its backing chains.
    fn follow_overlays(&self, m: &Moment, def: &DomainXml) -> Result<(), String> {
        let mut g = lock(&self.inner);
        let Some(d) = g.domains.get_mut(&m.name) else { return Ok(()) };
        if m.persistent {
            let mut stored = d.def.clone();
            for sd in &def.disks {
                if let Some(x) = stored.disks.iter_mut().find(|x| x.target == sd.target) {
                    (x.path, x.format) = (sd.path.clone(), sd.format);
                }
            }
            self.store.save_definition(&m.name, &stored.to_xml()).map_err(|e| format!("{e:#}"))?;
            d.def = stored;
        }
        if let Some(run) = d.run.as_mut() {
            run.chains = crate::storage::resolve_chains(def)?;
            run.def = def.clone();
            run.record.xml = def.to_xml();
            let _ = self.store.save_run(&m.name, &run.record);
        } else if !m.persistent {
            d.def = def.clone();
        }
        Ok(())
    }

    fn snapshot_redefine(&self, m: &Moment, tree: &Tree, req: SnapshotDef, current: bool) -> Result<String, String> {
        let s = match tree.snaps.get(&req.name) {
            // snapshot-edit: what may change is the description.
            Some(old) => SnapshotDef { description: req.description, ..old.clone() },
            None => {
                if req.name.is_empty() || req.state.is_none() {
                    return Err("--redefine of a snapshot rvirtd does not know needs its whole XML (name, state, domain)".into());
                }
                let def = DomainXml::parse(req.domain.as_deref().ok_or("--redefine needs the snapshot's <domain>")?).map_err(|e| e.to_string())?;
                if def.uuid != m.def.uuid {
                    return Err(format!("the snapshot's <domain> is not domain '{}' (another UUID)", m.name));
                }
                if let Some(p) = req.parent.as_ref().filter(|p| !tree.snaps.contains_key(*p)) {
                    return Err(format!("the snapshot's parent '{p}' is not a snapshot of domain '{}'", m.name));
                }
                SnapshotDef { creation_time: req.creation_time.or(Some(now())), ..req }
            }
        };
        self.snapshots.save(&m.name, &s)?;
        if current {
            self.snapshots.set_current(&m.name, Some(&s.name))?;
        }
        Ok(s.name)
    }

    /// `snapshot-list`.
    pub fn snapshot_list(&self, key: &str, filter: &SnapshotFilter) -> Result<Vec<SnapshotSummary>, String> {
        let name = lock(&self.inner).find(key)?;
        let tree = self.snapshots.load(&name);
        let names = tree.select(filter).map_err(|e| format!("domain '{name}': {e}"))?;
        Ok(names
            .into_iter()
            .filter_map(|n| tree.snaps.get(&n))
            .map(|s| SnapshotSummary {
                name: s.name.clone(),
                parent: s.parent.clone().filter(|p| tree.snaps.contains_key(p)),
                creation_time: s.creation_time.unwrap_or(0),
                state: s.state.map_or("shutoff", SnapshotState::as_str).to_string(),
                current: tree.current.as_deref() == Some(s.name.as_str()),
                children: tree.children(&s.name).len() as u32,
                descendants: tree.descendants(&s.name).len() as u32,
                external: Tree::is_external(s),
            })
            .collect())
    }

    /// `snapshot-dumpxml`.
    pub fn snapshot_xml(&self, key: &str, snapshot: &str) -> Result<String, String> {
        let name = lock(&self.inner).find(key)?;
        let tree = self.snapshots.load(&name);
        Ok(tree.get(&name, snapshot)?.to_xml())
    }

    /// `snapshot-revert`.
    pub fn snapshot_revert(&self, key: &str, snapshot: &str, running: bool, paused: bool) -> Result<String, String> {
        let _one = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        let m = self.moment(key)?;
        let tree = self.snapshots.load(&m.name);
        let s = tree.get(&m.name, snapshot)?.clone();
        if Tree::is_external(&s) {
            return Err(format!(
                "snapshot '{snapshot}' is external (--disk-only): its images are the overlays' backing files, and reverting to it is not supported; start from its disks by hand, or delete it with --metadata"
            ));
        }
        let def = parse_checked(s.domain.as_deref().ok_or_else(|| format!("snapshot '{snapshot}' keeps no domain definition"))?)?;
        let state = s.state.unwrap_or(SnapshotState::ShutOff);
        // The memory must be there before anything is undone.
        let memory = if state.has_memory() {
            let path = self.snapshots.memory_file(&m.name, snapshot);
            Some((open_saved(&path).map_err(|e| format!("snapshot '{snapshot}' keeps memory, but: {e}"))?.0, path))
        } else {
            None
        };
        if m.socket.is_some() {
            self.end_run(&m.name, StopReason::FromSnapshot)?;
        }
        for sd in s.disks.iter().filter(|d| d.kind == SnapshotDiskKind::Internal) {
            let Some(d) = def.disks.iter().find(|d| d.target == sd.name) else { continue };
            with_image(&d.path, |img| snapshot_id(img, snapshot).and_then(|id| img.apply_snapshot(&id))).map_err(|e| format!("reverting disk '{}': {e}", sd.name))?;
        }
        if m.persistent {
            self.store.save_definition(&m.name, &def.to_xml()).map_err(|e| format!("{e:#}"))?;
            let mut g = lock(&self.inner);
            if let Some(d) = g.domains.get_mut(&m.name) {
                d.def = def.clone();
            }
        }
        self.snapshots.set_current(&m.name, Some(snapshot))?;
        let stay_paused = paused || (!running && state == SnapshotState::Paused);
        match memory {
            Some((file, path)) => self.start_restored(&m.name, def, RestoreFrom { path, file, copy_memory: false, paused: stay_paused }, "from snapshot")?,
            None if running || paused => {
                self.start(&m.name)?;
                if paused {
                    self.set_paused(&m.name, true)?;
                }
            }
            None => {}
        }
        Ok(m.name)
    }

    /// `snapshot-delete`.
    pub fn snapshot_delete(&self, key: &str, snapshot: &str, children: bool, children_only: bool, metadata_only: bool) -> Result<String, String> {
        let _one = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        let m = self.moment(key)?;
        let tree = self.snapshots.load(&m.name);
        let s = tree.get(&m.name, snapshot)?.clone();
        let below = tree.descendants(snapshot);
        let mut victims: Vec<String> = match (children, children_only) {
            (_, true) => below,
            (true, false) => std::iter::once(snapshot.to_string()).chain(below).collect(),
            (false, false) => vec![snapshot.to_string()],
        };
        // Children before their parents.
        victims.reverse();
        if !metadata_only {
            if let Some(v) = victims.iter().find(|v| tree.snaps.get(*v).is_some_and(Tree::is_external)) {
                return Err(format!(
                    "snapshot '{v}' is external (--disk-only): its overlays are in use, so only its record can go (--metadata)"
                ));
            }
            for v in &victims {
                self.delete_disk_snapshots(&m, &tree.snaps[v])?;
                self.snapshots.remove(&m.name, v)?;
            }
        } else {
            for v in &victims {
                self.snapshots.remove(&m.name, v)?;
            }
        }
        // What was below a deleted snapshot hangs from what was above it.
        let new_parent = if children_only { Some(snapshot.to_string()) } else { s.parent.clone() };
        for other in tree.snaps.values().filter(|o| !victims.contains(&o.name)) {
            if other.parent.as_ref().is_some_and(|p| victims.contains(p)) {
                self.snapshots.save(&m.name, &SnapshotDef { parent: new_parent.clone(), ..other.clone() })?;
            }
        }
        if tree.current.as_ref().is_some_and(|c| victims.contains(c)) {
            self.snapshots.set_current(&m.name, new_parent.as_deref())?;
        }
        Ok(m.name)
    }

    /// Deletes `s`'s internal snapshots from its disks: through the VMM
    /// for the images a running domain holds, directly for the others.
    fn delete_disk_snapshots(&self, m: &Moment, s: &SnapshotDef) -> Result<(), String> {
        let def = DomainXml::parse(s.domain.as_deref().unwrap_or_default()).map_err(|e| e.to_string())?;
        let mut vmm_asked = false;
        for sd in s.disks.iter().filter(|d| d.kind == SnapshotDiskKind::Internal) {
            let Some(d) = def.disks.iter().find(|d| d.target == sd.name) else { continue };
            let held = m.socket.is_some() && m.def.disks.iter().any(|x| x.path == d.path && !x.readonly);
            if held {
                if !vmm_asked {
                    let socket = m.socket.as_deref().unwrap_or(Path::new(""));
                    vmm_call(socket, &rvirt_api::Request::DeleteDiskSnapshot { name: s.name.clone() }, VMM_TIMEOUT).map_err(|e| format!("deleting snapshot '{}' from the running domain's disks: {e}", s.name))?;
                    vmm_asked = true;
                }
            } else if d.path.exists() {
                with_image(&d.path, |img| match snapshot_id(img, &s.name) {
                    Ok(id) => img.delete_snapshot(&id),
                    // Gone already (deleted by hand): nothing to do.
                    Err(_) => Ok(()),
                })?;
            }
        }
        Ok(())
    }

    /// The snapshot requests.
    pub(super) fn handle_snapshot(&self, req: Request) -> Response {
        let done = |r: Result<String, String>| match r {
            Ok(n) => Response::done(&n),
            Err(e) => Response::error(e),
        };
        match req {
            Request::SnapshotCreate { domain, xml, flags } => done(self.snapshot_create(&domain, &xml, flags)),
            Request::SnapshotList { domain, filter } => match self.snapshot_list(&domain, &filter) {
                Ok(list) => Response { snapshots: Some(list), ..Response::ok() },
                Err(e) => Response::error(e),
            },
            Request::SnapshotDumpXml { domain, snapshot } => match self.snapshot_xml(&domain, &snapshot) {
                Ok(x) => Response { xml: Some(x), ..Response::ok() },
                Err(e) => Response::error(e),
            },
            Request::SnapshotRevert { domain, snapshot, running, paused } => done(self.snapshot_revert(&domain, &snapshot, running, paused)),
            Request::SnapshotDelete { domain, snapshot, children, children_only, metadata_only } => {
                done(self.snapshot_delete(&domain, &snapshot, children, children_only, metadata_only))
            }
            other => Response::error(format!("'{}' is not a snapshot request", other.name())),
        }
    }
}
