//! Overhead of the observer on the work it watches, measured in one run:
//! a context-switch-heavy workload (two threads ping-ponging a byte over
//! pipes) and a KVM exit-heavy workload (a guest doing port writes), each
//! timed with nothing attached, with empty programs on the observer's hooks
//! and with the observer, in turn, so drift on this shared machine hits
//! every leg alike; medians are compared, and the observer's added time is
//! given as a ratio to the empty programs' (what any tracer on those hooks
//! costs). Then, with BPF_ENABLE_STATS on, the kernel's own run time of
//! each program beside the empty one on its hook.
//!
//! Run: `sudo cargo bench -p ebpf` (root: loads BPF, opens /dev/kvm).

use livehost_ebpf::kernel::enable_run_time_stats;
use livehost_ebpf::kvm_guest::run_pio_guest;
use livehost_ebpf::observer::{Observer, ObserverOptions, calib_of};
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

fn spread(v: &[f64]) -> String {
    let lo = v.iter().cloned().fold(f64::MAX, f64::min);
    let hi = v.iter().cloned().fold(0.0, f64::max);
    format!("{lo:.0}..{hi:.0}")
}

/// Added cost of the observer over that of empty programs on the same hooks
/// (1.0: the observer costs no more than attaching anything there at all).
fn ratio(none: f64, empty: f64, observer: f64) -> String {
    if empty - none <= 0.0 {
        return "n/a (the empty programs added nothing measurable: noise)".into();
    }
    format!("{:.2}", (observer - none) / (empty - none))
}

/// Rounds of three legs, in turn: nothing attached, empty programs on the
/// observer's hooks, the observer. Returns the medians.
fn legs(name: &str, unit: &str, f: &dyn Fn() -> f64) -> [f64; 3] {
    f(); // warm up
    let mut runs: [Vec<f64>; 3] = Default::default();
    for _ in 0..ROUNDS {
        runs[0].push(f());
        for (leg, empty) in [(1, true), (2, false)] {
            let opts = ObserverOptions {
                empty,
                ..Default::default()
            };
            let obs = Observer::start(&opts).expect("observer attaches");
            runs[leg].push(f());
            drop(obs);
        }
    }
    let m = [0, 1, 2].map(|i| median(runs[i].clone()));
    println!(
        "{name:<28} none {:>8.0} [{}]  empty {:>8.0} [{}]  observer {:>8.0} [{}] {unit}",
        m[0],
        spread(&runs[0]),
        m[1],
        spread(&runs[1]),
        m[2],
        spread(&runs[2]),
    );
    println!(
        "{:<28} added: empty {:+.0}, observer {:+.0} {unit}; observer/empty added-time ratio {}",
        "",
        m[1] - m[0],
        m[2] - m[0],
        ratio(m[0], m[1], m[2])
    );
    m
}

/// The kernel's own run time per program (BPF_ENABLE_STATS), each real
/// program beside the empty one on its hook, over one run of each workload.
fn per_program() {
    let stats = enable_run_time_stats().expect("BPF_ENABLE_STATS");
    let obs = Observer::start(&ObserverOptions {
        calibrate: true,
        ..Default::default()
    })
    .expect("observer attaches");
    ping_pong(ROUND_TRIPS);
    kvm_exits(EXITS);
    let all = obs.program_stats();
    drop(obs);
    drop(stats);
    println!(
        "\nper-program run time (BPF_ENABLE_STATS, one ping-pong + one KVM run, plus whatever else ran):"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>8}",
        "program", "run_cnt", "ns/run", "empty ns/run", "ratio"
    );
    let per = |name: &str| {
        all.iter().find(|(n, _, _)| n == name).map(|(_, cnt, ns)| {
            (
                *cnt,
                if *cnt > 0 {
                    *ns as f64 / *cnt as f64
                } else {
                    0.0
                },
            )
        })
    };
    for (name, _, _) in all.iter().filter(|(n, _, _)| n.starts_with("handle_")) {
        let (cnt, ns) = per(name).unwrap_or_default();
        let floor = calib_of(name).and_then(per).map_or(0.0, |(_, ns)| ns);
        let r = if floor > 0.0 { ns / floor } else { 0.0 };
        println!("{name:<28} {cnt:>10} {ns:>10.1} {floor:>12.1} {r:>8.2}");
    }
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
        "overhead bench: {ROUNDS} rounds of none / empty programs / observer, medians; host kernel {}",
        livehost_common::sysfs::read_attr("/proc/sys/kernel/osrelease").unwrap_or_default()
    );
    legs(&format!("pipe ping-pong x{ROUND_TRIPS}"), "ns/rt", &|| {
        ping_pong(ROUND_TRIPS)
    });
    legs(
        &format!("KVM port-write exits x{EXITS}"),
        "ns/exit",
        &|| kvm_exits(EXITS),
    );
    println!("(nested-virt host: KVM exits are emulated here, label accordingly)");
    per_program();
}
