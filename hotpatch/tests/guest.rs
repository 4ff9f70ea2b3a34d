//! End-to-end: the real `hotpatch` binary against a real kernel's livepatch
//! core, in QEMU guests booting Debian's 6.1 cloud kernel (the build machines
//! cannot load modules). Each test is one guest boot running a shell script
//! that batches many steps; every step prints `=== <name>`, its output and
//! `rc=<status>`, and the assertions run here on the host.
//!
//! Fixtures are our own modules under hotpatch/fixtures/, built against the
//! guest kernel's headers by kernel_tests::module::build.

use kernel_tests::{GuestKernel, KernelSpec, RunOptions};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

const FIXTURES: &[&str] = &[
    "cmdline", "stack", "replace", "busy", "stall", "badmagic", "nosym", "kpatch",
];

struct Env {
    kernel: GuestKernel,
    /// fixture dir name -> (module name, built .ko)
    kos: HashMap<&'static str, (String, PathBuf)>,
    /// hp_cmdline.ko compressed with xz.
    cmdline_xz: PathBuf,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        assert!(
            livehost_common::is_root(),
            "guest tests need root (QEMU, module builds); CI runs as root"
        );
        let kernel = kernel_tests::fetch(&KernelSpec::default()).expect("fetch guest kernel");
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let mut kos = HashMap::new();
        for f in FIXTURES {
            let ko = kernel_tests::module::build(&kernel, &src.join(f))
                .unwrap_or_else(|e| panic!("building fixture {f}: {e:#}"));
            let name = ko.file_stem().unwrap().to_string_lossy().into_owned();
            kos.insert(*f, (name, ko));
        }
        // A compressed copy, as Debian 13 and Fedora install modules (xz
        // with CRC32, as the kernel's own Kbuild compresses them).
        let cmdline_xz = kos["cmdline"].1.with_extension("ko.xz");
        let st = std::process::Command::new("xz")
            .args(["-kf", "--check=crc32"])
            .arg(&kos["cmdline"].1)
            .status()
            .expect("xz on the host");
        assert!(st.success() && cmdline_xz.exists(), "xz failed");
        Env {
            kernel,
            kos,
            cmdline_xz,
        }
    })
}

/// Output of one guest script, split into named steps.
struct Steps {
    steps: HashMap<String, (String, i32)>,
    raw: String,
    dmesg: String,
}

impl Steps {
    fn out(&self, name: &str) -> &str {
        &self.get(name).0
    }
    fn rc(&self, name: &str) -> i32 {
        self.get(name).1
    }
    fn get(&self, name: &str) -> &(String, i32) {
        self.steps
            .get(name)
            .unwrap_or_else(|| panic!("no step {name} in guest output:\n{}", self.raw))
    }
    fn json(&self, name: &str) -> Value {
        serde_json::from_str(self.out(name)).unwrap_or_else(|e| {
            panic!(
                "step {name} printed no JSON ({e}):\n{}\n--- all:\n{}",
                self.out(name),
                self.raw
            )
        })
    }
}

fn parse_steps(stdout: &str) -> HashMap<String, (String, i32)> {
    let mut steps = HashMap::new();
    for chunk in stdout.split("=== ").skip(1) {
        let (name, body) = chunk.split_once('\n').unwrap_or((chunk, ""));
        let body = body.trim_end();
        let (text, rc) = match body.rsplit_once("rc=") {
            Some((t, rc)) if rc.trim().parse::<i32>().is_ok() => (t, rc.trim().parse().unwrap()),
            _ => (body, -1),
        };
        steps.insert(name.trim().to_string(), (text.trim_end().to_string(), rc));
    }
    steps
}

/// Boot a guest with hotpatch, the fixtures and the kernel config (as
/// /boot/config-<release>, like a Debian host) and run `script`.
fn guest(script: &str, kernel_args: &[&str]) -> Steps {
    let e = env();
    let prelude = "set -u\nH=/usr/bin/hotpatch\nstep() { n=$1; shift; echo \"=== $n\"; \"$@\" 2>&1; echo \"rc=$?\"; }\n";
    let mut opts = RunOptions::new([format!("{prelude}{script}")]);
    opts.require_config.push("CONFIG_LIVEPATCH".into());
    opts.timeout = Duration::from_secs(150);
    opts.kernel_args = kernel_args.iter().map(|s| s.to_string()).collect();
    opts.env
        .push(("HOTPATCH_STATE_DIR".into(), "/tmp/hpstate".into()));
    opts.env.push(("LIVEHOST_QUIET".into(), "1".into()));
    opts.files.push((
        PathBuf::from(env!("CARGO_BIN_EXE_hotpatch")),
        "/usr/bin/hotpatch".into(),
    ));
    for (name, ko) in e.kos.values() {
        opts.files.push((ko.clone(), format!("/root/{name}.ko")));
    }
    opts.files
        .push((e.cmdline_xz.clone(), "/root/hp_cmdline.ko.xz".into()));
    if let Some(cfg) = &e.kernel.config {
        opts.files
            .push((cfg.clone(), format!("/boot/config-{}", e.kernel.release)));
    }
    let out = kernel_tests::run(&opts).expect("guest run");
    assert!(!out.oops, "kernel oops in guest:\n{}", out.console_tail(60));
    out.success().unwrap_or_else(|err| panic!("{err:#}"));
    Steps {
        steps: parse_steps(&out.stdout),
        raw: out.stdout.clone(),
        dmesg: out.dmesg.clone(),
    }
}

/// `op:result` of each journal entry, in order.
fn op_results(journal: &Value) -> Vec<String> {
    journal
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["op"].as_str().unwrap(),
                e["result"].as_str().unwrap()
            )
        })
        .collect()
}

fn assert_nothing_left(s: &Steps, ls: &str, mods: &str) {
    assert_eq!(s.out(ls), "", "livepatch sysfs not empty:\n{}", s.raw);
    assert!(
        !s.out(mods)
            .lines()
            .any(|l| l.starts_with("hp_") && !l.starts_with("hp_busy")),
        "a patch module is left in /proc/modules:\n{}",
        s.out(mods)
    );
}

#[test]
fn load_list_disable_unload_and_kernel_log() {
    let s = guest(
        r#"
# As the kernel's livepatch selftests do: two of the five transition lines
# are pr_debug, visible only with dynamic debug on for kernel/livepatch.
step dyndbg sh -c "echo 'file kernel/livepatch/* +p' > /sys/kernel/debug/dynamic_debug/control"
step cmdline0 cat /proc/cmdline
step load $H --json load --measure /root/hp_cmdline.ko
step cmdline1 cat /proc/cmdline
step list $H --json list
step listtext $H list
step disable $H --json disable hp_cmdline
step cmdline2 cat /proc/cmdline
step mods1 cat /proc/modules
step enable $H --json enable hp_cmdline
step cmdline-enabled cat /proc/cmdline
step enable-again $H --json enable hp_cmdline
step disable2 $H --json disable hp_cmdline
step unload $H --json unload hp_cmdline
step ls ls /sys/kernel/livepatch
step mods cat /proc/modules
step klog dmesg
step install $H --json install /root/hp_cmdline.ko
step installed $H --json load --installed
step installed-again $H --json load --installed
step cmdline3 cat /proc/cmdline
step hstatus $H --json status
step hstatus-text $H status
step unload-all $H --json unload --all
step hstatus2 $H status
step uninstall $H uninstall hp_cmdline
step ls2 ls /sys/kernel/livepatch
step mods2 cat /proc/modules
step journal $H --json journal
"#,
        &[],
    );
    let orig = s.out("cmdline0").to_string();
    assert!(!orig.contains("hotpatch-fixture"));
    assert_eq!(s.rc("dyndbg"), 0, "dynamic debug unavailable: {}", s.raw);

    // Load: transition completes, behaviour changes.
    assert_eq!(s.rc("load"), 0, "{}", s.raw);
    let load = s.json("load");
    assert_eq!(load["outcome"], "loaded");
    let t_ms = load["transition_ms"].as_f64().unwrap();
    assert!(t_ms > 0.0 && t_ms < 30_000.0);
    assert_eq!(s.out("cmdline1"), "hotpatch-fixture: hp_cmdline");

    // The interruption probe ran and labelled where it ran.
    let m = &load["measure"];
    assert_eq!(m["environment"]["kind"], "vm-tcg", "{m}");
    assert!(m["transition"]["spin_reads"].as_u64().unwrap() > 0);
    assert!(m["baseline"]["duration_ms"].as_f64().unwrap() >= 200.0);

    // list: the patch, its function, who provides it, taint K.
    let list = s.json("list");
    let p = &list["patches"][0];
    assert_eq!(p["name"], "hp_cmdline");
    assert_eq!(p["enabled"], true);
    assert_eq!(p["transition"], false);
    assert_eq!(p["objects"][0]["name"], "vmlinux");
    assert_eq!(p["objects"][0]["functions"][0]["name"], "cmdline_proc_show");
    assert_eq!(p["sha256"], load["sha256"]);
    assert_eq!(list["functions"][0]["provided_by"], "hp_cmdline");
    assert!(
        list["taint_flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().starts_with('K')),
        "{list}"
    );
    assert!(
        s.out("listtext")
            .contains("vmlinux:cmdline_proc_show <- hp_cmdline")
    );

    // Disable restores behaviour; module stays until unload.
    assert_eq!(s.rc("disable"), 0, "{}", s.raw);
    assert_eq!(s.out("cmdline2"), orig);
    assert!(s.out("mods1").contains("hp_cmdline"));
    // enable after disable: the kernel freed the patch, so hotpatch loads
    // the recorded file again; behaviour changes again.
    assert_eq!(s.rc("enable"), 0, "{}", s.raw);
    let en = s.json("enable");
    assert_eq!(en["load"]["outcome"], "loaded", "{en}");
    assert_eq!(s.out("cmdline-enabled"), "hotpatch-fixture: hp_cmdline");
    assert_eq!(s.rc("enable-again"), 0, "{}", s.raw);
    assert_eq!(
        s.json("enable-again")["messages"][0],
        "hp_cmdline is already enabled"
    );
    assert_eq!(s.rc("disable2"), 0, "{}", s.raw);
    assert_eq!(s.rc("unload"), 0, "{}", s.raw);
    assert_nothing_left(&s, "ls", "mods");

    // Kernel log of the clean load: the five transition lines, in order.
    let klog = s.out("klog");
    let want = [
        "livepatch: enabling patch 'hp_cmdline'",
        "livepatch: 'hp_cmdline': initializing patching transition",
        "livepatch: 'hp_cmdline': starting patching transition",
        "livepatch: 'hp_cmdline': completing patching transition",
        "livepatch: 'hp_cmdline': patching complete",
    ];
    let mut at = 0;
    for w in want {
        let found = klog[at..]
            .find(w)
            .unwrap_or_else(|| panic!("{w:?} missing or out of order in:\n{klog}"));
        at += found + w.len();
    }

    // install + load --installed re-applies; a second run sees it is loaded.
    assert_eq!(s.rc("install"), 0, "{}", s.raw);
    assert_eq!(s.rc("installed"), 0, "{}", s.raw);
    assert_eq!(s.json("installed")["results"][0]["outcome"], "loaded");
    assert_eq!(
        s.json("installed-again")["results"][0]["outcome"],
        "already-loaded"
    );
    assert_eq!(s.out("cmdline3"), "hotpatch-fixture: hp_cmdline");
    // status: the installed set is applied: as intended, exit 0, with the
    // kernel's real build id; after unloading, it is not (exit 9).
    assert_eq!(s.rc("hstatus"), 0, "{}", s.raw);
    let hs = s.json("hstatus");
    assert_eq!(hs["as_intended"], true, "{hs}");
    assert_eq!(hs["installed"][0]["state"], "applied", "{hs}");
    assert_eq!(
        hs["kernel_build_id"].as_str().map_or(0, str::len),
        40,
        "{hs}"
    );
    assert_eq!(s.rc("hstatus2"), 9, "{}", s.raw);
    assert_eq!(s.rc("hstatus-text"), 0, "{}", s.raw);
    eprintln!(
        "status (as intended):\n{}\nstatus (after unload --all):\n{}",
        s.out("hstatus-text"),
        s.out("hstatus2")
    );
    assert!(
        s.out("hstatus2").contains("NOT as intended")
            && s.out("hstatus2").contains("hp_cmdline is not-loaded"),
        "{}",
        s.out("hstatus2")
    );
    assert_eq!(s.rc("unload-all"), 0, "{}", s.raw);
    assert_eq!(s.rc("uninstall"), 0);
    assert_nothing_left(&s, "ls2", "mods2");

    // The journal recorded each change.
    let j = s.json("journal");
    let all: Vec<&Value> = j.as_array().unwrap().iter().collect();
    // Every kernel change was journalled as begun before it happened.
    let begins = all.iter().filter(|e| e["result"] == "begin").count();
    assert_eq!(begins, 7, "{j}");
    let ops: Vec<String> = op_results(&j)
        .into_iter()
        .filter(|o| !o.ends_with(":begin"))
        .collect();
    assert_eq!(
        ops,
        [
            "load:ok",
            "disable:ok",
            "enable:ok",
            "disable:ok",
            "unload:ok",
            "install:ok",
            "load:ok",
            "unload:ok",
            "uninstall:ok"
        ],
        "{j}"
    );
    eprintln!(
        "measure (TCG guest): {}",
        serde_json::to_string_pretty(m).unwrap()
    );
    assert!(!s.dmesg.is_empty());
}

#[test]
fn stacking_reverse_unload_and_atomic_replace() {
    let s = guest(
        r#"
step orig cat /proc/cmdline
step version0 cat /proc/version
step a $H --json load /root/hp_cmdline.ko
step b $H --json load /root/hp_stack.ko
step c1 cat /proc/cmdline
step v1 cat /proc/version
step list $H --json list
step u1 $H --json unload hp_stack
step c2 cat /proc/cmdline
step v2 cat /proc/version
step u2 $H --json unload hp_cmdline
step c3 cat /proc/cmdline
step a2 $H --json load /root/hp_cmdline.ko
step b2 $H --json load /root/hp_stack.ko
step r $H --json load /root/hp_replace.ko
step c4 cat /proc/cmdline
step v4 cat /proc/version
step mods4 cat /proc/modules
step list4 $H --json list
step again $H --json load /root/hp_cmdline.ko
step c5 cat /proc/cmdline
step all $H --json unload --all
step c6 cat /proc/cmdline
step ls ls /sys/kernel/livepatch
step mods cat /proc/modules
step xz-inspect $H --json inspect /root/hp_cmdline.ko.xz
step xz-load $H --json load /root/hp_cmdline.ko.xz
step xz-cmdline cat /proc/cmdline
step xz-unload $H --json unload hp_cmdline
step xz-sha sha256sum /root/hp_cmdline.ko.xz
step kp-check $H --json check /root/hp_kpatch.ko
step kp-load $H --json load /root/hp_kpatch.ko
step kp-cmdline cat /proc/cmdline
step kp-unload $H --json unload hp_kpatch
step kp-ls ls /sys/kernel/livepatch
"#,
        &[],
    );
    let orig = s.out("orig").to_string();
    let version = s.out("version0").to_string();
    for st in ["a", "b", "u1", "u2", "a2", "b2", "r", "again", "all"] {
        assert_eq!(s.rc(st), 0, "step {st}:\n{}", s.raw);
    }
    assert_eq!(s.out("c1"), "hotpatch-fixture: hp_stack");
    assert_eq!(s.out("v1"), "hotpatch-fixture: hp_stack version");

    // Which patch provides which function, bottom-to-top stacking.
    let list = s.json("list");
    let names: Vec<&str> = list["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hp_cmdline", "hp_stack"]);
    let funcs = list["functions"].as_array().unwrap();
    let cmd = funcs
        .iter()
        .find(|f| f["function"] == "cmdline_proc_show")
        .unwrap();
    assert_eq!(cmd["provided_by"], "hp_stack");
    assert_eq!(cmd["also_in"][0], "hp_cmdline");
    let ver = funcs
        .iter()
        .find(|f| f["function"] == "version_proc_show")
        .unwrap();
    assert_eq!(ver["provided_by"], "hp_stack");

    // Reverse order unload peels the stack one layer at a time.
    assert_eq!(s.out("c2"), "hotpatch-fixture: hp_cmdline");
    assert_eq!(s.out("v2"), version);
    assert_eq!(s.out("c3"), orig);

    // Atomic replace: supersedes both, their modules removed.
    let r = s.json("r");
    let mut removed: Vec<&str> = r["replaced_removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    removed.sort();
    assert_eq!(removed, ["hp_cmdline", "hp_stack"], "{r}");
    assert!(
        !r["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m.as_str().unwrap().contains("warning")),
        "{r}"
    );
    assert_eq!(s.out("c4"), "hotpatch-fixture: hp_replace");
    assert_eq!(
        s.out("v4"),
        version,
        "replace patch does not patch /proc/version"
    );
    let m4 = s.out("mods4");
    assert!(
        m4.contains("hp_replace") && !m4.contains("hp_cmdline") && !m4.contains("hp_stack"),
        "{m4}"
    );
    let l4 = s.json("list4");
    assert_eq!(l4["patches"].as_array().unwrap().len(), 1);
    assert_eq!(l4["patches"][0]["replace"], true, "{l4}");

    // Reloading a replaced module works (no EEXIST) and stacks on top.
    assert_eq!(s.json("again")["outcome"], "loaded");
    assert_eq!(s.out("c5"), "hotpatch-fixture: hp_cmdline");

    // --all goes top first.
    let all = s.json("all");
    let order: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["module"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["hp_cmdline", "hp_replace"]);
    assert_eq!(s.out("c6"), orig);
    assert_nothing_left(&s, "ls", "mods");

    // A .ko.xz is inspected (the ELF inside) and loaded (6.1 cannot
    // decompress modules itself: the decompressed bytes go through a sealed
    // memfd); its identity is the compressed file's sha256.
    let xi = s.json("xz-inspect");
    assert_eq!(xi["compression"], "xz", "{xi}");
    assert_eq!(
        xi["objects"][0]["functions"][0]["name"], "cmdline_proc_show",
        "{xi}"
    );
    let file_sha = s
        .out("xz-sha")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(xi["sha256"], file_sha.as_str(), "{xi}");
    assert_eq!(s.rc("xz-load"), 0, "{}", s.raw);
    assert_eq!(s.json("xz-load")["outcome"], "loaded");
    assert_eq!(s.out("xz-cmdline"), "hotpatch-fixture: hp_cmdline");
    assert_eq!(s.rc("xz-unload"), 0, "{}", s.raw);

    // A module laid out as kpatch-build lays it out (klp_patch built at run
    // time): its target symbols are checked from .kpatch.funcs, it loads,
    // patches, and unloads.
    let kc = s.json("kp-check");
    let ts = kc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "target-symbols")
        .unwrap();
    assert_eq!(ts["status"], "pass", "{kc}");
    assert!(
        ts["detail"].as_str().unwrap().contains("all 1 target"),
        "{kc}"
    );
    assert_eq!(s.rc("kp-load"), 0, "{}", s.raw);
    assert_eq!(s.out("kp-cmdline"), "hotpatch-fixture: hp_kpatch");
    assert_eq!(s.rc("kp-unload"), 0, "{}", s.raw);
    assert_eq!(s.out("kp-ls"), "");
}

#[test]
fn stalled_transition_is_named_and_rolled_back() {
    let s = guest(
        r#"
insmod /root/hp_busy.ko
sleep 0.3
step stall $H --json load --timeout 3 /root/hp_stall.ko
step ls ls /sys/kernel/livepatch
step mods cat /proc/modules
step text $H load --timeout 2 /root/hp_stall.ko
step norb $H --json load --timeout 2 --no-rollback /root/hp_stall.ko
step status $H --json status
step unload $H --json unload --timeout 10 hp_stall
step ls2 ls /sys/kernel/livepatch
step mods2 cat /proc/modules
# SIGTERM mid-transition (systemd stopping the unit): rolled back.
step term sh -c '/usr/bin/hotpatch --json load --timeout 60 /root/hp_stall.ko & p=$!; sleep 2; kill -TERM $p; wait $p'
step ls3 ls /sys/kernel/livepatch
step mods3 cat /proc/modules
# SIGKILL mid-transition: nothing runs; the next command reconciles.
step kill sh -c '/usr/bin/hotpatch load --timeout 60 /root/hp_stall.ko >/dev/null 2>&1 & p=$!; sleep 2; kill -KILL $p; wait $p'
step killed cat /sys/kernel/livepatch/hp_stall/transition
step recon $H list
step ls4 ls /sys/kernel/livepatch
step mods4 cat /proc/modules
step force $H --json load --timeout 2 --force /root/hp_stall.ko
step fstatus $H --json status
# A kthread started now runs the replacement: unpatching stalls on it, and
# reversing stalls on hp_busy_kthread, still in the original.
echo 1 > /sys/module/hp_busy/parameters/spawn
sleep 0.3
step funload $H --json unload --timeout 3 hp_stall
step funload-state cat /sys/kernel/livepatch/hp_stall/transition
step journal $H --json journal
"#,
        &[],
    );
    // Default: stall -> named -> reversed -> removed, exit 4.
    assert_eq!(s.rc("stall"), 4, "{}", s.raw);
    let r = s.json("stall");
    assert_eq!(r["outcome"], "rolled-back");
    let tasks = r["stalled_tasks"].as_array().unwrap();
    let k = tasks
        .iter()
        .find(|t| t["comm"] == "hp_busy_kthread")
        .unwrap_or_else(|| panic!("stalled kthread not named: {r}"));
    assert_eq!(k["patch_state"], 0);
    assert!(k["pid"].as_u64().unwrap() > 0);
    assert!(
        k["stack"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().contains("hp_busy_sleeper")),
        "stack does not show the patched function: {k}"
    );
    assert!(r["rollback_ms"].as_f64().unwrap() > 0.0);
    // The stall line of the progress output is in the JSON report too.
    assert!(
        r["messages"].as_array().unwrap().iter().any(|m| {
            let m = m.as_str().unwrap();
            m.contains("transition stalled after") && m.contains("hp_busy_kthread")
        }),
        "{r}"
    );
    assert_nothing_left(&s, "ls", "mods");
    assert!(
        s.out("mods").contains("hp_busy"),
        "the busy module itself stays"
    );

    // Text mode says what happened, in words.
    assert_eq!(s.rc("text"), 4);
    let t = s.out("text");
    assert!(
        t.contains("hp_busy_kthread")
            && t.contains("rolled back")
            && t.contains("kernel is as before"),
        "{t}"
    );

    // Halfway to the deadline hotpatch says what it did about the pending
    // tasks: 6.1 has no `signal` attribute (removed in 5.13), so it says
    // the kernel signals them itself.
    assert!(
        r["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m.as_str().unwrap().contains("no `signal` attribute")),
        "{r}"
    );

    // --no-rollback leaves it in transition (its own exit code), visible in
    // status; unload reverses.
    assert_eq!(s.rc("norb"), 5, "{}", s.raw);
    assert_eq!(s.json("norb")["outcome"], "stalled");
    let st = s.json("status");
    assert_eq!(st["patches"][0]["name"], "hp_stall");
    assert_eq!(st["patches"][0]["transition"], true);
    assert!(
        st["patches"][0]["pending_tasks"].as_u64().unwrap() >= 1,
        "{st}"
    );
    assert_eq!(s.rc("unload"), 0, "{}", s.raw);
    assert_nothing_left(&s, "ls2", "mods2");

    assert_signal_paths(&s);

    // --force completes the transition. On this 6.1 kernel the forced
    // patch can still be disabled and its module removed (observed: refcount
    // drops to 0); hotpatch does not assume either way.
    assert_eq!(s.rc("force"), 0, "{}", s.raw);
    let f = s.json("force");
    assert_eq!(f["outcome"], "forced");
    let fm: Vec<&str> = f["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(
        fm.iter().any(|m| m.contains("hp_busy_kthread"))
            && fm
                .iter()
                .any(|m| m.contains("--force: forcing the transition")),
        "{f}"
    );
    let fs = s.json("fstatus");
    assert_eq!(fs["patches"][0]["transition"], false, "{fs}");
    assert_eq!(fs["patches"][0]["enabled"], true, "{fs}");
    assert_reverse_stalled_unload(&s);

    let j = s.json("journal");
    let results: Vec<&str> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["result"].as_str().unwrap())
        .collect();
    assert_eq!(
        results,
        [
            "begin",
            "rolled-back",
            "begin",
            "rolled-back",
            "begin",
            "stalled",
            "begin",
            "ok",
            "begin",
            "interrupted",
            "begin",
            "reconciled",
            "begin",
            "forced",
            "begin",
            "reverse-stalled"
        ],
        "{j}"
    );
    // The journal keeps the stalled tasks of the half-applied unload.
    let last = &j.as_array().unwrap()[15];
    assert!(
        last["detail"]["reverse_stalled"]
            .to_string()
            .contains("hp_busy_kthread"),
        "{last}"
    );
}

/// SIGTERM mid-transition is rolled back; SIGKILL's leftover is
/// reconciled by the next command.
fn assert_signal_paths(s: &Steps) {
    // SIGTERM mid-transition: reversed and removed, its own outcome.
    assert_eq!(s.rc("term"), 4, "{}", s.raw);
    let t = s.json("term");
    assert_eq!(t["outcome"], "interrupted", "{t}");
    assert!(t["rollback_ms"].as_f64().is_some(), "{t}");
    assert_nothing_left(s, "ls3", "mods3");

    // SIGKILL left it in transition; the next command (a plain `list`)
    // found the unfinished begin, reversed and removed it, and said so.
    assert_eq!(s.rc("kill"), 137, "{}", s.raw);
    assert_eq!(s.out("killed"), "1", "{}", s.raw);
    let recon = s.out("recon");
    assert!(
        recon.contains("did not finish")
            && recon.contains("still in transition")
            && recon.contains("removed the module"),
        "{recon}"
    );
    assert_nothing_left(s, "ls4", "mods4");
}

/// An unload whose unpatching and reverse both stall.
fn assert_reverse_stalled_unload(s: &Steps) {
    // The unload stalled on the new kthread, its reverse on the old one:
    // half-applied, its own outcome and exit code, both task lists kept.
    assert_eq!(s.rc("funload"), 6, "{}", s.raw);
    let fu = s.json("funload");
    let u = &fu[0];
    assert_eq!(u["outcome"], "reverse-stalled", "{fu}");
    assert_eq!(u["removed"], false, "{fu}");
    let comms = |k: &str| -> Vec<String> {
        u[k].as_array()
            .unwrap_or_else(|| panic!("no {k}: {fu}"))
            .iter()
            .map(|t| t["comm"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        comms("stalled_tasks").contains(&"hp_busy_extra".to_string()),
        "{fu}"
    );
    assert!(
        comms("reverse_stalled_tasks").contains(&"hp_busy_kthread".to_string()),
        "{fu}"
    );
    assert_eq!(s.out("funload-state"), "1", "still mid-transition");
}

#[test]
fn bad_modules_refused_with_reason_and_nothing_changes() {
    let s = guest(
        r#"
head -c 3000 /dev/urandom > /tmp/junk.ko
: > /tmp/empty.ko
dmesg > /tmp/k0; ls -la /sys/kernel/livepatch > /tmp/l0; cat /proc/modules > /tmp/m0
for m in hp_badmagic hp_busy hp_nosym; do
  step check-$m $H --json check /root/$m.ko
  step load-$m $H --json load /root/$m.ko
done
step check-text $H check /root/hp_badmagic.ko
step junk $H check /tmp/junk.ko
step empty $H inspect /tmp/empty.ko
dmesg > /tmp/k1; ls -la /sys/kernel/livepatch > /tmp/l1; cat /proc/modules > /tmp/m1
step same-klog cmp /tmp/k0 /tmp/k1
step same-sysfs cmp /tmp/l0 /tmp/l1
step same-mods cmp /tmp/m0 /tmp/m1
step good $H --json check /root/hp_cmdline.ko
step install $H install /root/hp_cmdline.ko
step skipped $H --json load --installed
step ls ls /sys/kernel/livepatch
step l1 $H load /root/hp_cmdline.ko
step dup $H --json check /root/hp_cmdline.ko
step notlp $H unload hp_nothere
step badtimeout $H unload --all --timeout 0
# No kthread in hp_busy_sleeper yet: hp_stall applies at once. A kthread
# started after runs the replacement, so unpatching stalls on it; the
# reverse (patching again) has nothing to wait for.
insmod /root/hp_busy.ko start=0
step sload $H --json load --timeout 20 /root/hp_stall.ko
echo 1 > /sys/module/hp_busy/parameters/spawn
sleep 0.3
step sunload $H --json unload --timeout 2 hp_stall
step sstate cat /sys/kernel/livepatch/hp_stall/enabled /sys/kernel/livepatch/hp_stall/transition
step sdisable $H --json disable --timeout 2 hp_stall
step sstate2 cat /sys/kernel/livepatch/hp_stall/enabled /sys/kernel/livepatch/hp_stall/transition
step sjournal $H --json journal --tail 4
"#,
        &["hotpatch.skip=1"],
    );
    let fail_of = |step: &str, id: &str| -> String {
        let v = s.json(step);
        let c = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("{step}: no check {id}: {v}"));
        assert_eq!(c["status"], "fail", "{step}: {id} should fail: {v}");
        c["detail"].as_str().unwrap().to_string()
    };
    for m in ["hp_badmagic", "hp_busy", "hp_nosym"] {
        assert_eq!(s.rc(&format!("check-{m}")), 3, "{}", s.raw);
        assert_eq!(s.rc(&format!("load-{m}")), 3, "{}", s.raw);
        assert_eq!(s.json(&format!("load-{m}"))["outcome"], "refused");
    }
    let vm = fail_of("check-hp_badmagic", "vermagic");
    assert!(vm.contains("built for kernel \"5.10.0-30-amd64\""), "{vm}");
    assert!(vm.contains("lacks \"preempt\""), "{vm}");
    let lp = fail_of("check-hp_busy", "livepatch-module");
    assert!(lp.contains("not a livepatch"), "{lp}");
    let sym = fail_of("check-hp_nosym", "target-symbols");
    assert!(sym.contains("vmlinux:hp_no_such_function"), "{sym}");
    assert!(s.out("check-text").contains("FAIL  vermagic"));

    // Garbage is an error with a reason, not a crash.
    assert_eq!(s.rc("junk"), 1);
    assert!(
        s.out("junk").contains("not an ELF file"),
        "{}",
        s.out("junk")
    );
    assert_eq!(s.rc("empty"), 1);
    assert!(s.out("empty").contains("empty"), "{}", s.out("empty"));

    // Nothing reached the kernel.
    assert_eq!(s.rc("same-klog"), 0, "kernel log changed:\n{}", s.raw);
    assert_eq!(s.rc("same-sysfs"), 0);
    assert_eq!(s.rc("same-mods"), 0);

    // The good one passes here; boot skip switch honoured.
    assert_eq!(s.rc("good"), 0, "{}", s.out("good"));
    assert_eq!(s.rc("skipped"), 0);
    assert!(
        s.json("skipped")["skipped"]
            .as_str()
            .unwrap()
            .contains("hotpatch.skip=1")
    );
    assert_eq!(s.out("ls"), "");

    // Already loaded: the same file, recognised by hash.
    assert_eq!(s.rc("l1"), 0, "{}", s.raw);
    assert_eq!(s.rc("dup"), 3);
    let dup = fail_of("dup", "not-loaded");
    assert!(
        dup.contains("already loaded") && dup.contains("same file"),
        "{dup}"
    );
    assert_eq!(s.rc("notlp"), 1);
    assert!(s.out("notlp").contains("no module named hp_nothere"));
    assert!(
        s.out("badtimeout").contains("--timeout must be"),
        "{}",
        s.out("badtimeout")
    );
    assert_eq!(s.rc("badtimeout"), 2, "usage error");

    // A stalled unload and a stalled disable are reversed: the patch stays
    // applied as before, exit 4, the stalled kthread named.
    assert_eq!(s.rc("sload"), 0, "{}", s.raw);
    for (step, state) in [("sunload", "sstate"), ("sdisable", "sstate2")] {
        assert_eq!(s.rc(step), 4, "{step}: {}", s.raw);
        let v = s.json(step);
        let r = if v.is_array() { &v[0] } else { &v };
        assert_eq!(r["outcome"], "rolled-back", "{v}");
        assert_eq!(r["removed"], false, "{v}");
        assert!(
            r["stalled_tasks"].to_string().contains("hp_busy_extra"),
            "{v}"
        );
        assert_eq!(s.out(state), "1\n0", "{step}: patch applied, no transition");
    }
    let j = s.json("sjournal");
    let got = op_results(&j);
    assert_eq!(
        got,
        [
            "unload:begin",
            "unload:rolled-back",
            "disable:begin",
            "disable:rolled-back"
        ],
        "{j}"
    );
}

#[test]
fn inspect_reads_every_fixture() {
    let e = env();
    let info = |f: &str| hotpatch::module::inspect_file(&e.kos[f].1).unwrap();
    let c = info("cmdline");
    assert_eq!(c.name.as_deref(), Some("hp_cmdline"));
    assert!(c.livepatch);
    assert_eq!(c.replace, Some(false));
    assert_eq!(c.objects.len(), 1);
    assert_eq!(c.objects[0].name, "vmlinux");
    assert_eq!(c.objects[0].functions[0].name, "cmdline_proc_show");
    assert_eq!(
        c.objects[0].functions[0].replacement.as_deref(),
        Some("hp_cmdline_show")
    );
    assert!(
        c.vermagic
            .as_deref()
            .unwrap()
            .starts_with(&e.kernel.release)
    );
    assert!(c.signature.is_none());

    let st = info("stack");
    let fs: Vec<&str> = st.functions().map(|(_, f)| f.name.as_str()).collect();
    assert_eq!(fs, ["cmdline_proc_show", "version_proc_show"]);
    assert_eq!(info("replace").replace, Some(true));
    let stall = info("stall");
    assert_eq!(stall.objects[0].name, "hp_busy");
    assert_eq!(stall.objects[0].functions[0].name, "hp_busy_sleeper");
    let bad = info("badmagic");
    assert!(
        bad.vermagic
            .as_deref()
            .unwrap()
            .starts_with("5.10.0-30-amd64")
    );
    assert!(bad.warnings.iter().any(|w| w.contains("vermagic")));
    // kpatch-build layout: no klp_patch initialiser, metadata in
    // .kpatch.funcs / .kpatch.strings.
    let kp = info("kpatch");
    assert_eq!(kp.objects.len(), 1, "{kp:?}");
    assert_eq!(kp.objects[0].name, "vmlinux");
    assert_eq!(kp.objects[0].functions[0].name, "cmdline_proc_show");
    assert_eq!(
        kp.objects[0].functions[0].replacement.as_deref(),
        Some("hp_kpatch_show")
    );
    assert_eq!(kp.replace, None, "only known once loaded");
    let busy = info("busy");
    assert!(!busy.livepatch);
    assert!(busy.objects.is_empty());

    // Every truncation of a real module is an error or a result, never a panic.
    let bytes = std::fs::read(&e.kos["stack"].1).unwrap();
    for cut in (0..bytes.len()).step_by(97) {
        let _ = hotpatch::module::inspect(&bytes[..cut]);
    }
    // klp-convert / kpatch-build metadata, made by renaming in place: a
    // relocation section becomes `.klp.rela.xx..txt` and a symbol becomes
    // `.klp.sym.vmlinux.ab,1` in the SHN_LIVEPATCH section.
    let mut klp = bytes.clone();
    {
        let elf = goblin::elf::Elf::parse(&bytes).unwrap();
        let shstr = elf.section_headers[elf.header.e_shstrndx as usize].sh_offset as usize;
        let sh = elf
            .section_headers
            .iter()
            .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".rela__mcount_loc"))
            .unwrap();
        let at = shstr + sh.sh_name;
        klp[at..at + 17].copy_from_slice(b".klp.rela.xx..txt");
        let symtab_idx = elf
            .section_headers
            .iter()
            .position(|s| s.sh_type == goblin::elf::section_header::SHT_SYMTAB)
            .unwrap();
        let symtab = &elf.section_headers[symtab_idx];
        let strtab = elf.section_headers[symtab.sh_link as usize].sh_offset as usize;
        let (i, sym) = elf
            .syms
            .iter()
            .enumerate()
            .find(|(_, s)| elf.strtab.get_at(s.st_name) == Some("hp_stack_version_show"))
            .unwrap();
        let at = strtab + sym.st_name;
        klp[at..at + 21].copy_from_slice(b".klp.sym.vmlinux.ab,1");
        let ent = symtab.sh_offset as usize + i * 24;
        klp[ent + 6..ent + 8]
            .copy_from_slice(&(hotpatch::module::SHN_LIVEPATCH as u16).to_le_bytes());
    }
    let k = hotpatch::module::inspect(&klp).unwrap();
    assert_eq!(k.klp_rela_objects, ["xx"]);
    assert_eq!(
        k.klp_symbols,
        [hotpatch::module::KlpSymbol {
            object: "vmlinux".into(),
            name: "ab".into(),
            sympos: 1
        }]
    );
    assert_eq!(
        k.objects[0].functions.len(),
        2,
        "patch structure still followed"
    );

    // A signature trailer on a real module is recognised and split off.
    let mut signed = bytes.clone();
    signed.extend_from_slice(&[0xAB; 40]);
    signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 40]);
    signed.extend_from_slice(hotpatch::module::SIG_MAGIC);
    let si = hotpatch::module::inspect(&signed).unwrap();
    assert_eq!(si.signature.unwrap().id_type, "PKCS#7");
    assert_eq!(si.objects, st.objects);
}
