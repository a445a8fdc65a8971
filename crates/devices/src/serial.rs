//! The COM1 16550 UART, on top of `vm-superio`'s register model.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::{BusDevice, IrqLine};

/// COM1's I/O base.
pub const COM1_BASE: u64 = 0x3f8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u32 = 4;
/// Size of the UART's register window.
pub const UART_REGISTERS: u64 = 8;

/// A 16550 UART whose output goes to any writer (stdout, a file, a pty).
pub struct SerialDevice {
    uart: Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
    output_failed: bool,
}

impl SerialDevice {
    /// A UART raising `irq` and writing transmitted bytes to `out`.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        Self { uart: Serial::new(irq, out), output_failed: false }
    }

    /// How many input bytes the receive FIFO can take now.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues bytes typed by the user for the guest; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.input_capacity());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input: {e}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) else { return };
        if let Err(e) = self.uart.write(off, value) {
            // A closed console must not stop the guest; say so once.
            if !self.output_failed {
                tracing::warn!("serial output lost: {e}");
                self.output_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, Shared, Arc<EventFd>) {
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let out = Shared::default();
        (SerialDevice::new(IrqLine::new(evt.clone()), Box::new(out.clone())), out, evt)
    }

    #[test]
    fn transmits_bytes() {
        let (mut s, out, _) = device();
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
    }

    #[test]
    fn input_raises_irq_and_reads_back() {
        let (mut s, _, evt) = device();
        s.write(1, &[0x01]); // IER: received-data interrupt
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert!(evt.read().unwrap() >= 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut d = [0u8];
        s.read(0, &mut d);
        assert_eq!(d[0], b'a');
    }

    #[test]
    fn input_beyond_the_fifo_is_not_accepted() {
        let (mut s, _, _) = device();
        let cap = s.input_capacity();
        let big = vec![b'x'; cap + 10];
        assert_eq!(s.enqueue_input(&big), cap);
        assert_eq!(s.enqueue_input(b"y"), 0);
    }

    #[test]
    fn odd_offsets_and_empty_accesses_are_ignored() {
        let (mut s, _, _) = device();
        s.write(0x1_0000, &[1]);
        s.write(0, &[]);
        let mut d = [0u8; 0];
        s.read(0, &mut d);
    }
}
