//! What isolation a container run had, as the report prints it: one
//! record per path (our container, our namespaced process, runc), so a
//! table can set them side by side.

use crate::namespaces::Mode;
use crate::privileges::{DENIED_SYSCALLS, KEPT_CAPS, kept_mask};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub mode: String,
    pub rootfs: String,
    pub dev: String,
    pub proc: String,
    pub sys: String,
    pub cgroup_namespace: bool,
    /// The limits written to the leaf, or why there are none.
    pub limits: String,
    pub capabilities: String,
    pub no_new_privs: bool,
    pub seccomp: String,
}

fn caps() -> String {
    format!(
        "{:#010x} ({} kept, Docker's default set)",
        kept_mask(),
        KEPT_CAPS.len()
    )
}

fn seccomp() -> String {
    format!(
        "{} system calls and clone(CLONE_NEWUSER) get EPERM, clone3 ENOSYS",
        DENIED_SYSCALLS.len()
    )
}

impl Settings {
    /// Our launcher in `mode`, with `limits` as [`crate::limits::apply`] said.
    pub fn ours(mode: Mode, limits: &Result<Vec<String>, String>) -> Settings {
        let limits = match limits {
            Ok(l) => l.join(", "),
            Err(why) => why.clone(),
        };
        let s = match mode {
            Mode::Container => Settings {
                mode: mode.label().into(),
                rootfs: "read-only tmpfs with the host's busybox bound read-only, pivot_root"
                    .into(),
                dev: "own tmpfs: null zero full random urandom tty".into(),
                proc: "own; runc's masked paths, /proc/sys and sysrq-trigger read-only".into(),
                sys: "read-only sysfs, cgroup2 read-only".into(),
                cgroup_namespace: true,
                limits,
                capabilities: caps(),
                no_new_privs: true,
                seccomp: seccomp(),
            },
            Mode::NamespacedProcess => Settings {
                mode: mode.label().into(),
                rootfs: "the host's, read-write".into(),
                dev: "the host's".into(),
                proc: "own, unmasked".into(),
                sys: "the host's, read-write".into(),
                cgroup_namespace: false,
                limits,
                capabilities: "all of root's".into(),
                no_new_privs: false,
                seccomp: "none".into(),
            },
        };
        if mode == Mode::Container && !crate::rootfs::can_pivot() {
            return Settings {
                rootfs: "read-only tmpfs with the host's busybox bound read-only, moved over / + chroot (the host's root is the initial ramfs, where pivot_root is refused)".into(),
                capabilities: format!(
                    "{:#010x} (Docker's default set less CAP_SYS_CHROOT)",
                    kept_mask() & !(1 << 18)
                ),
                seccomp: format!("{}; chroot too", seccomp()),
                ..s
            };
        }
        s
    }

    /// runc with the bundle [`crate::Bundle`] writes (the same settings
    /// spelled in config.json; runc applies its limits through the cgroup
    /// manager it picks, so none are set there).
    pub fn runc() -> Settings {
        Settings {
            mode: "runc (OCI bundle)".into(),
            rootfs: "read-only bundle directory with busybox, pivot_root".into(),
            dev: "own tmpfs: runc's default devices".into(),
            proc: "own; the same masked and read-only paths".into(),
            sys: "read-only sysfs".into(),
            cgroup_namespace: true,
            limits: format!("pids.max={} (through runc)", crate::limits::PIDS_MAX),
            capabilities: caps(),
            no_new_privs: true,
            seccomp: seccomp(),
        }
    }
}
