//! Global descriptor table entries for the first guest instruction.
//!
//! KVM needs both the packed 8-byte descriptors (written into guest memory,
//! where the kernel may reload them) and the unpacked `kvm_segment` form
//! (loaded into the vCPU's hidden segment registers). Both come from here so
//! they cannot disagree.

use kvm_bindings::kvm_segment;

/// Packs a segment descriptor from its flags (access byte in bits 0..8,
/// flags nibble in bits 12..16), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// 64-bit kernel code segment (long mode, present, DPL 0, execute/read).
pub const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// 32-bit flat code segment used by the PVH entry.
pub const CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
/// Flat read/write data segment.
pub const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// A busy 32/64-bit TSS; KVM requires a valid TR even though the guest replaces it.
pub const TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);

/// Unpacks descriptor `entry` at GDT index `index` into the form `KVM_SET_SREGS` takes.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = (((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)) as u64;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_unpacks_to_a_long_mode_segment() {
        let s = kvm_segment_from_gdt(CODE64, 1);
        assert_eq!(s.selector, 8);
        assert_eq!((s.l, s.db, s.present, s.s, s.type_, s.g), (1, 0, 1, 1, 0xb, 1));
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.base, 0);
    }

    #[test]
    fn code32_and_data_are_flat_4g() {
        let c = kvm_segment_from_gdt(CODE32, 1);
        assert_eq!((c.l, c.db, c.limit), (0, 1, 0xffff_ffff));
        let d = kvm_segment_from_gdt(DATA, 2);
        assert_eq!((d.type_, d.db, d.selector, d.limit), (3, 1, 16, 0xffff_ffff));
    }

    #[test]
    fn known_encodings() {
        // The classic values every x86 boot loader uses.
        assert_eq!(CODE64, 0x00af_9b00_0000_ffff);
        assert_eq!(DATA, 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0x1234_5678, 0x67) >> 56, 0x12);
        assert_eq!(kvm_segment_from_gdt(gdt_entry(0x808b, 0x1234_5678, 0x67), 3).base, 0x1234_5678);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }
}
