//! Launching QEMU: the whole configuration in one struct, turned into
//! arguments in one function ([`QemuConfig::args`]), and spawned so that
//! QEMU dies with us. kernel-tests' guests and vmm-bench's QEMU rows both
//! start QEMU through here.

use anyhow::{Result, anyhow};
use serde::Serialize;
use std::ffi::OsString;
use std::fmt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The QEMU binary every launch uses.
pub const QEMU: &str = "qemu-system-x86_64";

/// Debian's qemu-system-data ships it; absent elsewhere, SeaBIOS it is.
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// The accelerator QEMU runs a guest under: the value of its `-accel`
/// option, serialised as `kvm` or `tcg` (what kernel-tests' JSON and the
/// demo have always said). Where a number was measured is
/// `livehost_common::host::Accel`; this is only the QEMU option it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl From<livehost_common::host::Accel> for Accel {
    /// Any KVM class runs QEMU with `-accel kvm`; TCG (and a native run,
    /// which has no QEMU equivalent) with `-accel tcg`.
    fn from(a: livehost_common::host::Accel) -> Accel {
        use livehost_common::host::Accel as Host;
        match a {
            Host::HardwareKvm | Host::NestedKvm | Host::NestedEmulatingKvm => Accel::Kvm,
            Host::Tcg | Host::Native => Accel::Tcg,
        }
    }
}

/// Where a serial port goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    /// QEMU's stdout.
    Stdio,
    /// Appended to a host file.
    File(PathBuf),
}

/// Everything one QEMU launch needs. Unset options are left out of the
/// command line, so QEMU's defaults apply.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub accel: Accel,
    /// `-machine`, e.g. `q35`; `None`: QEMU's default `pc`.
    pub machine: Option<String>,
    pub memory_mb: u64,
    pub cpus: u32,
    /// `-bios`, e.g. [`QBOOT`].
    pub bios: Option<PathBuf>,
    /// `-kernel`: a bzImage or an ELF with a PVH entry.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// `-append`: the kernel command line.
    pub append: String,
    /// `-serial`, in order: the first is `ttyS0`.
    pub serial: Vec<Serial>,
    /// `-device` arguments, e.g. `isa-debug-exit,iobase=0xf4,iosize=0x04`.
    pub devices: Vec<String>,
}

impl QemuConfig {
    /// A guest booting `kernel` with one CPU, 128 MiB, console on stdout.
    pub fn new(accel: Accel, kernel: impl Into<PathBuf>) -> Self {
        QemuConfig {
            accel,
            machine: None,
            memory_mb: 128,
            cpus: 1,
            bios: None,
            kernel: kernel.into(),
            initrd: None,
            append: String::new(),
            serial: vec![Serial::Stdio],
            devices: Vec::new(),
        }
    }

    /// The command line, without the program name.
    ///
    /// ```
    /// use kernel_tests::qemu::{Accel, QemuConfig};
    /// let args = QemuConfig::new(Accel::Tcg, "/boot/vmlinuz").args();
    /// let line = args.join(std::ffi::OsStr::new(" "));
    /// assert!(line.to_string_lossy().contains("-accel tcg,thread=multi -cpu max"));
    /// ```
    pub fn args(&self) -> Vec<OsString> {
        let mut a = Args::default();
        // No default devices, no config files, no monitor, no window, and
        // a guest reboot ends QEMU instead of starting over.
        a.flags(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        a.opt("-display", "none");
        a.opt("-monitor", "none");
        match self.accel {
            Accel::Kvm => a.opt("-accel", "kvm").opt("-cpu", "host"),
            Accel::Tcg => a.opt("-accel", "tcg,thread=multi").opt("-cpu", "max"),
        };
        if let Some(m) = &self.machine {
            a.opt("-machine", m);
        }
        a.opt("-m", format!("{}M", self.memory_mb));
        a.opt("-smp", self.cpus.to_string());
        if let Some(b) = &self.bios {
            a.opt("-bios", b);
        }
        a.opt("-kernel", &self.kernel);
        if let Some(i) = &self.initrd {
            a.opt("-initrd", i);
        }
        a.opt("-append", &self.append);
        for s in &self.serial {
            match s {
                Serial::Stdio => a.opt("-serial", "stdio"),
                Serial::File(p) => a.opt("-serial", format!("file:{}", p.display())),
            };
        }
        for d in &self.devices {
            a.opt("-device", d);
        }
        a.0
    }

    /// A `Command` for this configuration: stdin from /dev/null, stdout and
    /// stderr piped, and QEMU killed when the spawning thread exits (an
    /// interrupted run leaves no guest behind).
    pub fn command(&self) -> Result<Command> {
        let mut cmd = Command::new(binary()?);
        cmd.args(self.args());
        dies_with_parent(&mut cmd);
        Ok(cmd)
    }
}

/// Set the standard streams of a guest process (stdin /dev/null, stdout and
/// stderr piped) and have the kernel kill it when the spawning thread dies.
pub fn dies_with_parent(cmd: &mut Command) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl in the child before exec is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flags(&mut self, f: &[&str]) -> &mut Self {
        self.0.extend(f.iter().map(OsString::from));
        self
    }

    fn opt(&mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> &mut Self {
        self.0.push(key.into());
        self.0.push(value.as_ref().to_owned());
        self
    }
}

/// The first `prog` on `PATH`.
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// QEMU's path, or an error saying what to install.
pub fn binary() -> Result<PathBuf> {
    which(QEMU).ok_or_else(|| {
        anyhow!("{QEMU} is not installed: run `./x setup` (or apt-get install qemu-system-x86)")
    })
}

/// True when QEMU is installed.
pub fn available() -> bool {
    which(QEMU).is_some()
}

/// qboot when the kernel boots through PVH and qboot is installed (a
/// firmware that does next to nothing, instead of SeaBIOS).
pub fn qboot() -> Option<PathBuf> {
    Path::new(QBOOT).is_file().then(|| PathBuf::from(QBOOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_follow_the_config() {
        let mut c = QemuConfig::new(Accel::Kvm, "/k");
        c.machine = Some("q35".into());
        c.initrd = Some("/i".into());
        c.append = "console=ttyS0".into();
        c.serial = vec![Serial::File("/c".into()), Serial::File("/r".into())];
        c.devices.push("isa-debug-exit".into());
        let a: Vec<String> = c
            .args()
            .iter()
            .map(|s| s.to_string_lossy().into())
            .collect();
        let line = a.join(" ");
        for want in [
            "-accel kvm -cpu host",
            "-machine q35 -m 128M -smp 1",
            "-kernel /k -initrd /i -append console=ttyS0",
            "-serial file:/c -serial file:/r -device isa-debug-exit",
        ] {
            assert!(line.contains(want), "{want} in {line}");
        }
        assert!(!line.contains("-bios"));
    }
}
