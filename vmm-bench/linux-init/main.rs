//! The workload as a static Linux program with no libc: the same code the
//! unikernel runs, entered from `_start` and talking to Linux through raw
//! system calls. One binary serves as the native process, the container's
//! command, runc's process and the QEMU guest's `/init`.
//!
//! Arguments (all optional): `kib=N` (workload size, default 4096), `loops=N`, `seed=N`, `--info` (print
//! pid, hostname, namespace ids and cgroup, for the isolation tests) and
//! `--reboot` (as a guest's init: end the VM instead of exiting).
//! Output: one `LIVEHOST-LX ...` line on stdout (with `mono_start_ns`, its
//! first instruction's CLOCK_MONOTONIC, and `vmhwm_kib`, its own peak RSS);
//! exit status 0.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};
use core::fmt::Write;
use vmm_bench_workload as workload;

global_asm!(
    r#"
    .globl _start
_start:
    xor ebp, ebp
    mov rdi, rsp
    and rsp, -16
    call lx_main
    ud2
"#
);

unsafe fn syscall6(n: usize, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller passes a valid system call; rcx and r11 are
    // clobbered by the syscall instruction.
    unsafe {
        asm!("syscall", inlateout("rax") n as isize => ret, in("rdi") a[0], in("rsi") a[1],
             in("rdx") a[2], in("r10") a[3], in("r8") a[4], in("r9") a[5],
             lateout("rcx") _, lateout("r11") _, options(nostack))
    };
    ret
}

fn sys(n: usize, a: &[usize]) -> isize {
    let mut v = [0usize; 6];
    v[..a.len()].copy_from_slice(a);
    // SAFETY: only the calls below are made, with arguments that are valid
    // for them.
    unsafe { syscall6(n, v) }
}

const SYS_READ: usize = 0;
const SYS_WRITE: usize = 1;
const SYS_OPEN: usize = 2;
const SYS_CLOSE: usize = 3;
const SYS_MMAP: usize = 9;
const SYS_GETPID: usize = 39;
const SYS_EXIT_GROUP: usize = 231;
const SYS_UNAME: usize = 63;
const SYS_READLINK: usize = 89;
const SYS_GETPPID: usize = 110;
const SYS_CLOCK_GETTIME: usize = 228;
const SYS_REBOOT: usize = 169;
const SYS_SYNC: usize = 162;

fn now_ns(clock: usize) -> u64 {
    let mut ts = [0i64; 2];
    sys(SYS_CLOCK_GETTIME, &[clock, ts.as_mut_ptr() as usize]);
    ts[0] as u64 * 1_000_000_000 + ts[1] as u64
}

struct Out {
    buf: [u8; 4096],
    len: usize,
}
impl Write for Out {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}
impl Out {
    fn flush(&mut self) {
        let mut off = 0;
        while off < self.len {
            let r = sys(
                SYS_WRITE,
                &[1, self.buf[off..].as_ptr() as usize, self.len - off],
            );
            if r <= 0 {
                break;
            }
            off += r as usize;
        }
        self.len = 0;
    }
}

fn cstr(p: *const u8) -> &'static [u8] {
    let mut n = 0;
    // SAFETY: argv strings are NUL-terminated and live for the process.
    while unsafe { *p.add(n) } != 0 {
        n += 1;
    }
    unsafe { core::slice::from_raw_parts(p, n) }
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

fn print_file(out: &mut Out, path: &[u8]) {
    let fd = sys(SYS_OPEN, &[path.as_ptr() as usize, 0]);
    if fd < 0 {
        let _ = write!(out, "<open failed {}>", fd);
        return;
    }
    let mut b = [0u8; 512];
    loop {
        let r = sys(SYS_READ, &[fd as usize, b.as_mut_ptr() as usize, b.len()]);
        if r <= 0 {
            break;
        }
        for &c in &b[..r as usize] {
            let _ = out.write_char(if c == b'\n' { ';' } else { c as char });
        }
    }
    sys(SYS_CLOSE, &[fd as usize]);
}

/// The `KEY: N kB` figure of /proc/self/status (VmHWM: this process's own
/// peak RSS), or 0 when /proc is not there.
fn status_kib(key: &[u8]) -> u64 {
    let fd = sys(SYS_OPEN, &[b"/proc/self/status\0".as_ptr() as usize, 0]);
    if fd < 0 {
        return 0;
    }
    let mut b = [0u8; 4096];
    let mut n = 0;
    while n < b.len() {
        let r = sys(SYS_READ, &[fd as usize, b[n..].as_mut_ptr() as usize, b.len() - n]);
        if r <= 0 {
            break;
        }
        n += r as usize;
    }
    sys(SYS_CLOSE, &[fd as usize]);
    b[..n]
        .split(|&c| c == b'\n')
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| {
            let digits: &[u8] = rest.trim_ascii_start();
            let end = digits.iter().position(|c| !c.is_ascii_digit()).unwrap_or(digits.len());
            parse_u64(&digits[..end])
        })
        .unwrap_or(0)
}

fn print_link(out: &mut Out, path: &[u8]) {
    let mut b = [0u8; 128];
    let r = sys(
        SYS_READLINK,
        &[path.as_ptr() as usize, b.as_mut_ptr() as usize, b.len()],
    );
    if r > 0 {
        for &c in &b[..r as usize] {
            let _ = out.write_char(c as char);
        }
    } else {
        let _ = write!(out, "?");
    }
}

fn exit(code: i32) -> ! {
    sys(SYS_EXIT_GROUP, &[code as usize]);
    loop {}
}

#[unsafe(no_mangle)]
extern "C" fn lx_main(sp: *const usize) -> ! {
    let mono_start = now_ns(1);
    let boot_start = now_ns(7); // CLOCK_BOOTTIME: time since the kernel started
    // SAFETY: the kernel's initial stack holds argc then argc argv pointers.
    let argc = unsafe { *sp };
    let (mut kib, mut loops, mut seed, mut info, mut reboot) =
        (4096u64, 10_000u64, workload::DEFAULT_SEED, false, false);
    let mut out = Out {
        buf: [0; 4096],
        len: 0,
    };
    for i in 1..argc {
        let a = cstr(unsafe { *sp.add(1 + i) } as *const u8);
        let val = |k: &[u8]| a.strip_prefix(k).and_then(parse_u64);
        if let Some(v) = val(b"kib=") {
            kib = v;
        } else if let Some(v) = val(b"loops=") {
            loops = v;
        } else if let Some(v) = val(b"seed=") {
            seed = v;
        } else if a == b"--info" {
            info = true;
        } else if a == b"--reboot" {
            reboot = true;
        } else {
            let _ = write!(out, "LIVEHOST-LX error=unknown-argument\n");
            out.flush();
            exit(2);
        }
    }
    if kib == 0 || kib > workload::MAX_KIB {
        let _ = write!(out, "LIVEHOST-LX error=kib-out-of-range\n");
        out.flush();
        exit(2);
    }
    let len = (kib as usize) << 10;
    // PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
    let p = sys(SYS_MMAP, &[0, len.max(4096), 3, 0x22, usize::MAX, 0]);
    if p < 0 {
        let _ = write!(out, "LIVEHOST-LX error=mmap errno={}\n", -p);
        out.flush();
        exit(1);
    }
    // SAFETY: a fresh private anonymous mapping of at least `len` bytes.
    let buf = unsafe { core::slice::from_raw_parts_mut(p as *mut u8, len) };
    let t0 = now_ns(1);
    let sum = workload::checksum(buf, seed);
    let t1 = now_ns(1);
    workload::null_loop(loops, || {
        core::hint::black_box(sys(SYS_GETPPID, &[]));
    });
    let t2 = now_ns(1);
    let pid = sys(SYS_GETPID, &[]);
    let _ = write!(
        out,
        "LIVEHOST-LX pid={} vmhwm_kib={} mono_start_ns={} boottime_start_ns={} checksum={:#018x} len={} workload_ns={} loop_n={} syscall_loop_ns={}",
        pid,
        status_kib(b"VmHWM:"),
        mono_start,
        boot_start,
        sum,
        len,
        t1 - t0,
        loops,
        t2 - t1
    );
    if info {
        let mut uts = [0u8; 390];
        sys(SYS_UNAME, &[uts.as_mut_ptr() as usize]);
        let node = &uts[65..130];
        let n = node.iter().position(|&c| c == 0).unwrap_or(node.len());
        let _ = write!(out, " hostname=");
        for &c in &node[..n] {
            let _ = out.write_char(c as char);
        }
        for (k, path) in [
            ("mnt", &b"/proc/self/ns/mnt\0"[..]),
            ("uts", b"/proc/self/ns/uts\0"),
            ("ipc", b"/proc/self/ns/ipc\0"),
            ("pidns", b"/proc/self/ns/pid\0"),
            ("netns", b"/proc/self/ns/net\0"),
        ] {
            let _ = write!(out, " {}=", k);
            print_link(&mut out, path);
        }
        let _ = write!(out, " cgroup=");
        print_file(&mut out, b"/proc/self/cgroup\0");
    }
    let _ = write!(out, "\n");
    out.flush();
    if reboot {
        sys(SYS_SYNC, &[]);
        // LINUX_REBOOT_CMD_RESTART; QEMU runs with -no-reboot, so this ends it.
        sys(SYS_REBOOT, &[0xfee1dead, 0x28121969, 0x01234567, 0]);
    }
    exit(0)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(101)
}

include!("../freestanding/libc.rs");
#[unsafe(no_mangle)]
unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: the caller passes a NUL-terminated string; volatile keeps
    // LLVM from turning this loop back into a call to strlen.
    while unsafe { s.add(n).read_volatile() } != 0 {
        n += 1;
    }
    n
}
