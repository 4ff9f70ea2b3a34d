//! What each `vmm-bench` subcommand does once its arguments are parsed;
//! `main.rs` only parses them. Each returns the process exit status.
//! Output goes to stdout through [`out`], whose errors (a closed pipe)
//! reach [`exit_code`].

use crate::vm::probe::Accel;
use crate::{container, native, qemu, report, vm};
use anyhow::{Result, bail};
use clap::ValueEnum;
use livehost_common::exit;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Write to stdout, returning the error instead of panicking when stdout
/// is closed (`vmm-bench report | head`).
fn out(s: &str) -> Result<()> {
    use std::io::Write as _;
    std::io::stdout().lock().write_all(s.as_bytes())?;
    Ok(())
}

/// The exit status for an error that ended a subcommand: 141 when whoever
/// read our stdout went away (quietly, as a shell tool killed by SIGPIPE
/// would), 124 when a run ran past its deadline, 1 otherwise. Errors other
/// than the closed pipe are printed on stderr.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    let io_kind = |c: &(dyn std::error::Error + 'static)| {
        c.downcast_ref::<std::io::Error>().map(|io| io.kind())
    };
    if e.chain()
        .any(|c| io_kind(c) == Some(std::io::ErrorKind::BrokenPipe))
    {
        return exit::BROKEN_PIPE;
    }
    eprintln!("vmm-bench: {e:#}");
    let timed_out = e.chain().any(|c| {
        c.is::<livehost_container::TimedOut>()
            || matches!(
                c.downcast_ref::<vm::RunError>(),
                Some(vm::RunError::Timeout { .. })
            )
    });
    if timed_out {
        exit::TIMEOUT
    } else {
        exit::ERROR
    }
}

/// `vmm-bench probe`.
pub fn probe(json: bool) -> Result<i32> {
    let p = vm::probe::probe(Duration::from_secs(1));
    if json {
        print(&p, true)?;
    } else {
        out(&probe_text(&p))?;
    }
    Ok(if p.accel.is_some() {
        exit::SUCCESS
    } else {
        exit::REFUSED
    })
}

fn probe_text(p: &vm::probe::Probe) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    match (&p.error, p.accel) {
        (Some(e), _) => {
            let _ = writeln!(s, "KVM unusable: {e}");
        }
        (None, a) => {
            let _ = writeln!(
                s,
                "KVM: {}",
                a.map_or("present but no guest ran", |a| a.label())
            );
            let _ = writeln!(s, "  real mode:  {}", p.real_mode.as_deref().unwrap_or("-"));
            let _ = writeln!(s, "  long mode:  {}", p.long_mode.as_deref().unwrap_or("-"));
            if let Some(v) = p.create_to_first_exit_us {
                let _ = writeln!(s, "  VM create to first exit: {v:.0} us");
            }
            if let Some(v) = p.port_exit_ns {
                let _ = writeln!(s, "  port-I/O exit round trip: {:.1} us", v / 1e3);
            }
            let _ = writeln!(
                s,
                "  guest register loop: {} (host {:.0} iterations/us)",
                p.guest_loop_per_us.map_or(
                    "did not finish in its time slice: instructions are emulated".into(),
                    |v| format!("{v:.0} iterations/us")
                ),
                p.host_loop_per_us
            );
        }
    }
    let _ = writeln!(
        s,
        "  host is itself a guest: {}; probe took {:.0} ms",
        p.host_is_guest, p.elapsed_ms
    );
    s
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PathKind {
    /// The static workload as a plain process.
    Native,
    /// Our namespace + cgroup launcher.
    Container,
    /// runc with a generated busybox bundle.
    Runc,
    /// The unikernel on our KVM VMM (64-bit entry).
    Vm,
    /// The unikernel under QEMU through its PVH entry.
    QemuUnikernel,
    /// The Debian kernel under QEMU with the workload as init.
    QemuLinux,
}

impl PathKind {
    /// The name on the command line (and in `run --json`'s `path`).
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// `vmm-bench run PATH`.
pub struct RunArgs {
    pub path: PathKind,
    pub kib: u64,
    pub loops: u64,
    pub timeout: Duration,
    /// For `vm` and `qemu-unikernel`: an ELF to boot instead of the
    /// built-in unikernel.
    pub image: Option<PathBuf>,
    pub json: bool,
}

/// `vmm-bench run PATH`: one run, printed in the same shape for every
/// path; a checksum that differs from the native reference is an error.
pub fn run(a: &RunArgs) -> Result<i32> {
    // A stop signal kills our children and removes our cgroup leaves
    // before we exit (no thread exists yet: it must be first).
    container::clean_up_on_stop_signals()?;
    if a.image.is_some() && !matches!(a.path, PathKind::Vm | PathKind::QemuUnikernel) {
        eprintln!("vmm-bench: --image only applies to `run vm` and `run qemu-unikernel`");
        return Ok(exit::USAGE);
    }
    let image = match &a.image {
        Some(p) => read_image(p)?,
        None => vm::boot::UNIKERNEL.to_vec(),
    };
    let expected = native::expected_checksum(a.kib, vmm_bench_workload::DEFAULT_SEED)?;
    let (accel, got, detail) = run_one(a, &image)?;
    print(&run_output(a.path, accel, got, expected, detail), a.json)?;
    if got != Some(expected) {
        bail!(
            "checksum mismatch: got {}, expected {expected:#018x}",
            got.map_or("none".into(), |g| format!("{g:#018x}"))
        );
    }
    if !a.json {
        out(&format!(
            "checksum matches the native reference ({expected:#018x})\n"
        ))?;
    }
    Ok(exit::SUCCESS)
}

/// (accelerator, checksum the path returned, the path's own fields)
type PathResult = (Option<Accel>, Option<u64>, serde_json::Value);

fn run_one(a: &RunArgs, image: &[u8]) -> Result<PathResult> {
    let args = vec![format!("kib={}", a.kib), format!("loops={}", a.loops)];
    let t = a.timeout;
    let probe_accel = || vm::probe::probe(Duration::from_secs(1)).accel;
    let host = |stdout: &str, v: serde_json::Value| {
        (Some(Accel::Native), qemu::field_u64(stdout, "checksum"), v)
    };
    Ok(match a.path {
        PathKind::Native => {
            let r = native::run(&args, t)?;
            host(&r.stdout, serde_json::to_value(&r)?)
        }
        PathKind::Container => {
            let r = container::run(&container::ContainerOpts {
                args,
                timeout: t,
                ..Default::default()
            })?;
            host(&r.stdout, serde_json::to_value(&r)?)
        }
        PathKind::Runc => {
            let Some(runc) = container::find_runc() else {
                bail!("runc is not installed: apt-get install runc");
            };
            let r = container::run_runc(&runc, &container::make_bundle(&args)?, t)?;
            host(&r.stdout, serde_json::to_value(&r)?)
        }
        PathKind::Vm => {
            let kvm = vm::Kvm::open()?;
            let cfg = vm::boot::UnikernelRun {
                image,
                kib: a.kib,
                loop_n: a.loops,
                timeout: t,
                ..Default::default()
            };
            let r = vm::boot::run_unikernel(&kvm, &cfg)?;
            // Probed after the run, so the run's own memory figures do not
            // include the probe's VMs.
            (probe_accel(), Some(r.checksum), serde_json::to_value(&r)?)
        }
        PathKind::QemuUnikernel => {
            let accel = qemu::choose_accel(probe_accel());
            let r = qemu::run_unikernel(image, a.kib, a.loops, t, accel)?;
            let sum = qemu::field_u64(&r.line, "checksum");
            (Some(accel), sum, serde_json::to_value(&r)?)
        }
        PathKind::QemuLinux => {
            let img = qemu::linux_image()?;
            let accel = qemu::choose_accel(probe_accel());
            let r = qemu::run_linux(&img, a.kib, a.loops, t, accel)?;
            let sum = qemu::field_u64(&r.line, "checksum");
            (Some(accel), sum, serde_json::to_value(&r)?)
        }
    })
}

/// Read a user-supplied image with a size bound, so a wrong path (a disk
/// image, a device) is refused instead of read whole.
fn read_image(p: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(p)
        .map_err(|e| anyhow::anyhow!("cannot open image {}: {e}", p.display()))?;
    let mut v = Vec::new();
    f.take(vm::elf::MAX_IMAGE + 1).read_to_end(&mut v)?;
    if v.len() as u64 > vm::elf::MAX_IMAGE {
        bail!(
            "image {} is larger than the {} MiB limit: not a vmm-bench unikernel",
            p.display(),
            vm::elf::MAX_IMAGE >> 20
        );
    }
    vm::elf::parse(&v, usize::MAX >> 1)
        .map_err(|e| anyhow::anyhow!("refusing image {}: {e:#}", p.display()))?;
    Ok(v)
}

/// What `run PATH` prints, the same shape for every path: `path`,
/// `accel` (`kind` and `label`), `checksum` and `expected` (hex strings, so
/// no JSON reader rounds them), `ok`, then that path's own fields.
fn run_output(
    path: PathKind,
    accel: Option<Accel>,
    got: Option<u64>,
    expected: u64,
    detail: serde_json::Value,
) -> serde_json::Value {
    use serde_json::{Value, json};
    let hex = |v: u64| format!("{v:#018x}");
    let mut out = serde_json::Map::new();
    out.insert("path".into(), json!(path.name()));
    out.insert(
        "accel".into(),
        json!({
            "kind": accel,
            "label": accel.map_or("KVM, not classified by the probe", |a| a.label()),
        }),
    );
    out.insert("checksum".into(), json!(got.map(hex)));
    out.insert("expected".into(), json!(hex(expected)));
    out.insert("ok".into(), json!(got == Some(expected)));
    if let Value::Object(m) = detail {
        for (k, v) in m {
            // The common fields win (the VMM's numeric checksum, QEMU's
            // bare accelerator name).
            out.entry(k).or_insert(v);
        }
    }
    Value::Object(out)
}

/// `vmm-bench container -- COMMAND`: the command's own exit status, 124
/// when its time ran out.
pub fn container(opts: &container::CommandOpts, quiet: bool, json: bool) -> Result<i32> {
    if !quiet {
        eprintln!(
            "vmm-bench: starting container {} in cgroup {}",
            opts.hostname, opts.cgroup
        );
    }
    let end = container::run_command(opts)?;
    if json {
        print(&end, true)?;
    } else if !quiet {
        eprintln!(
            "vmm-bench: container pid {} ended with status {}{}",
            end.pid,
            end.exit_code,
            end.stopped_by
                .map(|s| format!(" (we were sent signal {s} and killed it)"))
                .unwrap_or_default()
        );
    }
    Ok(if end.timed_out {
        exit::TIMEOUT
    } else {
        end.exit_code
    })
}

/// `vmm-bench compare-exits`.
pub fn compare_exits(exits: u32, samples: usize, json: bool) -> Result<i32> {
    let kvm = vm::Kvm::open()?;
    let c = vm::boot::compare_exit_loops(&kvm, exits, samples)?;
    print(&c, json)?;
    Ok(exit::SUCCESS)
}

/// `vmm-bench report`: exit 1 when any path's checksum was wrong.
pub fn report(opts: &report::ReportOpts, json: bool) -> Result<i32> {
    container::clean_up_on_stop_signals()?;
    let r = report::run(opts)?;
    let files = report::write(&r, &opts.out)?;
    if json {
        print(&r, true)?;
    } else {
        out(&report::markdown(&r))?;
        eprintln!(
            "wrote {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(if r.checks.iter().all(|c| c.ok) {
        exit::SUCCESS
    } else {
        exit::ERROR
    })
}

/// JSON for programs, `a.b: value` lines for people.
fn print<T: serde::Serialize>(v: &T, json: bool) -> Result<()> {
    if json {
        return out(&format!("{}\n", serde_json::to_string_pretty(v)?));
    }
    let mut lines = Vec::new();
    flatten("", &serde_json::to_value(v)?, &mut lines);
    out(&lines.iter().map(|l| format!("{l}\n")).collect::<String>())
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        Value::Null => {}
        Value::Number(n) if n.is_f64() => {
            out.push(format!("{prefix}: {:.2}", n.as_f64().unwrap_or(f64::NAN)))
        }
        Value::String(s) => out.push(format!("{prefix}: {}", s.trim_end())),
        other => out.push(format!("{prefix}: {other}")),
    }
}
