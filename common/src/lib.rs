//! Helpers shared by every livehost crate.
//!
//! Kept deliberately small: progress lines for long work, bounded reads of
//! kernel-provided text files (`/proc`, sysfs), a monotonic clock helper and
//! the process exit-code conventions the binaries share.

pub mod base64;
pub mod container;
pub mod elf;
pub mod exit;
pub mod host;
pub mod lock;
pub mod progress;
pub mod sysfs;

/// Nanoseconds on `CLOCK_MONOTONIC`, the clock every livehost timing uses so
/// that numbers from different crates (and from BPF's `bpf_ktime_get_ns`) can
/// be compared directly.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Milliseconds since the Unix epoch (wall clock, 0 if the clock is before
/// 1970): the timestamp livehost puts in JSON so that records written by
/// different tools on one machine line up.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// True when the effective user is root; most livehost operations need it and
/// say so up front rather than failing half-way.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
