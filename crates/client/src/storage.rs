//! Storage pool and volume commands (virsh's names, options and output):
//! pool-list/-info/-define/-define-as/-build/-start/-destroy/-delete/
//! -undefine/-autostart/-dumpxml, vol-list/-info/-path/-dumpxml/-create/
//! -create-as/-clone/-resize/-wipe/-delete.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use rvirt_domain::protocol::{PoolSummary, Request, Response, VolumeSummary};

use crate::everyday::{Action, Text};
use crate::snapshots::escape;

/// The commands of this module.
#[derive(Subcommand, Debug)]
pub enum StorageCommand {
    /// Storage pools (virsh pool-list).
    PoolList {
        /// Inactive ones too.
        #[arg(long)]
        all: bool,
    },
    /// One pool's state and sizes (virsh pool-info).
    PoolInfo {
        /// Name or UUID.
        pool: String,
    },
    /// Store a pool from its XML (virsh pool-define).
    PoolDefine {
        /// Pool XML file.
        file: PathBuf,
    },
    /// Store a directory pool named on the command line (virsh pool-define-as NAME dir --target DIR).
    PoolDefineAs {
        /// Its name.
        name: String,
        /// Its type: `dir`.
        #[arg(value_name = "TYPE")]
        kind: String,
        /// Its directory.
        #[arg(long)]
        target: PathBuf,
    },
    /// Make a pool's directory (virsh pool-build).
    PoolBuild {
        /// Name or UUID.
        pool: String,
    },
    /// Start a pool (virsh pool-start).
    PoolStart {
        /// Name or UUID.
        pool: String,
        /// Make its directory first.
        #[arg(long)]
        build: bool,
    },
    /// Stop using a pool; its files stay (virsh pool-destroy).
    PoolDestroy {
        /// Name or UUID.
        pool: String,
    },
    /// Remove an inactive pool's empty directory (virsh pool-delete).
    PoolDelete {
        /// Name or UUID.
        pool: String,
    },
    /// Forget a pool's definition (virsh pool-undefine).
    PoolUndefine {
        /// Name or UUID.
        pool: String,
    },
    /// Start a pool with the daemon (virsh pool-autostart).
    PoolAutostart {
        /// Name or UUID.
        pool: String,
        /// Stop doing so.
        #[arg(long)]
        disable: bool,
    },
    /// A pool's XML (virsh pool-dumpxml).
    PoolDumpxml {
        /// Name or UUID.
        pool: String,
    },
    /// The volumes of a pool (virsh vol-list).
    VolList {
        /// Name or UUID.
        pool: String,
        /// With type and sizes.
        #[arg(long)]
        details: bool,
    },
    /// One volume's type and sizes (virsh vol-info).
    VolInfo {
        /// The volume's name.
        vol: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
    },
    /// A volume's path (virsh vol-path).
    VolPath {
        /// The volume's name.
        vol: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
    },
    /// A volume's XML (virsh vol-dumpxml).
    VolDumpxml {
        /// The volume's name.
        vol: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
    },
    /// Create a volume from its XML (virsh vol-create).
    VolCreate {
        /// Name or UUID of the pool.
        pool: String,
        /// Volume XML file.
        file: PathBuf,
        /// qcow2: map every cluster up front.
        #[arg(long)]
        prealloc_metadata: bool,
    },
    /// Create a volume named on the command line (virsh vol-create-as).
    VolCreateAs {
        /// Name or UUID of the pool.
        pool: String,
        /// The volume's name.
        name: String,
        /// Its size in bytes (or with a K, M, G, T suffix).
        capacity: String,
        /// Bytes to reserve on the host (same units).
        #[arg(long)]
        allocation: Option<String>,
        /// raw (default) or qcow2.
        #[arg(long)]
        format: Option<String>,
        /// The volume (name in the pool, or path) it is an overlay of.
        #[arg(long)]
        backing_vol: Option<String>,
        /// The backing volume's format.
        #[arg(long)]
        backing_vol_format: Option<String>,
        /// qcow2: map every cluster up front.
        #[arg(long)]
        prealloc_metadata: bool,
    },
    /// Copy a volume within its pool (virsh vol-clone).
    VolClone {
        /// The volume to copy.
        vol: String,
        /// The copy's name.
        newname: String,
        /// Their pool.
        #[arg(long)]
        pool: String,
    },
    /// Change a volume's capacity (virsh vol-resize).
    VolResize {
        /// The volume's name.
        vol: String,
        /// The new size (or the change, with --delta), in bytes or with a suffix.
        capacity: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
        /// The size is added (or, with --shrink, taken away).
        #[arg(long)]
        delta: bool,
        /// Allow it to get smaller.
        #[arg(long)]
        shrink: bool,
        /// Reserve the new space on the host.
        #[arg(long)]
        allocate: bool,
    },
    /// Overwrite a volume with zeros (virsh vol-wipe).
    VolWipe {
        /// The volume's name.
        vol: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
    },
    /// Delete a volume (virsh vol-delete).
    VolDelete {
        /// The volume's name.
        vol: String,
        /// Its pool.
        #[arg(long)]
        pool: String,
    },
}

/// Parses a size as virsh does for volumes: bytes by default, or with a unit suffix.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| anyhow::anyhow!("'{s}' is not a size (bytes, or a number with K, M, G, T, P or E)"))?;
    let per: u64 = match unit {
        "" | "b" | "B" | "bytes" => 1,
        "KB" => 1000,
        "MB" => 1000u64.pow(2),
        "GB" => 1000u64.pow(3),
        "TB" => 1000u64.pow(4),
        "k" | "K" | "KiB" => 1 << 10,
        "m" | "M" | "MiB" => 1 << 20,
        "g" | "G" | "GiB" => 1 << 30,
        "t" | "T" | "TiB" => 1 << 40,
        "p" | "P" | "PiB" => 1 << 50,
        "e" | "E" | "EiB" => 1 << 60,
        _ => bail!("'{s}': unknown unit '{unit}' (K, M, G, T, P, E or KB, MB, GB, TB)"),
    };
    n.checked_mul(per).with_context(|| format!("'{s}' is too large"))
}

/// A size as virsh prints one (`1.00 GiB`).
pub fn pretty(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", UNITS[u])
}

fn named(r: &Response) -> String {
    r.name.clone().unwrap_or_default()
}

fn read(file: &PathBuf) -> Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

/// The `pool-list` table.
pub fn pool_list(rows: &[PoolSummary]) -> String {
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    let mut out = format!(" {:<w$}   {:<8}   {}\n", "Name", "State", "Autostart");
    out += &"-".repeat(w + 26);
    out.push('\n');
    for r in rows {
        out += &format!(" {:<w$}   {:<8}   {}\n", r.name, if r.active { "active" } else { "inactive" }, if r.autostart { "yes" } else { "no" });
    }
    out
}

/// The `pool-info` table.
pub fn pool_info(p: &PoolSummary) -> String {
    let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
    let mut rows = vec![("Name", p.name.clone()), ("UUID", p.uuid.clone()), ("State", if p.active { "running" } else { "inactive" }.into()), ("Persistent", yes(p.persistent)), ("Autostart", yes(p.autostart))];
    if p.active {
        rows.extend([("Capacity", pretty(p.capacity)), ("Allocation", pretty(p.allocation)), ("Available", pretty(p.available))]);
    }
    rows.iter().map(|(k, v)| format!("{:<16}{v}\n", format!("{k}:"))).collect()
}

/// The `vol-list` table (`details`: type and sizes too).
pub fn vol_list(rows: &[VolumeSummary], details: bool) -> String {
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    let pw = rows.iter().map(|r| r.path.len()).max().unwrap_or(0).max(4);
    let mut out = if details { format!(" {:<w$}   {:<pw$}   {:<4}   {:<10}   {}\n", "Name", "Path", "Type", "Capacity", "Allocation") } else { format!(" {:<w$}   {}\n", "Name", "Path") };
    out += &"-".repeat(w + pw + if details { 40 } else { 6 });
    out.push('\n');
    for r in rows {
        out += &if details {
            format!(" {:<w$}   {:<pw$}   {:<4}   {:<10}   {}\n", r.name, r.path, "file", pretty(r.capacity), pretty(r.allocation))
        } else {
            format!(" {:<w$}   {}\n", r.name, r.path)
        };
    }
    out
}

/// The `vol-info` table.
pub fn vol_info(v: &VolumeSummary) -> String {
    let rows = [("Name", v.name.clone()), ("Type", "file".into()), ("Capacity", pretty(v.capacity)), ("Allocation", pretty(v.allocation))];
    rows.iter().map(|(k, v)| format!("{:<16}{v}\n", format!("{k}:"))).collect()
}

/// Volume `vol` of `pool`, as `vol-list` shows it.
fn volume(conn: &mut impl FnMut(&Request) -> Result<Response>, pool: &str, vol: &str) -> Result<VolumeSummary> {
    let all = conn(&Request::VolList { pool: pool.to_string() })?.volumes.unwrap_or_default();
    all.into_iter().find(|v| v.name == vol).with_context(|| format!("Storage volume not found: no storage vol with matching name '{vol}' in pool '{pool}'"))
}

/// The request a command makes and how its answer is printed (or, for the
/// commands that only read, the text itself).
pub fn request(cmd: &StorageCommand, conn: &mut impl FnMut(&Request) -> Result<Response>) -> Result<Action> {
    use StorageCommand as C;
    let (req, text): (Request, Text) = match cmd {
        C::PoolList { all } => (Request::PoolList { all: *all }, Box::new(|r| pool_list(r.pools.as_deref().unwrap_or_default()))),
        C::PoolInfo { pool } => {
            let all = conn(&Request::PoolList { all: true })?.pools.unwrap_or_default();
            let p = all.iter().find(|p| p.name == *pool || p.uuid.eq_ignore_ascii_case(pool)).with_context(|| format!("Storage pool not found: no storage pool with matching name '{pool}'"))?;
            return Ok(Action::Print(pool_info(p)));
        }
        C::PoolDefine { file } => {
            let f = file.display().to_string();
            (Request::PoolDefine { xml: read(file)? }, Box::new(move |r| format!("Pool {} defined from {f}\n", named(r))))
        }
        C::PoolDefineAs { name, kind, target } => {
            if kind != "dir" {
                bail!("pool type '{kind}' is not supported: rvirt has directory pools (dir)");
            }
            let xml = format!("<pool type='dir'>\n  <name>{}</name>\n  <target>\n    <path>{}</path>\n  </target>\n</pool>\n", escape(name), escape(&target.to_string_lossy()));
            (Request::PoolDefine { xml }, Box::new(|r| format!("Pool {} defined\n", named(r))))
        }
        C::PoolBuild { pool } => (Request::PoolBuild { pool: pool.clone() }, Box::new(|r| format!("Pool {} built\n", named(r)))),
        C::PoolStart { pool, build } => (Request::PoolStart { pool: pool.clone(), build: *build }, Box::new(|r| format!("Pool {} started\n", named(r)))),
        C::PoolDestroy { pool } => (Request::PoolDestroy { pool: pool.clone() }, Box::new(|r| format!("Pool {} destroyed\n", named(r)))),
        C::PoolDelete { pool } => (Request::PoolDelete { pool: pool.clone() }, Box::new(|r| format!("Pool {} deleted\n", named(r)))),
        C::PoolUndefine { pool } => (Request::PoolUndefine { pool: pool.clone() }, Box::new(|r| format!("Pool {} has been undefined\n", named(r)))),
        C::PoolAutostart { pool, disable } => {
            let how = if *disable { "unmarked" } else { "marked" };
            (Request::PoolAutostart { pool: pool.clone(), enable: !disable }, Box::new(move |r| format!("Pool {} {how} as autostarted\n", named(r))))
        }
        C::PoolDumpxml { pool } => (Request::PoolDumpXml { pool: pool.clone() }, Box::new(|r| r.xml.clone().unwrap_or_default())),
        C::VolList { pool, details } => {
            let details = *details;
            (Request::VolList { pool: pool.clone() }, Box::new(move |r| vol_list(r.volumes.as_deref().unwrap_or_default(), details)))
        }
        C::VolInfo { vol, pool } => return Ok(Action::Print(vol_info(&volume(conn, pool, vol)?))),
        C::VolPath { vol, pool } => return Ok(Action::Print(format!("{}\n", volume(conn, pool, vol)?.path))),
        C::VolDumpxml { vol, pool } => (Request::VolDumpXml { pool: pool.clone(), volume: vol.clone() }, Box::new(|r| r.xml.clone().unwrap_or_default())),
        C::VolCreate { pool, file, prealloc_metadata } => {
            let f = file.display().to_string();
            let req = Request::VolCreate { pool: pool.clone(), xml: read(file)?, clone_of: None, prealloc_metadata: *prealloc_metadata };
            (req, Box::new(move |r| format!("Vol {} created from {f}\n", named(r))))
        }
        C::VolCreateAs { pool, name, capacity, allocation, format, backing_vol, backing_vol_format, prealloc_metadata } => {
            let mut xml = format!("<volume>\n  <name>{}</name>\n  <capacity>{}</capacity>\n", escape(name), parse_bytes(capacity)?);
            if let Some(a) = allocation {
                xml += &format!("  <allocation>{}</allocation>\n", parse_bytes(a)?);
            }
            if let Some(f) = format {
                xml += &format!("  <target>\n    <format type='{}'/>\n  </target>\n", escape(f));
            }
            if let Some(b) = backing_vol {
                // A name in the pool, or a path.
                let path = if b.contains('/') { b.clone() } else { volume(conn, pool, b)?.path };
                xml += &format!("  <backingStore>\n    <path>{}</path>\n", escape(&path));
                if let Some(f) = backing_vol_format {
                    xml += &format!("    <format type='{}'/>\n", escape(f));
                }
                xml += "  </backingStore>\n";
            }
            xml += "</volume>\n";
            (Request::VolCreate { pool: pool.clone(), xml, clone_of: None, prealloc_metadata: *prealloc_metadata }, Box::new(|r| format!("Vol {} created\n", named(r))))
        }
        C::VolClone { vol, newname, pool } => {
            let xml = format!("<volume>\n  <name>{}</name>\n</volume>\n", escape(newname));
            let from = vol.clone();
            (Request::VolCreate { pool: pool.clone(), xml, clone_of: Some(vol.clone()), prealloc_metadata: false }, Box::new(move |r| format!("Vol {} cloned from {from}\n", named(r))))
        }
        C::VolResize { vol, capacity, pool, delta, shrink, allocate } => {
            let size = capacity.clone();
            let req = Request::VolResize { pool: pool.clone(), volume: vol.clone(), capacity: parse_bytes(capacity)?, delta: *delta, shrink: *shrink, allocate: *allocate };
            (req, Box::new(move |r| format!("Size of volume '{}' successfully changed to {size}\n", named(r))))
        }
        C::VolWipe { vol, pool } => (Request::VolWipe { pool: pool.clone(), volume: vol.clone() }, Box::new(|r| format!("Vol {} wiped\n", named(r)))),
        C::VolDelete { vol, pool } => (Request::VolDelete { pool: pool.clone(), volume: vol.clone() }, Box::new(|r| format!("Vol {} deleted\n", named(r)))),
    };
    Ok(Action::Call(req, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_and_print_as_virsh_does() {
        assert_eq!(parse_bytes("1073741824").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("2GB").unwrap(), 2_000_000_000);
        assert!(parse_bytes("1Q").is_err() && parse_bytes("big").is_err() && parse_bytes("99E").is_err());
        assert_eq!(pretty(1 << 30), "1.00 GiB");
        assert_eq!(pretty(200_704), "196.00 KiB");
        assert_eq!(pretty(12), "12.00 B");
    }

    #[test]
    fn tables_are_laid_out_like_virsh() {
        let p = PoolSummary { name: "images".into(), active: true, autostart: true, persistent: true, capacity: 1 << 30, ..Default::default() };
        let t = pool_list(std::slice::from_ref(&p));
        assert_eq!(t.lines().nth(2).unwrap().split_whitespace().collect::<Vec<_>>(), ["images", "active", "yes"]);
        assert!(pool_info(&p).contains("State:          running\n") && pool_info(&p).contains("Capacity:       1.00 GiB\n"));
        let v = VolumeSummary { name: "a.qcow2".into(), path: "/p/a.qcow2".into(), format: "qcow2".into(), capacity: 1 << 30, allocation: 200_704 };
        let l = vol_list(std::slice::from_ref(&v), true);
        assert_eq!(l.lines().nth(2).unwrap().split_whitespace().collect::<Vec<_>>(), ["a.qcow2", "/p/a.qcow2", "file", "1.00", "GiB", "196.00", "KiB"]);
        assert!(vol_info(&v).starts_with("Name:           a.qcow2\nType:           file\n"));
    }
}
