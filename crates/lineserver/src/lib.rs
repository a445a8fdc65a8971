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
//! to be read. The poll thread uses epoll and looks only at connections
//! that have something to do (and at all of them once a second, for
//! timeouts), so a thousand idle clients do not slow the busy one.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
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
    /// Bytes held for clients across all connections: partial requests and
    /// answers not yet read (a client that asks and never reads holds its answer).
    pub max_buffered: usize,
    /// Threads answering requests.
    pub workers: usize,
    /// How long a started line may take to arrive in full.
    pub line_timeout: Duration,
    /// How long a connection may sit with nothing to do.
    pub idle_timeout: Duration,
    /// How long a client may take to read its reply.
    pub write_timeout: Duration,
    /// Called first on each of the server's threads (rvirt-vmm confines them with it).
    pub thread_start: Option<fn()>,
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
            thread_start: None,
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
    /// The server is full; the connection is closed after the reply. Asked
    /// once, when the server starts: the answer must not depend on anything.
    Busy,
}

/// Answers one line with the bytes to send back (a newline is added).
pub type Handler = dyn Fn(Line) -> Vec<u8> + Send + Sync;

/// Counts a running server reports (for tests and diagnostics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections open now.
    pub connections: usize,
    /// Bytes of partial requests and unread answers held now.
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
    /// The epoll events it is registered for (0: not registered).
    registered: u32,
    /// Who connected.
    peer: Peer,
    /// Descriptors it sent, for its next request.
    fds: Vec<OwnedFd>,
}

impl Conn {
    /// Bytes this connection holds: its partial request and unsent answer.
    fn held(&self) -> usize {
        let unsent = match &self.state {
            State::Writing { out, pos } => out.len() - pos,
            _ => 0,
        };
        self.buf.len() + unsent
    }
}

/// Serves `listener` with `handler` on threads of its own, for as long as the process lives.
pub fn spawn(listener: UnixListener, limits: Limits, handler: Arc<Handler>) -> std::io::Result<Server> {
    listener.set_nonblocking(true)?;
    let stats = Arc::new(Mutex::new(Stats::default()));
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let (done_tx, done_rx) = mpsc::channel::<(u64, Vec<u8>)>();
    let wake = wake_pipe()?;
    let job_rx = Arc::new(Mutex::new(job_rx));
    for i in 0..limits.workers.max(1) {
        let (job_rx, done_tx, handler, wake_w) = (job_rx.clone(), done_tx.clone(), handler.clone(), wake.1);
        let start = limits.thread_start;
        std::thread::Builder::new().name(format!("lineserver-{i}")).spawn(move || {
            if let Some(f) = start {
                f();
            }
            worker(&job_rx, &done_tx, &*handler, wake_w)
        })?;
    }
    let st = stats.clone();
    // Said to a client over the connection cap straight from the poll thread.
    let mut busy = handler(Line::Busy);
    busy.push(b'\n');
    std::thread::Builder::new().name("lineserver-poll".into()).spawn(move || {
        if let Some(f) = limits.thread_start {
            f();
        }
        poll_loop(listener, limits, job_tx, done_rx, wake.0, &busy, &st)
    })?;
    Ok(Server { stats })
}

/// A request for a worker: connection id, line, kind, who sent it, and the
/// descriptors the client sent since its previous request.
type Job = (u64, Vec<u8>, u8, Peer, Vec<OwnedFd>);

/// Descriptors a connection may have waiting (SCM_RIGHTS); more are closed
/// as they arrive.
pub const MAX_FDS_PER_CONNECTION: usize = 4;

/// Who is on the other end of a connection (SO_PEERCRED at accept).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The client's process id (in the server's PID namespace).
    pub pid: i32,
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
}

impl Peer {
    /// The credentials of the process on the other end of `stream`.
    pub fn of(stream: &UnixStream) -> std::io::Result<Self> {
        // SAFETY: getsockopt writes at most `len` bytes into the ucred we own.
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: the socket is open for the call; cred and len are ours and sized as told.
        let rc = unsafe {
            libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, std::ptr::addr_of_mut!(cred).cast(), &mut len)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { pid: cred.pid, uid: cred.uid, gid: cred.gid })
    }
}

thread_local! {
    static PEER: std::cell::Cell<Option<Peer>> = const { std::cell::Cell::new(None) };
    static FDS: std::cell::RefCell<Vec<OwnedFd>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The descriptors the client sent with the request the calling worker
/// thread is answering (inside a [`Handler`]); those not taken are closed
/// when the handler returns.
pub fn take_fds() -> Vec<OwnedFd> {
    FDS.with(|f| std::mem::take(&mut *f.borrow_mut()))
}

/// Reads like `read(2)`, keeping descriptors passed with the bytes in `fds`
/// (at most [`MAX_FDS_PER_CONNECTION`]; the rest are closed).
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    use std::os::fd::FromRawFd;
    const MAX: usize = MAX_FDS_PER_CONNECTION;
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX * std::mem::size_of::<libc::c_int>()) as u32) } as usize;
    let mut control = [0u64; 8];
    debug_assert!(space <= std::mem::size_of_val(&control));
    // SAFETY: msghdr is plain data pointing at live buffers of this frame;
    // the kernel fills at most their lengths, and each descriptor it reports
    // is new and ours (MSG_CMSG_CLOEXEC).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if fds.len() < MAX {
                        fds.push(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok(n as usize)
    }
}

/// The client whose request the calling worker thread is answering (inside a
/// [`Handler`]); `None` elsewhere.
pub fn peer() -> Option<Peer> {
    PEER.with(|p| p.get())
}

const KIND_REQUEST: u8 = 0;
const KIND_TOO_LONG: u8 = 1;

fn worker(jobs: &Mutex<Receiver<Job>>, done: &Sender<(u64, Vec<u8>)>, handler: &Handler, wake: RawFd) {
    loop {
        let job = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok((id, line, kind, peer, fds)) = job else { return };
        PEER.with(|p| p.set(Some(peer)));
        FDS.with(|f| *f.borrow_mut() = fds);
        let mut out = handler(match kind {
            KIND_TOO_LONG => Line::TooLong,
            _ => Line::Request(&line),
        });
        out.push(b'\n');
        drop(take_fds());
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

/// Epoll tokens of the two descriptors that are not connections.
const WAKE_TOKEN: u64 = u64::MAX;
const LISTEN_TOKEN: u64 = u64::MAX - 1;

/// The epoll set: what each connection is registered for.
struct Interest {
    epfd: RawFd,
}

impl Interest {
    fn ctl(&self, op: i32, fd: RawFd, token: u64, events: u32) {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: epoll_ctl on our epoll descriptor with a live event struct.
        unsafe { libc::epoll_ctl(self.epfd, op, fd, &mut ev) };
    }

    /// Registers `c` for what its state waits on, or not at all while a
    /// worker has its request (a hung-up socket would otherwise be reported
    /// again and again).
    fn update(&self, id: u64, c: &mut Conn) {
        let want = match c.state {
            State::Reading if !c.eof => libc::EPOLLIN as u32,
            State::Writing { .. } if !c.broken => libc::EPOLLOUT as u32,
            _ => 0,
        };
        if want == c.registered {
            return;
        }
        let fd = c.stream.as_raw_fd();
        match (c.registered, want) {
            (0, w) => self.ctl(libc::EPOLL_CTL_ADD, fd, id, w),
            (_, 0) => self.ctl(libc::EPOLL_CTL_DEL, fd, id, 0),
            (_, w) => self.ctl(libc::EPOLL_CTL_MOD, fd, id, w),
        }
        c.registered = want;
    }
}

fn poll_loop(
    listener: UnixListener,
    limits: Limits,
    jobs: Sender<Job>,
    done: Receiver<(u64, Vec<u8>)>,
    wake: RawFd,
    busy: &[u8],
    stats: &Mutex<Stats>,
) {
    // SAFETY: epoll_create1 has no preconditions.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        tracing::error!("epoll_create1: {}", std::io::Error::last_os_error());
        return;
    }
    let interest = Interest { epfd };
    interest.ctl(libc::EPOLL_CTL_ADD, wake, WAKE_TOKEN, libc::EPOLLIN as u32);
    interest.ctl(libc::EPOLL_CTL_ADD, listener.as_raw_fd(), LISTEN_TOKEN, libc::EPOLLIN as u32);
    let mut listening = true;
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next_id = 0u64;
    let mut buffered = 0usize;
    let mut dropped = 0u64;
    let mut peak = 0usize;
    let mut accept_paused_until: Option<Instant> = None;
    let mut last_sweep = Instant::now();
    let mut chunk = vec![0u8; 64 << 10];
    // SAFETY: epoll_event is plain data; zeroed entries are valid.
    let mut events: Vec<libc::epoll_event> = vec![unsafe { std::mem::zeroed() }; 256];
    loop {
        // SAFETY: epoll_wait fills at most `events.len()` entries of our live buffer.
        let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, 1000) };
        let now = Instant::now();
        let mut touched: Vec<u64> = Vec::new();
        let mut accept_ready = false;
        for ev in &events[..n.max(0) as usize] {
            let (token, revents) = (ev.u64, ev.events);
            match token {
                WAKE_TOKEN => {
                    let mut drain = [0u8; 64];
                    // SAFETY: reading into a live local buffer from the pipe we own.
                    while unsafe { libc::read(wake, drain.as_mut_ptr().cast(), drain.len()) } > 0 {}
                }
                LISTEN_TOKEN => accept_ready = true,
                id => {
                    let Some(c) = conns.get_mut(&id) else { continue };
                    touched.push(id);
                    if matches!(c.state, State::Reading) && revents & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                        loop {
                            match recv_with_fds(&c.stream, &mut chunk, &mut c.fds) {
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
                    if let State::Writing { out, pos } = &mut c.state {
                        match c.stream.write(&out[*pos..]) {
                            Ok(n) => {
                                *pos += n;
                                buffered -= n;
                                c.active = now;
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                            Err(_) => c.broken = true,
                        }
                    }
                }
            }
        }
        // Replies from workers: write at once (most fit the socket buffer).
        while let Ok((id, out)) = done.try_recv() {
            if let Some(c) = conns.get_mut(&id) {
                let mut pos = 0;
                match c.stream.write(&out) {
                    Ok(n) => pos = n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => c.broken = true,
                }
                buffered += out.len() - pos;
                c.state = State::Writing { out, pos };
                c.active = now;
                touched.push(id);
            }
        }
        // New connections.
        if accept_paused_until.is_some_and(|t| now >= t) {
            accept_paused_until = None;
            interest.ctl(libc::EPOLL_CTL_ADD, listener.as_raw_fd(), LISTEN_TOKEN, libc::EPOLLIN as u32);
            listening = true;
            accept_ready = true;
        }
        if accept_ready && listening {
            loop {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        if stream.set_nonblocking(true).is_err() {
                            continue;
                        }
                        if conns.len() >= limits.max_connections {
                            // Told so (best effort: it fits any socket buffer) and closed.
                            dropped += 1;
                            let _ = stream.write(busy);
                            continue;
                        }
                        let id = next_id;
                        next_id += 1;
                        let peer = Peer::of(&stream).unwrap_or_default();
                        let mut conn = Conn {
                            stream,
                            buf: Vec::new(),
                            state: State::Reading,
                            active: now,
                            partial_since: None,
                            eof: false,
                            broken: false,
                            close_after: false,
                            registered: 0,
                            peer,
                            fds: Vec::new(),
                        };
                        interest.update(id, &mut conn);
                        conns.insert(id, conn);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Out of descriptors (EMFILE) and the like: stop accepting for a moment
                        // instead of spinning on a listener that stays readable.
                        tracing::warn!("accept: {e}");
                        accept_paused_until = Some(now + Duration::from_millis(100));
                        interest.ctl(libc::EPOLL_CTL_DEL, listener.as_raw_fd(), LISTEN_TOKEN, 0);
                        listening = false;
                        break;
                    }
                }
            }
        }
        // Once a second, every connection is looked at for its timeouts.
        if now.duration_since(last_sweep) >= Duration::from_secs(1) {
            last_sweep = now;
            touched.extend(conns.keys().copied());
        }
        touched.sort_unstable();
        touched.dedup();
        // Advance what changed; close what is finished or over a limit.
        let mut close = Vec::new();
        for id in touched {
            let Some(c) = conns.get_mut(&id) else { continue };
            if advance(id, c, &limits, now, &jobs, &mut buffered, &mut dropped) {
                close.push(id);
            } else {
                interest.update(id, c);
            }
        }
        // Over the memory bound: close the connections holding the most.
        if buffered > limits.max_buffered {
            let mut by_size: Vec<(usize, u64)> = conns.iter().filter(|(id, _)| !close.contains(id)).map(|(&id, c)| (c.held(), id)).collect();
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
                buffered -= c.held();
                if c.registered != 0 {
                    interest.ctl(libc::EPOLL_CTL_DEL, c.stream.as_raw_fd(), id, 0);
                }
            }
        }
        peak = peak.max(buffered);
        let in_progress = conns.values().filter(|c| !matches!(c.state, State::Reading)).count();
        *stats.lock().unwrap_or_else(|e| e.into_inner()) = Stats { connections: conns.len(), buffered, peak_buffered: peak, dropped, in_progress };
    }
}

/// Moves one connection on: a finished reply back to reading, a complete
/// line to a worker, limits enforced. Returns whether to close it.
fn advance(
    id: u64,
    c: &mut Conn,
    limits: &Limits,
    now: Instant,
    jobs: &Sender<Job>,
    buffered: &mut usize,
    dropped: &mut u64,
) -> bool {
    if let State::Writing { out, pos } = &c.state {
        if *pos < out.len() {
            return c.broken || now.duration_since(c.active) > limits.write_timeout;
        }
        if c.close_after || (c.eof && !c.buf.contains(&b'\n')) {
            return true;
        }
        c.state = State::Reading;
    }
    if !matches!(c.state, State::Reading) {
        return false;
    }
    // Take the next complete line, if any.
    let start = c.buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(c.buf.len());
    if start > 0 {
        c.buf.drain(..start);
        *buffered -= start;
    }
    if let Some(end) = c.buf.iter().position(|&b| b == b'\n') {
        let mut line: Vec<u8> = c.buf.drain(..=end).collect();
        *buffered -= line.len();
        line.pop();
        while line.last().is_some_and(u8::is_ascii_whitespace) {
            line.pop();
        }
        c.partial_since = None;
        c.state = State::Busy;
        if line.len() > limits.max_line {
            c.close_after = true;
            let _ = jobs.send((id, Vec::new(), KIND_TOO_LONG, c.peer, Vec::new()));
        } else {
            let _ = jobs.send((id, line, KIND_REQUEST, c.peer, std::mem::take(&mut c.fds)));
        }
        return false;
    }
    if c.buf.len() > limits.max_line {
        *dropped += 1;
        *buffered -= c.buf.len();
        c.buf = Vec::new();
        c.close_after = true;
        c.state = State::Busy;
        let _ = jobs.send((id, Vec::new(), KIND_TOO_LONG, c.peer, Vec::new()));
        return false;
    }
    if !c.buf.is_empty() {
        let since = *c.partial_since.get_or_insert(now);
        if now.duration_since(since) > limits.line_timeout {
            *dropped += 1;
            return true;
        }
    }
    c.eof || (c.buf.is_empty() && now.duration_since(c.active) > limits.idle_timeout)
}

/// Binds a unix socket at `path` that has `mode` from birth: bound under a
/// umask that gives exactly that mode, so there is no moment where the
/// process's umask lets others connect.
pub fn bind_with_mode(path: &std::path::Path, mode: u32) -> std::io::Result<UnixListener> {
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(0o777 & !mode) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound
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
