//! The `remote` program's procedures rvirtd serves: each decodes its
//! arguments, calls the [`Manager`] (the same calls rvirtd's own socket
//! makes) and encodes libvirt's reply. A procedure rvirt does not have
//! answers `VIR_ERR_NO_SUPPORT`, which clients such as virt-install probe for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rvirt_domain::protocol::{DomainState, StatValue};
use rvirt_domain::DomainXml;
use rvirt_libvirt_rpc::message::{REMOTE_PROGRAM, REMOTE_VERSION};
use rvirt_libvirt_rpc::remote::{encode_typed, err, event, feature, list, proc_ as p, stats, RemoteDomain, TypedValue, AUTH_NONE, DOMAIN_LIST_MAX, FROM_QEMU, FROM_RPC, UUID_LEN};
use rvirt_libvirt_rpc::{Decoder, Encoder, Header, MessageStatus, MessageType, Packet, RemoteError, XdrError};

use super::{host, Outbox, Session};
use crate::events::{DomainEvent, Lifecycle, StopReason};
use crate::manager::{state_numbers, DomainBrief, Manager};

/// A procedure's encoded return value, or libvirt's error.
pub(super) type Reply = Result<Vec<u8>, RemoteError>;

/// `VIR_CONNECT_RO`: the client asked for a read-only connection.
const CONNECT_RO: u32 = 1;
/// `VIR_DOMAIN_XML_INACTIVE`: the stored definition, not the running one.
const XML_INACTIVE: u32 = 2;
/// `VIR_DOMAIN_CONSOLE_FORCE`.
const CONSOLE_FORCE: u32 = 1;
/// Most event callbacks one connection may register.
const MAX_CALLBACKS: usize = 64;

fn error(code: i32, message: impl Into<String>) -> RemoteError {
    RemoteError { domain: FROM_QEMU, ..RemoteError::new(code, message) }
}

fn failed(message: String) -> RemoteError {
    error(err::OPERATION_FAILED, format!("operation failed: {message}"))
}

fn invalid(message: String) -> RemoteError {
    error(err::OPERATION_INVALID, format!("Requested operation is not valid: {message}"))
}

/// The error for arguments that do not decode.
pub(super) fn bad_args(e: XdrError) -> RemoteError {
    RemoteError { domain: FROM_RPC, ..RemoteError::new(err::RPC, format!("Unable to decode message payload: {e}")) }
}

fn uuid_string(u: &[u8; UUID_LEN]) -> String {
    uuid::Uuid::from_bytes(*u).hyphenated().to_string()
}

fn to_remote(b: &DomainBrief) -> RemoteDomain {
    RemoteDomain { name: b.name.clone(), uuid: b.uuid, id: b.id.map_or(-1, |i| i as i32) }
}

/// A reply whose return value `f` writes.
pub(super) fn encode(f: impl FnOnce(&mut Encoder)) -> Reply {
    let mut e = Encoder::new();
    f(&mut e);
    Ok(e.into_bytes())
}

fn ret_domain(b: &DomainBrief) -> Reply {
    encode(|e| to_remote(b).encode(e))
}

/// Writes a `…_list_all_…` answer (domains, networks, pools, volumes): the
/// items when the client asked for them (`need`), then their count.
pub(super) fn list_all<T>(e: &mut Encoder, need: i32, items: &[T], each: impl Fn(&T, &mut Encoder)) {
    if need != 0 {
        e.u32(items.len() as u32);
        for i in items {
            each(i, e);
        }
    } else {
        e.u32(0);
    }
    e.u32(items.len() as u32);
}

/// A reply of one `int`.
pub(super) fn ret_int(v: i32) -> Reply {
    encode(|e| {
        e.i32(v);
    })
}

fn empty() -> Reply {
    Ok(Vec::new())
}

/// Whether procedure `proc_` changes anything (refused on read-only connections).
fn changes(proc_: i32) -> bool {
    matches!(
        proc_,
        p::DOMAIN_CREATE
            | p::DOMAIN_CREATE_XML
            | p::DOMAIN_CREATE_WITH_FLAGS
            | p::DOMAIN_DEFINE_XML
            | p::DOMAIN_DEFINE_XML_FLAGS
            | p::DOMAIN_DESTROY
            | p::DOMAIN_DESTROY_FLAGS
            | p::DOMAIN_UNDEFINE
            | p::DOMAIN_UNDEFINE_FLAGS
            | p::DOMAIN_SHUTDOWN
            | p::DOMAIN_SHUTDOWN_FLAGS
            | p::DOMAIN_REBOOT
            | p::DOMAIN_SUSPEND
            | p::DOMAIN_RESUME
            | p::DOMAIN_SET_AUTOSTART
            | p::DOMAIN_OPEN_CONSOLE
    )
}

/// Whether the URI a client opened names this daemon.
fn our_uri(uri: &str) -> bool {
    let uri = uri.split('?').next().unwrap_or("");
    let Some((scheme, rest)) = uri.split_once("://") else { return uri.is_empty() };
    let driver = scheme.split('+').next().unwrap_or("");
    matches!(driver, "qemu" | "rvirt") && matches!(rest, "/system" | "localhost/system")
}

/// The event callbacks one connection registered, and the thread that delivers them.
#[derive(Default)]
pub(crate) struct Events {
    callbacks: Arc<Mutex<Vec<Callback>>>,
    next_id: i32,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone, Copy)]
struct Callback {
    id: i32,
    event_id: i32,
    domain: Option<[u8; UUID_LEN]>,
}

impl Events {
    fn register(&mut self, mgr: &Manager, out: &Arc<Outbox>, event_id: i32, domain: Option<[u8; UUID_LEN]>) -> Result<i32, RemoteError> {
        if !(0..=event::ID_MAX).contains(&event_id) {
            return Err(error(err::INVALID_ARG, format!("invalid argument: unknown domain event id {event_id}")));
        }
        let mut cbs = self.callbacks.lock().unwrap_or_else(|e| e.into_inner());
        if cbs.len() >= MAX_CALLBACKS {
            return Err(error(err::OPERATION_FAILED, format!("operation failed: at most {MAX_CALLBACKS} event callbacks per connection")));
        }
        self.next_id += 1;
        cbs.push(Callback { id: self.next_id, event_id, domain });
        drop(cbs);
        if self.thread.is_none() {
            let rx = mgr.events().subscribe();
            let (cbs, stop, out) = (self.callbacks.clone(), self.stop.clone(), out.clone());
            let t = std::thread::Builder::new().name("libvirt-events".into()).spawn(move || deliver(rx, cbs, stop, out));
            self.thread = Some(t.map_err(|e| error(err::INTERNAL_ERROR, format!("internal error: no event thread: {e}")))?);
        }
        Ok(self.next_id)
    }

    fn deregister(&mut self, id: i32) -> Result<(), RemoteError> {
        let mut cbs = self.callbacks.lock().unwrap_or_else(|e| e.into_inner());
        let before = cbs.len();
        cbs.retain(|c| c.id != id);
        if cbs.len() == before {
            return Err(error(err::INVALID_ARG, format!("invalid argument: no domain event callback {id}")));
        }
        Ok(())
    }

    /// Stops delivering (the connection is closing).
    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// libvirt's event and detail numbers for a lifecycle change.
fn event_numbers(what: Lifecycle) -> (i32, i32) {
    match what {
        Lifecycle::Defined { updated } => (event::DEFINED, if updated { event::DEFINED_UPDATED } else { event::DEFINED_ADDED }),
        Lifecycle::Undefined => (event::UNDEFINED, 0),
        Lifecycle::Started => (event::STARTED, event::STARTED_BOOTED),
        Lifecycle::Suspended => (event::SUSPENDED, event::SUSPENDED_PAUSED),
        Lifecycle::Resumed => (event::RESUMED, event::RESUMED_UNPAUSED),
        Lifecycle::Stopped(r) => (
            event::STOPPED,
            match r {
                StopReason::Shutdown => event::STOPPED_SHUTDOWN,
                StopReason::Destroyed => event::STOPPED_DESTROYED,
                StopReason::Crashed => event::STOPPED_CRASHED,
                StopReason::Failed => event::STOPPED_FAILED,
                StopReason::Saved => event::STOPPED_SAVED,
                StopReason::FromSnapshot => event::STOPPED_FROM_SNAPSHOT,
            },
        ),
        Lifecycle::Crashed => (event::CRASHED, event::CRASHED_PANICKED),
    }
}

fn deliver(rx: std::sync::mpsc::Receiver<DomainEvent>, cbs: Arc<Mutex<Vec<Callback>>>, stop: Arc<AtomicBool>, out: Arc<Outbox>) {
    while !stop.load(Ordering::SeqCst) && !out.is_closed() {
        let ev = match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(ev) => ev,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let Ok(uuid) = uuid::Uuid::parse_str(&ev.uuid).map(|u| *u.as_bytes()) else { continue };
        let dom = RemoteDomain { name: ev.name.clone(), uuid, id: ev.id.map_or(-1, |i| i as i32) };
        let (kind, detail) = event_numbers(ev.what);
        let targets: Vec<i32> = cbs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|c| c.event_id == event::ID_LIFECYCLE && c.domain.is_none_or(|d| d == uuid))
            .map(|c| c.id)
            .collect();
        for id in targets {
            let mut e = Encoder::new();
            e.i32(id);
            dom.encode(&mut e);
            e.i32(kind).i32(detail);
            let header = Header {
                prog: REMOTE_PROGRAM,
                vers: REMOTE_VERSION,
                proc_: p::DOMAIN_EVENT_CALLBACK_LIFECYCLE,
                kind: MessageType::Message,
                serial: 0,
                status: MessageStatus::Ok,
            };
            if !out.send(&Packet { header, payload: e.into_bytes() }) {
                return;
            }
        }
    }
}

impl Session {
    /// The domain a call names, as it is now.
    pub(super) fn domain(&self, d: &mut Decoder) -> Result<DomainBrief, RemoteError> {
        let dom = RemoteDomain::decode(d).map_err(bad_args)?;
        let uuid = uuid_string(&dom.uuid);
        self.mgr.brief(&uuid).map_err(|_| error(err::NO_DOMAIN, format!("Domain not found: no domain with matching uuid '{uuid}' ({})", dom.name)))
    }

    /// Answers one call of the `remote` program.
    pub(super) fn call(&mut self, h: &Header, args: &[u8]) -> Reply {
        let mut d = Decoder::new(args);
        let proc_ = h.proc_;
        if !self.opened && !matches!(proc_, p::AUTH_LIST | p::CONNECT_SUPPORTS_FEATURE | p::CONNECT_OPEN) {
            return Err(error(err::NO_CONNECT, "no connection driver available: the connection is not open (CONNECT_OPEN first)"));
        }
        if self.read_only && (changes(proc_) || super::networks::changes(proc_) || super::domains::changes(proc_) || super::snapshots::changes(proc_) || super::storage::changes(proc_)) {
            return Err(error(err::OPERATION_DENIED, format!("operation forbidden: read only access prevents procedure {proc_} (use the read-write socket)")));
        }
        tracing::debug!(client = %self.client, proc_, "libvirt call");
        let mgr = self.mgr.clone();
        match proc_ {
            p::AUTH_LIST => encode(|e| {
                e.u32(1).i32(AUTH_NONE);
            }),
            p::CONNECT_SUPPORTS_FEATURE => {
                let f = d.i32().map_err(bad_args)?;
                ret_int(i32::from(matches!(f, feature::PROGRAM_KEEPALIVE | feature::REMOTE_EVENT_CALLBACK | feature::REMOTE_CLOSE_CALLBACK)))
            }
            p::CONNECT_OPEN => {
                let name = d.opt_string().map_err(bad_args)?.unwrap_or("").to_string();
                let flags = d.u32().map_err(bad_args)?;
                if !our_uri(&name) {
                    return Err(error(err::NO_CONNECT, format!("no connection driver available for {name}: rvirtd serves qemu:///system and rvirt:///system")));
                }
                if flags & CONNECT_RO != 0 {
                    self.read_only = true;
                }
                self.opened = true;
                tracing::info!(client = %self.client, uri = %name, read_only = self.read_only, "libvirt client connected");
                empty()
            }
            p::CONNECT_CLOSE | p::CONNECT_REGISTER_CLOSE_CALLBACK | p::CONNECT_UNREGISTER_CLOSE_CALLBACK => empty(),
            p::CONNECT_GET_TYPE => encode(|e| {
                e.string(host::HV_TYPE);
            }),
            p::CONNECT_GET_VERSION => encode(|e| {
                e.u64(host::hv_version());
            }),
            p::CONNECT_GET_LIB_VERSION => encode(|e| {
                e.u64(host::LIB_VERSION);
            }),
            p::CONNECT_GET_HOSTNAME => encode(|e| {
                e.string(&host::hostname());
            }),
            p::CONNECT_GET_URI => encode(|e| {
                e.string(host::URI);
            }),
            p::CONNECT_IS_SECURE => ret_int(1),
            p::CONNECT_GET_MAX_VCPUS => ret_int(host::MAX_VCPUS),
            p::NODE_GET_INFO => encode(|e| host::Node::read().encode(e)),
            p::NODE_GET_CPU_MAP => {
                let need_map = d.i32().map_err(bad_args)? != 0;
                let need_online = d.i32().map_err(bad_args)? != 0;
                let _flags = d.u32().map_err(bad_args)?;
                let (map, online, total) = host::cpu_map();
                encode(|e| {
                    e.opaque(if need_map { &map } else { &[] }).u32(if need_online { online } else { 0 }).i32(total);
                })
            }
            p::CONNECT_GET_CAPABILITIES => encode(|e| {
                e.string(&host::capabilities(&host::Node::read()));
            }),
            p::CONNECT_GET_DOMAIN_CAPABILITIES => encode(|e| {
                e.string(&host::domain_capabilities());
            }),
            p::CONNECT_LIST_ALL_DOMAINS => {
                let need = d.i32().map_err(bad_args)?;
                let flags = d.u32().map_err(bad_args)?;
                let autostart = flags & (list::AUTOSTART | list::NO_AUTOSTART) != 0;
                let found: Vec<DomainBrief> = mgr.briefs(autostart).into_iter().filter(|b| list_matches(b, flags)).collect();
                encode(|e| list_all(e, need, &found, |b, e| to_remote(b).encode(e)))
            }
            p::CONNECT_NUM_OF_DOMAINS => ret_int(mgr.briefs(false).iter().filter(|b| b.id.is_some()).count() as i32),
            p::CONNECT_NUM_OF_DEFINED_DOMAINS => ret_int(mgr.briefs(false).iter().filter(|b| b.id.is_none() && b.persistent).count() as i32),
            p::CONNECT_LIST_DOMAINS => {
                let max = d.i32().map_err(bad_args)?;
                let max = usize::try_from(max).ok().filter(|m| *m <= DOMAIN_LIST_MAX).ok_or_else(|| error(err::RPC, format!("too many domains asked for: {max}")))?;
                let ids: Vec<i32> = mgr.briefs(false).iter().filter_map(|b| b.id).map(|i| i as i32).take(max).collect();
                encode(|e| {
                    e.u32(ids.len() as u32);
                    for i in &ids {
                        e.i32(*i);
                    }
                })
            }
            p::CONNECT_LIST_DEFINED_DOMAINS => {
                let max = d.i32().map_err(bad_args)?;
                let max = usize::try_from(max).ok().filter(|m| *m <= DOMAIN_LIST_MAX).ok_or_else(|| error(err::RPC, format!("too many names asked for: {max}")))?;
                let names: Vec<String> = mgr.briefs(false).into_iter().filter(|b| b.id.is_none() && b.persistent).map(|b| b.name).take(max).collect();
                encode(|e| {
                    e.u32(names.len() as u32);
                    for n in &names {
                        e.string(n);
                    }
                })
            }
            p::DOMAIN_LOOKUP_BY_NAME => {
                let name = d.string().map_err(bad_args)?;
                let b = mgr.brief(name).ok().filter(|b| b.name == name);
                ret_domain(&b.ok_or_else(|| error(err::NO_DOMAIN, format!("Domain not found: no domain with matching name '{name}'")))?)
            }
            p::DOMAIN_LOOKUP_BY_UUID => {
                let mut u = [0u8; UUID_LEN];
                u.copy_from_slice(d.fixed_opaque(UUID_LEN).map_err(bad_args)?);
                let s = uuid_string(&u);
                ret_domain(&mgr.brief(&s).map_err(|_| error(err::NO_DOMAIN, format!("Domain not found: no domain with matching uuid '{s}'")))?)
            }
            p::DOMAIN_LOOKUP_BY_ID => {
                let id = d.i32().map_err(bad_args)?;
                let b = mgr.briefs(false).into_iter().find(|b| b.id.is_some_and(|i| i as i32 == id));
                ret_domain(&b.ok_or_else(|| error(err::NO_DOMAIN, format!("Domain not found: no domain with matching id {id}")))?)
            }
            p::DOMAIN_GET_INFO => {
                let b = self.domain(&mut d)?;
                let info = mgr.info(&b.name).map_err(failed)?;
                let (st, _) = state_numbers(&b);
                let cpu_ns = info.cpu_time_seconds.map_or(0, |s| (s * 1e9) as u64);
                encode(|e| {
                    e.u32(st as u32).u64(info.max_memory_kib).u64(info.used_memory_kib).u32(info.vcpus).u64(cpu_ns);
                })
            }
            p::DOMAIN_GET_STATE => {
                let b = self.domain(&mut d)?;
                let (st, reason) = state_numbers(&b);
                encode(|e| {
                    e.i32(st).i32(reason);
                })
            }
            p::DOMAIN_GET_XML_DESC => {
                let b = self.domain(&mut d)?;
                let flags = d.u32().map_err(bad_args)?;
                let xml = if flags & XML_INACTIVE != 0 { mgr.dump_inactive_xml(&b.name) } else { mgr.dump_xml(&b.name) }.map_err(failed)?;
                encode(|e| {
                    e.string(&xml);
                })
            }
            p::DOMAIN_GET_OS_TYPE => {
                self.domain(&mut d)?;
                encode(|e| {
                    e.string("hvm");
                })
            }
            p::DOMAIN_GET_MAX_MEMORY => {
                let b = self.domain(&mut d)?;
                let info = mgr.info(&b.name).map_err(failed)?;
                encode(|e| {
                    e.u64(info.max_memory_kib);
                })
            }
            // Drops are not counted: -1, which virsh leaves out.
            p::DOMAIN_BLOCK_STATS => {
                let b = self.active(&mut d)?;
                let dev = d.string().map_err(bad_args)?;
                let c = mgr.device_stats(&b.name, dev).map_err(|e| error(err::INVALID_ARG, format!("invalid argument: {e}")))?;
                encode(|e| {
                    e.i64(c.reads as i64).i64(c.bytes_to_guest as i64).i64(c.writes as i64).i64(c.bytes_from_guest as i64).i64(c.errors as i64);
                })
            }
            p::DOMAIN_INTERFACE_STATS => {
                let b = self.active(&mut d)?;
                let dev = d.string().map_err(bad_args)?;
                let c = mgr.device_stats(&b.name, dev).map_err(|e| error(err::INVALID_ARG, format!("invalid argument: {e}")))?;
                encode(|e| {
                    e.i64(c.bytes_to_guest as i64).i64(c.reads as i64).i64(-1).i64(-1);
                    e.i64(c.bytes_from_guest as i64).i64(c.writes as i64).i64(c.errors as i64).i64(-1);
                })
            }
            p::CONNECT_GET_ALL_DOMAIN_STATS => {
                let n = d.array_len(DOMAIN_LIST_MAX).map_err(bad_args)?;
                let mut doms = Vec::with_capacity(n);
                for _ in 0..n {
                    doms.push(self.domain(&mut d)?);
                }
                let groups = d.u32().map_err(bad_args)?;
                let flags = d.u32().map_err(bad_args)?;
                let served = stats::STATE | stats::CPU_TOTAL | stats::BALLOON | stats::VCPU | stats::INTERFACE | stats::BLOCK;
                if flags & stats::ENFORCE != 0 && groups & !served != 0 {
                    return Err(error(err::NO_SUPPORT, format!("this function is not supported by the connection driver: statistics groups {:#x}", groups & !served)));
                }
                let groups = if groups == 0 { served } else { groups & served };
                if doms.is_empty() {
                    doms = mgr.briefs(false).into_iter().filter(|b| list_matches(b, flags & 0xff)).collect();
                }
                let records: Vec<(DomainBrief, Vec<(String, TypedValue)>)> = doms
                    .into_iter()
                    .map(|b| {
                        let fields = mgr.domain_stats(&b, groups).into_iter().map(|(k, v)| (k, typed(v))).collect();
                        (b, fields)
                    })
                    .collect();
                encode(|e| {
                    e.u32(records.len() as u32);
                    for (b, params) in &records {
                        to_remote(b).encode(e);
                        e.u32(params.len() as u32);
                        for (field, v) in params {
                            encode_typed(e, field, v);
                        }
                    }
                })
            }
            p::DOMAIN_GET_AUTOSTART => ret_int(i32::from(self.domain(&mut d)?.autostart)),
            p::DOMAIN_IS_ACTIVE => ret_int(i32::from(self.domain(&mut d)?.id.is_some())),
            p::DOMAIN_IS_PERSISTENT => ret_int(i32::from(self.domain(&mut d)?.persistent)),
            p::DOMAIN_IS_UPDATED => {
                self.domain(&mut d)?;
                ret_int(0)
            }
            p::DOMAIN_SET_AUTOSTART => {
                let b = self.domain(&mut d)?;
                let on = d.i32().map_err(bad_args)? != 0;
                mgr.set_autostart(&b.name, on).map_err(invalid)?;
                empty()
            }
            p::DOMAIN_DEFINE_XML | p::DOMAIN_DEFINE_XML_FLAGS => {
                let xml = d.string().map_err(bad_args)?;
                check_xml(xml)?;
                let (name, warnings) = mgr.define(xml).map_err(failed)?;
                for w in warnings {
                    tracing::warn!("domain '{name}': {w}");
                }
                ret_domain(&mgr.brief(&name).map_err(failed)?)
            }
            p::DOMAIN_CREATE_XML => {
                let xml = d.string().map_err(bad_args)?;
                check_xml(xml)?;
                let (started, _) = mgr.create_domain(xml).map_err(failed)?;
                ret_domain(&started)
            }
            p::DOMAIN_CREATE | p::DOMAIN_CREATE_WITH_FLAGS => {
                let b = self.domain(&mut d)?;
                let flags = if proc_ == p::DOMAIN_CREATE_WITH_FLAGS { d.u32().map_err(bad_args)? } else { 0 };
                // VIR_DOMAIN_START_BYPASS_CACHE (4) changes nothing here; _FORCE_BOOT (8) drops a managed save.
                if flags & !(4 | 8) != 0 {
                    return Err(error(err::INVALID_ARG, format!("invalid argument: unsupported flags ({:#x}) in virDomainCreateWithFlags", flags & !(4 | 8))));
                }
                if b.id.is_some() {
                    return Err(invalid("domain is already running".into()));
                }
                if flags & 8 != 0 && b.managed_save {
                    mgr.managed_save_remove(&b.name).map_err(failed)?;
                }
                mgr.start(&b.name).map_err(failed)?;
                let b = mgr.brief(&b.name).map_err(failed)?;
                if proc_ == p::DOMAIN_CREATE { empty() } else { ret_domain(&b) }
            }
            p::DOMAIN_DESTROY | p::DOMAIN_DESTROY_FLAGS => {
                let b = self.active(&mut d)?;
                mgr.destroy(&b.name).map_err(failed)?;
                empty()
            }
            p::DOMAIN_SHUTDOWN | p::DOMAIN_SHUTDOWN_FLAGS => {
                let b = self.active(&mut d)?;
                mgr.shutdown(&b.name, None).map_err(failed)?;
                empty()
            }
            p::DOMAIN_REBOOT => {
                let b = self.active(&mut d)?;
                mgr.reboot(&b.name).map_err(failed)?;
                empty()
            }
            p::DOMAIN_SUSPEND | p::DOMAIN_RESUME => {
                let b = self.active(&mut d)?;
                let pause = proc_ == p::DOMAIN_SUSPEND;
                if pause == (b.state == DomainState::Paused) {
                    return Err(invalid(format!("domain is already {}", if pause { "paused" } else { "running" })));
                }
                mgr.set_paused(&b.name, pause).map_err(failed)?;
                empty()
            }
            p::DOMAIN_UNDEFINE | p::DOMAIN_UNDEFINE_FLAGS => {
                let b = self.domain(&mut d)?;
                if !b.persistent {
                    return Err(invalid("cannot undefine transient domain".into()));
                }
                // VIR_DOMAIN_UNDEFINE_MANAGED_SAVE (1), _SNAPSHOTS_METADATA (2).
                let flags = if proc_ == p::DOMAIN_UNDEFINE_FLAGS { d.u32().map_err(bad_args)? } else { 0 };
                mgr.undefine(&b.name, flags & 1 != 0, flags & 2 != 0).map_err(invalid)?;
                empty()
            }
            p::DOMAIN_OPEN_CONSOLE => {
                let b = self.active(&mut d)?;
                let dev = d.opt_string().map_err(bad_args)?.map(str::to_string);
                let flags = d.u32().map_err(bad_args)?;
                if let Some(dev) = dev.filter(|d| !matches!(d.as_str(), "serial0" | "console0")) {
                    return Err(error(err::OPERATION_FAILED, format!("operation failed: cannot find character device {dev} (rvirt offers serial0)")));
                }
                let pty = mgr.console(&b.name).map_err(failed)?;
                self.consoles.open(h, &b.name, &pty, flags & CONSOLE_FORCE != 0)?;
                empty()
            }
            p::STORAGE_VOL_UPLOAD | p::STORAGE_VOL_DOWNLOAD => self.volume_stream(h, proc_, &mut d),
            p::CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY => {
                let event_id = d.i32().map_err(bad_args)?;
                let domain = if d.bool().map_err(bad_args)? { Some(self.domain(&mut d)?.uuid) } else { None };
                let id = self.events.register(&mgr, &self.out, event_id, domain)?;
                ret_int(id)
            }
            p::CONNECT_DOMAIN_EVENT_CALLBACK_DEREGISTER_ANY => {
                let id = d.i32().map_err(bad_args)?;
                self.events.deregister(id)?;
                empty()
            }
            other => match self.domain_call(other, &mut d).or_else(|| self.snapshot_call(other, &mut d)).or_else(|| self.network_call(other, &mut d)).or_else(|| self.storage_call(other, &mut d)) {
                Some(reply) => reply,
                None => Err(error(
                    err::NO_SUPPORT,
                    format!("this function is not supported by the connection driver: procedure {other} of libvirt's remote protocol (rvirt has no such function yet)"),
                )),
            },
        }
    }

    /// The running domain a call names.
    fn active(&self, d: &mut Decoder) -> Result<DomainBrief, RemoteError> {
        let b = self.domain(d)?;
        if b.id.is_none() {
            return Err(invalid("domain is not running".into()));
        }
        Ok(b)
    }
}

/// A figure as libvirt's typed parameter.
fn typed(v: StatValue) -> TypedValue {
    match v {
        StatValue::Int(i) => TypedValue::Int(i),
        StatValue::UInt(u) => TypedValue::UInt(u),
        StatValue::ULLong(u) => TypedValue::ULLong(u),
        StatValue::Str(s) => TypedValue::Str(s),
    }
}

/// Refuses XML that does not parse with libvirt's XML error code.
fn check_xml(xml: &str) -> Result<(), RemoteError> {
    DomainXml::parse(xml).map(|_| ()).map_err(|e| error(err::XML_ERROR, format!("XML error: {e}")))
}

/// One group of a list call's filter flags: passes when none of `mask`
/// is set, or when a set flag's condition in `pass` holds (libvirt's rule
/// for `virConnectListAll*`).
pub(super) fn flag_group(flags: u32, mask: u32, pass: &[(u32, bool)]) -> bool {
    flags & mask == 0 || pass.iter().any(|(f, ok)| flags & f != 0 && *ok)
}

/// Whether `b` passes `virConnectListAllDomains` filter `flags` (groups of
/// flags are each "any of"; an empty group passes everything).
fn list_matches(b: &DomainBrief, flags: u32) -> bool {
    let group = |mask: u32, pass: &[(u32, bool)]| flag_group(flags, mask, pass);
    let active = b.id.is_some();
    group(list::ACTIVE | list::INACTIVE, &[(list::ACTIVE, active), (list::INACTIVE, !active)])
        && group(list::PERSISTENT | list::TRANSIENT, &[(list::PERSISTENT, b.persistent), (list::TRANSIENT, !b.persistent)])
        && group(
            list::RUNNING | list::PAUSED | list::SHUTOFF | list::OTHER,
            &[
                (list::RUNNING, b.state == DomainState::Running),
                (list::PAUSED, b.state == DomainState::Paused),
                (list::SHUTOFF, b.state == DomainState::ShutOff),
                (list::OTHER, b.state == DomainState::Crashed),
            ],
        )
        && group(list::AUTOSTART | list::NO_AUTOSTART, &[(list::AUTOSTART, b.autostart), (list::NO_AUTOSTART, !b.autostart)])
        && group(list::MANAGEDSAVE | list::NO_MANAGEDSAVE, &[(list::MANAGEDSAVE, b.managed_save), (list::NO_MANAGEDSAVE, !b.managed_save)])
        && group(list::HAS_SNAPSHOT | list::NO_SNAPSHOT, &[(list::HAS_SNAPSHOT, b.has_snapshots), (list::NO_SNAPSHOT, !b.has_snapshots)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brief(id: Option<u32>, state: DomainState, persistent: bool, autostart: bool) -> DomainBrief {
        DomainBrief { name: "d".into(), uuid: [1; 16], id, state, reason: String::new(), persistent, autostart, managed_save: false, has_snapshots: false }
    }

    #[test]
    fn list_filters_combine_as_libvirt_s_do() {
        let running = brief(Some(1), DomainState::Running, true, false);
        let off = brief(None, DomainState::ShutOff, true, true);
        let transient = brief(Some(2), DomainState::Paused, false, false);
        assert!(list_matches(&running, 0) && list_matches(&off, 0));
        assert!(list_matches(&running, list::ACTIVE) && !list_matches(&off, list::ACTIVE));
        assert!(list_matches(&off, list::INACTIVE | list::ACTIVE));
        assert!(list_matches(&transient, list::TRANSIENT | list::PAUSED) && !list_matches(&transient, list::PERSISTENT));
        assert!(list_matches(&off, list::AUTOSTART) && !list_matches(&running, list::AUTOSTART));
        assert!(!list_matches(&off, list::HAS_SNAPSHOT) && list_matches(&off, list::NO_SNAPSHOT));
        assert!(list_matches(&running, list::ACTIVE | list::PERSISTENT | list::RUNNING));
    }

    #[test]
    fn only_this_daemon_s_uris_open() {
        for ok in ["qemu:///system", "qemu+unix:///system", "rvirt:///system", "qemu:///system?socket=/tmp/s", ""] {
            assert!(our_uri(ok), "{ok}");
        }
        for bad in ["qemu:///session", "xen:///system", "test:///default", "qemu+ssh://host/system", "lxc:///"] {
            assert!(!our_uri(bad), "{bad}");
        }
    }

    #[test]
    fn lifecycle_changes_use_libvirt_s_event_numbers() {
        assert_eq!(event_numbers(Lifecycle::Stopped(StopReason::Destroyed)), (5, 1));
        assert_eq!(event_numbers(Lifecycle::Defined { updated: true }), (0, 1));
    }

    #[test]
    fn stat_groups_are_libvirt_s_numbers() {
        use rvirt_domain::protocol::StatGroups as G;
        // The front end passes libvirt's group bits to the manager unchanged.
        assert_eq!([G::STATE, G::CPU_TOTAL, G::BALLOON, G::VCPU, G::INTERFACE, G::BLOCK], [stats::STATE, stats::CPU_TOTAL, stats::BALLOON, stats::VCPU, stats::INTERFACE, stats::BLOCK]);
    }
}
