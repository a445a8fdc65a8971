//! libvirt's PKI file layout, so the certificates an administrator made for
//! libvirtd (by libvirt's own instructions) serve rvirtd unchanged.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::RemoteError;

/// The CA certificate, system-wide (clients and servers).
pub const SYSTEM_CA: &str = "/etc/pki/CA/cacert.pem";
/// The CA's revocation list, when there is one.
pub const SYSTEM_CRL: &str = "/etc/pki/CA/cacrl.pem";
/// The server's certificate.
pub const SYSTEM_SERVER_CERT: &str = "/etc/pki/libvirt/servercert.pem";
/// The server's private key.
pub const SYSTEM_SERVER_KEY: &str = "/etc/pki/libvirt/private/serverkey.pem";
/// A client's certificate (root's).
pub const SYSTEM_CLIENT_CERT: &str = "/etc/pki/libvirt/clientcert.pem";
/// A client's private key (root's).
pub const SYSTEM_CLIENT_KEY: &str = "/etc/pki/libvirt/private/clientkey.pem";

/// The files a TLS server needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerPki {
    /// CA certificate(s) that sign client certificates.
    pub ca: PathBuf,
    /// The server's certificate (and any intermediates after it).
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    /// The CA's revocation list; used when the file exists.
    pub crl: PathBuf,
}

impl ServerPki {
    /// libvirtd's system layout under /etc/pki.
    pub fn system() -> Self {
        Self { ca: SYSTEM_CA.into(), cert: SYSTEM_SERVER_CERT.into(), key: SYSTEM_SERVER_KEY.into(), crl: SYSTEM_CRL.into() }
    }

    /// Everything in one directory, as libvirt's per-user layout and its
    /// `pkipath` have it: cacert.pem, servercert.pem, serverkey.pem, cacrl.pem.
    pub fn in_dir(dir: &Path) -> Self {
        Self { ca: dir.join("cacert.pem"), cert: dir.join("servercert.pem"), key: dir.join("serverkey.pem"), crl: dir.join("cacrl.pem") }
    }
}

/// The files a TLS client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPki {
    /// CA certificate(s) that sign the server's certificate.
    pub ca: PathBuf,
    /// The client's certificate.
    pub cert: PathBuf,
    /// The client's private key.
    pub key: PathBuf,
}

impl ClientPki {
    /// Where libvirt's client looks without `pkipath`: the per-user
    /// directory `~/.pki/libvirt` when not root and it exists, else /etc/pki.
    pub fn default_for_user() -> Self {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            if let Some(home) = std::env::var_os("HOME") {
                let dir = Path::new(&home).join(".pki/libvirt");
                if dir.is_dir() {
                    return Self::in_dir(&dir);
                }
            }
        }
        Self { ca: SYSTEM_CA.into(), cert: SYSTEM_CLIENT_CERT.into(), key: SYSTEM_CLIENT_KEY.into() }
    }

    /// libvirt's `pkipath` layout: cacert.pem, clientcert.pem, clientkey.pem.
    pub fn in_dir(dir: &Path) -> Self {
        Self { ca: dir.join("cacert.pem"), cert: dir.join("clientcert.pem"), key: dir.join("clientkey.pem") }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, RemoteError> {
    std::fs::read(path).map_err(|source| RemoteError::Read { path: path.to_path_buf(), source })
}

/// Every certificate in a PEM file (at least one).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, RemoteError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RemoteError::Pem { path: path.to_path_buf(), what: format!("not a PEM certificate file: {e}") })?;
    if certs.is_empty() {
        return Err(RemoteError::Pem { path: path.to_path_buf(), what: "holds no certificate (no BEGIN CERTIFICATE block)".into() });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, RemoteError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| RemoteError::Pem { path: path.to_path_buf(), what: format!("no private key in it: {e}") })
}

/// The revocation lists in a PEM file.
pub fn revocation_lists(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, RemoteError> {
    let bytes = read(path)?;
    CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RemoteError::Pem { path: path.to_path_buf(), what: format!("not a PEM revocation list: {e}") })
}
