//! MSI-X: the vector table and pending-bit array a function exposes in a
//! BAR, and delivery of each vector through an irqfd.
//!
//! The VMM gives every vector a GSI with an irqfd already registered; this
//! module tells the VMM (through [`MsiRouter`]) which MSI message each GSI
//! must carry whenever the guest programs or unmasks an entry. Masked
//! vectors latch their pending bit and fire when unmasked.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::{read_le, write_le};

/// Bytes per table entry: address low/high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// MSI-X capability ID.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Message control: function mask.
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Message control: MSI-X enable.
const CTRL_ENABLE: u16 = 1 << 15;
/// Vector control: this vector is masked.
const ENTRY_MASKED: u32 = 1;

/// An MSI message: where the device writes, and what.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    /// Guest-physical address (the LAPIC window, destination encoded).
    pub address: u64,
    /// Data (vector and delivery mode).
    pub data: u32,
}

/// Keeps KVM's GSI routes in step with the guest's MSI-X tables.
pub trait MsiRouter: Send + Sync {
    /// Routes `gsi` to `msg`.
    fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()>;
}

/// One vector's interrupt path: a GSI and the irqfd registered for it.
pub struct MsiVector {
    /// The GSI KVM injects when `irqfd` is written.
    pub gsi: u32,
    /// The irqfd.
    pub irqfd: EventFd,
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    msg: MsiMessage,
    control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & ENTRY_MASKED != 0
    }
}

/// What a snapshot keeps of a function's MSI-X: the table as programmed,
/// the pending bits and the message control word.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// Each entry's message and vector control word.
    pub table: Vec<(MsiMessage, u32)>,
    /// Pending bits.
    pub pending: Vec<bool>,
    /// Message control (enable, function mask).
    pub control: u16,
}

/// A function's MSI-X state.
pub struct MsixConfig {
    table: Vec<Entry>,
    pending: Vec<bool>,
    vectors: Vec<MsiVector>,
    router: Arc<dyn MsiRouter>,
    control: u16,
}

impl MsixConfig {
    /// MSI-X with one table entry per vector in `vectors` (at most 2048),
    /// all masked as at reset.
    pub fn new(vectors: Vec<MsiVector>, router: Arc<dyn MsiRouter>) -> Self {
        let n = vectors.len();
        Self {
            table: vec![Entry { control: ENTRY_MASKED, ..Default::default() }; n],
            pending: vec![false; n],
            vectors,
            router,
            control: 0,
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the table has no vectors.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Whether the OS enabled MSI-X (then INTx is not used).
    pub fn enabled(&self) -> bool {
        self.control & CTRL_ENABLE != 0
    }

    /// The capability bytes for the configuration space: table in `bar` at
    /// `table_offset`, pending bits at `pba_offset`. Second return value:
    /// the writable-bits mask (enable and function mask).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
        let size = (self.table.len().max(1) - 1) as u16;
        let mut c = vec![MSIX_CAP_ID, 0];
        c.extend_from_slice(&size.to_le_bytes());
        c.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        c.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut w = vec![0u8; c.len()];
        w[3] = 0xc0;
        (c, w)
    }

    /// The OS wrote the capability's message-control word.
    pub fn set_control(&mut self, control: u16) {
        let was_blocked = self.blocked();
        self.control = control & (CTRL_ENABLE | CTRL_FUNCTION_MASK);
        if was_blocked && !self.blocked() {
            for v in 0..self.table.len() {
                if !self.table[v].masked() {
                    self.route(v);
                    self.deliver_pending(v);
                }
            }
        }
    }

    fn blocked(&self) -> bool {
        !self.enabled() || self.control & CTRL_FUNCTION_MASK != 0
    }

    fn route(&self, v: usize) {
        if let Err(e) = self.router.set_msi_route(self.vectors[v].gsi, self.table[v].msg) {
            tracing::warn!("MSI-X vector {v}: cannot set its route: {e}");
        }
    }

    fn deliver_pending(&mut self, v: usize) {
        if self.pending[v] && !self.table[v].masked() {
            self.pending[v] = false;
            let _ = self.vectors[v].irqfd.write(1);
        }
    }

    /// The table, pending bits and control, for a snapshot.
    pub fn state(&self) -> MsixState {
        MsixState { table: self.table.iter().map(|e| (e.msg, e.control)).collect(), pending: self.pending.clone(), control: self.control }
    }

    /// Puts saved state back (same vector count) and routes every vector
    /// the guest left unmasked, so interrupts reach it as before; pending
    /// vectors stay latched until unmasked.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), String> {
        if s.table.len() != self.table.len() || s.pending.len() != self.pending.len() {
            return Err(format!("{} MSI-X vectors saved, this function has {}", s.table.len(), self.table.len()));
        }
        for (e, (msg, control)) in self.table.iter_mut().zip(&s.table) {
            *e = Entry { msg: *msg, control: control & ENTRY_MASKED };
        }
        self.pending.copy_from_slice(&s.pending);
        self.control = s.control & (CTRL_ENABLE | CTRL_FUNCTION_MASK);
        if !self.blocked() {
            for v in 0..self.table.len() {
                if !self.table[v].masked() {
                    self.route(v);
                }
            }
        }
        Ok(())
    }

    /// The guest reads the table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let (v, field) = ((offset / MSIX_ENTRY_SIZE) as usize, offset % MSIX_ENTRY_SIZE);
        let Some(e) = self.table.get(v) else {
            data.fill(0);
            return;
        };
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&e.msg.address.to_le_bytes());
        raw[8..12].copy_from_slice(&e.msg.data.to_le_bytes());
        raw[12..16].copy_from_slice(&e.control.to_le_bytes());
        let f = field as usize;
        match raw.get(f..f + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    /// The guest writes the table: 4- or 8-byte aligned accesses.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let (v, field) = ((offset / MSIX_ENTRY_SIZE) as usize, offset % MSIX_ENTRY_SIZE);
        if v >= self.table.len() || !(data.len() == 4 || data.len() == 8) || field % data.len() as u64 != 0 {
            return;
        }
        let old = self.table[v];
        let value = read_le(data);
        let e = &mut self.table[v];
        match (field, data.len()) {
            (0, 8) => e.msg.address = value,
            (0, 4) => e.msg.address = (e.msg.address & !0xffff_ffff) | value,
            (4, 4) => e.msg.address = (e.msg.address & 0xffff_ffff) | (value << 32),
            (8, 4) => e.msg.data = value as u32,
            (8, 8) => {
                e.msg.data = value as u32;
                e.control = (value >> 32) as u32 & ENTRY_MASKED;
            }
            (12, 4) => e.control = value as u32 & ENTRY_MASKED,
            _ => return,
        }
        let new = self.table[v];
        let unmasked = old.masked() && !new.masked();
        if !self.blocked() && !new.masked() && (unmasked || old.msg != new.msg) {
            self.route(v);
        }
        if unmasked && !self.blocked() {
            self.deliver_pending(v);
        }
    }

    /// The guest reads the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let mut value = 0u64;
        let first = offset.saturating_mul(8);
        for bit in 0..(data.len() as u64 * 8) {
            if self.pending.get(first.saturating_add(bit) as usize).copied().unwrap_or(false) {
                value |= 1 << bit;
            }
        }
        write_le(data, value);
    }

    /// Raises vector `v`: fires its irqfd, or latches it pending while masked.
    /// Returns false when MSI-X is disabled (the caller falls back to INTx)
    /// or `v` is not a vector of this table.
    pub fn trigger(&mut self, v: u16) -> bool {
        let v = usize::from(v);
        if !self.enabled() || v >= self.table.len() {
            return false;
        }
        if self.blocked() || self.table[v].masked() {
            self.pending[v] = true;
        } else if let Err(e) = self.vectors[v].irqfd.write(1) {
            tracing::warn!("MSI-X vector {v}: irqfd write failed: {e}");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Routes(Mutex<Vec<(u32, MsiMessage)>>);

    impl MsiRouter for Routes {
        fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
            self.0.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    fn msix(n: u32) -> (MsixConfig, Arc<Routes>) {
        let routes = Arc::new(Routes::default());
        let vectors =
            (0..n).map(|i| MsiVector { gsi: 24 + i, irqfd: EventFd::new(libc::EFD_NONBLOCK).unwrap() }).collect();
        (MsixConfig::new(vectors, routes.clone()), routes)
    }

    fn fired(m: &MsixConfig, v: usize) -> bool {
        m.vectors[v].irqfd.read().is_ok()
    }

    #[test]
    fn programs_routes_and_fires_unmasked_vectors() {
        let (mut m, routes) = msix(2);
        assert!(!m.trigger(0), "disabled MSI-X falls back to INTx");
        m.set_control(CTRL_ENABLE);
        m.write_table(16, &0xfee0_0000u32.to_le_bytes());
        m.write_table(20, &0u32.to_le_bytes());
        m.write_table(24, &0x41u32.to_le_bytes());
        assert!(routes.0.lock().unwrap().is_empty(), "masked entries are not routed yet");
        m.write_table(28, &0u32.to_le_bytes());
        assert_eq!(routes.0.lock().unwrap().last(), Some(&(25, MsiMessage { address: 0xfee0_0000, data: 0x41 })));
        assert!(m.trigger(1));
        assert!(fired(&m, 1));
        let mut b = [0u8; 4];
        m.read_table(24, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x41);
    }

    #[test]
    fn masked_vectors_latch_pending_and_fire_on_unmask() {
        let (mut m, _) = msix(1);
        m.set_control(CTRL_ENABLE);
        assert!(m.trigger(0));
        assert!(!fired(&m, 0));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        m.write_table(12, &0u32.to_le_bytes());
        assert!(fired(&m, 0), "unmasking delivers the pending vector");
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        // Function mask holds every vector.
        m.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        m.trigger(0);
        assert!(!fired(&m, 0));
        m.set_control(CTRL_ENABLE);
        assert!(fired(&m, 0));
    }

    #[test]
    fn out_of_range_accesses_are_harmless() {
        let (mut m, _) = msix(1);
        m.set_control(CTRL_ENABLE);
        m.write_table(4096, &[1, 2, 3, 4]);
        m.write_table(2, &[1, 2, 3, 4]);
        m.write_table(0, &[1, 2]);
        let mut b = [0xffu8; 4];
        m.read_table(4096, &mut b);
        assert_eq!(b, [0; 4]);
        m.read_pba(u64::MAX, &mut b);
        assert!(!m.trigger(7));
    }
}
