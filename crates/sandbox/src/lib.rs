//! Confinement for `rvirt-vmm`, so that a guest that breaks a device model
//! still holds little: [`seccomp`] gives each kind of thread an allow-list of
//! system calls, [`jail`] puts the process in namespaces of its own with an
//! empty root, no capabilities and an unprivileged uid; [`affinity`] pins
//! threads to host CPUs.

pub mod affinity;
pub mod jail;
pub mod seccomp;

pub use jail::{Jail, JailError};
pub use seccomp::{SeccompError, SeccompMode, ThreadKind};
