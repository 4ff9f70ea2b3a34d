// The C library calls that compiled Rust emits in a freestanding image
// (there is no libc), shared by the unikernel and linux-init; each
// includes this file with `include!`. `rep` string instructions keep LLVM
// from turning the bodies back into calls to themselves.

#[unsafe(no_mangle)]
unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    unsafe {
        core::arch::asm!("rep movsb", inout("rdi") d => _, inout("rsi") s => _, inout("rcx") n => _, options(nostack))
    };
    d
}
#[unsafe(no_mangle)]
unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    unsafe {
        core::arch::asm!("rep stosb", inout("rdi") d => _, in("al") c as u8, inout("rcx") n => _, options(nostack))
    };
    d
}
#[unsafe(no_mangle)]
unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) <= (s as usize) || (d as usize) >= (s as usize + n) {
        return unsafe { memcpy(d, s, n) };
    }
    unsafe {
        core::arch::asm!("std", "rep movsb", "cld", inout("rdi") d.add(n - 1) => _,
             inout("rsi") s.add(n - 1) => _, inout("rcx") n => _, options(nostack))
    };
    d
}
#[unsafe(no_mangle)]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}
#[unsafe(no_mangle)]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    unsafe { memcmp(a, b, n) }
}

// The precompiled `core` was built with unwinding and references this
// symbol from its unwind tables; with panic=abort nothing ever calls it.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}
