//! virtio-scsi: one controller, one target per disk or CD-ROM drive (LUN 0
//! each), the commands executed by `rvirt-scsi`. Queues: control (task
//! management and asynchronous-notification requests, all answered at
//! once), event (no events are sent; media changes reach the guest as unit
//! attentions and MMC media events, which Linux's `sr` polls), and one
//! request queue. A request for a target that does not exist is answered
//! BAD_TARGET at once: SeaBIOS scans 256 of them.

use std::sync::{Arc, Mutex};

use rvirt_scsi::{Lun, Status};
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

use crate::chain::{as_bytes, as_mut_bytes, GuestChain};
use crate::worker::{spawn_queues, Worker};
use crate::{device_type, ActivateContext, DeviceCounters, QueueHandle, VirtioDevice, COMMON_FEATURES};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most targets on one controller (one LUN each).
pub const MAX_TARGETS: usize = 255;
/// CDB bytes in a request header (the config's cdb_size; fixed).
const CDB_SIZE: usize = 32;
/// Sense bytes in a response (the config's sense_size; fixed).
const SENSE_SIZE: usize = 96;
/// lun[8], id, task attribute, priority, CRN, then the CDB.
const REQ_HEADER: usize = 8 + 8 + 3 + CDB_SIZE;
/// sense_len, residual, status qualifier, status, response, then the sense.
const RESP_HEADER: usize = 4 + 4 + 2 + 1 + 1 + SENSE_SIZE;

/// Response codes (virtio 1.2, 5.6.6.1).
const S_OK: u8 = 0;
const S_BAD_TARGET: u8 = 3;
const S_FAILURE: u8 = 9;
/// SAM status codes.
const SAM_GOOD: u8 = 0x00;
const SAM_CHECK_CONDITION: u8 = 0x02;
/// Control request types.
const T_TMF: u32 = 0;
const T_AN_QUERY: u32 = 1;
const T_AN_SUBSCRIBE: u32 = 2;

const CONTROL_QUEUE: u16 = 0;
const REQUEST_QUEUE: u16 = 2;

/// The logical units, shared with the VMM for host-side media changes.
pub type Targets = Arc<Vec<Arc<Mutex<Lun>>>>;

/// Serves the request and control queues.
pub struct ScsiRequestHandler {
    targets: Targets,
    counters: Arc<DeviceCounters>,
}

impl ScsiRequestHandler {
    /// A handler for `targets`.
    pub fn new(targets: Targets, counters: Arc<DeviceCounters>) -> Self {
        Self { targets, counters }
    }

    /// Executes one command request; returns the bytes written into the chain.
    pub fn handle_request(&self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let chain = match GuestChain::parse(chain, mem) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("virtio-scsi: bad request: {e}");
                self.counters.error();
                return 0;
            }
        };
        if chain.readable_len() < REQ_HEADER || chain.writable_len() < RESP_HEADER {
            self.counters.error();
            return 0;
        }
        let mut req = [0u8; REQ_HEADER];
        if chain.read(mem, 0, &mut req).is_err() {
            self.counters.error();
            return 0;
        }
        let mut resp = [0u8; RESP_HEADER];
        let Some(lun) = self.lun(&req[..8]) else {
            resp[11] = S_BAD_TARGET;
            return if chain.write(mem, 0, &resp).is_ok() { RESP_HEADER as u32 } else { 0 };
        };
        let cdb = &req[19..19 + CDB_SIZE];
        let out_len = chain.readable_len() - REQ_HEADER;
        let in_len = chain.writable_len() - RESP_HEADER;
        let (Ok(out_slices), Ok(in_slices)) =
            (chain.readable_slices(mem, REQ_HEADER, out_len), chain.writable_slices(mem, RESP_HEADER, in_len))
        else {
            self.counters.error();
            resp[11] = S_FAILURE;
            return if chain.write(mem, 0, &resp).is_ok() { RESP_HEADER as u32 } else { 0 };
        };
        // SAFETY: the slices are checked guest memory, used only for this command.
        let data_out: Vec<&[u8]> = out_slices.iter().map(|s| unsafe { as_bytes(s) }).collect();
        // SAFETY: as above.
        let mut data_in: Vec<&mut [u8]> = in_slices.iter().map(|s| unsafe { as_mut_bytes(s) }).collect();
        let done = match lun.lock() {
            Ok(mut l) => l.execute(cdb, &data_out, &mut data_in),
            Err(_) => {
                resp[11] = S_FAILURE;
                return if chain.write(mem, 0, &resp).is_ok() { RESP_HEADER as u32 } else { 0 };
            }
        };
        resp[4..8].copy_from_slice(&((in_len - done.data_in_len) as u32).to_le_bytes());
        match done.status {
            Status::Good => {
                resp[10] = SAM_GOOD;
                self.counters.request(done.data_in_len as u64, out_len as u64);
            }
            Status::CheckCondition(sense) => {
                let s = sense.fixed();
                resp[0..4].copy_from_slice(&(s.len() as u32).to_le_bytes());
                resp[10] = SAM_CHECK_CONDITION;
                resp[12..12 + s.len()].copy_from_slice(&s);
            }
        }
        resp[11] = S_OK;
        if chain.write(mem, 0, &resp).is_err() {
            return 0;
        }
        (RESP_HEADER + done.data_in_len) as u32
    }

    /// Answers one control request: task management functions complete at
    /// once (commands never wait), no asynchronous events are offered.
    pub fn handle_control(&self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let Ok(chain) = GuestChain::parse(chain, mem) else { return 0 };
        let mut kind = [0u8; 4];
        if chain.read(mem, 0, &mut kind).is_err() {
            return 0;
        }
        let (reply, len): ([u8; 5], usize) = match u32::from_le_bytes(kind) {
            // TMF: response byte FUNCTION_COMPLETE (0).
            T_TMF => ([S_OK, 0, 0, 0, 0], 1),
            // AN query/subscribe: event_actual 0, response OK.
            T_AN_QUERY | T_AN_SUBSCRIBE => ([0, 0, 0, 0, S_OK], 5),
            _ => ([S_FAILURE, 0, 0, 0, 0], 1),
        };
        if chain.writable_len() < len || chain.write(mem, 0, &reply[..len]).is_err() {
            return 0;
        }
        len as u32
    }

    /// The unit a request's 8-byte LUN field names: byte 0 is 1, byte 1 the
    /// target, bytes 2-3 the LUN in the flat space (0x4000 | lun); only LUN 0.
    fn lun(&self, addr: &[u8]) -> Option<&Arc<Mutex<Lun>>> {
        let lun = u16::from_be_bytes([addr[2], addr[3]]) & 0x3fff;
        if addr[0] != 1 || lun != 0 {
            return None;
        }
        self.targets.get(usize::from(addr[1]))
    }
}

/// A virtio-scsi controller.
pub struct VirtioScsi {
    handler: Arc<ScsiRequestHandler>,
    config: Vec<u8>,
    worker: Option<Worker>,
    event_queue: Option<QueueHandle>,
    name: String,
}

impl VirtioScsi {
    /// A controller with `luns` as targets 0, 1, ... (at most [`MAX_TARGETS`]).
    pub fn new(name: impl Into<String>, luns: Vec<Lun>) -> Result<Self, String> {
        if luns.len() > MAX_TARGETS {
            return Err(format!("at most {MAX_TARGETS} SCSI units"));
        }
        let targets: Targets = Arc::new(luns.into_iter().map(|l| Arc::new(Mutex::new(l))).collect());
        let mut c = vec![0u8; 36];
        let field = |c: &mut Vec<u8>, at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        field(&mut c, 0, 1); // num_queues (request queues)
        field(&mut c, 4, u32::from(QUEUE_SIZE) - 2); // seg_max
        field(&mut c, 8, (rvirt_scsi::MAX_TRANSFER_BYTES / 512) as u32); // max_sectors
        field(&mut c, 12, u32::from(QUEUE_SIZE)); // cmd_per_lun
        field(&mut c, 16, 16); // event_info_size
        field(&mut c, 20, SENSE_SIZE as u32);
        field(&mut c, 24, CDB_SIZE as u32);
        c[30..32].copy_from_slice(&(MAX_TARGETS as u16 - 1).to_le_bytes()); // max_target
        field(&mut c, 32, 0); // max_lun
        Ok(Self {
            handler: Arc::new(ScsiRequestHandler::new(targets, Arc::new(DeviceCounters::default()))),
            config: c,
            worker: None,
            event_queue: None,
            name: name.into(),
        })
    }

    /// The units, for host-side eject and insert.
    pub fn targets(&self) -> Targets {
        self.handler.targets.clone()
    }
}

impl VirtioDevice for VirtioScsi {
    fn device_type(&self) -> u32 {
        device_type::SCSI
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES
    }
    fn config_len(&self) -> usize {
        self.config.len()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), String> {
        let ActivateContext { mem, interrupt, mut queues, .. } = ctx;
        if queues.len() != 3 {
            return Err("virtio-scsi needs its control, event and request queues".into());
        }
        let request = queues.pop().ok_or("no request queue")?;
        let event = queues.pop();
        let control = queues.pop().ok_or("no control queue")?;
        let handler = self.handler.clone();
        // The event queue is not served (no events are sent): kept, with its buffers, until reset.
        self.event_queue = event;
        let worker = spawn_queues(&format!("{}-io", self.name), vec![(CONTROL_QUEUE, control), (REQUEST_QUEUE, request)], mem, interrupt, move |index, chain, mem| {
            if index == CONTROL_QUEUE {
                handler.handle_control(chain, mem)
            } else {
                handler.handle_request(chain, mem)
            }
        })
        .map_err(|e| e.to_string())?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.event_queue = None;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.handler.counters.clone()
    }
}
