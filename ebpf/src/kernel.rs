//! What the running kernel and this process allow, asked before loading
//! anything: capabilities, which tracepoints BTF knows, pid_max, and the
//! kernel's per-program run-time accounting.

use anyhow::{Result, bail};
use std::collections::HashSet;
use std::path::Path;

/// Effective capability bits from /proc/self/status.
fn effective_caps() -> Option<u64> {
    let status = livehost_common::sysfs::read_text("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

const CAP_SYS_ADMIN: u64 = 21;
const CAP_PERFMON: u64 = 38;
const CAP_BPF: u64 = 39;

/// Refuse early, with the fix, when the process cannot load tracing programs.
pub fn check_privileges() -> Result<()> {
    let Some(caps) = effective_caps() else {
        return Ok(()); // cannot tell; let the kernel decide
    };
    let has = |c: u64| caps & (1 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    bail!(
        "overhead needs CAP_BPF and CAP_PERFMON (or root) to load tracing programs; \
         run it with sudo, or `setcap cap_bpf,cap_perfmon+ep $(which overhead)`"
    )
}

/// The tracepoints that some BTF file in `dir` (vmlinux or a module's)
/// defines a `btf_trace_<name>` typedef for, which is what tp_btf attaches
/// to. Collected from the NUL-separated string sections: a name is there
/// exactly when the typedef is, and splitting bytes cannot panic on odd files.
pub fn btf_tracepoints(dir: &Path) -> HashSet<String> {
    let mut out = HashSet::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(data) = std::fs::read(e.path()) else {
            continue;
        };
        for s in data.split(|b| *b == 0) {
            if let Some(name) = s.strip_prefix(b"btf_trace_") {
                out.insert(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    out
}

/// Turn on the kernel's per-program run-time accounting (BPF_ENABLE_STATS)
/// for as long as the returned descriptor is open. It costs two clock reads
/// per program run, so overhead comparisons run without it.
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr { struct { __u32 type; } enable_stats; }: type 0 is
    // BPF_STATS_RUN_TIME; the rest of the attr must be zero.
    let attr = [0u8; 16];
    // SAFETY: bpf(2) reads `size` bytes of attr, which we own; on success
    // it returns a new descriptor that we alone own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            attr.len() as u32,
        )
    };
    if fd < 0 {
        bail!(
            "BPF_ENABLE_STATS failed: {} (needs CAP_SYS_ADMIN, kernel 5.8+)",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: fd is a fresh descriptor returned to us by the kernel.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Slots in the pid-indexed `task_state` map: the kernel's pid_max (a wake
/// of a higher pid, possible only if pid_max is raised while we run, is
/// counted as a drop).
pub fn task_slots() -> u32 {
    const KERNEL_LIMIT: u32 = 1 << 22; // PID_MAX_LIMIT on 64-bit
    livehost_common::sysfs::read_text("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .map_or(KERNEL_LIMIT, |n| n.clamp(301, KERNEL_LIMIT))
}
