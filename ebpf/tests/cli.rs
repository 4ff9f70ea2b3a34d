//! The `overhead` binary end to end: JSON lines with the documented fields,
//! Prometheus scraping `overhead serve`, and refusals on bad input that
//! leave no program loaded.

mod util;

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

const OVERHEAD: &str = env!("CARGO_BIN_EXE_overhead");
const GUEST: &str = env!("CARGO_BIN_EXE_kvm-pio-guest");

/// The leak checks count loaded programs by name; tests in this file run
/// one at a time so they do not see each other's observers.
static SERIAL: Mutex<()> = Mutex::new(());

fn ours(names: &[String]) -> usize {
    names
        .iter()
        .filter(|n| n.starts_with("handle_kvm") || n.starts_with("handle_sched"))
        .count()
}

#[test]
fn record_json_has_the_documented_fields_and_counts_the_guest() {
    util::require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rec = Command::new(OVERHEAD)
        .args(["record", "--interval", "1", "--duration", "3", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Start the guest only once the observer says it is attached.
    let mut stderr = std::io::BufReader::new(rec.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(n > 0, "overhead exited before attaching: {seen}");
        seen.push_str(&line);
        if line.contains("attached") && line.contains("programs") {
            break;
        }
    }
    let guest = Command::new(GUEST).arg("2000").output().unwrap();
    assert!(
        guest.status.success(),
        "guest failed: {}",
        String::from_utf8_lossy(&guest.stderr)
    );
    let out = rec.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "record failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g: serde_json::Value = serde_json::from_slice(&guest.stdout).expect("guest JSON");
    let _ = stderr;
    let gpid = g["pid"].as_u64().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect();
    assert_eq!(lines.len(), 3, "one object per interval");
    // Readers (the demo) use the library's record types: every line reads
    // through them and writes back as the same JSON.
    for (l, v) in text.lines().zip(&lines) {
        let typed: livehost_ebpf::schema::Report =
            serde_json::from_str(l).expect("each line reads as schema::Report");
        assert_eq!(
            &serde_json::to_value(&typed).unwrap(),
            v,
            "round trip of {l}"
        );
    }
    for r in &lines {
        for f in [
            "schema",
            "ts_unix_ms",
            "interval_s",
            "vms",
            "cgroups",
            "noisy",
            "drops",
            "programs",
        ] {
            assert!(r.get(f).is_some(), "field {f} missing in {r}");
        }
        assert_eq!(r["schema"], 1);
        for c in r["cgroups"].as_array().unwrap() {
            for f in [
                "id",
                "path",
                "container",
                "cpu_ns",
                "rq_waits",
                "rq_sum_ns",
                "rq_p50_ns",
                "rq_p99_ns",
                "rq_max_ns",
                "rq_interval_max_ns",
                "preempted_by",
                "cpu_files",
                "noisy",
            ] {
                assert!(c.get(f).is_some(), "cgroup field {f} missing in {c}");
            }
        }
    }
    let io: u64 = lines
        .iter()
        .flat_map(|r| r["vms"].as_array().unwrap().iter())
        .filter(|vm| vm["pid"].as_u64() == Some(gpid))
        .flat_map(|vm| vm["vcpus"].as_array().unwrap().iter())
        .flat_map(|v| {
            for f in ["tid", "vcpu_id", "comm", "rq_delay_ns", "rq_waits", "exits"] {
                assert!(v.get(f).is_some(), "vcpu field {f} missing in {v}");
            }
            v["exits"].as_array().unwrap().iter()
        })
        .filter(|e| e["kind"] == "user" && e["name"] == "IO")
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        io, 2000,
        "the guest's 2000 IO exits, summed over intervals:\n{text}"
    );
}

#[test]
fn prometheus_scrapes_overhead_serve() {
    util::require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let port = util::free_port();
    let addr = format!("127.0.0.1:{port}");
    let _serve = util::KillOnDrop(
        Command::new(OVERHEAD)
            .args(["serve", "--listen", &addr, "--duration", "120"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let up = util::wait_for(Duration::from_secs(20), || {
        util::http_get(&addr, "/metrics", Duration::from_secs(2))
            .ok()
            .filter(|(s, b)| {
                s.contains("200") && b.contains("overhead_cgroup_cpu_seconds_total{cgroup=\"/\"")
            })
    });
    let (_, body) = up.expect("overhead serve answers /metrics");
    assert!(body.contains("# TYPE overhead_cgroup_runqueue_latency_seconds histogram"));
    assert!(body.contains("overhead_program_attached{program=\"handle_sched_switch\"} 1"));

    let dir = tempfile::tempdir().unwrap();
    let pport = util::free_port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: overhead\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let _prom = util::KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{pport}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package `prometheus`) must be installed"),
    );
    let paddr = format!("127.0.0.1:{pport}");
    let q = "/api/v1/query?query=overhead_cgroup_cpu_seconds_total";
    let got = util::wait_for(Duration::from_secs(60), || {
        let (status, body) = util::http_get(&paddr, q, Duration::from_secs(2)).ok()?;
        (status.contains("200")
            && body.contains("\"cgroup\":\"/\"")
            && body.contains("\"job\":\"overhead\""))
        .then_some(body)
    });
    assert!(
        got.is_some(),
        "Prometheus never returned the overhead series"
    );
    // The scrape itself is healthy.
    let up = util::http_get(&paddr, "/api/v1/query?query=up", Duration::from_secs(2))
        .unwrap()
        .1;
    assert!(
        up.contains("\"value\"") && up.contains("\"1\""),
        "scrape target not up: {up}"
    );
}

fn refused(args: &[&str], expect: &str) {
    let before = ours(&util::loaded_prog_names());
    let out = Command::new(OVERHEAD).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        err.contains(expect),
        "{args:?}: expected {expect:?} in {err}"
    );
    assert_eq!(
        ours(&util::loaded_prog_names()),
        before,
        "{args:?} left programs loaded"
    );
}

#[test]
fn bad_input_is_refused_clearly_and_leaves_nothing_loaded() {
    util::require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    refused(
        &["record", "--pid", "999999999", "--duration", "1"],
        "no process with pid 999999999",
    );
    refused(
        &["record", "--cgroup", "/no/such/cgroup", "--duration", "1"],
        "cgroup /no/such/cgroup does not exist",
    );
    refused(
        &["record", "--cgroup", "987654321987", "--duration", "1"],
        "no cgroup with id 987654321987",
    );
    refused(
        &["record", "--interval", "0"],
        "--interval must be a positive",
    );
    let empty = tempfile::tempdir().unwrap();
    let btf = empty.path().to_str().unwrap();
    refused(
        &["record", "--duration", "1", "--btf-dir", btf],
        "exposes no BTF",
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    refused(&["serve", "--listen", &addr], "pick another port");
    refused(
        &["serve", "--listen", "not-an-address"],
        "cannot listen on not-an-address",
    );
}

#[test]
fn unprivileged_run_is_refused_with_the_fix() {
    util::require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // setpriv drops to nobody with no capabilities (util-linux, always present).
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            OVERHEAD,
            "record",
            "--duration",
            "1",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "refused with exit 3: {err}");
    assert!(err.contains("CAP_BPF and CAP_PERFMON"), "{err}");
}

#[test]
fn help_teaches() {
    let out = Command::new(OVERHEAD).arg("--help").output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for w in ["top", "record", "serve", "Examples", "CAP_BPF"] {
        assert!(s.contains(w), "--help lacks {w}");
    }
}

#[test]
fn top_on_a_terminal_draws_the_tables_and_restores_the_terminal() {
    util::require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // `script` (util-linux) gives the command a pseudo-terminal.
    let cmd = format!("stty cols 160 rows 40; {OVERHEAD} top --interval 0.5 --iterations 2");
    let out = Command::new("timeout")
        .args(["30", "script", "-qec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "top on a pty failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = String::from_utf8_lossy(&out.stdout);
    assert!(
        raw.contains("\x1b[?1049h") && raw.contains("\x1b[?1049l"),
        "alternate screen entered and left"
    );
    // Strip escape sequences; ratatui moves the cursor between cells.
    let mut text = String::new();
    let mut esc = false;
    for c in raw.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, c) if c.is_ascii_alphabetic() => esc = false,
            (true, _) => {}
            (false, c) => text.push(c),
        }
    }
    let squeezed: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let all = livehost_ebpf::observer::PROGRAMS.len();
    for want in [
        "VMs/vCPUs(byhostcost:",
        "Cgroups(byrun-queuewait)",
        "WAITEDBEHIND",
        &format!("programs{all}/{all}"),
    ] {
        assert!(
            squeezed.contains(want),
            "{want} missing from the drawn screen: {squeezed}"
        );
    }
}

/// `serve --top 2` on a host where new cgroups keep appearing: at most 2
/// cgroups get series of their own plus `cgroup="other"`, and no scraped
/// CPU counter ever decreases across the churn.
#[test]
fn serve_top_bounds_cgroup_series_and_counters_never_decrease() {
    util::require_root();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let root = livehost_ebpf::cgroup::Resolver::new()
        .mounts
        .v2
        .expect("a cgroup v2 hierarchy");
    let port = util::free_port();
    let addr = format!("127.0.0.1:{port}");
    let _serve = util::KillOnDrop(
        Command::new(OVERHEAD)
            .args(["serve", "--listen", &addr, "--duration", "60", "--top", "2"])
            .args(["--containers-only"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let cpu_series = |body: &str| -> std::collections::BTreeMap<String, f64> {
        body.lines()
            .filter_map(|l| l.strip_prefix("overhead_cgroup_cpu_seconds_total{cgroup=\""))
            .filter_map(|l| {
                let (name, rest) = l.split_once('"')?;
                let v = rest.rsplit(' ').next()?.parse().ok()?;
                Some((name.to_string(), v))
            })
            .collect()
    };
    let mut last = std::collections::BTreeMap::<String, f64>::new();
    let mut dirs = RemovedOnDrop(Vec::new());
    for round in 0..6 {
        // A new cgroup with a short task in it, between scrapes.
        let dir = root.join(format!("livehost-test-{}-top{round}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let script = format!(
            "echo $$ > {}/cgroup.procs && i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
            dir.display()
        );
        Command::new("sh").args(["-c", &script]).status().unwrap();
        dirs.0.push(dir);
        let got = util::wait_for(Duration::from_secs(20), || {
            util::http_get(&addr, "/metrics", Duration::from_secs(2))
                .ok()
                .filter(|(s, b)| s.contains("200") && !cpu_series(b).is_empty())
        });
        let (_, body) = got.expect("overhead serve answers /metrics");
        let series = cpu_series(&body);
        assert!(series.len() <= 3, "round {round}: {series:?}");
        for (name, v) in &series {
            if let Some(prev) = last.get(name) {
                assert!(v >= prev, "{name} went back: {prev} -> {v}");
            }
        }
        last = series;
    }
    assert!(
        last.contains_key("other"),
        "new cgroups summed into other: {last:?}"
    );
}

/// Empty cgroup directories, removed (last first) even when a test fails.
struct RemovedOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}
