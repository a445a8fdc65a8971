//! The PCI host bridge as the guest's ACPI tables describe it: a `PNP0A08`
//! device with its resource windows, interrupt routing (`_PRT`) and one
//! child per populated slot, plus the MCFG table pointing at ECAM.

use acpi_tables::{aml, Aml};

use crate::SLOTS;

/// The GSI INTx pin `pin` (0 = INTA#) of `slot` is wired to: the usual
/// swizzle over IOAPIC inputs 16-23, which no legacy device uses.
pub fn intx_gsi(slot: usize, pin: usize) -> u32 {
    16 + ((slot + pin) % 8) as u32
}

/// Where the bridge decodes: its BAR windows.
pub struct HostBridgeResources {
    /// The 32-bit MMIO windows, as (first address, last address).
    pub mmio_windows: Vec<(u32, u32)>,
}

/// AML for `\_SB_.PCI0` with children for `slots`.
pub fn host_bridge_aml(res: &HostBridgeResources, slots: &[usize]) -> Vec<u8> {
    let bus = aml::AddressSpace::<u16>::new_bus_number(0, 0);
    let cfg_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::<u16>::new_io(0x0000, 0x0cf7, None);
    let io_high = aml::AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio: Vec<aml::AddressSpace<u32>> = res
        .mmio_windows
        .iter()
        .map(|&(start, end)| aml::AddressSpace::<u32>::new_memory(aml::AddressSpaceCacheable::NotCacheable, true, start, end, None))
        .collect();
    let mut resources: Vec<&dyn Aml> = vec![&bus, &cfg_ports, &io_low, &io_high];
    resources.extend(mmio.iter().map(|m| m as &dyn Aml));
    let crs = aml::ResourceTemplate::new(resources);

    let mut prt_values: Vec<(u32, u32, u32)> = Vec::new();
    for slot in 1..SLOTS {
        for pin in 0..4 {
            prt_values.push((((slot as u32) << 16) | 0xffff, pin as u32, intx_gsi(slot, pin)));
        }
    }
    let entries: Vec<aml::Package> = prt_values
        .iter()
        .map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &aml::ZERO, gsi]))
        .collect();
    let prt = aml::Package::new(entries.iter().map(|p| p as &dyn Aml).collect());

    let adrs: Vec<(String, u32)> = slots.iter().filter(|s| **s > 0).map(|s| (format!("S{s:03X}"), (*s as u32) << 16)).collect();
    let adr_names: Vec<aml::Name> = adrs.iter().map(|(_, a)| aml::Name::new("_ADR".into(), a)).collect();
    let children: Vec<aml::Device> = adrs
        .iter()
        .zip(&adr_names)
        .map(|((n, _), adr)| aml::Device::new(n.as_str().into(), vec![adr as &dyn Aml]))
        .collect();

    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let prt = aml::Name::new("_PRT".into(), &prt);
    let mut body: Vec<&dyn Aml> = vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt];
    body.extend(children.iter().map(|c| c as &dyn Aml));
    let mut v = Vec::new();
    aml::Device::new("_SB_.PCI0".into(), body).to_aml_bytes(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swizzle_stays_on_pci_gsis() {
        assert_eq!(intx_gsi(1, 0), 17);
        assert_eq!(intx_gsi(7, 1), 16);
        assert!((0..SLOTS).all(|s| (16..24).contains(&intx_gsi(s, 3))));
    }

    #[test]
    fn aml_names_the_bridge_and_each_slot() {
        let v = host_bridge_aml(&HostBridgeResources { mmio_windows: vec![(0xc000_0000, 0xdfff_ffff)] }, &[0, 1, 2]);
        for needle in [&b"PCI0"[..], b"_PRT", b"_CRS", b"S001", b"S002", b"_BBN"] {
            assert!(v.windows(needle.len()).any(|w| w == needle), "{:?}", std::str::from_utf8(needle));
        }
        assert!(!v.windows(4).any(|w| w == b"S000"), "the host bridge is not a child");
    }
}
