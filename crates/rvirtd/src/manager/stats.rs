//! `domstats`: a domain's figures by group, with libvirt's field names and
//! numbers, for every front end (virsh's `CONNECT_GET_ALL_DOMAIN_STATS`,
//! `rvirt domstats`).

use rvirt_domain::protocol::{DomainState, StatGroups, StatValue};

use super::{DomainBrief, Manager};

/// libvirt's state and reason numbers for a domain (`virDomainState` and
/// its reasons), as `domstate` over libvirt's protocol and `domstats` give them.
pub fn state_numbers(b: &DomainBrief) -> (i32, i32) {
    use rvirt_libvirt_rpc::remote::state::{CRASHED, PAUSED, RUNNING, SHUTOFF};
    match b.state {
        DomainState::Running => (
            RUNNING,
            match b.reason.as_str() {
                "restored" => 3,
                "from snapshot" => 4,
                "unpaused" => 5,
                _ => 1,
            },
        ),
        DomainState::Paused => (
            PAUSED,
            match b.reason.as_str() {
                "from snapshot" => 7,
                "restored" => 0,
                _ => 1,
            },
        ),
        DomainState::Crashed => (CRASHED, 1),
        DomainState::ShutOff => (
            SHUTOFF,
            match b.reason.as_str() {
                "shutdown" => 1,
                "destroyed" => 2,
                "crashed" => 3,
                "saved" => 5,
                "failed" => 6,
                "from snapshot" => 7,
                _ => 0,
            },
        ),
    }
}

impl Manager {
    /// The figures of domain `b` in `groups` ([`StatGroups`] bits); counters
    /// only while it runs (what a stopped domain lacks is left out, as
    /// libvirt does). The balloon's guest figures are the latest the driver
    /// posted: no waiting for fresh ones here, where many domains are read.
    pub fn domain_stats(&self, b: &DomainBrief, groups: u32) -> Vec<(String, StatValue)> {
        let mut out = Vec::new();
        let mut put = |f: String, v: StatValue| out.push((f, v));
        if groups & StatGroups::STATE != 0 {
            let (st, reason) = state_numbers(b);
            put("state.state".into(), StatValue::Int(st));
            put("state.reason".into(), StatValue::Int(reason));
        }
        if b.id.is_none() {
            return out;
        }
        let Ok(info) = self.info(&b.name) else { return out };
        if groups & StatGroups::CPU_TOTAL != 0 {
            if let Some(s) = info.cpu_time_seconds {
                put("cpu.time".into(), StatValue::ULLong((s * 1e9) as u64));
            }
        }
        if groups & StatGroups::BALLOON != 0 {
            put("balloon.current".into(), StatValue::ULLong(info.used_memory_kib));
            put("balloon.maximum".into(), StatValue::ULLong(info.max_memory_kib));
            for (name, v) in self.memory_stats_now(&b.name).unwrap_or_default() {
                // libvirt's names in this group; `actual` is balloon.current already.
                let field = match name.as_str() {
                    "actual" => continue,
                    "last_update" => "last-update".to_string(),
                    n => n.to_string(),
                };
                put(format!("balloon.{field}"), StatValue::ULLong(v));
            }
        }
        if groups & StatGroups::VCPU != 0 {
            put("vcpu.current".into(), StatValue::UInt(info.vcpus));
            put("vcpu.maximum".into(), StatValue::UInt(info.vcpus));
            for t in self.vcpu_threads(&b.name).unwrap_or_default() {
                // libvirt's VIR_VCPU_RUNNING: the thread exists and the vCPU is online.
                put(format!("vcpu.{}.state", t.vcpu), StatValue::Int(1));
                put(format!("vcpu.{}.time", t.vcpu), StatValue::ULLong((t.cpu_seconds * 1e9) as u64));
            }
        }
        let Ok((disks, taps)) = self.devices(&b.name) else { return out };
        if groups & StatGroups::INTERFACE != 0 {
            put("net.count".into(), StatValue::UInt(taps.len() as u32));
            for (i, tap) in taps.iter().enumerate() {
                put(format!("net.{i}.name"), StatValue::Str(tap.clone()));
                if let Ok(c) = self.device_stats(&b.name, tap) {
                    put(format!("net.{i}.rx.bytes"), StatValue::ULLong(c.bytes_to_guest));
                    put(format!("net.{i}.rx.pkts"), StatValue::ULLong(c.reads));
                    put(format!("net.{i}.tx.bytes"), StatValue::ULLong(c.bytes_from_guest));
                    put(format!("net.{i}.tx.pkts"), StatValue::ULLong(c.writes));
                    put(format!("net.{i}.tx.errs"), StatValue::ULLong(c.errors));
                }
            }
        }
        if groups & StatGroups::BLOCK != 0 {
            put("block.count".into(), StatValue::UInt(disks.len() as u32));
            for (i, (target, path, counted)) in disks.iter().enumerate() {
                put(format!("block.{i}.name"), StatValue::Str(target.clone()));
                if !path.is_empty() {
                    put(format!("block.{i}.path"), StatValue::Str(path.clone()));
                }
                if let (true, Ok(c)) = (*counted, self.device_stats(&b.name, target)) {
                    put(format!("block.{i}.rd.reqs"), StatValue::ULLong(c.reads));
                    put(format!("block.{i}.rd.bytes"), StatValue::ULLong(c.bytes_to_guest));
                    put(format!("block.{i}.wr.reqs"), StatValue::ULLong(c.writes));
                    put(format!("block.{i}.wr.bytes"), StatValue::ULLong(c.bytes_from_guest));
                    put(format!("block.{i}.errors"), StatValue::ULLong(c.errors));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_reasons_get_libvirt_s_numbers() {
        let b = |state, reason: &str| DomainBrief { name: "d".into(), uuid: [1; 16], id: None, state, reason: reason.into(), persistent: true, autostart: false, managed_save: false, has_snapshots: false };
        assert_eq!(state_numbers(&b(DomainState::ShutOff, "destroyed")), (5, 2));
        assert_eq!(state_numbers(&b(DomainState::ShutOff, "shutdown")), (5, 1));
        assert_eq!(state_numbers(&b(DomainState::Paused, "user")), (3, 1));
        assert_eq!(state_numbers(&b(DomainState::Running, "unpaused")), (1, 5));
    }
}
