//! The save/restore seam of every platform device (Firecracker keeps a
//! `persist.rs` beside each device; Cloud Hypervisor builds a VM from its
//! configuration, then puts each device's saved state into it). A device's
//! state is what the guest can observe of it and the configuration does not
//! say: registers, latches, FIFOs; never its backends (output files, host
//! clock), which a restore gives again.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A device whose state can be saved while the VM is paused and put into
/// the same device built again from the same configuration.
pub trait Persist {
    /// What is saved.
    type State: Serialize + DeserializeOwned;
    /// The state now.
    fn save(&self) -> Self::State;
    /// Puts `state` back; a state this device cannot hold is refused.
    fn restore(&mut self, state: Self::State) -> Result<(), RestoreError>;
}

/// Why a device refused saved state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{device}: the saved state cannot be restored: {reason}")]
pub struct RestoreError {
    /// Which device.
    pub device: &'static str,
    /// What is wrong with the state.
    pub reason: String,
}

/// The 16550's registers and receive FIFO (vm-superio's `SerialState`,
/// which has no serde of its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// The RTC/CMOS: its index register, NVRAM, rate and periodic-interrupt
/// enable (the time itself is the host's, read again after a restore).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// The selected register (without the NMI mask bit).
    pub index: u8,
    /// The 128 bytes of NVRAM.
    pub nvram: Vec<u8>,
    /// Status register A (the periodic rate).
    pub status_a: u8,
    /// Status register B's periodic-interrupt enable.
    pub periodic_enabled: bool,
}

/// fw_cfg's selection and position in it (its items are rebuilt from the
/// configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    /// The selected item.
    pub selected: u16,
    /// Bytes of it already read.
    pub offset: u64,
    /// The DMA address's high half, written before the low half.
    pub dma_high: u32,
}

/// The GED's latched events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GedState {
    /// Events not yet read by the guest.
    pub pending: u32,
}
