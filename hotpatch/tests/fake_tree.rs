//! Host-side tests of the decisions hotpatch makes from what the kernel
//! shows, against a fake /sys + /proc + /boot tree (every path is
//! injectable). The kernel itself is exercised in tests/guest.rs.

use hotpatch::check::{self, CheckId, Status};
use hotpatch::module::{ModuleInfo, PatchedFunction, PatchedObject};
use hotpatch::paths::Paths;
use hotpatch::state::{JournalOp, JournalResult};
use hotpatch::{change, list};
use std::path::Path;
use std::process::Command;

const REL: &str = "6.1.0-56-cloud-amd64";
const MAGIC: &str = "6.1.0-56-cloud-amd64 SMP preempt mod_unload modversions ";

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn mkdir(root: &Path, rel: &str) {
    std::fs::create_dir_all(root.join(rel)).unwrap();
}

/// hp_a (bottom, enabled) and hp_b (top, enabled, in transition) both patch
/// cmdline_proc_show; hp_b also version_proc_show. hp_old is a superseded
/// livepatch module still loaded. Task 100 has not switched yet.
fn tree() -> (tempfile::TempDir, Paths) {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    let lp = "sys/kernel/livepatch";
    write(r, &format!("{lp}/hp_a/enabled"), "1\n");
    write(r, &format!("{lp}/hp_a/transition"), "0\n");
    write(r, &format!("{lp}/hp_a/vmlinux/patched"), "1\n");
    mkdir(r, &format!("{lp}/hp_a/vmlinux/cmdline_proc_show,1"));
    write(r, &format!("{lp}/hp_b/enabled"), "1\n");
    write(r, &format!("{lp}/hp_b/transition"), "1\n");
    mkdir(r, &format!("{lp}/hp_b/vmlinux/cmdline_proc_show,1"));
    mkdir(r, &format!("{lp}/hp_b/vmlinux/version_proc_show,1"));
    write(
        r,
        "proc/modules",
        "hp_b 16384 1 - Live 0x0000000000000000 (OEK)\n\
         hp_a 16384 1 - Live 0x0000000000000000 (OEK)\n\
         hp_old 16384 0 - Live 0x0000000000000000 (OEK)\n\
         virtio_net 61440 0 - Live 0x0000000000000000\n",
    );
    write(r, "proc/sys/kernel/osrelease", &format!("{REL}\n"));
    write(
        r,
        "proc/sys/kernel/tainted",
        &format!("{}\n", (1 << 12) | (1 << 13) | (1 << 15)),
    );
    write(r, "proc/sys/kernel/ftrace_enabled", "1\n");
    write(
        r,
        "proc/kallsyms",
        "0000000000000000 t cmdline_proc_show\n0000000000000000 t version_proc_show\n\
         0000000000000000 t hp_busy_sleeper\t[hp_busy]\n",
    );
    write(r, "proc/cmdline", "ro quiet\n");
    write(r, "proc/100/task/100/patch_state", "0\n");
    write(r, "proc/100/task/100/comm", "worker\n");
    write(
        r,
        "proc/100/task/100/stack",
        "[<0>] msleep+0x1/0x2\n[<0>] busy_fn+0x10/0x40\n",
    );
    write(r, "proc/101/task/101/patch_state", "1\n");
    write(r, "proc/101/task/102/patch_state", "-1\n");
    write(
        r,
        &format!("boot/config-{REL}"),
        "CONFIG_SMP=y\nCONFIG_PREEMPT_BUILD=y\nCONFIG_MODULE_UNLOAD=y\nCONFIG_MODVERSIONS=y\n# CONFIG_X is not set\n",
    );
    let paths = Paths {
        sys: r.join("sys"),
        proc: r.join("proc"),
        boot: r.join("boot"),
        modules: r.join("lib/modules"),
        state: r.join("state"),
        run: r.join("run"),
    };
    (d, paths)
}

fn module(name: &str, vermagic: &str, funcs: &[(&str, &str)]) -> ModuleInfo {
    let mut objects: Vec<PatchedObject> = Vec::new();
    for (o, f) in funcs {
        let pf = PatchedFunction {
            name: f.to_string(),
            sympos: 0,
            replacement: None,
        };
        match objects.iter_mut().find(|x| x.name == *o) {
            Some(x) => x.functions.push(pf),
            None => objects.push(PatchedObject {
                name: o.to_string(),
                functions: vec![pf],
            }),
        }
    }
    ModuleInfo {
        size: 1,
        sha256: "ab".repeat(32),
        name: Some(name.into()),
        vermagic: Some(vermagic.into()),
        livepatch: true,
        license: Some("GPL".into()),
        depends: vec![],
        srcversion: None,
        description: None,
        compression: None,
        version: None,
        cves: Vec::new(),
        signature: None,
        replace: Some(false),
        objects,
        klp_rela_objects: vec![],
        klp_symbols: vec![],
        modinfo: vec![],
        warnings: vec![],
    }
}

/// `/sys/kernel/notes` holding one NT_GNU_BUILD_ID note with `id`.
fn gnu_notes(id: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend(4u32.to_ne_bytes());
    n.extend((id.len() as u32).to_ne_bytes());
    n.extend(3u32.to_ne_bytes());
    n.extend(b"GNU\0");
    n.extend(id);
    n
}

/// A load record as hotpatch writes one for `name`, loaded from `path`
/// with hash `sha256` (no replace, not forced, no boot or build id).
fn loaded(name: &str, sha256: String, path: &str) -> hotpatch::state::LoadedRecord {
    hotpatch::state::LoadedRecord {
        name: name.into(),
        sha256,
        path: path.into(),
        replace: Some(false),
        loaded_unix_ms: 0,
        forced: false,
        boot_id: None,
        meta: Default::default(),
        module_build_id: None,
    }
}

fn check_of(p: &check::Preflight, id: CheckId) -> &check::Check {
    p.check(id)
        .unwrap_or_else(|| panic!("no check {id}: {p:?}"))
}

#[test]
fn status_orders_stack_and_names_function_owners() {
    let (_d, paths) = tree();
    let s = list::status(&paths);
    let names: Vec<&str> = s.patches.iter().map(|p| p.patch.name.as_str()).collect();
    assert_eq!(names, ["hp_a", "hp_b"], "bottom of the stack first");
    assert_eq!(
        s.patches[1].pending_tasks,
        Some(1),
        "task 100 has not switched"
    );
    assert_eq!(s.patches[0].pending_tasks, None);
    let cmd = s
        .functions
        .iter()
        .find(|f| f.function == "cmdline_proc_show")
        .unwrap();
    assert_eq!(cmd.provided_by, "hp_b");
    assert_eq!(cmd.also_in, ["hp_a"]);
    assert_eq!(s.leftover_modules, ["hp_old"]);
    assert!(s.taint_flags.iter().any(|f| f.starts_with('K')));
    assert_eq!(change::unload_order(&paths), ["hp_b", "hp_a", "hp_old"]);
}

#[test]
fn lagging_tasks_are_named_with_stack() {
    let (_d, paths) = tree();
    let t = paths.lagging_tasks(1);
    assert_eq!(t.len(), 1);
    assert_eq!(
        (t[0].pid, t[0].tid, t[0].comm.as_str()),
        (100, 100, "worker")
    );
    assert_eq!(t[0].stack[1], "[<0>] busy_fn+0x10/0x40");
    // Reverse direction: the patched task is the one behind.
    let back = paths.lagging_tasks(0);
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].pid, 101);
}

#[test]
fn preflight_refuses_while_another_patch_transitions() {
    let (_d, paths) = tree();
    let p = check::preflight(
        &paths,
        &module("hp_new", MAGIC, &[("vmlinux", "cmdline_proc_show")]),
    );
    assert!(!p.ok);
    let failed: Vec<CheckId> = p.failures().map(|c| c.id).collect();
    assert_eq!(failed, [CheckId::NoTransition], "{p:?}");
    assert!(check_of(&p, CheckId::NoTransition).detail.contains("hp_b"));
    assert_eq!(check_of(&p, CheckId::Vermagic).status, Status::Pass);
    assert_eq!(check_of(&p, CheckId::Signature).status, Status::Warn);
}

#[test]
fn preflight_passes_when_quiet_and_reasons_each_failure() {
    let (d, paths) = tree();
    write(d.path(), "sys/kernel/livepatch/hp_b/transition", "0\n");
    let ok = check::preflight(
        &paths,
        &module(
            "hp_new",
            MAGIC,
            &[
                ("vmlinux", "cmdline_proc_show"),
                ("hp_busy", "hp_busy_sleeper"),
                ("e1000", "e1000_probe"),
            ],
        ),
    );
    assert!(ok.ok, "{ok:?}");
    assert!(
        check_of(&ok, CheckId::TargetSymbols)
            .detail
            .contains("e1000:e1000_probe apply when their module loads")
    );

    let bad = check::preflight(
        &paths,
        &module(
            "hp_a",
            "6.1.0-57-cloud-amd64 SMP mod_unload modversions ",
            &[("vmlinux", "nope_fn"), ("hp_busy", "nope2")],
        ),
    );
    assert!(!bad.ok);
    let vm = &check_of(&bad, CheckId::Vermagic).detail;
    assert!(
        vm.contains("built for kernel \"6.1.0-57-cloud-amd64\"")
            && vm.contains("lacks \"preempt\""),
        "{vm}"
    );
    let nl = &check_of(&bad, CheckId::NotLoaded).detail;
    assert!(
        nl.contains("already loaded (enabled)") && nl.contains("not loaded by hotpatch"),
        "{nl}"
    );
    let ts = &check_of(&bad, CheckId::TargetSymbols).detail;
    assert!(
        ts.contains("vmlinux:nope_fn") && ts.contains("hp_busy:nope2"),
        "{ts}"
    );

    // A kernel that enforces signatures refuses an unsigned module.
    write(d.path(), "sys/module/module/parameters/sig_enforce", "Y\n");
    let p = check::preflight(
        &paths,
        &module("hp_new", MAGIC, &[("vmlinux", "cmdline_proc_show")]),
    );
    assert_eq!(check_of(&p, CheckId::Signature).status, Status::Fail);
    // ftrace off is a failure with the fix.
    write(d.path(), "proc/sys/kernel/ftrace_enabled", "0\n");
    let p = check::preflight(
        &paths,
        &module("hp_new", MAGIC, &[("vmlinux", "cmdline_proc_show")]),
    );
    assert!(
        check_of(&p, CheckId::Ftrace)
            .detail
            .contains("sysctl kernel.ftrace_enabled=1")
    );
}

#[test]
fn no_livepatch_support_is_named() {
    let (d, paths) = tree();
    std::fs::remove_dir_all(d.path().join("sys/kernel/livepatch")).unwrap();
    let p = check::preflight(
        &paths,
        &module("hp_new", MAGIC, &[("vmlinux", "cmdline_proc_show")]),
    );
    assert!(
        check_of(&p, CheckId::KernelLivepatch)
            .detail
            .contains("CONFIG_LIVEPATCH")
    );
    assert!(!list::status(&paths).livepatch_supported);
}

/// Run the CLI against the fake tree. `HOTPATCH_TEST_BIN` runs these
/// tests against another build (an older hotpatch, to show a test failed
/// before a fix).
fn bin(paths: &Paths, args: &[&str]) -> std::process::Output {
    let exe = std::env::var("HOTPATCH_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_hotpatch").to_string());
    Command::new(exe)
        .arg("--sysfs-root")
        .arg(&paths.sys)
        .arg("--proc-root")
        .arg(&paths.proc)
        .arg("--boot-dir")
        .arg(&paths.boot)
        .arg("--modules-dir")
        .arg(&paths.modules)
        .arg("--state-dir")
        .arg(&paths.state)
        .arg("--run-dir")
        .arg(&paths.run)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_list_json_and_errors() {
    let (d, paths) = tree();
    let out = bin(&paths, &["--json", "list"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["patches"][1]["name"], "hp_b");
    assert_eq!(v["release"], REL);
    // The same JSON read back through hotpatch's own type.
    let typed: hotpatch::ListReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(typed.patches[1].patch.name, "hp_b");
    assert_eq!(typed.release.as_deref(), Some(REL));

    let text = String::from_utf8(bin(&paths, &["list"]).stdout).unwrap();
    assert!(
        text.contains("#2 hp_b [enabled, IN TRANSITION (1 task(s) pending)]"),
        "{text}"
    );
    assert!(
        text.contains("vmlinux:cmdline_proc_show <- hp_b (also in hp_a)"),
        "{text}"
    );
    assert!(text.contains("leftover livepatch module hp_old"), "{text}");

    // Garbage in: exit 1 with a reason, also as JSON.
    let junk = d.path().join("junk.ko");
    std::fs::write(&junk, b"\x7fELF garbage").unwrap();
    let out = bin(&paths, &["--json", "inspect", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("malformed ELF"),
        "{v}"
    );
    let out = bin(&paths, &["inspect", "/nonexistent.ko"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open /nonexistent.ko"));
    // A module path that is a symbolic link is refused, not followed: the
    // file checked must be the file loaded. A FIFO is not read (nor waited
    // on).
    let real = d.path().join("real.ko");
    std::fs::write(
        &real,
        hotpatch::testelf::ModuleSpec::simple("hp_l").build().bytes,
    )
    .unwrap();
    let link = d.path().join("link.ko");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    for cmd in ["inspect", "check", "install"] {
        let out = bin(&paths, &[cmd, link.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is a symbolic link"), "{cmd}: {err}");
    }
    let fifo = d.path().join("fifo.ko");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = bin(&paths, &["inspect", fifo.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a regular file"),
        "{out:?}"
    );

    // Usage errors are clap's exit 2.
    assert_eq!(bin(&paths, &["unload"]).status.code(), Some(2));
    assert_eq!(
        bin(&paths, &["load", "a.ko", "--installed"]).status.code(),
        Some(2)
    );

    // Bad --timeout / --poll-ms values are usage errors too.
    for args in [
        &["unload", "--all", "--timeout", "0"][..],
        &["load", "a.ko", "--timeout=-1"],
        &["enable", "hp_a", "--timeout", "inf"],
        &["disable", "hp_a", "--timeout", "x"],
        &["unload", "hp_a", "--poll-ms", "0"],
        &["load", "--installed", "--poll-ms", "10001"],
    ] {
        let out = bin(&paths, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--timeout must be") || err.contains("--poll-ms must be"),
            "{args:?}: {err}"
        );
    }
    for h in ["--help", "-h"] {
        let help = String::from_utf8(bin(&paths, &[h]).stdout).unwrap();
        assert!(help.contains("2 usage"), "{help}");
    }

    // NAME arguments are module names, never paths: exit 2, nothing done.
    for args in [
        &["unload", "../../../a"][..],
        &["enable", "a/b"],
        &["disable", ".."],
        &["uninstall", "../x"],
        &["--json", "uninstall", ""],
    ] {
        let out = bin(&paths, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("is not a module name"),
            "{args:?}: {out:?}"
        );
    }
    assert!(
        !paths.state.exists(),
        "a refused NAME touched the state dir"
    );

    // A module whose only name is `../../../a` (struct module's unusable) is
    // not installed anywhere.
    let mut m = hotpatch::testelf::ModuleSpec::simple("hp/trav");
    m.modinfo.retain(|(k, _)| k != "name");
    m.modinfo.push(("name".into(), "../../../a".into()));
    let trav = d.path().join("trav.ko");
    std::fs::write(&trav, m.build().bytes).unwrap();
    let out = bin(&paths, &["install", trav.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no usable name"),
        "{out:?}"
    );
    assert!(!d.path().join("a.ko").exists() && !d.path().join("a").exists());
    assert!(!paths.state.join("installed").exists());

    // uninstall of something never installed says what is installed.
    let out = bin(&paths, &["uninstall", "hp_x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("installed: none"));
}

/// The shipped unit's ExecStart, run as written (plus the fake tree's
/// roots): it must parse, honour the skip switch and cope with nothing
/// installed.
#[test]
fn systemd_unit_command_runs() {
    assert!(
        livehost_common::is_root(),
        "this test runs `hotpatch load`, which needs root; CI runs as root"
    );
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/hotpatch-apply.service"),
    )
    .unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("unit has ExecStart");
    // Not before sysinit.target (a stall there holds the whole boot):
    // before the network, as kpatch orders it, with a budget the loader
    // enforces well inside systemd's own timeout.
    let before = unit
        .lines()
        .find_map(|l| l.strip_prefix("Before="))
        .unwrap();
    assert!(
        !before.contains("sysinit.target") && before.contains("network-pre.target"),
        "{before}"
    );
    let budget: f64 = exec
        .split("--budget ")
        .nth(1)
        .and_then(|b| b.split_whitespace().next())
        .expect("ExecStart has --budget")
        .parse()
        .unwrap();
    let start_limit_min: f64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStartSec="))
        .and_then(|t| t.strip_suffix("min"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        budget + 120.0 <= start_limit_min * 60.0,
        "budget {budget}s too close to systemd's timeout"
    );
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/bin/hotpatch"));
    let args: Vec<&str> = words.collect();
    assert_eq!(args[..2], ["load", "--installed"]);

    let (d, paths) = tree();
    write(d.path(), "sys/kernel/livepatch/hp_b/transition", "0\n");
    let out = bin(&paths, &args);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("no modules installed for kernel {REL}"))
    );

    write(d.path(), "proc/cmdline", "ro hotpatch.skip=1 quiet\n");
    let out = bin(&paths, &args);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("skipping installed patches"));
    let j = hotpatch::state::read_journal(&paths).unwrap();
    assert_eq!(j.last().unwrap().op, JournalOp::LoadInstalled);
    assert_eq!(j.last().unwrap().detail["skipped"], "hotpatch.skip=1");
}

#[test]
fn transition_wait_has_a_deadline_and_sees_completion() {
    use hotpatch::transition::{Wait, wait_transition};
    use livehost_common::progress::Progress;
    use std::time::{Duration, Instant};
    let (d, paths) = tree();
    let quiet = Progress::silent();
    let poll = Duration::from_millis(5);
    // hp_b stays in transition: the wait ends at its deadline, not later.
    let t0 = Instant::now();
    match wait_transition(
        &paths,
        "hp_b",
        1,
        Duration::from_millis(120),
        poll,
        &quiet,
        t0,
    ) {
        Wait::TimedOut(d) => assert!(d >= Duration::from_millis(120) && d < Duration::from_secs(2)),
        _ => panic!("hp_b is still in transition"),
    }
    // Completion written by "the kernel" mid-wait is noticed within a poll or two.
    let flip = d.path().join("sys/kernel/livepatch/hp_b/transition");
    let f2 = flip.clone();
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(60));
        std::fs::write(f2, "0\n").unwrap();
        Instant::now()
    });
    let t0 = Instant::now();
    let w = wait_transition(&paths, "hp_b", 1, Duration::from_secs(5), poll, &quiet, t0);
    let flipped = h.join().unwrap();
    assert!(matches!(w, Wait::Done(_)));
    assert!(
        flipped.elapsed() < Duration::from_millis(200),
        "noticed late"
    );
    // A patch that vanished (freed after unpatching) counts as done.
    std::fs::remove_dir_all(d.path().join("sys/kernel/livepatch/hp_a")).unwrap();
    assert!(matches!(
        wait_transition(
            &paths,
            "hp_a",
            0,
            Duration::from_secs(1),
            poll,
            &quiet,
            Instant::now()
        ),
        Wait::Done(_)
    ));
}

/// `load --installed` loads only what was installed: a file whose sha256 no
/// longer matches the manifest is refused (exit 3, journalled) and the other
/// entries are still processed. hp_b stays in transition in this tree, so
/// every preflight here fails anyway and nothing can reach finit_module on
/// the host running the test.
#[test]
fn load_installed_refuses_a_changed_file() {
    assert!(
        livehost_common::is_root(),
        "this test runs `hotpatch load`, which needs root; CI runs as root"
    );
    use hotpatch::testelf::ModuleSpec;
    let (d, paths) = tree();
    let put = |name: &str| {
        let bytes = ModuleSpec::simple(name).build().bytes;
        let f = d.path().join(format!("{name}.ko"));
        std::fs::write(&f, &bytes).unwrap();
        let sha = hotpatch::module::sha256_hex(&bytes);
        hotpatch::state::install(&paths, REL, name, &sha, &f).unwrap();
        sha
    };
    put("hp_t");
    let sha_a = put("hp_a");
    put("hp_c");
    // hp_a is loaded from the same file: recorded by hotpatch, registered.
    hotpatch::state::save_loaded(&paths, &loaded("hp_a", sha_a, "/x/hp_a.ko")).unwrap();
    // Someone changes the installed hp_t after install.
    let sha_t = hotpatch::state::read_manifest(&paths, REL).unwrap().modules[0]
        .sha256
        .clone();
    let tampered = paths
        .installed_dir(REL)
        .join(hotpatch::state::stored_name("hp_t", &sha_t));
    let mut b = std::fs::read(&tampered).unwrap();
    let n = b.len();
    b[n - 1] ^= 0xff;
    std::fs::write(&tampered, &b).unwrap();

    let out = bin(&paths, &["--json", "load", "--installed"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 3, "{v}");
    assert_eq!(r[0]["module"], "hp_t");
    assert_eq!(r[0]["outcome"], "refused");
    let c0 = &r[0]["preflight"]["checks"][0];
    assert_eq!(c0["id"], "installed-file", "{v}");
    let detail = c0["detail"].as_str().unwrap();
    assert!(detail.contains("the file changed"), "{detail}");
    assert!(
        detail.contains(&hotpatch::module::sha256_hex(&b)),
        "{detail}"
    );
    // The others were still looked at.
    assert_eq!(r[1]["module"], "hp_a");
    assert_eq!(r[1]["outcome"], "already-loaded");
    assert_eq!(r[2]["module"], "hp_c");
    // hp_c patches cmdline_proc_show, as the refused hp_t does: it would
    // stack on a patch that is not there, so it is not loaded.
    let why = r[2]["skipped"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(
        why.contains("stacks on") && why.contains("vmlinux:cmdline_proc_show"),
        "{why}"
    );
    // Read back through hotpatch's own types.
    use hotpatch::{InstalledResult, Outcome};
    let run: hotpatch::InstalledRun = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(run.release, REL);
    match &run.results[0] {
        InstalledResult::Load(l) => {
            assert_eq!(l.outcome, Outcome::Refused);
            assert_eq!(l.preflight.checks[0].id, CheckId::InstalledFile);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        run.results[1],
        InstalledResult::AlreadyLoaded {
            outcome: Outcome::AlreadyLoaded,
            ..
        }
    ));
    let j = hotpatch::state::read_journal(&paths).unwrap();
    let e = j
        .iter()
        .find(|e| e.module.as_deref() == Some("hp_t"))
        .expect("journalled");
    assert_eq!(e.op, JournalOp::Load);
    assert_eq!(e.result, JournalResult::Refused);
    assert!(e.detail["reasons"][0].as_str().unwrap().contains("sha256"));

    // Text mode says why, too.
    let out = bin(&paths, &["load", "--installed"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("FAIL  installed-file"),
        "{out:?}"
    );
}

/// `install` files a module under the release its vermagic names, and says
/// so when that is not the running kernel.
#[test]
fn install_files_under_the_modules_own_release() {
    use hotpatch::testelf::{ModuleSpec, Object};
    let (d, paths) = tree();
    let objs = [Object {
        name: None,
        funcs: vec![("cmdline_proc_show".into(), 0)],
    }];
    let next = "6.12.117+deb13-cloud-amd64";
    let write_ko = |name: &str, vermagic: &str| {
        let f = d.path().join(format!("{name}.ko"));
        let m = ModuleSpec::livepatch_for(name, vermagic, &objs, false);
        std::fs::write(&f, m.build().bytes).unwrap();
        f
    };
    let f = write_ko(
        "hp_next",
        &format!("{next} SMP preempt mod_unload modversions "),
    );
    let out = bin(&paths, &["install", f.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("built for kernel {next}, not the running {REL}"))
            && err.contains(&format!("applied when {next} boots")),
        "{err}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("installed hp_next for kernel {next}"))
    );
    let m = hotpatch::state::read_manifest(&paths, next).unwrap();
    assert_eq!(m.modules[0].name, "hp_next");
    // Stored by content, exactly the bytes that were hashed.
    let stored = paths.installed_dir(next).join(&m.modules[0].file);
    assert_eq!(
        m.modules[0].file,
        hotpatch::state::stored_name("hp_next", &m.modules[0].sha256)
    );
    assert_eq!(
        hotpatch::module::sha256_hex(&std::fs::read(&stored).unwrap()),
        m.modules[0].sha256
    );
    assert!(
        hotpatch::state::read_manifest(&paths, REL)
            .unwrap()
            .modules
            .is_empty()
    );
    let j = hotpatch::state::read_journal(&paths).unwrap();
    assert_eq!(j.last().unwrap().detail["release"], next);
    assert_eq!(j.last().unwrap().detail["running_release"], REL);

    // For the running kernel: no note; JSON carries the messages.
    let f = write_ko("hp_now", MAGIC);
    let out = bin(&paths, &["--json", "install", f.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let v: hotpatch::InstallReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.release, REL);
    assert_eq!(v.running_release, REL);
    assert!(v.messages.is_empty());
    assert_eq!(
        hotpatch::state::read_manifest(&paths, REL).unwrap().modules[0].name,
        "hp_now"
    );

    // A vermagic whose first word is not a release is refused.
    let f = write_ko("hp_bad", "../../x SMP ");
    let out = bin(&paths, &["install", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a kernel release"));

    // uninstall --release (alias --kernel) reaches the other release's entry.
    let out = bin(&paths, &["uninstall", "hp_next"]);
    assert_eq!(out.status.code(), Some(1));
    let out = bin(
        &paths,
        &["uninstall", "hp_next", "--kernel", "6.9", "--help"],
    );
    assert!(out.status.success(), "--kernel is still accepted: {out:?}");
    let out = bin(&paths, &["uninstall", "hp_next", "--release", next]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        hotpatch::state::read_manifest(&paths, next)
            .unwrap()
            .modules
            .is_empty()
    );
}

/// Atomic replace: the kernel frees the superseded patches asynchronously
/// after the transition ends. Every patch registered before a `replace`
/// patch is waited for (its sysfs dir vanishing) and its module removed;
/// one that never goes is reported, not waited on forever. (delete_module
/// is the real syscall: on the test host these names are not loaded, which
/// it reports as already gone, or it fails with ENOSYS where the host has no
/// module support.)
#[test]
fn atomic_replace_waits_for_superseded_patches_to_be_freed() {
    use hotpatch::load::remove_superseded;
    use livehost_common::progress::Progress;
    use std::collections::BTreeSet;
    use std::time::{Duration, Instant};
    let (d, paths) = tree();
    let lp = d.path().join("sys/kernel/livepatch");
    for n in ["hp_fake_old1", "hp_fake_old2", "hp_fake_stuck"] {
        write(
            d.path(),
            &format!("sys/kernel/livepatch/{n}/enabled"),
            "1\n",
        );
        write(
            d.path(),
            &format!("sys/kernel/livepatch/{n}/transition"),
            "0\n",
        );
    }
    write(
        d.path(),
        "proc/modules",
        "hp_fake_new 16384 1 - Live 0x0 (OEK)\n\
         hp_fake_old2 16384 0 - Live 0x0 (OEK)\n\
         hp_fake_old1 16384 0 - Live 0x0 (OEK)\n\
         hp_fake_stuck 16384 0 - Live 0x0 (OEK)\n",
    );
    let quiet = Progress::silent();
    let set = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|s| s.to_string()).collect() };

    // Still listed when the transition ends; freed 60 and 120 ms later.
    let (l1, l2) = (lp.join("hp_fake_old1"), lp.join("hp_fake_old2"));
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(60));
        std::fs::remove_dir_all(l1).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        std::fs::remove_dir_all(l2).unwrap();
    });
    let t0 = Instant::now();
    let (removed, msgs) = remove_superseded(
        &paths,
        "hp_fake_new",
        Some(true),
        &set(&["hp_fake_old1", "hp_fake_old2", "hp_fake_new"]),
        Duration::from_secs(5),
        &quiet,
    );
    h.join().unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(120));
    // Removal of both was attempted after they were freed: done, or (on a
    // build host without module support, ENOSYS) reported.
    for n in ["hp_fake_old1", "hp_fake_old2"] {
        assert!(
            removed.iter().any(|r| r == n)
                || msgs
                    .iter()
                    .any(|m| m.contains(&format!("replaced patch {n} could not be removed"))),
            "{n}: {removed:?} {msgs:?}"
        );
    }
    assert!(!msgs.iter().any(|m| m.contains("not freed")), "{msgs:?}");

    // Never freed: a warning at the deadline, the module left alone.
    let t0 = Instant::now();
    let (removed, msgs) = remove_superseded(
        &paths,
        "hp_fake_new",
        Some(true),
        &set(&["hp_fake_stuck"]),
        Duration::from_millis(150),
        &quiet,
    );
    assert!(removed.is_empty());
    assert!(
        msgs.len() == 1 && msgs[0].contains("hp_fake_stuck") && msgs[0].contains("not freed"),
        "{msgs:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2));

    // Not a replace patch: patches still registered are not superseded.
    let (removed, msgs) = remove_superseded(
        &paths,
        "hp_fake_new",
        Some(false),
        &set(&["hp_fake_stuck"]),
        Duration::from_secs(5),
        &quiet,
    );
    assert!(removed.is_empty() && msgs.is_empty());

    // Unknown from the file (a kpatch-build module), but the kernel's
    // `replace` attribute says so: the superseded patch is waited for.
    write(d.path(), "sys/kernel/livepatch/hp_fake_new/replace", "1\n");
    write(d.path(), "sys/kernel/livepatch/hp_fake_new/enabled", "1\n");
    let (removed, msgs) = remove_superseded(
        &paths,
        "hp_fake_new",
        None,
        &set(&["hp_fake_stuck"]),
        Duration::from_millis(150),
        &quiet,
    );
    assert!(removed.is_empty());
    assert!(
        msgs.len() == 1 && msgs[0].contains("hp_fake_stuck") && msgs[0].contains("not freed"),
        "sysfs replace=1 ignored: {msgs:?}"
    );
}

/// `enable`: a patch already patching is waited for, not written to again;
/// a freed patch whose module is still loaded is re-applied only from the
/// recorded file with the recorded hash, else the error says what to run.
/// (The re-apply itself needs a kernel: tests/guest.rs.)
#[test]
fn enable_waits_or_says_what_to_run() {
    use livehost_common::progress::Progress;
    use std::time::Duration;
    let (d, paths) = tree();
    let quiet = Progress::silent();
    let enable = |name: &str, secs: u64| {
        change::Change {
            paths: &paths,
            name,
            timeout: Duration::from_secs(secs),
            poll: Duration::from_millis(5),
            progress: &quiet,
        }
        .enable()
    };

    // hp_b: enabled and in transition. Finishes 60 ms later.
    let flip = d.path().join("sys/kernel/livepatch/hp_b/transition");
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(60));
        std::fs::write(flip, "0\n").unwrap();
    });
    let r = enable("hp_b", 5).unwrap();
    h.join().unwrap();
    assert!(r.transition_ms.is_some());
    assert_eq!(
        std::fs::read_to_string(d.path().join("sys/kernel/livepatch/hp_b/enabled")).unwrap(),
        "1\n",
        "enabled was written again"
    );
    // Enabled and quiet: nothing to do.
    let r = enable("hp_b", 5).unwrap();
    assert_eq!(r.messages, ["hp_b is already enabled"]);

    // hp_old: module loaded, patch freed, no record: say what to run.
    let e = format!("{:#}", enable("hp_old", 1).unwrap_err());
    assert!(
        e.contains("no record") && e.contains("`hotpatch unload hp_old`, then `hotpatch load"),
        "{e}"
    );
    // With a record whose file changed since: refused, nothing removed.
    let f = d.path().join("hp_old.ko");
    std::fs::write(&f, b"now").unwrap();
    hotpatch::state::save_loaded(
        &paths,
        &loaded(
            "hp_old",
            hotpatch::module::sha256_hex(b"then"),
            &f.display().to_string(),
        ),
    )
    .unwrap();
    let e = format!("{:#}", enable("hp_old", 1).unwrap_err());
    assert!(e.contains("changed since hotpatch loaded it"), "{e}");
    std::fs::remove_file(&f).unwrap();
    let e = format!("{:#}", enable("hp_old", 1).unwrap_err());
    assert!(e.contains("cannot be read"), "{e}");
    // Not loaded at all.
    let e = format!("{:#}", enable("hp_none", 1).unwrap_err());
    assert!(e.contains("hotpatch load FILE.ko"), "{e}");
}

/// A transition that keeps making progress is not a stall: while the
/// pending count falls the deadline moves out, and halfway to it the
/// pending tasks are signalled through the patch's `signal` attribute.
#[test]
fn wait_extends_while_pending_falls_and_signals() {
    use hotpatch::transition::{Wait, Watch};
    use livehost_common::progress::Progress;
    use std::time::{Duration, Instant};
    let (d, paths) = tree();
    let r = d.path().to_path_buf();
    for pid in 200..205 {
        write(&r, &format!("proc/{pid}/task/{pid}/patch_state"), "0\n");
    }
    write(&r, "sys/kernel/livepatch/hp_b/signal", "");
    // "The kernel" switches one task every 400 ms, then completes: 2.4 s,
    // past the 2 s timeout. Each step is well inside the 1 s (timeout / 2)
    // that a fall in the pending count buys, so scheduling noise on a
    // loaded machine cannot make a progressing transition look stalled.
    let kr = r.clone();
    let kernel = std::thread::spawn(move || {
        for pid in [100, 200, 201, 202, 203, 204] {
            std::thread::sleep(Duration::from_millis(400));
            write(&kr, &format!("proc/{pid}/task/{pid}/patch_state"), "1\n");
        }
        write(&kr, "sys/kernel/livepatch/hp_b/transition", "0\n");
    });
    let quiet = Progress::silent();
    let w = Watch {
        paths: &paths,
        name: "hp_b",
        timeout: Duration::from_secs(2),
        poll: Duration::from_millis(5),
        progress: &quiet,
        interruptible: false,
    };
    let mut notes = Vec::new();
    let got = w.wait(1, Instant::now(), &mut notes);
    kernel.join().unwrap();
    assert!(
        matches!(got, Wait::Done(_)),
        "progressing transition cut off; {notes:?}"
    );
    let sig = std::fs::read_to_string(r.join("sys/kernel/livepatch/hp_b/signal")).unwrap();
    assert_eq!(sig, "1", "pending tasks not signalled");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("signalled the") && n.contains("pending task(s)")),
        "{notes:?}"
    );
}

/// `--force` racing completion: when the transition finished before the
/// `force` write (the kernel refuses the write then), nothing was forced;
/// a refused write while still in transition is a force failure.
#[test]
fn force_refused_after_completion_is_not_forced() {
    use hotpatch::transition::{Forced, Watch, force_transition};
    use livehost_common::progress::Progress;
    use std::time::Duration;
    let (d, paths) = tree();
    // A directory: every write to `force` fails, as the kernel's EINVAL.
    mkdir(d.path(), "sys/kernel/livepatch/hp_b/force");
    let quiet = Progress::silent();
    let w = Watch {
        paths: &paths,
        name: "hp_b",
        timeout: Duration::from_millis(200),
        poll: Duration::from_millis(5),
        progress: &quiet,
        interruptible: false,
    };
    let got = force_transition(&w, &mut Vec::new());
    assert!(matches!(got, Forced::WriteFailed(_)), "{got:?}");
    write(d.path(), "sys/kernel/livepatch/hp_b/transition", "0\n");
    let got = force_transition(&w, &mut Vec::new());
    assert!(matches!(got, Forced::CompletedFirst), "{got:?}");
}

/// An unload whose patch the kernel never frees is its own outcome (exit
/// 7, `not-freed`, journalled), not a bare error; one whose disable and
/// its reverse both stall is `reverse-stalled` (exit 6) with the tasks.
#[test]
fn unload_not_freed_and_reverse_stalled_have_their_own_outcomes() {
    assert!(livehost_common::is_root(), "`hotpatch unload` needs root");
    let (_d, paths) = tree();
    // hp_a: disabling completes at once (transition 0), but its sysfs
    // directory never goes away.
    let out = bin(&paths, &["--json", "unload", "--timeout", "0.3", "hp_a"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["outcome"], "not-freed", "{v}");
    assert_eq!(v[0]["removed"], false, "{v}");
    // hp_b stays in transition whatever is written: the disable stalls on
    // task 100 and so does the reverse.
    let out = bin(&paths, &["--json", "unload", "--timeout", "0.3", "hp_b"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["outcome"], "reverse-stalled", "{v}");
    assert!(v[0]["messages"].to_string().contains("half-applied"), "{v}");
    let j = hotpatch::state::read_journal(&paths).unwrap();
    let got: Vec<(String, JournalResult)> = j
        .iter()
        .map(|e| (e.module.clone().unwrap(), e.result))
        .collect();
    assert_eq!(
        got,
        [
            ("hp_a".to_string(), JournalResult::Begin),
            ("hp_a".to_string(), JournalResult::NotFreed),
            ("hp_b".to_string(), JournalResult::Begin),
            ("hp_b".to_string(), JournalResult::ReverseStalled),
        ]
    );
    // `unload --all` (both) ranks by severity: reverse-stalled beats
    // not-freed.
    let out = bin(&paths, &["--json", "unload", "--all", "--timeout", "0.3"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
}

/// A run killed mid-change leaves a "begin" with no outcome; the next run
/// of any command (here `list`) looks at the kernel, settles it, says what
/// it found and did, and journals it, once.
#[test]
fn next_run_reconciles_an_unfinished_begin() {
    assert!(livehost_common::is_root(), "reconciling needs root");
    let (_d, paths) = tree();
    hotpatch::state::begin(&paths, JournalOp::Load, "hp_a", Some("abc"));
    let out = bin(&paths, &["--json", "list"]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`load` of hp_a")
            && err.contains("did not finish")
            && err.contains("found applied, no transition running")
            && err.contains("kept it"),
        "{err}"
    );
    // stdout is still list's JSON.
    let _: hotpatch::ListReport = serde_json::from_slice(&out.stdout).unwrap();
    let j = hotpatch::state::read_journal(&paths).unwrap();
    assert_eq!(j.last().unwrap().result, JournalResult::Reconciled);
    assert_eq!(
        j.last().unwrap().detail["found"],
        "applied, no transition running"
    );
    // Reconciled once: the next run says nothing.
    let out = bin(&paths, &["list"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("did not finish"));
}

/// `status` answers "is this host as intended?": exit 0 only when the
/// installed set is exactly what is applied, nothing is in transition and
/// nothing is unfinished; otherwise exit 9 with each reason.
#[test]
fn status_says_whether_the_host_matches_its_installed_set() {
    let (d, paths) = tree();
    let status = |paths: &Paths| {
        let out = bin(paths, &["--json", "status"]);
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
        (out.status.code(), v)
    };
    // hp_a and hp_b loaded, nothing installed, hp_b in transition.
    let (code, v) = status(&paths);
    assert_eq!(code, Some(9), "{v}");
    assert_eq!(v["as_intended"], false);
    let problems = v["problems"].to_string();
    assert!(problems.contains("hp_a is loaded but not installed"), "{v}");
    assert!(problems.contains("hp_b is in transition"), "{v}");
    assert_eq!(v["patches"][1]["name"], "hp_b", "list's fields are kept");

    // Only hp_a, installed and loaded by hotpatch from that same file.
    let r = d.path();
    std::fs::remove_dir_all(r.join("sys/kernel/livepatch/hp_b")).unwrap();
    write(
        r,
        "proc/modules",
        "hp_a 16384 1 - Live 0x0000000000000000 (OEK)\n",
    );
    let bytes = hotpatch::testelf::ModuleSpec::simple("hp_a").build().bytes;
    let f = r.join("hp_a.ko");
    std::fs::write(&f, &bytes).unwrap();
    let sha = hotpatch::module::sha256_hex(&bytes);
    hotpatch::state::install(&paths, REL, "hp_a", &sha, &f).unwrap();
    let rec = hotpatch::state::LoadedRecord {
        module_build_id: Some("deadbeef".into()),
        ..loaded("hp_a", sha.clone(), &f.display().to_string())
    };
    hotpatch::state::save_loaded(&paths, &rec).unwrap();
    // The loaded hp_a is the module the record describes (same build id).
    std::fs::create_dir_all(r.join("sys/module/hp_a/notes")).unwrap();
    std::fs::write(
        r.join("sys/module/hp_a/notes/.note.gnu.build-id"),
        gnu_notes(&[0xde, 0xad, 0xbe, 0xef]),
    )
    .unwrap();
    std::fs::write(
        r.join("sys/kernel/notes"),
        gnu_notes(&[0xde, 0xad, 0xbe, 0xef]),
    )
    .unwrap();
    let (code, v) = status(&paths);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["as_intended"], true, "{v}");
    assert_eq!(v["installed"][0]["state"], "applied", "{v}");
    assert_eq!(v["kernel_build_id"], "deadbeef", "{v}");
    let text = String::from_utf8(bin(&paths, &["status"]).stdout).unwrap();
    assert!(text.starts_with("host: as intended"), "{text}");

    // Someone rmmod'ed hp_a and insmod'ed another build under that name:
    // the record no longer describes it, so the file is unknown.
    std::fs::write(
        r.join("sys/module/hp_a/notes/.note.gnu.build-id"),
        gnu_notes(&[1, 1, 1, 1]),
    )
    .unwrap();
    let (code, v) = status(&paths);
    assert_eq!(code, Some(9), "{v}");
    assert_eq!(v["installed"][0]["state"], "unknown-file", "{v}");
    std::fs::write(
        r.join("sys/module/hp_a/notes/.note.gnu.build-id"),
        gnu_notes(&[0xde, 0xad, 0xbe, 0xef]),
    )
    .unwrap();

    // Loaded from another file than the one installed: drift.
    hotpatch::state::save_loaded(
        &paths,
        &hotpatch::state::LoadedRecord {
            sha256: "0".repeat(64),
            ..rec
        },
    )
    .unwrap();
    let (code, v) = status(&paths);
    assert_eq!(code, Some(9), "{v}");
    assert_eq!(v["installed"][0]["state"], "different-file", "{v}");
    let text = String::from_utf8(bin(&paths, &["status"]).stdout).unwrap();
    assert!(
        text.contains("NOT as intended") && text.contains("different-file"),
        "{text}"
    );
}

/// Patches installed on one build of a release are not applied to another
/// build of the same release (a rebuild keeps `uname -r`): the kernel's GNU
/// build id is recorded at install and compared at boot.
#[test]
fn load_installed_refuses_another_build_of_the_same_release() {
    assert!(
        livehost_common::is_root(),
        "runs `hotpatch load`, which needs root"
    );
    let (d, paths) = tree();
    let r = d.path();
    write(r, "sys/kernel/livepatch/hp_b/transition", "0\n");
    std::fs::write(r.join("sys/kernel/notes"), gnu_notes(&[1, 2, 3, 4])).unwrap();
    let bytes = hotpatch::testelf::ModuleSpec::simple("hp_n").build().bytes;
    let f = r.join("hp_n.ko");
    std::fs::write(&f, &bytes).unwrap();
    let out = bin(&paths, &["install", f.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let m = hotpatch::state::read_manifest(&paths, REL).unwrap();
    assert_eq!(m.kernel_build_id.as_deref(), Some("01020304"));
    // Same release, another build.
    std::fs::write(r.join("sys/kernel/notes"), gnu_notes(&[9, 9, 9, 9])).unwrap();
    let out = bin(&paths, &["--json", "load", "--installed"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let why = v["results"][0]["skipped"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    assert!(
        why.contains("build id 01020304") && why.contains("09090909"),
        "{why}"
    );
    let j = hotpatch::state::read_journal(&paths).unwrap();
    assert_eq!(j.last().unwrap().result, JournalResult::Refused);
}

/// `--dry-run` says what load, unload, install and uninstall would check,
/// supersede and remove, in order, and changes nothing: no sysfs write, no
/// journal, no state file.
#[test]
fn dry_run_plans_and_changes_nothing() {
    use hotpatch::testelf::{ModuleSpec, Object};
    let (d, paths) = tree();
    let r = d.path();
    write(r, "sys/kernel/livepatch/hp_b/transition", "0\n");
    let spec = ModuleSpec::livepatch(
        "hp_r",
        &[Object {
            name: None,
            funcs: vec![("cmdline_proc_show".into(), 0)],
        }],
        true,
    );
    let f = r.join("hp_r.ko");
    std::fs::write(&f, spec.build().bytes).unwrap();
    let fp = f.to_str().unwrap();
    let plan = |args: &[&str]| {
        let mut a = vec!["--json", "--dry-run"];
        a.extend_from_slice(args);
        let out = bin(&paths, &a);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {out:?}"));
        (out.status.code(), v)
    };
    let (code, v) = plan(&["load", fp]);
    assert_eq!(code, Some(0), "{v}");
    let steps = v["steps"].to_string();
    assert!(steps.contains("finit_module"), "{v}");
    assert!(
        steps.contains("hp_a is superseded") && steps.contains("hp_b is superseded"),
        "{v}"
    );
    assert_eq!(v["preflight"]["ok"], true, "{v}");

    let (code, v) = plan(&["unload", "--all"]);
    assert_eq!(code, Some(0), "{v}");
    let order: Vec<String> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().split(':').next().unwrap().to_string())
        .collect();
    assert_eq!(order, ["hp_b", "hp_a", "hp_old"], "{v}");

    let (code, v) = plan(&["install", fp]);
    assert_eq!(code, Some(0), "{v}");
    assert!(v["steps"].to_string().contains("hp_r-"), "{v}");
    let (code, _) = plan(&["uninstall", "hp_r"]);
    assert_eq!(code, Some(3));

    // Nothing was changed anywhere.
    assert!(!paths.state.exists(), "state dir created by a dry run");
    for p in ["hp_a", "hp_b"] {
        let en =
            std::fs::read_to_string(r.join(format!("sys/kernel/livepatch/{p}/enabled"))).unwrap();
        assert_eq!(en.trim(), "1", "{p} touched");
    }
}

/// A patch's description, version and CVE ids (modinfo) are shown by
/// inspect, kept by install in the manifest, and shown by status.
#[test]
fn patch_metadata_is_inspected_installed_and_shown() {
    let (d, paths) = tree();
    let mut spec = hotpatch::testelf::ModuleSpec::simple("hp_m");
    spec.modinfo.push((
        "description".into(),
        "fix nf_tables use-after-free (CVE-2024-1086)".into(),
    ));
    spec.modinfo.push(("version".into(), "1.2".into()));
    spec.modinfo.push((
        "cve".into(),
        "cve-2023-0001, CVE-2024-1086 junk CVE-12-3".into(),
    ));
    let f = d.path().join("hp_m.ko");
    std::fs::write(&f, spec.build().bytes).unwrap();
    let fp = f.to_str().unwrap();
    let out = bin(&paths, &["--json", "inspect", fp]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], "1.2", "{v}");
    assert_eq!(
        v["cves"],
        serde_json::json!(["CVE-2024-1086", "CVE-2023-0001"]),
        "{v}"
    );
    let text = String::from_utf8(bin(&paths, &["inspect", fp]).stdout).unwrap();
    assert!(
        text.contains("cves:        CVE-2024-1086, CVE-2023-0001"),
        "{text}"
    );

    assert!(bin(&paths, &["install", fp]).status.success());
    let m = hotpatch::state::read_manifest(&paths, REL).unwrap();
    assert_eq!(m.modules[0].meta.version.as_deref(), Some("1.2"));
    assert_eq!(m.modules[0].meta.cves.len(), 2);
    let out = bin(&paths, &["--json", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["installed"][0]["meta"]["version"], "1.2", "{v}");
    let text = String::from_utf8(bin(&paths, &["status"]).stdout).unwrap();
    assert!(
        text.contains("fix nf_tables use-after-free (CVE-2024-1086) (version 1.2; CVE-2024-1086; CVE-2023-0001)"),
        "{text}"
    );
}

/// A `.ko.xz` / `.ko.zst` is read as the ELF inside (name, functions),
/// identified by the compressed file's sha256, and installed as exactly
/// those compressed bytes.
#[test]
fn compressed_modules_are_inspected_and_installed() {
    let (d, paths) = tree();
    let elf = hotpatch::testelf::ModuleSpec::simple("hp_z").build().bytes;
    let raw = d.path().join("hp_z.ko");
    std::fs::write(&raw, &elf).unwrap();
    for (tool, ext) in [("xz", "xz"), ("zstd", "zst")] {
        let st = Command::new(tool)
            .args(["-kfq"])
            .arg(&raw)
            .status()
            .unwrap();
        assert!(st.success(), "{tool}");
        let f = d.path().join(format!("hp_z.ko.{ext}"));
        let packed = std::fs::read(&f).unwrap();
        let out = bin(&paths, &["--json", "inspect", f.to_str().unwrap()]);
        assert!(out.status.success(), "{tool}: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["name"], "hp_z", "{v}");
        assert_eq!(v["compression"], if ext == "xz" { "xz" } else { "zstd" });
        assert_eq!(v["objects"][0]["functions"][0]["name"], "cmdline_proc_show");
        assert_eq!(v["sha256"], hotpatch::module::sha256_hex(&packed));
        let out = bin(&paths, &["--json", "install", f.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        let m = hotpatch::state::read_manifest(&paths, REL).unwrap();
        let stored = paths.installed_dir(REL).join(&m.modules[0].file);
        assert_eq!(
            std::fs::read(stored).unwrap(),
            packed,
            "{tool}: stored bytes"
        );
    }
    // Corrupt containers are a clear error.
    let mut bad = std::fs::read(d.path().join("hp_z.ko.xz")).unwrap();
    bad.truncate(bad.len() / 2);
    let f = d.path().join("bad.ko.xz");
    std::fs::write(&f, bad).unwrap();
    let out = bin(&paths, &["inspect", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not decompress"),
        "{out:?}"
    );
}

/// The vermagic reference is a module the running kernel shipped, so
/// architecture tokens no config spells (arm64's "aarch64") are expected;
/// the kernel's config is only the fallback.
#[test]
fn vermagic_reference_is_a_module_the_kernel_shipped() {
    let (d, paths) = tree();
    let arm = format!("{REL} SMP preempt mod_unload modversions aarch64 ");
    let info = module("hp_arm", &arm, &[("vmlinux", "cmdline_proc_show")]);
    // Only the config: "aarch64" looks foreign.
    let pre = check::preflight(&paths, &info);
    let c = check_of(&pre, CheckId::Vermagic);
    assert_eq!(c.status, Status::Fail, "{}", c.detail);
    assert!(c.detail.contains("aarch64"), "{}", c.detail);
    // The kernel's own ext4.ko carries the same vermagic: it is the reference.
    let mut spec = hotpatch::testelf::ModuleSpec::simple("ext4");
    spec.modinfo
        .retain(|(k, _)| k != "vermagic" && k != "livepatch");
    spec.modinfo.insert(0, ("vermagic".into(), arm.clone()));
    let ko = d
        .path()
        .join(format!("lib/modules/{REL}/kernel/fs/ext4/ext4.ko"));
    std::fs::create_dir_all(ko.parent().unwrap()).unwrap();
    std::fs::write(&ko, spec.build().bytes).unwrap();
    let pre = check::preflight(&paths, &info);
    let c = check_of(&pre, CheckId::Vermagic);
    assert_eq!(c.status, Status::Pass, "{}", c.detail);
    assert!(
        c.detail.contains("reference:") && c.detail.contains("ext4.ko"),
        "{}",
        c.detail
    );
    // And an x86 module is now the foreign one.
    let c2 = check::preflight(
        &paths,
        &module("hp_x", MAGIC, &[("vmlinux", "cmdline_proc_show")]),
    );
    let c2 = check_of(&c2, CheckId::Vermagic);
    assert_eq!(c2.status, Status::Fail, "{}", c2.detail);
    assert!(c2.detail.contains("lacks \"aarch64\""), "{}", c2.detail);
}

/// GET `path` from `addr`; the whole response as text.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// `status --prometheus FILE` writes a textfile that promtool accepts and
/// that a real Prometheus scrapes: the per-patch gauges arrive with their
/// values. (Served over HTTP as node_exporter's textfile collector would
/// serve it; Debian's `prometheus` package, as the ebpf tests use.)
#[test]
fn status_prometheus_textfile_is_scraped_by_prometheus() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let (d, paths) = tree();
    hotpatch::state::record(
        &paths,
        JournalOp::Load,
        Some("hp_a"),
        None,
        JournalResult::Ok,
        Some(1500.0),
        serde_json::json!({}),
    );
    let prom = d.path().join("textfile/hotpatch.prom");
    let out = bin(&paths, &["status", "--prometheus", prom.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(9), "{out:?}");
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(
        text.contains("hotpatch_patch_in_transition{patch=\"hp_b\"} 1"),
        "{text}"
    );
    assert!(text.contains("hotpatch_host_as_intended 0"), "{text}");
    assert!(
        text.contains("hotpatch_last_change_duration_seconds 1.5"),
        "{text}"
    );

    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`) must be installed");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let c = check.wait_with_output().unwrap();
    assert!(
        c.status.success(),
        "promtool: {}",
        String::from_utf8_lossy(&c.stderr)
    );

    // Serve the file as a collector would, and let Prometheus scrape it.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = server.local_addr().unwrap().to_string();
    let body = text.clone();
    std::thread::spawn(move || {
        for mut s in server.incoming().flatten() {
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let pport = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = d.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: hotpatch\n    static_configs:\n      - targets: ['{target}']\n"),
    )
    .unwrap();
    let mut promd = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            d.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package `prometheus`) must be installed");
    let paddr = format!("127.0.0.1:{pport}");
    let q = "/api/v1/query?query=hotpatch_patch_in_transition";
    let t0 = Instant::now();
    let mut got = None;
    while t0.elapsed() < Duration::from_secs(60) {
        if let Some(r) = http_get(&paddr, q)
            && r.contains("\"patch\":\"hp_b\"")
            && r.contains("\"job\":\"hotpatch\"")
        {
            got = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = promd.kill();
    let _ = promd.wait();
    let got = got.expect("Prometheus never scraped hotpatch_patch_in_transition");
    // hp_b's sample is 1 (in transition), hp_a's 0.
    let hp_b = got.split("\"patch\":\"hp_b\"").nth(1).unwrap();
    assert!(hp_b.contains(",\"1\"]"), "{got}");
}

/// `load --installed --budget`: once the run's budget is spent, no further
/// module is loaded; each one left is skipped (journalled as refused, with
/// the reason naming the budget as given) and the run exits 3 (README:
/// "modules not started when it is spent are skipped (exit 3)"). The first
/// module here is already loaded (exit 0 on its own) and `on_each` holds
/// the loop past the budget after it, as a slow first transition would: the
/// exit code 3 comes from the budget alone.
#[test]
fn load_installed_stops_when_the_budget_is_spent() {
    use hotpatch::InstalledResult;
    use hotpatch::load::LoadOptions;
    use hotpatch::testelf::ModuleSpec;
    use livehost_common::progress::Progress;
    use std::time::Duration;
    let (d, paths) = tree();
    let put = |name: &str| {
        let bytes = ModuleSpec::simple(name).build().bytes;
        let f = d.path().join(format!("{name}.ko"));
        std::fs::write(&f, &bytes).unwrap();
        let sha = hotpatch::module::sha256_hex(&bytes);
        hotpatch::state::install(&paths, REL, name, &sha, &f).unwrap();
        sha
    };
    let sha_a = put("hp_a");
    put("hp_t");
    put("hp_c");
    hotpatch::state::save_loaded(&paths, &loaded("hp_a", sha_a, "/x/hp_a.ko")).unwrap();
    let budget = Duration::from_millis(150);
    let opts = LoadOptions {
        budget: Some(budget),
        ..LoadOptions::default()
    };
    let mut seen = 0;
    let run = hotpatch::boot::load_installed(&paths, &opts, &Progress::silent(), |_| {
        seen += 1;
        if seen == 1 {
            // The first module's "transition" outlasts the whole budget.
            std::thread::sleep(budget * 2);
        }
    })
    .unwrap();
    assert_eq!(run.results.len(), 3, "{run:?}");
    assert_eq!(seen, 3, "each result is reported as it happens");
    assert!(
        matches!(&run.results[0], InstalledResult::AlreadyLoaded { module, .. } if module == "hp_a"),
        "{run:?}"
    );
    for (r, name) in run.results[1..].iter().zip(["hp_t", "hp_c"]) {
        match r {
            InstalledResult::Skipped { module, skipped } => {
                assert_eq!(module, name);
                assert_eq!(skipped, "the run's --budget of 0.15s is spent; not loaded");
            }
            other => panic!("{name} should be skipped for the budget: {other:?}"),
        }
    }
    assert_eq!(run.exit_code(), 3);
    // Each skipped one is journalled once, as refused, and never begun.
    let j = hotpatch::state::read_journal(&paths).unwrap();
    for name in ["hp_t", "hp_c"] {
        let e: Vec<_> = j
            .iter()
            .filter(|e| e.module.as_deref() == Some(name))
            .collect();
        assert_eq!(e.len(), 1, "{name}: {e:?}");
        assert_eq!(e[0].op, JournalOp::Load);
        assert_eq!(e[0].result, JournalResult::Refused);
        let why = e[0].detail["reasons"][0].as_str().unwrap();
        assert!(why.contains("--budget of 0.15s"), "{why}");
    }
}

/// `--force` whose `force` write the kernel refuses while the patch is
/// still in transition: outcome `force-failed`, exit 8, in the JSON report
/// and the journal; the loaded record is not marked forced. Refused
/// because the transition finished first: a plain `loaded`, exit 0.
#[test]
fn force_write_refused_mid_transition_is_exit_8_and_journalled() {
    use hotpatch::Outcome;
    use hotpatch::load::{LoadOptions, after_stall};
    use hotpatch::testelf::ModuleSpec;
    use livehost_common::progress::Progress;
    use std::time::Duration;
    let (d, paths) = tree();
    // A directory: every write to `force` fails, as the kernel's EINVAL.
    mkdir(d.path(), "sys/kernel/livepatch/hp_b/force");
    let f = d.path().join("hp_b.ko");
    std::fs::write(&f, ModuleSpec::simple("hp_b").build().bytes).unwrap();
    let opts = LoadOptions {
        force: true,
        timeout: Duration::from_millis(200),
        poll: Duration::from_millis(5),
        ..LoadOptions::default()
    };
    let quiet = Progress::silent();
    let r = after_stall(&paths, &f, &opts, &quiet, Duration::from_secs(1)).unwrap();
    assert_eq!(r.outcome, Outcome::ForceFailed, "{r:?}");
    assert_eq!(r.outcome.exit_code(), 8);
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["outcome"], "force-failed", "{v}");
    assert_eq!(v["stalled_tasks"][0]["pid"], 100, "{v}");
    assert!(
        r.messages.iter().any(|m| m.contains("--force failed")),
        "{r:?}"
    );
    let j = hotpatch::state::read_journal(&paths).unwrap();
    let e = j.last().unwrap();
    assert_eq!(e.module.as_deref(), Some("hp_b"));
    assert_eq!(e.op, JournalOp::Load);
    assert_eq!(e.result, JournalResult::ForceFailed);
    // The kernel finished first: nothing was forced.
    write(d.path(), "sys/kernel/livepatch/hp_b/transition", "0\n");
    let r = after_stall(&paths, &f, &opts, &quiet, Duration::from_secs(1)).unwrap();
    assert_eq!(r.outcome, Outcome::Loaded, "{r:?}");
    assert_eq!(r.outcome.exit_code(), 0);
    let j = hotpatch::state::read_journal(&paths).unwrap();
    assert_eq!(j.last().unwrap().result, JournalResult::Ok);
}
