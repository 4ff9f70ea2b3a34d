//! A real container: runc (Debian package) runs a busybox busy loop under a
//! 20% CPU quota in a docker-style cgroup (`/docker-<64 hex>.scope`, what
//! dockerd with the systemd driver creates). Its row must carry the
//! container name, its CPU share and its throttling, read from cgroupfs
//! (the v1 cpu controller on this hybrid host).

mod util;

use livehost_ebpf::cgroup::Resolver;
use livehost_ebpf::observer::{Observer, ObserverOptions};
use livehost_ebpf::report::ReportOptions;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Kills and deletes the runc container on drop (runc removes its cgroups).
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .args(["kill", &self.0, "KILL"])
            .output();
        let _ = Command::new("runc")
            .args(["delete", "-f", &self.0])
            .output();
    }
}

#[test]
fn runc_container_is_named_and_its_throttling_shown() {
    util::require_root();
    assert!(
        Path::new("/bin/busybox").exists(),
        "needs /bin/busybox (Debian package busybox-static) for the container's rootfs"
    );
    let nanos = livehost_common::monotonic_ns();
    let pid = std::process::id() as u64;
    let id = format!(
        "{:016x}{:016x}{:016x}{:016x}",
        pid,
        nanos,
        pid ^ nanos,
        0x6c69_7665_686f_7374u64
    );
    let scope = format!("docker-{id}.scope");
    let name = format!("livehost-test-{pid}");

    let bundle = tempfile::tempdir().unwrap();
    let rootfs = bundle.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    let spec = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(bundle.path())
        .output()
        .expect("runc (Debian package runc) must be installed");
    assert!(
        spec.status.success(),
        "runc spec: {}",
        String::from_utf8_lossy(&spec.stderr)
    );
    let cfg_path = bundle.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["process"]["terminal"] = false.into();
    cfg["process"]["args"] = serde_json::json!([
        "/bin/sh",
        "-c",
        "i=0; while [ $i -lt 2000000000 ]; do i=$((i+1)); done"
    ]);
    cfg["root"]["readonly"] = true.into();
    cfg["linux"]["cgroupsPath"] = format!("/{scope}").into();
    cfg["linux"]["resources"]["cpu"] = serde_json::json!({"quota": 20000, "period": 100000});
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();

    let obs = Observer::start(&ObserverOptions {
        vms: false,
        ..Default::default()
    })
    .unwrap();
    let _guard = Container(name.clone());
    let _run = util::KillOnDrop(
        Command::new("runc")
            .args(["run", "--bundle"])
            .arg(bundle.path())
            .arg(&name)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut resolver = Resolver::new();
    let v2 = resolver.mounts.v2.clone().expect("cgroup v2 mounted");
    let cgdir = v2.join(&scope);
    let up = util::wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(cgdir.join("cgroup.procs"))
            .ok()
            .filter(|p| !p.trim().is_empty())
    });
    assert!(
        up.is_some(),
        "the container never appeared in {}",
        cgdir.display()
    );
    std::thread::sleep(Duration::from_millis(300));
    let s0 = obs.snapshot().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let s1 = obs.snapshot().unwrap();
    let r = util::interval_report(&obs, &s0, &s1, &mut resolver, &ReportOptions::default());
    let want = format!("docker:{}", &id[..12]);
    let row = r
        .cgroups
        .iter()
        .find(|c| c.container.as_deref() == Some(want.as_str()))
        .unwrap_or_else(|| {
            panic!(
                "no row named {want}: {:?}",
                r.cgroups
                    .iter()
                    .map(|c| (&c.path, &c.container))
                    .collect::<Vec<_>>()
            )
        });
    eprintln!(
        "container row: {:?} cpu {} ms files {:?}",
        row.container,
        row.cpu_ns / 1_000_000,
        row.cpu_files
    );
    assert_eq!(row.path.as_deref(), Some(format!("/{scope}").as_str()));
    assert!(
        row.cpu_files.source.is_some(),
        "throttling read from cgroupfs: {:?}",
        row.cpu_files
    );
    assert!(
        row.cpu_files.nr_throttled.unwrap_or(0) >= 5,
        "{:?}",
        row.cpu_files
    );
    let share = row.cpu_ns as f64 / (r.interval_s * 1e9);
    assert!(
        (0.1..0.35).contains(&share),
        "CPU share under runc's 20% quota: {share:.3}"
    );
}
