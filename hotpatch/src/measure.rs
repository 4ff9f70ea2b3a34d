//! Service-interruption probe: what a running workload feels while a patch
//! transitions. Spinning threads read CLOCK_MONOTONIC in a tight loop (the
//! largest gap between two reads is the longest time they were kept off the
//! CPU), and one thread sleeps 1 ms at a time in nanosleep (its worst wake-up
//! overshoot is what a task blocked in a syscall feels). The same probe runs
//! for an equally long window without patching, so the added stall is the
//! difference, not the machine's background noise.

use livehost_common::monotonic_ns;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Window {
    pub duration_ms: f64,
    /// Largest gap any spinning thread saw between two clock reads.
    pub spin_max_gap_us: f64,
    /// Gaps over 100 µs, summed over spinning threads.
    pub spin_gaps_over_100us: u64,
    pub spin_reads: u64,
    /// Worst lateness of a 1 ms nanosleep.
    pub sleep_max_overshoot_us: f64,
    pub sleeps: u64,
}

/// The `measure` part of `hotpatch load --measure --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub environment: crate::host::Environment,
    pub spinning_threads: usize,
    pub transition: Window,
    pub baseline: Window,
    /// max(0, transition - baseline) of the spin max gap.
    pub added_stall_us: f64,
    pub added_sleep_overshoot_us: f64,
    pub method: String,
}

enum Stats {
    Spin { max_gap: u64, over: u64, reads: u64 },
    Sleep { max_over: u64, n: u64 },
}

/// Probe threads running until `stop`.
pub struct Probe {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Stats>>,
    start: u64,
}

/// One spinner per CPU but one, so the kernel's own work (the transition's
/// workqueue, our main thread) still gets a CPU and we measure interruption,
/// not starvation we caused.
pub fn spinners() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

impl Probe {
    pub fn start(n_spin: usize) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..n_spin {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let (mut max_gap, mut over, mut reads) = (0u64, 0u64, 0u64);
                let mut last = monotonic_ns();
                loop {
                    let now = monotonic_ns();
                    let gap = now.saturating_sub(last);
                    max_gap = max_gap.max(gap);
                    if gap > 100_000 {
                        over += 1;
                    }
                    last = now;
                    reads += 1;
                    if reads % 1024 == 0 && stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                Stats::Spin {
                    max_gap,
                    over,
                    reads,
                }
            }));
        }
        let s = stop.clone();
        threads.push(std::thread::spawn(move || {
            let (mut max_over, mut n) = (0u64, 0u64);
            while !s.load(Ordering::Relaxed) {
                let t = monotonic_ns();
                std::thread::sleep(Duration::from_millis(1));
                let slept = monotonic_ns().saturating_sub(t);
                max_over = max_over.max(slept.saturating_sub(1_000_000));
                n += 1;
            }
            Stats::Sleep { max_over, n }
        }));
        Probe {
            stop,
            threads,
            start: monotonic_ns(),
        }
    }

    pub fn stop(self) -> Window {
        self.stop.store(true, Ordering::Relaxed);
        let mut w = Window {
            duration_ms: (monotonic_ns() - self.start) as f64 / 1e6,
            ..Window::default()
        };
        for t in self.threads {
            match t.join() {
                Ok(Stats::Spin {
                    max_gap,
                    over,
                    reads,
                }) => {
                    w.spin_max_gap_us = w.spin_max_gap_us.max(max_gap as f64 / 1e3);
                    w.spin_gaps_over_100us += over;
                    w.spin_reads += reads;
                }
                Ok(Stats::Sleep { max_over, n }) => {
                    w.sleep_max_overshoot_us = max_over as f64 / 1e3;
                    w.sleeps = n;
                }
                Err(_) => {}
            }
        }
        w
    }
}

/// Baseline window of the same length as the transition window (min 200 ms):
/// a longer window would see a larger maximum and flatter our number.
pub fn baseline(n_spin: usize, like: &Window) -> Window {
    let p = Probe::start(n_spin);
    std::thread::sleep(Duration::from_secs_f64((like.duration_ms / 1e3).max(0.2)));
    p.stop()
}

pub fn assemble(
    env: crate::host::Environment,
    n_spin: usize,
    transition: Window,
    baseline: Window,
) -> Measurement {
    Measurement {
        environment: env,
        spinning_threads: n_spin,
        added_stall_us: (transition.spin_max_gap_us - baseline.spin_max_gap_us).max(0.0),
        added_sleep_overshoot_us: (transition.sleep_max_overshoot_us
            - baseline.sleep_max_overshoot_us)
            .max(0.0),
        transition,
        baseline,
        method: "probe threads in the hotpatch process: spinners read CLOCK_MONOTONIC in a loop (max gap = longest time off CPU), one thread does 1 ms nanosleeps (max overshoot); window 1 covers finit_module until the transition completes, window 2 is an equally long baseline right after, without patching".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_sees_time_pass_and_stops() {
        let p = Probe::start(1);
        std::thread::sleep(Duration::from_millis(30));
        let w = p.stop();
        assert!(w.duration_ms >= 30.0);
        assert!(w.spin_reads > 100, "{w:?}");
        assert!(w.sleeps >= 5, "{w:?}");
        assert!(w.spin_max_gap_us > 0.0);
    }
}
