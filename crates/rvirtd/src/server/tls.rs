//! rvirtd's TLS listener (`--listen-tls ADDR:PORT`): remote clients with a
//! certificate from the CA (and, when an allow-list is given, a subject it
//! names) reach the same [`Manager`] as local ones. As libvirtd does, the
//! server sends one byte, 1, once it has accepted the client; then the
//! client speaks libvirt's protocol (virsh, python-libvirt: served by the
//! libvirt front end's session over [`TlsConn`]) or rvirt's
//! JSON lines (`rvirt --connect qemu+tls://…`, told apart by its first
//! byte: a libvirt frame starts with its length's high byte, 0; a JSON
//! request with `{`).
//!
//! Bounds: [`MAX_CLIENTS`] connections, a handshake within
//! [`HANDSHAKE_TIMEOUT`], a first message within
//! [`libvirt::FRAME_TIMEOUT`], a JSON client silent for the local socket's
//! idle timeout (10 min) dropped, received plaintext held by rustls's own
//! bound (16 KiB) until the session reads it, and a client that reads nothing for [`libvirt::WRITE_TIMEOUT`] dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
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
    let Bound { listener, config, allowed } = b;
    super::accept_bounded(
        "tls-accept",
        "tls-conn",
        "TLS listener",
        MAX_CLIENTS,
        move || listener.accept().map(|(s, _)| s),
        move |tcp: TcpStream| {
            let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
            if let Err(e) = serve(tcp, config.clone(), &allowed, mgr.clone()) {
                tracing::info!(client = %peer, "TLS client: {e:#}");
            }
        },
    )
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
    let StreamOwned { conn, sock } = s;
    sock.set_nonblocking(true)?;
    let conn = TlsConn { tls: Mutex::new(conn), tcp: sock, first: Mutex::new(Some(first[0])) };
    libvirt::serve_connection(Arc::new(conn), mgr, who);
    Ok(())
}

/// rvirt's own protocol over TLS: one JSON request per line, answered in turn.
fn serve_json(s: StreamOwned<ServerConnection, TcpStream>, first: u8, mgr: &Manager, who: &str) -> Result<()> {
    s.sock.set_write_timeout(Some(WRITE_TIMEOUT))?;
    // A client silent this long is dropped, as on the local socket.
    s.sock.set_read_timeout(Some(rvirt_lineserver::Limits::default().idle_timeout))?;
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

/// A remote libvirt client's TLS session, as the libvirt front end reads
/// and writes it: the socket is non-blocking, and the lock on the TLS state
/// is held only while records are read or written, never while waiting for
/// the client, except by a writer whose client is not reading (at most
/// [`WRITE_TIMEOUT`], as a local socket's write would block).
pub(crate) struct TlsConn {
    tls: Mutex<ServerConnection>,
    tcp: TcpStream,
    /// The byte read to tell the protocols apart, given back first.
    first: Mutex<Option<u8>>,
}

impl TlsConn {
    fn lock(&self) -> std::sync::MutexGuard<'_, ServerConnection> {
        self.tls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends what the TLS state holds for the client; `deadline` bounds the
    /// wait for a client that does not read (`None`: send what goes now).
    fn flush(&self, tls: &mut ServerConnection, deadline: Option<Instant>) -> std::io::Result<()> {
        while tls.wants_write() {
            match tls.write_tls(&mut &self.tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let Some(deadline) = deadline else { return Ok(()) };
                    wait(&self.tcp, libc::POLLOUT, Some(deadline.saturating_duration_since(Instant::now())))?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl libvirt::ClientConn for TlsConn {
    fn read_some(&self, buf: &mut [u8], timeout: Option<std::time::Duration>) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(b) = self.first.lock().unwrap_or_else(|e| e.into_inner()).take() {
            buf[0] = b;
            return Ok(1);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            {
                let mut tls = self.lock();
                match tls.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    // Closed without close_notify: the end all the same.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                match tls.read_tls(&mut &self.tcp) {
                    Ok(0) => return Ok(0),
                    Ok(_) => {
                        let state = tls.process_new_packets();
                        // Alerts and TLS's own answers go out now.
                        let _ = self.flush(&mut tls, None);
                        state.map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            wait(&self.tcp, libc::POLLIN, deadline.map(|d| d.saturating_duration_since(Instant::now())))?;
        }
    }

    fn write_all(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut tls = self.lock();
        tls.writer().write_all(bytes)?;
        self.flush(&mut tls, Some(Instant::now() + WRITE_TIMEOUT))
    }

    fn shutdown(&self) {
        let mut tls = self.lock();
        tls.send_close_notify();
        let _ = self.flush(&mut tls, None);
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }
}

/// Waits until `tcp` is ready for `events` or `timeout` passes (`None`: no limit).
fn wait(tcp: &TcpStream, events: libc::c_short, timeout: Option<std::time::Duration>) -> std::io::Result<()> {
    let ms = match timeout {
        None => -1,
        Some(t) if t.is_zero() => return Err(std::io::ErrorKind::TimedOut.into()),
        Some(t) => i32::try_from(t.as_millis().max(1)).unwrap_or(i32::MAX),
    };
    let mut fd = libc::pollfd { fd: tcp.as_raw_fd(), events, revents: 0 };
    loop {
        // SAFETY: one valid pollfd that outlives the call.
        let r = unsafe { libc::poll(&mut fd, 1, ms) };
        match r {
            0 => return Err(std::io::ErrorKind::TimedOut.into()),
            r if r > 0 => return Ok(()),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}
