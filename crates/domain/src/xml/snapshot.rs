//! Domain snapshots in libvirt's `<domainsnapshot>` XML: what
//! `snapshot-create` is given and what `snapshot-dumpxml` prints (and what
//! rvirtd stores, so its metadata survives a restart).

use std::fmt::Write;
use std::path::PathBuf;

use super::{checked_document, elements, escape, Cx, XmlError};


/// The domain's state when the snapshot was taken (libvirt's `<state>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotState {
    /// Running: the snapshot holds its memory.
    Running,
    /// Paused: the snapshot holds its memory; a revert leaves it paused.
    Paused,
    /// Shut off: disks only.
    ShutOff,
    /// `--disk-only` of a running domain: its disks at that moment, no memory.
    DiskSnapshot,
}

impl SnapshotState {
    /// libvirt's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::ShutOff => "shutoff",
            Self::DiskSnapshot => "disk-snapshot",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => Self::Running,
            "paused" => Self::Paused,
            "shutoff" => Self::ShutOff,
            "disk-snapshot" => Self::DiskSnapshot,
            _ => return None,
        })
    }

    /// Whether the snapshot holds the guest's memory (a revert resumes it).
    pub fn has_memory(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

/// What a snapshot keeps of one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotDiskKind {
    /// Nothing (read-only disks, CD-ROMs, or `snapshot='no'`).
    No,
    /// A qcow2 internal snapshot named as the domain snapshot.
    Internal,
    /// The disk continued in an overlay (`--disk-only`); the snapshot is
    /// the image below it.
    External {
        /// The overlay; None: chosen when the snapshot is taken.
        file: Option<PathBuf>,
    },
}

/// One `<disks><disk>` of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotDisk {
    /// The disk's target (`vda`).
    pub name: String,
    /// What is kept of it.
    pub kind: SnapshotDiskKind,
}

/// A domain snapshot (`<domainsnapshot>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotDef {
    /// Its name, unique within the domain.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// The domain's state when taken (None in a request: it is known then).
    pub state: Option<SnapshotState>,
    /// The snapshot it was taken after (the current one then).
    pub parent: Option<String>,
    /// Seconds since the epoch when taken.
    pub creation_time: Option<u64>,
    /// `<memory snapshot='no|internal'>`; None when not said.
    pub memory_internal: Option<bool>,
    /// The disks, as said or as taken.
    pub disks: Vec<SnapshotDisk>,
    /// The domain's definition at that moment (`<domain>`, as rvirtd
    /// writes it).
    pub domain: Option<String>,
}

/// Longest snapshot name, in bytes.
pub const MAX_SNAPSHOT_NAME: usize = 255;

/// Whether `name` can name a snapshot: 1 to 255 bytes, no `/`, no control
/// characters, not starting with a dot (rvirtd keeps each as a file).
pub fn valid_snapshot_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_SNAPSHOT_NAME && !name.starts_with('.') && !name.contains('/') && !name.chars().any(char::is_control)
}

impl SnapshotDef {
    /// Parses a `<domainsnapshot>` document, checking what rvirt acts on.
    pub fn parse(xml: &str) -> Result<Self, XmlError> {
        let doc = checked_document(xml)?;
        let cx = Cx::new(xml);
        let root = doc.root_element();
        if root.tag_name().name() != "domainsnapshot" {
            return Err(cx.err(root, root.tag_name().name(), "the root element must be <domainsnapshot>"));
        }
        let mut s = SnapshotDef {
            name: String::new(),
            description: None,
            state: None,
            parent: None,
            creation_time: None,
            memory_internal: None,
            disks: Vec::new(),
            domain: None,
        };
        for c in elements(root) {
            match c.tag_name().name() {
                "name" => {
                    let t = cx.text(c, "name")?;
                    if !valid_snapshot_name(&t) {
                        return Err(cx.err(c, "name", format!("'{t}' is not a usable snapshot name (1 to {MAX_SNAPSHOT_NAME} bytes, no '/', not starting with '.')")));
                    }
                    s.name = t;
                }
                "description" => s.description = c.text().map(str::to_string).filter(|t| !t.is_empty()),
                "state" => {
                    let t = cx.text(c, "state")?;
                    s.state = Some(SnapshotState::parse(&t).ok_or_else(|| cx.err(c, "state", format!("unknown state '{t}'")))?);
                }
                "parent" => {
                    let n = elements(c).find(|n| n.tag_name().name() == "name").ok_or_else(|| cx.err(c, "parent", "needs a <name>"))?;
                    s.parent = Some(cx.text(n, "parent/name")?);
                }
                "creationTime" => {
                    let t = cx.text(c, "creationTime")?;
                    s.creation_time = Some(t.parse().map_err(|_| cx.err(c, "creationTime", format!("'{t}' is not a number of seconds")))?);
                }
                "memory" => {
                    s.memory_internal = match c.attribute("snapshot").unwrap_or("no") {
                        "no" => Some(false),
                        "internal" => Some(true),
                        other => return Err(cx.err(c, "memory", format!("snapshot='{other}': rvirt keeps memory internally ('internal') or not at all ('no')"))),
                    }
                }
                "disks" => {
                    for d in elements(c).filter(|d| d.tag_name().name() == "disk") {
                        let name = cx.attr(d, "disks/disk", "name")?.to_string();
                        let kind = match d.attribute("snapshot") {
                            Some("no") => SnapshotDiskKind::No,
                            Some("internal") => SnapshotDiskKind::Internal,
                            Some("external") | None if d.attribute("snapshot").is_some() || elements(d).any(|e| e.tag_name().name() == "source") => {
                                if let Some(t) = d.attribute("type").filter(|t| *t != "file") {
                                    return Err(cx.err(d, "disks/disk", format!("type='{t}': an overlay is a file")));
                                }
                                if let Some(drv) = elements(d).find(|e| e.tag_name().name() == "driver") {
                                    if let Some(t) = drv.attribute("type").filter(|t| *t != "qcow2") {
                                        return Err(cx.err(drv, "disks/disk/driver", format!("type='{t}': an overlay is qcow2")));
                                    }
                                }
                                let file = match elements(d).find(|e| e.tag_name().name() == "source").and_then(|s| s.attribute("file")) {
                                    Some(f) => Some(cx.path(d, "disks/disk/source", f)?),
                                    None => None,
                                };
                                SnapshotDiskKind::External { file }
                            }
                            None => SnapshotDiskKind::Internal,
                            Some(other) => return Err(cx.err(d, "disks/disk", format!("snapshot='{other}': expected no, internal or external"))),
                        };
                        if s.disks.iter().any(|x| x.name == name) {
                            return Err(cx.err(d, "disks/disk", format!("disk '{name}' is named twice")));
                        }
                        s.disks.push(SnapshotDisk { name, kind });
                    }
                }
                "domain" => {
                    // Lines after the first lose the indentation the element had, as it was written.
                    let start = c.range().start;
                    let column = start - cx.src[..start].rfind('\n').map_or(0, |i| i + 1);
                    let text = &cx.src[c.range()];
                    let mut lines = text.lines();
                    let mut out = lines.next().unwrap_or_default().to_string();
                    for l in lines {
                        let cut = l.len() - l.trim_start_matches(' ').len();
                        out.push('\n');
                        out.push_str(&l[cut.min(column)..]);
                    }
                    s.domain = Some(out);
                }
                // What libvirt writes and rvirt has no use for.
                "active" | "inactiveDomain" | "cookie" => {}
                other => return Err(cx.err(c, other, format!("<{other}> is not part of a snapshot rvirt takes"))),
            }
        }
        Ok(s)
    }

    /// The XML `snapshot-dumpxml` prints and rvirtd stores.
    pub fn to_xml(&self) -> String {
        let mut o = String::from("<domainsnapshot>\n");
        let _ = writeln!(o, "  <name>{}</name>", escape(&self.name));
        if let Some(d) = &self.description {
            let _ = writeln!(o, "  <description>{}</description>", escape(d));
        }
        if let Some(st) = self.state {
            let _ = writeln!(o, "  <state>{}</state>", st.as_str());
        }
        if let Some(p) = &self.parent {
            let _ = writeln!(o, "  <parent>\n    <name>{}</name>\n  </parent>", escape(p));
        }
        if let Some(t) = self.creation_time {
            let _ = writeln!(o, "  <creationTime>{t}</creationTime>");
        }
        if let Some(m) = self.memory_internal {
            let _ = writeln!(o, "  <memory snapshot='{}'/>", if m { "internal" } else { "no" });
        }
        if !self.disks.is_empty() {
            o.push_str("  <disks>\n");
            for d in &self.disks {
                let name = escape(&d.name);
                match &d.kind {
                    SnapshotDiskKind::No => {
                        let _ = writeln!(o, "    <disk name='{name}' snapshot='no'/>");
                    }
                    SnapshotDiskKind::Internal => {
                        let _ = writeln!(o, "    <disk name='{name}' snapshot='internal'/>");
                    }
                    SnapshotDiskKind::External { file: None } => {
                        let _ = writeln!(o, "    <disk name='{name}' snapshot='external' type='file'>\n      <driver type='qcow2'/>\n    </disk>");
                    }
                    SnapshotDiskKind::External { file: Some(f) } => {
                        let _ = writeln!(
                            o,
                            "    <disk name='{name}' snapshot='external' type='file'>\n      <driver type='qcow2'/>\n      <source file='{}'/>\n    </disk>",
                            escape(&f.to_string_lossy())
                        );
                    }
                }
            }
            o.push_str("  </disks>\n");
        }
        if let Some(d) = &self.domain {
            for line in d.trim_end().lines() {
                let _ = writeln!(o, "  {line}");
            }
        }
        o.push_str("</domainsnapshot>\n");
        o
    }

    /// The overlay file for disk `path` when none is named: the image's
    /// name with the snapshot's name for its extension, as libvirt does
    /// (`/img/vm.qcow2` → `/img/vm.NAME`).
    pub fn default_overlay(path: &std::path::Path, snapshot: &str) -> PathBuf {
        path.with_extension(snapshot)
    }
}



#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_reads_back_from_what_it_writes() {
        let s = SnapshotDef {
            name: "before <upgrade>".into(),
            description: Some("a & b".into()),
            state: Some(SnapshotState::Running),
            parent: Some("s0".into()),
            creation_time: Some(1_700_000_000),
            memory_internal: Some(true),
            disks: vec![
                SnapshotDisk { name: "vda".into(), kind: SnapshotDiskKind::Internal },
                SnapshotDisk { name: "vdb".into(), kind: SnapshotDiskKind::External { file: Some("/img/b.s1".into()) } },
                SnapshotDisk { name: "hdc".into(), kind: SnapshotDiskKind::No },
            ],
            domain: Some("<domain type='kvm'>\n  <name>web</name>\n</domain>".into()),
        };
        let xml = s.to_xml();
        assert!(xml.contains("  <domain type='kvm'>\n    <name>web</name>\n  </domain>\n</domainsnapshot>"), "{xml}");
        let back = SnapshotDef::parse(&xml).unwrap();
        assert_eq!(back, s);
        assert_eq!(SnapshotDef::parse(&back.to_xml()).unwrap().to_xml(), back.to_xml(), "stable after one round");
    }

    #[test]
    fn what_virsh_sends_parses_and_bad_input_is_refused() {
        // snapshot-create-as NAME DESC
        let s = SnapshotDef::parse("<domainsnapshot><name>s1</name><description>first</description></domainsnapshot>").unwrap();
        assert_eq!((s.name.as_str(), s.description.as_deref(), s.state, s.disks.len()), ("s1", Some("first"), None, 0));
        // --diskspec vda,snapshot=external,file=/x.qcow2
        let s = SnapshotDef::parse("<domainsnapshot><disks><disk name='vda' snapshot='external'><source file='/x.qcow2'/></disk><disk name='vdb' snapshot='no'/></disks></domainsnapshot>").unwrap();
        assert_eq!(s.disks[0].kind, SnapshotDiskKind::External { file: Some("/x.qcow2".into()) });
        assert_eq!(s.disks[1].kind, SnapshotDiskKind::No);
        assert_eq!(s.name, "", "no name: the daemon gives one");
        for (xml, want) in [
            ("<domain/>", "root element must be <domainsnapshot>"),
            ("<domainsnapshot><name>a/b</name></domainsnapshot>", "not a usable snapshot name"),
            ("<domainsnapshot><name>..</name></domainsnapshot>", "not a usable snapshot name"),
            ("<domainsnapshot><memory snapshot='external' file='/m'/></domainsnapshot>", "snapshot='external'"),
            ("<domainsnapshot><state>flying</state></domainsnapshot>", "unknown state"),
            ("<domainsnapshot><disks><disk name='vda' snapshot='external'><source file='rel.qcow2'/></disk></disks></domainsnapshot>", "absolute path"),
            ("<domainsnapshot><disks><disk name='vda'/><disk name='vda'/></disks></domainsnapshot>", "named twice"),
            ("<domainsnapshot><disks><disk snapshot='no'/></disks></domainsnapshot>", "name='...' attribute is required"),
            ("<domainsnapshot><creationTime>yesterday</creationTime></domainsnapshot>", "not a number"),
            ("<domainsnapshot><bogus/></domainsnapshot>", "<bogus> is not part"),
            ("<domainsnapshot>", "not well-formed"),
        ] {
            let e = SnapshotDef::parse(xml).unwrap_err().to_string();
            assert!(e.contains(want), "{xml}: {e}");
        }
        assert_eq!(SnapshotDef::default_overlay(std::path::Path::new("/img/vm.qcow2"), "s1"), PathBuf::from("/img/vm.s1"));
    }
}
