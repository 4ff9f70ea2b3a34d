//! The demo scenario; see the crate docs for the steps. This module runs
//! them in order and writes the report directory.

mod comparison;
mod guest;
mod markdown;
mod observer;
mod report;

use anyhow::{Context, Result, bail};
use comparison::Comparison;
use livehost_common::progress::Progress;
use observer::Observer;
use report::{GuestSummary, Livepatch, Report};
use std::path::{Path, PathBuf};
use std::time::Instant;

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

/// Run the demo. With `json_out`, the report JSON (and nothing else) goes
/// there; otherwise the Markdown goes to stdout. The report directory is
/// printed on stderr as `report: PATH` either way, and is in the JSON as
/// `report_dir`.
pub fn run(out_root: &Path, with_bench: bool, json_out: Option<std::fs::File>) -> Result<i32> {
    let started = Instant::now();
    let progress = Progress::new("demo");
    let out = out_root.join(format!("demo-{}", chrono_like_stamp()));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;

    // 1–2. The guest kernel, the sample fix, the guest run.
    let part = guest::guest_part(&progress, &out);
    if let Some(e) = &part.error {
        progress.note(format!(
            "the guest part failed; the report says so: {}",
            e.lines().next().unwrap_or("")
        ));
    }
    let steps = part.steps();
    std::fs::write(out.join("overhead.jsonl"), steps.text("overhead"))?;
    let livepatch = Livepatch::from_steps(&steps, part.fix.as_deref(), &progress);
    let observer = Observer::from_steps(&steps, livepatch.load_report(), &progress);

    // 3. The host-side comparison.
    let comparison = if with_bench {
        progress.step("vmm-bench report --quick (host)");
        comparison::host_comparison(&progress, &out.join("vmm-bench"))
    } else {
        Comparison::not_run("--no-bench")
    };

    // 4. The report.
    let report = Report {
        livehost_demo: 1,
        report_dir: out.display().to_string(),
        guest: GuestSummary::of(&part),
        livepatch,
        observer,
        comparison,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(out.join("report.json"), &json)?;
    let bench_md = std::fs::read_to_string(out.join("vmm-bench/report.md")).unwrap_or_default();
    let md = markdown::render(&report, &bench_md);
    std::fs::write(out.join("report.md"), &md)?;
    progress.finish();
    match json_out {
        Some(mut f) => {
            use std::io::Write;
            writeln!(f, "{json}")?;
        }
        None => println!("{md}"),
    }
    eprintln!("report: {}", out.display());
    let ok = part.error.is_none() && report.livepatch.took_effect;
    Ok(if ok { 0 } else { livehost_common::exit::ERROR })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_shape() {
        let s = chrono_like_stamp();
        assert_eq!(s.len(), 15);
        assert_eq!(&s[8..9], "-");
    }
}
