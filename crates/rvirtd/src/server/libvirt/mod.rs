//! libvirt's remote protocol, so the tools people already use (virsh,
//! virt-install, python-libvirt, virt-manager) manage rvirt unchanged:
//! libvirt's sockets (`/run/libvirt/libvirt-sock` and `-ro`), its framing
//! and XDR (`rvirt-libvirt-rpc`), the `remote` and keepalive programs,
//! lifecycle events and console streams. Every procedure calls the same
//! [`Manager`] as rvirtd's own socket; nothing is implemented twice.
//!
//! Each connection has a thread (at most [`MAX_CONNECTIONS`] per socket);
//! a frame must arrive whole within [`FRAME_TIMEOUT`] of its first byte, a
//! call may be at most [`MAX_CALL_BYTES`], and a client that stops reading
//! what it is sent is dropped after [`WRITE_TIMEOUT`].

mod console;
mod dispatch;
mod domains;
mod host;
mod networks;
mod snapshots;
mod storage;
mod volstream;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rvirt_libvirt_rpc::message::{KEEPALIVE_PROGRAM, KEEPALIVE_VERSION, REMOTE_PROGRAM, REMOTE_VERSION};
use rvirt_libvirt_rpc::remote::{err, FROM_RPC, KEEPALIVE_PING, KEEPALIVE_PONG};
use rvirt_libvirt_rpc::{Header, MessageError, MessageStatus, MessageType, Packet, RemoteError};

use crate::manager::Manager;

/// Where libvirt's clients look for the daemon (`qemu:///system`).
pub const DEFAULT_SOCKET: &str = "/run/libvirt/libvirt-sock";
/// Connections served at once on each socket; the next is closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// How long a frame may take to arrive once its first byte has.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may leave what it is sent unread.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest call: a 4 MiB string (a domain's XML) and room for the rest.
pub const MAX_CALL_BYTES: usize = rvirt_libvirt_rpc::xdr::STRING_MAX + (64 << 10);

/// The read-only socket beside `rw` (libvirt's `libvirt-sock-ro`).
pub fn read_only_path(rw: &Path) -> PathBuf {
    let mut s = rw.as_os_str().to_owned();
    s.push("-ro");
    PathBuf::from(s)
}

/// Binds libvirt's read-write socket at `path` (0600, or 0660 for `group`)
/// and its read-only one beside it (0666). A path a live daemon answers on
/// is refused; a warning says when libvirt's modular daemon has a socket
/// here too (clients would prefer it).
pub fn bind(path: &Path, group: Option<&str>) -> Result<(UnixListener, UnixListener)> {
    for p in [path.to_path_buf(), read_only_path(path)] {
        if UnixStream::connect(&p).is_ok() {
            anyhow::bail!(
                "a libvirt daemon (libvirtd, virtqemud or another rvirtd) already answers on {}; stop it, or give rvirtd --libvirt-socket PATH or --no-libvirt-socket",
                p.display()
            );
        }
    }
    let rw = super::bind(path, group).with_context(|| format!("libvirt socket {}", path.display()))?;
    let ro_path = read_only_path(path);
    let ro = super::bind_read_only(&ro_path).with_context(|| format!("libvirt socket {}", ro_path.display()))?;
    let virtqemud = path.with_file_name("virtqemud-sock");
    if virtqemud.exists() {
        tracing::warn!(
            "{} exists: libvirt clients prefer virtqemud's socket to {}; stop virtqemud or connect with ?socket={}",
            virtqemud.display(),
            path.display(),
            path.display()
        );
    }
    Ok((rw, ro))
}

/// Serves libvirt clients on `listener` from a thread of its own; on a
/// `read_only` socket nothing may be changed.
pub fn spawn(listener: UnixListener, read_only: bool, mgr: Arc<Manager>) -> Result<()> {
    super::accept_bounded(
        if read_only { "libvirt-ro" } else { "libvirt" },
        "libvirt-conn",
        "libvirt socket",
        MAX_CONNECTIONS,
        move || listener.accept().map(|(s, _)| s),
        move |stream| match Session::new(stream, read_only, mgr.clone()) {
            Ok(s) => s.run(),
            Err(e) => tracing::warn!("libvirt socket: a new client could not be set up: {e}"),
        },
    )
}

/// A client's connection as the libvirt front end uses it: a local
/// socket, or a remote client's TLS session ([`super::tls::TlsConn`]).
/// Reads come from the call loop only; writes from any thread, one at a
/// time (the [`Outbox`] serialises them).
pub(crate) trait ClientConn: Send + Sync {
    /// Reads some bytes (0 at the end), waiting at most `timeout` (`None`:
    /// as long as need be).
    fn read_some(&self, buf: &mut [u8], timeout: Option<Duration>) -> std::io::Result<usize>;
    /// Writes all of `bytes`; a client that reads nothing for
    /// [`WRITE_TIMEOUT`] fails the write.
    fn write_all(&self, bytes: &[u8]) -> std::io::Result<()>;
    /// Ends the connection both ways: a blocked read returns.
    fn shutdown(&self);
}

impl ClientConn for UnixStream {
    fn read_some(&self, buf: &mut [u8], timeout: Option<Duration>) -> std::io::Result<usize> {
        self.set_read_timeout(timeout)?;
        (&*self).read(buf)
    }

    fn write_all(&self, bytes: &[u8]) -> std::io::Result<()> {
        Write::write_all(&mut &*self, bytes)
    }

    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
}

/// Serves one libvirt client on `conn`, a connection another front end
/// accepted and authenticated (the TLS listener's), on the calling thread
/// until it ends (so that front end's count of clients holds).
/// `client` names it in the log (its address and certificate).
pub(crate) fn serve_connection(conn: Arc<dyn ClientConn>, mgr: Arc<Manager>, client: String) {
    Session::with_conn(conn, false, mgr, client).run();
}

/// The sending half of a connection, shared by the call loop, the event
/// thread and console streams.
pub(crate) struct Outbox {
    conn: Arc<dyn ClientConn>,
    /// Held while a message is written, so messages never interleave.
    writing: Mutex<()>,
    closed: AtomicBool,
}

impl Outbox {
    /// Sends one message whole; a failure (or a client that reads nothing
    /// for [`WRITE_TIMEOUT`]) closes the connection.
    pub(crate) fn send(&self, p: &Packet) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        let bytes = p.encode();
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if self.conn.write_all(&bytes).is_err() {
            self.close_locked();
            return false;
        }
        true
    }

    /// Ends the connection: the call loop's next read fails.
    pub(crate) fn close(&self) {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        self.close_locked();
    }

    fn close_locked(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.conn.shutdown();
    }

    /// Whether the connection has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Reads one frame, waiting as long as need be for its first byte and at
/// most [`FRAME_TIMEOUT`] for the rest.
fn read_frame(conn: &dyn ClientConn) -> Result<Packet, MessageError> {
    let mut first = [0u8; 1];
    if conn.read_some(&mut first, None)? == 0 {
        return Err(MessageError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    let deadline = Instant::now() + FRAME_TIMEOUT;
    let mut rest = Deadline { conn, deadline };
    Packet::read_limited(&mut first.as_slice().chain(&mut rest), MAX_CALL_BYTES)
}

/// A reader that gives up at `deadline`, however the bytes trickle in.
struct Deadline<'a> {
    conn: &'a dyn ClientConn,
    deadline: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "a frame took too long to arrive"));
        }
        self.conn.read_some(buf, Some(left))
    }
}

/// One client connection.
pub(crate) struct Session {
    mgr: Arc<Manager>,
    read_only: bool,
    conn: Arc<dyn ClientConn>,
    out: Arc<Outbox>,
    /// `CONNECT_OPEN` succeeded.
    opened: bool,
    events: dispatch::Events,
    consoles: console::Consoles,
    volume_streams: volstream::VolumeStreams,
    /// Who the client is, for the log: a local process or a remote peer.
    client: String,
}

impl Session {
    /// A local client on one of libvirt's sockets.
    fn new(stream: UnixStream, read_only: bool, mgr: Arc<Manager>) -> std::io::Result<Self> {
        let peer = rvirt_lineserver::Peer::of(&stream).unwrap_or_default();
        // The timeout is the socket's: it holds for the reply side too.
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        Ok(Self::with_conn(Arc::new(stream), read_only, mgr, format!("pid {} uid {}", peer.pid, peer.uid)))
    }

    fn with_conn(conn: Arc<dyn ClientConn>, read_only: bool, mgr: Arc<Manager>, client: String) -> Self {
        let out = Arc::new(Outbox { conn: conn.clone(), writing: Mutex::new(()), closed: AtomicBool::new(false) });
        Self { mgr, read_only, conn, out, opened: false, events: dispatch::Events::default(), consoles: console::Consoles::default(), volume_streams: volstream::VolumeStreams::default(), client }
    }

    fn run(mut self) {
        let socket = if self.read_only { "libvirt read-only" } else { "libvirt" };
        tracing::debug!(client = %self.client, socket, "client connected");
        loop {
            let p = match read_frame(&*self.conn) {
                Ok(p) => p,
                Err(MessageError::Io(e)) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => {
                    tracing::debug!(client = %self.client, "libvirt client disconnected");
                    break;
                }
                Err(e) => {
                    // The stream is out of step after a bad frame: say why and hang up.
                    tracing::warn!(client = %self.client, "libvirt client sent a bad frame: {e}");
                    break;
                }
            };
            if !self.handle(p) {
                tracing::debug!(client = %self.client, "libvirt connection ends after the last message");
                break;
            }
            if self.out.is_closed() {
                break;
            }
        }
        self.out.close();
        self.events.stop();
        self.consoles.stop_all();
        self.volume_streams.stop_all();
    }

    /// Answers one message; false ends the connection.
    fn handle(&mut self, p: Packet) -> bool {
        let h = p.header;
        match (h.prog, h.kind) {
            (KEEPALIVE_PROGRAM, MessageType::Message) if h.vers == KEEPALIVE_VERSION => {
                if h.proc_ == KEEPALIVE_PING {
                    let pong = Header { proc_: KEEPALIVE_PONG, status: MessageStatus::Ok, ..h };
                    return self.out.send(&Packet { header: pong, payload: Vec::new() });
                }
                true
            }
            (REMOTE_PROGRAM, MessageType::Call) if h.vers == REMOTE_VERSION => {
                let reply = match self.call(&h, &p.payload) {
                    Ok(ret) => Packet { header: h.reply(MessageStatus::Ok), payload: ret },
                    Err(e) => e.reply_to(&h),
                };
                let sent = self.out.send(&reply);
                // A console or download stream starts sending once its call is answered.
                self.consoles.start_pending(&self.out);
                self.volume_streams.start_pending(&self.out);
                sent && h.proc_ != rvirt_libvirt_rpc::remote::proc_::CONNECT_CLOSE
            }
            (REMOTE_PROGRAM, MessageType::Stream) => {
                if self.volume_streams.owns(h.serial) {
                    self.volume_streams.from_client(&h, &p.payload, &self.out);
                } else {
                    self.consoles.from_client(&h, &p.payload, &self.out);
                }
                true
            }
            (_, MessageType::Call) => {
                let e = RemoteError { domain: FROM_RPC, ..RemoteError::new(err::RPC, format!("unknown program {:#x} version {}", h.prog, h.vers)) };
                self.out.send(&e.reply_to(&h))
            }
            // Replies, stray messages and descriptor-carrying calls are not ours to answer.
            _ => {
                tracing::debug!("libvirt client sent message type {:?} of program {:#x}; ignored", h.kind, h.prog);
                true
            }
        }
    }
}
