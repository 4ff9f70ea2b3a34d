//! Overhead of the observer on the work it watches, measured in one run:
//! a context-switch-heavy workload (two threads ping-ponging a byte over
//! pipes) and a KVM exit-heavy workload (a guest doing port writes), each
//! timed without and with the observer attached, alternating A/B/A/B so
//! drift on this shared machine hits both sides alike; medians are compared.
//! Then, with BPF_ENABLE_STATS on, the kernel's own per-program run time.
//!
//! Run: `sudo cargo bench -p ebpf` (root: loads BPF, opens /dev/kvm).

use livehost_ebpf::kernel::enable_run_time_stats;
use livehost_ebpf::kvm_guest::run_pio_guest;
use livehost_ebpf::observer::{Observer, ObserverOptions};
use std::io::{Read, Write};
use std::time::Instant;

const ROUND_TRIPS: u32 = 20_000;
const EXITS: u32 = 20_000;
const ROUNDS: usize = 7;

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array we pass.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe failed");
    use std::os::fd::FromRawFd;
    // SAFETY: both fds are fresh and owned by us from here on.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

/// ns per round trip (two context switches each way when the threads share
/// a CPU, two wakeups each way otherwise).
fn ping_pong(n: u32) -> f64 {
    // a: main -> helper, b: helper -> main.
    let (mut a_r, mut a_w) = pipe();
    let (mut b_r, mut b_w) = pipe();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        for _ in 0..n {
            a_r.read_exact(&mut b).unwrap();
            b_w.write_all(&b).unwrap();
        }
    });
    let start = Instant::now();
    let mut b = [1u8; 1];
    for _ in 0..n {
        a_w.write_all(&b).unwrap();
        b_r.read_exact(&mut b).unwrap();
    }
    let el = start.elapsed();
    t.join().unwrap();
    el.as_nanos() as f64 / n as f64
}

fn kvm_exits(n: u32) -> f64 {
    let r = run_pio_guest(n).expect("KVM guest (needs /dev/kvm)");
    r.elapsed_ns as f64 / r.io_exits as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A/B rounds: the observer is attached for the B half of each round.
fn ab(name: &str, unit: &str, f: &dyn Fn() -> f64) -> (f64, f64) {
    f(); // warm up
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        off.push(f());
        let obs = Observer::start(&ObserverOptions::default()).expect("observer attaches");
        on.push(f());
        drop(obs);
    }
    let (a, b) = (median(off.clone()), median(on.clone()));
    let spread = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::MAX, f64::min);
        let hi = v.iter().cloned().fold(0.0, f64::max);
        format!("{lo:.0}..{hi:.0}")
    };
    println!(
        "{name:<28} without {a:>9.0} {unit} [{}]  with {b:>9.0} {unit} [{}]  ratio {:.3}  ({:+.1}%)",
        spread(&off),
        spread(&on),
        b / a,
        (b / a - 1.0) * 100.0
    );
    (a, b)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` / test discovery
    }
    assert!(
        livehost_common::is_root(),
        "the overhead bench needs root: sudo cargo bench -p ebpf"
    );
    println!(
        "overhead bench: {ROUNDS} A/B rounds, medians; host kernel {}",
        livehost_common::sysfs::read_attr("/proc/sys/kernel/osrelease").unwrap_or_default()
    );
    let (pp_off, pp_on) = ab(&format!("pipe ping-pong x{ROUND_TRIPS}"), "ns/rt", &|| {
        ping_pong(ROUND_TRIPS)
    });
    let (kv_off, kv_on) = ab(
        &format!("KVM port-write exits x{EXITS}"),
        "ns/exit",
        &|| kvm_exits(EXITS),
    );
    println!(
        "added per ping-pong round trip: {:.0} ns; per KVM exit: {:.0} ns (nested-virt host: exits are emulated, label accordingly)",
        pp_on - pp_off,
        kv_on - kv_off
    );

    // Per-program cost as the kernel measures it.
    let stats = enable_run_time_stats().expect("BPF_ENABLE_STATS");
    let obs = Observer::start(&ObserverOptions {
        calibrate: true,
        ..Default::default()
    })
    .expect("observer attaches");
    ping_pong(ROUND_TRIPS);
    kvm_exits(EXITS);
    println!(
        "\nper-program run time (BPF_ENABLE_STATS, during one ping-pong + one KVM run, plus whatever else ran):"
    );
    println!(
        "{:<28} {:>12} {:>14} {:>10}",
        "program", "run_cnt", "run_time_ns", "ns/run"
    );
    for (name, cnt, ns) in obs.program_stats() {
        let per = if cnt > 0 { ns as f64 / cnt as f64 } else { 0.0 };
        println!("{name:<28} {cnt:>12} {ns:>14} {per:>10.1}");
    }
    drop(obs);
    drop(stats);
}
