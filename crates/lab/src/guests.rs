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

/// `mov dx, port` in 64-bit code (the operand-size prefix selects DX).
fn mov_dx(port: u16) -> [u8; 4] {
    let p = port.to_le_bytes();
    [0x66, 0xba, p[0], p[1]]
}

/// `mov al, b; out dx, al` for each byte of `bytes`: the same encoding in
/// 64-bit and in 16-bit code.
fn out_each(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().flat_map(|b| [0xb0, *b, 0xee]).collect()
}

/// COM1's data port.
const COM1: u16 = 0x3f8;
/// The PM1 control register (rvirt's sleep-control register).
const PM1_CONTROL: u16 = 0x600;
/// SLP_TYP=S5 | SLP_EN: written to [`PM1_CONTROL`], powers the machine off.
const S5_SLP_EN: u8 = (5 << 2) | (1 << 5);

/// `out dx, al` for each byte of `text` to COM1.
pub fn print(text: &[u8]) -> Vec<u8> {
    let mut c = mov_dx(COM1).to_vec();
    c.extend(out_each(text));
    c
}

/// `out port, value`.
pub fn out_byte(port: u16, value: u8) -> Vec<u8> {
    let mut c = mov_dx(port).to_vec();
    c.extend(out_each(&[value]));
    c
}

/// `hlt` in a loop: the guest idles until stopped.
pub const HALT_FOREVER: [u8; 3] = [0xf4, 0xeb, 0xfd];

/// ACPI S5 through the PM1 control register: the guest powers off.
pub fn power_off() -> Vec<u8> {
    out_byte(PM1_CONTROL, S5_SLP_EN)
}

/// `ud2` with no IDT: #UD, #DF, triple fault.
pub const TRIPLE_FAULT: [u8; 2] = [0x0f, 0x0b];

/// Prints `byte` on COM1 for ever, with a short busy wait between bytes
/// (for console tests: output keeps coming whenever a client attaches).
pub fn print_forever(byte: u8) -> Vec<u8> {
    print_every(byte, 0x40_0000)
}

/// Prints the alphabet on COM1 over and over (`abc…xyzabc…`), counting
/// `spin` down between letters: where output stops and starts again shows
/// whether a guest continued exactly where it was (snapshots, migration).
pub fn print_alphabet(spin: u32) -> Vec<u8> {
    let mut c = mov_dx(COM1).to_vec();
    c.extend_from_slice(&[0xb0, b'a']); // mov al, 'a'
    // top: out dx, al; inc al; cmp al, 'z'+1; jne +2; mov al, 'a'
    c.extend_from_slice(&[0xee, 0xfe, 0xc0, 0x3c, b'z' + 1, 0x75, 0x02, 0xb0, b'a']);
    // mov ecx, spin; spin: dec ecx; jnz spin; jmp top (20 bytes back)
    c.push(0xb9);
    c.extend_from_slice(&spin.to_le_bytes());
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc, 0xeb, 0xec]);
    c
}

/// Fills `bytes` of guest memory from 16 MiB with a non-zero pattern
/// (`rep stosq`: a working set a snapshot must carry), then goes on as
/// [`print_alphabet`]. `bytes` must lie in the boot identity map (4 GiB).
pub fn fill_then_print_alphabet(bytes: u64, spin: u32) -> Vec<u8> {
    let mut c = vec![0x48, 0xbf]; // mov rdi, 16 MiB
    c.extend_from_slice(&(16u64 << 20).to_le_bytes());
    c.extend_from_slice(&[0x48, 0xb9]); // mov rcx, quadwords
    c.extend_from_slice(&(bytes / 8).to_le_bytes());
    c.extend_from_slice(&[0x48, 0xb8]); // mov rax, pattern
    c.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    c.extend_from_slice(&[0xf3, 0x48, 0xab]); // rep stosq
    c.extend(print_alphabet(spin));
    c
}

/// Keeps `pages` pages from 16 MiB dirty and checks them: each round it
/// first checks that every page's first quadword holds the round's number
/// (what the previous round wrote), then writes the next number into every
/// page and prints the next letter of the alphabet on COM1, then counts
/// `spin` down. A page that lost a write (a migration that missed a dirty
/// page) prints `!` and halts.
pub fn dirty_and_check(pages: u32, spin: u32) -> Vec<u8> {
    const BASE: u64 = 16 << 20;
    let mut c = vec![0xba, 0xf8, 0x03, 0x00, 0x00]; // mov edx, COM1
    c.extend_from_slice(&[0x45, 0x31, 0xc0]); // xor r8d, r8d: the round
    c.extend_from_slice(&[0x41, 0xb1, b'a']); // mov r9b, 'a'
    let top = c.len();
    let walk = |c: &mut Vec<u8>| {
        c.extend_from_slice(&[0x48, 0xbf]); // mov rdi, BASE
        c.extend_from_slice(&BASE.to_le_bytes());
        c.push(0xb9); // mov ecx, pages
        c.extend_from_slice(&pages.to_le_bytes());
    };
    walk(&mut c);
    let check = c.len();
    c.extend_from_slice(&[0x4c, 0x39, 0x07]); // cmp [rdi], r8
    c.extend_from_slice(&[0x0f, 0x85, 0, 0, 0, 0]); // jne bad (patched)
    let jne_bad = c.len();
    c.extend_from_slice(&[0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]); // add rdi, 4096
    c.extend_from_slice(&[0xff, 0xc9]); // dec ecx
    c.push(0x75); // jnz check
    c.push((check as i64 - (c.len() as i64 + 1)) as u8);
    c.extend_from_slice(&[0x49, 0xff, 0xc0]); // inc r8
    walk(&mut c);
    let write = c.len();
    c.extend_from_slice(&[0x4c, 0x89, 0x07]); // mov [rdi], r8
    c.extend_from_slice(&[0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]); // add rdi, 4096
    c.extend_from_slice(&[0xff, 0xc9]); // dec ecx
    c.push(0x75); // jnz write
    c.push((write as i64 - (c.len() as i64 + 1)) as u8);
    c.extend_from_slice(&[0x44, 0x88, 0xc8, 0xee]); // mov al, r9b; out dx, al
    c.extend_from_slice(&[0x41, 0xfe, 0xc1, 0x41, 0x80, 0xf9, b'z' + 1, 0x75, 0x03, 0x41, 0xb1, b'a']); // next letter, a after z
    c.push(0xb9); // mov ecx, spin
    c.extend_from_slice(&spin.to_le_bytes());
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc]); // dec ecx; jnz $-2
    c.push(0xe9); // jmp top
    let rel = top as i64 - (c.len() as i64 + 4);
    c.extend_from_slice(&(rel as i32).to_le_bytes());
    let bad = c.len();
    c[jne_bad - 4..jne_bad].copy_from_slice(&((bad - jne_bad) as i32).to_le_bytes());
    c.extend_from_slice(&[0xb0, b'!', 0xee]); // mov al, '!'; out dx, al
    c.extend_from_slice(&HALT_FOREVER);
    c
}

/// Prints `byte` on COM1 for ever, counting `spin` down between bytes.
pub fn print_every(byte: u8, spin: u32) -> Vec<u8> {
    let mut c = mov_dx(COM1).to_vec();
    c.extend_from_slice(&[0xb0, byte]); // mov al, byte
    // top: out dx, al; mov ecx, spin; spin: dec ecx; jnz spin; jmp top
    c.extend_from_slice(&[0xee, 0xb9]);
    c.extend_from_slice(&spin.to_le_bytes());
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc, 0xeb, 0xf4]);
    c
}

/// Where [`virtio_balloon_chain_bomb`] keeps its inflate queue's rings: in
/// its own image, which the loader puts at 1 MiB (code at +0x200).
const BOMB_DESC: u32 = 0x10_1000;
const BOMB_AVAIL: u32 = 0x10_2000;
const BOMB_USED: u32 = 0x10_3000;
/// The 32 MiB every descriptor of the bomb points at, filled with one PFN.
const BOMB_FILL: u32 = 0x40_0000;
const BOMB_FILL_LEN: u32 = 32 << 20;
/// The page the bomb's PFN list names (48 MiB, unused by the guest).
pub const BOMB_PFN: u32 = 0x3000;
/// Descriptors in the bomb's first chain (each 32 MiB: 6 GiB in all).
pub const BOMB_HUGE_DESCRIPTORS: u16 = 192;
/// Bytes of the second chain: 64 descriptors of 16 KiB over the same
/// memory, 262,144 PFNs, as long a list as a device should still serve.
pub const BOMB_AT_LIMIT_BYTES: u32 = 64 * (16 << 10);

/// Configuration address (port 0xcf8) of register `reg` of bus 0 slot `slot`.
fn pci_cfg(slot: u32, reg: u32) -> u32 {
    0x8000_0000 | (slot << 11) | (reg << 2)
}

/// `op [rbx + disp], imm` for an opcode with ModRM reg field 0 (the stores).
fn at_rbx(prefix: &[u8], disp: u32, imm: &[u8]) -> Vec<u8> {
    let mut c = prefix.to_vec();
    c.push(0x83); // ModRM: [rbx + disp32]
    c.extend_from_slice(&disp.to_le_bytes());
    c.extend_from_slice(imm);
    c
}

/// The start of a hand-made virtio-balloon driver: finds the balloon on PCI
/// bus 0 (config ports 0xcf8/0xcfc; prints `no virtio-balloon` and halts
/// when there is none), turns on memory space and bus mastering, leaves RBX
/// at BAR 0 and negotiates VERSION_1 and `features_low` (FEATURES_OK).
fn balloon_driver_start(features_low: u32) -> Vec<u8> {
    let mut c = vec![0x31, 0xf6]; // xor esi, esi: the balloon's config address
    for slot in 1..32 {
        c.push(0xb8); // mov eax, cfg(slot, 0)
        c.extend_from_slice(&pci_cfg(slot, 0).to_le_bytes());
        c.extend_from_slice(&mov_dx(0xcf8));
        c.push(0xef); // out dx, eax
        c.extend_from_slice(&mov_dx(0xcfc));
        c.push(0xed); // in eax, dx
        c.push(0x3d); // cmp eax, virtio 1.0 balloon
        c.extend_from_slice(&0x1045_1af4u32.to_le_bytes());
        c.extend_from_slice(&[0x75, 0x05]); // jne over the next instruction
        c.push(0xbe); // mov esi, cfg(slot, 0)
        c.extend_from_slice(&pci_cfg(slot, 0).to_le_bytes());
    }
    let mut missing = print(b"no virtio-balloon\n");
    missing.extend(HALT_FOREVER);
    c.extend_from_slice(&[0x85, 0xf6, 0x75, missing.len() as u8]); // test esi, esi; jnz found
    c.extend(missing);
    // Memory space and bus mastering on; rbx = BAR 0 (64-bit).
    // Points 0xcf8 at register `reg` of the balloon and leaves DX at 0xcfc.
    let select_reg = |c: &mut Vec<u8>, reg: u32| {
        c.extend_from_slice(&[0x89, 0xf0, 0x0d]); // mov eax, esi; or eax, reg * 4
        c.extend_from_slice(&(reg << 2).to_le_bytes());
        c.extend_from_slice(&mov_dx(0xcf8));
        c.push(0xef);
        c.extend_from_slice(&mov_dx(0xcfc));
    };
    select_reg(&mut c, 1);
    c.extend_from_slice(&[0xb8, 6, 0, 0, 0, 0xef]); // mov eax, 6; out dx, eax
    select_reg(&mut c, 4);
    c.extend_from_slice(&[0xed, 0x25, 0xf0, 0xff, 0xff, 0xff, 0x89, 0xc3]); // in; and eax, ~0xf; mov ebx, eax
    select_reg(&mut c, 5);
    c.extend_from_slice(&[0xed, 0x48, 0xc1, 0xe0, 0x20, 0x48, 0x09, 0xc3]); // in; shl rax, 32; or rbx, rax
    // virtio_pci_common_cfg: reset, ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK.
    let (status, dword) = (virtio_status, common_dword);
    for part in [status(0), status(1), status(3), dword(0x08, 1), dword(0x0c, 1), dword(0x08, 0), dword(0x0c, features_low)] {
        c.extend(part);
    }
    c.extend(status(0x0b));
    c
}

/// `mov byte [rbx + 0x14], v`: the virtio device status.
fn virtio_status(v: u8) -> Vec<u8> {
    at_rbx(&[0xc6], 0x14, &[v])
}

/// `mov dword [rbx + off], v` in the common configuration.
fn common_dword(off: u32, v: u32) -> Vec<u8> {
    at_rbx(&[0xc7], off, &v.to_le_bytes())
}

/// `mov word [rbx + off], v` in the common configuration.
fn common_word(off: u32, v: u16) -> Vec<u8> {
    at_rbx(&[0x66, 0xc7], off, &v.to_le_bytes())
}

/// A hostile virtio-balloon driver: finds the balloon on PCI bus 0 (config
/// ports 0xcf8/0xcfc), negotiates VERSION_1 through BAR 0's common
/// configuration, and queues two inflate chains whose descriptors all
/// overlap one 32 MiB region: [`BOMB_HUGE_DESCRIPTORS`] descriptors of
/// 32 MiB (6 GiB of "PFNs" from a 64 MiB guest), then a list of
/// [`BOMB_AT_LIMIT_BYTES`]. Prints `used 2` once the device has returned
/// both chains, `stuck` if it does not within a few seconds, or
/// `no virtio-balloon`; then halts.
pub fn virtio_balloon_chain_bomb() -> Vec<u8> {
    let mut c = balloon_driver_start(0);
    // Fill the region with the one PFN: mov edi; mov ecx; mov eax; rep stosd.
    c.push(0xbf);
    c.extend_from_slice(&BOMB_FILL.to_le_bytes());
    c.push(0xb9);
    c.extend_from_slice(&(BOMB_FILL_LEN / 4).to_le_bytes());
    c.push(0xb8);
    c.extend_from_slice(&BOMB_PFN.to_le_bytes());
    c.extend_from_slice(&[0xf3, 0xab]);
    let (status, dword, word) = (virtio_status, common_dword, common_word);
    // Queue 0 (inflate): 256 entries, rings in the image, enabled; DRIVER_OK.
    for part in [
        word(0x16, 0),
        word(0x18, 256),
        dword(0x20, BOMB_DESC),
        dword(0x24, 0),
        dword(0x28, BOMB_AVAIL),
        dword(0x2c, 0),
        dword(0x30, BOMB_USED),
        dword(0x34, 0),
        word(0x1c, 1),
        status(0x0f),
    ] {
        c.extend(part);
    }
    // Notify queue 0 at BAR + 0x3000 + queue_notify_off * 4.
    c.extend(at_rbx(&[0x0f, 0xb7], 0x1e, &[])); // movzx eax, word [rbx + 0x1e]
    c.extend_from_slice(&[0x66, 0xc7, 0x84, 0x83, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00]); // mov word [rbx+rax*4+0x3000], 0
    // Wait (bounded) for used.idx == 2.
    let mut stuck = print(b"stuck\n");
    stuck.extend(HALT_FOREVER);
    c.extend_from_slice(&[0xb9, 0xff, 0xff, 0xff, 0xff]); // mov ecx, 0xffffffff
    c.extend_from_slice(&[0x0f, 0xb7, 0x04, 0x25]); // loop: movzx eax, word [used.idx]
    c.extend_from_slice(&(BOMB_USED + 2).to_le_bytes());
    c.extend_from_slice(&[0x83, 0xf8, 0x02, 0x74, 4 + stuck.len() as u8]); // cmp eax, 2; je done
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xef]); // dec ecx; jnz loop
    c.extend(stuck);
    c.extend(print(b"used 2\n")); // done:
    c.extend(HALT_FOREVER);
    // The rings, at the addresses above (the code starts at 0x10_0200).
    let base = 0x10_0200usize;
    assert!(base + c.len() <= BOMB_DESC as usize, "the bomb's code overlaps its rings");
    c.resize(BOMB_DESC as usize - base, 0xf4);
    let at_limit_len = BOMB_AT_LIMIT_BYTES / 64;
    for i in 0..256u16 {
        let (len, last) = if i < BOMB_HUGE_DESCRIPTORS { (BOMB_FILL_LEN, BOMB_HUGE_DESCRIPTORS - 1) } else { (at_limit_len, 255) };
        c.extend_from_slice(&u64::from(BOMB_FILL).to_le_bytes());
        c.extend_from_slice(&len.to_le_bytes());
        c.extend_from_slice(&u16::from(i != last).to_le_bytes()); // VIRTQ_DESC_F_NEXT
        c.extend_from_slice(&if i != last { i + 1 } else { 0 }.to_le_bytes());
    }
    // avail: NO_INTERRUPT, idx 2, heads 0 and BOMB_HUGE_DESCRIPTORS; then a zeroed used ring.
    for v in [1u16, 2, 0, BOMB_HUGE_DESCRIPTORS] {
        c.extend_from_slice(&v.to_le_bytes());
    }
    c.resize(BOMB_USED as usize - base + 4096, 0);
    c
}

/// Where [`virtio_balloon_stats_driver`] keeps its statistics queue and
/// buffer: in its own image, as the bomb does.
const STATS_DESC: u32 = 0x10_1000;
const STATS_AVAIL: u32 = 0x10_2000;
const STATS_USED: u32 = 0x10_3000;
const STATS_BUF: u32 = 0x10_4000;
/// The figures [`virtio_balloon_stats_driver`] reports, in bytes.
pub const STATS_FREE: u64 = 40 << 20;
/// Total memory it reports.
pub const STATS_TOTAL: u64 = 60 << 20;
/// Available memory it reports.
pub const STATS_AVAILABLE: u64 = 50 << 20;

/// A well-behaved virtio-balloon driver with the statistics queue, as
/// Linux's: it posts a buffer of four figures (free, total and available
/// memory, and a major-fault count that grows by one each time the device
/// hands the buffer back for fresh figures), re-posts it whenever the
/// device returns it, and acknowledges every balloon target at once by
/// writing `actual` (without giving pages up: a test driver). Polls; takes
/// no interrupts.
pub fn virtio_balloon_stats_driver() -> Vec<u8> {
    const F_STATS_VQ: u32 = 1 << 1;
    let mut c = balloon_driver_start(F_STATS_VQ);
    let (status, dword, word) = (virtio_status, common_dword, common_word);
    // Queue 2 (statistics): 16 entries, rings in the image, enabled; DRIVER_OK.
    for part in [
        word(0x16, 2),
        word(0x18, 16),
        dword(0x20, STATS_DESC),
        dword(0x24, 0),
        dword(0x28, STATS_AVAIL),
        dword(0x2c, 0),
        dword(0x30, STATS_USED),
        dword(0x34, 0),
        word(0x1c, 1),
        status(0x0f),
    ] {
        c.extend(part);
    }
    // Assembled with GNU as (Intel syntax); the addresses are the constants above.
    c.extend_from_slice(&[
        0x0f, 0xb7, 0x43, 0x1e, // movzx eax, word [rbx+0x1e]         ; queue 2's notify offset
        0x4c, 0x8d, 0xa4, 0x83, 0x00, 0x30, 0x00, 0x00, // lea r12, [rbx+rax*4+0x3000]
        0x66, 0x41, 0xc7, 0x04, 0x24, 0x02, 0x00, // mov word [r12], 2 ; the first buffer is posted
        0x45, 0x31, 0xed, // xor r13d, r13d                              ; used.idx seen
        // top:
        0x8b, 0x83, 0x00, 0x20, 0x00, 0x00, // mov eax, [rbx+0x2000]     ; num_pages (the target)
        0x89, 0x83, 0x04, 0x20, 0x00, 0x00, // mov [rbx+0x2004], eax     ; actual = target
        0x0f, 0xb7, 0x04, 0x25, 0x02, 0x30, 0x10, 0x00, // movzx eax, word [STATS_USED+2]
        0x44, 0x39, 0xe8, // cmp eax, r13d
        0x74, 0x34, // je wait                                            ; nothing handed back
        0x41, 0x89, 0xc5, // mov r13d, eax
        0x48, 0x83, 0x04, 0x25, 0x0c, 0x40, 0x10, 0x00, 0x01, // add qword [STATS_BUF+12], 1 ; major faults
        0x0f, 0xb7, 0x0c, 0x25, 0x02, 0x20, 0x10, 0x00, // movzx ecx, word [STATS_AVAIL+2]
        0x89, 0xca, // mov edx, ecx
        0x83, 0xe2, 0x0f, // and edx, 15
        0x66, 0xc7, 0x04, 0x55, 0x04, 0x20, 0x10, 0x00, 0x00, 0x00, // mov word [STATS_AVAIL+4+rdx*2], 0
        0xff, 0xc1, // inc ecx
        0x66, 0x89, 0x0c, 0x25, 0x02, 0x20, 0x10, 0x00, // mov [STATS_AVAIL+2], cx ; posted again
        0x66, 0x41, 0xc7, 0x04, 0x24, 0x02, 0x00, // mov word [r12], 2 ; notify
        // wait:
        0xb9, 0x00, 0x04, 0x00, 0x00, // mov ecx, 0x400 (PAUSE exits to the host under KVM: keep it short)
        0xf3, 0x90, 0xff, 0xc9, 0x75, 0xfa, // spin: pause; dec ecx; jnz spin
        0xeb, 0xa6, // jmp top
    ]);
    let base = 0x10_0200usize;
    assert!(base + c.len() <= STATS_DESC as usize, "the driver's code overlaps its rings");
    c.resize(STATS_DESC as usize - base, 0xf4);
    // Descriptor 0: the 40-byte statistics buffer, device-readable.
    c.extend_from_slice(&u64::from(STATS_BUF).to_le_bytes());
    c.extend_from_slice(&40u32.to_le_bytes());
    c.extend_from_slice(&[0; 4]);
    c.resize(STATS_AVAIL as usize - base, 0);
    // avail: NO_INTERRUPT, idx 1, head 0; then a zeroed used ring.
    for v in [1u16, 1, 0] {
        c.extend_from_slice(&v.to_le_bytes());
    }
    c.resize(STATS_BUF as usize - base, 0);
    // Tags 4 (free), 2 (major faults, at +12), 5 (total), 6 (available).
    for (tag, v) in [(4u16, STATS_FREE), (2, 0), (5, STATS_TOTAL), (6, STATS_AVAILABLE)] {
        c.extend_from_slice(&tag.to_le_bytes());
        c.extend_from_slice(&v.to_le_bytes());
    }
    c.resize(STATS_BUF as usize - base + 4096, 0);
    c
}

/// Calibrates against PIT channel 2 as SeaBIOS and Linux do (gate it on
/// through port 0x61, count 0x800 in mode 0, poll 0x61 bit 5 for its
/// output), then prints `T2OUT` when the output rose, or `STUCK` after
/// 0x40000 polls (far longer than the 1.7 ms the count takes), and powers off.
pub fn pit_channel2_probe() -> Vec<u8> {
    let mut c = vec![
        0xe4, 0x61, // in al, 0x61
        0x24, 0xfc, // and al, 0xfc (speaker off)
        0x0c, 0x01, // or al, 1 (channel 2 gate on)
        0xe6, 0x61, // out 0x61, al
        0xb0, 0xb0, 0xe6, 0x43, // channel 2, lobyte/hibyte, mode 0, binary
        0xb0, 0x00, 0xe6, 0x42, // count low
        0xb0, 0x08, 0xe6, 0x42, // count high
        0xb9, 0x00, 0x00, 0x04, 0x00, // mov ecx, 0x40000
        // poll:
        0xe4, 0x61, // in al, 0x61
        0xa8, 0x20, // test al, 0x20 (OUT2)
        0x75, 0x00, // jnz rose (patched below)
        0xff, 0xc9, // dec ecx
        0x75, 0xf6, // jnz poll
    ];
    let jnz_rose = c.len() - 6;
    let stuck = [print(b"STUCK"), power_off(), HALT_FOREVER.to_vec()].concat();
    c[jnz_rose + 1] = u8::try_from(stuck.len() + 4).expect("a short jump");
    c.extend(stuck);
    c.extend(print(b"T2OUT"));
    c.extend(power_off());
    c.extend_from_slice(&HALT_FOREVER);
    c
}

/// A disk's first sector holding 16-bit `code` at 0x7C00 and the 0x55AA
/// signature: what firmware loads and jumps to when it boots the disk.
pub fn boot_sector(code: &[u8]) -> Vec<u8> {
    assert!(code.len() <= 446, "boot code must leave room for the partition table");
    let mut s = vec![0u8; 512];
    s[..code.len()].copy_from_slice(code);
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// Real-mode code for [`boot_sector`]: prints `text` on COM1, then powers
/// the machine off through ACPI (S5) and halts.
pub fn real_mode_print_and_power_off(text: &[u8]) -> Vec<u8> {
    // In 16-bit code `mov dx, imm16` needs no operand-size prefix.
    let mov_dx16 = |port: u16| -> [u8; 3] {
        let p = port.to_le_bytes();
        [0xba, p[0], p[1]]
    };
    let mut c = mov_dx16(COM1).to_vec();
    c.extend(out_each(text));
    c.extend(mov_dx16(PM1_CONTROL));
    c.extend(out_each(&[S5_SLP_EN]));
    c.extend_from_slice(&HALT_FOREVER);
    c
}

/// Real-mode code for [`boot_sector`]: prints a, b, ..., z, a, ... for
/// ever through the firmware's serial service (int 0x14, AH=1, COM1), with
/// `spin` x 65,535 loop turns after each letter. Output keeps coming only
/// while the firmware's code and data in RAM work.
pub fn real_mode_bios_print_alphabet(spin: u16) -> Vec<u8> {
    let s = spin.to_le_bytes();
    vec![
        0xb0, b'a', // 0: mov al, 'a'
        0xb4, 0x01, // 2: mov ah, 1 (send a character)
        0x31, 0xd2, // 4: xor dx, dx (COM1)
        0x50, // 6: push ax
        0xcd, 0x14, // 7: int 0x14
        0x58, // 9: pop ax
        0xb9, s[0], s[1], // 10: mov cx, spin
        0x51, // 13: push cx
        0xb9, 0xff, 0xff, // 14: mov cx, 0xffff
        0xe2, 0xfe, // 17: loop 17
        0x59, // 19: pop cx
        0xe2, 0xf7, // 20: loop 13
        0xfe, 0xc0, // 22: inc al
        0x3c, b'z' + 1, // 24: cmp al, 'z' + 1
        0x75, 0xe6, // 26: jne 2
        0xb0, b'a', // 28: mov al, 'a'
        0xeb, 0xe2, // 30: jmp 2
    ]
}

/// Writes to `out` an ISO 9660 disc (made with Debian's xorriso) whose El
/// Torito no-emulation boot image is the real-mode `code` (loaded at
/// 0x7C00, as a boot sector is), with an isohybrid MBR when `hybrid`.
pub fn el_torito_iso(code: &[u8], out: &std::path::Path, hybrid: bool) -> Result<(), String> {
    let tree = out.with_extension("tree");
    let mut image = code.to_vec();
    image.resize(image.len().div_ceil(2048).max(1) * 2048, 0);
    std::fs::create_dir_all(&tree).and_then(|_| std::fs::write(tree.join("boot.img"), image)).map_err(|e| format!("{}: {e}", tree.display()))?;
    let mut cmd = std::process::Command::new("xorriso");
    cmd.args(["-as", "mkisofs", "-quiet", "-o"]).arg(out);
    if hybrid {
        cmd.args(["-isohybrid-mbr", "/usr/lib/ISOLINUX/isohdpfx.bin"]);
    }
    cmd.args(["-b", "boot.img", "-no-emul-boot", "-boot-load-size", "4"]).arg(&tree);
    let result = cmd.output();
    let _ = std::fs::remove_dir_all(&tree);
    let o = result.map_err(|e| format!("xorriso (crates/lab/setup.sh installs it): {e}"))?;
    if !o.status.success() {
        return Err(format!("xorriso: {}", String::from_utf8_lossy(&o.stderr)));
    }
    Ok(())
}

/// The serial console's text without dots and line ends: SeaBIOS flushes
/// its own text lazily, so its dots and newlines can land inside what a
/// boot sector prints after it.
pub fn without_firmware_punctuation(serial: &str) -> String {
    serial.chars().filter(|c| !matches!(c, '.' | '\r' | '\n')).collect()
}
