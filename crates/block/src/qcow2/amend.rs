//! `qemu-img amend`: changing an existing image's format options in place
//! (compat level, lazy refcounts, refcount width). Each change makes the
//! new structures durable before one header write switches to them.

use super::{Inner, Mapping, Qcow2Image, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DIRTY, INCOMPAT_EXTENDED_L2, L1_OFFSET_MASK, V2_HEADER_LEN, V3_HEADER_LEN};
use crate::{Error, Result};

impl Qcow2Image {
    /// Turns lazy refcounts on or off (compat=1.1 only).
    pub fn set_lazy_refcounts(&self, on: bool) -> Result<()> {
        self.writable()?;
        let mut inner = self.lock();
        if inner.header.version < 3 {
            return Err(Error::Request("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into()));
        }
        self.commit(&mut inner)?;
        self.flush_refcounts(&mut inner)?;
        self.sync()?;
        let f = inner.header.compatible_features;
        let f = if on { f | COMPAT_LAZY_REFCOUNTS } else { f & !COMPAT_LAZY_REFCOUNTS };
        self.file.write_all_at(&f.to_be_bytes(), 80).map_err(|e| self.io(e))?;
        self.sync()?;
        inner.header.compatible_features = f;
        Ok(())
    }

    /// Rewrites the refcount structures with `bits`-wide counts (1 to 64, a power of two).
    pub fn set_refcount_bits(&self, bits: u32) -> Result<()> {
        self.writable()?;
        if !bits.is_power_of_two() || bits > 64 {
            return Err(Error::Request("Refcount width must be a power of two and may not exceed 64 bits".into()));
        }
        let mut inner = self.lock();
        if inner.header.version < 3 && bits != 16 {
            return Err(Error::Request("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into()));
        }
        let order = bits.trailing_zeros();
        if order == inner.header.refcount_order {
            return Ok(());
        }
        self.commit(&mut inner)?;
        self.flush_refcounts(&mut inner)?;
        let census = self.census(&mut inner, false)?;
        let widest = census.refs.iter().copied().max().unwrap_or(0);
        if bits < 32 && u64::from(widest) >= 1 << bits {
            return Err(Error::Request(format!("a cluster has {widest} references, more than {bits}-bit refcounts hold")));
        }
        let old_order = inner.header.refcount_order;
        inner.header.refcount_order = order;
        if let Err(e) = self.rebuild_refcounts(&mut inner, &census.refs, true) {
            inner.header.refcount_order = old_order;
            return Err(e);
        }
        Ok(())
    }

    /// Changes the compat level: 3 (1.1) or 2 (0.10). A downgrade writes
    /// the zero clusters out (version 2 has no zero flag) and refuses what
    /// version 2 cannot express.
    pub fn set_version(&self, version: u32) -> Result<()> {
        self.writable()?;
        let mut inner = self.lock();
        match (inner.header.version, version) {
            (a, b) if a == b => return Ok(()),
            (2, 3) => {
                inner.header.version = 3;
                inner.header.header_length = V3_HEADER_LEN;
                return self.write_header_cluster(&mut inner);
            }
            (3, 2) => {}
            _ => return Err(Error::Request(format!("compat level {version} is not 2 (0.10) or 3 (1.1)"))),
        }
        let h = &inner.header;
        if h.refcount_order != 4 {
            return Err(Error::Request("compat=0.10 requires refcount_bits=16".into()));
        }
        if h.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            return Err(Error::Request("compat=0.10 does not support zstd compression (compression_type=zlib only)".into()));
        }
        if !inner.bitmaps.entries.is_empty() {
            return Err(Error::Request("Cannot downgrade an image with bitmaps".into()));
        }
        if h.incompatible_features & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(Error::Request(format!("Cannot downgrade an image with incompatible features {INCOMPAT_EXTENDED_L2:#x} set")));
        }
        if h.incompatible_features & INCOMPAT_DIRTY != 0 || h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0 {
            return Err(Error::Request("Cannot downgrade an image with lazy refcounts; turn them off first (lazy_refcounts=off)".into()));
        }
        self.commit(&mut inner)?;
        self.refuse_zero_clusters_in_snapshots(&mut inner)?;
        self.expand_zero_clusters(&mut inner)?;
        self.commit(&mut inner)?;
        self.flush_refcounts(&mut inner)?;
        self.sync()?;
        inner.header.version = 2;
        inner.header.header_length = V2_HEADER_LEN;
        inner.header.incompatible_features = 0;
        inner.header.compatible_features = 0;
        inner.header.autoclear_features = 0;
        // Version 2 keeps the backing format; other extensions are version 3's.
        inner.extensions.clear();
        self.write_header_cluster(&mut inner)
    }

    /// Zero clusters of the active layer become what version 2 reads as zeros.
    fn expand_zero_clusters(&self, inner: &mut Inner) -> Result<()> {
        let cs = self.cluster_size();
        let zeros = vec![0u8; cs as usize];
        let size = inner.header.size;
        for gc in 0..size.div_ceil(cs) {
            let Mapping::Zero { host } = self.mapping(inner, gc)? else { continue };
            if host == 0 && self.backing_name.is_none() {
                // Unallocated reads as zeros without a backing file.
                let l2 = self.writable_l2(inner, gc)?;
                self.set_l2_entry(inner, l2, gc, 0)?;
            } else {
                let n = cs.min(size - gc * cs) as usize;
                self.write_in_cluster(inner, gc * cs, &zeros[..n])?;
            }
        }
        Ok(())
    }

    /// Internal snapshots holding zero clusters cannot be expanded in place here.
    fn refuse_zero_clusters_in_snapshots(&self, inner: &mut Inner) -> Result<()> {
        let end = inner.file_len.max(inner.next_free);
        for s in inner.snapshots.clone() {
            let l1 = super::read_table(&*self.file, s.l1_table_offset, s.l1_size as usize).map_err(|e| self.io(e))?;
            for l1e in l1 {
                let l2 = l1e & L1_OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                let table = self.l2_table(inner, l2)?.clone();
                for e in table {
                    if matches!(self.decode_l2(3, e, end)?, Mapping::Zero { .. }) {
                        return Err(Error::Request(format!(
                            "internal snapshot '{}' holds zero clusters, which compat=0.10 cannot express; delete it first",
                            s.name
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}
