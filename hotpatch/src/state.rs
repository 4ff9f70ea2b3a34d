//! hotpatch's own state: an exclusive lock so two runs never interleave, a
//! JSON-lines journal of every change, records of what hotpatch loaded, and
//! the per-kernel set of installed modules re-applied at boot.

use crate::paths::Paths;
use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a run waits for another to release the lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Held for the duration of an operation; released on drop.
pub struct Lock {
    _flock: Flock<File>,
}

/// Take the state directory's lock, waiting up to `wait` for another run to
/// finish; the error names the holder so the user knows whom to wait for.
pub fn lock(paths: &Paths, wait: Duration) -> Result<Lock> {
    std::fs::create_dir_all(&paths.state)
        .with_context(|| format!("cannot create state directory {}", paths.state.display()))?;
    let path = paths.lock();
    let deadline = Instant::now() + wait;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut fl) => {
                // The pid is informational (for the error below); the flock is
                // what excludes, and the kernel drops it if we die.
                let _ = fl.set_len(0);
                let _ = fl.rewind();
                let _ = write!(fl, "{}", std::process::id());
                return Ok(Lock { _flock: fl });
            }
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                file = f;
                if Instant::now() >= deadline {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    bail!(
                        "another hotpatch run (pid {}) holds {}; waited {:.0?}. Let it finish, or check it is still alive",
                        holder.trim(),
                        path.display(),
                        wait
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
        }
    }
}

/// Timestamps are integer milliseconds since the epoch (`*_unix_ms`).
/// hotpatch before that wrote float seconds under `time`, `loaded_at` and
/// `installed_at`; those fields are read through a serde alias and this
/// conversion, so records written by an older hotpatch stay readable. The
/// old writer always wrote a JSON float and the new one an integer, so the
/// number's form says which unit it is in.
fn unix_ms_or_legacy_secs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stamp {
        Ms(u64),
        Secs(f64),
    }
    Ok(match Stamp::deserialize(d)? {
        Stamp::Ms(ms) => ms,
        Stamp::Secs(s) => (s * 1e3).round().max(0.0) as u64,
    })
}

/// Who is doing this: the sudo caller when there is one, else the user.
pub fn actor() -> String {
    if let Ok(u) = std::env::var("SUDO_USER") {
        return u;
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
            })
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

/// What a journal line records.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum JournalOp {
    Load,
    /// `load --installed` as a whole (a skipped boot re-apply); each module
    /// it loads is journalled as a `load`.
    LoadInstalled,
    Enable,
    Disable,
    Unload,
    Install,
    Uninstall,
}

/// How the change a journal line records ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum JournalResult {
    Ok,
    /// Preflight refused; nothing changed.
    Refused,
    RolledBack,
    Error,
    /// Left in transition (`--no-rollback`).
    Stalled,
    /// Forced through (`--force`).
    Forced,
    /// Stalled, and so did the reverse: half-applied, mid-transition.
    ReverseStalled,
    /// Reversed/disabled, but the kernel did not free the patch.
    NotFreed,
    /// Freed, but the module could not be removed.
    NotRemoved,
    /// `--force` write refused, or the forced transition timed out.
    ForceFailed,
    /// A signal arrived mid-transition; reversed, the kernel as before.
    Interrupted,
    /// Written just before the kernel is changed; the entry with the
    /// outcome follows. One with no outcome after it is a run that died
    /// mid-change (SIGKILL, power cut): the next run reconciles it.
    Begin,
    /// What the next run found and did about an unfinished `Begin`.
    Reconciled,
}

impl JournalOp {
    pub fn as_str(self) -> &'static str {
        match self {
            JournalOp::Load => "load",
            JournalOp::LoadInstalled => "load-installed",
            JournalOp::Enable => "enable",
            JournalOp::Disable => "disable",
            JournalOp::Unload => "unload",
            JournalOp::Install => "install",
            JournalOp::Uninstall => "uninstall",
        }
    }
}

impl JournalResult {
    pub fn as_str(self) -> &'static str {
        match self {
            JournalResult::Ok => "ok",
            JournalResult::Refused => "refused",
            JournalResult::RolledBack => "rolled-back",
            JournalResult::Error => "error",
            JournalResult::Stalled => "stalled",
            JournalResult::Forced => "forced",
            JournalResult::ReverseStalled => "reverse-stalled",
            JournalResult::NotFreed => "not-freed",
            JournalResult::NotRemoved => "not-removed",
            JournalResult::ForceFailed => "force-failed",
            JournalResult::Interrupted => "interrupted",
            JournalResult::Begin => "begin",
            JournalResult::Reconciled => "reconciled",
        }
    }

    /// `Ok` or `Error`, for a change that either happened or did not.
    pub fn of<T, E>(r: &Result<T, E>) -> JournalResult {
        if r.is_ok() {
            JournalResult::Ok
        } else {
            JournalResult::Error
        }
    }
}

impl std::fmt::Display for JournalOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::fmt::Display for JournalResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One line of `journal.jsonl`, and of `hotpatch journal --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalEntry {
    #[serde(alias = "time", deserialize_with = "unix_ms_or_legacy_secs")]
    pub time_unix_ms: u64,
    pub user: String,
    pub op: JournalOp,
    pub module: Option<String>,
    pub sha256: Option<String>,
    pub result: JournalResult,
    pub duration_ms: Option<f64>,
    pub detail: serde_json::Value,
}

/// Append one line to the journal. A failure to journal is reported but does
/// not undo the operation it records (that already happened in the kernel).
pub fn journal(paths: &Paths, e: &JournalEntry) -> Result<()> {
    std::fs::create_dir_all(&paths.state)?;
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(paths.journal())
        .with_context(|| format!("cannot open journal {}", paths.journal().display()))?;
    let mut line = serde_json::to_string(e)?;
    line.push('\n');
    // One write call per line so concurrent appenders never interleave a line.
    f.write_all(line.as_bytes())?;
    // On disk before the kernel is changed: a "begin" that a power cut
    // loses cannot be reconciled.
    f.sync_data()?;
    Ok(())
}

/// Journal that `op` on `module` is about to change the kernel. The entry
/// with its outcome follows; a `begin` with none after it is a run that
/// died mid-change, which the next run reconciles.
pub fn begin(paths: &Paths, op: JournalOp, module: &str, sha: Option<&str>) -> Vec<String> {
    record(
        paths,
        op,
        Some(module),
        sha,
        JournalResult::Begin,
        None,
        serde_json::json!({ "pid": std::process::id() }),
    )
}

/// Journal one change, stamped with the time and who made it. Returns the
/// warning to show when the journal could not be written.
pub fn record(
    paths: &Paths,
    op: JournalOp,
    module: Option<&str>,
    sha: Option<&str>,
    result: JournalResult,
    duration_ms: Option<f64>,
    detail: serde_json::Value,
) -> Vec<String> {
    let e = JournalEntry {
        time_unix_ms: livehost_common::unix_ms(),
        user: actor(),
        op,
        module: module.map(String::from),
        sha256: sha.map(String::from),
        result,
        duration_ms,
        detail,
    };
    match journal(paths, &e) {
        Ok(()) => Vec::new(),
        Err(err) => vec![format!("warning: could not write the journal: {err:#}")],
    }
}

pub fn read_journal(paths: &Paths) -> Result<Vec<JournalEntry>> {
    let text = match std::fs::read_to_string(paths.journal()) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("cannot read journal"),
    };
    // A torn last line (power loss) is skipped, not fatal.
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// What hotpatch loaded under a module name, so later runs can tell whether
/// a loaded patch is a given file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoadedRecord {
    pub name: String,
    pub sha256: String,
    pub path: String,
    pub replace: Option<bool>,
    #[serde(alias = "loaded_at", deserialize_with = "unix_ms_or_legacy_secs")]
    pub loaded_unix_ms: u64,
    /// The transition was forced: the kernel keeps a reference to the module
    /// forever, so it can never be removed.
    #[serde(default)]
    pub forced: bool,
}

/// Refuse a module name that is not one: names become file names under the
/// state directory, so `../` or `/` must never get that far.
pub fn check_name(name: &str) -> Result<()> {
    if !crate::module::is_module_name(name) {
        bail!("{name:?} is not a module name (1 to 55 letters, digits, '_' or '-')");
    }
    Ok(())
}

/// A kernel release as a directory name (`6.1.0-56-cloud-amd64`,
/// `6.12.117+deb13-cloud-amd64`): it may come from a module's vermagic.
pub fn check_release(release: &str) -> Result<()> {
    let ok = !release.is_empty()
        && release.len() <= 64
        && !release.starts_with('.')
        && release
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b));
    if !ok {
        bail!("{release:?} is not a kernel release name");
    }
    Ok(())
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().context("path has no parent")?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
        std::process::id()
    ));
    std::fs::write(&tmp, data).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

pub fn loaded_record(paths: &Paths, name: &str) -> Option<LoadedRecord> {
    check_name(name).ok()?;
    let t = std::fs::read_to_string(paths.loaded_dir().join(format!("{name}.json"))).ok()?;
    serde_json::from_str(&t).ok()
}

pub fn save_loaded(paths: &Paths, r: &LoadedRecord) -> Result<()> {
    check_name(&r.name)?;
    write_atomic(
        &paths.loaded_dir().join(format!("{}.json", r.name)),
        &serde_json::to_vec_pretty(r)?,
    )
}

pub fn forget_loaded(paths: &Paths, name: &str) {
    if check_name(name).is_err() {
        return;
    }
    let _ = std::fs::remove_file(paths.loaded_dir().join(format!("{name}.json")));
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Installed {
    pub name: String,
    /// File name inside the release's directory.
    pub file: String,
    pub sha256: String,
    #[serde(alias = "installed_at", deserialize_with = "unix_ms_or_legacy_secs")]
    pub installed_unix_ms: u64,
    pub installed_by: String,
    pub source: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// The kernel release these modules are applied on.
    #[serde(alias = "kernel")]
    pub release: String,
    /// Load order at boot: install order, so stacks rebuild as they were.
    pub modules: Vec<Installed>,
}

pub fn manifest_path(paths: &Paths, release: &str) -> PathBuf {
    paths.installed_dir(release).join("manifest.json")
}

pub fn read_manifest(paths: &Paths, release: &str) -> Result<Manifest> {
    check_release(release)?;
    let p = manifest_path(paths, release);
    match std::fs::read_to_string(&p) {
        Ok(t) => serde_json::from_str(&t)
            .with_context(|| format!("{} is corrupt; fix or delete it and reinstall", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest {
            release: release.to_string(),
            modules: Vec::new(),
        }),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

pub fn write_manifest(paths: &Paths, m: &Manifest) -> Result<()> {
    check_release(&m.release)?;
    write_atomic(
        &manifest_path(paths, &m.release),
        &serde_json::to_vec_pretty(m)?,
    )
}

/// Copy `file` into the release's directory and add it to the manifest,
/// replacing an earlier install of the same module name.
pub fn install(
    paths: &Paths,
    release: &str,
    name: &str,
    sha256: &str,
    file: &Path,
) -> Result<Installed> {
    check_name(name)?;
    let mut m = read_manifest(paths, release)?;
    let dir = paths.installed_dir(release);
    let fname = format!("{name}.ko");
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    write_atomic(&dir.join(&fname), &bytes)?;
    let entry = Installed {
        name: name.to_string(),
        file: fname,
        sha256: sha256.to_string(),
        installed_unix_ms: livehost_common::unix_ms(),
        installed_by: actor(),
        source: std::fs::canonicalize(file)
            .unwrap_or_else(|_| file.to_path_buf())
            .display()
            .to_string(),
    };
    m.modules.retain(|e| e.name != name);
    m.modules.push(entry.clone());
    write_manifest(paths, &m)?;
    Ok(entry)
}

pub fn uninstall(paths: &Paths, release: &str, name: &str) -> Result<Installed> {
    check_name(name)?;
    let mut m = read_manifest(paths, release)?;
    let Some(pos) = m.modules.iter().position(|e| e.name == name) else {
        let have: Vec<&str> = m.modules.iter().map(|e| e.name.as_str()).collect();
        bail!(
            "{name} is not installed for kernel {release} (installed: {})",
            if have.is_empty() {
                "none".to_string()
            } else {
                have.join(", ")
            }
        );
    };
    let e = m.modules.remove(pos);
    write_manifest(paths, &m)?;
    let _ = std::fs::remove_file(paths.installed_dir(release).join(&e.file));
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_paths() -> (tempfile::TempDir, Paths) {
        let d = tempfile::tempdir().unwrap();
        let p = Paths {
            state: d.path().join("state"),
            ..Paths::default()
        };
        (d, p)
    }

    #[test]
    fn lock_excludes_second_taker_and_names_holder() {
        let (_d, p) = tmp_paths();
        let held = lock(&p, Duration::from_millis(10)).unwrap();
        let err = lock(&p, Duration::from_millis(100))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&std::process::id().to_string()), "{err}");
        drop(held);
        assert!(lock(&p, Duration::from_millis(10)).is_ok());
    }

    #[test]
    fn journal_appends_and_skips_torn_line() {
        let (_d, p) = tmp_paths();
        let e = JournalEntry {
            time_unix_ms: 1000,
            user: "t".into(),
            op: JournalOp::Load,
            module: Some("m".into()),
            sha256: None,
            result: JournalResult::Ok,
            duration_ms: Some(3.0),
            detail: serde_json::json!({}),
        };
        journal(&p, &e).unwrap();
        journal(&p, &e).unwrap();
        let mut f = OpenOptions::new().append(true).open(p.journal()).unwrap();
        f.write_all(b"{\"time\": 3, \"us").unwrap();
        let j = read_journal(&p).unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!(j[1].op, JournalOp::Load);
    }

    #[test]
    fn install_replaces_same_name_and_uninstall_removes() {
        let (d, p) = tmp_paths();
        let ko = d.path().join("a.ko");
        std::fs::write(&ko, b"one").unwrap();
        install(&p, "6.1", "a", "h1", &ko).unwrap();
        std::fs::write(&ko, b"two").unwrap();
        install(&p, "6.1", "a", "h2", &ko).unwrap();
        install(&p, "6.1", "b", "h3", &ko).unwrap();
        let m = read_manifest(&p, "6.1").unwrap();
        assert_eq!(m.modules.len(), 2);
        assert_eq!(m.modules[1].name, "b");
        assert_eq!(m.modules[0].sha256, "h2");
        assert_eq!(
            std::fs::read(p.installed_dir("6.1").join("a.ko")).unwrap(),
            b"two"
        );
        uninstall(&p, "6.1", "a").unwrap();
        assert!(!p.installed_dir("6.1").join("a.ko").exists());
        let err = uninstall(&p, "6.1", "zz").unwrap_err().to_string();
        assert!(err.contains("installed: b"), "{err}");
        // Other kernels are separate.
        assert!(read_manifest(&p, "6.2").unwrap().modules.is_empty());
    }

    /// A name or release that would leave the state dir is refused before
    /// any path is built from it, and nothing is written.
    #[test]
    fn names_and_releases_cannot_leave_the_state_dir() {
        let (d, p) = tmp_paths();
        let ko = d.path().join("a.ko");
        std::fs::write(&ko, b"one").unwrap();
        for bad in ["../../../a", "a/b", "..", "", "a\0b"] {
            let e = install(&p, "6.1", bad, "h", &ko).unwrap_err().to_string();
            assert!(e.contains("not a module name"), "{e}");
            assert!(uninstall(&p, "6.1", bad).is_err());
            assert!(loaded_record(&p, bad).is_none());
            forget_loaded(&p, bad);
            let rec = LoadedRecord {
                name: bad.into(),
                sha256: "h".into(),
                path: "/x".into(),
                replace: None,
                loaded_unix_ms: 0,
                forced: false,
            };
            assert!(save_loaded(&p, &rec).is_err());
        }
        for bad in ["../x", "a/b", ".", "..", "", ".hidden", "6.1 x"] {
            let e = install(&p, bad, "a", "h", &ko).unwrap_err().to_string();
            assert!(e.contains("not a kernel release"), "{e}");
        }
        // Nothing was written anywhere under the temp dir but the module.
        let mut left = Vec::new();
        for e in std::fs::read_dir(d.path()).unwrap() {
            left.push(e.unwrap().file_name().to_string_lossy().into_owned());
        }
        assert_eq!(left, ["a.ko"]);
        assert!(check_release("6.12.117+deb13-cloud-amd64").is_ok());
        assert!(check_release("6.1.0-56-cloud-amd64").is_ok());
    }

    /// State written by hotpatch before timestamps were `*_unix_ms` and the
    /// manifest's release was `kernel`: still read, seconds made milliseconds.
    #[test]
    fn old_state_files_are_read() {
        let (_d, p) = tmp_paths();
        std::fs::create_dir_all(&p.state).unwrap();
        std::fs::write(
            p.journal(),
            concat!(
                r#"{"time":1733212345.678,"user":"root","op":"load","module":"m","sha256":null,"result":"rolled-back","duration_ms":null,"detail":{}}"#,
                "\n"
            ),
        )
        .unwrap();
        let j = read_journal(&p).unwrap();
        assert_eq!(j[0].time_unix_ms, 1_733_212_345_678);
        assert_eq!(j[0].result, JournalResult::RolledBack);
        let new = serde_json::to_value(&j[0]).unwrap();
        assert_eq!(new["time_unix_ms"], 1_733_212_345_678u64);
        assert!(new.get("time").is_none());

        std::fs::create_dir_all(p.loaded_dir()).unwrap();
        std::fs::write(
            p.loaded_dir().join("m.json"),
            r#"{"name":"m","sha256":"h","path":"/x","replace":null,"loaded_at":1733212345.5}"#,
        )
        .unwrap();
        assert_eq!(
            loaded_record(&p, "m").unwrap().loaded_unix_ms,
            1_733_212_345_500
        );

        std::fs::create_dir_all(p.installed_dir("6.1")).unwrap();
        std::fs::write(
            manifest_path(&p, "6.1"),
            r#"{"kernel":"6.1","modules":[{"name":"a","file":"a.ko","sha256":"h","installed_at":2.25,"installed_by":"root","source":"/a.ko"}]}"#,
        )
        .unwrap();
        let m = read_manifest(&p, "6.1").unwrap();
        assert_eq!(m.release, "6.1");
        assert_eq!(m.modules[0].installed_unix_ms, 2250);
    }

    #[test]
    fn corrupt_manifest_is_a_clear_error() {
        let (_d, p) = tmp_paths();
        std::fs::create_dir_all(p.installed_dir("6.1")).unwrap();
        std::fs::write(manifest_path(&p, "6.1"), b"{nope").unwrap();
        let e = format!("{:#}", read_manifest(&p, "6.1").unwrap_err());
        assert!(e.contains("corrupt"), "{e}");
    }
}
