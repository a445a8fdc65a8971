//! rvirtd's TLS listener (`--listen-tls ADDR:PORT`): remote clients with a
//! certificate from the CA (and, when an allow-list is given, a subject it
//! names) reach the same [`Manager`] as local ones. As libvirtd does, the
//! server sends one byte, 1, once it has accepted the client; then the
//! client speaks libvirt's protocol (virsh, python-libvirt: served by the
//! libvirt front end through a socket pair this thread pumps) or rvirt's
//! JSON lines (`rvirt --connect qemu+tls://…`, told apart by its first
//! byte: a libvirt frame starts with its length's high byte, 0; a JSON
//! request with `{`).
//!
//! Bounds: [`MAX_CLIENTS`] connections, a handshake within
//! [`HANDSHAKE_TIMEOUT`], a first message within
//! [`libvirt::FRAME_TIMEOUT`], at most 64 KiB buffered each way per client,
//! and a client that reads nothing for [`libvirt::WRITE_TIMEOUT`] dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use rvirt_domain::protocol::MAX_REQUEST_BYTES;
use rvirt_lineserver::Line;
use rvirt_remote::dn::{self, DnAllowList};
use rvirt_remote::pki::ServerPki;
use rvirt_remote::tls::{HANDSHAKE_TIMEOUT, SERVER_OK};

use super::libvirt::{self, FRAME_TIMEOUT, WRITE_TIMEOUT};
use super::{respond, Origin};
use crate::manager::Manager;

/// TLS connections served at once; the next is closed at once.
pub const MAX_CLIENTS: usize = 256;
/// Plaintext buffered per direction for one client.
const BUFFER: usize = 64 << 10;

/// What `--listen-tls` sets up.
#[derive(Debug, Clone)]
pub struct TlsListen {
    /// Address and port to listen on.
    pub addr: SocketAddr,
    /// The CA, the server's certificate and key, and the CRL.
    pub pki: ServerPki,
    /// Client subjects let in (`--tls-allowed-dn`); empty: any the CA signed.
    pub allowed: DnAllowList,
}

/// A bound TLS listener with its configuration, made before the daemon
/// says it is up, so a missing certificate stops it with a clear error.
pub struct Bound {
    listener: TcpListener,
    config: Arc<ServerConfig>,
    allowed: DnAllowList,
}

/// Loads the certificates and binds the port.
pub fn bind(t: &TlsListen) -> Result<Bound> {
    let config = rvirt_remote::tls::server_config(&t.pki).context("TLS listener: the server's certificates")?;
    let listener = TcpListener::bind(t.addr).with_context(|| format!("TLS listener: binding {}", t.addr))?;
    Ok(Bound { listener, config, allowed: t.allowed.clone() })
}

impl Bound {
    /// The address bound (the port the system chose for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Accepts clients from a thread of its own; each has a thread.
pub fn spawn(b: Bound, mgr: Arc<Manager>) -> Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    let allowed = Arc::new(b.allowed);
    std::thread::Builder::new()
        .name("tls-accept".into())
        .spawn(move || {
            for tcp in b.listener.incoming() {
                let Ok(tcp) = tcp else {
                    // Out of descriptors, most likely: wait rather than spin.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                };
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!("TLS listener: {MAX_CLIENTS} clients already connected; one more refused");
                    continue;
                }
                let (mgr, config, allowed, count) = (mgr.clone(), b.config.clone(), allowed.clone(), active.clone());
                let spawned = std::thread::Builder::new().name("tls-conn".into()).spawn(move || {
                    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
                    if let Err(e) = serve(tcp, config, &allowed, mgr) {
                        tracing::info!(client = %peer, "TLS client: {e:#}");
                    }
                    count.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::SeqCst);
                    tracing::error!("TLS listener: no thread for a new client");
                }
            }
        })
        .context("starting the TLS listener's thread")?;
    Ok(())
}

/// One client: handshake, allow-list, the byte, then its protocol.
fn serve(tcp: TcpStream, config: Arc<ServerConfig>, allowed: &DnAllowList, mgr: Arc<Manager>) -> Result<()> {
    let peer = tcp.peer_addr().context("peer address")?;
    let _ = tcp.set_nodelay(true);
    let mut s = StreamOwned::new(ServerConnection::new(config)?, tcp);
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    while s.conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
        s.sock.set_read_timeout(Some(left))?;
        s.sock.set_write_timeout(Some(left))?;
        s.conn.complete_io(&mut s.sock).context("TLS handshake failed")?;
    }
    let subject = s.conn.peer_certificates().and_then(|c| c.first()).and_then(|c| dn::subject(c.as_ref())).unwrap_or_default();
    if !allowed.allows(&subject) {
        tracing::warn!(client = %peer, dn = %subject, "TLS client refused: its certificate's DN is not in --tls-allowed-dn");
        s.conn.send_close_notify();
        let _ = s.conn.complete_io(&mut s.sock);
        return Ok(());
    }
    tracing::info!(client = %peer, dn = %subject, "TLS client accepted");
    s.write_all(&[SERVER_OK])?;
    s.flush()?;
    // The client speaks first; which protocol is in its first byte.
    s.sock.set_read_timeout(Some(FRAME_TIMEOUT))?;
    let mut first = [0u8; 1];
    if s.read(&mut first)? == 0 {
        return Ok(());
    }
    let who = format!("{peer} ({subject})");
    if first[0] == b'{' {
        return serve_json(s, first[0], &mgr, &who);
    }
    let (ours, theirs) = UnixStream::pair()?;
    libvirt::serve_connection(theirs, false, mgr, who)?;
    (&ours).write_all(&first)?;
    let StreamOwned { conn, sock } = s;
    pump(conn, sock, ours)
}

/// rvirt's own protocol over TLS: one JSON request per line, answered in turn.
fn serve_json(s: StreamOwned<ServerConnection, TcpStream>, first: u8, mgr: &Manager, who: &str) -> Result<()> {
    s.sock.set_write_timeout(Some(WRITE_TIMEOUT))?;
    s.sock.set_read_timeout(None)?;
    let mut r = BufReader::new(s);
    let mut line = vec![first];
    loop {
        // One byte more than a request may hold tells a long line apart.
        let limit = (MAX_REQUEST_BYTES + 1).saturating_sub(line.len()) as u64;
        let n = match (&mut r).take(limit).read_until(b'\n', &mut line) {
            Ok(n) => n,
            // Clients may hang up without TLS's close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e.into()),
        };
        let complete = line.last() == Some(&b'\n');
        if n == 0 && !complete {
            return Ok(());
        }
        let too_long = !complete && line.len() > MAX_REQUEST_BYTES;
        if !complete && !too_long {
            continue;
        }
        let text = line.trim_ascii();
        let request = if too_long { Line::TooLong } else { Line::Request(text) };
        let mut answer = respond(mgr, false, request, Origin::Remote(who.to_string()));
        answer.push(b'\n');
        let w = r.get_mut();
        w.write_all(&answer)?;
        w.flush()?;
        if too_long {
            return Ok(());
        }
        line.clear();
    }
}

/// Moves bytes between the client's TLS connection and the libvirt
/// session's socket until either side ends, with bounded buffers.
fn pump(mut conn: ServerConnection, mut tcp: TcpStream, mut local: UnixStream) -> Result<()> {
    tcp.set_nonblocking(true)?;
    local.set_nonblocking(true)?;
    conn.set_buffer_limit(Some(BUFFER));
    let mut to_local: Vec<u8> = Vec::with_capacity(BUFFER);
    let mut to_tls: Vec<u8> = Vec::with_capacity(BUFFER);
    let mut buf = vec![0u8; 16 << 10];
    let (mut client_done, mut session_done, mut local_hup) = (false, false, false);
    let mut progress = Instant::now();
    loop {
        // The client's plaintext, to the session.
        if to_local.is_empty() && !client_done {
            match conn.reader().read(&mut buf) {
                Ok(0) => client_done = true,
                Ok(n) => to_local.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: the same end.
                Err(_) => client_done = true,
            }
        }
        if !to_local.is_empty() {
            match local.write(&to_local) {
                Ok(n) => {
                    to_local.drain(..n);
                    progress = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Ok(()),
            }
        }
        if client_done && to_local.is_empty() {
            // The session reads the end and closes; what it still sends goes out.
            let _ = local.shutdown(std::net::Shutdown::Write);
        }
        // The session's bytes, to the client.
        if to_tls.is_empty() && !session_done {
            match local.read(&mut buf) {
                Ok(0) => {
                    session_done = true;
                    conn.send_close_notify();
                }
                Ok(n) => to_tls.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    session_done = true;
                    conn.send_close_notify();
                }
            }
        }
        if !to_tls.is_empty() {
            let n = conn.writer().write(&to_tls)?;
            to_tls.drain(..n);
        }
        while conn.wants_write() {
            match conn.write_tls(&mut tcp) {
                Ok(_) => progress = Instant::now(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return Ok(()),
            }
        }
        if session_done && to_tls.is_empty() && !conn.wants_write() {
            return Ok(());
        }
        let stuck = conn.wants_write() || !to_local.is_empty();
        if stuck && progress.elapsed() > WRITE_TIMEOUT {
            anyhow::bail!("the client read nothing for {WRITE_TIMEOUT:?}; dropped");
        }
        let want_tcp = !client_done && conn.wants_read();
        let mut fds = [
            libc::pollfd { fd: tcp.as_raw_fd(), events: (if want_tcp { libc::POLLIN } else { 0 }) | (if conn.wants_write() { libc::POLLOUT } else { 0 }), revents: 0 },
            libc::pollfd {
                // A session that hung up is read to its end without waiting on it again.
                fd: if local_hup { -1 } else { local.as_raw_fd() },
                events: (if to_tls.is_empty() && !session_done { libc::POLLIN } else { 0 }) | (if to_local.is_empty() { 0 } else { libc::POLLOUT }),
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd entries that outlive the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e.into());
            }
            continue;
        }
        if fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            local_hup = true;
        }
        if want_tcp && fds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            match conn.read_tls(&mut tcp) {
                Ok(0) => client_done = true,
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        // Tell the client why (an alert), then end.
                        let _ = conn.write_tls(&mut tcp);
                        anyhow::bail!("TLS error: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => client_done = true,
            }
        }
    }
}
