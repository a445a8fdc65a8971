//! Backends for the guest's serial console: the VMM's stdio (raw mode on a
//! terminal, restored on every way out), a file, a new pty, or nothing.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use crate::config::SerialMode;
use crate::{Error, Result};

/// The terminal settings to put back, shared with the panic hook and signal path.
static SAVED_TERMIOS: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Restores stdin's terminal settings if rvirt-vmm changed them. Safe to call
/// any number of times, from any thread.
pub fn restore_terminal() {
    let saved = SAVED_TERMIOS.lock().map(|mut g| g.take()).unwrap_or(None);
    if let Some(t) = saved {
        // SAFETY: tcsetattr on fd 0 with settings read from fd 0 earlier.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
    }
}

fn set_raw(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain data; tcgetattr fills it or fails.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr fills the struct we own, or fails.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let saved = t;
    // SAFETY: cfmakeraw only edits the struct we own.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: tcsetattr reads the struct we own.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(saved)
}

/// Writes to a non-blocking fd, dropping what does not fit: a pty nobody
/// reads must never stall the vCPU that is printing.
struct LossyFdWriter(File);

impl Write for LossyFdWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(buf.len()),
            other => other,
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An open console backend. Each boot of the VM takes a fresh [`Console::writer`].
pub struct Console {
    mode: SerialMode,
    file: Option<File>,
    pty_master: Option<OwnedFd>,
    /// Kept open so the master never sees a hang-up while no client is attached.
    _pty_slave: Option<OwnedFd>,
    /// Path of the pty's slave side, for users to attach to.
    pub pty_path: Option<String>,
    raw_mode: bool,
}

impl Console {
    /// Opens the backend for `mode`.
    pub fn open(mode: &SerialMode) -> Result<Self> {
        let mut c = Self { mode: mode.clone(), file: None, pty_master: None, _pty_slave: None, pty_path: None, raw_mode: false };
        match mode {
            SerialMode::Stdio => {
                // SAFETY: isatty only inspects fd 0.
                if unsafe { libc::isatty(0) } == 1 {
                    let saved = set_raw(0).map_err(|e| Error::Console(format!("cannot set raw mode on stdin: {e}")))?;
                    if let Ok(mut g) = SAVED_TERMIOS.lock() {
                        *g = Some(saved);
                    }
                    c.raw_mode = true;
                }
            }
            SerialMode::File(path) => {
                let f = match rvirt_block::file::passed(path, false, true) {
                    Ok(Some(f)) => Ok(f),
                    Ok(None) => OpenOptions::new().create(true).append(true).open(path),
                    Err(e) => Err(e),
                };
                c.file = Some(f.map_err(|e| Error::Console(format!("cannot open {}: {e}", path.display())))?);
            }
            SerialMode::Pty => {
                let (master, slave, path) = open_pty().map_err(|e| Error::Console(format!("cannot create a pty: {e}")))?;
                eprintln!("rvirt-vmm: serial console on {path}");
                c.pty_master = Some(master);
                c._pty_slave = Some(slave);
                c.pty_path = Some(path);
            }
            SerialMode::Null => {}
        }
        Ok(c)
    }

    /// Whether stdin was switched to raw mode (so Ctrl-A x is the way out).
    pub fn is_raw(&self) -> bool {
        self.raw_mode
    }

    /// A writer for the guest's output.
    pub fn writer(&self) -> Result<Box<dyn Write + Send>> {
        let dup = |fd: RawFd| -> Result<File> {
            // SAFETY: dup of a descriptor we hold; the new fd is owned by the File.
            let n = unsafe { libc::dup(fd) };
            if n < 0 {
                return Err(Error::Console(format!("dup: {}", io::Error::last_os_error())));
            }
            // SAFETY: `n` is the new descriptor dup returned, owned by nothing else.
            Ok(unsafe { File::from_raw_fd(n) })
        };
        Ok(match self.mode {
            SerialMode::Stdio => Box::new(io::stdout()),
            SerialMode::File(_) => match &self.file {
                Some(f) => Box::new(f.try_clone().map_err(|e| Error::Console(e.to_string()))?),
                None => Box::new(io::sink()),
            },
            SerialMode::Pty => match &self.pty_master {
                Some(m) => Box::new(LossyFdWriter(dup(m.as_raw_fd())?)),
                None => Box::new(io::sink()),
            },
            SerialMode::Null => Box::new(io::sink()),
        })
    }

    /// The descriptor to poll for user input, if this backend has input.
    pub fn input_fd(&self) -> Option<RawFd> {
        match self.mode {
            SerialMode::Stdio => Some(0),
            SerialMode::Pty => self.pty_master.as_ref().map(|m| m.as_raw_fd()),
            _ => None,
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if self.raw_mode {
            restore_terminal();
        }
    }
}

fn open_pty() -> io::Result<(OwnedFd, OwnedFd, String)> {
    // SAFETY: standard pty allocation; every returned fd is checked and owned.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC);
        if m < 0 {
            return Err(io::Error::last_os_error());
        }
        let master = OwnedFd::from_raw_fd(m);
        if libc::grantpt(m) != 0 || libc::unlockpt(m) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0 as libc::c_char; 128];
        if libc::ptsname_r(m, buf.as_mut_ptr(), buf.len()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let path = std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
        let s = libc::open(buf.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        let slave = OwnedFd::from_raw_fd(s);
        // The slave must be raw, or its line discipline would echo the guest's
        // output back to us as input.
        set_raw(s)?;
        Ok((master, slave, path))
    }
}

/// Ctrl-A: the escape key of the stdio console, as in QEMU's `-nographic`.
pub const ESCAPE: u8 = 0x01;

/// Splits typed input into bytes for the guest and console commands:
/// `Ctrl-A x` quits, `Ctrl-A Ctrl-A` sends one Ctrl-A.
#[derive(Default)]
pub struct EscapeFilter {
    pending_escape: bool,
}

impl EscapeFilter {
    /// Filters `input`; returns the bytes for the guest and whether to quit.
    pub fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.pending_escape {
                self.pending_escape = false;
                match b {
                    b'x' | b'X' => return (out, true),
                    ESCAPE => out.push(ESCAPE),
                    _ => {}
                }
            } else if b == ESCAPE {
                self.pending_escape = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn escape_sequences() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.filter(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(f.filter(&[b'a', ESCAPE, ESCAPE, b'b']), (vec![b'a', ESCAPE, b'b'], false));
        assert_eq!(f.filter(&[b'q', ESCAPE]), (vec![b'q'], false));
        assert_eq!(f.filter(b"x"), (vec![], true), "escape split across reads");
        assert_eq!(f.filter(&[ESCAPE, b'z', b'k']), (vec![b'k'], false), "unknown command is dropped");
    }

    #[test]
    fn file_backend_appends() {
        let p = std::env::temp_dir().join(format!("rvirt-console-{}", std::process::id()));
        std::fs::write(&p, b"old\n").unwrap();
        let c = Console::open(&SerialMode::File(p.clone())).unwrap();
        assert!(c.input_fd().is_none());
        c.writer().unwrap().write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"old\nnew\n");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn file_backend_reports_bad_paths() {
        let e = Console::open(&SerialMode::File("/nonexistent/dir/log".into())).err().unwrap();
        assert!(e.to_string().contains("/nonexistent/dir/log"));
    }

    #[test]
    fn pty_carries_output_and_never_blocks() {
        let c = Console::open(&SerialMode::Pty).unwrap();
        let path = c.pty_path.clone().unwrap();
        let mut client = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut w = c.writer().unwrap();
        w.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // Nobody reads now: far more than the pty buffer must still not block.
        let big = vec![b'x'; 1 << 20];
        w.write_all(&big).unwrap();
        assert!(c.input_fd().is_some());
    }
}
