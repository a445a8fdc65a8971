//! PCI for rvirt-vmm: what a stock kernel needs to find devices on a PCI bus
//! without firmware.
//!
//! - [`PciConfiguration`]: one function's 256-byte configuration space, BARs
//!   with sizing, a capability list.
//! - [`PciBus`]: bus 0 with its host bridge, reached through ports
//!   0xCF8/0xCFC ([`PciConfigIo`]) and ECAM ([`PciConfigMmio`]); guest accesses
//!   to BARs are routed by [`PciBarWindow`] to whichever device decodes them,
//!   so a guest that moves a BAR keeps working.
//! - [`MsixConfig`]: the MSI-X table and pending-bit array, delivering each
//!   vector through an irqfd whose KVM route the VMM keeps in sync.

pub mod acpi;
pub mod bus;
pub mod config;
pub mod msix;

pub use bus::{PciBarWindow, PciBus, PciConfigIo, PciConfigMmio, PciHostBridge};
pub use config::{BarKind, PciBarInfo, PciClass, PciConfigState, PciConfiguration, PciHeader};
pub use msix::{MsiMessage, MsiRouter, MsiVector, MsixConfig, MsixState, MSIX_ENTRY_SIZE};

/// The ports of configuration mechanism #1: address at 0xCF8, data at 0xCFC.
pub const PCI_CONFIG_IO_BASE: u64 = 0xcf8;
/// Length of the configuration-mechanism port range.
pub const PCI_CONFIG_IO_SIZE: u64 = 8;
/// Size of one bus's ECAM window: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Devices on one bus.
pub const SLOTS: usize = 32;
/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;

/// A PCI function as the bus sees it: configuration space and BARs.
/// Implemented by the host bridge and the virtio transport.
pub trait PciDevice: Send {
    /// Reads the 32-bit configuration register `reg` (byte offset `reg * 4`).
    fn read_config_register(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` of the configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The BARs the device decodes now: memory decoding enabled and an
    /// address programmed. Used to route guest accesses.
    fn decoded_bars(&self) -> Vec<PciBarInfo>;
    /// The guest reads inside BAR `bar` at `offset`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// The guest writes inside BAR `bar` at `offset`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` now decodes at `new` (`None`: not decoded) instead of `old`.
    /// Devices with ioeventfds inside the BAR move them here.
    fn bar_moved(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
}

/// Errors building the PCI topology.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Every slot on the bus is taken.
    #[error("no free PCI slot (bus 0 holds {SLOTS} devices)")]
    NoFreeSlot,
    /// The MMIO window has no room for another BAR.
    #[error("PCI MMIO window exhausted allocating a {0:#x}-byte BAR")]
    WindowExhausted(u64),
    /// The host refused an interrupt resource.
    #[error("interrupt setup: {0}")]
    Interrupt(#[source] std::io::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Reads a little-endian value of `data.len()` (1, 2, 4 or 8) bytes.
pub fn read_le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Writes the low `data.len()` bytes of `value` little-endian into `data`.
pub fn write_le(data: &mut [u8], value: u64) {
    let n = data.len().min(8);
    data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
}
