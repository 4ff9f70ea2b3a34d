//! Facts about the host every report records, and process memory figures.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub cpu_model: String,
    pub cpus: usize,
    /// The kernel release (`uname -r`).
    pub release: String,
    pub host_is_guest: bool,
}

/// The facts of [`livehost_common::host::Host::probe`] a report records.
pub fn host_info() -> HostInfo {
    let h = livehost_common::host::Host::probe();
    HostInfo {
        cpu_model: h.cpu_model,
        cpus: h.cpus,
        release: h.release,
        host_is_guest: h.hypervisor_flag,
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
