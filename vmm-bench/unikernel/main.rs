//! The vmm-bench unikernel: the shared workload linked with a minimal ring-0
//! runtime (entry, page tables, serial, TSC clock, boot timer).
//!
//! Two ways in, one image:
//! - our VMM loads it at 2 MiB and starts the vCPU in 64-bit mode at
//!   `_start64` (the ELF entry) with its own identity-mapped page tables and a
//!   mailbox at 0x1000 holding the run's parameters;
//! - QEMU's `-kernel` finds the PVH note and starts it in 32-bit protected
//!   mode at `_start32`, which builds identity-mapped 2 MiB pages itself,
//!   enters long mode and runs with default parameters.
//!
//! Built by vmm-bench's build.rs with plain rustc for the host target:
//! static, non-PIE, no start files, panic=abort.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use vmm_bench_workload as workload;

/// The ABI shared with the VMM (see vmm-bench/src/vm/layout.rs).
const MAILBOX: u64 = 0x1000;
const MAILBOX_MAGIC: u64 = 0x4c48_4d42_5543_4b31; // "LHMBUCK1"
const SERIAL: u16 = 0x3f8;
const BOOT_TIMER_PORT: u16 = 0x440;
const BOOT_TIMER_MAGIC: u8 = 123;
const NULL_PORT: u16 = 0x441;
const RESULT_MMIO: u64 = 0xd000_0000;
const DEBUG_EXIT_PORT: u16 = 0xf4;

#[repr(C)]
struct Mailbox {
    magic: u64,
    buf_addr: u64,
    buf_len: u64,
    seed: u64,
    loop_n: u64,
    _reserved: [u64; 3],
    // written by the guest
    tsc_entry: u64,
    tsc_ready: u64,
    tsc_done: u64,
    checksum: u64,
    workload_cycles: u64,
    port_cycles: u64,
    cpuid_cycles: u64,
    call_cycles: u64,
    done: u64,
}

#[unsafe(no_mangle)]
static mut ENTRY_TSC: u64 = 0;
/// PVH: physical address of `hvm_start_info` (EBX at entry).
#[unsafe(no_mangle)]
static mut PVH_START_INFO: u64 = 0;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .code64
    .global _start64
_start64:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [rip + ENTRY_TSC], rax
    lea rsp, [rip + UK_STACK_TOP]
    xor edi, edi
    call uk_main
2:  hlt
    jmp 2b

    .code32
    .global _start32
_start32:
    cli
    rdtsc
    mov [ENTRY_TSC], eax
    mov [ENTRY_TSC + 4], edx
    mov [PVH_START_INFO], ebx
    /* zero the six page-table pages (PML4, PDPT, 4 PDs) */
    lea edi, [PVH_PT]
    xor eax, eax
    mov ecx, 6 * 1024
    rep stosd
    /* PML4[0] -> PDPT, PDPT[0..4] -> PD0..PD3 */
    lea eax, [PVH_PT + 0x1000]
    or eax, 3
    mov [PVH_PT], eax
    lea edi, [PVH_PT + 0x1000]
    lea eax, [PVH_PT + 0x2000]
    or eax, 3
    mov ecx, 4
3:  mov [edi], eax
    add edi, 8
    add eax, 0x1000
    loop 3b
    /* 2048 PDEs, 2 MiB each, identity: 4 GiB including the MMIO hole */
    lea edi, [PVH_PT + 0x2000]
    mov eax, 0x83
    xor edx, edx
    mov ecx, 2048
4:  mov [edi], eax
    mov [edi + 4], edx
    add edi, 8
    add eax, 0x200000
    adc edx, 0
    loop 4b
    lea eax, [PVH_PT]
    mov cr3, eax
    /* PAE | OSFXSR | OSXMMEXCPT: Rust code uses SSE */
    mov eax, cr4
    or eax, 0x620
    mov cr4, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    and eax, 0xfffffffb
    or eax, 0x80000003
    mov cr0, eax
    lgdt [PVH_GDT_PTR]
    push 0x08
    lea eax, [5f]
    push eax
    retf
    .code64
5:  mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    lea rsp, [rip + UK_STACK_TOP]
    mov edi, 1
    call uk_main
6:  hlt
    jmp 6b

    .section .rodata
    .p2align 3
PVH_GDT:
    .quad 0
    .quad 0x00af9b000000ffff
    .quad 0x00cf93000000ffff
PVH_GDT_PTR:
    .word 3 * 8 - 1
    .long PVH_GDT

    .section .note.Xen, "a", @note
    .p2align 2
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .p2align 2
    .long _start32

    .section .bss
    .p2align 12
PVH_PT:
    .skip 6 * 4096
UK_STACK:
    .skip 64 * 1024
UK_STACK_TOP:
    "#
);

#[inline(always)]
fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc has no side effects; CR4.TSD is clear in both entries.
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    ((hi as u64) << 32) | lo as u64
}

#[inline(always)]
fn outb(port: u16, v: u8) {
    // SAFETY: ring 0; the ports used are ours (serial, boot timer, exits).
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}

fn cpuid0() -> u32 {
    let eax: u32;
    // SAFETY: cpuid leaf 0 only reads; rbx is saved because LLVM reserves it.
    unsafe {
        asm!("mov {t}, rbx", "cpuid", "mov rbx, {t}", t = out(reg) _,
             inout("eax") 0u32 => eax, out("ecx") _, out("edx") _, options(nostack))
    };
    eax
}

struct Serial;
impl Serial {
    fn put(&mut self, s: &str) {
        for b in s.bytes() {
            outb(SERIAL, b);
        }
    }
    fn dec(&mut self, mut v: u64) {
        let mut b = [0u8; 20];
        let mut i = b.len();
        loop {
            i -= 1;
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        for &c in &b[i..] {
            outb(SERIAL, c);
        }
    }
    fn hex(&mut self, v: u64) {
        for i in (0..16).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            outb(SERIAL, if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
    }
}

#[unsafe(no_mangle)]
extern "C" fn uk_main(pvh: u64) -> ! {
    let entry = unsafe { core::ptr::addr_of!(ENTRY_TSC).read_volatile() };
    let mb = MAILBOX as *mut Mailbox;
    // SAFETY: 0x1000 is RAM in both entries; the VMM writes the magic, QEMU
    // leaves it zero, so only our VMM's parameters are ever trusted.
    let have_mb =
        pvh == 0 && unsafe { core::ptr::addr_of!((*mb).magic).read_volatile() } == MAILBOX_MAGIC;
    let (buf_addr, buf_len, seed, loop_n) = if have_mb {
        unsafe { ((*mb).buf_addr, (*mb).buf_len, (*mb).seed, (*mb).loop_n) }
    } else {
        let mut p = (16 << 20, 4 << 20, workload::DEFAULT_SEED, 1000);
        pvh_cmdline(|k, v| match k {
            b"kib" if v >= 1 && v <= workload::MAX_KIB => p.1 = v << 10,
            b"loops" => p.3 = v,
            b"seed" => p.2 = v,
            _ => {}
        });
        p
    };
    outb(BOOT_TIMER_PORT, BOOT_TIMER_MAGIC);
    let ready = rdtsc();

    // SAFETY: the buffer is guest RAM the VMM (or QEMU's -m) provides and
    // nothing else in this image uses it.
    let buf = unsafe { core::slice::from_raw_parts_mut(buf_addr as *mut u8, buf_len as usize) };
    let t0 = rdtsc();
    let sum = workload::checksum(buf, seed);
    let t1 = rdtsc();
    let done = t1;

    let t = rdtsc();
    workload::null_loop(loop_n, || outb(NULL_PORT, 0));
    let port = rdtsc() - t;
    let t = rdtsc();
    workload::null_loop(loop_n, || {
        core::hint::black_box(cpuid0());
    });
    let cpuid = rdtsc() - t;
    let f: extern "C" fn(u64) -> u64 = core::hint::black_box(workload::null_call);
    let mut acc = 0u64;
    let t = rdtsc();
    workload::null_loop(loop_n, || acc = f(acc));
    let call = rdtsc() - t;
    core::hint::black_box(acc);

    // No core::fmt here: its number formatting uses SSE instructions that
    // an instruction-emulating KVM (a nested host) cannot execute.
    let mut w = Serial;
    w.put("LIVEHOST-UK pvh=");
    w.dec(pvh);
    for (k, v) in [
        (" entry_tsc=", entry),
        (" ready_tsc=", ready),
        (" done_tsc=", done),
    ] {
        w.put(k);
        w.dec(v);
    }
    w.put(" checksum=0x");
    w.hex(sum);
    for (k, v) in [
        (" len=", buf_len),
        (" workload_cyc=", t1 - t0),
        (" loop_n=", loop_n),
        (" port_cyc=", port),
        (" cpuid_cyc=", cpuid),
        (" call_cyc=", call),
    ] {
        w.put(k);
        w.dec(v);
    }
    w.put("\n");
    if have_mb {
        // SAFETY: as above; the VMM reads these after the final HLT.
        unsafe {
            (*mb).tsc_entry = entry;
            (*mb).tsc_ready = ready;
            (*mb).tsc_done = done;
            (*mb).checksum = sum;
            (*mb).workload_cycles = t1 - t0;
            (*mb).port_cycles = port;
            (*mb).cpuid_cycles = cpuid;
            (*mb).call_cycles = call;
            core::ptr::addr_of_mut!((*mb).done).write_volatile(1);
            // The result also leaves through an MMIO exit so the VMM's MMIO
            // path is exercised on every run.
            (RESULT_MMIO as *mut u64).write_volatile(sum);
        }
    } else {
        outb(DEBUG_EXIT_PORT, 0x10);
    }
    loop {
        // SAFETY: halting with interrupts off ends the run (HLT exit).
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// Parse `key=number` words from the PVH command line (QEMU's `-append`).
fn pvh_cmdline(mut f: impl FnMut(&[u8], u64)) {
    // SAFETY: written once by the PVH entry before uk_main.
    let si = unsafe { core::ptr::addr_of!(PVH_START_INFO).read_volatile() };
    if si == 0 {
        return;
    }
    // SAFETY: hvm_start_info is provided by the loader in identity-mapped
    // RAM: magic at 0, cmdline_paddr at 24.
    let (magic, cmd) = unsafe {
        (
            (si as *const u32).read_volatile(),
            ((si + 24) as *const u64).read_volatile(),
        )
    };
    if magic != 0x336e_c578 || cmd == 0 {
        return;
    }
    let mut p = cmd as *const u8;
    let mut word = [0u8; 32];
    let mut n = 0;
    loop {
        // SAFETY: the command line is NUL-terminated; reads stop there.
        let c = unsafe { p.read_volatile() };
        if c == 0 || c == b' ' {
            let w = &word[..n];
            if let Some(eq) = w.iter().position(|&b| b == b'=') {
                let mut v: u64 = 0;
                let mut ok = eq + 1 < w.len();
                for &d in &w[eq + 1..] {
                    if d.is_ascii_digit() {
                        v = v.wrapping_mul(10).wrapping_add((d - b'0') as u64);
                    } else {
                        ok = false;
                    }
                }
                if ok {
                    f(&w[..eq], v);
                }
            }
            n = 0;
            if c == 0 {
                break;
            }
        } else if n < word.len() {
            word[n] = c;
            n += 1;
        }
        p = p.wrapping_add(1);
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    Serial.put("LIVEHOST-UK panic\n");
    outb(DEBUG_EXIT_PORT, 0x3f);
    loop {
        // SAFETY: see uk_main.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

include!("../freestanding/libc.rs");
