//! The parts of libvirt's `remote` program rvirtd speaks: procedure
//! numbers, the domain reference every domain call carries, and the error,
//! event and flag numbers clients act on (from `remote_protocol.x`,
//! `virerror.h` and `libvirt-domain.h`; the numbers are libvirt's ABI).

use crate::xdr::{Decoder, Encoder, XdrError};

/// Procedure numbers of the `remote` program (`remote_procedure`).
#[allow(missing_docs)]
pub mod proc_ {
    pub const CONNECT_OPEN: i32 = 1;
    pub const CONNECT_CLOSE: i32 = 2;
    pub const CONNECT_GET_TYPE: i32 = 3;
    pub const CONNECT_GET_VERSION: i32 = 4;
    pub const CONNECT_GET_MAX_VCPUS: i32 = 5;
    pub const NODE_GET_INFO: i32 = 6;
    pub const CONNECT_GET_CAPABILITIES: i32 = 7;
    pub const DOMAIN_ATTACH_DEVICE: i32 = 8;
    pub const DOMAIN_CREATE: i32 = 9;
    pub const DOMAIN_CREATE_XML: i32 = 10;
    pub const DOMAIN_DEFINE_XML: i32 = 11;
    pub const DOMAIN_DESTROY: i32 = 12;
    pub const DOMAIN_DETACH_DEVICE: i32 = 13;
    pub const DOMAIN_GET_XML_DESC: i32 = 14;
    pub const DOMAIN_GET_AUTOSTART: i32 = 15;
    pub const DOMAIN_GET_INFO: i32 = 16;
    pub const DOMAIN_GET_MAX_MEMORY: i32 = 17;
    pub const DOMAIN_GET_MAX_VCPUS: i32 = 18;
    pub const DOMAIN_GET_OS_TYPE: i32 = 19;
    pub const DOMAIN_GET_VCPUS: i32 = 20;
    pub const CONNECT_LIST_DEFINED_DOMAINS: i32 = 21;
    pub const DOMAIN_LOOKUP_BY_ID: i32 = 22;
    pub const DOMAIN_LOOKUP_BY_NAME: i32 = 23;
    pub const DOMAIN_LOOKUP_BY_UUID: i32 = 24;
    pub const CONNECT_NUM_OF_DEFINED_DOMAINS: i32 = 25;
    pub const DOMAIN_REBOOT: i32 = 27;
    pub const DOMAIN_RESUME: i32 = 28;
    pub const DOMAIN_SET_AUTOSTART: i32 = 29;
    pub const DOMAIN_SET_MAX_MEMORY: i32 = 30;
    pub const DOMAIN_SET_MEMORY: i32 = 31;
    pub const DOMAIN_SET_VCPUS: i32 = 32;
    pub const DOMAIN_SHUTDOWN: i32 = 33;
    pub const DOMAIN_SUSPEND: i32 = 34;
    pub const DOMAIN_UNDEFINE: i32 = 35;
    pub const CONNECT_LIST_DEFINED_NETWORKS: i32 = 36;
    pub const CONNECT_LIST_DOMAINS: i32 = 37;
    pub const CONNECT_LIST_NETWORKS: i32 = 38;
    pub const NETWORK_CREATE: i32 = 39;
    pub const NETWORK_DEFINE_XML: i32 = 41;
    pub const NETWORK_DESTROY: i32 = 42;
    pub const NETWORK_GET_XML_DESC: i32 = 43;
    pub const NETWORK_GET_AUTOSTART: i32 = 44;
    pub const NETWORK_GET_BRIDGE_NAME: i32 = 45;
    pub const NETWORK_LOOKUP_BY_NAME: i32 = 46;
    pub const NETWORK_LOOKUP_BY_UUID: i32 = 47;
    pub const NETWORK_SET_AUTOSTART: i32 = 48;
    pub const NETWORK_UNDEFINE: i32 = 49;
    pub const CONNECT_NUM_OF_DEFINED_NETWORKS: i32 = 50;
    pub const CONNECT_NUM_OF_DOMAINS: i32 = 51;
    pub const CONNECT_NUM_OF_NETWORKS: i32 = 52;
    pub const CONNECT_GET_HOSTNAME: i32 = 59;
    pub const DOMAIN_BLOCK_STATS: i32 = 64;
    pub const DOMAIN_INTERFACE_STATS: i32 = 65;
    pub const CONNECT_SUPPORTS_FEATURE: i32 = 60;
    pub const AUTH_LIST: i32 = 66;
    pub const CONNECT_GET_URI: i32 = 110;
    pub const CONNECT_IS_SECURE: i32 = 149;
    pub const DOMAIN_IS_ACTIVE: i32 = 150;
    pub const DOMAIN_IS_PERSISTENT: i32 = 151;
    pub const NETWORK_IS_ACTIVE: i32 = 152;
    pub const NETWORK_IS_PERSISTENT: i32 = 153;
    pub const CONNECT_GET_LIB_VERSION: i32 = 157;
    pub const DOMAIN_MEMORY_STATS: i32 = 159;
    pub const DOMAIN_ATTACH_DEVICE_FLAGS: i32 = 160;
    pub const DOMAIN_DETACH_DEVICE_FLAGS: i32 = 161;
    pub const DOMAIN_UPDATE_DEVICE_FLAGS: i32 = 174;
    pub const DOMAIN_GET_BLOCK_INFO: i32 = 194;
    pub const DOMAIN_CREATE_WITH_FLAGS: i32 = 196;
    pub const DOMAIN_SET_VCPUS_FLAGS: i32 = 199;
    pub const DOMAIN_GET_VCPUS_FLAGS: i32 = 200;
    pub const DOMAIN_OPEN_CONSOLE: i32 = 201;
    pub const DOMAIN_IS_UPDATED: i32 = 202;
    pub const DOMAIN_SET_MEMORY_FLAGS: i32 = 204;
    pub const DOMAIN_GET_STATE: i32 = 212;
    pub const DOMAIN_GET_VCPU_PIN_INFO: i32 = 230;
    pub const DOMAIN_UNDEFINE_FLAGS: i32 = 231;
    pub const DOMAIN_DESTROY_FLAGS: i32 = 234;
    pub const DOMAIN_BLOCK_STATS_FLAGS: i32 = 243;
    pub const DOMAIN_RESET: i32 = 245;
    pub const DOMAIN_SHUTDOWN_FLAGS: i32 = 258;
    pub const DOMAIN_SET_METADATA: i32 = 264;
    pub const DOMAIN_GET_METADATA: i32 = 265;
    pub const CONNECT_LIST_ALL_DOMAINS: i32 = 273;
    pub const CONNECT_LIST_ALL_NETWORKS: i32 = 283;
    pub const NETWORK_UPDATE: i32 = 291;
    pub const NODE_GET_CPU_MAP: i32 = 293;
    pub const DOMAIN_SET_MEMORY_STATS_PERIOD: i32 = 308;
    pub const CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY: i32 = 316;
    pub const CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY: i32 = 317;
    pub const DOMAIN_EVENT_CALLBACK_LIFECYCLE: i32 = 318;
    pub const NETWORK_GET_DHCP_LEASES: i32 = 341;
    pub const CONNECT_GET_DOMAIN_CAPABILITIES: i32 = 342;
    pub const CONNECT_GET_ALL_DOMAIN_STATS: i32 = 344;
    pub const DOMAIN_DEFINE_XML_FLAGS: i32 = 350;
    pub const DOMAIN_INTERFACE_ADDRESSES: i32 = 353;
    pub const DOMAIN_RENAME: i32 = 358;
    pub const DOMAIN_RESTORE: i32 = 54;
    pub const DOMAIN_SAVE: i32 = 55;
    pub const DOMAIN_MANAGED_SAVE: i32 = 182;
    pub const DOMAIN_HAS_MANAGED_SAVE_IMAGE: i32 = 183;
    pub const DOMAIN_MANAGED_SAVE_REMOVE: i32 = 184;
    pub const DOMAIN_SNAPSHOT_CREATE_XML: i32 = 185;
    pub const DOMAIN_SNAPSHOT_GET_XML_DESC: i32 = 186;
    pub const DOMAIN_SNAPSHOT_NUM: i32 = 187;
    pub const DOMAIN_SNAPSHOT_LIST_NAMES: i32 = 188;
    pub const DOMAIN_SNAPSHOT_LOOKUP_BY_NAME: i32 = 189;
    pub const DOMAIN_HAS_CURRENT_SNAPSHOT: i32 = 190;
    pub const DOMAIN_SNAPSHOT_CURRENT: i32 = 191;
    pub const DOMAIN_REVERT_TO_SNAPSHOT: i32 = 192;
    pub const DOMAIN_SNAPSHOT_DELETE: i32 = 193;
    pub const DOMAIN_SAVE_FLAGS: i32 = 232;
    pub const DOMAIN_RESTORE_FLAGS: i32 = 233;
    pub const DOMAIN_SAVE_IMAGE_GET_XML_DESC: i32 = 235;
    pub const DOMAIN_SNAPSHOT_GET_PARENT: i32 = 244;
    pub const DOMAIN_SNAPSHOT_NUM_CHILDREN: i32 = 246;
    pub const DOMAIN_SNAPSHOT_LIST_CHILDREN_NAMES: i32 = 247;
    pub const DOMAIN_SNAPSHOT_IS_CURRENT: i32 = 271;
    pub const DOMAIN_SNAPSHOT_HAS_METADATA: i32 = 272;
    pub const DOMAIN_LIST_ALL_SNAPSHOTS: i32 = 274;
    pub const DOMAIN_SNAPSHOT_LIST_ALL_CHILDREN: i32 = 275;
    pub const CONNECT_REGISTER_CLOSE_CALLBACK: i32 = 360;
    pub const CONNECT_UNREGISTER_CLOSE_CALLBACK: i32 = 361;
    pub const CONNECT_NUM_OF_STORAGE_POOLS: i32 = 71;
    pub const CONNECT_LIST_STORAGE_POOLS: i32 = 72;
    pub const CONNECT_NUM_OF_DEFINED_STORAGE_POOLS: i32 = 73;
    pub const CONNECT_LIST_DEFINED_STORAGE_POOLS: i32 = 74;
    pub const STORAGE_POOL_CREATE_XML: i32 = 76;
    pub const STORAGE_POOL_DEFINE_XML: i32 = 77;
    pub const STORAGE_POOL_CREATE: i32 = 78;
    pub const STORAGE_POOL_BUILD: i32 = 79;
    pub const STORAGE_POOL_DESTROY: i32 = 80;
    pub const STORAGE_POOL_DELETE: i32 = 81;
    pub const STORAGE_POOL_UNDEFINE: i32 = 82;
    pub const STORAGE_POOL_REFRESH: i32 = 83;
    pub const STORAGE_POOL_LOOKUP_BY_NAME: i32 = 84;
    pub const STORAGE_POOL_LOOKUP_BY_UUID: i32 = 85;
    pub const STORAGE_POOL_LOOKUP_BY_VOLUME: i32 = 86;
    pub const STORAGE_POOL_GET_INFO: i32 = 87;
    pub const STORAGE_POOL_GET_XML_DESC: i32 = 88;
    pub const STORAGE_POOL_GET_AUTOSTART: i32 = 89;
    pub const STORAGE_POOL_SET_AUTOSTART: i32 = 90;
    pub const STORAGE_POOL_NUM_OF_VOLUMES: i32 = 91;
    pub const STORAGE_POOL_LIST_VOLUMES: i32 = 92;
    pub const STORAGE_VOL_CREATE_XML: i32 = 93;
    pub const STORAGE_VOL_DELETE: i32 = 94;
    pub const STORAGE_VOL_LOOKUP_BY_NAME: i32 = 95;
    pub const STORAGE_VOL_LOOKUP_BY_KEY: i32 = 96;
    pub const STORAGE_VOL_LOOKUP_BY_PATH: i32 = 97;
    pub const STORAGE_VOL_GET_INFO: i32 = 98;
    pub const STORAGE_VOL_GET_XML_DESC: i32 = 99;
    pub const STORAGE_VOL_GET_PATH: i32 = 100;
    pub const STORAGE_VOL_CREATE_XML_FROM: i32 = 125;
    pub const STORAGE_POOL_IS_ACTIVE: i32 = 154;
    pub const STORAGE_POOL_IS_PERSISTENT: i32 = 155;
    pub const STORAGE_VOL_WIPE: i32 = 165;
    pub const STORAGE_VOL_UPLOAD: i32 = 208;
    pub const STORAGE_VOL_DOWNLOAD: i32 = 209;
    pub const STORAGE_VOL_RESIZE: i32 = 260;
    pub const CONNECT_LIST_ALL_STORAGE_POOLS: i32 = 281;
    pub const STORAGE_POOL_LIST_ALL_VOLUMES: i32 = 282;
}

/// Keepalive procedures (messages, never replied to).
pub const KEEPALIVE_PING: i32 = 1;
/// The answer to a ping.
pub const KEEPALIVE_PONG: i32 = 2;

/// `virDrvFeature` numbers a client asks about with `CONNECT_SUPPORTS_FEATURE`.
#[allow(missing_docs)]
pub mod feature {
    pub const PROGRAM_KEEPALIVE: i32 = 10;
    pub const REMOTE_EVENT_CALLBACK: i32 = 14;
    pub const REMOTE_CLOSE_CALLBACK: i32 = 15;
}

/// `virErrorNumber` values rvirtd answers with.
#[allow(missing_docs)]
pub mod err {
    pub const INTERNAL_ERROR: i32 = 1;
    pub const NO_SUPPORT: i32 = 3;
    pub const NO_CONNECT: i32 = 5;
    pub const INVALID_ARG: i32 = 8;
    pub const OPERATION_FAILED: i32 = 9;
    pub const XML_ERROR: i32 = 27;
    pub const OPERATION_DENIED: i32 = 29;
    pub const RPC: i32 = 39;
    pub const NO_DOMAIN: i32 = 42;
    pub const NO_NETWORK: i32 = 43;
    pub const NO_STORAGE_POOL: i32 = 49;
    pub const NO_STORAGE_VOL: i32 = 50;
    pub const OPERATION_INVALID: i32 = 55;
    pub const NO_DOMAIN_SNAPSHOT: i32 = 72;
    pub const NO_DOMAIN_METADATA: i32 = 80;
    pub const ACCESS_DENIED: i32 = 88;
}

/// `virErrorDomain`: errors about domains come from the QEMU driver, as libvirtd's do.
pub const FROM_QEMU: i32 = 10;
/// `virErrorDomain` of errors about storage pools and volumes.
pub const FROM_STORAGE: i32 = 18;
/// `virErrorDomain` of errors about networks.
pub const FROM_NETWORK: i32 = 19;
/// `virErrorDomain` of protocol-level errors.
pub const FROM_RPC: i32 = 7;

/// `virDomainState`.
#[allow(missing_docs)]
pub mod state {
    pub const NOSTATE: i32 = 0;
    pub const RUNNING: i32 = 1;
    pub const PAUSED: i32 = 3;
    pub const SHUTOFF: i32 = 5;
    pub const CRASHED: i32 = 6;
}

/// `virDomainEventType` and the details rvirtd reports with each.
#[allow(missing_docs)]
pub mod event {
    pub const ID_LIFECYCLE: i32 = 0;
    pub const DEFINED: i32 = 0;
    pub const UNDEFINED: i32 = 1;
    pub const STARTED: i32 = 2;
    pub const SUSPENDED: i32 = 3;
    pub const RESUMED: i32 = 4;
    pub const STOPPED: i32 = 5;
    pub const CRASHED: i32 = 8;
    pub const DEFINED_ADDED: i32 = 0;
    pub const DEFINED_UPDATED: i32 = 1;
    pub const STARTED_BOOTED: i32 = 0;
    pub const SUSPENDED_PAUSED: i32 = 0;
    pub const RESUMED_UNPAUSED: i32 = 0;
    pub const STOPPED_SHUTDOWN: i32 = 0;
    pub const STOPPED_DESTROYED: i32 = 1;
    pub const STOPPED_CRASHED: i32 = 2;
    pub const STOPPED_FAILED: i32 = 5;
    /// Stopped: saved (`save`, `managedsave`).
    pub const STOPPED_SAVED: i32 = 4;
    /// Stopped: a snapshot was reverted to.
    pub const STOPPED_FROM_SNAPSHOT: i32 = 6;
    pub const CRASHED_PANICKED: i32 = 0;
    /// Highest event id a client may register for (`VIR_DOMAIN_EVENT_ID_LAST` - 1 in libvirt 9).
    pub const ID_MAX: i32 = 24;
}

/// `virConnectListAllDomainsFlags`.
#[allow(missing_docs)]
pub mod list {
    pub const ACTIVE: u32 = 1;
    pub const INACTIVE: u32 = 2;
    pub const PERSISTENT: u32 = 4;
    pub const TRANSIENT: u32 = 8;
    pub const RUNNING: u32 = 16;
    pub const PAUSED: u32 = 32;
    pub const SHUTOFF: u32 = 64;
    pub const OTHER: u32 = 128;
    pub const MANAGEDSAVE: u32 = 256;
    pub const NO_MANAGEDSAVE: u32 = 512;
    pub const AUTOSTART: u32 = 1024;
    pub const NO_AUTOSTART: u32 = 2048;
    pub const HAS_SNAPSHOT: u32 = 4096;
    pub const NO_SNAPSHOT: u32 = 8192;
}

/// `REMOTE_AUTH_NONE`: the only scheme offered; the socket's peer
/// credentials decide what a client may do.
pub const AUTH_NONE: i32 = 0;
/// Most domains one list may return (`REMOTE_DOMAIN_LIST_MAX`).
pub const DOMAIN_LIST_MAX: usize = 16384;
/// Bytes of a domain's UUID on the wire.
pub const UUID_LEN: usize = 16;

/// `remote_nonnull_domain`: how a domain is named in every call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteDomain {
    /// The domain's name.
    pub name: String,
    /// Its UUID.
    pub uuid: [u8; UUID_LEN],
    /// Its id while running, else -1.
    pub id: i32,
}

impl RemoteDomain {
    /// Appends the domain to `e`.
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.name).fixed_opaque(&self.uuid).i32(self.id);
    }

    /// Reads a domain from `d`.
    pub fn decode(d: &mut Decoder) -> Result<Self, XdrError> {
        let name = d.string()?.to_string();
        let mut uuid = [0u8; UUID_LEN];
        uuid.copy_from_slice(d.fixed_opaque(UUID_LEN)?);
        Ok(Self { name, uuid, id: d.i32()? })
    }
}

/// `virDomainStatsTypes` groups rvirt reports.
#[allow(missing_docs)]
pub mod stats {
    pub const STATE: u32 = 1;
    pub const CPU_TOTAL: u32 = 2;
    pub const BALLOON: u32 = 4;
    pub const VCPU: u32 = 8;
    pub const INTERFACE: u32 = 16;
    pub const BLOCK: u32 = 32;
    /// `VIR_CONNECT_GET_ALL_DOMAINS_STATS_ENFORCE_STATS`: fail on a group not served.
    pub const ENFORCE: u32 = 0x8000_0000;
}

/// A `virTypedParameter` value (`remote_typed_param_value`).
#[derive(Clone, Debug, PartialEq)]
pub enum TypedValue {
    /// `VIR_TYPED_PARAM_INT`.
    Int(i32),
    /// `VIR_TYPED_PARAM_UINT`.
    UInt(u32),
    /// `VIR_TYPED_PARAM_LLONG`.
    LLong(i64),
    /// `VIR_TYPED_PARAM_ULLONG`.
    ULLong(u64),
    /// `VIR_TYPED_PARAM_STRING`.
    Str(String),
}

/// Appends one typed parameter (`remote_typed_param`): its name, then the
/// value as a union tagged by libvirt's type number.
pub fn encode_typed(e: &mut Encoder, field: &str, v: &TypedValue) {
    e.string(field);
    match v {
        TypedValue::Int(i) => e.i32(1).i32(*i),
        TypedValue::UInt(u) => e.i32(2).u32(*u),
        TypedValue::LLong(l) => e.i32(3).i64(*l),
        TypedValue::ULLong(u) => e.i32(4).u64(*u),
        TypedValue::Str(s) => e.i32(7).string(s),
    };
}

/// `remote_nonnull_network` and `remote_nonnull_storage_pool`: how a
/// network or a storage pool is named in every call (the same layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteNameUuid {
    /// The network's or pool's name.
    pub name: String,
    /// Its UUID.
    pub uuid: [u8; UUID_LEN],
}

/// A network in a call.
pub type RemoteNetwork = RemoteNameUuid;
/// A storage pool in a call.
pub type RemoteStoragePool = RemoteNameUuid;

impl RemoteNameUuid {
    /// Appends the reference to `e`.
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.name).fixed_opaque(&self.uuid);
    }

    /// Reads a reference from `d`.
    pub fn decode(d: &mut Decoder) -> Result<Self, XdrError> {
        let name = d.string()?.to_string();
        let mut uuid = [0u8; UUID_LEN];
        uuid.copy_from_slice(d.fixed_opaque(UUID_LEN)?);
        Ok(Self { name, uuid })
    }
}

/// `remote_nonnull_storage_vol`: how a volume is named in every call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteStorageVol {
    /// The pool's name.
    pub pool: String,
    /// The volume's name.
    pub name: String,
    /// Its key (rvirt: its path).
    pub key: String,
}

impl RemoteStorageVol {
    /// Appends the volume to `e`.
    pub fn encode(&self, e: &mut Encoder) {
        e.string(&self.pool).string(&self.name).string(&self.key);
    }

    /// Reads a volume from `d`.
    pub fn decode(d: &mut Decoder) -> Result<Self, XdrError> {
        Ok(Self { pool: d.string()?.to_string(), name: d.string()?.to_string(), key: d.string()?.to_string() })
    }
}

/// `virConnectListAllStoragePoolsFlags` (the first six are the networks' too).
#[allow(missing_docs)]
pub mod list_pools {
    pub use super::list_networks::*;
    pub const DIR: u32 = 64;
    /// Every pool type flag (`DIR` up to `VSTORAGE`).
    pub const TYPES: u32 = 0x7_ffc0;
}

/// Upper limit on lists of storage pools (`REMOTE_STORAGE_POOL_LIST_MAX`).
pub const STORAGE_POOL_LIST_MAX: usize = 4096;
/// Upper limit on lists of volumes (`REMOTE_STORAGE_VOL_LIST_MAX`).
pub const STORAGE_VOL_LIST_MAX: usize = 16384;

/// `virConnectListAllNetworksFlags`.
#[allow(missing_docs)]
pub mod list_networks {
    pub const INACTIVE: u32 = 1;
    pub const ACTIVE: u32 = 2;
    pub const PERSISTENT: u32 = 4;
    pub const TRANSIENT: u32 = 8;
    pub const AUTOSTART: u32 = 16;
    pub const NO_AUTOSTART: u32 = 32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_reference_round_trips_in_libvirt_s_layout() {
        let d = RemoteDomain { name: "web".into(), uuid: [7; 16], id: -1 };
        let mut e = Encoder::new();
        d.encode(&mut e);
        let bytes = e.into_bytes();
        // name (length, 3 bytes, 1 pad), 16 UUID bytes, id.
        assert_eq!(bytes.len(), 4 + 4 + 16 + 4);
        assert_eq!(&bytes[..8], &[0, 0, 0, 3, b'w', b'e', b'b', 0]);
        assert_eq!(&bytes[24..], &[0xff; 4]);
        assert_eq!(RemoteDomain::decode(&mut Decoder::new(&bytes)).unwrap(), d);
        assert!(RemoteDomain::decode(&mut Decoder::new(&bytes[..20])).is_err());
    }

    #[test]
    fn typed_parameters_carry_their_type_tag() {
        let mut e = Encoder::new();
        encode_typed(&mut e, "cpu.time", &TypedValue::ULLong(5));
        encode_typed(&mut e, "net.0.name", &TypedValue::Str("vnet0".into()));
        let b = e.into_bytes();
        // "cpu.time" (8 bytes), tag 4, a hyper.
        assert_eq!(&b[..4], &[0, 0, 0, 8]);
        assert_eq!(&b[12..16], &[0, 0, 0, 4]);
        assert_eq!(&b[16..24], &5u64.to_be_bytes());
        let mut d = Decoder::new(&b[24..]);
        assert_eq!(d.string().unwrap(), "net.0.name");
        assert_eq!(d.i32().unwrap(), 7);
        assert_eq!(d.string().unwrap(), "vnet0");
    }
}
