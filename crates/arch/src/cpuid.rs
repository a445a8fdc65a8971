//! CPUID as the guest sees it.
//!
//! Starts from what KVM supports on this host (`KVM_GET_SUPPORTED_CPUID`) and
//! adjusts the leaves that describe the *machine* rather than the CPU model:
//! the APIC ID and topology for the vCPU count, the hypervisor bit and the KVM
//! signature that makes Linux use kvmclock and paravirtual features.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: the HTT bit, meaning EBX[23:16] holds a logical CPU count.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX: the local APIC timer has a TSC-deadline mode.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 6 EAX: the local APIC timer keeps running in deep C-states (ARAT).
const LEAF6_EAX_ARAT: u32 = 1 << 2;
/// 0x8000_0001 ECX: AMD topology extensions (leaf 0x8000_001e), which we do not describe.
const EXT1_ECX_TOPOEXT: u32 = 1 << 22;
/// The KVM paravirtual signature leaf.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// The KVM paravirtual features leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// kvmclock feature bits (KVM_FEATURE_CLOCKSOURCE and CLOCKSOURCE2).
pub const KVM_FEATURE_CLOCKSOURCE_BITS: u32 = (1 << 0) | (1 << 3);

/// The smallest `n` with `1 << n >= count`: how many APIC-ID bits a level needs.
pub fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// What the host's KVM can do that `KVM_GET_SUPPORTED_CPUID` does not say,
/// because it depends on a capability rather than on the CPU.
#[derive(Clone, Copy, Debug, Default)]
pub struct KvmCaps {
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: the in-kernel local APIC emulates the
    /// TSC-deadline timer mode, which Linux then prefers over the one-shot
    /// count-down mode (one MSR write per timer instead of two register writes).
    pub tsc_deadline_timer: bool,
}

/// Rewrites `entries` (one vCPU's copy of the supported CPUID) for vCPU
/// `cpu_id` of `cpu_count`, presented as one socket with `cpu_count` cores
/// of one thread each.
pub fn filter_entries(entries: &mut [kvm_cpuid_entry2], cpu_id: u8, cpu_count: u8, caps: KvmCaps) {
    let count = u32::from(cpu_count.max(1));
    let apic_id = u32::from(cpu_id);
    let core_bits = id_bits(count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX[31:24] initial APIC ID, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if caps.tsc_deadline_timer {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Deterministic cache parameters: cores per package - 1 in EAX[31:26];
                // threads sharing a cache level - 1 in EAX[25:14] (one per core for
                // L1/L2, the whole package for L3).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            0x6 => {
                // No power-management features we could emulate, but the
                // emulated APIC timer never stops: without ARAT Linux marks it
                // as stopping in deep C-states.
                e.eax &= LEAF6_EAX_ARAT;
                e.ecx &= !(1 << 3); // energy-performance bias
            }
            0xa => {
                // No architectural PMU is exposed.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread), level 1 = core.
                let (shift, logical, level_type) = match e.index {
                    0 => (0, 1, 1),
                    1 => (core_bits, count, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = logical;
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            KVM_CPUID_SIGNATURE => {
                // "KVMKVMKVM\0\0\0" and the highest KVM leaf.
                e.eax = KVM_CPUID_FEATURES;
                e.ebx = u32::from_le_bytes(*b"KVMK");
                e.ecx = u32::from_le_bytes(*b"VMKV");
                e.edx = u32::from_le_bytes(*b"M\0\0\0");
            }
            0x8000_0001 => e.ecx &= !EXT1_ECX_TOPOEXT,
            0x8000_0008 => {
                // AMD: ECX[15:12] APIC ID bits for cores, ECX[7:0] cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            _ => {}
        }
    }
}

/// Applies [`filter_entries`] to a KVM CPUID set.
pub fn filter_cpuid(cpuid: &mut CpuId, cpu_id: u8, cpu_count: u8, caps: KvmCaps) {
    filter_entries(cpuid.as_mut_slice(), cpu_id, cpu_count, caps);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ebx: 0x0000_0800, edx: 0, ..Default::default() }
    }

    fn find(entries: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *entries.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn id_bits_rounds_up_to_a_power_of_two() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn leaf1_has_apic_id_count_and_hypervisor_bit() {
        let mut e = vec![entry(1, 0)];
        filter_entries(&mut e, 3, 4, KvmCaps::default());
        let l = find(&e, 1, 0);
        assert_eq!(l.ebx >> 24, 3);
        assert_eq!((l.ebx >> 16) & 0xff, 4);
        assert_eq!(l.ebx & 0xffff, 0x0800, "CLFLUSH size is kept");
        assert_ne!(l.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn tsc_deadline_follows_the_capability() {
        let mut e = vec![entry(1, 0)];
        filter_entries(&mut e, 0, 1, KvmCaps { tsc_deadline_timer: true });
        assert_ne!(e[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        filter_entries(&mut e, 0, 1, KvmCaps::default());
        assert_eq!(e[0].ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn power_leaf_keeps_only_arat() {
        let mut e = vec![kvm_cpuid_entry2 { function: 6, eax: 0xffff_ffff, ecx: 0xf, ..Default::default() }];
        filter_entries(&mut e, 0, 1, KvmCaps::default());
        assert_eq!(e[0].eax, LEAF6_EAX_ARAT);
        assert_eq!(e[0].ecx, 0x7);
    }

    #[test]
    fn single_cpu_clears_htt() {
        let mut e = vec![kvm_cpuid_entry2 { function: 1, edx: LEAF1_EDX_HTT, ..Default::default() }];
        filter_entries(&mut e, 0, 1, KvmCaps::default());
        assert_eq!(e[0].edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_describes_cores() {
        let mut e = vec![entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        filter_entries(&mut e, 2, 3, KvmCaps::default());
        let smt = find(&e, 0xb, 0);
        let core = find(&e, 0xb, 1);
        let end = find(&e, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.ecx & 0xff, core.edx), (2, 3, 2, 1, 2));
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
    }

    #[test]
    fn kvm_signature_is_set() {
        let mut e = vec![entry(KVM_CPUID_SIGNATURE, 0)];
        filter_entries(&mut e, 0, 1, KvmCaps::default());
        let mut sig = Vec::new();
        for r in [e[0].ebx, e[0].ecx, e[0].edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert_eq!(e[0].eax, KVM_CPUID_FEATURES);
    }

    #[test]
    fn amd_core_count_and_no_topoext() {
        let mut e = vec![
            kvm_cpuid_entry2 { function: 0x8000_0001, ecx: EXT1_ECX_TOPOEXT | 1, ..Default::default() },
            kvm_cpuid_entry2 { function: 0x8000_0008, ecx: 0xffff_ffff, ..Default::default() },
        ];
        filter_entries(&mut e, 0, 2, KvmCaps::default());
        assert_eq!(e[0].ecx, 1);
        assert_eq!(e[1].ecx & 0xff, 1);
        assert_eq!((e[1].ecx >> 12) & 0xf, 1);
        assert_eq!(e[1].ecx & 0xffff_0f00, 0xffff_0f00, "other bits are kept");
    }

    #[test]
    fn cache_leaf_reports_core_count() {
        let mut e = vec![
            kvm_cpuid_entry2 { function: 4, index: 0, eax: (1 << 5) | 0x1, ..Default::default() },
            kvm_cpuid_entry2 { function: 4, index: 3, eax: (3 << 5) | 0x3, ..Default::default() },
        ];
        filter_entries(&mut e, 0, 4, KvmCaps::default());
        assert_eq!(e[0].eax >> 26, 3);
        assert_eq!((e[0].eax >> 14) & 0xfff, 0);
        assert_eq!((e[1].eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn filter_cpuid_works_on_the_fam_wrapper() {
        let mut c = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        filter_cpuid(&mut c, 1, 2, KvmCaps::default());
        assert_eq!(c.as_slice()[0].ebx >> 24, 1);
    }
}
