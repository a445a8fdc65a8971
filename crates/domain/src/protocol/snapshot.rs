//! The management protocol's types for snapshots and saved domains.

use serde::{Deserialize, Serialize};

/// How `snapshot-create` takes the snapshot (virsh's flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotCreateFlags {
    /// `--disk-only`: the disks continue in qcow2 overlays; no memory.
    pub disk_only: bool,
    /// `--redefine`: store (or replace) the metadata given, take nothing
    /// (`snapshot-edit`, or metadata brought back after `--metadata` delete).
    pub redefine: bool,
    /// `--current` with `--redefine`: it becomes the current snapshot.
    pub current: bool,
    /// `--no-metadata`: take it but keep no record (the disks keep theirs).
    pub no_metadata: bool,
    /// `--halt`: the domain is stopped once the snapshot is taken.
    pub halt: bool,
    /// `--atomic`: all disks or none (rvirt always is; accepted).
    pub atomic: bool,
}

/// Which snapshots `snapshot-list` shows (virsh's filters); every
/// listing is in topological order (parents first).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotFilter {
    /// `--roots`: those without a parent.
    pub roots: bool,
    /// `--leaves`: those without children.
    pub leaves: bool,
    /// `--no-leaves`: those with children.
    pub no_leaves: bool,
    /// `--from NAME` / `--parent`: the children of this one...
    pub of: Option<String>,
    /// ...and theirs (`--descendants`).
    pub descendants: bool,
    /// `--active`: taken while the domain ran (memory kept).
    pub active: bool,
    /// `--inactive`: taken while it was shut off.
    pub inactive: bool,
    /// `--disk-only`: disks only, of a running domain.
    pub disk_only: bool,
    /// `--internal`: inside the disks' images.
    pub internal: bool,
    /// `--external`: in overlays.
    pub external: bool,
}

/// One snapshot in a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    /// Its name.
    pub name: String,
    /// Its parent's name.
    pub parent: Option<String>,
    /// Seconds since the epoch when taken.
    pub creation_time: u64,
    /// The domain's state then (`running`, `paused`, `shutoff`, `disk-snapshot`).
    pub state: String,
    /// Whether it is the domain's current snapshot.
    pub current: bool,
    /// Its children.
    pub children: u32,
    /// Everything below it.
    pub descendants: u32,
    /// Whether its disks continue in overlays (`--disk-only`).
    pub external: bool,
}
