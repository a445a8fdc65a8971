//! What the host and rvirt are, as libvirt's clients ask: node info, the
//! capabilities and domain capabilities XML (what virt-install reads to
//! choose a machine), versions, the host name.

use rvirt_libvirt_rpc::Encoder;

/// The hypervisor type clients key on: rvirt runs QEMU/KVM-style domains.
pub const HV_TYPE: &str = "QEMU";
/// The libvirt API level rvirtd's protocol speaks (libvirt 9.0.0, Debian 12's).
pub const LIB_VERSION: u64 = 9_000_000;
/// The URI a connection reports.
pub const URI: &str = "qemu:///system";
/// Most vCPUs a domain may have (rvirt-vmm's limit).
pub const MAX_VCPUS: i32 = 254;
/// Where the VMM binary is said to be (the `<emulator>` capabilities report).
pub const EMULATOR: &str = "/usr/bin/rvirt-vmm";

/// rvirt's own version as libvirt numbers versions (major * 1,000,000 +
/// minor * 1,000 + micro): the hypervisor version.
pub fn hv_version() -> u64 {
    let mut parts = env!("CARGO_PKG_VERSION").split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (a, b, c) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    a * 1_000_000 + b * 1_000 + c
}

/// The host's name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into a buffer we own.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "localhost".into();
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The host's CPUs, memory and CPU model, read from /proc.
pub struct Node {
    /// CPU model name.
    pub model: String,
    /// Memory in KiB.
    pub memory_kib: u64,
    /// Online CPUs.
    pub cpus: i32,
    /// Clock in MHz.
    pub mhz: i32,
}

/// The host's CPUs for `virNodeGetCPUMap`: (bitmap of online CPUs, how
/// many are online, how many exist), from /sys/devices/system/cpu.
pub fn cpu_map() -> (Vec<u8>, u32, i32) {
    let ids = |file: &str| -> Vec<usize> {
        let text = std::fs::read_to_string(format!("/sys/devices/system/cpu/{file}")).unwrap_or_default();
        rvirt_domain::CpuSet::parse(text.trim()).map(|s| s.cpus).unwrap_or_default()
    };
    let online = ids("online");
    let present = ids("present").iter().max().map_or(online.len(), |m| m + 1).max(1);
    let mut map = vec![0u8; present.div_ceil(8)];
    for cpu in online.iter().filter(|c| **c < present) {
        map[cpu / 8] |= 1 << (cpu % 8);
    }
    (map, online.len() as u32, present as i32)
}

impl Node {
    /// Reads /proc/cpuinfo and /proc/meminfo (zeros where they say nothing).
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| cpuinfo.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        Self {
            model: field("model name").unwrap_or_else(|| "x86_64".into()),
            memory_kib,
            cpus: cpuinfo.lines().filter(|l| l.starts_with("processor")).count().max(1) as i32,
            mhz: field("cpu MHz").and_then(|m| m.parse::<f64>().ok()).map_or(0, |m| m as i32),
        }
    }

    /// `remote_node_get_info_ret`: `char model[32]` (each char a 4-byte
    /// XDR unit, NUL-terminated), memory, CPUs, MHz, and one NUMA node,
    /// socket and thread per core.
    pub fn encode(&self, e: &mut Encoder) {
        let mut model = [0u8; 32];
        let n = self.model.len().min(31);
        model[..n].copy_from_slice(&self.model.as_bytes()[..n]);
        for b in model {
            e.i32(i32::from(b as i8));
        }
        e.u64(self.memory_kib).i32(self.cpus).i32(self.mhz).i32(1).i32(1).i32(self.cpus).i32(1);
    }
}

/// The capabilities XML: the host and the one guest kind rvirt runs
/// (x86_64 hvm under KVM, machine `pc`). No host CPU model is named: rvirt
/// gives guests the host's CPU (host-passthrough), not a named model.
pub fn capabilities(node: &Node) -> String {
    format!(
        "<capabilities>\n\
  <host>\n\
    <cpu>\n\
      <arch>x86_64</arch>\n\
      <topology sockets='1' dies='1' cores='{cpus}' threads='1'/>\n\
    </cpu>\n\
    <power_management/>\n\
    <iommu support='no'/>\n\
    <migration_features/>\n\
    <topology>\n\
      <cells num='1'>\n\
        <cell id='0'>\n\
          <memory unit='KiB'>{mem}</memory>\n\
          <cpus num='{cpus}'/>\n\
        </cell>\n\
      </cells>\n\
    </topology>\n\
  </host>\n\
  <guest>\n\
    <os_type>hvm</os_type>\n\
    <arch name='x86_64'>\n\
      <wordsize>64</wordsize>\n\
      <emulator>{EMULATOR}</emulator>\n\
      <machine maxCpus='{MAX_VCPUS}'>pc</machine>\n\
      <domain type='kvm'/>\n\
    </arch>\n\
    <features>\n\
      <acpi default='on' toggle='no'/>\n\
      <apic default='on' toggle='no'/>\n\
    </features>\n\
  </guest>\n\
</capabilities>\n",
        cpus = node.cpus,
        mem = node.memory_kib,
    )
}

/// The domain capabilities XML for x86_64 KVM domains: firmware (SeaBIOS,
/// no UEFI yet), the disk buses and devices rvirt has.
pub fn domain_capabilities() -> String {
    format!(
        "<domainCapabilities>\n\
  <path>{EMULATOR}</path>\n\
  <domain>kvm</domain>\n\
  <machine>pc</machine>\n\
  <arch>x86_64</arch>\n\
  <vcpu max='{MAX_VCPUS}'/>\n\
  <iothreads supported='no'/>\n\
  <os supported='yes'>\n\
    <enum name='firmware'>\n\
      <value>bios</value>\n\
    </enum>\n\
    <loader supported='yes'>\n\
      <value>{fw}</value>\n\
      <enum name='type'>\n\
        <value>rom</value>\n\
      </enum>\n\
      <enum name='readonly'>\n\
        <value>yes</value>\n\
      </enum>\n\
      <enum name='secure'>\n\
        <value>no</value>\n\
      </enum>\n\
    </loader>\n\
  </os>\n\
  <cpu>\n\
    <mode name='host-passthrough' supported='yes'/>\n\
    <mode name='host-model' supported='no'/>\n\
    <mode name='custom' supported='no'/>\n\
  </cpu>\n\
  <devices>\n\
    <disk supported='yes'>\n\
      <enum name='diskDevice'>\n\
        <value>disk</value>\n\
        <value>cdrom</value>\n\
      </enum>\n\
      <enum name='bus'>\n\
        <value>virtio</value>\n\
        <value>scsi</value>\n\
      </enum>\n\
      <enum name='model'>\n\
        <value>virtio</value>\n\
      </enum>\n\
    </disk>\n\
    <graphics supported='no'/>\n\
    <video supported='no'/>\n\
    <hostdev supported='no'/>\n\
    <rng supported='yes'>\n\
      <enum name='model'>\n\
        <value>virtio</value>\n\
      </enum>\n\
      <enum name='backendModel'>\n\
        <value>random</value>\n\
      </enum>\n\
    </rng>\n\
  </devices>\n\
  <features>\n\
    <gic supported='no'/>\n\
    <vmcoreinfo supported='no'/>\n\
    <genid supported='no'/>\n\
    <sev supported='no'/>\n\
  </features>\n\
</domainCapabilities>\n",
        fw = rvirt_api::DEFAULT_FIRMWARE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_info_lays_the_model_out_as_32_xdr_chars() {
        let n = Node { model: "AMD EPYC".into(), memory_kib: 1 << 20, cpus: 2, mhz: 2600 };
        let mut e = Encoder::new();
        n.encode(&mut e);
        let b = e.into_bytes();
        assert_eq!(b.len(), 32 * 4 + 8 + 6 * 4);
        assert_eq!(&b[..8], &[0, 0, 0, b'A', 0, 0, 0, b'M']);
        assert_eq!(&b[128..136], &(1u64 << 20).to_be_bytes());
        assert!(Node::read().cpus >= 1);
        assert!(hv_version() < 100_000_000);
    }
}
