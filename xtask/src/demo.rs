//! The demo scenario; see the crate docs for the steps.

use anyhow::{Context, Result, bail};
use kernel_tests::{GuestStatus, KernelSpec, RunOptions};
use livehost_common::progress::Progress;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

/// What the guest part produced. `error` says why it is partial; whatever
/// was produced before the failure is kept.
#[derive(Default)]
struct GuestPart {
    kernel: Option<String>,
    fix: Option<PathBuf>,
    outcome: Option<kernel_tests::RunOutcome>,
    error: Option<String>,
}

/// Steps 1–2: the guest kernel, the sample fix, the guest run. Never
/// returns early: a failure is recorded in `error` so the report is still
/// written.
fn guest_part(progress: &Progress, out: &Path) -> GuestPart {
    let mut part = GuestPart::default();
    let r = (|| -> Result<()> {
        // The binaries first: a missing build fails at once, not after the
        // kernel fetch and the module build.
        let bins = ["hotpatch", "overhead", "vmm-bench"]
            .into_iter()
            .map(|b| Ok((bin(b)?, format!("/usr/bin/{b}"))))
            .collect::<Result<Vec<_>>>()?;
        progress.step("fetching the guest kernel (debian:bookworm-cloud)");
        let kernel = kernel_tests::kernel::fetch_with(&KernelSpec::default(), progress)?;
        part.kernel = Some(kernel.release.clone());
        progress.step(format!(
            "building the sample livepatch against {}",
            kernel.release
        ));
        let fix_src = repo_root().join("hotpatch/fixtures/cmdline");
        let fix = kernel_tests::module::build(&kernel, &fix_src)?;
        part.fix = Some(fix.clone());

        let observe_secs = 20;
        let mut opts = RunOptions::new([format!("OBSERVE_SECS={observe_secs}\n{GUEST_SCRIPT}")]);
        opts.require_config = vec!["CONFIG_LIVEPATCH".into(), "CONFIG_DEBUG_INFO_BTF".into()];
        opts.timeout = Duration::from_secs(150);
        opts.memory_mb = 1536;
        opts.progress = true;
        opts.files = bins;
        opts.files.push((fix, "/root/sample_fix.ko".into()));
        progress.step("booting the guest: observer, workload, check, load --measure");
        let guest = kernel_tests::run(&opts)?;
        std::fs::write(out.join("guest-console.log"), &guest.console)?;
        std::fs::write(out.join("guest-stdout.txt"), &guest.stdout)?;
        std::fs::write(out.join("guest-dmesg.txt"), &guest.dmesg)?;
        let exited = matches!(guest.status, GuestStatus::Exited(_));
        let why = format!(
            "the demo guest ended with {:?}; console tail:\n{}",
            guest.status,
            guest.console_tail(40)
        );
        part.outcome = Some(guest);
        if !exited {
            bail!(why);
        }
        Ok(())
    })();
    if let Err(e) = r {
        part.error = Some(format!("{e:#}"));
    }
    part
}

/// Step 3: `vmm-bench report --quick` on the host. Its stdout (the same
/// Markdown it writes to report.md) is discarded so it cannot get into ours.
fn host_comparison(progress: &Progress, bdir: &Path) -> Value {
    let exe = match bin("vmm-bench") {
        Ok(e) => e,
        Err(e) => return json!({ "error": format!("{e:#}") }),
    };
    let st = match Command::new(exe)
        .args(["report", "--quick", "--out"])
        .arg(bdir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
    {
        Ok(st) => st,
        Err(e) => return json!({ "error": format!("cannot run vmm-bench: {e}") }),
    };
    use std::os::unix::process::ExitStatusExt;
    let text = std::fs::read_to_string(bdir.join("report.json")).ok();
    let c = comparison(st.code(), st.signal(), text.as_deref());
    if !st.success() {
        progress.note(format!(
            "vmm-bench report exited with {st}; {}",
            if c.get("error").is_some() {
                "the comparison is missing"
            } else {
                "its report.json is used as written, with the exit status recorded"
            }
        ));
    }
    c
}

/// The comparison from `vmm-bench report`'s report.json, whatever its exit
/// status: a non-zero exit (1: a checksum mismatch or a path that failed)
/// still leaves every row and skip reason in report.json, so it is used as
/// written and the status is recorded beside it (`exit_code`, or `signal`
/// when it was killed).
fn comparison(code: Option<i32>, signal: Option<i32>, report_json: Option<&str>) -> Value {
    let how = match (code, signal) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        (None, None) => "an unknown status".into(),
    };
    let mut v = match report_json.map(serde_json::from_str::<Value>) {
        Some(Ok(Value::Object(m))) => Value::Object(m),
        Some(_) => json!({
            "error": format!("vmm-bench report ended with {how} and its report.json did not parse")
        }),
        None => json!({
            "error": format!("vmm-bench report ended with {how} and wrote no report.json")
        }),
    };
    v["exit_code"] = json!(code);
    if signal.is_some() {
        v["signal"] = json!(signal);
    }
    v
}

/// Run the demo. With `json_out`, the report JSON (and nothing else) goes
/// there; otherwise the Markdown goes to stdout. The report directory is
/// printed on stderr as `report: PATH` either way, and is in the JSON as
/// `report_dir`.
pub fn run(out_root: &Path, with_bench: bool, json_out: Option<std::fs::File>) -> Result<i32> {
    let started = Instant::now();
    let progress = Progress::new("demo");
    let stamp = chrono_like_stamp();
    let out = out_root.join(format!("demo-{stamp}"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;

    // 1–2. The guest kernel, the sample fix, the guest run.
    let part = guest_part(&progress, &out);
    if let Some(e) = &part.error {
        progress.note(format!(
            "the guest part failed; the report says so: {}",
            e.lines().next().unwrap_or("")
        ));
    }
    let steps = part
        .outcome
        .as_ref()
        .map(|g| parse_steps(&g.stdout))
        .unwrap_or_default();
    let overhead_lines: Vec<Value> = step_text(&steps, "overhead")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    std::fs::write(out.join("overhead.jsonl"), step_text(&steps, "overhead"))?;

    // 3. The host-side comparison.
    let bench = if with_bench {
        progress.step("vmm-bench report --quick (host)");
        host_comparison(&progress, &out.join("vmm-bench"))
    } else {
        json!({ "not_run": "--no-bench" })
    };

    // 4. The report.
    let guest = match &part.outcome {
        Some(g) => json!({
            "kernel": g.release,
            "accel": g.accel,
            "accel_reason": g.accel_reason,
            "boot": g.boot,
            "timings": g.timings,
            "status": g.status,
            "error": part.error,
        }),
        None => json!({ "kernel": part.kernel, "error": part.error }),
    };
    let report = json!({
        "livehost_demo": 1,
        "report_dir": out.display().to_string(),
        "guest": guest,
        "livepatch": {
            "module": part.fix.as_ref().and_then(|f| f.file_name()).map(|n| n.to_string_lossy().into_owned()),
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
            "window": observer_window(&overhead_lines, &step_json(&steps, "load")),
            "phases": observer_phases(&overhead_lines, &step_json(&steps, "load")),
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
    match json_out {
        Some(mut f) => {
            use std::io::Write;
            writeln!(f, "{}", serde_json::to_string_pretty(&report)?)?;
        }
        None => println!("{md}"),
    }
    eprintln!("report: {}", out.display());
    let ok = part.error.is_none() && report["livepatch"]["took_effect"] == json!(true);
    Ok(if ok { 0 } else { livehost_common::exit::ERROR })
}

/// The wall-clock span the observer's intervals cover (each interval ends at
/// its `ts_unix_ms` and lasted `interval_s`), and whether it contains the
/// whole `hotpatch load` (its `started_unix_ms`..`finished_unix_ms`): the
/// figures beside the patch are only "over the same window" when it does.
/// Both clocks are the guest's, so they compare directly.
fn observer_window(intervals: &[Value], load: &Value) -> Value {
    let start = intervals
        .first()
        .and_then(|i| Some(i["ts_unix_ms"].as_f64()? - i["interval_s"].as_f64()? * 1e3));
    let end = intervals.last().and_then(|i| i["ts_unix_ms"].as_f64());
    let load_start = load["started_unix_ms"].as_f64();
    let load_end = load["finished_unix_ms"].as_f64();
    let covers_load = match (start, end, load_start, load_end) {
        (Some(s), Some(e), Some(ls), Some(le)) => Some(s <= ls && le <= e),
        _ => None,
    };
    json!({
        "start_unix_ms": start,
        "end_unix_ms": end,
        "load_start_unix_ms": load_start,
        "load_end_unix_ms": load_end,
        "covers_load": covers_load,
    })
}

/// Where an interval lies against the load: "before" it started, "after"
/// it finished, "during" when they overlap; None without timestamps.
fn phase_of(interval: &Value, load: &Value) -> Option<&'static str> {
    let end = interval["ts_unix_ms"].as_f64()?;
    let start = end - interval["interval_s"].as_f64()? * 1e3;
    let (ls, le) = (
        load["started_unix_ms"].as_f64()?,
        load["finished_unix_ms"].as_f64()?,
    );
    Some(if end <= ls {
        "before"
    } else if start >= le {
        "after"
    } else {
        "during"
    })
}

/// The observer's per-cgroup figures before, during and after the load:
/// what the patch cost the workloads, against what they paid anyway.
fn observer_phases(intervals: &[Value], load: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for phase in ["before", "during", "after"] {
        let these: Vec<&Value> = intervals
            .iter()
            .filter(|i| phase_of(i, load) == Some(phase))
            .collect();
        let seconds: f64 = these.iter().filter_map(|i| i["interval_s"].as_f64()).sum();
        let cgroups: Vec<Value> = aggregate(&these)
            .into_iter()
            .map(|(path, a)| {
                json!({
                    "path": path,
                    "container": (!a.container.is_empty()).then_some(a.container),
                    "cpu_ns": a.cpu_ns,
                    "rq_waits": a.waits,
                    "rq_p99_ns": a.p99,
                    "rq_max_ns": a.max,
                })
            })
            .collect();
        out.insert(
            phase.into(),
            json!({ "intervals": these.len(), "seconds": seconds, "cgroups": cgroups }),
        );
    }
    Value::Object(out)
}

/// UTC `YYYYmmdd-HHMMSS` without a date crate.
fn chrono_like_stamp() -> String {
    let secs = livehost_common::unix_ms() / 1000;
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
    if let Some(e) = g["error"].as_str() {
        let _ = writeln!(
            s,
            "> **The guest part failed**, so this report is partial: {}\n",
            e.lines().next().unwrap_or("")
        );
        let _ = writeln!(s, "```\n{}\n```\n", e.trim_end());
    }
    let _ = writeln!(
        s,
        "Guest kernel `{}` under **{}** ({}).\n",
        g["kernel"].as_str().unwrap_or("?"),
        g["accel"].as_str().unwrap_or("not started").to_uppercase(),
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
    for line in load_rows(load) {
        let _ = writeln!(s, "{line}");
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
        "{} intervals, {window:.1} s, recorded by `overhead record` in the guest; {} \
         (TCG: scheduler figures are real, their scale is emulation's).\n",
        intervals.len(),
        match r["observer"]["window"]["covers_load"].as_bool() {
            Some(true) => "the window contains the whole `hotpatch load`",
            Some(false) => "**the window does not contain the whole `hotpatch load`**",
            None => "its overlap with the load is unknown (no timestamps)",
        }
    );
    let _ = writeln!(
        s,
        "| cgroup | container | CPU time | run-queue waits | p99 wait | max wait | waited most behind |\n|---|---|---|---|---|---|---|"
    );
    for row in observer_rows(&intervals) {
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(s);
    phase_table(&mut s, &r["observer"]["phases"]);
    let _ = writeln!(s, "## VM vs container vs unikernel (host)\n");
    let c = &r["comparison"];
    if let Some(e) = c.get("error").or(c.get("not_run")) {
        let _ = writeln!(s, "Not available: {}\n", e.as_str().unwrap_or(""));
    } else {
        if let Some(code) = c["exit_code"].as_i64().filter(|&c| c != 0) {
            let _ = writeln!(
                s,
                "> `vmm-bench report` exited with {code}{}; its tables below are as it wrote them.\n",
                if code == 1 {
                    " (a checksum mismatch or a path that failed: see its Checksums table and Skipped list)"
                } else {
                    ""
                }
            );
        }
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

/// Before / during / after the load, per cgroup that had a container name
/// or ran most (the rest is in report.json): CPU share, waits per second,
/// p99 and max wait.
fn phase_table(s: &mut String, phases: &Value) {
    let during = phases["during"]["intervals"].as_u64().unwrap_or(0);
    if during == 0 {
        let _ = writeln!(
            s,
            "No observer interval overlaps the load, so there is no before/during/after split.\n"
        );
        return;
    }
    let _ = writeln!(
        s,
        "Before, during and after the load (each interval counted in the phase it overlaps; \
         \"during\" holds the whole intervals the load touched):\n"
    );
    let _ = writeln!(
        s,
        "| phase | intervals | cgroup | CPU (% of one CPU) | waits/s | p99 wait | max wait |\n|---|---|---|---|---|---|---|"
    );
    for phase in ["before", "during", "after"] {
        let p = &phases[phase];
        let secs = p["seconds"].as_f64().unwrap_or(0.0);
        let n = p["intervals"].as_u64().unwrap_or(0);
        if n == 0 || secs <= 0.0 {
            let _ = writeln!(s, "| {phase} | 0 | — | | | | |");
            continue;
        }
        let mut rows: Vec<&Value> = p["cgroups"].as_array().into_iter().flatten().collect();
        rows.sort_by_key(|c| std::cmp::Reverse(c["cpu_ns"].as_u64().unwrap_or(0)));
        // The containers, and whoever ran most if that is not one of them.
        let shown = rows
            .iter()
            .enumerate()
            .filter(|(i, c)| *i == 0 || !c["container"].is_null());
        for (_, c) in shown {
            let _ = writeln!(
                s,
                "| {phase} | {n} ({secs:.1} s) | `{}` | {:.0}% | {:.0} | {:.2} ms | {:.2} ms |",
                c["path"].as_str().unwrap_or("?"),
                c["cpu_ns"].as_f64().unwrap_or(0.0) / (secs * 1e9) * 100.0,
                c["rq_waits"].as_f64().unwrap_or(0.0) / secs,
                c["rq_p99_ns"].as_f64().unwrap_or(0.0) / 1e6,
                c["rq_max_ns"].as_f64().unwrap_or(0.0) / 1e6,
            );
        }
    }
    let _ = writeln!(s);
}

/// The Markdown rows for `hotpatch load --measure`'s JSON (hotpatch's
/// `LoadReport`: `load_syscall_ms`, `transition_ms`, and `measure` with
/// `transition` / `baseline` windows, `added_stall_us` and the
/// `environment` the numbers were taken in). The largest stall always gets
/// a row: its number and environment, or why there is none.
fn load_rows(load: &Value) -> Vec<String> {
    let mut rows = Vec::new();
    for (label, key) in [
        ("load syscall (`finit_module`)", "load_syscall_ms"),
        ("transition time", "transition_ms"),
    ] {
        if let Some(v) = load.get(key).filter(|v| v.is_number()) {
            rows.push(format!("| {label} | {} |", fmt_num(v, "ms")));
        }
    }
    let m = &load["measure"];
    let env = m["environment"]["label"]
        .as_str()
        .map(|l| l.replace('|', "\\|"));
    let stall = &m["transition"]["spin_max_gap_us"];
    match (stall.as_f64(), &env) {
        (Some(_), Some(env)) => rows.push(format!(
            "| largest stall during transition | {} (a spinning thread's longest time off the CPU; measured on {env}) |",
            fmt_num(stall, "µs")
        )),
        (Some(_), None) => rows.push(format!(
            "| largest stall during transition | {} (environment not reported) |",
            fmt_num(stall, "µs")
        )),
        (None, _) => rows.push(format!(
            "| largest stall during transition | not measured: {} |",
            if load.is_null() {
                "no `hotpatch load --measure` output"
            } else {
                "`hotpatch load --measure` reported no measurement"
            }
        )),
    }
    for (label, v, unit) in [
        (
            "largest stall, baseline (same probe, no patching)",
            &m["baseline"]["spin_max_gap_us"],
            "µs",
        ),
        ("added stall", &m["added_stall_us"], "µs"),
        (
            "worst 1 ms sleep overshoot during transition",
            &m["transition"]["sleep_max_overshoot_us"],
            "µs",
        ),
    ] {
        if v.is_number() {
            rows.push(format!("| {label} | {} |", fmt_num(v, unit)));
        }
    }
    rows
}

/// One cgroup's figures summed over some of the observer's intervals.
#[derive(Default)]
struct Agg {
    container: String,
    cpu_ns: u64,
    waits: u64,
    /// The largest of the intervals' p99s (an upper bound of the whole p99).
    p99: u64,
    max: u64,
    behind: BTreeMap<String, u64>,
}

fn aggregate(intervals: &[&Value]) -> BTreeMap<String, Agg> {
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
            a.max = a.max.max(g["rq_interval_max_ns"].as_u64().unwrap_or(0));
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
    by
}

/// One Markdown row per cgroup, summed over the observer's intervals.
fn observer_rows(intervals: &[Value]) -> Vec<String> {
    let by = aggregate(&intervals.iter().collect::<Vec<_>>());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observer_window_must_contain_the_load() {
        let iv = |end: f64, len: f64| json!({ "ts_unix_ms": end, "interval_s": len });
        let ivs = [iv(12_000.0, 2.0), iv(14_000.0, 2.0), iv(16_000.0, 2.0)];
        let load = |a: f64, b: f64| json!({ "started_unix_ms": a, "finished_unix_ms": b });
        let w = observer_window(&ivs, &load(11_000.0, 15_500.0));
        assert_eq!(w["start_unix_ms"], 10_000.0);
        assert_eq!(w["end_unix_ms"], 16_000.0);
        assert_eq!(w["covers_load"], true);
        // Began before the observer's first interval, or ended after its last.
        assert_eq!(
            observer_window(&ivs, &load(9_999.0, 12_000.0))["covers_load"],
            false
        );
        assert_eq!(
            observer_window(&ivs, &load(15_000.0, 16_001.0))["covers_load"],
            false
        );
        // Nothing to compare: unknown, not a pass.
        assert!(observer_window(&[], &load(1.0, 2.0))["covers_load"].is_null());
        assert!(observer_window(&ivs, &Value::Null)["covers_load"].is_null());
    }

    #[test]
    fn intervals_are_split_before_during_and_after_the_load() {
        let iv = |end: f64, cpu: u64| {
            json!({ "ts_unix_ms": end, "interval_s": 2.0, "cgroups": [
                { "path": "/app", "container": "livehost:app", "cpu_ns": cpu,
                  "rq_waits": 4, "rq_p99_ns": cpu / 10, "rq_interval_max_ns": cpu / 5 }
            ]})
        };
        // Intervals (10,12] (12,14] (14,16] (16,18]; the load spans 13.0-13.5.
        let ivs = [
            iv(12_000.0, 100),
            iv(14_000.0, 200),
            iv(16_000.0, 300),
            iv(18_000.0, 400),
        ];
        let load = json!({ "started_unix_ms": 13_000.0, "finished_unix_ms": 13_500.0 });
        assert_eq!(phase_of(&ivs[0], &load), Some("before"));
        assert_eq!(phase_of(&ivs[1], &load), Some("during"));
        assert_eq!(phase_of(&ivs[2], &load), Some("after"));
        assert_eq!(phase_of(&ivs[0], &Value::Null), None);
        let p = observer_phases(&ivs, &load);
        assert_eq!(p["before"]["intervals"], 1);
        assert_eq!(p["during"]["intervals"], 1);
        assert_eq!(p["after"]["intervals"], 2);
        assert_eq!(p["after"]["seconds"], 4.0);
        let after = &p["after"]["cgroups"][0];
        assert_eq!(after["cpu_ns"], 700);
        assert_eq!(after["rq_waits"], 8);
        assert_eq!(after["rq_max_ns"], 80);
        assert_eq!(after["container"], "livehost:app");
        // A load that spans two intervals makes both "during".
        let long = json!({ "started_unix_ms": 13_900.0, "finished_unix_ms": 14_100.0 });
        assert_eq!(observer_phases(&ivs, &long)["during"]["intervals"], 2);
        let mut md = String::new();
        phase_table(&mut md, &p);
        assert!(md.contains("| during | 1 (2.0 s) | `/app` |"), "{md}");
        let mut md = String::new();
        phase_table(&mut md, &observer_phases(&ivs, &Value::Null));
        assert!(md.contains("No observer interval overlaps"), "{md}");
    }

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
    fn largest_stall_row_uses_hotpatchs_keys() {
        // The shape `hotpatch --json load --measure` prints (LoadReport).
        let load = json!({
            "load_syscall_ms": 12.5,
            "transition_ms": 1500.0,
            "measure": {
                "environment": { "kind": "vm-tcg", "label": "QEMU TCG guest" },
                "transition": { "spin_max_gap_us": 4321.0, "sleep_max_overshoot_us": 900.0 },
                "baseline": { "spin_max_gap_us": 1234.0 },
                "added_stall_us": 3087.0
            }
        });
        let rows = load_rows(&load).join("\n");
        assert!(
            rows.contains("| load syscall (`finit_module`) | 12.50 ms |"),
            "{rows}"
        );
        assert!(rows.contains("| transition time | 1500 ms |"), "{rows}");
        assert!(
            rows.contains("| largest stall during transition | 4321 µs")
                && rows.contains("measured on QEMU TCG guest"),
            "{rows}"
        );
        assert!(
            rows.contains("| largest stall, baseline (same probe, no patching) | 1234 µs |"),
            "{rows}"
        );
        assert!(rows.contains("| added stall | 3087 µs |"), "{rows}");
        // No measurement: the row says so instead of vanishing.
        let rows = load_rows(&Value::Null).join("\n");
        assert!(
            rows.contains("largest stall during transition | not measured"),
            "{rows}"
        );
    }

    #[test]
    fn comparison_keeps_a_failed_reports_rows_and_status() {
        let c = comparison(
            Some(1),
            None,
            Some(r#"{"rows":[{"path":"native"}],"checks":[]}"#),
        );
        assert_eq!(c["exit_code"], 1);
        assert_eq!(c["rows"][0]["path"], "native");
        assert!(c.get("error").is_none());
        let c = comparison(None, Some(9), None);
        assert!(c["error"].as_str().unwrap().contains("signal 9"), "{c}");
        assert_eq!(c["signal"], 9);
        let c = comparison(Some(1), None, Some("{truncated"));
        assert!(
            c["error"].as_str().unwrap().contains("did not parse"),
            "{c}"
        );
        let md = markdown(
            &json!({ "guest": {}, "livepatch": {}, "observer": {}, "comparison": {"exit_code": 1, "rows": []} }),
            "# vmm-bench report\n\n## Checksums\n",
        );
        assert!(md.contains("`vmm-bench report` exited with 1"), "{md}");
        assert!(md.contains("### Checksums"), "{md}");
    }

    #[test]
    fn a_failed_guest_part_is_stated() {
        let md = markdown(
            &json!({
                "guest": { "kernel": null, "error": "vmm-bench is not built\nmore" },
                "livepatch": { "load": null },
                "observer": {},
                "comparison": { "not_run": "--no-bench" }
            }),
            "",
        );
        assert!(md.contains("**The guest part failed**"), "{md}");
        assert!(md.contains("vmm-bench is not built"), "{md}");
        assert!(md.contains("not measured"), "{md}");
    }

    #[test]
    fn stamp_shape() {
        let s = chrono_like_stamp();
        assert_eq!(s.len(), 15);
        assert_eq!(&s[8..9], "-");
    }
}
