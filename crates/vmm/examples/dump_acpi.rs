//! Writes the ACPI tables rvirt-vmm gives a guest to files, for inspection
//! with ACPICA's disassembler:
//!
//! ```sh
//! cargo run -p rvirt-vmm --example dump_acpi -- /tmp/acpi 2
//! iasl -d /tmp/acpi/DSDT.aml && less /tmp/acpi/DSDT.dsl
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| ".".into()));
    let vcpus: u8 = match args.next().map(|s| s.parse()) {
        None => 1,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: dump_acpi [DIR] [VCPUS 1-254]");
            return ExitCode::from(2);
        }
    };
    let result = rvirt_vmm::acpi::build(vcpus, &[0], &rvirt_vmm::acpi::AcpiLayout::direct()).map_err(|e| e.to_string()).and_then(|tables| {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for (addr, bytes) in &tables.blobs {
            let sig: String = bytes[..4].iter().map(|&b| b as char).filter(|c| c.is_ascii_alphanumeric()).collect();
            let path = dir.join(format!("{sig}.aml"));
            std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("{sig:5} at {addr:#x}, {} bytes -> {}", bytes.len(), path.display());
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dump_acpi: {e}");
            ExitCode::from(1)
        }
    }
}
