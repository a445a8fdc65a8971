//! Snapshot and save commands (virsh's names, options and output):
//! snapshot-create/-create-as/-list/-info/-current/-dumpxml/-parent/
//! -revert/-delete, save, restore, managedsave, managedsave-remove.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rvirt_domain::protocol::{Request, Response, SnapshotCreateFlags, SnapshotFilter, SnapshotSummary};

use crate::everyday::{Action, Text};

/// The commands of this module.
#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Take a snapshot from `<domainsnapshot>` XML (virsh snapshot-create).
    SnapshotCreate {
        /// Name, id or UUID.
        domain: String,
        /// The XML file (none: a snapshot named by the time).
        xmlfile: Option<PathBuf>,
        /// Store the metadata given, take nothing (snapshot-edit's way).
        #[arg(long)]
        redefine: bool,
        /// With --redefine: it becomes the current snapshot.
        #[arg(long)]
        current: bool,
        /// How.
        #[command(flatten)]
        how: TakeArgs,
    },
    /// Take a snapshot named on the command line (virsh snapshot-create-as).
    SnapshotCreateAs {
        /// Name, id or UUID.
        domain: String,
        /// The snapshot's name (none: the time).
        name: Option<String>,
        /// Its description.
        description: Option<String>,
        /// How.
        #[command(flatten)]
        how: TakeArgs,
        /// A disk's part: `vda,snapshot=external,file=/img/top.qcow2` or `vdb,snapshot=no` (repeatable).
        #[arg(long)]
        diskspec: Vec<String>,
        /// Print the XML that would be sent, take nothing.
        #[arg(long)]
        print_xml: bool,
    },
    /// A domain's snapshots (virsh snapshot-list).
    SnapshotList {
        /// Name, id or UUID.
        domain: String,
        /// As a tree.
        #[arg(long)]
        tree: bool,
        /// With each one's parent.
        #[arg(long)]
        parent: bool,
        /// Only those without a parent.
        #[arg(long)]
        roots: bool,
        /// Only those without children.
        #[arg(long)]
        leaves: bool,
        /// Only those with children.
        #[arg(long)]
        no_leaves: bool,
        /// Names only.
        #[arg(long)]
        name: bool,
        /// The children of this snapshot...
        #[arg(long)]
        from: Option<String>,
        /// ...and theirs.
        #[arg(long)]
        descendants: bool,
        /// Parents before children (always so).
        #[arg(long)]
        topological: bool,
    },
    /// One snapshot's details (virsh snapshot-info).
    SnapshotInfo {
        /// Name, id or UUID.
        domain: String,
        /// The snapshot (or --current).
        snapshotname: Option<String>,
        /// The current snapshot.
        #[arg(long)]
        current: bool,
    },
    /// The current snapshot's XML, or its name (virsh snapshot-current).
    SnapshotCurrent {
        /// Name, id or UUID.
        domain: String,
        /// Only its name.
        #[arg(long)]
        name: bool,
    },
    /// A snapshot's XML (virsh snapshot-dumpxml).
    SnapshotDumpxml {
        /// Name, id or UUID.
        domain: String,
        /// The snapshot.
        snapshotname: String,
    },
    /// A snapshot's parent (virsh snapshot-parent).
    SnapshotParent {
        /// Name, id or UUID.
        domain: String,
        /// The snapshot.
        snapshotname: String,
    },
    /// Go back to a snapshot (virsh snapshot-revert).
    SnapshotRevert {
        /// Name, id or UUID.
        domain: String,
        /// The snapshot (or --current).
        snapshotname: Option<String>,
        /// The current snapshot.
        #[arg(long)]
        current: bool,
        /// Run afterwards.
        #[arg(long, conflicts_with = "paused")]
        running: bool,
        /// Paused afterwards.
        #[arg(long)]
        paused: bool,
    },
    /// Delete a snapshot (virsh snapshot-delete).
    SnapshotDelete {
        /// Name, id or UUID.
        domain: String,
        /// The snapshot (or --current).
        snapshotname: Option<String>,
        /// The current snapshot.
        #[arg(long)]
        current: bool,
        /// And everything below it.
        #[arg(long)]
        children: bool,
        /// Only what is below it.
        #[arg(long, conflicts_with = "children")]
        children_only: bool,
        /// Only rvirtd's record (the images keep theirs).
        #[arg(long)]
        metadata: bool,
    },
    /// Save a running domain to a file and stop it (virsh save).
    Save {
        /// Name, id or UUID.
        domain: String,
        /// The file.
        file: PathBuf,
        /// Restore it running.
        #[arg(long, conflicts_with = "paused")]
        running: bool,
        /// Restore it paused.
        #[arg(long)]
        paused: bool,
    },
    /// Run a saved domain again (virsh restore).
    Restore {
        /// The file `save` wrote.
        file: PathBuf,
        /// Run it.
        #[arg(long, conflicts_with = "paused")]
        running: bool,
        /// Leave it paused.
        #[arg(long)]
        paused: bool,
    },
    /// Save a running domain for its next start (virsh managedsave).
    Managedsave {
        /// Name, id or UUID.
        domain: String,
        /// The next start runs it.
        #[arg(long, conflicts_with = "paused")]
        running: bool,
        /// The next start leaves it paused.
        #[arg(long)]
        paused: bool,
    },
    /// Drop a managed save (virsh managedsave-remove).
    ManagedsaveRemove {
        /// Name, id or UUID.
        domain: String,
    },
}

/// How a snapshot is taken (virsh's flags of both snapshot-create commands).
#[derive(Args, Debug, Clone, Copy)]
pub struct TakeArgs {
    /// Disks only: each continues in a new qcow2 overlay.
    #[arg(long)]
    disk_only: bool,
    /// Stop the domain once taken.
    #[arg(long)]
    halt: bool,
    /// Keep no metadata.
    #[arg(long)]
    no_metadata: bool,
    /// All disks or none (always so).
    #[arg(long)]
    atomic: bool,
}

impl TakeArgs {
    fn flags(self) -> SnapshotCreateFlags {
        SnapshotCreateFlags { disk_only: self.disk_only, halt: self.halt, no_metadata: self.no_metadata, atomic: self.atomic, ..Default::default() }
    }
}

/// `<disk>` elements for `--diskspec` values, as virsh writes them.
fn diskspecs(specs: &[String]) -> Result<String> {
    let mut out = String::new();
    for spec in specs {
        let mut parts = spec.split(',');
        let name = parts.next().filter(|n| !n.is_empty()).with_context(|| format!("--diskspec '{spec}': no disk named"))?;
        let (mut kind, mut file) = (None, None);
        for p in parts {
            match p.split_once('=') {
                Some(("snapshot", v)) => kind = Some(v.to_string()),
                Some(("file", v)) => file = Some(v.to_string()),
                Some(("driver", _)) => {}
                _ => bail!("--diskspec '{spec}': '{p}' is not snapshot=, file= or driver="),
            }
        }
        out += &format!("    <disk name='{}'", escape(name));
        if let Some(k) = &kind {
            out += &format!(" snapshot='{}'", escape(k));
        }
        match file {
            Some(f) => out += &format!(">\n      <source file='{}'/>\n    </disk>\n", escape(&f)),
            None => out += "/>\n",
        }
    }
    Ok(out)
}

fn named(r: &Response) -> String {
    r.name.clone().unwrap_or_default()
}

/// Text made safe for an element or a single-quoted attribute of the XML the commands write.
pub(crate) fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;")
}

/// `YYYY-MM-DD HH:MM:SS +0000` for seconds since the epoch (UTC), as virsh prints creation times.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} +0000", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The `snapshot-list` table, tree or names.
pub fn list(rows: &[SnapshotSummary], tree: bool, parent: bool, names: bool) -> String {
    if names {
        return rows.iter().map(|s| format!("{}\n", s.name)).collect();
    }
    if tree {
        let mut out = String::new();
        let roots: Vec<&SnapshotSummary> = rows.iter().filter(|s| s.parent.as_ref().is_none_or(|p| !rows.iter().any(|r| &r.name == p))).collect();
        fn walk(rows: &[SnapshotSummary], s: &SnapshotSummary, prefix: &str, out: &mut String, depth: usize) {
            let kids: Vec<&SnapshotSummary> = rows.iter().filter(|c| c.parent.as_deref() == Some(s.name.as_str())).collect();
            for (i, k) in kids.iter().enumerate() {
                let last = i + 1 == kids.len();
                out.push_str(&format!("{prefix}|\n{prefix}+- {}\n", k.name));
                if depth < 1000 {
                    walk(rows, k, &format!("{prefix}{}", if last { "   " } else { "|  " }), out, depth + 1);
                }
            }
        }
        for r in roots {
            out.push_str(&format!("{}\n", r.name));
            walk(rows, r, "  ", &mut out, 0);
            out.push('\n');
        }
        return out;
    }
    let mut out = if parent {
        format!(" {:<20} {:<27} {:<13} {}\n{}\n", "Name", "Creation Time", "State", "Parent", "-".repeat(72))
    } else {
        format!(" {:<20} {:<27} {}\n{}\n", "Name", "Creation Time", "State", "-".repeat(60))
    };
    for s in rows {
        if parent {
            out += &format!(" {:<20} {:<27} {:<13} {}\n", s.name, utc(s.creation_time), s.state, s.parent.as_deref().unwrap_or(""));
        } else {
            out += &format!(" {:<20} {:<27} {}\n", s.name, utc(s.creation_time), s.state);
        }
    }
    out
}

/// The `snapshot-info` fields.
pub fn info(domain: &str, s: &SnapshotSummary) -> String {
    let rows = [
        ("Name", s.name.clone()),
        ("Domain", domain.to_string()),
        ("Current", if s.current { "yes" } else { "no" }.into()),
        ("State", s.state.clone()),
        ("Location", if s.external { "external" } else { "internal" }.into()),
        ("Parent", s.parent.clone().unwrap_or_else(|| "-".into())),
        ("Children", s.children.to_string()),
        ("Descendants", s.descendants.to_string()),
        ("Metadata", "yes".into()),
    ];
    rows.iter().map(|(k, v)| format!("{:<15}{v}\n", format!("{k}:"))).collect()
}

fn all(conn: &mut impl FnMut(&Request) -> Result<Response>, domain: &str) -> Result<Vec<SnapshotSummary>> {
    Ok(conn(&Request::SnapshotList { domain: domain.to_string(), filter: SnapshotFilter::default() })?.snapshots.unwrap_or_default())
}

/// The snapshot a command names, or the current one with `--current`.
fn chosen(conn: &mut impl FnMut(&Request) -> Result<Response>, domain: &str, name: Option<&String>, current: bool) -> Result<SnapshotSummary> {
    let list = all(conn, domain)?;
    match (name, current) {
        (Some(n), _) => list.into_iter().find(|s| &s.name == n).with_context(|| format!("domain '{domain}' has no snapshot named '{n}'")),
        (None, true) => list.into_iter().find(|s| s.current).with_context(|| format!("domain '{domain}' has no current snapshot")),
        (None, false) => bail!("name a snapshot, or give --current"),
    }
}

/// The request a command makes and how its answer is printed; the
/// commands that only read fetch through `conn` and answer at once.
pub fn request(cmd: &SnapshotCommand, conn: &mut impl FnMut(&Request) -> Result<Response>) -> Result<Action> {
    use SnapshotCommand as C;
    let (req, text): (Request, Text) = match cmd {
        C::SnapshotCreate { domain, xmlfile, redefine, current, how } => {
            let xml = match xmlfile {
                Some(f) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
                None => "<domainsnapshot/>".into(),
            };
            let flags = SnapshotCreateFlags { redefine: *redefine, current: *current, ..how.flags() };
            let redefined = *redefine;
            (
                Request::SnapshotCreate { domain: domain.clone(), xml, flags },
                Box::new(move |r| if redefined { format!("Domain snapshot {} defined\n", named(r)) } else { format!("Domain snapshot {} created\n", named(r)) }),
            )
        }
        C::SnapshotCreateAs { domain, name, description, how, diskspec, print_xml } => {
            let mut xml = String::from("<domainsnapshot>\n");
            if let Some(n) = name {
                xml += &format!("  <name>{}</name>\n", escape(n));
            }
            if let Some(d) = description {
                xml += &format!("  <description>{}</description>\n", escape(d));
            }
            if !diskspec.is_empty() {
                xml += &format!("  <disks>\n{}  </disks>\n", diskspecs(diskspec)?);
            }
            xml += "</domainsnapshot>\n";
            if *print_xml {
                return Ok(Action::Print(xml));
            }
            let flags = how.flags();
            (Request::SnapshotCreate { domain: domain.clone(), xml, flags }, Box::new(|r| format!("Domain snapshot {} created\n", named(r))))
        }
        C::SnapshotList { domain, tree, parent, roots, leaves, no_leaves, name, from, descendants, topological: _ } => {
            let filter = SnapshotFilter { roots: *roots, leaves: *leaves, no_leaves: *no_leaves, of: from.clone(), descendants: *descendants, ..Default::default() };
            let (tree, parent, names) = (*tree, *parent, *name);
            (Request::SnapshotList { domain: domain.clone(), filter }, Box::new(move |r| list(r.snapshots.as_deref().unwrap_or_default(), tree, parent, names)))
        }
        C::SnapshotInfo { domain, snapshotname, current } => {
            let s = chosen(conn, domain, snapshotname.as_ref(), *current)?;
            return Ok(Action::Print(info(domain, &s)));
        }
        C::SnapshotCurrent { domain, name } => {
            let s = chosen(conn, domain, None, true)?;
            if *name {
                return Ok(Action::Print(format!("{}\n", s.name)));
            }
            (Request::SnapshotDumpXml { domain: domain.clone(), snapshot: s.name }, Box::new(|r| r.xml.clone().unwrap_or_default()))
        }
        C::SnapshotDumpxml { domain, snapshotname } => {
            (Request::SnapshotDumpXml { domain: domain.clone(), snapshot: snapshotname.clone() }, Box::new(|r| r.xml.clone().unwrap_or_default()))
        }
        C::SnapshotParent { domain, snapshotname } => {
            let s = chosen(conn, domain, Some(snapshotname), false)?;
            let p = s.parent.with_context(|| format!("snapshot '{snapshotname}' has no parent"))?;
            return Ok(Action::Print(format!("{p}\n")));
        }
        C::SnapshotRevert { domain, snapshotname, current, running, paused } => {
            let s = chosen(conn, domain, snapshotname.as_ref(), *current)?;
            (Request::SnapshotRevert { domain: domain.clone(), snapshot: s.name, running: *running, paused: *paused }, Box::new(|_| String::new()))
        }
        C::SnapshotDelete { domain, snapshotname, current, children, children_only, metadata } => {
            let s = chosen(conn, domain, snapshotname.as_ref(), *current)?;
            let what = if *children_only { format!("Domain snapshot {} children deleted\n", s.name) } else { format!("Domain snapshot {} deleted\n", s.name) };
            (
                Request::SnapshotDelete { domain: domain.clone(), snapshot: s.name, children: *children, children_only: *children_only, metadata_only: *metadata },
                Box::new(move |_| what),
            )
        }
        C::Save { domain, file, running, paused } => {
            let f = absolute(file)?;
            let shown = f.display().to_string();
            (Request::Save { domain: domain.clone(), path: f, running: *running, paused: *paused }, Box::new(move |r| format!("\nDomain '{}' saved to {shown}\n", named(r))))
        }
        C::Restore { file, running, paused } => {
            let f = absolute(file)?;
            let shown = f.display().to_string();
            (Request::Restore { path: f, running: *running, paused: *paused }, Box::new(move |_| format!("Domain restored from {shown}\n")))
        }
        C::Managedsave { domain, running, paused } => {
            (Request::ManagedSave { domain: domain.clone(), running: *running, paused: *paused }, Box::new(|r| format!("\nDomain '{}' state saved by libvirt\n", named(r))))
        }
        C::ManagedsaveRemove { domain } => {
            (Request::ManagedSaveRemove { domain: domain.clone() }, Box::new(|r| format!("Removed managedsave image for domain '{}'\n", named(r))))
        }
    };
    Ok(Action::Call(req, text))
}

/// The daemon does not share the client's working directory.
fn absolute(p: &std::path::Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir().context("the working directory")?.join(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, parent: Option<&str>, t: u64) -> SnapshotSummary {
        SnapshotSummary { name: name.into(), parent: parent.map(str::to_string), creation_time: t, state: "running".into(), current: name == "b", children: 0, descendants: 0, external: false }
    }

    #[test]
    fn times_lists_and_trees_read_as_virsh_prints_them() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 +0000");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 +0000");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 +0000");
        let rows = [s("a", None, 1_700_000_000), s("b", Some("a"), 1_700_000_100), s("c", Some("a"), 1_700_000_200)];
        let t = list(&rows, true, false, false);
        assert_eq!(t, "a\n  |\n  +- b\n  |\n  +- c\n\n");
        let table = list(&rows, false, true, false);
        assert!(table.lines().nth(3).unwrap().split_whitespace().last() == Some("a"), "{table}");
        assert_eq!(list(&rows, false, false, true), "a\nb\nc\n");
        let x = diskspecs(&["vda,snapshot=external,file=/img/t.qcow2".into(), "vdb,snapshot=no".into()]).unwrap();
        assert_eq!(x, "    <disk name='vda' snapshot='external'>\n      <source file='/img/t.qcow2'/>\n    </disk>\n    <disk name='vdb' snapshot='no'/>\n");
        assert!(diskspecs(&["vda,bogus=1".into()]).is_err());
        let i = info("web", &rows[1]);
        assert!(i.contains("Current:       yes") && i.contains("Parent:        a"), "{i}");
    }
}
