//! Self-inflicted throttling must be visible next to the wait it causes: a
//! busy loop under a 20% CPU quota (v1 cpu controller, since this hybrid
//! host's v2 tree has no cpu controller) shows nr_throttled/throttled_usec
//! from cgroupfs in its row, read through the v1 fallback, and about 20% CPU.

mod util;

use livehost_ebpf::cgroup::{self, CpuSource, Resolver};
use livehost_ebpf::observer::{Observer, ObserverOptions};
use livehost_ebpf::report::ReportOptions;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Dirs(Vec<PathBuf>);

impl Drop for Dirs {
    fn drop(&mut self) {
        for d in &self.0 {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn quota_throttling_shows_up_in_the_cgroup_row() {
    quota_case("quota", None);
}

/// On a hybrid host the v1 cpu cgroup need not share the v2 path (a runtime
/// may manage only one of the trees): the row follows the process there.
#[test]
fn v1_quota_is_found_where_the_process_is_not_at_the_v2_path() {
    util::require_root();
    let r = Resolver::new();
    let v2_has_cpu = r.mounts.v2.as_ref().is_some_and(|v2| {
        std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu"))
    });
    if v2_has_cpu || r.mounts.v1_cpu.is_none() {
        eprintln!("skipped: not a hybrid host (the v2 tree has the cpu controller)");
        return;
    }
    quota_case(
        "quota-v2",
        Some(format!("livehost-test-{}-elsewhere", std::process::id())),
    );
}

/// A busy loop under a 20% quota in the v2 cgroup `livehost-test-PID-SUFFIX`;
/// on a hybrid host the quota is set in the v1 cpu cgroup `v1_name` (default:
/// the same name).
fn quota_case(suffix: &str, v1_name: Option<String>) {
    util::require_root();
    let mut resolver = Resolver::new();
    let v2 = resolver.mounts.v2.clone().expect("cgroup v2 mounted");
    let name = format!("livehost-test-{}-{suffix}", std::process::id());
    let v2dir = v2.join(&name);
    // Where the quota goes: the v2 cpu controller when enabled there, else
    // the v1 cpu hierarchy (hybrid hosts like this one).
    let v2_has_cpu = std::fs::read_to_string(v2.join("cgroup.subtree_control"))
        .map(|c| c.split_whitespace().any(|x| x == "cpu"))
        .unwrap_or(false);
    let mut dirs = Dirs(vec![v2dir.clone()]);
    std::fs::create_dir(&v2dir).expect("mkdir v2 cgroup");
    let mut join = format!("echo $$ > {}/cgroup.procs", v2dir.display());
    if v2_has_cpu {
        std::fs::write(v2dir.join("cpu.max"), "20000 100000").unwrap();
    } else {
        let v1 = resolver
            .mounts
            .v1_cpu
            .clone()
            .expect("neither a v2 cpu controller nor a v1 cpu hierarchy");
        let v1dir = v1.join(v1_name.as_deref().unwrap_or(&name));
        std::fs::create_dir(&v1dir).expect("mkdir v1 cpu cgroup");
        dirs.0.insert(0, v1dir.clone());
        std::fs::write(v1dir.join("cpu.cfs_period_us"), "100000").unwrap();
        std::fs::write(v1dir.join("cpu.cfs_quota_us"), "20000").unwrap();
        join += &format!(" && echo $$ > {}/cgroup.procs", v1dir.display());
    }
    let id = std::fs::metadata(&v2dir).unwrap().ino();

    let obs = Observer::start(&ObserverOptions {
        vms: false,
        ..Default::default()
    })
    .unwrap();
    let script =
        format!("{join} && exec sh -c 'i=0; while [ $i -lt 2000000000 ]; do i=$((i+1)); done'");
    let hog = util::KillOnDrop(
        Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let settled = util::wait_for(Duration::from_secs(5), || {
        cgroup::pid_cgroup_path(hog.0.id()).filter(|p| p.ends_with(&name))
    });
    assert!(settled.is_some(), "hog did not enter its cgroup");
    std::thread::sleep(Duration::from_millis(300));
    let s0 = obs.snapshot().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let s1 = obs.snapshot().unwrap();
    let r = util::interval_report(&obs, &s0, &s1, &mut resolver, &ReportOptions::default());
    drop(hog);
    let row = r
        .cgroups
        .iter()
        .find(|c| c.id == id)
        .expect("row for the quota cgroup");
    eprintln!(
        "quota cgroup row: cpu {} ms, waits {}, files {:?}",
        row.cpu_ns / 1_000_000,
        row.rq_waits,
        row.cpu_files
    );
    assert_eq!(
        row.cpu_files.source,
        Some(if v2_has_cpu {
            CpuSource::V2
        } else {
            CpuSource::V1
        })
    );
    assert!(
        row.cpu_files.nr_throttled.unwrap_or(0) >= 5,
        "throttled periods: {:?}",
        row.cpu_files
    );
    assert!(
        row.cpu_files.throttled_usec.unwrap_or(0) > 100_000,
        "throttled time: {:?}",
        row.cpu_files
    );
    // 20% of 1.5 s is 300 ms; allow period alignment and measurement edges.
    let share = row.cpu_ns as f64 / (r.interval_s * 1e9);
    assert!(
        (0.1..0.35).contains(&share),
        "CPU share under a 20% quota: {share:.3}"
    );
    // Each throttle ends a run while still runnable, so it also shows up as wait.
    assert!(
        row.rq_waits >= 5,
        "throttled runs show as waits: {}",
        row.rq_waits
    );
}
