//! What a real container's process may do: the capability set it keeps
//! (bounding, effective, permitted; nothing inheritable or ambient),
//! `no_new_privs`, and a seccomp filter (built with seccompiler) that
//! refuses the system calls a container has no business making.

use anyhow::{Context, Result};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;

/// The capabilities a container keeps: the default set Docker and
/// containerd hand runc (`CapEff: 00000000a80425fb`). Everything else,
/// CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_BOOT, CAP_SYS_PTRACE, CAP_BPF
/// and CAP_PERFMON included, is dropped from every set.
pub const KEPT_CAPS: &[(&str, u32)] = &[
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_RAW", 13),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_MKNOD", 27),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_SETFCAP", 31),
];

const CAP_SYS_CHROOT: u32 = 18;

/// [`KEPT_CAPS`] as a mask, the way /proc/PID/status prints `CapEff`.
pub fn kept_mask() -> u64 {
    KEPT_CAPS.iter().fold(0, |m, &(_, c)| m | 1 << c)
}

/// System calls the filter refuses with EPERM: kexec, kernel modules,
/// reboot, mounting and namespace changes, ptrace and other processes'
/// memory, bpf, perf events, the kernel keyring, swap, clock and
/// accounting changes, raw I/O ports.
pub const DENIED_SYSCALLS: &[(&str, libc::c_long)] = &[
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("reboot", libc::SYS_reboot),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("fsopen", libc::SYS_fsopen),
    ("fsmount", libc::SYS_fsmount),
    ("fsconfig", libc::SYS_fsconfig),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("syslog", libc::SYS_syslog),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("quotactl", libc::SYS_quotactl),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
];

/// Everything the child applies just before exec, prepared before the
/// clone (the filters are compiled here, in the parent).
pub(crate) struct Privileges {
    keep: u64,
    last_cap: u32,
    filters: Vec<BpfProgram>,
}

impl Privileges {
    /// `no_chroot`: also drop CAP_SYS_CHROOT and refuse chroot(2) (a root
    /// entered by chroot instead of pivot_root must not be left by it).
    pub(crate) fn new(no_chroot: bool) -> Result<Privileges> {
        let last_cap = livehost_common::sysfs::read_text("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(40)
            .min(63);
        let chroot = 1u64 << CAP_SYS_CHROOT;
        Ok(Privileges {
            keep: if no_chroot {
                kept_mask() & !chroot
            } else {
                kept_mask()
            },
            last_cap,
            filters: filters(no_chroot)?,
        })
    }

    /// Drop every capability not kept from the bounding set, clear the
    /// ambient set, set effective = permitted = kept and inheritable =
    /// none, set no_new_privs and install the filters. After this, exec by
    /// uid 0 gives the program exactly the bounding set.
    ///
    /// # Safety
    /// Call only in a child between clone and exec.
    pub(crate) unsafe fn apply(&self) -> Result<(), isize> {
        use crate::namespaces::status;
        // SAFETY: prctl and capset on this thread, with values we own.
        unsafe {
            for cap in 0..=self.last_cap {
                if self.keep & (1 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                    && *libc::__errno_location() != libc::EINVAL
                {
                    return Err(status::CAPABILITIES);
                }
            }
            // Older kernels lack ambient capabilities (EINVAL): nothing to clear.
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
            let header = CapHeader {
                version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
                pid: 0,
            };
            let (lo, hi) = (self.keep as u32, (self.keep >> 32) as u32);
            let data = [
                CapData {
                    effective: lo,
                    permitted: lo,
                    inheritable: 0,
                },
                CapData {
                    effective: hi,
                    permitted: hi,
                    inheritable: 0,
                },
            ];
            if libc::syscall(libc::SYS_capset, &header, data.as_ptr()) != 0 {
                return Err(status::CAPABILITIES);
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(status::NO_NEW_PRIVS);
            }
        }
        for f in &self.filters {
            if seccompiler::apply_filter(f).is_err() {
                return Err(status::SECCOMP);
            }
        }
        Ok(())
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Two filters: [`DENIED_SYSCALLS`] and clone(2) asking for a new user
/// namespace get EPERM; clone3 gets ENOSYS (its flags sit behind a pointer
/// a filter cannot read, and ENOSYS is what makes C libraries fall back to
/// clone, which the first filter checks), as Docker's profile does.
fn filters(no_chroot: bool) -> Result<Vec<BpfProgram>> {
    let arch = seccompiler::TargetArch::try_from(std::env::consts::ARCH)
        .context("no seccomp filter for this architecture")?;
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = DENIED_SYSCALLS
        .iter()
        .map(|&(_, nr)| (nr, vec![]))
        .collect();
    if no_chroot {
        denied.insert(libc::SYS_chroot, vec![]);
    }
    let newuser = libc::CLONE_NEWUSER as u64;
    denied.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(newuser),
            newuser,
        )?])?],
    );
    let eperm = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok(vec![eperm.try_into()?, clone3.try_into()?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_set_is_the_documented_mask() {
        assert_eq!(kept_mask(), 0xa804_25fb);
    }

    #[test]
    fn filters_compile() {
        let f = filters(false).unwrap();
        assert_eq!(f.len(), 2);
        assert!(filters(true).unwrap()[0].len() > f[0].len());
        assert!(f.iter().all(|p| !p.is_empty()));
    }
}
