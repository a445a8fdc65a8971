//! `rvirt console`: joins this terminal to a domain's serial pty until
//! Ctrl-] (like virsh) or until the domain stops.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{Context, Result};

/// The byte Ctrl-] sends.
pub const ESCAPE: u8 = 0x1d;

/// Puts fd 0 in raw mode while alive, if it is a terminal.
struct RawStdin(Option<libc::termios>);

impl RawStdin {
    fn new() -> Self {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a termios we own.
        unsafe {
            if libc::isatty(0) != 1 {
                return Self(None);
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Self(None);
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Self(Some(saved))
        }
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores what was read in new().
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// How a console session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Detach {
    /// The user typed Ctrl-] (or stdin ended).
    User,
    /// The pty closed: the domain stopped.
    DomainGone,
}

/// Copies between stdin/stdout and the pty at `path` until detached.
pub fn attach(path: &str) -> Result<Detach> {
    let mut pty = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("opening the console {path}"))?;
    let _raw = RawStdin::new();
    let mut stdout = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        let mut fds = [
            libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: pty.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll on two pollfds we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        if fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            match pty.read(&mut buf) {
                Ok(0) | Err(_) => return Ok(Detach::DomainGone),
                Ok(n) => {
                    stdout.write_all(&buf[..n])?;
                    stdout.flush()?;
                }
            }
        }
        if fds[0].revents & (libc::POLLIN | libc::POLLHUP) != 0 {
            // Unbuffered: what poll saw is exactly what is read.
            // SAFETY: read into a buffer we own.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return Ok(Detach::User);
            }
            let input = &buf[..n as usize];
            match input.iter().position(|b| *b == ESCAPE) {
                Some(i) => {
                    pty.write_all(&input[..i])?;
                    return Ok(Detach::User);
                }
                None => pty.write_all(input)?,
            }
        }
    }
}
