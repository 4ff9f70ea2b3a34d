//! The demo scenario; see the crate docs for the steps.

use anyhow::{Context, Result, bail};
use kernel_tests::{GuestStatus, KernelSpec, RunOptions};
use livehost_common::progress::Progress;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where the workspace's sources are (the sample fix lives there).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// livehost's binaries sit beside this one (target/<profile>/).
fn bin(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("LIVEHOST_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for the current executable")?
            .to_path_buf(),
    };
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} is not built: run `cargo build --release --workspace --bins` (./x demo does)",
            p.display()
        );
    }
    Ok(p)
}

/// The guest side of the demo. Each step's stdout is framed so the host can
/// take JSON apart from prose; stderr is kept as its own step.
const GUEST_SCRIPT: &str = r#"
export HOTPATCH_STATE_DIR=/tmp/hotpatch
step() { n=$1; shift; echo "@@begin $n"; "$@" 2>/tmp/.err; rc=$?; echo; echo "@@end $n $rc"; echo "@@begin $n.stderr"; cat /tmp/.err; echo; echo "@@end $n.stderr 0"; }
mkdir -p /sys/fs/cgroup/demo-busy
# The workload: a container from vmm-bench's launcher, and a plain busy loop
# in a cgroup of its own, both competing with the patching for the CPUs.
vmm-bench container --name demo-app --quiet -- /bin/sh -c 'while :; do :; done' >/tmp/container.out 2>&1 &
CONT=$!
sh -c 'echo $$ > /sys/fs/cgroup/demo-busy/cgroup.procs; exec sh -c "while :; do :; done"' &
BUSY=$!
overhead record --interval 2 --duration $OBSERVE_SECS --json > /tmp/overhead.jsonl 2>/tmp/overhead.err &
OBS=$!
# Give the observer time to load its programs (slow under TCG) before the
# baseline: wait for its first interval, at most 60 s.
i=0; while [ ! -s /tmp/overhead.jsonl ] && [ $i -lt 600 ] && kill -0 $OBS 2>/dev/null; do sleep 0.1; i=$((i+1)); done
step before cat /proc/cmdline
step inspect hotpatch --json inspect /root/sample_fix.ko
step check hotpatch --json check /root/sample_fix.ko
step load hotpatch --json load --measure --timeout 60 /root/sample_fix.ko
step after cat /proc/cmdline
step status hotpatch --json status
wait $OBS
step overhead cat /tmp/overhead.jsonl
step overhead_log cat /tmp/overhead.err
kill $BUSY $CONT 2>/dev/null
step container cat /tmp/container.out
step dmesg_livepatch sh -c 'dmesg | grep -E "livepatch|sample_fix|hp_cmdline" || true'
"#;

/// The framed steps the guest printed: name → (output, status).
fn parse_steps(stdout: &str) -> BTreeMap<String, (String, i32)> {
    let mut steps = BTreeMap::new();
    let mut cur: Option<String> = None;
    let mut buf = String::new();
    for line in stdout.lines() {
        if let Some(n) = line.strip_prefix("@@begin ") {
            cur = Some(n.trim().to_string());
            buf.clear();
        } else if let Some(rest) = line.strip_prefix("@@end ") {
            let mut w = rest.split_whitespace();
            let name = w.next().unwrap_or_default().to_string();
            let rc = w.next().and_then(|r| r.parse().ok()).unwrap_or(-1);
            if cur.as_deref() == Some(name.as_str()) {
                steps.insert(name, (buf.trim_end().to_string(), rc));
            }
            cur = None;
        } else if cur.is_some() {
            buf.push_str(line);
            buf.push('\n');
        }
    }
    steps
}

fn step_json(steps: &BTreeMap<String, (String, i32)>, name: &str) -> Value {
    steps
        .get(name)
        .and_then(|(o, _)| serde_json::from_str(o).ok())
        .unwrap_or(Value::Null)
}

fn step_text<'a>(steps: &'a BTreeMap<String, (String, i32)>, name: &str) -> &'a str {
    steps.get(name).map(|(o, _)| o.as_str()).unwrap_or("")
}

fn step_rc(steps: &BTreeMap<String, (String, i32)>, name: &str) -> Option<i32> {
    steps.get(name).map(|(_, rc)| *rc)
}

pub fn run(out_root: &Path, with_bench: bool, print_json: bool) -> Result<i32> {
    let started = Instant::now();
    let progress = Progress::new("demo");
    let stamp = chrono_like_stamp();
    let out = out_root.join(format!("demo-{stamp}"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;

    // 1. The guest kernel and the sample fix built against it.
    progress.step("fetching the guest kernel (debian:bookworm-cloud)");
    let kernel = kernel_tests::kernel::fetch_with(&KernelSpec::default(), &progress)?;
    progress.step(format!(
        "building the sample livepatch against {}",
        kernel.version
    ));
    let fix_src = repo_root().join("hotpatch/fixtures/cmdline");
    let fix = kernel_tests::module::build(&kernel, &fix_src)?;

    // 2. The guest run.
    let observe_secs = 20;
    let mut opts = RunOptions::new([format!("OBSERVE_SECS={observe_secs}\n{GUEST_SCRIPT}")]);
    opts.require_config = vec!["CONFIG_LIVEPATCH".into(), "CONFIG_DEBUG_INFO_BTF".into()];
    opts.timeout = Duration::from_secs(150);
    opts.memory_mb = 1536;
    opts.progress = true;
    for b in ["hotpatch", "overhead", "vmm-bench"] {
        opts.files.push((bin(b)?, format!("/usr/bin/{b}")));
    }
    opts.files.push((fix.clone(), "/root/sample_fix.ko".into()));
    progress.step("booting the guest: observer, workload, check, load --measure");
    let guest = kernel_tests::run(&opts)?;
    std::fs::write(out.join("guest-console.log"), &guest.console)?;
    std::fs::write(out.join("guest-stdout.txt"), &guest.stdout)?;
    std::fs::write(out.join("guest-dmesg.txt"), &guest.dmesg)?;
    if !matches!(guest.status, GuestStatus::Exited(_)) {
        bail!(
            "the demo guest ended with {:?}; console tail:\n{}",
            guest.status,
            guest.console_tail(40)
        );
    }
    let steps = parse_steps(&guest.stdout);
    let overhead_lines: Vec<Value> = step_text(&steps, "overhead")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    std::fs::write(out.join("overhead.jsonl"), step_text(&steps, "overhead"))?;

    // 3. The host-side comparison.
    let bench = if with_bench {
        progress.step("vmm-bench report --quick (host)");
        let bdir = out.join("vmm-bench");
        let st = Command::new(bin("vmm-bench")?)
            .args(["report", "--quick", "--out"])
            .arg(&bdir)
            .status()
            .context("cannot run vmm-bench")?;
        if !st.success() {
            progress.note(format!(
                "vmm-bench report failed ({st}); the comparison is missing"
            ));
            json!({ "error": format!("vmm-bench report exited with {st}") })
        } else {
            let text = std::fs::read_to_string(bdir.join("report.json")).unwrap_or_default();
            serde_json::from_str(&text).unwrap_or(json!({ "error": "report.json did not parse" }))
        }
    } else {
        json!({ "not_run": "--no-bench" })
    };

    // 4. The report.
    let report = json!({
        "livehost_demo": 1,
        "guest": {
            "kernel": guest.kernel_version,
            "accel": guest.accel,
            "accel_reason": guest.accel_reason,
            "timings": guest.timings,
            "status": guest.status,
        },
        "livepatch": {
            "module": fix.file_name().map(|n| n.to_string_lossy().into_owned()),
            "before": step_text(&steps, "before"),
            "after": step_text(&steps, "after"),
            "took_effect": step_text(&steps, "before") != step_text(&steps, "after")
                && step_rc(&steps, "load") == Some(0),
            "inspect": step_json(&steps, "inspect"),
            "check": step_json(&steps, "check"),
            "check_exit": step_rc(&steps, "check"),
            "load": step_json(&steps, "load"),
            "load_exit": step_rc(&steps, "load"),
            "status": step_json(&steps, "status"),
            "kernel_log": step_text(&steps, "dmesg_livepatch"),
        },
        "observer": {
            "intervals": overhead_lines,
            "log": step_text(&steps, "overhead_log"),
        },
        "comparison": bench,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let bench_md = std::fs::read_to_string(out.join("vmm-bench/report.md")).unwrap_or_default();
    let md = markdown(&report, &bench_md);
    std::fs::write(out.join("report.md"), &md)?;
    progress.finish();
    if print_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{md}");
    }
    println!("report: {}", out.display());
    let ok = report["livepatch"]["took_effect"] == json!(true);
    Ok(if ok { 0 } else { livehost_common::exit::ERROR })
}

/// UTC `YYYYmmdd-HHMMSS` without a date crate.
fn chrono_like_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn fmt_num(v: &Value, unit: &str) -> String {
    match v.as_f64() {
        Some(x) if x >= 100.0 => format!("{x:.0} {unit}"),
        Some(x) => format!("{x:.2} {unit}"),
        None => "—".into(),
    }
}

fn markdown(r: &Value, bench_md: &str) -> String {
    let mut s = String::new();
    let g = &r["guest"];
    let lp = &r["livepatch"];
    let _ = writeln!(s, "# livehost demo\n");
    let _ = writeln!(
        s,
        "Guest kernel `{}` under **{}** ({}).\n",
        g["kernel"].as_str().unwrap_or("?"),
        g["accel"].as_str().unwrap_or("?").to_uppercase(),
        g["accel_reason"].as_str().unwrap_or("")
    );
    if g["accel"] == "tcg" {
        let _ = writeln!(
            s,
            "> Every guest timing below was taken under TCG (software emulation): it shows the \
             mechanism works and its relative costs, not bare-metal latencies.\n"
        );
    }
    let _ = writeln!(s, "## Livepatch\n");
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(
        s,
        "| `/proc/cmdline` before | `{}` |",
        lp["before"].as_str().unwrap_or("").trim()
    );
    let _ = writeln!(
        s,
        "| `/proc/cmdline` after | `{}` |",
        lp["after"].as_str().unwrap_or("").trim()
    );
    let _ = writeln!(s, "| took effect | {} |", lp["took_effect"]);
    let _ = writeln!(s, "| `hotpatch check` exit | {} |", lp["check_exit"]);
    let _ = writeln!(
        s,
        "| `hotpatch load --measure` exit | {} |",
        lp["load_exit"]
    );
    let load = &lp["load"];
    for (label, key) in [
        ("transition time", "transition_ms"),
        ("load total", "total_ms"),
    ] {
        if let Some(v) = find_key(load, key) {
            let _ = writeln!(s, "| {label} | {} |", fmt_num(v, "ms"));
        }
    }
    if let Some(m) = find_key(load, "measure") {
        for (label, key) in [
            ("largest gap during transition", "transition_max_gap_us"),
            ("largest gap, baseline", "baseline_max_gap_us"),
            ("added stall", "added_stall_us"),
        ] {
            if let Some(v) = find_key(m, key) {
                let _ = writeln!(s, "| {label} | {} |", fmt_num(v, "µs"));
            }
        }
    }
    let _ = writeln!(
        s,
        "\nFull `hotpatch` outputs are in `report.json` (`livepatch.*`).\n"
    );
    let _ = writeln!(s, "## Observer (per cgroup, over the same window)\n");
    let intervals = r["observer"]["intervals"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let window: f64 = intervals
        .iter()
        .filter_map(|i| i["interval_s"].as_f64())
        .sum();
    let _ = writeln!(
        s,
        "{} intervals, {window:.1} s, recorded by `overhead record` in the guest while the patch loaded \
         (TCG: scheduler figures are real, their scale is emulation's).\n",
        intervals.len()
    );
    let _ = writeln!(
        s,
        "| cgroup | container | CPU time | run-queue waits | p99 wait | max wait | waited most behind |\n|---|---|---|---|---|---|---|"
    );
    for row in observer_rows(&intervals) {
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "## VM vs container vs unikernel (host)\n");
    let c = &r["comparison"];
    if let Some(e) = c.get("error").or(c.get("not_run")) {
        let _ = writeln!(s, "Not available: {e}\n");
    } else {
        let _ = writeln!(
            s,
            "From `vmm-bench report --quick`; its SVG charts are in `vmm-bench/` beside this file.\n"
        );
        // Its own headings go one level down, under this section.
        for line in bench_md
            .lines()
            .skip_while(|l| l.starts_with("# ") || l.is_empty())
        {
            if line.starts_with('#') {
                let _ = writeln!(s, "#{line}");
            } else {
                let _ = writeln!(s, "{line}");
            }
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "Demo run took {:.0} s.",
        r["elapsed_s"].as_f64().unwrap_or(0.0)
    );
    s
}

/// One Markdown row per cgroup, summed over the observer's intervals.
fn observer_rows(intervals: &[Value]) -> Vec<String> {
    #[derive(Default)]
    struct Agg {
        container: String,
        cpu_ns: u64,
        waits: u64,
        p99: u64,
        max: u64,
        behind: BTreeMap<String, u64>,
    }
    let mut by: BTreeMap<String, Agg> = BTreeMap::new();
    for i in intervals {
        for g in i["cgroups"].as_array().into_iter().flatten() {
            let path = g["path"].as_str().unwrap_or("?").to_string();
            let a = by.entry(path).or_default();
            if let Some(c) = g["container"].as_str() {
                a.container = c.to_string();
            }
            a.cpu_ns += g["cpu_ns"].as_u64().unwrap_or(0);
            a.waits += g["rq_waits"].as_u64().unwrap_or(0);
            a.p99 = a.p99.max(g["rq_p99_ns"].as_u64().unwrap_or(0));
            a.max = a.max.max(g["rq_max_ns"].as_u64().unwrap_or(0));
            for p in g["preempted_by"].as_array().into_iter().flatten() {
                if p["class"] == "idle" {
                    continue;
                }
                let who = format!(
                    "{} ({})",
                    p["path"].as_str().unwrap_or("?"),
                    p["class"].as_str().unwrap_or("?")
                );
                *a.behind.entry(who).or_default() += p["wait_ns"].as_u64().unwrap_or(0);
            }
        }
    }
    let mut rows: Vec<(u64, String)> = by
        .into_iter()
        .map(|(path, a)| {
            let behind = a
                .behind
                .iter()
                .max_by_key(|(_, w)| **w)
                .map(|(k, w)| format!("{k}: {:.1} ms", *w as f64 / 1e6))
                .unwrap_or_else(|| "—".into());
            (
                a.cpu_ns,
                format!(
                    "| `{path}` | {} | {:.0} ms | {} | {:.2} ms | {:.2} ms | {behind} |",
                    if a.container.is_empty() {
                        "—"
                    } else {
                        &a.container
                    },
                    a.cpu_ns as f64 / 1e6,
                    a.waits,
                    a.p99 as f64 / 1e6,
                    a.max as f64 / 1e6,
                ),
            )
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    rows.into_iter().map(|(_, r)| r).collect()
}

/// Find a key anywhere in a JSON tree (the first match, depth-first), so
/// the summary does not depend on how deep a tool nests a figure.
fn find_key<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|c| find_key(c, key))),
        Value::Array(a) => a.iter().find_map(|c| find_key(c, key)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_framed() {
        let s =
            parse_steps("noise\n@@begin a\n{\"x\":1}\n\n@@end a 0\n@@begin b\nhello\n@@end b 3\n");
        assert_eq!(step_json(&s, "a")["x"], 1);
        assert_eq!(step_text(&s, "b"), "hello");
        assert_eq!(step_rc(&s, "b"), Some(3));
        assert_eq!(step_rc(&s, "c"), None);
    }

    #[test]
    fn stamp_shape() {
        let s = chrono_like_stamp();
        assert_eq!(s.len(), 15);
        assert_eq!(&s[8..9], "-");
    }
}
