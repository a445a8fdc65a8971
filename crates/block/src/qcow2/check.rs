//! Consistency check and repair (`qemu-img check [-r leaks|all]`): count
//! every reference the metadata makes to each host cluster, compare with the
//! stored refcounts, and optionally write the counted values back.

use super::{Inner, Mapping, Qcow2Image, COPIED, L1_OFFSET_MASK};
use crate::Result;

/// What `check` may repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Report only.
    None,
    /// Lower refcounts that are too high (leaked clusters).
    Leaks,
    /// Also raise refcounts that are too low and fix COPIED flags.
    All,
}

/// What `check` found, in `qemu-img check`'s terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Refcounts lower than the references (data at risk), bad pointers, wrong COPIED flags.
    pub corruptions: u64,
    /// Refcounts higher than the references (wasted space only).
    pub leaks: u64,
    /// Corruptions repaired by this run.
    pub corruptions_fixed: u64,
    /// Leaks repaired by this run.
    pub leaks_fixed: u64,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in this image.
    pub allocated_clusters: u64,
    /// Allocated clusters not stored right after the previous one.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// One line per problem, as qemu-img prints them.
    pub messages: Vec<String>,
}

/// References counted by walking the metadata.
struct Census {
    refs: Vec<u32>,
    report: CheckReport,
}

impl Census {
    fn add(&mut self, cs: u64, offset: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        let (first, last) = (offset / cs, (offset + len - 1) / cs);
        if last >= self.refs.len() as u64 {
            self.report.corruptions += 1;
            self.report.messages.push(format!("ERROR {what} at {offset:#x} is past the end of the image file"));
            return;
        }
        for c in first..=last {
            self.refs[c as usize] = self.refs[c as usize].saturating_add(1);
        }
    }

    fn corrupt(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.report.messages.push(msg);
    }
}

impl Qcow2Image {
    /// Checks the image's metadata; with `repair` other than `None` (needs a
    /// read-write image), fixes what it can and checks again.
    pub fn check(&self, repair: Repair) -> Result<CheckReport> {
        if repair != Repair::None {
            self.writable()?;
        }
        let mut inner = self.lock();
        // The census reads tables from the cache and the file alike: make them agree.
        self.commit(&mut inner)?;
        let first = self.compare(&mut inner, repair)?;
        if repair == Repair::None || (first.leaks == 0 && first.corruptions == 0) {
            return Ok(first);
        }
        if repair == Repair::All {
            self.fix_copied(&mut inner)?;
        }
        self.commit(&mut inner)?;
        let mut after = self.compare(&mut inner, Repair::None)?;
        after.leaks_fixed = first.leaks.saturating_sub(after.leaks);
        after.corruptions_fixed = first.corruptions.saturating_sub(after.corruptions);
        Ok(after)
    }

    /// Counts references, compares them with the refcounts, and writes the
    /// counted value where `repair` allows.
    fn compare(&self, inner: &mut Inner, repair: Repair) -> Result<CheckReport> {
        let mut census = self.census(inner)?;
        let cs = self.cluster_size();
        // Like qemu-img, only clusters inside the file are compared: stale
        // refcounts past its end are overwritten when the file grows.
        let scan = census.refs.len() as u64;
        // COPIED flags are judged against the refcounts as found.
        self.check_copied(inner, &mut census.report)?;
        let mut highest = 0u64;
        for c in 0..scan {
            let counted = census.refs.get(c as usize).copied().map_or(0, u64::from);
            let stored = self.refcount(inner, c * cs)?;
            if stored > 0 || counted > 0 {
                highest = c + 1;
            }
            if stored == counted {
                continue;
            }
            let fix = if stored > counted {
                census.report.leaks += 1;
                census.report.messages.push(format!("Leaked cluster {c} refcount={stored} reference={counted}"));
                repair != Repair::None
            } else {
                census.corrupt(format!("ERROR cluster {c} refcount={stored} reference={counted}"));
                repair == Repair::All
            };
            if fix {
                self.set_refcount(inner, c * cs, counted)?;
            }
        }
        census.report.image_end_offset = highest * cs;
        Ok(census.report)
    }

    /// Walks header, tables, snapshots and refcount structures.
    fn census(&self, inner: &mut Inner) -> Result<Census> {
        let cs = self.cluster_size();
        let h = inner.header.clone();
        let file_clusters = inner.file_len.max(inner.next_free).div_ceil(cs);
        let mut c = Census { refs: vec![0; file_clusters as usize], report: CheckReport::default() };
        c.report.total_clusters = h.size.div_ceil(cs);
        c.add(cs, 0, cs, "header");
        c.add(cs, h.l1_table_offset, u64::from(h.l1_size) * 8, "L1 table");
        let l1 = inner.l1.clone();
        self.census_l1(inner, &l1, true, &mut c)?;
        c.add(cs, h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs, "refcount table");
        for &b in &inner.reftable {
            if b != 0 {
                c.add(cs, b, cs, "refcount block");
            }
        }
        if h.nb_snapshots > 0 {
            let len = inner.snapshots.iter().map(|s| s.table_len()).sum();
            c.add(cs, h.snapshots_offset, len, "snapshot table");
        }
        for s in inner.snapshots.clone() {
            c.add(cs, s.l1_table_offset, u64::from(s.l1_size) * 8, "snapshot L1 table");
            match super::read_table(&*self.file, s.l1_table_offset, s.l1_size as usize) {
                Ok(l1) => self.census_l1(inner, &l1, false, &mut c)?,
                Err(e) => c.corrupt(format!("ERROR snapshot {} L1 table: {e}", s.id)),
            }
        }
        Ok(c)
    }

    fn census_l1(&self, inner: &mut Inner, l1: &[u64], active: bool, c: &mut Census) -> Result<()> {
        let cs = self.cluster_size();
        let mut next_contiguous = 0u64;
        for (i, &l1e) in l1.iter().enumerate() {
            let l2 = l1e & L1_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let table = match self.l2_table(inner, l2) {
                Ok(t) => t.clone(),
                Err(e) => {
                    c.corrupt(format!("ERROR L1 entry {i}: {e}"));
                    continue;
                }
            };
            c.add(cs, l2, cs, "L2 table");
            let end = inner.file_len.max(inner.next_free);
            for (j, &e) in table.iter().enumerate() {
                let m = match self.decode_l2(inner.header.version, e, end) {
                    Ok(m) => m,
                    Err(err) => {
                        c.corrupt(format!("ERROR L2 entry {j} of table {l2:#x}: {err}"));
                        continue;
                    }
                };
                let r = self.clusters_of(m);
                if !r.is_empty() {
                    c.add(cs, r.start * cs, (r.end - r.start) * cs, "data cluster");
                }
                if !active {
                    continue;
                }
                match m {
                    Mapping::Compressed { .. } => {
                        // Fragmented by nature, as qemu-img counts them.
                        c.report.allocated_clusters += 1;
                        c.report.compressed_clusters += 1;
                        c.report.fragmented_clusters += 1;
                    }
                    Mapping::Data { host, .. } | Mapping::Zero { host } if host != 0 => {
                        c.report.allocated_clusters += 1;
                        if next_contiguous != 0 && host != next_contiguous {
                            c.report.fragmented_clusters += 1;
                        }
                        next_contiguous = host + cs;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// COPIED must be set exactly where the stored refcount is 1.
    fn check_copied(&self, inner: &mut Inner, report: &mut CheckReport) -> Result<()> {
        let end = inner.file_len.max(inner.next_free);
        for (i, l1e) in inner.l1.clone().into_iter().enumerate() {
            let l2 = l1e & L1_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let rc = self.refcount(inner, l2)?;
            if (rc == 1) != (l1e & COPIED != 0) {
                report.corruptions += 1;
                report.messages.push(format!("ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"));
            }
            let Ok(table) = self.l2_table(inner, l2).map(|t| t.clone()) else { continue };
            for e in table {
                let host = match self.decode_l2(inner.header.version, e, end) {
                    Ok(Mapping::Data { host, .. }) => host,
                    Ok(Mapping::Zero { host }) if host != 0 => host,
                    _ => continue,
                };
                let rc = self.refcount(inner, host)?;
                if (rc == 1) != (e & COPIED != 0) {
                    report.corruptions += 1;
                    report.messages.push(format!("ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"));
                }
            }
        }
        Ok(())
    }
}

/// Opens `path` and checks it (read-write when repairing).
pub fn check_path(path: &std::path::Path, repair: Repair) -> Result<CheckReport> {
    Qcow2Image::open(path, repair == Repair::None)?.check(repair)
}
