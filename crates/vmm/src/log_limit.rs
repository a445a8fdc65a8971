//! The VMM's log writer: a guest can make the VMM warn (bad descriptors,
//! unmapped MMIO, unsupported sleep states) as fast as it can loop, and a
//! hand-made guest filled 70 MB of log in 5 seconds. Lines are let through
//! at a bounded rate (a burst, then a steady trickle) and the whole run's
//! log output is capped; what is dropped is counted and said once.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

/// Lines let through at once after a quiet spell.
const BURST: f64 = 200.0;
/// Lines per second let through under a steady flood.
const PER_SECOND: f64 = 20.0;
/// Bytes of log one VMM run writes at most.
pub const MAX_LOG_BYTES: u64 = 16 << 20;

struct Bucket {
    tokens: f64,
    last: Instant,
    written: u64,
    dropped: u64,
    capped: bool,
}

/// A token bucket and a byte cap in front of a writer (stderr).
pub struct LimitedLog<W: Write + Send> {
    out: Mutex<(W, Bucket)>,
    max_bytes: u64,
}

impl<W: Write + Send> LimitedLog<W> {
    /// Limits what reaches `out`, at most `max_bytes` in all.
    pub fn new(out: W, max_bytes: u64) -> Self {
        Self { out: Mutex::new((out, Bucket { tokens: BURST, last: Instant::now(), written: 0, dropped: 0, capped: false })), max_bytes }
    }

    /// A writer for one log event (what `tracing` asks for per event).
    pub fn writer(&self) -> LineWriter<'_, W> {
        LineWriter { log: self, buf: Vec::new() }
    }

    /// Writes one formatted log line, or counts it as dropped.
    pub fn line(&self, buf: &[u8]) {
        let mut g = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let (out, b) = &mut *g;
        if b.capped {
            return;
        }
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * PER_SECOND).min(BURST);
        b.last = now;
        if b.written + buf.len() as u64 + 128 > self.max_bytes {
            b.capped = true;
            let _ = writeln!(out, "rvirt-vmm log: {} bytes written; further log lines are dropped for this run", b.written);
            return;
        }
        if b.tokens < 1.0 {
            b.dropped += 1;
            return;
        }
        b.tokens -= 1.0;
        if b.dropped > 0 {
            let note = format!("rvirt-vmm log: {} lines dropped (more than {PER_SECOND} a second)\n", b.dropped);
            b.written += note.len() as u64;
            let _ = out.write_all(note.as_bytes());
            b.dropped = 0;
        }
        b.written += buf.len() as u64;
        let _ = out.write_all(buf);
    }
}

/// The `tracing` writer: each event is formatted into a buffer, then handed
/// to [`LimitedLog::line`] whole.
pub struct LineWriter<'a, W: Write + Send> {
    log: &'a LimitedLog<W>,
    buf: Vec<u8>,
}

impl<W: Write + Send> Write for LineWriter<'_, W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write + Send> Drop for LineWriter<'_, W> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.log.line(&self.buf);
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flood_is_cut_to_a_burst_then_capped() {
        let sink = Sink::default();
        let log = LimitedLog::new(sink.clone(), 64 << 10);
        let line = b"vCPU 0: guest write at unmapped MMIO address 0xdead0000; ignored\n";
        for _ in 0..100_000 {
            log.line(line);
        }
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let kept = text.lines().filter(|l| l.starts_with("vCPU")).count();
        assert!((200..=230).contains(&kept), "{kept} lines let through a flood");
        std::thread::sleep(std::time::Duration::from_millis(200));
        log.line(line);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("lines dropped"), "the drop is said");
        // Past the byte cap, nothing more at all, and one line says so.
        let sink = Sink::default();
        let log = LimitedLog::new(sink.clone(), 4096);
        for _ in 0..100 {
            use std::io::Write as _;
            let mut w = log.writer();
            w.write_all(&[b'x'; 999]).unwrap();
            w.write_all(b"\n").unwrap();
        }
        let len = sink.0.lock().unwrap().len();
        assert!(len <= 4096, "{len} bytes");
        assert!(String::from_utf8_lossy(&sink.0.lock().unwrap()).contains("further log lines are dropped"));
    }
}
