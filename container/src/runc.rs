//! runc: find it, generate a bundle (busybox plus an init), run it once
//! with its own state directory and delete the container afterwards.

use crate::cleanup::live;
use crate::pipe::{drain, read_until};
use crate::reap::Reaper;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where `runc` is, if installed: `$VMM_BENCH_RUNC` when set (a path; one
/// that is not a file means "no runc"), else the first `runc` on PATH.
pub fn find_runc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VMM_BENCH_RUNC") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("runc"))
        .find(|p| p.is_file())
}

/// A generated OCI bundle in a fresh private temporary directory: busybox
/// (when installed) plus `init` as `/init`, and a config.json running it.
pub struct Bundle {
    pub dir: tempfile::TempDir,
    pub rootfs_bytes: u64,
}

impl Bundle {
    /// A bundle whose container runs `init` (a static executable) with
    /// `args`, with a read-only rootfs, its own pid, mount, ipc and uts
    /// namespaces, /proc and a tmpfs /tmp.
    pub fn new(init: &[u8], args: &[String]) -> Result<Bundle> {
        let dir = tempfile::Builder::new()
            .prefix("livehost-runc-")
            .tempdir()
            .context("cannot create a bundle directory")?;
        let rootfs = dir.path().join("rootfs");
        for d in ["bin", "proc", "dev", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d))?;
        }
        write_executable(&rootfs.join("init"), init)?;
        let mut size = init.len() as u64;
        // A busybox userland makes the rootfs what a minimal real image holds.
        if let Ok(bb) = std::fs::read("/bin/busybox") {
            size += bb.len() as u64;
            write_executable(&rootfs.join("bin/busybox"), &bb)?;
            std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh"))?;
        }
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec_pretty(&config(args))?,
        )?;
        Ok(Bundle {
            dir,
            rootfs_bytes: size,
        })
    }
}

fn write_executable(p: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(p, bytes)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The bundle's config.json: the same isolation our container gets
/// (see [`crate::Settings::runc`]): capabilities, masked and read-only
/// paths, namespaces, the seccomp deny list, limits.
fn config(args: &[String]) -> serde_json::Value {
    use crate::privileges::{DENIED_SYSCALLS, KEPT_CAPS};
    let mut argv = vec!["/init".to_string()];
    argv.extend(args.iter().cloned());
    let caps: Vec<&str> = KEPT_CAPS.iter().map(|&(n, _)| n).collect();
    let denied: Vec<&str> = DENIED_SYSCALLS.iter().map(|&(n, _)| n).collect();
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": argv,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": true,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "livehost-runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}, {"type": "cgroup"}],
            "resources": {"pids": {"limit": crate::limits::PIDS_MAX}},
            "maskedPaths": crate::rootfs::MASKED_PATHS,
            "readonlyPaths": crate::rootfs::READONLY_PATHS,
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [
                    {"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM},
                    {"names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM,
                     "args": [{"index": 0, "value": libc::CLONE_NEWUSER, "valueTwo": libc::CLONE_NEWUSER, "op": "SCMP_CMP_MASKED_EQ"}]},
                    {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS}
                ]
            }
        }
    })
}

/// A runc container that a stop signal must delete (see
/// [`crate::clean_up_on_stop_signals`]).
#[derive(Clone, PartialEq)]
pub(crate) struct RuncLive {
    runc: PathBuf,
    state: PathBuf,
    id: String,
    pub(crate) bundle: PathBuf,
}

impl RuncLive {
    /// `runc delete --force`: kills the container's processes and removes
    /// its state. Errors are ignored: there may be nothing left to delete.
    pub(crate) fn delete(&self) {
        let _ = std::process::Command::new(&self.runc)
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "--force", &self.id])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RuncRun {
    pub stdout: String,
    pub exit_code: i32,
    pub total_us: f64,
    /// CLOCK_MONOTONIC at `runc run`, ns.
    pub launch_mono_ns: u64,
    pub max_rss_bytes: u64,
}

/// `runc run` the bundle once, with its own state directory; the container
/// is force-deleted afterwards whatever happened.
pub fn run_runc(runc: &Path, bundle: &Bundle, timeout: Duration) -> Result<RuncRun> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let id = format!(
        "livehost-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let state = bundle.dir.path().join("state");
    let container = RuncLive {
        runc: runc.to_path_buf(),
        state: state.clone(),
        id: id.clone(),
        bundle: bundle.dir.path().to_path_buf(),
    };
    let launch_mono_ns = livehost_common::monotonic_ns();
    let launch = Instant::now();
    let mut cmd = std::process::Command::new(runc);
    crate::reap::die_with_parent(&mut cmd);
    let mut child = cmd
        .arg("--root")
        .arg(&state)
        .args(["run", "--bundle"])
        .arg(bundle.dir.path())
        .arg(&id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", runc.display()))?;
    live().runc.push(container.clone());
    let reaper = Reaper::new(child.id() as i32);
    let out: OwnedFd = child.stdout.take().context("no stdout pipe")?.into();
    let err: OwnedFd = child.stderr.take().context("no stderr pipe")?.into();
    let deadline = crate::deadline(launch, timeout);
    // Both pipes at once: runc (or the container) writing more than a pipe
    // buffer to one must not stall while we wait on the other.
    let stderr = drain(err, deadline);
    let stdout = read_until(out, deadline);
    let waited = reaper.wait(deadline);
    let stderr = stderr.join().unwrap_or_default();
    let total_us = launch.elapsed().as_secs_f64() * 1e6;
    // Under the registry's lock, so a stop signal's clean-up never races it.
    {
        let mut l = live();
        container.delete();
        l.runc.retain(|r| *r != container);
    }
    let (code, rss) = waited?;
    if code != 0 {
        let last: Vec<&str> = stderr.trim().lines().rev().take(8).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        bail!("runc exited with {code}: {}", last.join(" | "));
    }
    Ok(RuncRun {
        stdout: stdout?,
        exit_code: code,
        total_us,
        launch_mono_ns,
        max_rss_bytes: rss,
    })
}
