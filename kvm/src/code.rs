//! Machine code for the tiny guests the probe, the tests and the benches
//! run. Real-mode blobs go at [`layout::REAL_CODE`](crate::layout::REAL_CODE),
//! long-mode ones at [`layout::CODE_BASE`](crate::layout::CODE_BASE).

/// Real mode: 'R' to serial, boot-timer byte, HLT.
pub const REAL_HELLO: &[u8] = &[
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'R', // mov al, 'R'
    0xee, // out dx, al
    0xba, 0x40, 0x04, // mov dx, 0x440
    0xb0, 123,  // mov al, 123
    0xee, // out dx, al
    0xf4, // hlt
];
/// Long mode: 'L' to serial, boot-timer byte, HLT.
pub const LONG_HELLO: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'L', // mov al, 'L'
    0xee, // out dx, al
    0x66, 0xba, 0x40, 0x04, // mov dx, 0x440
    0xb0, 123,  // mov al, 123
    0xee, // out dx, al
    0xf4, // hlt
];
/// Long mode: `ud2` with no IDT: #UD -> #DF -> triple fault.
pub const TRIPLE_FAULT: &[u8] = &[0x0f, 0x0b];
/// Either mode: spin forever without touching the boot timer.
pub const SPIN: &[u8] = &[0xeb, 0xfe];

/// Long mode: `n` writes to the null port, then HLT.
pub fn port_loop(n: u32) -> Vec<u8> {
    let mut v = vec![0x66, 0xba, 0x41, 0x04, 0xb9]; // mov dx, 0x441; mov ecx, imm32
    v.extend_from_slice(&n.max(1).to_le_bytes());
    v.extend_from_slice(&[
        0xee, // out dx, al
        0xff, 0xc9, // dec ecx
        0x75, 0xfb, // jnz out
        0xf4, // hlt
    ]);
    v
}

/// Real mode: exactly `n` (>= 1) writes to `port`, then HLT.
pub fn real_port_loop(port: u16, n: u32) -> Vec<u8> {
    let p = port.to_le_bytes();
    let mut v = vec![0xba, p[0], p[1], 0x66, 0xb9]; // mov dx, port; mov ecx, imm32
    v.extend_from_slice(&n.max(1).to_le_bytes());
    v.extend_from_slice(&[
        0xee, // out dx, al
        0x66, 0x49, // dec ecx
        0x75, 0xfb, // jnz out
        0xf4, // hlt
    ]);
    v
}

/// Long mode: `n` iterations of a register-only loop, then HLT.
pub fn spin_loop(n: u32) -> Vec<u8> {
    let mut v = vec![0xb9]; // mov ecx, imm32
    v.extend_from_slice(&n.max(1).to_le_bytes());
    v.extend_from_slice(&[
        0xff, 0xc9, // dec ecx
        0x75, 0xfc, // jnz dec
        0xf4, // hlt
    ]);
    v
}

/// Real mode, forever: `chunk` iterations of a register-only loop, then a
/// write to the null port, again. The time between two port exits is the
/// time the CPU takes for `chunk` iterations: the KVM speed probe.
pub fn real_chunked_spin(chunk: u32) -> Vec<u8> {
    let n = chunk.max(1).to_le_bytes();
    let p = crate::layout::NULL_PORT.to_le_bytes();
    #[rustfmt::skip]
    let v = vec![
        0xba, p[0], p[1],                   //        mov dx, NULL_PORT
        0x66, 0xb9, n[0], n[1], n[2], n[3], // again: mov ecx, chunk
        0x66, 0x49,                         // spin:  dec ecx
        0x75, 0xfc,                         //        jnz spin
        0xee,                               //        out dx, al
        0xeb, 0xf3,                         //        jmp again
    ];
    v
}
