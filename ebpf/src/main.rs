//! `overhead`: what the host costs each VM and each container, live.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use livehost_common::exit;
use livehost_ebpf::cgroup::Resolver;
use livehost_ebpf::observer::{Observer, ObserverOptions, RawSnapshot};
use livehost_ebpf::report::{self, Filter, Programs, ReportOptions};
use livehost_ebpf::{prom, tui};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "overhead",
    version,
    about = "Per-VM and per-container host overhead, measured in the kernel with eBPF",
    long_about = "overhead attaches tp_btf programs to the KVM tracepoints (kvm_exit, kvm_entry, \
kvm_userspace_exit, kvm_pio) and to the scheduler (sched_wakeup, sched_wakeup_new, sched_switch), \
aggregates in per-CPU kernel maps, and shows per VM / vCPU: exits per reason with the time from \
exit to re-entry, user-space exits, run-queue delay (steal time); and per cgroup (container): CPU \
time, run-queue latency p50/p99/max, who held the CPU while it waited (same cgroup, another cgroup, \
host), throttling and CPU pressure from cgroupfs. A cgroup whose p99 wait crosses --noisy-p99-ms is \
flagged as a noisy-neighbour victim, with the cgroups that preempted it most.\n\n\
Needs root (or CAP_BPF + CAP_PERFMON) and a kernel with BTF. Programs whose tracepoint the kernel \
lacks (no KVM loaded) are skipped with a note. Nothing is pinned: when overhead exits, everything \
it attached is gone.",
    after_help = "Examples:\n  sudo overhead top\n  sudo overhead record --interval 1 --duration 30 --json > overhead.jsonl\n  sudo overhead serve --listen 127.0.0.1:9464      # then scrape http://127.0.0.1:9464/metrics\n  sudo overhead top --pid $(pgrep -f qemu-system) --vm-only"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Live view, refreshed every --interval seconds (full-screen on a terminal, plain tables otherwise).
    Top {
        #[command(flatten)]
        common: Common,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Stop after this many refreshes (default: until q / Ctrl-C).
        #[arg(long)]
        iterations: Option<u64>,
        /// Rows per table.
        #[arg(long, default_value_t = 20)]
        rows: usize,
    },
    /// Print one report per interval: JSON lines with --json (schema in the README), tables otherwise.
    Record {
        #[command(flatten)]
        common: Common,
        /// Seconds per interval.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Total seconds to record.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// One JSON object per interval on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Serve Prometheus metrics on http://ADDR/metrics until interrupted.
    Serve {
        #[command(flatten)]
        common: Common,
        /// HOST:PORT to listen on.
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: String,
        /// Stop after this many seconds (default: until Ctrl-C / SIGTERM).
        #[arg(long)]
        duration: Option<f64>,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Only this process: its VM rows and its cgroup.
    #[arg(long)]
    pid: Option<u32>,
    /// Only this cgroup: numeric id, a path relative to the cgroup v2 root, or an absolute path.
    #[arg(long)]
    cgroup: Option<String>,
    /// Only VMs (vCPU exits and vCPU run-queue delay).
    #[arg(long, conflicts_with = "containers_only")]
    vm_only: bool,
    /// Only cgroups (the KVM programs are not loaded).
    #[arg(long)]
    containers_only: bool,
    /// Flag a cgroup as a noisy-neighbour victim above this p99 run-queue wait (ms).
    #[arg(long, default_value_t = 5.0)]
    noisy_p99_ms: f64,
    /// Kernel BTF directory (vmlinux and module BTF); for testing other kernels' BTF.
    #[arg(long, default_value = "/sys/kernel/btf", hide_short_help = true)]
    btf_dir: PathBuf,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signals() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Sleep up to `d`, waking early on a stop signal.
fn sleep_interruptible(d: Duration) {
    let end = Instant::now() + d;
    while !STOP.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

struct Setup {
    observer: Observer,
    resolver: Resolver,
    ropts: ReportOptions,
}

/// Validate every argument before loading anything, then load.
fn setup(c: &Common) -> Result<Setup, (i32, anyhow::Error)> {
    let refuse = |e: anyhow::Error| (exit::REFUSED, e);
    if !(c.noisy_p99_ms.is_finite() && c.noisy_p99_ms > 0.0) {
        return Err(refuse(anyhow::anyhow!(
            "--noisy-p99-ms must be a positive number of milliseconds"
        )));
    }
    let mut resolver = Resolver::new();
    let mut filter = Filter {
        pid: c.pid,
        cgroups: None,
        vm_only: c.vm_only,
        containers_only: c.containers_only,
    };
    if let Some(pid) = c.pid {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(refuse(anyhow::anyhow!(
                "no process with pid {pid} (check `ps -p {pid}`)"
            )));
        }
        if let Some(path) = report::pid_cgroup_path(pid)
            && let Ok(id) = resolver.lookup(&path)
        {
            filter.cgroups = Some(vec![id]);
        }
    }
    if let Some(cg) = &c.cgroup {
        let id = resolver.lookup(cg).map_err(refuse)?;
        filter.cgroups = Some(vec![id]);
    }
    let oopts = ObserverOptions {
        btf_dir: c.btf_dir.clone(),
        vms: !c.containers_only,
        containers: !c.vm_only,
        calibrate: false,
    };
    let observer = Observer::start(&oopts).map_err(refuse)?;
    Ok(Setup {
        observer,
        resolver,
        ropts: ReportOptions {
            filter,
            noisy_p99_ns: (c.noisy_p99_ms * 1e6) as u64,
            ..Default::default()
        },
    })
}

impl Setup {
    /// Read the maps and report what changed since `prev`, which becomes
    /// the new baseline.
    fn next_report(&mut self, prev: &mut RawSnapshot) -> Result<report::Report> {
        let cur = self.observer.snapshot()?;
        let r = report::build(
            &cur,
            Some(prev),
            &mut self.resolver,
            programs(&self.observer),
            &self.ropts,
        );
        *prev = cur;
        Ok(r)
    }
}

fn programs(o: &Observer) -> Programs {
    Programs {
        attached: o.attached.clone(),
        skipped: o.skipped.clone(),
    }
}

/// Tell the user (on stderr) what is being observed; scripts may wait for
/// the "attached" line before starting a workload.
fn notes(o: &Observer) {
    let p = livehost_common::progress::Progress::new("overhead");
    for s in &o.skipped {
        p.note(format!(
            "note: {} not attached ({}): {}",
            s.program, s.tracepoint, s.reason
        ));
    }
    p.note(format!(
        "attached {} programs: {}",
        o.attached.len(),
        o.attached.join(", ")
    ));
}

fn check_interval(name: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v < 86_400.0) {
        bail!("--{name} must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

fn run(cli: Cli) -> Result<(), (i32, anyhow::Error)> {
    let usage = |e: anyhow::Error| (exit::USAGE, e);
    let err = |e: anyhow::Error| (exit::ERROR, e);
    install_signals();
    match cli.cmd {
        Cmd::Record {
            common,
            interval,
            duration,
            json,
        } => {
            let iv = check_interval("interval", interval).map_err(usage)?;
            let total = check_interval("duration", duration).map_err(usage)?;
            if total < iv {
                return Err(usage(anyhow::anyhow!(
                    "--duration ({duration}s) is shorter than one --interval ({interval}s): nothing would be recorded"
                )));
            }
            let mut s = setup(&common)?;
            // Baseline first: a workload started on the "attached" note must
            // land in the first interval, not in the baseline.
            let mut prev = s.observer.snapshot().map_err(err)?;
            notes(&s.observer);
            let start = Instant::now();
            let mut out = std::io::stdout().lock();
            while !STOP.load(Ordering::SeqCst) && start.elapsed() + iv / 2 < total {
                sleep_interruptible(iv);
                let r = s.next_report(&mut prev).map_err(err)?;
                let line = if json {
                    serde_json::to_string(&r)
                        .context("encoding JSON")
                        .map_err(err)?
                        + "\n"
                } else {
                    report::render_text(&r, 20) + "\n"
                };
                if out
                    .write_all(line.as_bytes())
                    .and_then(|_| out.flush())
                    .is_err()
                {
                    break; // reader went away (head, closed pipe)
                }
            }
            Ok(())
        }
        Cmd::Top {
            common,
            interval,
            iterations,
            rows,
        } => {
            let iv = check_interval("interval", interval).map_err(usage)?;
            let mut s = setup(&common)?;
            let tty = std::io::stdout().is_terminal();
            if tty {
                let mut prev = s.observer.snapshot().map_err(err)?;
                return tui::run(iv, iterations, &STOP, || s.next_report(&mut prev)).map_err(err);
            }
            let mut prev = s.observer.snapshot().map_err(err)?;
            notes(&s.observer);
            let mut n = 0;
            while !STOP.load(Ordering::SeqCst) && iterations.is_none_or(|m| n < m) {
                sleep_interruptible(iv);
                let r = s.next_report(&mut prev).map_err(err)?;
                println!("{}", report::render_text(&r, rows));
                n += 1;
            }
            Ok(())
        }
        Cmd::Serve {
            common,
            listen,
            duration,
        } => {
            let total = duration
                .map(|d| check_interval("duration", d))
                .transpose()
                .map_err(usage)?;
            // Bind before loading BPF: a busy port must not cost an attach/detach.
            let listener = prom::bind(&listen).map_err(|e| (exit::REFUSED, e))?;
            let mut s = setup(&common)?;
            notes(&s.observer);
            listener
                .set_nonblocking(true)
                .context("listener")
                .map_err(err)?;
            eprintln!(
                "overhead: serving Prometheus metrics on http://{}/metrics",
                listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or(listen)
            );
            let start = Instant::now();
            while !STOP.load(Ordering::SeqCst) && total.is_none_or(|t| start.elapsed() < t) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let obs = &s.observer;
                        let resolver = &mut s.resolver;
                        let filter = &s.ropts.filter;
                        let r = prom::handle(stream, || match obs.snapshot() {
                            Ok(snap) => prom::render(&snap, resolver, filter, &obs.attached),
                            Err(e) => format!("# overhead: cannot read maps: {e}\n"),
                        });
                        if let Err(e) = r {
                            eprintln!("overhead: client error: {e:#}");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(err(anyhow::anyhow!("accept failed: {e}"))),
                }
            }
            Ok(())
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err((code, e)) = run(cli) {
        eprintln!("overhead: error: {e:#}");
        std::process::exit(code);
    }
}
