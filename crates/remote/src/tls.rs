//! TLS the way libvirt's peers (GnuTLS inside virsh and libvirtd) expect
//! it: mutual certificates from one CA, an optional CRL, and libvirt's
//! extra step: once the handshake is done and the server has accepted the
//! client's certificate, the server sends the single byte [`SERVER_OK`];
//! a client that reads anything else (or nothing) reports "server
//! verification failed".

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme, StreamOwned};

use crate::pki::{self, ClientPki, ServerPki};
use crate::RemoteError;

/// libvirt's TLS port (`qemu+tls://host/system`).
pub const DEFAULT_PORT: u16 = 16514;
/// The byte a libvirt server sends after accepting a client's certificate.
pub const SERVER_OK: u8 = 1;
/// How long a handshake (and the byte after it) may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// ring: pure Rust and assembly, no C build; rustls marks it deprecated for
/// lacking post-quantum key exchange, which libvirt's GnuTLS 3.7 peers do
/// not offer either.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(path: &std::path::Path) -> Result<RootCertStore, RemoteError> {
    let mut roots = RootCertStore::empty();
    for c in pki::certificates(path)? {
        roots.add(c).map_err(|e| RemoteError::Pem { path: path.to_path_buf(), what: format!("not a usable CA certificate: {e}") })?;
    }
    Ok(roots)
}

/// The server's TLS configuration: its certificate and key, and client
/// certificates required, signed by the CA and not revoked by its CRL (when
/// the CRL file exists), in their validity period.
pub fn server_config(p: &ServerPki) -> Result<Arc<ServerConfig>, RemoteError> {
    let provider = provider();
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&p.ca)?), provider.clone());
    if p.crl.exists() {
        verifier = verifier.with_crls(pki::revocation_lists(&p.crl)?);
    }
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier.build()?)
        .with_single_cert(pki::certificates(&p.cert)?, pki::private_key(&p.key)?)?;
    // No TLS 1.3 session tickets, as libvirtd sends none: libvirt's client
    // waits for the server's byte with poll() and one read, and a ticket
    // arriving first wakes it with nothing to read ("Unable to read TLS
    // confirmation").
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client's TLS configuration: its certificate and key, and the server's
/// certificate checked against the CA (unless `verify_server` is false:
/// libvirt's `no_verify=1`).
pub fn client_config(p: &ClientPki, verify_server: bool) -> Result<Arc<ClientConfig>, RemoteError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = if verify_server {
        builder.with_root_certificates(roots(&p.ca)?)
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(NoServerCheck(provider)))
    };
    Ok(Arc::new(builder.with_client_auth_cert(pki::certificates(&p.cert)?, pki::private_key(&p.key)?)?))
}

/// libvirt's `no_verify=1`: the server's certificate is not checked (its
/// signatures still are, so the handshake itself is sound).
#[derive(Debug)]
struct NoServerCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoServerCheck {
    fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client's TLS connection to a libvirt server.
pub type ClientStream = StreamOwned<ClientConnection, TcpStream>;

/// Why a TLS connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The configuration could not be made.
    #[error(transparent)]
    Setup(#[from] RemoteError),
    /// The server could not be reached.
    #[error("cannot reach {addr}")]
    Unreachable {
        /// host:port.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed (certificates refused on either side).
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        /// host:port.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server did not accept this client's certificate (libvirt's
    /// "server verification failed").
    #[error("server verification failed: {addr} did not accept this client's certificate (is its DN in the server's allow-list?)")]
    NotAccepted {
        /// host:port.
        addr: String,
    },
}

/// Connects to `host:port`, completes the handshake and waits for the
/// server's [`SERVER_OK`], each within [`HANDSHAKE_TIMEOUT`].
pub fn connect(host: &str, port: u16, pki: &ClientPki, verify_server: bool) -> Result<ClientStream, ConnectError> {
    let addr = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let config = client_config(pki, verify_server)?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| RemoteError::Uri { uri: host.into(), reason: format!("not a host name: {e}") })?;
    let unreachable = |source| ConnectError::Unreachable { addr: addr.clone(), source };
    let sa = addr.to_socket_addrs().map_err(unreachable)?.next().ok_or_else(|| unreachable(std::io::ErrorKind::NotFound.into()))?;
    let tcp = TcpStream::connect_timeout(&sa, HANDSHAKE_TIMEOUT).map_err(unreachable)?;
    let _ = tcp.set_nodelay(true);
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(unreachable)?;
    tcp.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(unreachable)?;
    let conn = ClientConnection::new(config, name).map_err(RemoteError::from)?;
    let mut s = StreamOwned::new(conn, tcp);
    let handshake = |source| ConnectError::Handshake { addr: addr.clone(), source };
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(handshake)?;
    }
    let mut ok = [0u8; 1];
    match s.read(&mut ok) {
        Ok(1) if ok[0] == SERVER_OK => {}
        Ok(_) => return Err(ConnectError::NotAccepted { addr }),
        // In TLS 1.3 the server checks the client's certificate after the
        // client is done: its refusal (an alert) arrives here.
        Err(source) => return Err(ConnectError::Handshake { addr, source }),
    }
    let _ = s.flush();
    s.sock.set_read_timeout(None).map_err(unreachable)?;
    s.sock.set_write_timeout(None).map_err(unreachable)?;
    Ok(s)
}
