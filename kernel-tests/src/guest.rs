//! Booting a guest and running one command in it.
//!
//! The command's output and status come back on a second serial port
//! (`ttyS1`), framed and base64-encoded by our init, so they are byte-exact
//! and never confused with kernel messages on the console (`ttyS0`). The
//! console is captured whole: it is what tells a panic or an oops apart.
//!
//! The pieces live in modules of their own: [`crate::rootfs`] builds the
//! archive, [`crate::qemu`] turns a [`QemuConfig`] into QEMU's arguments,
//! [`crate::frame`] parses the report, [`crate::run_dir`] holds the run's
//! files and guest slot. This module puts them in order.

use crate::accel::{self, AccelChoice};
use crate::frame::{self, Frame, Marks, contains};
use crate::kernel::{self, GuestKernel, KernelSpec};
use crate::qemu::{Accel, QemuConfig, Serial};
use crate::run_dir::{RunDir, qemu_slot};
use anyhow::{Context, Result, bail};
use livehost_common::progress::Progress;
use serde::Serialize;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// What to run, and in which guest.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The command; one element is run by `/bin/sh -c`, several are argv.
    pub command: Vec<String>,
    pub kernel: KernelSpec,
    pub accel: AccelChoice,
    /// Kernel modules to load before the command (names as `modprobe` takes
    /// them); their dependencies come along from `modules.dep`.
    pub modules: Vec<String>,
    /// Host files to copy in: (host path, absolute guest path). Programs get
    /// their shared libraries too.
    pub files: Vec<(PathBuf, String)>,
    /// Load KVM in the guest (`kvm_amd` on the emulated SVM of `-cpu max`).
    pub with_kvm: bool,
    /// The command's time limit, enforced inside the guest.
    pub timeout: Duration,
    pub memory_mb: u32,
    pub cpus: u32,
    /// Kernel config options the run needs (`CONFIG_LIVEPATCH`, ...).
    pub require_config: Vec<String>,
    /// Extra kernel command-line arguments.
    pub kernel_args: Vec<String>,
    /// Environment variables for the command.
    pub env: Vec<(String, String)>,
    /// Report progress on stderr.
    pub progress: bool,
    /// The host's backstop: a guest with no result this long after QEMU
    /// started is declared hung and killed. `None`: a boot budget for the
    /// accelerator (90 s TCG, 45 s KVM) plus `timeout` plus 30 s.
    pub hang_after: Option<Duration>,
}

impl RunOptions {
    pub fn new<I, S>(command: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RunOptions {
            command: command.into_iter().map(Into::into).collect(),
            kernel: KernelSpec::default(),
            accel: AccelChoice::Auto,
            modules: Vec::new(),
            files: Vec::new(),
            with_kvm: false,
            timeout: Duration::from_secs(60),
            memory_mb: 1024,
            cpus: 2,
            require_config: Vec::new(),
            kernel_args: Vec::new(),
            env: Vec::new(),
            progress: false,
            hang_after: None,
        }
    }

    /// Convenience: copy a host file into the guest.
    pub fn file(mut self, host: impl Into<PathBuf>, guest: impl Into<String>) -> Self {
        self.files.push((host.into(), guest.into()));
        self
    }
}

/// How the guest run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "code", rename_all = "snake_case")]
pub enum GuestStatus {
    /// The command ran to completion with this exit status.
    Exited(i32),
    /// The command ran past its time limit and was killed in the guest.
    Timeout,
    /// The kernel panicked.
    Panic,
    /// The guest stopped responding (no result before the host's deadline).
    Hang,
    /// Setting up the guest failed before the command ran (a module did not
    /// load, say); the reason is in `stderr`.
    SetupFailed,
    /// QEMU exited without a result and without a panic on the console.
    NoResult,
}

impl GuestStatus {
    /// The exit code the `kernel-tests` binary uses for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            GuestStatus::Exited(c) => *c,
            GuestStatus::Timeout | GuestStatus::Hang => livehost_common::exit::TIMEOUT,
            GuestStatus::Panic => livehost_common::exit::GUEST_PANIC,
            GuestStatus::SetupFailed | GuestStatus::NoResult => {
                livehost_common::exit::GUEST_SETUP_FAILED
            }
        }
    }
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BootTimings {
    /// Host: QEMU launch until the kernel's clock started (QEMU and firmware).
    pub qemu_start_ms: Option<f64>,
    /// Guest: kernel start until our init ran.
    pub kernel_boot_ms: Option<f64>,
    /// Guest: init start until the command started (mounts, modules).
    pub init_to_command_ms: Option<f64>,
    /// Host: QEMU launch until the command started.
    pub boot_to_command_ms: Option<f64>,
    /// Guest: the command's own run time.
    pub command_ms: Option<f64>,
    /// Host: QEMU launch until QEMU exited.
    pub total_ms: f64,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    pub status: GuestStatus,
    pub stdout: String,
    pub stderr: String,
    /// Guest `dmesg` after the command (empty after a panic or hang; see
    /// `console` then).
    pub dmesg: String,
    /// The whole serial console.
    pub console: String,
    /// The kernel printed an oops, BUG or warning splat.
    pub oops: bool,
    pub accel: Accel,
    pub accel_reason: String,
    /// How the kernel was started: `pvh` (its ELF at the PVH entry), or
    /// `bzimage` with the reason PVH was not possible.
    pub boot: String,
    pub release: String,
    pub timings: BootTimings,
}

impl RunOutcome {
    /// The last `n` lines of the console, for error messages.
    pub fn console_tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `Ok(stdout)` when the command exited 0, else an error with the
    /// status, stderr and console tail (handy in tests).
    pub fn success(&self) -> Result<&str> {
        if self.status == GuestStatus::Exited(0) {
            return Ok(&self.stdout);
        }
        bail!(
            "guest command ended with {:?}\n--- stdout\n{}\n--- stderr\n{}\n--- console (last 40 lines)\n{}",
            self.status,
            self.stdout,
            self.stderr,
            self.console_tail(40)
        )
    }
}

/// Boot a guest, run the command, return what happened.
pub fn run(opts: &RunOptions) -> Result<RunOutcome> {
    let progress = if opts.progress {
        Progress::new("guest")
    } else {
        Progress::silent()
    };
    let result = run_with(opts, &progress);
    progress.finish();
    result
}

/// What a run needs before QEMU starts.
struct Prepared {
    kernel: GuestKernel,
    accel: Accel,
    reason: String,
    run_dir: RunDir,
    console_log: PathBuf,
    result_log: PathBuf,
    /// The secret init stamps its report with (see `frame`).
    nonce: String,
}

fn run_with(opts: &RunOptions, progress: &Progress) -> Result<RunOutcome> {
    if opts.command.is_empty() {
        bail!("no command to run in the guest");
    }
    // Before the kernel download and the archive: say what is missing first.
    crate::qemu::binary()?;
    let p = prepare(opts, progress)?;
    let (qemu, boot) = qemu_config(opts, &p, progress);
    let mut cmd = qemu.command()?;
    let _slot = qemu_slot(progress)?;
    progress.step(format!("booting {} under {}", p.kernel.release, p.accel));
    let launched = Instant::now();
    let child = cmd.spawn().context("cannot start QEMU")?;
    let watched = watch(ChildGuard(Some(child)), opts, &p, launched, progress)?;
    outcome(p, boot, watched, launched)
}

/// Fetch the kernel, pick the accelerator, build the initramfs.
fn prepare(opts: &RunOptions, progress: &Progress) -> Result<Prepared> {
    let kernel = kernel::fetch_with(&opts.kernel, progress)?;
    let mut required = opts.require_config.clone();
    let mut modules = opts.modules.clone();
    if opts.with_kvm {
        required.push("CONFIG_KVM".into());
        modules.push("kvm".into());
        modules.push(accel::kvm_vendor_module(opts.accel).into());
    }
    kernel.require_config(&required)?;
    let (accel, reason) = accel::resolve(opts.accel)?;
    progress.note(format!("accelerator: {reason}"));

    progress.step("building initramfs");
    let run_dir = RunDir::new()?;
    let nonce = frame::new_nonce()?;
    crate::rootfs::build(
        opts,
        &kernel,
        &modules,
        &nonce,
        &run_dir.path.join("initramfs.cpio"),
    )?;
    let console_log = run_dir.path.join("console.log");
    let result_log = run_dir.path.join("result.log");
    std::fs::write(&result_log, b"")?;
    Ok(Prepared {
        kernel,
        accel,
        reason,
        run_dir,
        console_log,
        result_log,
        nonce,
    })
}

/// The kernel command line every guest gets, then the caller's arguments.
fn kernel_cmdline(extra: &[String]) -> String {
    let mut cmdline: Vec<&str> = vec![
        "console=ttyS0",
        "panic=-1",
        // A kernel oops must stay visible but not kill a test that expects
        // one (a panicking test asks for it): no oops=panic by default.
        "quiet",
        "loglevel=4",
        "no_timer_check",
        "tsc=reliable",
        "i8042.noaux",
        "i8042.nomux",
        "i8042.nopnp",
        "8250.nr_uarts=2",
        "random.trust_cpu=on",
        // The crypto self-tests cost ~0.1-0.3 s of every TCG boot and test
        // the kernel's crypto, not the code under test.
        "cryptomgr.notests",
        "rdinit=/init",
    ];
    cmdline.extend(extra.iter().map(String::as_str));
    cmdline.join(" ")
}

/// The QEMU configuration for this run, and how the kernel boots: `pvh`
/// (no real-mode set-up, no self-decompression, see pvh.rs; with qboot as
/// firmware) or `bzimage` with the reason PVH was not possible.
fn qemu_config(opts: &RunOptions, p: &Prepared, progress: &Progress) -> (QemuConfig, String) {
    let (pvh, boot) = if std::env::var_os("LIVEHOST_NO_PVH").is_some_and(|v| !v.is_empty()) {
        (None, "bzimage (LIVEHOST_NO_PVH is set)".to_string())
    } else {
        match crate::pvh::image_for(&p.kernel.bzimage) {
            Ok(i) => (Some(i), "pvh".to_string()),
            Err(e) => {
                progress.note(format!("booting the bzImage (no PVH image: {e:#})"));
                (None, format!("bzimage ({e:#})"))
            }
        }
    };
    let mut q = QemuConfig::new(p.accel, pvh.as_ref().unwrap_or(&p.kernel.bzimage));
    q.machine = Some("q35".into());
    q.memory_mb = opts.memory_mb.into();
    q.cpus = opts.cpus;
    q.bios = pvh.as_ref().and_then(|_| crate::qemu::qboot());
    q.initrd = Some(p.run_dir.path.join("initramfs.cpio"));
    q.append = kernel_cmdline(&opts.kernel_args);
    q.serial = vec![
        Serial::File(p.console_log.clone()),
        Serial::File(p.result_log.clone()),
    ];
    (q, boot)
}

/// Kills QEMU if we unwind or return early.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What watching the guest saw from the host.
struct Watched {
    hung: bool,
    init_wall: Option<Instant>,
    cmd_wall: Option<Instant>,
    total: Duration,
    qemu_stderr: String,
}

/// Follow the result port until the report is in, QEMU exits, or the
/// host's backstop deadline passes.
fn watch(
    mut guard: ChildGuard,
    opts: &RunOptions,
    p: &Prepared,
    launched: Instant,
    progress: &Progress,
) -> Result<Watched> {
    // Boot budget: TCG boots in seconds, but a loaded CI machine is slow;
    // the command's own timeout is enforced in the guest, this is the
    // backstop for a guest that stops responding.
    let boot_budget = match p.accel {
        Accel::Tcg => Duration::from_secs(90),
        Accel::Kvm => Duration::from_secs(45),
    };
    let deadline = launched
        + opts
            .hang_after
            .unwrap_or(boot_budget + opts.timeout + Duration::from_secs(30));
    let marks = Marks::new(&p.nonce);
    let (mut init_wall, mut cmd_wall, mut hung) = (None, None, false);
    let exit_status: Option<ExitStatus> = loop {
        let child = guard
            .0
            .as_mut()
            .expect("the guard holds QEMU until the end");
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        let text = std::fs::read(&p.result_log).unwrap_or_default();
        if init_wall.is_none() && contains(&text, &marks.init) {
            init_wall = Some(Instant::now());
            progress.step("guest init running");
        }
        if cmd_wall.is_none() && contains(&text, &marks.cmd) {
            cmd_wall = Some(Instant::now());
            progress.step(format!("running `{}`", opts.command.join(" ")));
        }
        // The whole report is in: the guest's own shutdown adds nothing.
        if contains(&text, &marks.end) {
            let _ = child.kill();
            break child.wait().ok();
        }
        if Instant::now() >= deadline {
            hung = true;
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let total = launched.elapsed();
    let mut qemu_stderr = String::new();
    if let Some(mut c) = guard.0.take() {
        if exit_status.is_none() {
            let _ = c.kill();
        }
        let _ = c.wait();
        if let Some(mut e) = c.stderr.take() {
            let _ = e.read_to_string(&mut qemu_stderr);
        }
    }
    Ok(Watched {
        hung,
        init_wall,
        cmd_wall,
        total,
        qemu_stderr,
    })
}

fn read_log(path: &std::path::Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).replace('\r', "")
}

/// The run's status from the report, the console and the watch.
fn status(frame: &Frame, console: &str, hung: bool) -> GuestStatus {
    if let Some(s) = frame.status.clone() {
        s
    } else if console.contains("Kernel panic - not syncing") {
        GuestStatus::Panic
    } else if hung {
        GuestStatus::Hang
    } else if frame.setup_failure.is_some() {
        GuestStatus::SetupFailed
    } else {
        GuestStatus::NoResult
    }
}

/// Where the time went, from the guest's uptimes and the host's clock.
fn timings(frame: &Frame, w: &Watched, launched: Instant) -> BootTimings {
    let mut t = BootTimings {
        total_ms: ms(w.total),
        ..Default::default()
    };
    if let (Some(up), Some(at)) = (frame.uptime_init, w.init_wall) {
        t.kernel_boot_ms = Some(up * 1000.0);
        t.qemu_start_ms = Some((ms(at - launched) - up * 1000.0).max(0.0));
    }
    if let (Some(a), Some(b)) = (frame.uptime_init, frame.uptime_cmd) {
        t.init_to_command_ms = Some((b - a) * 1000.0);
    }
    t.boot_to_command_ms = w.cmd_wall.map(|at| ms(at - launched));
    if let (Some(a), Some(b)) = (frame.uptime_cmd, frame.uptime_end) {
        t.command_ms = Some((b - a) * 1000.0);
    }
    t
}

fn outcome(p: Prepared, boot: String, w: Watched, launched: Instant) -> Result<RunOutcome> {
    let console = read_log(&p.console_log);
    let frame = frame::parse_result(&read_log(&p.result_log), &p.nonce);
    let oops = [
        "Oops:",
        "BUG:",
        "general protection fault",
        "------------[ cut here ]",
    ]
    .iter()
    .any(|m| console.contains(m) || frame.dmesg.contains(m));
    let status = status(&frame, &console, w.hung);
    if status == GuestStatus::NoResult && !w.qemu_stderr.trim().is_empty() {
        bail!("QEMU failed: {}", w.qemu_stderr.trim());
    }
    let timings = timings(&frame, &w, launched);
    let stderr = match (&status, frame.setup_failure) {
        (GuestStatus::SetupFailed, Some(why)) => why,
        _ => frame.stderr,
    };
    Ok(RunOutcome {
        status,
        stdout: frame.stdout,
        stderr,
        dmesg: frame.dmesg,
        console,
        oops,
        accel: p.accel,
        accel_reason: p.reason,
        boot,
        release: p.kernel.release.clone(),
        timings,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The modules to load, dependencies first (see [`crate::rootfs`]).
pub use crate::rootfs::module_order;
