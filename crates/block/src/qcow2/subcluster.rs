//! Extended L2 entries (qcow2's subclusters): 128-bit entries, a cluster
//! descriptor and a bitmap of 32 subclusters each allocated, zero or the
//! backing file's. Writers speak standard entries, stored here as their
//! 128-bit equivalent; partial and zero writes within a cluster touch only
//! the subclusters they cover, as qemu's do.

use super::{Inner, Mapping, Qcow2Image, COMPRESSED, COPIED, L2_OFFSET_MASK, SUBCLUSTERS, ZERO};
use crate::Result;

/// An extended L2 bitmap with every subcluster allocated (the low 32 bits).
const SUB_ALL_ALLOCATED: u64 = 0xffff_ffff;
/// An extended L2 bitmap with every subcluster reading as zeros (the high 32 bits).
const SUB_ALL_ZERO: u64 = 0xffff_ffff << 32;

impl Qcow2Image {
    /// Stores an extended L2 entry as given: its descriptor and subcluster bitmap.
    pub(super) fn set_l2_extended(&self, inner: &mut Inner, l2_off: u64, guest_cluster: u64, descriptor: u64, bitmap: u64) -> Result<()> {
        let idx = (guest_cluster % self.l2_entries()) as usize;
        put_pair(self.l2_table(inner, l2_off)?, idx, descriptor, bitmap);
        inner.l2_dirty.insert(l2_off);
        Ok(())
    }

    /// The host cluster (or 0) and subcluster bits (allocated, zero) of
    /// `m`, when its subclusters can be changed one by one: the host cluster
    /// is ours alone and holds plain data (not compressed, not shared with a
    /// snapshot, not in an external data file). None: the cluster must be
    /// rewritten whole.
    fn own_subclusters(&self, inner: &mut Inner, m: Mapping) -> Result<Option<(u64, u32, u32)>> {
        let bits = match m {
            Mapping::Unallocated => (0, 0, 0),
            Mapping::Zero { host } => (host, 0, u32::MAX),
            Mapping::Sub { host, alloc, zero } => (host, alloc, zero),
            Mapping::Data { host, copied: true } => (host, u32::MAX, 0),
            _ => return Ok(None),
        };
        if self.data_file_name.is_some() || (bits.0 != 0 && self.refcount(inner, bits.0)? != 1) {
            return Ok(None);
        }
        Ok(Some(bits))
    }

    /// With extended L2: writes only the subclusters `data` touches (partial
    /// ones completed from what reads see), into the cluster's own host
    /// cluster or a new one, and marks just those allocated, as qemu does.
    /// False when the cluster must be copied whole (compressed, shared).
    pub(super) fn write_subclusters(&self, inner: &mut Inner, gc: u64, current: Mapping, in_cluster: u64, data: &[u8]) -> Result<bool> {
        if data.is_empty() {
            return Ok(true);
        }
        let Some((host, alloc, zero)) = self.own_subclusters(inner, current)? else { return Ok(false) };
        let cs = self.cluster_size();
        let sc = cs / SUBCLUSTERS;
        let (first, last) = (in_cluster / sc, (in_cluster + data.len() as u64 - 1) / sc);
        let (start, len) = (first * sc, (last + 1 - first) * sc);
        let mut piece = vec![0u8; len as usize];
        if in_cluster != start || data.len() as u64 != len {
            self.read_in_cluster(inner, gc * cs + start, &mut piece)?;
        }
        piece[(in_cluster - start) as usize..(in_cluster - start) as usize + data.len()].copy_from_slice(data);
        let l2_off = self.writable_l2(inner, gc)?;
        let host = if host != 0 { host } else { self.alloc_clusters(inner, 1)? };
        self.file.write_all_at(&piece, host + start).map_err(|e| self.io(e))?;
        inner.file_len = inner.file_len.max(host + cs);
        let mask = subcluster_mask(first, last);
        let bitmap = u64::from(alloc | mask) | u64::from(zero & !mask) << 32;
        self.set_l2_extended(inner, l2_off, gc, host | COPIED, bitmap)?;
        Ok(true)
    }

    /// With extended L2: makes `len` bytes at `pos`, whole subclusters
    /// within one cluster, read as zeros by their zero bits (what qemu does
    /// for a zero write within a cluster). False when they must be written
    /// as zeros instead (no subclusters, not whole ones, or a cluster that
    /// is compressed, shared or in an external data file).
    pub(super) fn zero_subclusters(&self, inner: &mut Inner, pos: u64, len: u64) -> Result<bool> {
        let cs = self.cluster_size();
        let sc = cs / SUBCLUSTERS;
        if !self.extended_l2 || len == 0 || pos % sc != 0 || len % sc != 0 {
            return Ok(false);
        }
        let gc = pos / cs;
        let m = self.mapping(inner, gc)?;
        let Some((host, alloc, zero)) = self.own_subclusters(inner, m)? else { return Ok(false) };
        let mask = subcluster_mask(pos % cs / sc, (pos % cs + len) / sc - 1);
        let l2_off = self.writable_l2(inner, gc)?;
        let descriptor = if host != 0 { host | COPIED } else { 0 };
        let bitmap = u64::from(alloc & !mask) | u64::from(zero | mask) << 32;
        self.set_l2_extended(inner, l2_off, gc, descriptor, bitmap)?;
        Ok(true)
    }
}

/// The subcluster bits `first..=last` of an extended L2 bitmap half.
fn subcluster_mask(first: u64, last: u64) -> u32 {
    (((1u64 << (last + 1)) - 1) & !((1u64 << first) - 1)) as u32
}

/// Stores entry `idx` of an extended L2 table: descriptor, then bitmap.
fn put_pair(table: &mut [u64], idx: usize, descriptor: u64, bitmap: u64) {
    table[idx * 2] = descriptor;
    table[idx * 2 + 1] = bitmap;
}

/// Stores a standard L2 entry (data, zero flag, compressed or empty) at
/// entry `idx` of `table`; with extended L2 as its 128-bit equivalent, the
/// whole cluster allocated or zero (what writers of whole clusters store).
pub(crate) fn put_l2_entry(table: &mut [u64], extended: bool, idx: usize, entry: u64) {
    if !extended {
        table[idx] = entry;
        return;
    }
    let (descriptor, bitmap) = if entry & COMPRESSED != 0 {
        (entry, 0)
    } else if entry & ZERO != 0 {
        (entry & !ZERO, SUB_ALL_ZERO)
    } else if entry & (L2_OFFSET_MASK | COPIED) != 0 {
        (entry, SUB_ALL_ALLOCATED)
    } else {
        (0, 0)
    };
    put_pair(table, idx, descriptor, bitmap);
}
