//! `overhead`: what the host costs each VM and each container, live. This
//! binary only parses arguments; `livehost_ebpf::session` does the work.

use clap::{Parser, Subcommand};
use livehost_ebpf::session::{self, RecordArgs, ServeArgs, TopArgs};

#[derive(Parser)]
#[command(
    name = "overhead",
    version,
    about = "Per-VM and per-container host overhead, measured in the kernel with eBPF",
    long_about = "overhead attaches tp_btf programs to the KVM tracepoints (kvm_exit, kvm_entry, \
kvm_userspace_exit, kvm_pio) and to the scheduler (sched_wakeup, sched_wakeup_new, sched_switch, \
sched_process_exit), aggregates in kernel maps (sized by the --max-* flags; their memory is printed \
at start), and shows per VM / vCPU: exits per reason with the time from \
exit to re-entry, user-space exits, run-queue delay (steal time); and per cgroup (container): CPU \
time, run-queue latency p50/p99/max, who held the CPU while it waited (same cgroup, another cgroup, \
host), throttling and CPU pressure from cgroupfs. A cgroup whose p99 wait crosses --noisy-p99-ms is \
flagged as a noisy-neighbour victim, with the cgroups that preempted it most.\n\n\
Needs root (or CAP_BPF + CAP_PERFMON) and a kernel with BTF. Programs whose tracepoint the kernel \
lacks (no KVM loaded), or that it refuses to load, are skipped with a one-line note. Nothing is pinned: when overhead exits, everything \
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
    Top(TopArgs),
    /// Print one report per interval: JSON lines with --json (schema in the README), tables otherwise.
    Record(RecordArgs),
    /// Serve Prometheus metrics on http://ADDR/metrics until interrupted.
    Serve(ServeArgs),
}

fn main() {
    let cli = Cli::parse();
    session::install_signals();
    let result = match &cli.cmd {
        Cmd::Top(a) => session::top(a),
        Cmd::Record(a) => session::record(a),
        Cmd::Serve(a) => session::serve(a),
    };
    if let Err(f) = result {
        eprintln!("overhead: error: {:#}", f.error);
        std::process::exit(f.code);
    }
}
