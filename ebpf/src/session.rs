//! One run of `overhead`: what to watch (a [`Selection`]), checked before
//! anything is loaded, then `record`, `top` or `serve` until done or a stop
//! signal. The binary parses arguments into these types and calls them.

use crate::cgroup::{self, Resolver};
use crate::memory::MapSizes;
use crate::observer::{Observer, ObserverOptions};
use crate::report::{self, Filter, Programs, Report, ReportOptions};
use crate::snapshot::RawSnapshot;
use crate::{prom, tui};
use anyhow::{Context, Result, bail};
use clap::Args;
use livehost_common::exit;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What to observe, common to every subcommand.
#[derive(Args, Clone, Debug)]
pub struct Selection {
    /// Only this process: its VM rows and its cgroup.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only this cgroup: numeric id, a path relative to the cgroup v2 root, or an absolute path.
    #[arg(long)]
    pub cgroup: Option<String>,
    /// Only VMs (vCPU exits and vCPU run-queue delay).
    #[arg(long, conflicts_with = "containers_only")]
    pub vm_only: bool,
    /// Only cgroups (the KVM programs are not loaded).
    #[arg(long)]
    pub containers_only: bool,
    /// Flag a cgroup as a noisy-neighbour victim above this p99 run-queue wait (ms).
    #[arg(long, default_value_t = 5.0)]
    pub noisy_p99_ms: f64,
    /// Most cgroups tracked at once (a full map counts its misses in `drops`).
    #[arg(long, default_value_t = MapSizes::default().cgroups)]
    pub max_cgroups: u32,
    /// Most (waiting cgroup, cgroup that held the CPU) pairs tracked.
    #[arg(long, default_value_t = MapSizes::default().pairs)]
    pub max_pairs: u32,
    /// Most vCPU threads tracked.
    #[arg(long, default_value_t = MapSizes::default().vcpus)]
    pub max_vcpus: u32,
    /// Most (vCPU thread, exit reason) counters.
    #[arg(long, default_value_t = MapSizes::default().exits)]
    pub max_exits: u32,
    /// Kernel BTF directory (vmlinux and module BTF); for testing other kernels' BTF.
    #[arg(long, default_value = "/sys/kernel/btf", hide_short_help = true)]
    pub btf_dir: PathBuf,
}

#[derive(Args, Clone, Debug)]
pub struct TopArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 2.0)]
    pub interval: f64,
    /// Stop after this many refreshes (default: until q / Ctrl-C).
    #[arg(long)]
    pub iterations: Option<u64>,
    /// Rows per table.
    #[arg(long, default_value_t = 20)]
    pub rows: usize,
}

#[derive(Args, Clone, Debug)]
pub struct RecordArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// Seconds per interval.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Total seconds to record.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// One JSON object per interval on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// HOST:PORT to listen on.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub listen: String,
    /// Stop after this many seconds (default: until Ctrl-C / SIGTERM).
    #[arg(long)]
    pub duration: Option<f64>,
    /// At most N cgroups get series of their own (the busiest when first
    /// seen); all others are summed into cgroup="other". Default: all.
    #[arg(long)]
    pub top: Option<usize>,
}

/// Why a run failed, and the exit code that says so (`livehost_common::exit`).
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub error: anyhow::Error,
}

fn usage(error: anyhow::Error) -> Failure {
    Failure {
        code: exit::USAGE,
        error,
    }
}

fn refused(error: anyhow::Error) -> Failure {
    Failure {
        code: exit::REFUSED,
        error,
    }
}

fn failed(error: anyhow::Error) -> Failure {
    Failure {
        code: exit::ERROR,
        error,
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM end the run cleanly (the observer detaches on drop).
pub fn install_signals() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Sleep up to `d`, waking early on a stop signal.
fn sleep_interruptible(d: Duration) {
    let end = Instant::now() + d;
    while !stopped() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

fn check_interval(name: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v < 86_400.0) {
        bail!("--{name} must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// The filter a selection asks for; refuses an unknown pid or cgroup.
fn filter(c: &Selection, resolver: &mut Resolver) -> Result<Filter> {
    let mut filter = Filter {
        pid: c.pid,
        cgroups: None,
        vm_only: c.vm_only,
        containers_only: c.containers_only,
    };
    if let Some(pid) = c.pid {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process with pid {pid} (check `ps -p {pid}`)");
        }
        if let Some(path) = cgroup::pid_cgroup_path(pid)
            && let Ok(id) = resolver.lookup(&path)
        {
            filter.cgroups = Some(vec![id]);
        }
    }
    if let Some(cg) = &c.cgroup {
        filter.cgroups = Some(vec![resolver.lookup(cg)?]);
    }
    Ok(filter)
}

/// A loaded observer with what turns its snapshots into reports.
/// The `--max-*` flags, checked: each at least 1 and at most 2^24 entries.
fn map_sizes(c: &Selection) -> Result<MapSizes> {
    const MOST: u32 = 1 << 24;
    for (flag, v) in [
        ("--max-cgroups", c.max_cgroups),
        ("--max-pairs", c.max_pairs),
        ("--max-vcpus", c.max_vcpus),
        ("--max-exits", c.max_exits),
    ] {
        if v == 0 || v > MOST {
            bail!("{flag} must be between 1 and {MOST}, got {v}");
        }
    }
    Ok(MapSizes {
        exits: c.max_exits,
        cgroups: c.max_cgroups,
        pairs: c.max_pairs,
        vcpus: c.max_vcpus,
    })
}

struct Session {
    observer: Observer,
    resolver: Resolver,
    ropts: ReportOptions,
    /// The maps' kernel memory, measured once at start (they are preallocated).
    map_memory_bytes: u64,
}

impl Session {
    /// Validate every argument before loading anything, then load.
    fn start(c: &Selection) -> Result<Session, Failure> {
        if !(c.noisy_p99_ms.is_finite() && c.noisy_p99_ms > 0.0) {
            return Err(refused(anyhow::anyhow!(
                "--noisy-p99-ms must be a positive number of milliseconds"
            )));
        }
        let sizes = map_sizes(c).map_err(usage)?;
        let mut resolver = Resolver::new();
        let filter = filter(c, &mut resolver).map_err(refused)?;
        let oopts = ObserverOptions {
            btf_dir: c.btf_dir.clone(),
            vms: !c.containers_only,
            containers: !c.vm_only,
            calibrate: false,
            empty: false,
            sizes,
        };
        let observer = Observer::start(&oopts).map_err(refused)?;
        Ok(Session {
            map_memory_bytes: observer.map_memory_bytes(),
            observer,
            resolver,
            ropts: ReportOptions {
                filter,
                noisy_p99_ns: (c.noisy_p99_ms * 1e6) as u64,
                ..Default::default()
            },
        })
    }

    /// Read the maps and report what changed since `prev`, which becomes
    /// the new baseline.
    fn next_report(&mut self, prev: &mut RawSnapshot) -> Result<Report> {
        let cur = self.observer.snapshot()?;
        let programs = Programs {
            attached: self.observer.attached.clone(),
            skipped: self.observer.skipped.clone(),
        };
        let mut r = report::build(&cur, Some(prev), &mut self.resolver, programs, &self.ropts);
        r.map_memory_bytes = self.map_memory_bytes;
        *prev = cur;
        Ok(r)
    }

    /// Tell the user (on stderr) what is being observed; scripts may wait
    /// for the "attached" line before starting a workload.
    fn notes(&self) {
        let o = &self.observer;
        let p = livehost_common::progress::Progress::new("overhead");
        for s in &o.skipped {
            p.note(format!(
                "note: {} not attached ({}): {}",
                s.program, s.tracepoint, s.reason
            ));
        }
        p.note(format!(
            "maps: {:.1} MiB of kernel memory ({} possible CPUs; --max-* flags size them)",
            self.map_memory_bytes as f64 / (1u64 << 20) as f64,
            crate::memory::possible_cpus()
        ));
        p.note(format!(
            "attached {} programs: {}",
            o.attached.len(),
            o.attached.join(", ")
        ));
    }
}

/// `overhead record`: one report per interval on stdout.
pub fn record(a: &RecordArgs) -> Result<(), Failure> {
    let iv = check_interval("interval", a.interval).map_err(usage)?;
    let total = check_interval("duration", a.duration).map_err(usage)?;
    if total < iv {
        return Err(usage(anyhow::anyhow!(
            "--duration ({}s) is shorter than one --interval ({}s): nothing would be recorded",
            a.duration,
            a.interval
        )));
    }
    let mut s = Session::start(&a.selection)?;
    // Baseline first: a workload started on the "attached" note must land
    // in the first interval, not in the baseline.
    let mut prev = s.observer.snapshot().map_err(failed)?;
    s.notes();
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    while !stopped() && start.elapsed() + iv / 2 < total {
        sleep_interruptible(iv);
        let r = s.next_report(&mut prev).map_err(failed)?;
        let line = if a.json {
            serde_json::to_string(&r)
                .context("encoding JSON")
                .map_err(failed)?
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

/// `overhead top`: the terminal view on a terminal, text tables otherwise.
pub fn top(a: &TopArgs) -> Result<(), Failure> {
    let iv = check_interval("interval", a.interval).map_err(usage)?;
    let mut s = Session::start(&a.selection)?;
    let mut prev = s.observer.snapshot().map_err(failed)?;
    if std::io::stdout().is_terminal() {
        return tui::run(iv, a.iterations, &STOP, || s.next_report(&mut prev)).map_err(failed);
    }
    s.notes();
    let mut n = 0;
    while !stopped() && a.iterations.is_none_or(|m| n < m) {
        sleep_interruptible(iv);
        let r = s.next_report(&mut prev).map_err(failed)?;
        println!("{}", report::render_text(&r, a.rows));
        n += 1;
    }
    Ok(())
}

/// `overhead serve`: Prometheus metrics on http://LISTEN/metrics.
pub fn serve(a: &ServeArgs) -> Result<(), Failure> {
    let total = a
        .duration
        .map(|d| check_interval("duration", d))
        .transpose()
        .map_err(usage)?;
    // Bind before loading BPF: a busy port must not cost an attach/detach.
    let listener = prom::bind(&a.listen).map_err(refused)?;
    let mut s = Session::start(&a.selection)?;
    s.notes();
    listener
        .set_nonblocking(true)
        .context("listener")
        .map_err(failed)?;
    eprintln!(
        "overhead: serving Prometheus metrics on http://{}/metrics",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| a.listen.clone())
    );
    let start = Instant::now();
    let mut top = a.top.map(crate::prom_top::TopCgroups::new);
    while !stopped() && total.is_none_or(|t| start.elapsed() < t) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let Session {
                    observer,
                    resolver,
                    ropts,
                    ..
                } = &mut s;
                let r = prom::handle(stream, || match observer.snapshot() {
                    Ok(snap) => {
                        let snap = match top.as_mut() {
                            Some(t) => t.fold(&snap),
                            None => snap,
                        };
                        prom::render(&snap, resolver, &ropts.filter, &observer.attached)
                    }
                    Err(e) => format!("# overhead: cannot read maps: {e}\n"),
                });
                if let Err(e) = r {
                    eprintln!("overhead: client error: {e:#}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(failed(anyhow::anyhow!("accept failed: {e}"))),
        }
    }
    Ok(())
}
