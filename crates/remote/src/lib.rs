//! What rvirt's remote transports share, so rvirtd's listeners, the `rvirt`
//! client and `virt-ssh-helper` agree with libvirt's own tools:
//! connection URIs as libvirt writes them ([`uri`]), libvirt's PKI file
//! layout ([`pki`]), TLS configured the way libvirt's GnuTLS peers expect
//! ([`tls`]) and the allow-list of client certificate names ([`dn`]).

pub mod dn;
pub mod pki;
pub mod tls;
pub mod uri;

use std::path::PathBuf;

/// Why a remote connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A PKI file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PKI file is not what it should hold.
    #[error("{}: {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// rustls refused the certificates or key.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The CA or CRL cannot check client certificates.
    #[error("checking client certificates: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A connection URI rvirt cannot use.
    #[error("connection URI '{uri}': {reason}")]
    Uri {
        /// The URI as given.
        uri: String,
        /// Why it is refused.
        reason: String,
    },
}
