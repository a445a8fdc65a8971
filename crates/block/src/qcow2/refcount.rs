//! Refcounts: a two-level table (refcount table -> refcount blocks) holding
//! one counter per host cluster, of 1 to 64 bits. Blocks are cached; with
//! lazy refcounts their updates are written on flush and close instead of
//! at once (the dirty bit covers the gap).

use super::{Inner, Qcow2Image, MAX_REFTABLE_BYTES};
use crate::{Error, Result};

/// How many refcount blocks the cache keeps.
const RC_CACHE_BLOCKS: usize = 32;

impl Qcow2Image {
    fn refcount_bits(&self, inner: &Inner) -> u64 {
        1u64 << inner.header.refcount_order
    }

    /// (refcount table index, index inside the block) of the cluster at `host`.
    fn refcount_geometry(&self, inner: &Inner, host: u64) -> (usize, u64) {
        let cluster = host >> self.cluster_bits;
        let per_block = self.cluster_size() * 8 / self.refcount_bits(inner);
        ((cluster / per_block) as usize, cluster % per_block)
    }

    /// The cached refcount block at `block`, read in if needed.
    pub(crate) fn rc_block<'a>(&self, inner: &'a mut Inner, block: u64) -> Result<&'a mut Vec<u8>> {
        if !inner.rc_cache.contains_key(&block) {
            if inner.rc_cache.len() >= RC_CACHE_BLOCKS {
                let victim = inner.rc_lru.remove(0);
                if let Some(b) = inner.rc_cache.remove(&victim) {
                    if inner.rc_dirty.remove(&victim) {
                        self.file.write_all_at(&b, victim).map_err(|e| self.io(e))?;
                    }
                }
            }
            let mut b = vec![0u8; self.cluster_size() as usize];
            self.file.read_exact_at(&mut b, block).map_err(|e| self.io(e))?;
            inner.rc_cache.insert(block, b);
            inner.rc_lru.push(block);
        } else if inner.rc_lru.last() != Some(&block) {
            if let Some(pos) = inner.rc_lru.iter().position(|&o| o == block) {
                inner.rc_lru.remove(pos);
                inner.rc_lru.push(block);
            }
        }
        inner.rc_cache.get_mut(&block).ok_or_else(|| self.corrupt("refcount cache".into()))
    }

    /// The refcount of the cluster at `host` (0 where no block covers it).
    pub(crate) fn refcount(&self, inner: &mut Inner, host: u64) -> Result<u64> {
        let bits = self.refcount_bits(inner);
        let (rt_idx, idx) = self.refcount_geometry(inner, host);
        let block = inner.reftable.get(rt_idx).copied().unwrap_or(0);
        if block == 0 {
            return Ok(0);
        }
        Ok(get_refcount(self.rc_block(inner, block)?, idx, bits))
    }

    /// Sets the refcount of the cluster at `host`, creating its refcount
    /// block (and growing the refcount table) if needed.
    pub(crate) fn set_refcount(&self, inner: &mut Inner, host: u64, value: u64) -> Result<()> {
        let bits = self.refcount_bits(inner);
        if bits < 64 && value >= 1 << bits {
            return Err(self.corrupt(format!("refcount of cluster {host:#x} would overflow {bits} bits")));
        }
        let (rt_idx, idx) = self.refcount_geometry(inner, host);
        if rt_idx >= inner.reftable.len() {
            self.grow_reftable(inner, rt_idx)?;
        }
        let mut block = inner.reftable[rt_idx];
        if block == 0 {
            block = self.new_refcount_block(inner, rt_idx)?;
        }
        let lazy = self.lazy_refcounts;
        let b = self.rc_block(inner, block)?;
        put_refcount(b, idx, bits, value);
        if lazy {
            inner.rc_dirty.insert(block);
        } else {
            let (byte, nbytes) = ((idx * bits / 8) as usize, bits.div_ceil(8) as usize);
            let bytes = b[byte..byte + nbytes].to_vec();
            self.file.write_all_at(&bytes, block + byte as u64).map_err(|e| self.io(e))?;
        }
        if value == 0 {
            let cluster = host >> self.cluster_bits;
            inner.free_hint = inner.free_hint.min(cluster);
            if inner.compressed_cursor >> self.cluster_bits == cluster {
                inner.compressed_cursor = 0;
            }
        }
        Ok(())
    }

    /// Sets the refcounts of `n` clusters from `host` to `value`, writing
    /// each refcount block touched once instead of once per cluster.
    pub(crate) fn set_refcount_run(&self, inner: &mut Inner, host: u64, n: u64, value: u64) -> Result<()> {
        let cs = self.cluster_size();
        let bits = self.refcount_bits(inner);
        let mut spans: Vec<(u64, usize, usize)> = Vec::new();
        for i in 0..n {
            let h = host + i * cs;
            let (rt_idx, idx) = self.refcount_geometry(inner, h);
            let block = inner.reftable.get(rt_idx).copied().unwrap_or(0);
            if block == 0 || value == 0 || (bits < 64 && value >= 1 << bits) {
                // New blocks, table growth, overflow errors and frees take the general path.
                self.set_refcount(inner, h, value)?;
                continue;
            }
            put_refcount(self.rc_block(inner, block)?, idx, bits, value);
            let (lo, hi) = ((idx * bits / 8) as usize, ((idx + 1) * bits).div_ceil(8) as usize);
            match spans.last_mut() {
                Some((b, l, h)) if *b == block => (*l, *h) = ((*l).min(lo), (*h).max(hi)),
                _ => spans.push((block, lo, hi)),
            }
        }
        for (block, lo, hi) in spans {
            if self.lazy_refcounts {
                inner.rc_dirty.insert(block);
            } else if let Some(b) = inner.rc_cache.get(&block) {
                self.file.write_all_at(&b[lo..hi], block + lo as u64).map_err(|e| self.io(e))?;
            } else {
                return Err(self.corrupt("refcount block left the cache mid-update".into()));
            }
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of the cluster at `host`.
    pub(crate) fn adjust_refcount(&self, inner: &mut Inner, host: u64, delta: i64) -> Result<()> {
        let rc = self.refcount(inner, host)?;
        let new = rc.checked_add_signed(delta).ok_or_else(|| self.corrupt(format!("refcount of cluster {host:#x} would go below zero or overflow")))?;
        self.set_refcount(inner, host, new)
    }

    /// A new, zeroed refcount block for table slot `rt_idx`, at the end of
    /// the file. The table entry is written last, so a crash leaks the block.
    fn new_refcount_block(&self, inner: &mut Inner, rt_idx: usize) -> Result<u64> {
        let cs = self.cluster_size();
        let bits = self.refcount_bits(inner);
        let block = inner.next_free;
        inner.next_free += cs;
        let mut b = vec![0u8; cs as usize];
        let (own_rt, own_idx) = self.refcount_geometry(inner, block);
        if own_rt == rt_idx {
            put_refcount(&mut b, own_idx, bits, 1);
        }
        self.file.write_all_at(&b, block).map_err(|e| self.io(e))?;
        inner.file_len = inner.file_len.max(block + cs);
        if own_rt != rt_idx {
            // Counted elsewhere; that count lands before the table points here.
            self.set_refcount(inner, block, 1)?;
        }
        // The block's contents are durable before the table entry that makes them count.
        self.flush_refcounts(inner)?;
        self.sync()?;
        let slot = inner.header.refcount_table_offset + rt_idx as u64 * 8;
        self.file.write_all_at(&block.to_be_bytes(), slot).map_err(|e| self.io(e))?;
        inner.reftable[rt_idx] = block;
        Ok(block)
    }

    /// Moves the refcount table to a larger one at the end of the file that
    /// has a slot `needed`. The new table and the refcount blocks that count
    /// it are written before the header switches to it, so a crash before
    /// then only leaks them.
    fn grow_reftable(&self, inner: &mut Inner, needed: usize) -> Result<()> {
        let cs = self.cluster_size();
        let per_cluster = (cs / 8) as usize;
            let per_block = cs * 8 / self.refcount_bits(inner);
        // Room for the slot asked for and for the blocks counting the new table itself.
        let area_slot = (inner.next_free / cs / per_block) as usize + 2;
        let entries = (needed + 1).max(area_slot).max(inner.reftable.len() * 2).next_multiple_of(per_cluster);
        let table_clusters = (entries / per_cluster) as u64;
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported { path: self.name.clone(), detail: "refcount table would exceed 8 MiB".into() });
        }
        let start = inner.next_free / cs;
        let mut table = inner.reftable.clone();
        table.resize(entries, 0);
        // Blocks first, then the table; enough blocks to count the whole area.
        let mut nblocks = 0u64;
        let slots = loop {
            let end = start + nblocks + table_clusters;
            let slots: Vec<usize> = ((start / per_block) as usize..=((end - 1) / per_block) as usize).filter(|&i| table[i] == 0).collect();
            if slots.len() as u64 == nblocks {
                break slots;
            }
            nblocks = slots.len() as u64;
        };
        let area = start..start + nblocks + table_clusters;
        let bits = self.refcount_bits(inner);
        for (k, &slot) in slots.iter().enumerate() {
            let off = (start + k as u64) * cs;
            table[slot] = off;
            let mut b = vec![0u8; cs as usize];
            for c in area.clone().filter(|c| (c / per_block) as usize == slot) {
                put_refcount(&mut b, c % per_block, bits, 1);
            }
            self.file.write_all_at(&b, off).map_err(|e| self.io(e))?;
        }
        // Area clusters counted by blocks that already exist.
        for c in area.clone() {
            if !slots.contains(&((c / per_block) as usize)) {
                self.set_refcount(inner, c * cs, 1)?;
            }
        }
        let table_off = (start + nblocks) * cs;
        super::write_table(&*self.file, table_off, &table).map_err(|e| self.io(e))?;
        inner.next_free = area.end * cs;
        inner.file_len = inner.file_len.max(inner.next_free);
        self.flush_refcounts(inner)?;
        self.sync()?;
        let (old_off, old_clusters) = (inner.header.refcount_table_offset, u64::from(inner.header.refcount_table_clusters));
        self.switch_reftable(inner, table_off, table_clusters as u32)?;
        inner.reftable = table;
        for i in 0..old_clusters {
            self.set_refcount(inner, old_off + i * cs, 0)?;
        }
        Ok(())
    }

    /// Points the header at the refcount table at `offset` of `clusters`
    /// clusters, already durable: the two fields are adjacent, so one write
    /// switches tables.
    pub(crate) fn switch_reftable(&self, inner: &mut Inner, offset: u64, clusters: u32) -> Result<()> {
        let mut field = Vec::with_capacity(12);
        field.extend_from_slice(&offset.to_be_bytes());
        field.extend_from_slice(&clusters.to_be_bytes());
        self.file.write_all_at(&field, 48).map_err(|e| self.io(e))?;
        self.sync()?;
        inner.header.refcount_table_offset = offset;
        inner.header.refcount_table_clusters = clusters;
        Ok(())
    }

    /// `n` contiguous clusters with refcount 1: the first free run inside
    /// the file, else the end of the file.
    pub(crate) fn alloc_clusters(&self, inner: &mut Inner, n: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let end = inner.next_free / cs;
        let (mut run_start, mut run, mut first_free) = (inner.free_hint, 0u64, None);
        let mut c = inner.free_hint.max(1);
        while c < end && run < n {
            if self.refcount(inner, c * cs)? == 0 {
                first_free.get_or_insert(c);
                if run == 0 {
                    run_start = c;
                }
                run += 1;
            } else {
                run = 0;
            }
            c += 1;
        }
        // A free run reaching the end of the file is extended.
        let start = if run > 0 { run_start } else { end };
        // The hint stays the lowest cluster that may be free: every cluster
        // scanned before the first free one is in use, so the next
        // allocation does not scan them again (appending runs of clusters
        // scanned the whole file each time).
        inner.free_hint = match first_free {
            Some(f) if f != start => f,
            _ if n > 0 => start + n,
            _ => inner.free_hint,
        };
        inner.next_free = inner.next_free.max((start + n) * cs);
        self.set_refcount_run(inner, start * cs, n, 1)?;
        Ok(start * cs)
    }

    /// Room for `len` bytes of compressed data: packed after the previous
    /// compressed cluster when it fits (or spills into clusters right after
    /// it), else new clusters. Every cluster touched gains one reference.
    pub(crate) fn alloc_compressed(&self, inner: &mut Inner, len: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let cur = inner.compressed_cursor;
        if cur != 0 && cur % cs != 0 {
            let cluster = cur / cs * cs;
            let room = cluster + cs - cur;
            let spill = len.saturating_sub(room).div_ceil(cs);
            if spill == 0 || cluster + cs == inner.next_free {
                let first_new = inner.next_free;
                inner.next_free += spill * cs;
                for i in 0..spill {
                    self.set_refcount(inner, first_new + i * cs, 1)?;
                }
                self.adjust_refcount(inner, cluster, 1)?;
                inner.compressed_cursor = cur + len;
                return Ok(cur);
            }
        }
        let start = self.alloc_clusters(inner, len.div_ceil(cs))?;
        inner.compressed_cursor = start + len;
        Ok(start)
    }

    /// Writes refcount blocks whose updates were deferred (lazy refcounts).
    pub(crate) fn flush_refcounts(&self, inner: &mut Inner) -> Result<()> {
        let mut dirty: Vec<u64> = inner.rc_dirty.drain().collect();
        dirty.sort_unstable();
        for block in dirty {
            if let Some(b) = inner.rc_cache.get(&block) {
                self.file.write_all_at(b, block).map_err(|e| self.io(e))?;
            }
        }
        Ok(())
    }
}

/// Stores `value` as entry `idx` of a refcount block with `bits`-bit entries.
pub(crate) fn put_refcount(block: &mut [u8], idx: u64, bits: u64, value: u64) {
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = idx as usize * n;
        let be = value.to_be_bytes();
        block[at..at + n].copy_from_slice(&be[8 - n..]);
    } else {
        let bit = idx * bits;
        let (byte, shift) = ((bit / 8) as usize, bit % 8);
        let mask = (((1u16 << bits) - 1) as u8) << shift;
        block[byte] = (block[byte] & !mask) | (((value as u8) << shift) & mask);
    }
}

/// Entry `idx` of a refcount block with `bits`-bit entries.
pub(crate) fn get_refcount(block: &[u8], idx: u64, bits: u64) -> u64 {
    if bits >= 8 {
        let n = (bits / 8) as usize;
        let at = idx as usize * n;
        block[at..at + n].iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    } else {
        let bit = idx * bits;
        let (byte, shift) = ((bit / 8) as usize, bit % 8);
        u64::from((block[byte] >> shift) & (((1u16 << bits) - 1) as u8))
    }
}
