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
pub(super) struct Census {
    pub(super) refs: Vec<u32>,
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
        let damaged = !inner.refcount_damage.is_empty();
        // Setting a refcount could allocate over clusters in use.
        let refuse = || crate::Error::Request("the refcount structures are damaged or overlap other data; only -r all can rebuild them".into());
        match repair {
            Repair::None if damaged => return self.compare(&mut inner, Repair::None),
            Repair::Leaks if damaged => return Err(refuse()),
            _ => {}
        }
        // The census reads tables from the cache and the file alike: make them agree.
        self.commit(&mut inner)?;
        // A repair counts every reference but the refcount structures' once:
        // whether those overlap it, and what a rebuild writes.
        let others = if repair == Repair::None { None } else { Some(self.census(&mut inner, false)?) };
        let overlap = others.as_ref().is_some_and(|c| self.refcounts_overlap(&inner, c));
        if overlap && repair == Repair::Leaks {
            return Err(refuse());
        }
        let was_rebuilt = repair == Repair::All && (damaged || overlap);
        let first = match others {
            Some(census) if was_rebuilt => {
                let before = self.compare(&mut inner, Repair::None)?;
                self.rebuild_refcounts(&mut inner, &census.refs, false)?;
                before
            }
            _ => self.compare(&mut inner, repair)?,
        };
        if repair == Repair::None || (first.leaks == 0 && first.corruptions == 0) {
            if repair == Repair::All {
                self.unmark_corrupt(&mut inner)?;
            }
            return Ok(first);
        }
        if repair == Repair::All {
            if inner.snapshot_damage.is_some() {
                self.drop_snapshot_table(&mut inner)?;
            }
            self.fix_copied(&mut inner)?;
        }
        self.commit(&mut inner)?;
        let mut after = self.compare(&mut inner, Repair::None)?;
        after.leaks_fixed = first.leaks.saturating_sub(after.leaks);
        after.corruptions_fixed = first.corruptions.saturating_sub(after.corruptions);
        // What was found first, then what the repair did, then what is left.
        let mut messages = first.messages.clone();
        if was_rebuilt {
            messages.push("Rebuilding refcount structure".into());
        }
        messages.append(&mut after.messages);
        after.messages = messages;
        if repair == Repair::All && after.corruptions == 0 {
            self.unmark_corrupt(&mut inner)?;
        }
        Ok(after)
    }

    /// A repaired image is no longer marked corrupt, as qemu-img leaves it.
    fn unmark_corrupt(&self, inner: &mut Inner) -> Result<()> {
        if inner.header.incompatible_features & super::INCOMPAT_CORRUPT != 0 {
            let f = inner.header.incompatible_features & !super::INCOMPAT_CORRUPT;
            self.write_incompatible(inner, f)?;
        }
        Ok(())
    }

    /// Forgets an unreadable snapshot table (what it named cannot be found
    /// anyway); the clusters only it used are then leaks, which the repair frees.
    fn drop_snapshot_table(&self, inner: &mut Inner) -> Result<()> {
        // An empty table: the header says so, and nothing read is freed.
        self.write_snapshot_table(inner, Vec::new())?;
        inner.snapshot_damage = None;
        // The leaks it leaves are freed now.
        self.compare(inner, Repair::Leaks).map(drop)
    }

    /// Whether a refcount block or the refcount table shares a cluster with
    /// other metadata or data (then fixing counts in place cannot work).
    /// `others` counts every reference but the refcount structures'.
    fn refcounts_overlap(&self, inner: &Inner, others: &Census) -> bool {
        let cs = self.cluster_size();
        let h = &inner.header;
        let table = (h.refcount_table_offset / cs)..(h.refcount_table_offset / cs + u64::from(h.refcount_table_clusters));
        let taken = |c: u64| others.refs.get(c as usize).is_some_and(|&r| r > 0);
        // Only clusters inside the file can be taken: a damaged header may
        // claim a table of billions of clusters.
        let inside = table.start..table.end.min(others.refs.len() as u64);
        inside.into_iter().any(taken) || inner.reftable.iter().any(|&b| b != 0 && (taken(b / cs) || table.contains(&(b / cs))))
    }

    /// Writes new refcount structures after the end of the file, holding
    /// the counts `refs` (every reference but the refcount structures'
    /// own), and points the header at them (`whole_header`: the whole header
    /// in one write, for a new refcount width). The old ones become free space.
    pub(super) fn rebuild_refcounts(&self, inner: &mut Inner, refs: &[u32], whole_header: bool) -> Result<()> {
        let cs = self.cluster_size();
        let bits = 1u64 << inner.header.refcount_order;
        let per_block = cs * 8 / bits;
        let max = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
        let used = refs.iter().rposition(|&r| r > 0).map_or(1, |i| i as u64 + 1);
        let start = used.max(inner.file_len.div_ceil(cs));
        let (mut blocks, mut table) = (0u64, 0u64);
        loop {
            let total = start + table + blocks;
            let b = total.div_ceil(per_block);
            let t = (b * 8).div_ceil(cs).max(1);
            if (b, t) == (blocks, table) {
                break;
            }
            (blocks, table) = (b, t);
        }
        if table * cs > super::MAX_REFTABLE_BYTES {
            return Err(self.corrupt(format!("a refcount table for {} clusters would be too large", start + table + blocks)));
        }
        let (table_off, blocks_off) = (start * cs, (start + table) * cs);
        let total = start + table + blocks;
        let mut entries = vec![0u64; (table * cs / 8) as usize];
        for (i, e) in entries.iter_mut().enumerate().take(blocks as usize) {
            let mut block = vec![0u8; cs as usize];
            for idx in 0..per_block {
                let c = i as u64 * per_block + idx;
                if c >= total {
                    break;
                }
                let counted = refs.get(c as usize).map_or(0, |&r| u64::from(r));
                let value = if c >= start { 1 } else { counted.min(max) };
                if value != 0 {
                    super::refcount::put_refcount(&mut block, idx, bits, value);
                }
            }
            let off = blocks_off + i as u64 * cs;
            self.file.write_all_at(&block, off).map_err(|e| self.io(e))?;
            *e = off;
        }
        super::write_table(&*self.file, table_off, &entries).map_err(|e| self.io(e))?;
        self.sync()?;
        if whole_header {
            // Width and table change together: the header is one sector, written at once.
            inner.header.refcount_table_offset = table_off;
            inner.header.refcount_table_clusters = table as u32;
            self.file.write_all_at(&inner.header.to_bytes(), 0).map_err(|e| self.io(e))?;
            self.sync()?;
        } else {
            self.switch_reftable(inner, table_off, table as u32)?;
        }
        inner.reftable = entries;
        inner.rc_cache.clear();
        inner.rc_lru.clear();
        inner.rc_dirty.clear();
        inner.file_len = inner.file_len.max(total * cs);
        inner.next_free = total * cs;
        inner.free_hint = 0;
        inner.refcount_damage.clear();
        Ok(())
    }

    /// Counts references, compares them with the refcounts, and writes the
    /// counted value where `repair` allows.
    fn compare(&self, inner: &mut Inner, repair: Repair) -> Result<CheckReport> {
        let mut census = self.census(inner, true)?;
        let cs = self.cluster_size();
        // Like qemu-img, only clusters inside the file are compared: stale
        // refcounts past its end are overwritten when the file grows.
        let scan = census.refs.len() as u64;
        // COPIED flags are judged against the refcounts as found.
        self.check_copied(inner, &mut census.report)?;
        let mut highest = 0u64;
        let bits = 1u64 << inner.header.refcount_order;
        let per_block = cs * 8 / bits;
        // The refcount block in use, copied once rather than looked up per cluster.
        let mut block: Option<(u64, Vec<u8>)> = None;
        for c in 0..scan {
            let counted = census.refs.get(c as usize).copied().map_or(0, u64::from);
            let at = inner.reftable.get((c / per_block) as usize).copied().unwrap_or(0);
            let stored = if at == 0 {
                0
            } else {
                if block.as_ref().is_none_or(|(b, _)| *b != at) {
                    block = Some((at, self.rc_block(inner, at)?.clone()));
                }
                block.as_ref().map_or(0, |(_, b)| super::refcount::get_refcount(b, c % per_block, bits))
            };
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
                // The copy is stale now (and the table may have grown).
                block = None;
            }
        }
        census.report.image_end_offset = highest * cs;
        Ok(census.report)
    }

    /// Walks header, tables, snapshots, bitmaps and (with `refcount_structures`) refcount structures.
    pub(super) fn census(&self, inner: &mut Inner, refcount_structures: bool) -> Result<Census> {
        let cs = self.cluster_size();
        let h = inner.header.clone();
        let file_clusters = inner.file_len.max(inner.next_free).div_ceil(cs);
        let mut c = Census { refs: vec![0; file_clusters as usize], report: CheckReport::default() };
        c.report.total_clusters = h.size.div_ceil(cs);
        c.add(cs, 0, cs, "header");
        c.add(cs, h.l1_table_offset, u64::from(h.l1_size) * 8, "L1 table");
        let l1 = inner.l1.clone();
        self.census_l1(inner, &l1, true, &mut c)?;
        if refcount_structures {
            if !inner.reftable.is_empty() {
                c.add(cs, h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs, "refcount table");
            }
            for &b in &inner.reftable {
                if b != 0 {
                    c.add(cs, b, cs, "refcount block");
                }
            }
            for d in inner.refcount_damage.iter().chain(&inner.snapshot_damage).cloned().collect::<Vec<_>>() {
                c.corrupt(format!("ERROR {d}"));
            }
        }
        if h.nb_snapshots > 0 {
            let len = inner.snapshots.iter().map(|s| s.table_len()).sum();
            c.add(cs, h.snapshots_offset, len, "snapshot table");
        }
        for (off, len, what) in inner.bitmaps.stored_ranges(&*self.file, cs) {
            if len == 0 {
                c.corrupt(format!("ERROR {what}"));
            } else {
                c.add(cs, off, len, &what);
            }
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
            for (j, _, m) in self.table_mappings(inner.header.version, &table, end) {
                let m = match m {
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
                    // Data in an external file may start at its offset 0.
                    Mapping::Data { host, .. } | Mapping::Zero { host } | Mapping::Sub { host, .. } if host != 0 || matches!(m, Mapping::Data { .. }) => {
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
            if self.data_file_name.is_some() {
                // Data clusters in an external file have no refcounts to agree with.
                continue;
            }
            for (_, e, m) in self.table_mappings(inner.header.version, &table, end) {
                let Some(host) = m.ok().and_then(Mapping::flagged_host) else { continue };
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
