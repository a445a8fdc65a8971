//! The COM1 16550 UART, on top of `vm-superio`'s register model.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::persist::{Persist, RestoreError, SerialState};
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

impl Persist for SerialDevice {
    type State = SerialState;

    fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore(&mut self, state: SerialState) -> Result<(), RestoreError> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor[0],
            baud_divisor_high: state.baud_divisor[1],
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer,
        };
        let irq = self.uart.interrupt_evt().clone();
        let sink: Box<dyn Write + Send> = Box::new(std::io::sink());
        let mut uart = Serial::from_state(&s, irq, NoEvents, sink).map_err(|e| RestoreError { device: "serial port", reason: format!("{e:?}") })?;
        // The output (console, file, pty) moves to the restored registers.
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        Ok(())
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
    fn registers_and_unread_input_survive_a_save_and_restore_and_output_stays_ours() {
        let (mut a, _, _) = device();
        a.write(3, &[0x80]); // DLAB
        a.write(0, &[0x0c]); // divisor 12: 9600 baud
        a.write(3, &[0x03]); // 8N1
        a.write(1, &[0x01]); // IER
        a.write(7, &[0x5a]); // scratch
        assert_eq!(a.enqueue_input(b"typed"), 5);
        let saved = a.save();
        let (mut b, out_b, evt_b) = device();
        b.restore(saved.clone()).unwrap();
        assert_eq!(b.save(), saved);
        // The pending input raises the interrupt again and reads back in order.
        assert!(evt_b.read().unwrap() >= 1);
        let mut got = Vec::new();
        for _ in 0..5 {
            let mut d = [0u8];
            b.read(0, &mut d);
            got.push(d[0]);
        }
        assert_eq!(got, b"typed");
        let mut scratch = [0u8];
        b.read(7, &mut scratch);
        assert_eq!(scratch[0], 0x5a);
        b.write(0, b"!");
        assert_eq!(&*out_b.0.lock().unwrap(), b"!", "the restored UART writes to its own output");
        // A FIFO longer than the chip's is refused, and the device still writes.
        let mut too_much = saved;
        too_much.in_buffer = vec![0; 65];
        assert!(b.restore(too_much).unwrap_err().to_string().contains("serial port"));
        b.write(0, b"?");
        assert_eq!(&*out_b.0.lock().unwrap(), b"!?");
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
