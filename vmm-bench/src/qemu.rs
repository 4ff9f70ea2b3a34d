//! QEMU runners: the unikernel through the PVH entry (`-kernel`), and the
//! Debian kernel booting the static workload as `/init`. Both run under the
//! accelerator [`choose_accel`] picks from the KVM probe (TCG on this
//! project's machines, since a Linux guest never gets past real-mode set-up
//! on their emulating nested KVM). QEMU is configured and started through
//! kernel-tests' launcher ([`QemuConfig`]), the initramfs written by its
//! cpio writer; what is vmm-bench's own is the console watch that times
//! the result line.

use crate::container::{Reaper, drain};
use crate::vm::probe::Accel;
use anyhow::{Context, Result, bail};
use kernel_tests::initramfs::Initramfs;
use kernel_tests::qemu::{self as launcher, QemuConfig};
use serde::Serialize;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub use kernel_tests::qemu::QEMU;

#[derive(Debug, Clone, Serialize)]
pub struct QemuRun {
    pub accel: Accel,
    /// The workload's result line from the serial console.
    pub line: String,
    pub exit_code: i32,
    /// Launch to the result line on the console, host clock.
    pub to_result_us: f64,
    /// Launch to QEMU's exit, host clock.
    pub total_us: f64,
    pub max_rss_bytes: u64,
    pub guest_ram_bytes: u64,
}

/// Parse `key=value` out of a result line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

pub fn field_u64(line: &str, key: &str) -> Option<u64> {
    let v = field(line, key)?;
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// The accelerator QEMU gets: KVM only where our probe saw guests run
/// natively on it (hardware or a nested KVM that does not emulate); an
/// emulating nested KVM cannot boot Linux, so those hosts get TCG.
pub fn choose_accel(kvm: Option<Accel>) -> Accel {
    match kvm {
        Some(a @ (Accel::HardwareKvm | Accel::NestedKvm)) => a,
        _ => Accel::Tcg,
    }
}

/// The launcher's configuration for `kernel` under `accel`, `ram_mb` of
/// RAM, console on stdout.
fn config(accel: Accel, kernel: PathBuf, ram_mb: u64, append: String) -> QemuConfig {
    let mut q = QemuConfig::new(accel.into(), kernel);
    q.memory_mb = ram_mb;
    q.append = append;
    q
}

fn spawn_and_watch(
    q: &QemuConfig,
    marker: &str,
    timeout: Duration,
    accel: Accel,
) -> Result<QemuRun> {
    watch(q.command()?, marker, timeout, q.memory_mb << 20, accel)
}

/// Run `cmd` (QEMU; tests use a shell) with its stdout and stderr piped,
/// stream its console (stdout) for `marker`, and drain its stderr at the
/// same time so QEMU's warnings, however many, never fill the pipe and
/// stall the guest.
fn watch(
    mut cmd: Command,
    marker: &str,
    timeout: Duration,
    ram: u64,
    accel: Accel,
) -> Result<QemuRun> {
    let launch = Instant::now();
    let mut child = cmd.spawn().with_context(|| {
        format!("cannot start {QEMU}: install qemu-system-x86 (Debian) and retry")
    })?;
    let reaper = Reaper::new(child.id() as i32);
    let out: OwnedFd = child.stdout.take().context("no stdout pipe")?.into();
    let err: OwnedFd = child.stderr.take().context("no stderr pipe")?.into();
    let deadline = crate::deadline(launch, timeout);
    let stderr = drain(err, deadline);
    // Stream the console so the result line's arrival time is known.
    let (tx, rx) = std::sync::mpsc::channel::<Instant>();
    let marker_s = marker.to_string();
    let reader = std::thread::spawn(move || -> Result<String> {
        let mut all = String::new();
        let mut seen = false;
        let mut buf = [0u8; 4096];
        use std::os::fd::AsRawFd;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut pfd = libc::pollfd {
                fd: out.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
            if r <= 0 {
                continue;
            }
            // SAFETY: reading into our buffer from our pipe.
            let n = unsafe { libc::read(out.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            if all.len() < 4 << 20 {
                all.push_str(&String::from_utf8_lossy(&buf[..n as usize]));
            }
            if !seen
                && all
                    .lines()
                    .any(|l| l.contains(&marker_s) && all.contains('\n'))
            {
                seen = true;
                let _ = tx.send(Instant::now());
            }
        }
        Ok(all)
    });
    let waited = reaper.wait(deadline);
    let total_us = launch.elapsed().as_secs_f64() * 1e6;
    let console = reader
        .join()
        .map_err(|_| anyhow::anyhow!("console reader panicked"))??;
    let stderr = stderr.join().unwrap_or_default();
    let (code, rss) = waited
        .with_context(|| format!("QEMU ran past {timeout:?}; console: {}", tail(&console)))?;
    let line = console
        .lines()
        .find(|l| l.contains(marker))
        .map(|l| l[l.find(marker).unwrap_or(0)..].trim().to_string())
        .with_context(|| {
            format!(
                "no {marker} line on the console (QEMU exit {code}); stderr: {} console: {}",
                tail(&stderr),
                tail(&console)
            )
        })?;
    let at = rx
        .try_recv()
        .ok()
        .unwrap_or(launch + Duration::from_micros(total_us as u64));
    Ok(QemuRun {
        accel,
        line,
        exit_code: code,
        to_result_us: (at - launch).as_secs_f64() * 1e6,
        total_us,
        max_rss_bytes: rss,
        guest_ram_bytes: ram,
    })
}

fn tail(s: &str) -> String {
    let t: Vec<&str> = s.lines().rev().take(8).collect();
    t.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn write_temp(name: &str, bytes: &[u8]) -> Result<PathBuf> {
    crate::container::cached_file(name, bytes, 0o644)
}

/// Boot the unikernel in QEMU through its PVH note.
pub fn run_unikernel(
    image: &[u8],
    kib: u64,
    loops: u64,
    timeout: Duration,
    accel: Accel,
) -> Result<QemuRun> {
    // The PVH entry ignores a size it cannot hold: refuse it here instead.
    crate::check_kib(kib)?;
    let p = write_temp("unikernel.elf", image)?;
    let ram_mb = 16 + (kib >> 10) + 8;
    let mut q = config(accel, p, ram_mb, format!("kib={kib} loops={loops}"));
    q.devices
        .push("isa-debug-exit,iobase=0xf4,iosize=0x04".into());
    let r = spawn_and_watch(&q, "LIVEHOST-UK", timeout, accel)?;
    // isa-debug-exit: the guest wrote 0x10, QEMU exits with (0x10 << 1) | 1.
    if r.exit_code != 33 {
        bail!(
            "unikernel under QEMU exited with {} (want 33): {}",
            r.exit_code,
            r.line
        );
    }
    Ok(r)
}

/// A newc cpio archive (kernel-tests' writer) with `/init` (the static
/// workload), `/dev/console` and `/proc`: the kernel opens /dev/console for
/// init before anything could mount devtmpfs, so the node must be in the
/// archive.
pub fn initramfs(init: &[u8]) -> Vec<u8> {
    let build = || -> Result<Vec<u8>> {
        let mut ir = Initramfs::new();
        ir.char_dev("/dev/console", 5, 1, 0o600)?;
        ir.dir("/proc")?;
        ir.file("/init", init.to_vec(), 0o755)?;
        ir.to_bytes()
    };
    // Fixed absolute paths written to memory: nothing here can fail.
    build().expect("an in-memory archive of fixed paths")
}

#[derive(Debug, Clone, Serialize)]
pub struct LinuxImage {
    /// The guest kernel's release.
    pub release: String,
    pub bzimage: PathBuf,
    pub bzimage_bytes: u64,
    pub initramfs_bytes: u64,
}

/// Fetch the Debian kernel through kernel-tests (cached after the first
/// call) and size it.
pub fn linux_image() -> Result<LinuxImage> {
    let k = kernel_tests::fetch(&kernel_tests::KernelSpec::default())
        .context("cannot fetch the Debian kernel (kernel-tests); the QEMU-Linux row needs it")?;
    let bzimage_bytes = std::fs::metadata(&k.bzimage)?.len();
    Ok(LinuxImage {
        release: k.release,
        bzimage: k.bzimage,
        bzimage_bytes,
        initramfs_bytes: initramfs(crate::LINUX_INIT).len() as u64,
    })
}

/// Boot the Debian kernel with the workload as init.
pub fn run_linux(
    img: &LinuxImage,
    kib: u64,
    loops: u64,
    timeout: Duration,
    accel: Accel,
) -> Result<QemuRun> {
    crate::check_kib(kib)?;
    let initrd = write_temp("initramfs.cpio", &initramfs(crate::LINUX_INIT))?;
    let ram_mb = 256 + (kib >> 10);
    let append = format!(
        "console=ttyS0 panic=-1 quiet loglevel=1 rdinit=/init -- kib={kib} loops={loops} --reboot"
    );
    let mut q = config(accel, img.bzimage.clone(), ram_mb, append);
    q.initrd = Some(initrd);
    spawn_and_watch(&q, "LIVEHOST-LX", timeout, accel)
}

/// True when QEMU is installed.
pub fn qemu_available() -> bool {
    launcher::available()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that writes far more than a pipe buffer (64 KiB) to stderr
    /// before its result line must not stall: stderr is drained while the
    /// console is read.
    #[test]
    fn a_noisy_stderr_does_not_stall_the_console() {
        let script =
            "head -c 1000000 /dev/zero | tr '\\0' w >&2; echo LIVEHOST-UK checksum=0x1; exit 33";
        let t = Instant::now();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        launcher::dies_with_parent(&mut cmd);
        let r = watch(cmd, "LIVEHOST-UK", Duration::from_secs(20), 0, Accel::Tcg).unwrap();
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(r.exit_code, 33);
        assert_eq!(field_u64(&r.line, "checksum"), Some(1), "{}", r.line);
    }
}
