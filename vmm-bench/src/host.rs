//! Facts about the host every report records, and process memory figures.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub host_is_guest: bool,
}

pub fn host_info() -> HostInfo {
    let cpuinfo = livehost_common::sysfs::read_text("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let host_is_guest = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    HostInfo {
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel,
        host_is_guest,
    }
}

/// A `kB` field of a /proc/<pid>/status text, in bytes. None on garbage.
pub fn status_field_bytes(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// This process's resident set size.
pub fn self_rss_bytes() -> Option<u64> {
    let s = livehost_common::sysfs::read_text("/proc/self/status").ok()?;
    status_field_bytes(&s, "VmRSS")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing_survives_garbage() {
        assert_eq!(
            status_field_bytes("VmRSS:\t  1234 kB\n", "VmRSS"),
            Some(1234 * 1024)
        );
        assert_eq!(status_field_bytes("VmRSS: lots\n", "VmRSS"), None);
        assert_eq!(status_field_bytes("\u{0}\u{ff}garbage", "VmRSS"), None);
        assert_eq!(status_field_bytes("VmRSS: 5", "VmRSS"), None);
    }
}
