//! Every path runs the same workload and returns the same checksum; the
//! container is really isolated and leaves nothing behind.

use std::time::Duration;
use vmm_bench::container::{self, ContainerOpts};
use vmm_bench::qemu::{self, field, field_u64};
use vmm_bench::{native, vm};

const KIB: u64 = 64;

fn expected() -> u64 {
    native::expected_checksum(KIB, vmm_bench_workload::DEFAULT_SEED).unwrap()
}

fn args(extra: &[&str]) -> Vec<String> {
    let mut v = vec![format!("kib={KIB}"), "loops=100".to_string()];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// QEMU's accelerator as the report would choose it for this host.
fn accel() -> vmm_bench::vm::probe::Accel {
    qemu::choose_accel(vm::probe::probe(Duration::from_secs(1)).accel)
}

fn root() {
    assert!(
        livehost_common::is_root(),
        "these tests need root (namespaces, cgroups, runc): rerun with sudo; CI runs as root"
    );
}

#[test]
fn native_process_returns_the_checksum() {
    let r = native::run(&args(&[]), Duration::from_secs(20)).unwrap();
    assert_eq!(r.exit_code, 0);
    assert_eq!(
        field_u64(&r.stdout, "checksum"),
        Some(expected()),
        "{}",
        r.stdout
    );
}

fn ns(link: &str) -> String {
    std::fs::read_link(link).unwrap().display().to_string()
}

/// Other tests run in parallel and have their own children, so check the
/// one pid in question: gone from /proc means exited and reaped.
fn gone(pid: i32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn container_is_isolated_and_cleaned_up() {
    isolated_and_cleaned_up(container::Mode::Container);
    isolated_and_cleaned_up(container::Mode::NamespacedProcess);
}

fn isolated_and_cleaned_up(mode: container::Mode) {
    root();
    let before = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    let r = container::run(&ContainerOpts {
        args: args(&["--info"]),
        hostname: "vmmb-test".into(),
        mode,
        ..Default::default()
    })
    .unwrap();
    let l = r.stdout.trim();
    assert_eq!(r.exit_code, 0, "{l}");
    assert_eq!(field_u64(l, "checksum"), Some(expected()), "{l}");
    assert_eq!(field(l, "pid"), Some("1"), "pid 1 inside: {l}");
    assert_eq!(field(l, "hostname"), Some("vmmb-test"), "{l}");
    for (k, link) in [
        ("mnt", "/proc/self/ns/mnt"),
        ("uts", "/proc/self/ns/uts"),
        ("ipc", "/proc/self/ns/ipc"),
        ("pidns", "/proc/self/ns/pid"),
    ] {
        assert_ne!(
            field(l, k),
            Some(ns(link).as_str()),
            "{k} namespace must differ from the host's: {l}"
        );
    }
    assert_eq!(
        field(l, "netns"),
        Some(ns("/proc/self/ns/net").as_str()),
        "no netns asked for: {l}"
    );
    let cg = r.cgroup.clone().expect("this host has a cgroup v2 tree");
    let leaf = std::path::Path::new(&cg)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    // A real container has its own cgroup namespace rooted at its leaf.
    let seen = match mode {
        container::Mode::Container => "0::/;".to_string(),
        container::Mode::NamespacedProcess => format!("0::/{leaf}"),
    };
    assert!(
        field(l, "cgroup").is_some_and(|c| c.contains(&seen)),
        "in its v2 cgroup {leaf}: {l}"
    );
    // Nothing left behind: cgroup removed, child reaped, host mounts unchanged.
    assert!(
        !std::path::Path::new(&cg).exists(),
        "cgroup {cg} left behind"
    );
    assert!(gone(r.pid), "container init {} left behind", r.pid);
    let after = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    assert_eq!(
        before, after,
        "the container's /proc mount leaked into the host"
    );
}

#[test]
fn container_with_net_and_user_namespaces() {
    root();
    let r = container::run(&ContainerOpts {
        args: args(&["--info"]),
        net: true,
        user: true,
        mode: container::Mode::NamespacedProcess,
        ..Default::default()
    })
    .unwrap();
    let l = r.stdout.trim();
    assert_eq!(field_u64(l, "checksum"), Some(expected()), "{l}");
    assert_ne!(
        field(l, "netns"),
        Some(ns("/proc/self/ns/net").as_str()),
        "{l}"
    );
}

#[test]
fn container_timeout_kills_and_cleans_up() {
    root();
    // A workload far too big to finish in 50 ms.
    let e = container::run(&ContainerOpts {
        args: vec!["kib=1048576".into(), "loops=100000000".into()],
        timeout: Duration::from_millis(50),
        ..Default::default()
    })
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("ran past its deadline and was killed"),
        "{msg}"
    );
    let pid: i32 = msg
        .split("pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("error names the pid");
    assert!(gone(pid), "container init {pid} left after the timeout");
}

#[test]
fn runc_returns_the_checksum_or_is_skipped_with_a_reason() {
    root();
    let Some(runc) = container::find_runc() else {
        eprintln!("runc not installed: row skipped (apt-get install runc)");
        return;
    };
    let b = container::make_bundle(&args(&["--info"])).unwrap();
    let r = container::run_runc(&runc, &b, Duration::from_secs(30)).unwrap();
    assert_eq!(
        field_u64(&r.stdout, "checksum"),
        Some(expected()),
        "{}",
        r.stdout
    );
    assert_eq!(field(&r.stdout, "pid"), Some("1"));
    assert_eq!(field(&r.stdout, "hostname"), Some("livehost-runc"));
}

#[test]
fn runc_absent_gives_a_clear_error() {
    let b = container::make_bundle(&args(&[])).unwrap();
    let e = container::run_runc(
        std::path::Path::new("/nonexistent/runc"),
        &b,
        Duration::from_secs(5),
    )
    .unwrap_err();
    assert!(
        format!("{e:#}").contains("cannot start /nonexistent/runc"),
        "{e:#}"
    );
}

/// runc (here a stand-in script) writing far more than a pipe buffer to
/// stderr before its stdout closes must not stall the run: both pipes are
/// drained at once.
#[test]
fn runc_with_a_noisy_stderr_does_not_stall() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("runc");
    // `runc --root STATE run --bundle DIR ID` prints; `delete` is a no-op.
    std::fs::write(
        &fake,
        "#!/bin/sh\n[ \"$3\" = run ] || exit 0\nhead -c 1000000 /dev/zero | tr '\\0' w >&2\necho LIVEHOST-LX checksum=0x2\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let b = container::make_bundle(&args(&[])).unwrap();
    let t = std::time::Instant::now();
    let r = container::run_runc(&fake, &b, Duration::from_secs(20)).unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(field_u64(&r.stdout, "checksum"), Some(2), "{}", r.stdout);
}

#[test]
fn unikernel_under_qemu_pvh_returns_the_checksum() {
    let r = qemu::run_unikernel(
        vm::boot::UNIKERNEL,
        KIB,
        100,
        Duration::from_secs(60),
        accel(),
    )
    .unwrap();
    assert_eq!(r.exit_code, 33);
    assert_eq!(
        field_u64(&r.line, "checksum"),
        Some(expected()),
        "{}",
        r.line
    );
    assert_eq!(field(&r.line, "pvh"), Some("1"));
}

#[test]
fn linux_under_qemu_returns_the_checksum() {
    let img = qemu::linux_image().unwrap();
    let r = qemu::run_linux(&img, KIB, 100, Duration::from_secs(120), accel()).unwrap();
    assert_eq!(
        field_u64(&r.line, "checksum"),
        Some(expected()),
        "{}",
        r.line
    );
    assert_eq!(
        field(&r.line, "pid"),
        Some("1"),
        "the workload is the guest's init"
    );
}

#[test]
fn initramfs_is_a_valid_newc_archive() {
    let a = qemu::initramfs(b"hello");
    assert!(a.starts_with(b"070701"));
    assert_eq!(a.len() % 512, 0);
    let s = String::from_utf8_lossy(&a);
    for name in ["dev/console", "init", "TRAILER!!!"] {
        assert!(s.contains(name), "{name}");
    }
}
