//! A server for line-delimited requests on a unix socket whose cost is
//! bounded whatever its clients do.
//!
//! rvirtd's management socket and each VMM's control socket speak one JSON
//! request per line. A thread per connection let 3,000 idle clients cost
//! 3,000 threads, and 300 half-sent 1 MiB lines 347 MB. Here one thread
//! polls every connection (an idle one costs a descriptor and nothing
//! else), a fixed pool of workers answers complete lines, and every buffer
//! and wait has a bound: the length of a line, the bytes buffered across
//! all connections, the number of connections, how long a line may take to
//! arrive, how long a connection may sit idle and how long a reply may take
//! to be read.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The bounds a server keeps.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections open at once; one more is told so and closed.
    pub max_connections: usize,
    /// Longest request line, newline excluded.
    pub max_line: usize,
    /// Bytes of partial requests buffered across all connections.
    pub max_buffered: usize,
    /// Threads answering requests.
    pub workers: usize,
    /// How long a started line may take to arrive in full.
    pub line_timeout: Duration,
    /// How long a connection may sit with nothing to do.
    pub idle_timeout: Duration,
    /// How long a client may take to read its reply.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_line: 1 << 20,
            max_buffered: 64 << 20,
            workers: 8,
            line_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// What a worker is handed.
pub enum Line<'a> {
    /// A complete request line (newline and surrounding white space removed).
    Request(&'a [u8]),
    /// The client sent a line over [`Limits::max_line`]; the connection is
    /// closed after the reply.
    TooLong,
    /// The server is full; the connection is closed after the reply.
    Busy,
}

/// Answers one line with the bytes to send back (a newline is added).
pub type Handler = dyn Fn(Line) -> Vec<u8> + Send + Sync;

/// Counts a running server reports (for tests and diagnostics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections open now.
    pub connections: usize,
    /// Bytes of partial requests buffered now.
    pub buffered: usize,
    /// Most bytes ever buffered at once.
    pub peak_buffered: usize,
    /// Connections closed for breaking a limit.
    pub dropped: u64,
    /// Requests being answered or whose answers are being written.
    pub in_progress: usize,
}

/// A handle on a running server.
#[derive(Clone)]
pub struct Server {
    stats: Arc<Mutex<Stats>>,
}

impl Server {
    /// The current counts.
    pub fn stats(&self) -> Stats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

enum State {
    /// Waiting for (the rest of) a request.
    Reading,
    /// A worker has the request.
    Busy,
    /// Sending a reply.
    Writing { out: Vec<u8>, pos: usize },
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    state: State,
    /// Last progress of any kind.
    active: Instant,
    /// When the partial line in `buf` started.
    partial_since: Option<Instant>,
    /// The client has closed its side (it may still read the reply).
    eof: bool,
    /// Writing to the client failed.
    broken: bool,
    /// Close once the reply is sent (over-long line, server full).
    close_after: bool,
}

/// Serves `listener` with `handler` on threads of its own, for as long as the process lives.
pub fn spawn(listener: UnixListener, limits: Limits, handler: Arc<Handler>) -> std::io::Result<Server> {
    listener.set_nonblocking(true)?;
    let stats = Arc::new(Mutex::new(Stats::default()));
    let (job_tx, job_rx) = mpsc::channel::<(u64, Vec<u8>, u8)>();
    let (done_tx, done_rx) = mpsc::channel::<(u64, Vec<u8>)>();
    let wake = wake_pipe()?;
    let job_rx = Arc::new(Mutex::new(job_rx));
    for i in 0..limits.workers.max(1) {
        let (job_rx, done_tx, handler, wake_w) = (job_rx.clone(), done_tx.clone(), handler.clone(), wake.1);
        std::thread::Builder::new().name(format!("lineserver-{i}")).spawn(move || worker(&job_rx, &done_tx, &*handler, wake_w))?;
    }
    let st = stats.clone();
    std::thread::Builder::new().name("lineserver-poll".into()).spawn(move || poll_loop(listener, limits, job_tx, done_rx, wake.0, &st))?;
    Ok(Server { stats })
}

const KIND_REQUEST: u8 = 0;
const KIND_TOO_LONG: u8 = 1;
const KIND_BUSY: u8 = 2;

fn worker(jobs: &Mutex<Receiver<(u64, Vec<u8>, u8)>>, done: &Sender<(u64, Vec<u8>)>, handler: &Handler, wake: RawFd) {
    loop {
        let job = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((id, line, kind)) = job else { return };
        let mut out = handler(match kind {
            KIND_TOO_LONG => Line::TooLong,
            KIND_BUSY => Line::Busy,
            _ => Line::Request(&line),
        });
        out.push(b'\n');
        if done.send((id, out)).is_err() {
            return;
        }
        // SAFETY: writing one byte from a live buffer to the wake pipe we own.
        unsafe { libc::write(wake, [1u8].as_ptr().cast(), 1) };
    }
}

/// A non-blocking pipe: workers write to wake the poll thread.
fn wake_pipe() -> std::io::Result<(RawFd, RawFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((fds[0], fds[1]))
}

fn poll_loop(
    listener: UnixListener,
    limits: Limits,
    jobs: Sender<(u64, Vec<u8>, u8)>,
    done: Receiver<(u64, Vec<u8>)>,
    wake: RawFd,
    stats: &Mutex<Stats>,
) {
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next_id = 0u64;
    let mut buffered = 0usize;
    let mut dropped = 0u64;
    let mut peak = 0usize;
    let mut accept_paused_until: Option<Instant> = None;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        // Who to wait for.
        let mut fds = vec![libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 }];
        let listening = accept_paused_until.is_none_or(|t| Instant::now() >= t);
        if listening {
            fds.push(libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let first_conn = fds.len();
        let mut ids = Vec::with_capacity(conns.len());
        for (&id, c) in &conns {
            // A connection with a request at a worker is not polled at all: a
            // hung-up one would otherwise wake poll at once, again and again.
            let (fd, events) = match c.state {
                State::Reading if !c.eof => (c.stream.as_raw_fd(), libc::POLLIN),
                State::Writing { .. } if !c.broken => (c.stream.as_raw_fd(), libc::POLLOUT),
                _ => (-1, 0),
            };
            fds.push(libc::pollfd { fd, events, revents: 0 });
            ids.push(id);
        }
        // SAFETY: poll over a live array of pollfds of the length given.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        let now = Instant::now();
        // Replies from workers.
        let mut drain = [0u8; 64];
        // SAFETY: reading into a live local buffer from the pipe we own.
        while unsafe { libc::read(wake, drain.as_mut_ptr().cast(), drain.len()) } > 0 {}
        while let Ok((id, out)) = done.try_recv() {
            if let Some(c) = conns.get_mut(&id) {
                c.state = State::Writing { out, pos: 0 };
                c.active = now;
            }
        }
        // New connections.
        if listening && fds[1].revents != 0 {
            loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if stream.set_nonblocking(true).is_err() {
                            continue;
                        }
                        let id = next_id;
                        next_id += 1;
                        let full = conns.len() >= limits.max_connections;
                        let state = if full { State::Busy } else { State::Reading };
                        let conn = Conn { stream, buf: Vec::new(), state, active: now, partial_since: None, eof: false, broken: false, close_after: full };
                        conns.insert(id, conn);
                        if full {
                            dropped += 1;
                            let _ = jobs.send((id, Vec::new(), KIND_BUSY));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Out of descriptors (EMFILE) and the like: stop accepting for a moment
                        // instead of spinning on a listener that stays readable.
                        tracing::warn!("accept: {e}");
                        accept_paused_until = Some(now + Duration::from_millis(100));
                        break;
                    }
                }
            }
        }
        // Reads and writes.
        for (k, id) in ids.iter().enumerate() {
            let revents = fds[first_conn + k].revents;
            let Some(c) = conns.get_mut(id) else { continue };
            if revents & libc::POLLIN != 0 || (revents & (libc::POLLHUP | libc::POLLERR) != 0 && matches!(c.state, State::Reading)) {
                loop {
                    match c.stream.read(&mut chunk) {
                        Ok(0) => {
                            c.eof = true;
                            break;
                        }
                        Ok(n) => {
                            c.buf.extend_from_slice(&chunk[..n]);
                            buffered += n;
                            c.active = now;
                            if c.buf.len() > limits.max_line + 1 || buffered > limits.max_buffered {
                                break;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => {
                            c.eof = true;
                            break;
                        }
                    }
                }
            }
            if revents & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0 {
                if let State::Writing { out, pos } = &mut c.state {
                    match c.stream.write(&out[*pos..]) {
                        Ok(n) => {
                            *pos += n;
                            c.active = now;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => c.broken = true,
                    }
                }
            }
        }
        // Advance each connection; close what is finished or over a limit.
        let mut close = Vec::new();
        for (&id, c) in conns.iter_mut() {
            if let State::Writing { out, pos } = &c.state {
                if *pos < out.len() {
                    if c.broken || now.duration_since(c.active) > limits.write_timeout {
                        close.push(id);
                    }
                    continue;
                }
                if c.close_after || (c.eof && !c.buf.contains(&b'\n')) {
                    close.push(id);
                    continue;
                }
                c.state = State::Reading;
            }
            if !matches!(c.state, State::Reading) {
                continue;
            }
            // Take the next complete line, if any.
            let start = c.buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(c.buf.len());
            if start > 0 {
                c.buf.drain(..start);
                buffered -= start;
            }
            if let Some(end) = c.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = c.buf.drain(..=end).collect();
                buffered -= line.len();
                line.pop();
                while line.last().is_some_and(u8::is_ascii_whitespace) {
                    line.pop();
                }
                c.partial_since = None;
                if line.len() > limits.max_line {
                    c.close_after = true;
                    c.state = State::Busy;
                    let _ = jobs.send((id, Vec::new(), KIND_TOO_LONG));
                } else {
                    c.state = State::Busy;
                    let _ = jobs.send((id, line, KIND_REQUEST));
                }
                continue;
            }
            if c.buf.len() > limits.max_line {
                dropped += 1;
                buffered -= c.buf.len();
                c.buf = Vec::new();
                c.close_after = true;
                c.state = State::Busy;
                let _ = jobs.send((id, Vec::new(), KIND_TOO_LONG));
                continue;
            }
            if !c.buf.is_empty() {
                let since = *c.partial_since.get_or_insert(now);
                if now.duration_since(since) > limits.line_timeout {
                    dropped += 1;
                    close.push(id);
                    continue;
                }
            }
            if c.eof || (c.buf.is_empty() && now.duration_since(c.active) > limits.idle_timeout) {
                close.push(id);
            }
        }
        // Over the memory bound: close the connections holding the most.
        if buffered > limits.max_buffered {
            let mut by_size: Vec<(usize, u64)> = conns.iter().filter(|(id, _)| !close.contains(id)).map(|(&id, c)| (c.buf.len(), id)).collect();
            by_size.sort_unstable_by(|a, b| b.cmp(a));
            let mut over = buffered - limits.max_buffered;
            for (len, id) in by_size {
                if over == 0 || len == 0 {
                    break;
                }
                close.push(id);
                dropped += 1;
                over = over.saturating_sub(len);
            }
        }
        for id in close {
            if let Some(c) = conns.remove(&id) {
                buffered -= c.buf.len();
            }
        }
        peak = peak.max(buffered);
        let in_progress = conns.values().filter(|c| !matches!(c.state, State::Reading)).count();
        *stats.lock().unwrap_or_else(|e| e.into_inner()) = Stats { connections: conns.len(), buffered, peak_buffered: peak, dropped, in_progress };
    }
}

/// Raises this process's soft limit on open descriptors to its hard limit
/// (at most 65,536), so thousands of idle clients cannot starve the
/// server of descriptors at the usual soft limit of 1,024.
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a live rlimit struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            let want = r.rlim_max.min(65_536);
            if r.rlim_cur < want {
                r.rlim_cur = want;
                libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            }
        }
    }
}

#[cfg(test)]
mod tests;
