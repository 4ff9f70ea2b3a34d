//! Booting a guest and running one command in it.
//!
//! The command's output and status come back on a second serial port
//! (`ttyS1`), framed and base64-encoded by our init, so they are byte-exact
//! and never confused with kernel messages on the console (`ttyS0`). The
//! console is captured whole: it is what tells a panic or an oops apart.

use crate::accel::{self, Accel, AccelChoice};
use crate::initramfs::Initramfs;
use crate::kernel::{self, GuestKernel, KernelSpec, cache_dir};
use anyhow::{Context, Result, anyhow, bail};
use livehost_common::lock::FileLock;
use livehost_common::progress::Progress;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    pub kernel_version: String,
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

fn run_with(opts: &RunOptions, progress: &Progress) -> Result<RunOutcome> {
    if opts.command.is_empty() {
        bail!("no command to run in the guest");
    }
    let qemu = which("qemu-system-x86_64").ok_or_else(|| {
        anyhow!("qemu-system-x86_64 is not installed: run `./x setup` (or apt-get install qemu-system-x86)")
    })?;
    let kernel = kernel::fetch_with(&opts.kernel, progress)?;
    let mut required = opts.require_config.clone();
    if opts.with_kvm {
        required.push("CONFIG_KVM".into());
    }
    kernel.require_config(&required)?;

    let mut modules = opts.modules.clone();
    if opts.with_kvm {
        modules.push("kvm".into());
        modules.push(kvm_vendor_module(opts.accel).into());
    }
    let (accel, reason) = accel::resolve(opts.accel)?;
    progress.note(format!("accelerator: {reason}"));

    progress.step("building initramfs");
    let run_dir = RunDir::new()?;
    let initrd = run_dir.path.join("initramfs.cpio");
    build_initramfs(opts, &kernel, &modules, &initrd)?;

    let console_log = run_dir.path.join("console.log");
    let result_log = run_dir.path.join("result.log");
    std::fs::write(&result_log, b"")?;
    let mut cmdline = vec![
        "console=ttyS0".to_string(),
        "panic=-1".into(),
        "oops=panic".into(),
        "quiet".into(),
        "loglevel=4".into(),
        "no_timer_check".into(),
        "tsc=reliable".into(),
        "i8042.noaux".into(),
        "i8042.nomux".into(),
        "i8042.nopnp".into(),
        "8250.nr_uarts=2".into(),
        "random.trust_cpu=on".into(),
        // The crypto self-tests cost ~0.1-0.3 s of every TCG boot and test
        // the kernel's crypto, not the code under test.
        "cryptomgr.notests".into(),
        "rdinit=/init".into(),
    ];
    // A kernel oops must stay visible but not kill a test that expects one
    // (a panicking test asks for it); keep panic_on_oops only when asked.
    cmdline.retain(|a| a != "oops=panic");
    cmdline.extend(opts.kernel_args.iter().cloned());

    // PVH: no real-mode setup, no self-decompression (see pvh.rs); with
    // it, qboot, a firmware that does next to nothing, instead of SeaBIOS.
    let (pvh, boot) = if std::env::var_os("LIVEHOST_NO_PVH").is_some_and(|v| !v.is_empty()) {
        (None, "bzimage (LIVEHOST_NO_PVH is set)".to_string())
    } else {
        match crate::pvh::image_for(&kernel.bzimage) {
            Ok(p) => (Some(p), "pvh".to_string()),
            Err(e) => {
                progress.note(format!("booting the bzImage (no PVH image: {e:#})"));
                (None, format!("bzimage ({e:#})"))
            }
        }
    };
    let mut cmd = Command::new(&qemu);
    cmd.args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none"])
        .args(["-machine", "q35"])
        .args(["-m", &opts.memory_mb.to_string()])
        .args(["-smp", &opts.cpus.to_string()])
        .arg("-kernel")
        .arg(pvh.as_ref().unwrap_or(&kernel.bzimage))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &cmdline.join(" ")])
        .arg("-serial")
        .arg(format!("file:{}", console_log.display()))
        .arg("-serial")
        .arg(format!("file:{}", result_log.display()));
    if pvh.is_some() && Path::new(QBOOT).is_file() {
        cmd.args(["-bios", QBOOT]);
    }
    match accel {
        Accel::Kvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl in the child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // QEMU dies with us: an interrupted run leaves no guest behind.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }

    let _slot = qemu_slot(progress)?;
    progress.step(format!("booting {} under {}", kernel.version, accel));
    let launched = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", qemu.display()))?;
    let mut guard = ChildGuard(Some(child));

    // Boot budget: TCG boots in seconds, but a loaded CI machine is slow;
    // the command's own timeout is enforced in the guest, this is the
    // backstop for a guest that stops responding.
    let boot_budget = match accel {
        Accel::Tcg => Duration::from_secs(90),
        Accel::Kvm => Duration::from_secs(45),
    };
    let deadline = launched
        + opts
            .hang_after
            .unwrap_or(boot_budget + opts.timeout + Duration::from_secs(30));
    let mut init_wall: Option<Instant> = None;
    let mut cmd_wall: Option<Instant> = None;
    let mut hung = false;
    let exit_status = loop {
        let child = guard.0.as_mut().unwrap();
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        let text = std::fs::read(&result_log).unwrap_or_default();
        if init_wall.is_none() && contains(&text, b"LIVEHOST-INIT ") {
            init_wall = Some(Instant::now());
            progress.step("guest init running");
        }
        if cmd_wall.is_none() && contains(&text, b"LIVEHOST-CMD ") {
            cmd_wall = Some(Instant::now());
            progress.step(format!("running `{}`", opts.command.join(" ")));
        }
        // The whole report is in: the guest's own shutdown adds nothing.
        if contains(&text, b"LIVEHOST-END") {
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

    let console =
        String::from_utf8_lossy(&std::fs::read(&console_log).unwrap_or_default()).replace('\r', "");
    let result_text =
        String::from_utf8_lossy(&std::fs::read(&result_log).unwrap_or_default()).replace('\r', "");
    let frame = parse_result(&result_text);
    let panic = console.contains("Kernel panic - not syncing");
    let oops = [
        "Oops:",
        "BUG:",
        "general protection fault",
        "------------[ cut here ]",
    ]
    .iter()
    .any(|m| console.contains(m) || frame.dmesg.contains(m));

    let status = if let Some(s) = frame.status.clone() {
        s
    } else if panic {
        GuestStatus::Panic
    } else if hung {
        GuestStatus::Hang
    } else if let Some(why) = frame.setup_failure.clone() {
        let _ = why;
        GuestStatus::SetupFailed
    } else {
        GuestStatus::NoResult
    };
    if status == GuestStatus::NoResult && !qemu_stderr.trim().is_empty() {
        bail!("QEMU failed: {}", qemu_stderr.trim());
    }

    let mut timings = BootTimings {
        total_ms: ms(total),
        ..Default::default()
    };
    if let (Some(up), Some(w)) = (frame.uptime_init, init_wall) {
        timings.kernel_boot_ms = Some(up * 1000.0);
        timings.qemu_start_ms = Some((ms(w - launched) - up * 1000.0).max(0.0));
    }
    if let (Some(a), Some(b)) = (frame.uptime_init, frame.uptime_cmd) {
        timings.init_to_command_ms = Some((b - a) * 1000.0);
    }
    if let Some(w) = cmd_wall {
        timings.boot_to_command_ms = Some(ms(w - launched));
    }
    if let (Some(a), Some(b)) = (frame.uptime_cmd, frame.uptime_end) {
        timings.command_ms = Some((b - a) * 1000.0);
    }
    let stderr = match (&status, &frame.setup_failure) {
        (GuestStatus::SetupFailed, Some(why)) => why.clone(),
        _ => frame.stderr,
    };
    Ok(RunOutcome {
        status,
        stdout: frame.stdout,
        stderr,
        dmesg: frame.dmesg,
        console,
        oops,
        accel,
        accel_reason: reason,
        boot,
        kernel_version: kernel.version.clone(),
        timings,
    })
}

/// Debian's qemu-system-data ships it; absent elsewhere, SeaBIOS it is.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The vendor KVM module for the guest: under TCG `-cpu max` emulates SVM,
/// so `kvm_amd`; under KVM the guest sees the host's vendor.
fn kvm_vendor_module(choice: AccelChoice) -> &'static str {
    let intel = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.contains("GenuineIntel"))
        .unwrap_or(false);
    match accel::resolve(choice).map(|(a, _)| a) {
        Ok(Accel::Kvm) if intel => "kvm_intel",
        _ => "kvm_amd",
    }
}

/// The temporary directory of one run, removed afterwards unless
/// `LIVEHOST_KEEP_RUN` is set (for debugging a guest by hand).
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn new() -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = cache_dir().join("runs").join(format!(
            "{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(RunDir { path })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::env::var_os("LIVEHOST_KEEP_RUN").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            eprintln!("kept guest run files in {}", self.path.display());
        }
    }
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

/// At most one guest per host CPU at a time, across processes (parallel
/// tests, several test binaries): TCG guests are CPU-bound and
/// oversubscribing makes every one of them slower and flakier.
fn qemu_slot(progress: &Progress) -> Result<FileLock> {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(1);
    let dir = cache_dir().join("slots");
    let mut told = false;
    loop {
        for i in 0..n {
            if let Ok(l) =
                FileLock::acquire_within(&dir.join(format!("qemu-{i}.lock")), Some(Duration::ZERO))
            {
                return Ok(l);
            }
        }
        if !told {
            progress.step("waiting for a free guest slot");
            told = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Parsed `ttyS1` traffic.
#[derive(Debug, Default)]
struct Frame {
    uptime_init: Option<f64>,
    uptime_cmd: Option<f64>,
    uptime_end: Option<f64>,
    status: Option<GuestStatus>,
    stdout: String,
    stderr: String,
    dmesg: String,
    setup_failure: Option<String>,
}

fn parse_result(text: &str) -> Frame {
    let mut f = Frame::default();
    let mut section: Option<&str> = None;
    let mut buf = String::new();
    let mut complete = false;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(sec) = section {
            if line == "end" {
                let data = livehost_common::base64::decode(&buf).unwrap_or_default();
                let s = String::from_utf8_lossy(&data).into_owned();
                match sec {
                    "stdout" => f.stdout = s,
                    "stderr" => f.stderr = s,
                    "dmesg" => f.dmesg = s,
                    _ => {}
                }
                buf.clear();
                section = None;
            } else {
                buf.push_str(line.trim());
            }
            continue;
        }
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("LIVEHOST-INIT"), Some(u)) => f.uptime_init = u.parse().ok(),
            (Some("LIVEHOST-CMD"), Some(u)) => f.uptime_cmd = u.parse().ok(),
            (Some("LIVEHOST-CMD-END"), Some(u)) => f.uptime_end = u.parse().ok(),
            (Some("LIVEHOST-SETUP-FAILED"), _) => {
                f.setup_failure = Some(
                    line.trim_start_matches("LIVEHOST-SETUP-FAILED")
                        .trim()
                        .to_string(),
                )
            }
            (Some("status"), Some("timeout")) => f.status = Some(GuestStatus::Timeout),
            (Some("status"), Some(n)) => f.status = n.parse().ok().map(GuestStatus::Exited),
            (Some(s @ ("stdout" | "stderr" | "dmesg")), None) => section = Some(s),
            (Some("LIVEHOST-END"), _) => complete = true,
            _ => {}
        }
    }
    if !complete {
        // A torn frame (guest died mid-report) must not pass for a result.
        f.status = None;
    }
    f
}

const INIT: &str = r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
hostname livehost-guest
ip link set lo up 2>/dev/null
R=/dev/ttyS1
stty -F $R raw -echo 2>/dev/null
up() { cut -d' ' -f1 /proc/uptime; }
echo "LIVEHOST-INIT $(up)" > $R
V=$(uname -r)
for m in $(cat /livehost/modules); do
  out=$(insmod /lib/modules/$V/$m 2>&1) || {
    echo "LIVEHOST-SETUP-FAILED loading module $m failed: $out" > $R
    dmesg | tail -n 20 > /dev/console
    reboot -f
  }
done
[ -f /livehost/env ] && . /livehost/env
T=$(cat /livehost/timeout)
cd /root
echo "LIVEHOST-CMD $(up)" > $R
setsid /bin/sh /livehost/cmd </dev/null >/tmp/.livehost-out 2>/tmp/.livehost-err &
pid=$!
( sleep $T; touch /tmp/.livehost-timedout; kill -9 -$pid 2>/dev/null; kill -9 $pid 2>/dev/null ) &
wd=$!
wait $pid
rc=$?
kill $wd 2>/dev/null
echo "LIVEHOST-CMD-END $(up)" > $R
dmesg > /tmp/.livehost-dmesg 2>&1
{
  echo LIVEHOST-BEGIN
  if [ -e /tmp/.livehost-timedout ]; then echo "status timeout"; else echo "status $rc"; fi
  echo stdout; base64 /tmp/.livehost-out; echo end
  echo stderr; base64 /tmp/.livehost-err; echo end
  echo dmesg; base64 /tmp/.livehost-dmesg; echo end
  echo LIVEHOST-END
} > $R
sync
reboot -f
"#;

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn build_initramfs(
    opts: &RunOptions,
    kernel: &GuestKernel,
    modules: &[String],
    out: &Path,
) -> Result<()> {
    let mut ir = Initramfs::new();
    for d in [
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/root",
        "/etc",
        "/var",
        "/mnt",
        "/lib",
        "/lib64",
        "/livehost",
    ] {
        ir.dir(d)?;
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!("/bin/busybox is missing: run `./x setup` (or apt-get install busybox-static)");
    }
    if !crate::initramfs::shared_libraries(busybox)?.is_empty() {
        bail!("/bin/busybox is dynamically linked: install busybox-static, which the guest needs");
    }
    ir.copy(busybox, "/bin/busybox")?;
    for applet in busybox_applets(busybox)? {
        if applet != "/bin/busybox" && applet.starts_with('/') {
            ir.symlink(&applet, "/bin/busybox")?;
        }
    }
    ir.symlink("/bin/sh", "busybox")?;
    ir.file("/init", INIT.as_bytes().to_vec(), 0o755)?;
    ir.file(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        0o644,
    )?;
    ir.file("/etc/group", b"root:x:0:\n".to_vec(), 0o644)?;
    ir.file("/etc/hostname", b"livehost-guest\n".to_vec(), 0o644)?;

    // Modules in load order, decompressed if Debian shipped them compressed
    // (busybox insmod takes plain .ko files only).
    let order = if modules.is_empty() {
        Vec::new()
    } else {
        module_order(kernel, modules)?
    };
    let mut listed = Vec::new();
    if let Some(mdir) = &kernel.modules_dir {
        for rel in &order {
            let host = mdir.join(rel);
            let plain = strip_compression(rel);
            let data = read_module(&host)?;
            ir.file(
                &format!("/lib/modules/{}/{}", kernel.version, plain),
                data,
                0o644,
            )?;
            listed.push(plain);
        }
    }
    ir.file(
        "/livehost/modules",
        format!("{}\n", listed.join("\n")).into_bytes(),
        0o644,
    )?;

    // A Debian host keeps its kernel's config in /boot; tools that read it
    // there (hotpatch compares vermagic flags with it) see the guest alike.
    if let Some(cfg) = &kernel.config {
        ir.copy(cfg, &format!("/boot/config-{}", kernel.version))?;
    }
    for (host, guest) in &opts.files {
        if !host.exists() {
            bail!(
                "file to copy into the guest does not exist: {}",
                host.display()
            );
        }
        ir.copy_program(host, guest)
            .with_context(|| format!("cannot put {} into the guest", host.display()))?;
    }
    let script = if opts.command.len() == 1 {
        opts.command[0].clone()
    } else {
        format!(
            "exec {}",
            opts.command
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    ir.file("/livehost/cmd", format!("{script}\n").into_bytes(), 0o755)?;
    ir.file(
        "/livehost/timeout",
        format!("{}\n", opts.timeout.as_secs().max(1)).into_bytes(),
        0o644,
    )?;
    if !opts.env.is_empty() {
        let env: String = opts
            .env
            .iter()
            .map(|(k, v)| format!("export {k}={}\n", shell_quote(v)))
            .collect();
        ir.file("/livehost/env", env.into_bytes(), 0o644)?;
    }
    ir.write_file(out)
}

fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .context("cannot run busybox --list-full")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| format!("/{}", l.trim()))
        .collect())
}

fn strip_compression(rel: &str) -> String {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(s) = rel.strip_suffix(ext) {
            return s.to_string();
        }
    }
    rel.to_string()
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => Some("xz"),
        Some("zst") => Some("zstd"),
        Some("gz") => Some("gzip"),
        _ => None,
    };
    match tool {
        None => std::fs::read(path).with_context(|| format!("cannot read {}", path.display())),
        Some(t) => {
            let out = Command::new(t)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("cannot run {t} to decompress {}", path.display()))?;
            if !out.status.success() {
                bail!("{t} -dc {} failed", path.display());
            }
            Ok(out.stdout)
        }
    }
}

/// Module names normalise `-` to `_`, as the kernel does.
fn module_key(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let base = strip_compression(base);
    base.trim_end_matches(".ko").replace('-', "_")
}

/// The modules to load, dependencies first, as relative paths in the
/// modules tree.
pub fn module_order(kernel: &GuestKernel, wanted: &[String]) -> Result<Vec<String>> {
    let mdir = kernel
        .modules_dir
        .as_ref()
        .with_context(|| format!("kernel {} has no modules directory", kernel.version))?;
    let dep_text = std::fs::read_to_string(mdir.join("modules.dep"))
        .with_context(|| format!("cannot read {}/modules.dep", mdir.display()))?;
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep_text.lines() {
        let Some((m, rest)) = line.split_once(':') else {
            continue;
        };
        let d = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_key(m), (m.to_string(), d));
    }
    let builtin: BTreeSet<String> = std::fs::read_to_string(mdir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_key)
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for w in wanted {
        let key = module_key(w);
        if builtin.contains(&key) {
            continue; // built into the kernel: nothing to load
        }
        let Some((path, d)) = deps.get(&key) else {
            bail!(
                "module {w:?} does not exist for kernel {} (not in {}/modules.dep)",
                kernel.version,
                mdir.display()
            );
        };
        // modules.dep lists all transitive dependencies, deepest last.
        for dep in d.iter().rev().chain(std::iter::once(path)) {
            if seen.insert(dep.clone()) {
                order.push(dep.clone());
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_frame_roundtrip() {
        let b64 = |s: &str| livehost_common::base64::encode(s.as_bytes());
        let text = format!(
            "LIVEHOST-INIT 1.50\nLIVEHOST-CMD 1.60\nLIVEHOST-CMD-END 1.70\nLIVEHOST-BEGIN\nstatus 3\nstdout\n{}\nend\nstderr\n{}\nend\ndmesg\n\nend\nLIVEHOST-END\n",
            b64("out\nline"),
            b64("err")
        );
        let f = parse_result(&text);
        assert_eq!(f.status, Some(GuestStatus::Exited(3)));
        assert_eq!(f.stdout, "out\nline");
        assert_eq!(f.stderr, "err");
        assert_eq!(f.uptime_init, Some(1.5));
    }

    #[test]
    fn torn_frame_is_not_a_result() {
        let f = parse_result("LIVEHOST-INIT 1.0\nLIVEHOST-BEGIN\nstatus 0\nstdout\n");
        assert_eq!(f.status, None);
    }

    #[test]
    fn module_keys_normalise() {
        assert_eq!(module_key("kernel/arch/x86/kvm/kvm-amd.ko"), "kvm_amd");
        assert_eq!(module_key("kernel/fs/x.ko.xz"), "x");
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
