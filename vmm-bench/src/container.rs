//! The benchmark's container paths: the workload run as a container by
//! livehost's launcher (the `livehost-container` crate, which also holds
//! runc, reaping and clean-up) and by runc with a generated bundle. The
//! launcher's general API is re-exported here for the CLI and the tests.

use anyhow::Result;
use livehost_container::launch::{self, Launch, Program};
use livehost_container::namespaces::Extra;
use livehost_container::sealed::SealedFile;
use std::path::PathBuf;
use std::time::Duration;

pub use livehost_container::pipe::{drain, read_until};
pub use livehost_container::{
    Bundle, CommandEnd, CommandOpts, ContainerRun, Mode, Reaper, RuncRun, Settings, cgroup2_root,
    find_runc, run_command, run_runc,
};

/// Options for one container run of the workload.
#[derive(Debug, Clone)]
pub struct ContainerOpts {
    pub args: Vec<String>,
    pub hostname: String,
    /// Also unshare the network namespace (costs a few ms more).
    pub net: bool,
    /// Also unshare a user namespace, mapping root to root (namespaced
    /// process only).
    pub user: bool,
    pub timeout: Duration,
    /// A real container (default) or a namespaced process.
    pub mode: Mode,
}

impl Default for ContainerOpts {
    fn default() -> Self {
        ContainerOpts {
            args: vec![],
            hostname: "livehost-ctr".into(),
            net: false,
            user: false,
            timeout: Duration::from_secs(10),
            mode: Mode::Container,
        }
    }
}

/// Prefix of the leaves [`run`] creates: `livehost-vmm-bench-PID-SEQ`.
const LEAF_PREFIX: &str = "livehost-vmm-bench-";

/// The static workload in a sealed memory file, made once per process: it
/// is executed from memory, never from a path another user could reach.
pub fn workload() -> Result<&'static SealedFile> {
    SealedFile::cached("workload", crate::LINUX_INIT, 0o755)
}

/// A path to a sealed in-memory copy of `bytes` (made once per process and
/// kept until it exits), for programs we start that take a file name (QEMU's
/// `-kernel`, `-initrd`): `/proc/PID/fd/N`, which only root and our own
/// uid can open, and whose content no one can change. It replaces a shared
/// cache directory under `$TMPDIR` that another user could create first.
pub fn cached_file(name: &str, bytes: &[u8], mode: u32) -> Result<PathBuf> {
    Ok(SealedFile::cached(name, bytes, mode)?.proc_path())
}

/// Remove leaves an earlier vmm-bench left behind (killed with SIGKILL, or
/// died before it could clean up). [`run`] does this once per process.
pub fn remove_stale_leaves() -> Vec<PathBuf> {
    livehost_container::remove_stale_leaves(LEAF_PREFIX)
}

/// SIGTERM, SIGINT and SIGHUP kill our children, delete our runc
/// containers and remove our cgroup leaves, then exit 128 + the signal
/// (see [`livehost_container::clean_up_on_stop_signals`]).
pub fn clean_up_on_stop_signals() -> Result<()> {
    livehost_container::clean_up_on_stop_signals("vmm-bench")
}

/// Run the workload in new pid, mount, uts and ipc namespaces (optionally
/// net and user), inside its own cgroup leaf, as a real container or a
/// namespaced process (`opts.mode`).
/// Everything is torn down before returning, also on timeout.
pub fn run(opts: &ContainerOpts) -> Result<ContainerRun> {
    static STALE: std::sync::Once = std::sync::Once::new();
    STALE.call_once(|| {
        remove_stale_leaves();
    });
    launch::run(&Launch {
        program: Program::Sealed(workload()?),
        args: opts.args.clone(),
        hostname: opts.hostname.clone(),
        extra: Extra {
            net: opts.net,
            user: opts.user,
        },
        timeout: opts.timeout,
        leaf_prefix: LEAF_PREFIX,
        mode: opts.mode,
    })
}

/// A runc bundle whose `/init` is the workload, run with `args`.
pub fn make_bundle(args: &[String]) -> Result<Bundle> {
    Bundle::new(crate::LINUX_INIT, args)
}
