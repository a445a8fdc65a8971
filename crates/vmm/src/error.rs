//! Every way starting or running a VM can fail, each with a message a user can act on.

use std::path::PathBuf;

/// Errors of the VMM library. `Display` is the one line `rvirt-vmm` prints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line value is malformed or out of range.
    #[error("{0}")]
    Config(String),
    /// `/dev/kvm` cannot be used.
    #[error("{0}")]
    Kvm(String),
    /// A KVM ioctl failed while building or running the VM.
    #[error("KVM {what} failed: {source}")]
    KvmIoctl {
        /// Which operation failed.
        what: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A file named on the command line cannot be used.
    #[error("{what} {path}: {detail}")]
    File {
        /// What the file was for ("kernel", "initramfs", ...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Guest RAM cannot be provided.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Boot-time CPU or memory setup failed.
    #[error(transparent)]
    Arch(#[from] rvirt_arch::Error),
    /// A device could not be set up.
    #[error("device setup: {0}")]
    Device(String),
    /// A live migration failed (the guest runs on where it was, unless it moved).
    #[error("migration: {0}")]
    Migration(String),
    /// The console backend could not be set up.
    #[error("serial console: {0}")]
    Console(String),
    /// The control API socket could not be set up.
    #[error("API socket {path}: {detail}")]
    ApiSocket {
        /// Socket path.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// Process-wide setup (signal handlers) failed.
    #[error("{0}")]
    Process(String),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] rvirt_sandbox::SeccompError),
    /// A CPU pin cannot be applied.
    #[error(transparent)]
    Affinity(#[from] rvirt_sandbox::affinity::AffinityError),
    /// The jail could not be entered.
    #[error(transparent)]
    Jail(#[from] rvirt_sandbox::JailError),
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Result type of the VMM library.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::KvmIoctl { what, source }
}

pub(crate) fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Os { what, source }
}
