//! Platform devices of an rvirt machine and the bus that dispatches guest
//! port and MMIO accesses to them.
//!
//! Devices never talk to KVM or to the VMM's threads directly: interrupts go
//! out through an [`IrqLine`] (an irqfd-backed eventfd) and machine-level
//! requests (power off, reset) through a [`PlatformControl`] the VMM provides.

pub mod acpi;
pub mod bus;
pub mod cmos;
pub mod debugcon;
pub mod dirty;
pub mod fw_cfg;
pub mod i8042;
pub mod persist;
pub mod serial;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use bus::{Bus, BusDevice, BusError};

/// What a device can ask of the machine as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformRequest {
    /// The guest asked to be powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 pulse or ACPI reset register).
    Reset,
}

/// Receives [`PlatformRequest`]s; implemented by the VMM.
pub trait PlatformControl: Send + Sync {
    /// Called from a vCPU thread when the guest makes `request`.
    fn request(&self, request: PlatformRequest);
}

/// An edge-triggered interrupt line: writing the eventfd, registered with
/// KVM as an irqfd, pulses the GSI without leaving the device's thread.
#[derive(Clone)]
pub struct IrqLine {
    evt: Arc<EventFd>,
}

impl IrqLine {
    /// Wraps an eventfd already registered as an irqfd (or, in tests, any eventfd).
    pub fn new(evt: Arc<EventFd>) -> Self {
        Self { evt }
    }

    /// The eventfd behind the line, for registering it with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Raises the interrupt.
    pub fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::Mutex;

    use crate::{PlatformControl, PlatformRequest};

    /// Records the platform requests devices make, for assertions.
    #[derive(Default)]
    pub struct Requests(pub Mutex<Vec<PlatformRequest>>);

    impl PlatformControl for Requests {
        fn request(&self, r: PlatformRequest) {
            self.0.lock().unwrap().push(r);
        }
    }
}
