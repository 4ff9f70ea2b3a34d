//! SIGKILL of vmm-bench (which no handler can catch) orphans nothing: the
//! native workload, container inits (and so their pid namespaces) and
//! runc are started with PR_SET_PDEATHSIG, so the kernel kills them when
//! vmm-bench dies. (QEMU gets the same from kernel-tests' launcher.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_vmm-bench");

fn root() {
    assert!(livehost_common::is_root(), "needs root (CI runs as root)");
}

/// Poll `f` every 20 ms until it returns Some, at most `secs` seconds.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(secs), "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pids_in(file: &Path) -> Option<Vec<i32>> {
    let v: Vec<i32> = std::fs::read_to_string(file)
        .ok()?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    (!v.is_empty()).then_some(v)
}

/// The children of `pid`, any thread.
fn children(pid: u32) -> Option<Vec<i32>> {
    let mut v = vec![];
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        v.extend(pids_in(&t.path().join("children")).unwrap_or_default());
    }
    (!v.is_empty()).then_some(v)
}

/// SIGKILL `child`, reap it, and check every pid in `left` is gone
/// within 3 s.
fn kill_and_check(mut child: Child, left: &[i32]) {
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for(
        3,
        &format!("processes {left:?} survived SIGKILL of vmm-bench"),
        || {
            left.iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists())
                .then_some(())
        },
    );
}

fn spawn(args: &[&str]) -> Child {
    Command::new(EXE)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn sigkill_during_a_container_command_leaves_no_process() {
    root();
    let name = format!("vmmb-orphan-{}", std::process::id());
    let leaf: PathBuf = vmm_bench::container::cgroup2_root()
        .unwrap()
        .join(livehost_common::container::cgroup_leaf(&name));
    for mode in ["container", "namespaced-process"] {
        let child = spawn(&[
            "container",
            "--mode",
            mode,
            "--name",
            &name,
            "--quiet",
            "--",
            "/bin/sh",
            "-c",
            "sleep 100 & sleep 100",
        ]);
        let inside = wait_for(10, "the container never started", || {
            pids_in(&leaf.join("cgroup.procs")).filter(|p| p.len() >= 2)
        });
        kill_and_check(child, &inside);
        // The leaf of a SIGKILLed vmm-bench stays (nobody to remove it).
        let _ = std::fs::remove_dir(&leaf);
    }
}

#[test]
fn sigkill_during_run_native_and_run_container_leaves_no_process() {
    root();
    let busy = ["--kib", "4", "--loops", "1000000000", "--timeout", "60"];
    let child = spawn(&[&["run", "native"][..], &busy].concat());
    let id = child.id();
    let kids = wait_for(10, "the native workload never started", || children(id));
    kill_and_check(child, &kids);

    let child = spawn(&[&["run", "container"][..], &busy].concat());
    let root = vmm_bench::container::cgroup2_root().unwrap();
    let leaf = root.join(format!("livehost-vmm-bench-{}-0", child.id()));
    let inside = wait_for(10, "the container never started", || {
        pids_in(&leaf.join("cgroup.procs"))
    });
    kill_and_check(child, &inside);
    let _ = std::fs::remove_dir(&leaf);
}
