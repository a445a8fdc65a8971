//! The ACPI hardware of a hardware-reduced platform, and the AML that
//! describes it to the guest.
//!
//! rvirt exposes ACPI the way Cloud Hypervisor and QEMU's microvm do: no
//! PM1/GPE blocks, but
//! - a sleep control register (FADT `SLEEP_CONTROL_REG`): the guest writes
//!   `SLP_TYP=5 | SLP_EN` there to power off;
//! - a reset register (FADT `RESET_REG`);
//! - a Generic Event Device (GED, `ACPI0013`): an interrupt plus an MMIO
//!   event register whose `_EVT` method notifies the power button
//!   (`PNP0C0C`), so `shutdown` on the control API reaches acpid in the guest.

use std::sync::Arc;

use acpi_tables::aml;
use acpi_tables::Aml;

use crate::{BusDevice, IrqLine, PlatformControl, PlatformRequest};

/// I/O base of the power-management registers.
pub const PM_BASE: u16 = 0x600;
/// Size of the power-management register window.
pub const PM_SIZE: u64 = 4;
/// Offset of the sleep control register.
pub const SLEEP_CONTROL_OFFSET: u16 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS_OFFSET: u16 = 1;
/// Offset of the reset register.
pub const RESET_OFFSET: u16 = 2;
/// Value the guest writes to the reset register (FADT `RESET_VALUE`).
pub const RESET_VALUE: u8 = 0x1;
/// The S5 (soft-off) sleep type advertised in `\_S5_`.
pub const S5_SLEEP_TYPE: u8 = 5;
const SLP_EN: u8 = 1 << 5;
const WAK_STS: u8 = 1 << 7;

/// The sleep control/status and reset registers.
pub struct AcpiPm {
    control: Arc<dyn PlatformControl>,
}

impl AcpiPm {
    /// Registers whose power-off and reset reach `control`.
    pub fn new(control: Arc<dyn PlatformControl>) -> Self {
        Self { control }
    }

    /// AML: the `\_S5_` package that tells the guest which SLP_TYP means off.
    pub fn aml() -> Vec<u8> {
        let mut v = Vec::new();
        aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut v);
        v
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == u64::from(SLEEP_STATUS_OFFSET) {
            if let Some(b) = data.first_mut() {
                // Always "awake": nothing here ever sleeps.
                *b = WAK_STS;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            o if o == u64::from(SLEEP_CONTROL_OFFSET) => {
                if v & SLP_EN != 0 {
                    let typ = (v >> 2) & 0x7;
                    if typ == S5_SLEEP_TYPE {
                        self.control.request(PlatformRequest::PowerOff);
                    } else {
                        tracing::warn!("guest asked for unsupported sleep type {typ}; ignored");
                    }
                }
            }
            o if o == u64::from(RESET_OFFSET) => {
                if v == RESET_VALUE {
                    self.control.request(PlatformRequest::Reset);
                }
            }
            _ => {}
        }
    }
}

/// Size of the GED's MMIO event register window.
pub const GED_SIZE: u64 = 4;
/// GED ISA interrupt.
pub const GED_IRQ: u32 = 5;

/// Events the GED can signal, one bit each in its event register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum GedEvent {
    /// The power button was pressed.
    PowerButton = 1 << 0,
}

/// The Generic Event Device: latches events and raises its interrupt; the
/// guest's `_EVT` reads (and so clears) the register and dispatches.
pub struct Ged {
    pending: u32,
    irq: IrqLine,
}

impl crate::persist::Persist for Ged {
    type State = crate::persist::GedState;

    fn save(&self) -> Self::State {
        crate::persist::GedState { pending: self.pending }
    }

    fn restore(&mut self, state: Self::State) -> Result<(), crate::persist::RestoreError> {
        self.pending = state.pending;
        Ok(())
    }
}

impl Ged {
    /// A GED raising `irq`.
    pub fn new(irq: IrqLine) -> Self {
        Self { pending: 0, irq }
    }

    /// Latches `event` and interrupts the guest.
    pub fn notify(&mut self, event: GedEvent) -> std::io::Result<()> {
        self.pending |= event as u32;
        self.irq.trigger()
    }

    /// AML: the GED at `mmio_base` with its `_EVT` handler, and the power button device.
    pub fn aml(mmio_base: u64) -> Vec<u8> {
        let mut v = Vec::new();
        let power = GedEvent::PowerButton as u32;
        let base = mmio_base as usize;
        let size = GED_SIZE as usize;
        let irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
        let crs = aml::ResourceTemplate::new(vec![&irq]);
        let mask = aml::And::new(&aml::ZERO, &aml::Local(0), &power);
        let is_power = aml::Equal::new(&mask, &power);
        let pwrb = aml::Path::new("\\_SB_.PWRB");
        let notify = aml::Notify::new(&pwrb, &0x80u8);
        let gdat = aml::Path::new("GDAT");
        let read = aml::Store::new(&aml::Local(0), &gdat);
        let dispatch = aml::If::new(&is_power, vec![&notify]);
        aml::Device::new(
            "_SB_.GED_".into(),
            vec![
                &aml::Name::new("_HID".into(), &"ACPI0013"),
                &aml::Name::new("_UID".into(), &aml::ZERO),
                &aml::Name::new("_CRS".into(), &crs),
                &aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemMemory, &base, &size),
                &aml::Field::new(
                    "GDST".into(),
                    aml::FieldAccessType::DWord,
                    aml::FieldLockRule::NoLock,
                    aml::FieldUpdateRule::WriteAsZeroes,
                    vec![aml::FieldEntry::Named(*b"GDAT", 32)],
                ),
                &aml::Method::new("_EVT".into(), 1, true, vec![&read, &dispatch]),
            ],
        )
        .to_aml_bytes(&mut v);
        aml::Device::new(
            "_SB_.PWRB".into(),
            vec![
                &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
                &aml::Name::new("_UID".into(), &aml::ZERO),
            ],
        )
        .to_aml_bytes(&mut v);
        v
    }
}

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            let bytes = self.pending.to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&bytes[..n]);
            self.pending = 0;
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// AML for a legacy ISA device at I/O ports `base..base+len` with edge
/// interrupt `irq`, identified by its PNP `hid`, so the guest binds its
/// driver through ACPI.
fn isa_device_aml(path: &str, hid: &str, base: u16, len: u8, irq: u32) -> Vec<u8> {
    let mut v = Vec::new();
    let io = aml::IO::new(base, base, 1, len);
    let int = aml::Interrupt::new(true, true, false, false, irq);
    let crs = aml::ResourceTemplate::new(vec![&io, &int]);
    aml::Device::new(
        path.into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new(hid)),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut v);
    v
}

/// AML describing COM1 (`PNP0501`, a 16550).
pub fn com1_aml(base: u16, irq: u32) -> Vec<u8> {
    isa_device_aml("_SB_.COM1", "PNP0501", base, 8, irq)
}

/// AML describing the CMOS RTC (`PNP0B00`) so the guest's rtc_cmos driver binds to it.
pub fn rtc_aml(base: u16, irq: u32) -> Vec<u8> {
    isa_device_aml("_SB_.RTC_", "PNP0B00", base, 2, irq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Requests;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn s5_powers_off_and_other_states_do_not() {
        let reqs = Arc::new(Requests::default());
        let mut pm = AcpiPm::new(reqs.clone());
        pm.write(0, &[(3 << 2) | SLP_EN]); // S3
        pm.write(0, &[5 << 2]); // S5 without SLP_EN
        assert!(reqs.0.lock().unwrap().is_empty());
        pm.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(*reqs.0.lock().unwrap(), vec![PlatformRequest::PowerOff]);
    }

    #[test]
    fn reset_register_needs_the_reset_value() {
        let reqs = Arc::new(Requests::default());
        let mut pm = AcpiPm::new(reqs.clone());
        pm.write(2, &[0x7]);
        pm.write(2, &[RESET_VALUE]);
        assert_eq!(*reqs.0.lock().unwrap(), vec![PlatformRequest::Reset]);
        let mut st = [0u8];
        pm.read(1, &mut st);
        assert_eq!(st[0], WAK_STS);
    }

    #[test]
    fn ged_latches_until_read() {
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut ged = Ged::new(IrqLine::new(evt.clone()));
        ged.notify(GedEvent::PowerButton).unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        let mut d = [0u8; 4];
        ged.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), GedEvent::PowerButton as u32);
        ged.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
    }

    #[test]
    fn aml_names_the_devices() {
        let ged = Ged::aml(0xfe00_0000);
        for needle in [&b"GED_"[..], b"ACPI0013", b"_EVT", b"GDAT", b"PWRB", b"_CRS"] {
            assert!(ged.windows(needle.len()).any(|w| w == needle), "{:?} missing", needle);
        }
        // Device op is ExtOpPrefix 0x5b 0x82.
        assert_eq!(&ged[..2], &[0x5b, 0x82]);
        let s5 = AcpiPm::aml();
        assert_eq!(s5[0], 0x08, "NameOp");
        assert_eq!(&s5[1..5], b"_S5_");
        let com = com1_aml(0x3f8, 4);
        assert!(com.windows(4).any(|w| w == b"COM1"));
    }
}
