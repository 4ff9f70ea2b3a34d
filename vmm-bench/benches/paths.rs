//! Criterion benches for each path. Start-up and round-trip benches use
//! `iter_custom` with the times the guest (or the launcher) reports, not
//! Criterion's own clock around set-up work.
//!
//! On this project's machines /dev/kvm is a nested, instruction-emulating
//! KVM: the VM numbers describe that host, not hardware (see `vmm-bench probe`).

use criterion::{Criterion, criterion_group, criterion_main};
use std::time::Duration;
use vmm_bench::container::{self, ContainerOpts};
use vmm_bench::vm::boot::{self, UnikernelRun};
use vmm_bench::vm::{Kvm, Mode};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("paths");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(300));

    g.bench_function("native/workload_64k_in_process", |b| {
        let mut buf = vec![0u8; 64 << 10];
        b.iter(|| vmm_bench_workload::checksum(&mut buf, vmm_bench_workload::DEFAULT_SEED))
    });

    g.bench_function("native/null_syscall", |b| {
        // SAFETY: getppid has no preconditions.
        b.iter(|| unsafe { libc::getppid() })
    });

    if let Ok(kvm) = Kvm::open() {
        let cfg = UnikernelRun {
            kib: 4,
            loop_n: 1,
            ..Default::default()
        };
        g.bench_function("vm/unikernel_guest_boot", |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let r = boot::run_unikernel(&kvm, &cfg).expect("unikernel run");
                        Duration::from_secs_f64(r.guest_boot_us.unwrap_or(r.boot_timer_us) / 1e6)
                    })
                    .sum()
            })
        });
        let work = UnikernelRun {
            kib: 16,
            loop_n: 1,
            ..Default::default()
        };
        g.bench_function("vm/workload_16k_guest_time", |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let r = boot::run_unikernel(&kvm, &work).expect("unikernel run");
                        Duration::from_secs_f64(r.guest_workload_us.expect("TSC rate known") / 1e6)
                    })
                    .sum()
            })
        });
        g.bench_function("vm/launch_to_boot_timer", |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        Duration::from_secs_f64(
                            boot::run_unikernel(&kvm, &cfg)
                                .expect("unikernel run")
                                .boot_timer_us
                                / 1e6,
                        )
                    })
                    .sum()
            })
        });
        g.bench_function("vm/port_exit_our_vmm_vs_bare", |b| {
            // Reports our loop's per-exit time; the ratio to the bare loop
            // is printed once, measured in the same run.
            b.iter_custom(|iters| {
                let c = boot::compare_exit_loops(&kvm, 200, 3).expect("exit compare");
                Duration::from_secs_f64(c.vmm_ns * 1e-9 * iters as f64)
            })
        });
        if let Ok(c) = boot::compare_exit_loops(&kvm, 1000, 9) {
            eprintln!(
                "exit round trip: our VMM {:.0} ns, bare KVM_RUN {:.0} ns, ratio {:.3} ({:+.1}%)",
                c.vmm_ns,
                c.bare_ns,
                c.vmm_ns / c.bare_ns,
                c.overhead_pct
            );
        }
        g.bench_function("vm/hello_guest_create_to_halt", |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let (r, _obs, total) = boot::run_raw(
                            &kvm,
                            Mode::Long,
                            boot::code::LONG_HELLO,
                            Duration::from_secs(5),
                        )
                        .expect("raw run");
                        r.expect("hello guest");
                        total
                    })
                    .sum()
            })
        });
    } else {
        eprintln!("/dev/kvm unusable: VM benches skipped (run `vmm-bench probe`)");
    }

    if livehost_common::is_root() {
        let opts = ContainerOpts {
            args: vec!["kib=4".into(), "loops=1".into()],
            ..Default::default()
        };
        g.bench_function("container/launch_to_exit", |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        Duration::from_secs_f64(
                            container::run(&opts).expect("container run").total_us / 1e6,
                        )
                    })
                    .sum()
            })
        });
    }
    g.bench_function("native/spawn_to_exit", |b| {
        let args = vec!["kib=4".to_string(), "loops=1".to_string()];
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    Duration::from_secs_f64(
                        vmm_bench::native::run(&args, Duration::from_secs(10))
                            .expect("native run")
                            .total_us
                            / 1e6,
                    )
                })
                .sum()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
