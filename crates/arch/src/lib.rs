//! x86_64 machine layout and boot-time CPU state for rvirt guests.
//!
//! This crate knows where things live in guest-physical memory (RAM, the PCI
//! hole, boot structures, ACPI tables) and how a vCPU must look when it first
//! enters the guest kernel. It is deliberately free of device and VM logic so
//! the VMM, tests and tools can share one description of the machine.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod regs;

pub use layout::{E820Entry, E820Kind, MemoryLayout};

/// Errors raised while preparing the boot-time machine state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl that configures a vCPU failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which ioctl failed.
        what: &'static str,
        /// The error from the kernel.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing a boot structure into guest memory failed.
    #[error("cannot write {what} into guest memory at {addr:#x}")]
    GuestMemory {
        /// Which structure was being written.
        what: &'static str,
        /// Guest-physical address of the write.
        addr: u64,
    },
    /// The requested machine cannot be described (too much or too little RAM, too many vCPUs).
    #[error("{0}")]
    Layout(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}
