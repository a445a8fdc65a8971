//! The MC146818-style CMOS real-time clock and NVRAM at ports 0x70/0x71.
//!
//! Guests read the wall-clock time from it at boot (rtc_cmos / hctosys). The
//! clock registers are computed from the host's UTC time on every read; the
//! rest of the 128 bytes is plain NVRAM that keeps what the guest writes.
//! The periodic interrupt (status B PIE, rate in status A) pulses IRQ 8 from
//! a ticker thread started the first time a guest enables it: firmware
//! waits on it (SeaBIOS's int 15h AH=86h), as do some bootloaders.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::IrqLine;

/// I/O base of the CMOS (index at 0x70, data at 0x71).
pub const CMOS_BASE: u64 = 0x70;
/// Size of the CMOS register window.
pub const CMOS_SIZE: u64 = 2;
/// The RTC's ISA IRQ (the periodic interrupt; alarms are not emulated).
pub const CMOS_IRQ: u32 = 8;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Status A at reset: 32.768 kHz time base, 1024 Hz rate, update never in
/// progress (bit 7 always reads 0; the guest may change the rest).
const STATUS_A: u8 = 0x26;
/// Status B: 24-hour mode, BCD values.
const STATUS_B_24H: u8 = 0x02;
/// Status B: periodic interrupt enable.
const STATUS_B_PIE: u8 = 0x40;
/// Status C: an interrupt is pending (IRQF) because of the periodic flag (PF).
const STATUS_C_PERIODIC: u8 = 0xc0;
/// Status D: the battery is good.
const STATUS_D_VALID: u8 = 0x80;

/// A calendar time broken down as the RTC reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtcTime {
    /// 0..60
    pub second: u8,
    /// 0..60
    pub minute: u8,
    /// 0..24
    pub hour: u8,
    /// 1 = Sunday .. 7 = Saturday
    pub weekday: u8,
    /// 1..=31
    pub day: u8,
    /// 1..=12
    pub month: u8,
    /// Full year, e.g. 2026.
    pub year: u16,
}

impl RtcTime {
    /// The host's current UTC time.
    pub fn now() -> Self {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Self::from_unix(secs)
    }

    /// The UTC calendar time `secs` seconds after 1970-01-01, computed here
    /// rather than by libc, whose gmtime reads the host's time zone file
    /// (which a confined vCPU thread may not open).
    pub fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // Civil date from a day count (Howard Hinnant's algorithm), in
        // 400-year eras starting on 0000-03-01.
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            second: (rem % 60) as u8,
            minute: (rem / 60 % 60) as u8,
            hour: (rem / 3_600) as u8,
            // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
            weekday: ((days + 4) % 7 + 1) as u8,
            day: day as u8,
            month: month as u8,
            year: year.clamp(0, 9999) as u16,
        }
    }
}

fn bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// The period of rate `rate` (status A bits 0-3) with the 32.768 kHz time
/// base: 32768 >> (rate - 1) Hz, rates 1 and 2 being 256 and 128 Hz; 0 is off.
fn period(rate: u8) -> Option<Duration> {
    let shift = match rate & 0x0f {
        0 => return None,
        r @ 1..=2 => r + 6,
        r => r - 1,
    };
    Some(Duration::from_nanos((1_000_000_000u64 << shift) / 32768))
}

/// What the periodic ticker and the register interface share.
struct PeriodicState {
    /// The current period when PIE is set and the rate is not 0.
    period: Option<Duration>,
    /// Status C's flags, set by the ticker and cleared when C is read.
    flags: u8,
    /// The device is gone: the ticker ends.
    stop: bool,
}

/// The periodic interrupt: state, a condition variable to wake the ticker
/// when the period changes, and the line it pulses.
struct Periodic {
    state: Mutex<PeriodicState>,
    changed: Condvar,
    irq: IrqLine,
}

impl Periodic {
    /// The ticker thread's body: one pulse per period while enabled, on
    /// absolute deadlines (a late tick is not made up for, so a stalled host
    /// never sends a burst).
    fn run(&self) {
        let Ok(mut st) = self.state.lock() else { return };
        let mut next: Option<Instant> = None;
        loop {
            if st.stop {
                return;
            }
            let Some(p) = st.period else {
                next = None;
                st = match self.changed.wait(st) {
                    Ok(g) => g,
                    Err(_) => return,
                };
                continue;
            };
            let now = Instant::now();
            let due = match next {
                Some(d) if d > now => d,
                Some(_) => {
                    st.flags |= STATUS_C_PERIODIC;
                    let _ = self.irq.trigger();
                    let d = next.map(|d| d + p).filter(|d| *d > now).unwrap_or(now + p);
                    next = Some(d);
                    d
                }
                None => {
                    next = Some(now + p);
                    now + p
                }
            };
            st = match self.changed.wait_timeout(st, due.saturating_duration_since(now)) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
    }
}

/// The CMOS device.
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    clock: Box<dyn Fn() -> RtcTime + Send>,
    status_a: u8,
    status_b_pie: bool,
    /// IRQ 8 and its ticker; `None` when the board gives the RTC no line.
    periodic: Option<Arc<Periodic>>,
    /// Whether the ticker thread was started (on the first enable).
    ticking: bool,
}

impl Drop for Cmos {
    fn drop(&mut self) {
        if let Some(p) = &self.periodic {
            if let Ok(mut st) = p.state.lock() {
                st.stop = true;
            }
            p.changed.notify_all();
        }
    }
}

impl Default for Cmos {
    fn default() -> Self {
        Self::with_clock(Box::new(RtcTime::now))
    }
}

impl Cmos {
    /// A CMOS reading the host clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// A CMOS reading time from `clock` (used by tests).
    pub fn with_clock(clock: Box<dyn Fn() -> RtcTime + Send>) -> Self {
        Self { index: 0, nvram: [0; 128], clock, status_a: STATUS_A, status_b_pie: false, periodic: None, ticking: false }
    }

    /// Connects the periodic interrupt to `irq` (IRQ 8 on a PC).
    pub fn with_irq(mut self, irq: IrqLine) -> Self {
        self.periodic = Some(Arc::new(Periodic {
            state: Mutex::new(PeriodicState { period: None, flags: 0, stop: false }),
            changed: Condvar::new(),
            irq,
        }));
        self
    }

    /// Tells the ticker the period after a write to status A or B, starting
    /// it the first time the interrupt is enabled.
    fn update_periodic(&mut self) {
        let Some(p) = &self.periodic else { return };
        let period = if self.status_b_pie { period(self.status_a) } else { None };
        if let Ok(mut st) = p.state.lock() {
            st.period = period;
        }
        p.changed.notify_all();
        if period.is_some() && !self.ticking {
            let ticker = p.clone();
            match std::thread::Builder::new().name("rtc-periodic".into()).spawn(move || {
                rvirt_sandbox::seccomp::enter_or_exit(rvirt_sandbox::ThreadKind::Worker);
                ticker.run()
            }) {
                Ok(_) => self.ticking = true,
                Err(e) => tracing::warn!("RTC periodic interrupt unavailable: {e}"),
            }
        }
    }

    /// Status C: the pending flags, cleared by the read.
    fn take_status_c(&self) -> u8 {
        let Some(p) = &self.periodic else { return 0 };
        p.state.lock().map(|mut st| std::mem::take(&mut st.flags)).unwrap_or(0)
    }

    /// Presets NVRAM byte `index` (firmware reads the vCPU count at 0x5F
    /// and the boot devices at 0x3D/0x38 from it). Clock registers are
    /// not NVRAM and are left alone.
    pub fn set_nvram(&mut self, index: u8, value: u8) {
        let i = index & 0x7f;
        if !matches!(i, REG_SECONDS..=REG_YEAR | REG_STATUS_A..=REG_STATUS_D | REG_CENTURY) {
            self.nvram[usize::from(i)] = value;
        }
    }

    fn register(&mut self, index: u8) -> u8 {
        let t = || (self.clock)();
        match index {
            REG_SECONDS => bcd(t().second),
            REG_MINUTES => bcd(t().minute),
            REG_HOURS => bcd(t().hour),
            REG_WEEKDAY => bcd(t().weekday),
            REG_DAY => bcd(t().day),
            REG_MONTH => bcd(t().month),
            REG_YEAR => bcd((t().year % 100) as u8),
            REG_CENTURY => bcd((t().year / 100) as u8),
            REG_STATUS_A => self.status_a,
            REG_STATUS_B => STATUS_B_24H | if self.status_b_pie { STATUS_B_PIE } else { 0 },
            REG_STATUS_C => self.take_status_c(),
            REG_STATUS_D => STATUS_D_VALID,
            i => self.nvram[usize::from(i & 0x7f)],
        }
    }
}

impl crate::persist::Persist for Cmos {
    type State = crate::persist::CmosState;

    fn save(&self) -> Self::State {
        crate::persist::CmosState { index: self.index, nvram: self.nvram.to_vec(), status_a: self.status_a, periodic_enabled: self.status_b_pie }
    }

    fn restore(&mut self, state: Self::State) -> Result<(), crate::persist::RestoreError> {
        let nvram: [u8; 128] = state.nvram.as_slice().try_into().map_err(|_| crate::persist::RestoreError {
            device: "RTC/CMOS",
            reason: format!("{} bytes of NVRAM where there are 128", state.nvram.len()),
        })?;
        self.index = state.index & 0x7f;
        self.nvram = nvram;
        self.status_a = state.status_a;
        self.status_b_pie = state.periodic_enabled;
        // The ticker runs again at the saved rate if the guest had it on.
        self.update_periodic();
        Ok(())
    }
}

impl crate::BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = match offset {
                1 => self.register(self.index),
                _ => self.index,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            0 => self.index = v & 0x7f,
            1 => match self.index {
                REG_STATUS_A => {
                    self.status_a = v & 0x7f;
                    self.update_periodic();
                }
                REG_STATUS_B => {
                    self.status_b_pie = v & STATUS_B_PIE != 0;
                    self.update_periodic();
                }
                REG_SECONDS..=REG_YEAR | REG_STATUS_C..=REG_STATUS_D | REG_CENTURY => {}
                i => self.nvram[usize::from(i)] = v,
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_from_unix_time_matches_known_dates() {
        let t = |secs| {
            let r = RtcTime::from_unix(secs);
            (r.year, r.month, r.day, r.hour, r.minute, r.second, r.weekday)
        };
        assert_eq!(t(0), (1970, 1, 1, 0, 0, 0, 5), "a Thursday");
        assert_eq!(t(951_782_400), (2000, 2, 29, 0, 0, 0, 3), "leap day of a century leap year, a Tuesday");
        assert_eq!(t(1_798_761_599), (2026, 12, 31, 23, 59, 59, 5), "a Thursday");
        assert_eq!(t(4_107_542_400), (2100, 3, 1, 0, 0, 0, 2), "2100 is no leap year; a Monday");
    }
    use crate::BusDevice;

    #[test]
    fn nvram_index_and_rate_survive_a_save_and_restore() {
        use crate::persist::Persist;
        let mut a = fixed();
        a.set_nvram(0x5f, 3);
        a.write(0, &[0x40]);
        a.write(1, &[0x77]);
        a.write(0, &[REG_STATUS_A]);
        a.write(1, &[0x2f]);
        a.write(0, &[0x40]);
        let saved = a.save();
        let mut b = fixed();
        b.restore(saved.clone()).unwrap();
        assert_eq!(b.save(), saved);
        let mut v = [0u8];
        b.read(1, &mut v);
        assert_eq!(v[0], 0x77, "the selected register reads as before");
        b.write(0, &[0x5f]);
        b.read(1, &mut v);
        assert_eq!(v[0], 3);
        b.write(0, &[REG_STATUS_A]);
        b.read(1, &mut v);
        assert_eq!(v[0], 0x2f);
        let mut short = saved;
        short.nvram.truncate(10);
        assert!(b.restore(short).unwrap_err().to_string().contains("10 bytes of NVRAM"));
    }

    fn fixed() -> Cmos {
        Cmos::with_clock(Box::new(|| RtcTime {
            second: 59,
            minute: 7,
            hour: 23,
            weekday: 7,
            day: 21,
            month: 11,
            year: 2026,
        }))
    }

    fn get(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg | 0x80]);
        let mut d = [0u8];
        c.read(1, &mut d);
        d[0]
    }

    #[test]
    fn clock_registers_are_bcd() {
        let mut c = fixed();
        assert_eq!(get(&mut c, REG_SECONDS), 0x59);
        assert_eq!(get(&mut c, REG_MINUTES), 0x07);
        assert_eq!(get(&mut c, REG_HOURS), 0x23);
        assert_eq!(get(&mut c, REG_DAY), 0x21);
        assert_eq!(get(&mut c, REG_MONTH), 0x11);
        assert_eq!(get(&mut c, REG_YEAR), 0x26);
        assert_eq!(get(&mut c, REG_CENTURY), 0x20);
        assert_eq!(get(&mut c, REG_STATUS_B), STATUS_B_24H);
        assert_eq!(get(&mut c, REG_STATUS_A) & 0x80, 0, "never mid-update");
    }

    #[test]
    fn nvram_keeps_writes_but_clock_is_read_only() {
        let mut c = fixed();
        c.write(0, &[0x40]);
        c.write(1, &[0xab]);
        assert_eq!(get(&mut c, 0x40), 0xab);
        c.write(0, &[REG_SECONDS]);
        c.write(1, &[0x11]);
        assert_eq!(get(&mut c, REG_SECONDS), 0x59);
        c.set_nvram(0x5f, 1);
        c.set_nvram(REG_MONTH, 0xff);
        assert_eq!(
            (get(&mut c, 0x5f), get(&mut c, REG_MONTH)),
            (1, 0x11),
            "presets reach NVRAM only"
        );
    }

    #[test]
    fn the_periodic_interrupt_pulses_irq_8_while_enabled() {
        use vmm_sys_util::eventfd::EventFd;
        assert_eq!(period(6), Some(Duration::from_nanos(976_562)), "1024 Hz");
        assert_eq!(period(1), period(8));
        assert_eq!(period(3), Some(Duration::from_nanos(122_070)), "8192 Hz, the fastest");
        assert_eq!(period(0), None);
        let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut c = fixed().with_irq(IrqLine::new(evt.clone()));
        let set = |c: &mut Cmos, reg: u8, v: u8| {
            c.write(0, &[reg]);
            c.write(1, &[v]);
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(evt.read().is_err(), "no pulses before the guest enables them");
        set(&mut c, REG_STATUS_A, 0x26);
        set(&mut c, REG_STATUS_B, STATUS_B_24H | STATUS_B_PIE);
        assert_eq!(get(&mut c, REG_STATUS_B), STATUS_B_24H | STATUS_B_PIE);
        std::thread::sleep(Duration::from_millis(100));
        let pulses = evt.read().unwrap();
        assert!((5..=110).contains(&pulses), "~100 pulses at 1024 Hz in 100 ms (never a burst), got {pulses}");
        assert_eq!(get(&mut c, REG_STATUS_C), STATUS_C_PERIODIC);
        assert_eq!(get(&mut c, REG_STATUS_C) & 0x80, 0, "reading C clears it");
        set(&mut c, REG_STATUS_B, STATUS_B_24H);
        std::thread::sleep(Duration::from_millis(10));
        let _ = evt.read();
        std::thread::sleep(Duration::from_millis(30));
        assert!(evt.read().is_err(), "no pulses once disabled");
        set(&mut c, REG_STATUS_B, STATUS_B_PIE);
        set(&mut c, REG_STATUS_A, 0x20);
        std::thread::sleep(Duration::from_millis(10));
        let _ = evt.read();
        std::thread::sleep(Duration::from_millis(30));
        assert!(evt.read().is_err(), "rate 0 stops them too");
    }

    #[test]
    fn host_clock_is_sane() {
        let t = RtcTime::now();
        assert!(t.year >= 2024 && (1..=12).contains(&t.month) && (1..=7).contains(&t.weekday));
    }
}
