//! Domain snapshot metadata on disk and the tree it forms.
//!
//! `STATE/snapshots/DOMAIN/NAME.xml` holds each snapshot as
//! `snapshot-dumpxml` prints it (so it survives a daemon restart),
//! `NAME.save` the memory and device state of one taken while the domain
//! ran (a saved VM, `rvirt_api::saved`), and `current` the name of the
//! domain's current snapshot. Every file is written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rvirt_domain::protocol::SnapshotFilter;
use rvirt_domain::{SnapshotDef, SnapshotDiskKind};

use crate::store::write_atomic;

/// The snapshots of every domain, under one directory.
#[derive(Clone, Debug)]
pub struct SnapshotStore {
    root: PathBuf,
}

/// One domain's snapshots and which is current.
#[derive(Clone, Debug, Default)]
pub struct Tree {
    /// Every snapshot by name.
    pub snaps: BTreeMap<String, SnapshotDef>,
    /// The current snapshot (the parent of the next).
    pub current: Option<String>,
}

const CURRENT: &str = "current";

impl SnapshotStore {
    /// The store under `root` (made, mode 0700, by the state directory).
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn dir(&self, domain: &str) -> PathBuf {
        self.root.join(domain)
    }

    /// Where a snapshot's memory and device state is kept.
    pub fn memory_file(&self, domain: &str, name: &str) -> PathBuf {
        self.dir(domain).join(format!("{name}.save"))
    }

    /// Reads a domain's snapshots; one that does not parse is logged and
    /// left on disk, never deleted.
    pub fn load(&self, domain: &str) -> Tree {
        let mut t = Tree::default();
        let Ok(entries) = std::fs::read_dir(self.dir(domain)) else { return t };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = file.strip_suffix(".xml") else { continue };
            if stem.starts_with('.') {
                continue;
            }
            match std::fs::read_to_string(e.path()).map_err(|e| e.to_string()).and_then(|x| SnapshotDef::parse(&x).map_err(|e| e.to_string())) {
                Ok(s) if s.name == stem => {
                    t.snaps.insert(s.name.clone(), s);
                }
                Ok(s) => tracing::error!("{}: names snapshot '{}', not '{stem}'; ignored", e.path().display(), s.name),
                Err(err) => tracing::error!("{}: {err}; ignored", e.path().display()),
            }
        }
        t.current = std::fs::read_to_string(self.dir(domain).join(CURRENT)).ok().map(|s| s.trim_end().to_string()).filter(|c| t.snaps.contains_key(c));
        t
    }

    /// Stores (or replaces) a snapshot's metadata.
    pub fn save(&self, domain: &str, s: &SnapshotDef) -> Result<(), String> {
        let dir = self.dir(domain);
        make_dir(&dir)?;
        let path = dir.join(format!("{}.xml", s.name));
        write_atomic(&path, s.to_xml().as_bytes()).map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// Makes `name` the current snapshot (None: no current one).
    pub fn set_current(&self, domain: &str, name: Option<&str>) -> Result<(), String> {
        let path = self.dir(domain).join(CURRENT);
        match name {
            Some(n) => {
                make_dir(&self.dir(domain))?;
                write_atomic(&path, n.as_bytes()).map_err(|e| format!("writing {}: {e}", path.display()))
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("removing {}: {e}", path.display())),
                _ => Ok(()),
            },
        }
    }

    /// Removes a snapshot's metadata and memory file.
    pub fn remove(&self, domain: &str, name: &str) -> Result<(), String> {
        for path in [self.dir(domain).join(format!("{name}.xml")), self.memory_file(domain, name)] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(format!("removing {}: {e}", path.display())),
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes what is left of a domain's snapshots (undefine with
    /// `--snapshots-metadata`).
    pub fn remove_domain(&self, domain: &str) {
        let _ = std::fs::remove_dir_all(self.dir(domain));
    }
}

fn make_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| format!("creating {}: {e}", dir.display()))
}

impl Tree {
    /// The snapshot `name`, or an error naming it.
    pub fn get(&self, domain: &str, name: &str) -> Result<&SnapshotDef, String> {
        self.snaps.get(name).ok_or_else(|| format!("domain '{domain}' has no snapshot named '{name}'"))
    }

    /// The snapshots whose parent is `name`.
    pub fn children(&self, name: &str) -> Vec<&str> {
        self.snaps.values().filter(|s| s.parent.as_deref() == Some(name)).map(|s| s.name.as_str()).collect()
    }

    /// Every snapshot below `name`, parents before their children.
    pub fn descendants(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo: Vec<String> = self.children(name).into_iter().map(str::to_string).collect();
        while let Some(n) = todo.pop() {
            // A loop in hand-edited metadata ends here rather than for ever.
            if out.contains(&n) || n == name {
                continue;
            }
            todo.extend(self.children(&n).into_iter().map(str::to_string));
            out.push(n);
        }
        out
    }

    /// Whether a snapshot's disks continue in overlays (`--disk-only`).
    pub fn is_external(s: &SnapshotDef) -> bool {
        s.disks.iter().any(|d| matches!(d.kind, SnapshotDiskKind::External { .. }))
    }

    /// The names `filter` selects, parents before children (libvirt's
    /// topological order, which every listing here has).
    pub fn select(&self, filter: &SnapshotFilter) -> Result<Vec<String>, String> {
        let base: Vec<String> = match &filter.of {
            Some(of) => {
                if !self.snaps.contains_key(of) {
                    return Err(format!("no snapshot named '{of}'"));
                }
                if filter.descendants {
                    self.descendants(of)
                } else {
                    self.children(of).into_iter().map(str::to_string).collect()
                }
            }
            None => {
                let mut all = Vec::new();
                let mut roots: Vec<&SnapshotDef> = self.snaps.values().filter(|s| s.parent.as_ref().is_none_or(|p| !self.snaps.contains_key(p))).collect();
                roots.sort_by_key(|s| (s.creation_time, s.name.clone()));
                for r in roots {
                    all.push(r.name.clone());
                    if !filter.roots {
                        all.extend(self.descendants(&r.name));
                    }
                }
                all
            }
        };
        Ok(base
            .into_iter()
            .filter(|n| {
                let Some(s) = self.snaps.get(n) else { return false };
                let leaf = self.children(n).is_empty();
                let state_ok = match (filter.active, filter.inactive, filter.disk_only) {
                    (false, false, false) => true,
                    (a, i, d) => {
                        use rvirt_domain::SnapshotState::*;
                        (a && matches!(s.state, Some(Running | Paused))) || (i && s.state == Some(ShutOff)) || (d && s.state == Some(DiskSnapshot))
                    }
                };
                let location_ok = match (filter.internal, filter.external) {
                    (false, false) | (true, true) => true,
                    (i, _) => i != Self::is_external(s),
                };
                (!filter.leaves || leaf) && (!filter.no_leaves || !leaf) && state_ok && location_ok
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, parent: Option<&str>, t: u64) -> SnapshotDef {
        let mut s = SnapshotDef::parse(&format!("<domainsnapshot><name>{name}</name><creationTime>{t}</creationTime><state>shutoff</state></domainsnapshot>")).unwrap();
        s.parent = parent.map(str::to_string);
        s
    }

    #[test]
    fn a_tree_lists_roots_leaves_children_and_descendants_and_survives_reloading() {
        let dir = std::env::temp_dir().join(format!("rvirt-snapstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = SnapshotStore::new(dir.clone());
        //   a ─ b ─ c
        //    └─ d      e (a second root)
        for s in [snap("a", None, 1), snap("b", Some("a"), 2), snap("c", Some("b"), 3), snap("d", Some("a"), 4), snap("e", None, 5)] {
            store.save("web", &s).unwrap();
        }
        store.set_current("web", Some("c")).unwrap();
        std::fs::write(dir.join("web/broken.xml"), "<domainsnapshot><bogus/></domainsnapshot>").unwrap();
        let t = store.load("web");
        assert_eq!(t.snaps.len(), 5, "the broken one is ignored, not deleted");
        assert!(dir.join("web/broken.xml").exists());
        assert_eq!(t.current.as_deref(), Some("c"));
        let list = |f: SnapshotFilter| t.select(&f).unwrap();
        assert_eq!(list(SnapshotFilter::default()), ["a", "d", "b", "c", "e"].map(String::from), "parents before children");
        assert_eq!(list(SnapshotFilter { roots: true, ..Default::default() }), ["a", "e"].map(String::from));
        assert_eq!(list(SnapshotFilter { leaves: true, ..Default::default() }), ["d", "c", "e"].map(String::from));
        assert_eq!(list(SnapshotFilter { no_leaves: true, ..Default::default() }), ["a", "b"].map(String::from));
        assert_eq!(list(SnapshotFilter { of: Some("a".into()), ..Default::default() }), ["b", "d"].map(String::from));
        let mut desc = list(SnapshotFilter { of: Some("a".into()), descendants: true, ..Default::default() });
        desc.sort();
        assert_eq!(desc, ["b", "c", "d"].map(String::from));
        assert!(t.select(&SnapshotFilter { of: Some("zz".into()), ..Default::default() }).unwrap_err().contains("no snapshot named 'zz'"));
        assert!(t.get("web", "zz").unwrap_err().contains("domain 'web' has no snapshot named 'zz'"));
        // Removing one and the current mark.
        store.remove("web", "c").unwrap();
        store.set_current("web", None).unwrap();
        let t = store.load("web");
        assert_eq!((t.snaps.len(), t.current), (4, None));
        // A current mark naming a snapshot that is gone is no current snapshot.
        store.set_current("web", Some("c")).unwrap();
        assert_eq!(store.load("web").current, None);
        store.remove_domain("web");
        assert!(store.load("web").snaps.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
