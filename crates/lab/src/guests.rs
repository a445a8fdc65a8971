//! Hand-made guests for tests on the host's own `/dev/kvm`: a few bytes of
//! 64-bit code in a minimal bzImage, started in long mode at the 64-bit
//! entry point exactly as a real kernel is. They print on COM1, halt, power
//! off, reset or crash on purpose, so VMM and daemon tests can drive a real
//! KVM guest through a whole lifecycle without the nested lab.

/// A minimal bzImage (boot protocol 2.15, 64-bit entry) whose protected-mode
/// part is `code` at the 64-bit entry (+0x200).
pub fn bzimage_with(code: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 1024 + 0x200];
    img[0x1f1] = 1; // one setup sector
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    img.extend_from_slice(code);
    img.resize(img.len() + 4096, 0xf4);
    img
}

/// `out dx, al` for each byte of `text` to COM1.
pub fn print(text: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in text {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    c
}

/// `out port, value`.
pub fn out_byte(port: u16, value: u8) -> Vec<u8> {
    let p = port.to_le_bytes();
    vec![0x66, 0xba, p[0], p[1], 0xb0, value, 0xee] // mov dx, port; mov al, value; out dx, al
}

/// `hlt` in a loop: the guest idles until stopped.
pub const HALT_FOREVER: [u8; 3] = [0xf4, 0xeb, 0xfd];

/// ACPI S5 through the PM1 control register: the guest powers off.
pub fn power_off() -> Vec<u8> {
    out_byte(0x600, (5 << 2) | (1 << 5)) // SLP_TYP=S5 | SLP_EN
}

/// `ud2` with no IDT: #UD, #DF, triple fault.
pub const TRIPLE_FAULT: [u8; 2] = [0x0f, 0x0b];

/// Prints `byte` on COM1 for ever, with a short busy wait between bytes
/// (for console tests: output keeps coming whenever a client attaches).
pub fn print_forever(byte: u8) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03, 0xb0, byte]; // mov dx, 0x3f8; mov al, byte
    // top: out dx, al; mov ecx, 0x400000; spin: dec ecx; jnz spin; jmp top
    c.extend_from_slice(&[0xee, 0xb9, 0x00, 0x00, 0x40, 0x00, 0xff, 0xc9, 0x75, 0xfc, 0xeb, 0xf4]);
    c
}
