//! Internal snapshots: each one is a copy of the L1 table plus one more
//! reference on every L2 table and data cluster it reaches, so later writes
//! copy-on-write instead of changing what the snapshot sees. The snapshot
//! table lists them (QEMU's layout: fixed fields, extra data, id, name).

use std::time::{SystemTime, UNIX_EPOCH};

use super::{be32, be64, read_table, write_table, Header, Inner, Qcow2Image, COPIED, L1_OFFSET_MASK, MAX_L1_BYTES};
use crate::{Error, Result};

/// QEMU's limits on the snapshot table.
const MAX_SNAPSHOTS: u32 = 65536;
const MAX_TABLE_BYTES: u64 = 64 << 20;
const MAX_EXTRA_DATA: u32 = 1024;
/// Extra data QEMU writes: vm_state_size_large, disk_size, icount.
const EXTRA_DATA_LEN: usize = 24;

/// One internal snapshot, as listed by `qemu-img snapshot -l`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Unique id (QEMU numbers them 1, 2, ...).
    pub id: String,
    /// The user's name for it.
    pub name: String,
    /// Its copy of the L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Creation time (seconds and nanoseconds since the epoch).
    pub date_sec: u32,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// Guest clock at the snapshot (0 for disk-only snapshots).
    pub vm_clock_nsec: u64,
    /// Size of saved VM state (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Virtual disk size when taken (version 3 images).
    pub disk_size: Option<u64>,
    /// The extra-data bytes as stored (unknown fields kept).
    extra: Vec<u8>,
}

/// Reads and validates the snapshot table named by `h`.
pub(crate) fn read_snapshot_table(file: &dyn crate::ImageFile, h: &Header, file_len: u64, name: &str) -> Result<Vec<Snapshot>> {
    let corrupt = |d: String| Error::Corrupt { path: name.into(), detail: d };
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    let cs = h.cluster_size();
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(corrupt(format!("{} snapshots is more than {MAX_SNAPSHOTS}", h.nb_snapshots)));
    }
    if h.snapshots_offset % cs != 0 || h.snapshots_offset < cs || h.snapshots_offset >= file_len {
        return Err(corrupt(format!("snapshot table at {:#x} is misaligned, in the header or past the end", h.snapshots_offset)));
    }
    let io = |e: std::io::Error| Error::Io { path: name.into(), source: e };
    let mut out = Vec::with_capacity(h.nb_snapshots as usize);
    let mut off = h.snapshots_offset;
    for i in 0..h.nb_snapshots {
        if off + 40 > file_len || off - h.snapshots_offset > MAX_TABLE_BYTES {
            return Err(corrupt(format!("snapshot table entry {i} is past the end of the file or the table limit")));
        }
        let mut f = [0u8; 40];
        file.read_exact_at(&mut f, off).map_err(io)?;
        let (id_len, name_len, extra_len) = (u16::from_be_bytes([f[12], f[13]]) as u64, u16::from_be_bytes([f[14], f[15]]) as u64, be32(&f, 36));
        if extra_len > MAX_EXTRA_DATA {
            return Err(corrupt(format!("snapshot {i} has {extra_len} bytes of extra data")));
        }
        let var_len = u64::from(extra_len) + id_len + name_len;
        if off + 40 + var_len > file_len {
            return Err(corrupt(format!("snapshot table entry {i} is past the end of the file")));
        }
        let mut var = vec![0u8; var_len as usize];
        file.read_exact_at(&mut var, off + 40).map_err(io)?;
        let (extra, rest) = var.split_at(extra_len as usize);
        let (id, sname) = rest.split_at(id_len as usize);
        let (l1_table_offset, l1_size) = (be64(&f, 0), be32(&f, 8));
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!("snapshot {i} L1 table is too large")));
        }
        let l1_end = l1_table_offset.checked_add(u64::from(l1_size) * 8);
        if l1_table_offset % cs != 0 || l1_table_offset < cs || l1_end.is_none_or(|e| e > file_len) {
            return Err(corrupt(format!("snapshot {i} L1 table at {l1_table_offset:#x} is misaligned, in the header or past the end")));
        }
        if h.version >= 3 && extra.len() < 16 {
            return Err(corrupt(format!("snapshot {i} lacks the extra data version 3 requires")));
        }
        let vm_state_large = (extra.len() >= 8).then(|| be64(extra, 0));
        out.push(Snapshot {
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(sname).into_owned(),
            l1_table_offset,
            l1_size,
            date_sec: be32(&f, 16),
            date_nsec: be32(&f, 20),
            vm_clock_nsec: be64(&f, 24),
            vm_state_size: vm_state_large.unwrap_or(u64::from(be32(&f, 32))),
            disk_size: (extra.len() >= 16).then(|| be64(extra, 8)),
            extra: extra.to_vec(),
        });
        off = (off + 40 + var_len).next_multiple_of(8);
    }
    Ok(out)
}

impl Snapshot {
    /// Instruction count at the snapshot (record/replay), when stored.
    pub fn icount(&self) -> Option<u64> {
        (self.extra.len() >= 24).then(|| be64(&self.extra, 16)).filter(|&v| v != u64::MAX)
    }

    /// Bytes this entry takes in the snapshot table.
    pub(crate) fn table_len(&self) -> u64 {
        (40 + self.extra.len() + self.id.len() + self.name.len()).next_multiple_of(8) as u64
    }
}

fn serialize(snaps: &[Snapshot]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in snaps {
        b.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&s.l1_size.to_be_bytes());
        b.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&s.date_sec.to_be_bytes());
        b.extend_from_slice(&s.date_nsec.to_be_bytes());
        b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&(s.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        b.extend_from_slice(&(s.extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&s.extra);
        b.extend_from_slice(s.id.as_bytes());
        b.extend_from_slice(s.name.as_bytes());
        b.resize(b.len().next_multiple_of(8), 0);
    }
    b
}

impl Qcow2Image {
    /// The image's internal snapshots.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.lock().snapshots.clone()
    }

    /// Takes a disk-only internal snapshot named `name`, refusing a name
    /// already taken (a VM's snapshots are found by name).
    pub fn create_snapshot(&self, name: &str) -> Result<()> {
        self.take_snapshot(name, false)
    }

    /// `qemu-img snapshot -c`: like [`Self::create_snapshot`], but a name may
    /// repeat, as qemu-img allows (each snapshot keeps its own id).
    pub fn create_snapshot_allowing_duplicate(&self, name: &str) -> Result<()> {
        self.take_snapshot(name, true)
    }

    fn take_snapshot(&self, name: &str, allow_duplicate: bool) -> Result<()> {
        self.writable()?;
        if self.data_file_name.is_some() {
            // A snapshot's clusters would share the data file's one copy of each.
            return Err(Error::Request("internal snapshots are not supported with an external data file".into()));
        }
        if name.is_empty() || name.len() > u16::MAX as usize {
            return Err(Error::Request("a snapshot name must be 1 to 65535 bytes".into()));
        }
        let cs = self.cluster_size();
        let mut inner = self.lock();
        if !allow_duplicate && inner.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::Request(format!("snapshot '{name}' already exists")));
        }
        if inner.snapshots.len() as u32 >= MAX_SNAPSHOTS {
            return Err(Error::Request(format!("an image holds at most {MAX_SNAPSHOTS} snapshots")));
        }
        self.commit(&mut inner)?;
        let l1 = inner.l1.clone();
        let clusters = (l1.len() as u64 * 8).div_ceil(cs).max(1);
        let l1_off = self.alloc_clusters(&mut inner, clusters)?;
        let copy: Vec<u64> = l1.iter().map(|e| e & !COPIED).collect();
        write_table(&*self.file, l1_off, &copy).map_err(|e| self.io(e))?;
        inner.file_len = inner.file_len.max(l1_off + clusters * cs);
        self.adjust_tree(&mut inner, &l1, 1)?;
        self.fix_copied(&mut inner)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let next_id = inner.snapshots.iter().filter_map(|s| s.id.parse::<u64>().ok()).max().unwrap_or(0) + 1;
        let mut extra = vec![0u8; EXTRA_DATA_LEN];
        extra[8..16].copy_from_slice(&inner.header.size.to_be_bytes());
        // icount stays 0, as qemu-img writes it.
        let snap = Snapshot {
            id: next_id.to_string(),
            name: name.to_string(),
            l1_table_offset: l1_off,
            l1_size: l1.len() as u32,
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(inner.header.size),
            extra,
        };
        let mut list = inner.snapshots.clone();
        list.push(snap);
        self.write_snapshot_table(&mut inner, list)
    }

    /// Reverts the disk to snapshot `which` (id or name), `qemu-img snapshot -a`.
    pub fn apply_snapshot(&self, which: &str) -> Result<()> {
        self.writable()?;
        let mut inner = self.lock();
        self.commit(&mut inner)?;
        let snap = find(&inner.snapshots, which)?.clone();
        // Enabled bitmaps record the switch as a write of the whole disk,
        // and follow the disk to the snapshot's size.
        if let Some(size) = snap.disk_size.filter(|&s| s != inner.header.size) {
            self.resize_bitmaps(&mut inner, size)?;
        }
        let size = snap.disk_size.unwrap_or(inner.header.size);
        inner.bitmaps.mark(0, size);
        let mut snap_l1 = read_table(&*self.file, snap.l1_table_offset, snap.l1_size as usize).map_err(|e| self.io(e))?;
        if snap.l1_size > inner.header.l1_size {
            self.grow_l1(&mut inner, snap.l1_size as usize)?;
        }
        snap_l1.resize(inner.header.l1_size as usize, 0);
        for e in &mut snap_l1 {
            *e &= !COPIED;
        }
        self.adjust_tree(&mut inner, &snap_l1, 1)?;
        // The snapshot's tree is counted before the active L1 points at it,
        // and the old tree loses its counts only once nothing points at it.
        self.flush_refcounts(&mut inner)?;
        self.sync()?;
        let old = std::mem::replace(&mut inner.l1, snap_l1);
        write_table(&*self.file, inner.header.l1_table_offset, &inner.l1).map_err(|e| self.io(e))?;
        self.sync()?;
        self.drop_l2_cache(&mut inner)?;
        self.adjust_tree(&mut inner, &old, -1)?;
        self.flush_refcounts(&mut inner)?;
        self.sync()?;
        self.fix_copied(&mut inner)?;
        if let Some(size) = snap.disk_size.filter(|&s| s != inner.header.size) {
            self.file.write_all_at(&size.to_be_bytes(), 24).map_err(|e| self.io(e))?;
            inner.header.size = size;
        }
        self.commit(&mut inner)
    }

    /// Makes this read-only open read snapshot `which` (id or name) instead
    /// of the active layer, at the snapshot's size (`convert -l`).
    pub fn view_snapshot(&self, which: &str) -> Result<()> {
        if !self.read_only {
            return Err(Error::Request("a snapshot is viewed through a read-only open".into()));
        }
        let mut inner = self.lock();
        let snap = find(&inner.snapshots, which)?.clone();
        let mut l1 = read_table(&*self.file, snap.l1_table_offset, snap.l1_size as usize).map_err(|e| self.io(e))?;
        let size = snap.disk_size.unwrap_or(inner.header.size);
        let cs = self.cluster_size();
        let needed = size.div_ceil(cs * (cs / 8)) as usize;
        if needed > l1.len() {
            l1.resize(needed, 0);
        }
        inner.l1 = l1;
        inner.header.size = size;
        inner.l2_cache.clear();
        inner.l2_lru.clear();
        Ok(())
    }

    /// Deletes snapshot `which` (id or name) and frees what only it used.
    pub fn delete_snapshot(&self, which: &str) -> Result<()> {
        self.writable()?;
        let cs = self.cluster_size();
        let mut inner = self.lock();
        self.commit(&mut inner)?;
        let snap = find(&inner.snapshots, which)?.clone();
        let list: Vec<Snapshot> = inner.snapshots.iter().filter(|s| s.id != snap.id).cloned().collect();
        self.write_snapshot_table(&mut inner, list)?;
        let l1 = read_table(&*self.file, snap.l1_table_offset, snap.l1_size as usize).map_err(|e| self.io(e))?;
        self.adjust_tree(&mut inner, &l1, -1)?;
        for i in 0..(u64::from(snap.l1_size) * 8).div_ceil(cs).max(1) {
            self.adjust_refcount(&mut inner, snap.l1_table_offset + i * cs, -1)?;
        }
        // Counts drop before flags claim a cluster is ours alone.
        self.flush_refcounts(&mut inner)?;
        self.sync()?;
        self.fix_copied(&mut inner)?;
        self.commit(&mut inner)
    }

    /// Writes `list` as a new snapshot table, switches the header to it and
    /// frees the old one.
    pub(crate) fn write_snapshot_table(&self, inner: &mut Inner, list: Vec<Snapshot>) -> Result<()> {
        let cs = self.cluster_size();
        let bytes = serialize(&list);
        if bytes.len() as u64 > MAX_TABLE_BYTES {
            return Err(Error::Request("the snapshot table would exceed 64 MiB".into()));
        }
        let new_off = if list.is_empty() {
            0
        } else {
            let off = self.alloc_clusters(inner, (bytes.len() as u64).div_ceil(cs))?;
            self.file.write_all_at(&bytes, off).map_err(|e| self.io(e))?;
            inner.file_len = inner.file_len.max(off + bytes.len() as u64);
            off
        };
        self.commit(inner)?;
        // nb_snapshots and snapshots_offset are adjacent: one write switches.
        let mut field = Vec::with_capacity(12);
        field.extend_from_slice(&(list.len() as u32).to_be_bytes());
        field.extend_from_slice(&new_off.to_be_bytes());
        self.file.write_all_at(&field, 60).map_err(|e| self.io(e))?;
        self.sync()?;
        let (old_off, old_len) = (inner.header.snapshots_offset, serialize(&inner.snapshots).len() as u64);
        inner.header.nb_snapshots = list.len() as u32;
        inner.header.snapshots_offset = new_off;
        inner.snapshots = list;
        if old_off != 0 {
            for i in 0..old_len.div_ceil(cs) {
                self.adjust_refcount(inner, old_off + i * cs, -1)?;
            }
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of every L2 table and data cluster
    /// reachable from `l1` (once per reference, as `qemu-img check` counts).
    pub(crate) fn adjust_tree(&self, inner: &mut Inner, l1: &[u64], delta: i64) -> Result<()> {
        let cs = self.cluster_size();
        for &l1e in l1 {
            let l2 = l1e & L1_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let table = self.l2_table(inner, l2)?.clone();
            let end = inner.file_len.max(inner.next_free);
            let version = inner.header.version;
            let held: Vec<std::ops::Range<u64>> =
                self.table_mappings(version, &table, end).map(|(_, _, m)| m.map(|m| self.clusters_of(m))).collect::<Result<_>>()?;
            for r in held {
                for c in r {
                    self.adjust_refcount(inner, c * cs, delta)?;
                }
            }
            self.adjust_refcount(inner, l2, delta)?;
            if self.refcount(inner, l2)? == 0 {
                inner.l2_cache.remove(&l2);
                inner.l2_dirty.remove(&l2);
                inner.l2_lru.retain(|&o| o != l2);
            }
        }
        Ok(())
    }

    /// Sets the COPIED flag on every active L1 and L2 entry whose cluster has
    /// refcount 1 and clears it elsewhere, as the format requires.
    pub(crate) fn fix_copied(&self, inner: &mut Inner) -> Result<()> {
        let end = inner.file_len.max(inner.next_free);
        let mut l1_changed = false;
        for i in 0..inner.l1.len() {
            let l1e = inner.l1[i];
            let l2 = l1e & L1_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let want = if self.refcount(inner, l2)? == 1 { l2 | COPIED } else { l2 };
            if want != l1e {
                inner.l1[i] = want;
                l1_changed = true;
            }
            let mut table = self.l2_table(inner, l2)?.clone();
            let mut changed = false;
            // COPIED lives in the descriptor, an entry's first word.
            for words in table.chunks_mut(self.l2_entry_words()) {
                let Some(host) = self.decode_entry(inner.header.version, words, end)?.flagged_host() else { continue };
                let e = &mut words[0];
                let want = if self.refcount(inner, host)? == 1 { *e | COPIED } else { *e & !COPIED };
                if want != *e {
                    *e = want;
                    changed = true;
                }
            }
            if changed {
                self.write_l2_table(inner, l2, table)?;
            }
        }
        if l1_changed {
            write_table(&*self.file, inner.header.l1_table_offset, &inner.l1).map_err(|e| self.io(e))?;
        }
        Ok(())
    }
}

fn find<'a>(snaps: &'a [Snapshot], which: &str) -> Result<&'a Snapshot> {
    snaps
        .iter()
        .find(|s| s.id == which)
        .or_else(|| snaps.iter().find(|s| s.name == which))
        .ok_or_else(|| Error::Request(format!("no snapshot with id or name '{which}'")))
}
