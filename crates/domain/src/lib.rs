//! Domains as rvirt manages them: a documented subset of libvirt's domain
//! XML ([`DomainXml`]) that parses a user's simple libvirt definition,
//! reports what it does not understand, writes itself back, and turns into
//! an `rvirt-vmm` command line; and the JSON protocol `rvirtd` and `rvirt`
//! speak on the management socket ([`protocol`]).
//!
//! This crate knows nothing of processes or sockets: the daemon and the
//! client build on it, and it builds on nothing of rvirt's.

#[doc(hidden)]
pub mod fuzzing;
pub mod protocol;
mod write;
mod xml;

pub use write::VmmLaunch;
pub use xml::{
    BootDev, BootMenu, CharDevice, CpuSet, DiskBus, DiskSource, DomainXml, FirmwareDef, ImageFormat, Interface, InterfaceKind, Kept, KeptXml, LifecycleAction, Tuning, UnknownElement, VirtioDisk,
    XmlError, XmlErrors, MAX_DEPTH, MAX_UNKNOWN, MAX_VCPUS, MAX_XML_BYTES,
};
pub use xml::{DhcpHost, DnsHost, ForwardMode, IpDef, NetworkDef};
pub use xml::{valid_volume_name, Permissions, PoolDef, PoolSizes, VolumeBacking, VolumeDef, MAX_VOLUME_NAME};
pub use xml::{valid_snapshot_name, SnapshotDef, SnapshotDisk, SnapshotDiskKind, SnapshotState, MAX_SNAPSHOT_NAME};
