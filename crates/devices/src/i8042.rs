//! The i8042 keyboard controller, kept for the one thing guests use it for:
//! the reset line (command 0xFE on port 0x64).

use std::sync::Arc;

use vm_superio::I8042Device;

use crate::{BusDevice, PlatformControl, PlatformRequest};

/// I/O base of the i8042 (data at 0x60, command/status at 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Size of the i8042's register window.
pub const I8042_SIZE: u64 = 5;

/// Turns the i8042's reset pulse into a [`PlatformRequest::Reset`].
pub struct ResetLine {
    control: Arc<dyn PlatformControl>,
}

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.control.request(PlatformRequest::Reset);
        Ok(())
    }
}

/// The i8042 on the port bus.
pub struct I8042 {
    inner: I8042Device<ResetLine>,
}

impl I8042 {
    /// An i8042 whose reset command reaches `control`.
    pub fn new(control: Arc<dyn PlatformControl>) -> Self {
        Self { inner: I8042Device::new(ResetLine { control }) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            let Ok(()) = self.inner.write(off, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Requests;

    #[test]
    fn command_fe_resets() {
        let reqs = Arc::new(Requests::default());
        let mut dev = I8042::new(reqs.clone());
        dev.write(4, &[0xaa]);
        assert!(reqs.0.lock().unwrap().is_empty());
        dev.write(4, &[0xfe]);
        assert_eq!(*reqs.0.lock().unwrap(), vec![PlatformRequest::Reset]);
    }
}
