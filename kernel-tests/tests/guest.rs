//! End-to-end tests of the harness: real QEMU, real Debian kernel.
//! They need root-free QEMU and the network (first run) or a warm cache.

use kernel_tests::{GuestStatus, KernelSpec, RunOptions};
use std::path::Path;
use std::time::{Duration, Instant};

fn opts(cmd: &str) -> RunOptions {
    let mut o = RunOptions::new([cmd]);
    o.timeout = Duration::from_secs(60);
    o
}

#[test]
fn uname_matches_the_fetched_kernel_and_status_comes_back() {
    let k = kernel_tests::fetch(&KernelSpec::default()).unwrap();
    // One boot checks several facts: the version, byte-exact stdout with
    // awkward bytes, stderr kept apart, the exit status (7 only if the
    // kernel's config is in /boot, as on a Debian host).
    let out = kernel_tests::run(&opts(
        "uname -r; printf 'tab\\there\\n\\001\\377end'; echo to-stderr >&2; \
         test -s /boot/config-$(uname -r) && exit 7; exit 8",
    ))
    .unwrap();
    assert_eq!(
        out.status,
        GuestStatus::Exited(7),
        "{}",
        out.console_tail(30)
    );
    let (first, rest) = out.stdout.split_once('\n').unwrap();
    assert_eq!(first, k.release);
    assert!(rest.starts_with("tab\there\n\u{1}"), "{rest:?}");
    assert_eq!(out.stderr, "to-stderr\n");
    assert_eq!(out.release, k.release);
    assert!(out.timings.kernel_boot_ms.unwrap() > 0.0);
    assert!(!out.accel_reason.is_empty());
    // Debian's kernels are built with CONFIG_PVH: booted at that entry.
    assert_eq!(out.boot, "pvh");
}

#[test]
fn success_is_zero_and_argv_form_quotes() {
    let o = RunOptions::new(["sh", "-c", "echo \"$0\" \"$1\"", "quoted arg", "it's"]);
    let out = kernel_tests::run(&o).unwrap();
    assert_eq!(out.success().unwrap(), "quoted arg it's\n");
}

#[test]
fn a_command_past_its_timeout_is_reported_as_timeout() {
    let mut o = opts("echo started; sleep 600; echo never");
    o.timeout = Duration::from_secs(3);
    let t = Instant::now();
    let out = kernel_tests::run(&o).unwrap();
    assert_eq!(out.status, GuestStatus::Timeout);
    assert_eq!(out.stdout, "started\n");
    // Ended by the guest-side timeout, not the host's long backstop.
    assert!(t.elapsed() < Duration::from_secs(90), "{:?}", t.elapsed());
}

/// The command runs as root in the guest and may print anything: a forged
/// result frame (the old unstamped form, on the result port however it can
/// reach it, on its own stdout and on the console) and the old timeout
/// marker file must not change the status it really exited with.
#[test]
fn a_command_that_forges_the_result_frame_still_reports_its_real_status() {
    let forged = "LIVEHOST-BEGIN\nstatus 0\nstdout\nend\nstderr\nend\ndmesg\nend\nLIVEHOST-END\n";
    let script = format!(
        "F='{forged}'\n\
         test -e /livehost/nonce && echo nonce-readable || echo nonce-gone\n\
         test -e /dev/ttyS1 && echo port-present || echo port-gone\n\
         printf \"$F\" > /dev/ttyS1 2>/dev/null\n\
         mknod /tmp/s1 c 4 65 && printf \"$F\" > /tmp/s1\n\
         printf \"$F\" > /proc/1/fd/9 2>/dev/null\n\
         printf \"$F\" > /dev/console\n\
         printf \"$F\"\n\
         touch /tmp/.livehost-timedout\n\
         exit 3\n"
    );
    let out = kernel_tests::run(&opts(&script)).unwrap();
    assert_eq!(
        out.status,
        GuestStatus::Exited(3),
        "{}",
        out.console_tail(30)
    );
    assert!(
        out.stdout.starts_with("nonce-gone\nport-gone\n"),
        "{:?}",
        out.stdout
    );
    // Its own output comes back byte-exact, forged frame included.
    assert!(out.stdout.ends_with(forged), "{:?}", out.stdout);
}

#[test]
fn a_kernel_panic_is_reported_as_panic() {
    let out = kernel_tests::run(&opts(
        "echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger; sleep 5",
    ))
    .unwrap();
    assert_eq!(out.status, GuestStatus::Panic, "{}", out.console_tail(30));
    assert!(
        out.console.contains("sysrq triggered crash"),
        "{}",
        out.console_tail(30)
    );
}

#[test]
fn missing_kernel_feature_is_refused_before_booting() {
    let mut o = opts("true");
    o.require_config = vec![
        "CONFIG_LIVEPATCH".into(),
        "CONFIG_LIVEHOST_DOES_NOT_EXIST".into(),
    ];
    let err = kernel_tests::run(&o).unwrap_err().to_string();
    assert!(
        err.contains("lacks CONFIG_LIVEHOST_DOES_NOT_EXIST"),
        "{err}"
    );
    assert!(
        !err.contains("CONFIG_LIVEPATCH,"),
        "LIVEPATCH is set in Debian's kernel: {err}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let e = kernel_tests::run(&opts("true").file("/nonexistent/file", "/x")).unwrap_err();
    assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
    let mut o = opts("true");
    o.modules = vec!["no_such_module_livehost".into()];
    let e = kernel_tests::run(&o).unwrap_err();
    assert!(
        format!("{e:#}").contains("does not exist for kernel"),
        "{e:#}"
    );
    let e = "debian:potato-cloud".parse::<KernelSpec>().unwrap_err();
    assert!(e.to_string().contains("unknown kernel"));
}

#[test]
fn a_module_built_from_repo_sources_loads_in_the_guest() {
    let k = kernel_tests::fetch(&KernelSpec::default()).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hello");
    let ko = kernel_tests::module::build(&k, &src).unwrap();
    let out = kernel_tests::run(
        &opts("insmod /root/livehost_hello.ko && grep livehost_hello /proc/modules && dmesg | grep 'livehost_hello: loaded'")
            .file(ko, "/root/livehost_hello.ko"),
    )
    .unwrap();
    let stdout = out.success().unwrap();
    assert!(stdout.starts_with("livehost_hello "), "{stdout}");
}

#[test]
fn modules_load_with_their_dependencies() {
    let mut o = opts("grep -E '^(kvm|kvm_amd) ' /proc/modules | cut -d' ' -f1 | sort; ls /dev/kvm");
    o.with_kvm = true;
    // Also run a 64-bit guest to its first exit on the guest's KVM (nested,
    // emulated SVM under TCG): the path hardware-exit tests rely on.
    o.files.push((
        env!("CARGO_BIN_EXE_kernel-tests").into(),
        "/usr/bin/kernel-tests".into(),
    ));
    o.command = vec!["grep -E '^(kvm|kvm_amd) ' /proc/modules | cut -d' ' -f1 | sort; ls /dev/kvm; kernel-tests probe --json; true".into()];
    let out = kernel_tests::run(&o).unwrap();
    let stdout = out.success().unwrap();
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("kvm"));
    assert_eq!(lines.next(), Some("kvm_amd"));
    assert_eq!(lines.next(), Some("/dev/kvm"));
    let probe: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(probe["long_mode"]["halted"], true, "{probe}");
}

#[test]
fn the_second_suite_boots_through_the_private_apt_config() {
    // Debian 13's kernel: merged /usr and xz-compressed modules.
    let spec: KernelSpec = "debian:trixie-cloud".parse().unwrap();
    let k = kernel_tests::fetch(&spec).unwrap();
    assert!(k.release.starts_with("6.12"), "{}", k.release);
    let mut o = opts("uname -r; grep -c '^kvm ' /proc/modules");
    o.kernel = spec;
    o.modules = vec!["kvm".into()];
    let out = kernel_tests::run(&o).unwrap();
    assert_eq!(out.success().unwrap(), format!("{}\n1\n", k.release));
    // The host's apt sources were not touched.
    let sources = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    assert!(!sources.contains("trixie"));
}

#[test]
fn without_qemu_the_error_says_what_to_install() {
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kernel-tests"))
        .args(["run", "--", "true"])
        .env("PATH", empty.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("qemu-system-x86_64 is not installed") && err.contains("apt-get install"),
        "{err}"
    );
}

/// A cached download that no longer matches the archive's SHA-256 is
/// fetched again, in a cache of its own (seeded from the shared one, so
/// only the corrupt package crosses the network).
#[test]
fn a_corrupt_cached_package_is_fetched_again() {
    let k = kernel_tests::fetch(&KernelSpec::default()).unwrap();
    let shared = kernel_tests::kernel::cache_dir().join("debs");
    let cache = tempfile::tempdir().unwrap();
    let debs = cache.path().join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    let pkgver = k.package_version.clone().unwrap();
    let mut corrupt = None;
    for e in std::fs::read_dir(&shared).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if !name.contains(&k.release) && !name.contains(&format!("_{pkgver}_all")) {
            continue;
        }
        let dst = debs.join(&name);
        std::fs::copy(&p, &dst).unwrap();
        if name.starts_with(&format!("linux-headers-{}_", k.release)) {
            corrupt = Some(dst);
        }
    }
    let corrupt = corrupt.expect("the headers package is in the shared cache");
    let mut bytes = std::fs::read(&corrupt).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 64].fill(0xa5);
    std::fs::write(&corrupt, &bytes).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kernel-tests"))
        .args(["fetch"])
        .env("LIVEHOST_CACHE", cache.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("is corrupt (checksum mismatch); fetching it again"),
        "{err}"
    );
    assert_ne!(std::fs::read(&corrupt).unwrap(), bytes, "replaced");
    // And it was unpacked: the headers tree the module builds use is there.
    let makefile = cache
        .path()
        .join(format!("{}_{pkgver}", k.release))
        .join("root/usr/src")
        .join(format!("linux-headers-{}", k.release))
        .join("Makefile");
    assert!(makefile.is_file(), "{} missing", makefile.display());
}

/// Without the network (a new network namespace has no route anywhere): an
/// empty cache is a clear error naming the package registry; a cache that
/// holds the kernel is used, and the run says so.
#[test]
fn without_the_network_a_cached_kernel_is_used_and_none_is_a_clear_error() {
    let k = kernel_tests::fetch(&KernelSpec::default()).unwrap();
    let offline = |cache: &Path, args: &[&str]| {
        std::process::Command::new("unshare")
            .arg("-n")
            .arg(env!("CARGO_BIN_EXE_kernel-tests"))
            .args(args)
            .env("LIVEHOST_CACHE", cache)
            .output()
            .unwrap()
    };
    let empty = tempfile::tempdir().unwrap();
    let out = offline(empty.path(), &["fetch"]);
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("unshare failed") {
        eprintln!("skipped: cannot create a network namespace here: {err}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("check the network to deb.debian.org"), "{err}");

    // A cache holding only this kernel (linked, not copied).
    let warm = tempfile::tempdir().unwrap();
    let name = format!("{}_{}", k.release, k.package_version.clone().unwrap());
    std::os::unix::fs::symlink(
        kernel_tests::kernel::cache_dir().join(&name),
        warm.path().join(&name),
    )
    .unwrap();
    let out = offline(warm.path(), &["run", "--", "uname", "-r"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), k.release);
    assert!(
        err.contains(&format!("using the cached kernel {}", k.release)),
        "{err}"
    );
}

/// PIDs of QEMU processes whose command line contains `marker`.
fn qemu_pids_with(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("qemu-system") && c.contains(marker)
                })
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn an_interrupted_run_leaves_no_qemu_behind() {
    let marker = format!("livehost.interrupt_test={}", std::process::id());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kernel-tests"))
        .args(["run", "--append", &marker, "--", "sleep", "300"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while qemu_pids_with(&marker).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(120), "QEMU never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up by itself
    child.wait().unwrap();
    let t = Instant::now();
    while !qemu_pids_with(&marker).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "QEMU outlived its parent"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_guest_that_stops_responding_is_reported_as_hung() {
    // An init that blocks forever on the console: no result ever comes.
    let mut o = opts("true");
    o.kernel_args = vec!["rdinit=/bin/cat".into()];
    o.hang_after = Some(Duration::from_secs(25));
    let t = Instant::now();
    let out = kernel_tests::run(&o).unwrap();
    assert_eq!(out.status, GuestStatus::Hang, "{}", out.console_tail(20));
    assert!(t.elapsed() < Duration::from_secs(60));
}
