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

/// Take the host-wide lock, waiting up to `wait` for another run to
/// finish; the error names the holder so the user knows whom to wait for.
/// The state directory is checked first: hotpatch loads modules from it.
pub fn lock(paths: &Paths, wait: Duration) -> Result<Lock> {
    use std::os::unix::fs::OpenOptionsExt;
    check_state_dir(&paths.state)?;
    let path = paths.lock();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let deadline = Instant::now() + wait;
    // O_NOFOLLOW: a link planted at the lock's path is never followed (nor
    // the file it points at truncated).
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
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

/// Create the state directory (0755) or insist that the one there is a
/// real directory, owned by us (root), not writable by group or others:
/// modules are loaded from it, so anyone who can write there can run code
/// in the kernel.
pub fn check_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let refuse = |why: String| {
        anyhow::anyhow!(
            "refusing state directory {}: {why}; hotpatch loads kernel modules from it",
            dir.display()
        )
    };
    let m = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .with_context(|| format!("cannot create state directory {}", dir.display()));
        }
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", dir.display())),
    };
    if m.file_type().is_symlink() {
        return Err(refuse(
            "it is a symbolic link (name the directory itself)".into(),
        ));
    }
    if !m.is_dir() {
        return Err(refuse("it is not a directory".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(refuse(format!(
            "it is owned by uid {}, not by uid {me} (root)",
            m.uid()
        )));
    }
    if m.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "it is group- or world-writable (mode {:o}): `chmod go-w {}`",
            m.mode() & 0o7777,
            dir.display()
        )));
    }
    Ok(())
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
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
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
    /// The boot it was loaded in: a record from another boot describes a
    /// module that is gone, whatever now has its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The patch's description, version and CVE ids.
    #[serde(default)]
    pub meta: crate::module::PatchMeta,
    /// GNU build id of the module as the kernel holds it (sysfs notes):
    /// a module of the same name loaded since by something else (rmmod,
    /// insmod) has another, and the record no longer describes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_build_id: Option<String>,
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

/// Replace `path` with `data` so that after a crash or power cut it holds
/// either the old or the new content, never a torn or empty file: write a
/// fresh temporary file (O_EXCL, O_NOFOLLOW: never through a planted link),
/// fsync it, rename it over `path`, fsync the directory.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, 0o600)
}

/// [`write_atomic`] with the file's permission bits (a metrics file other
/// users' collectors read).
pub(crate) fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().context("path has no parent")?;
    std::fs::create_dir_all(dir)?;
    let base = path.file_name().and_then(|n| n.to_str()).unwrap_or("x");
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".{base}.tmp{}.{nonce}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot replace {}", path.display()));
    }
    sync_dir(dir)
}

/// fsync a directory, so a rename or unlink in it survives a power cut.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

pub fn loaded_record(paths: &Paths, name: &str) -> Option<LoadedRecord> {
    check_name(name).ok()?;
    let t = std::fs::read_to_string(paths.loaded_dir().join(format!("{name}.json"))).ok()?;
    let r: LoadedRecord = serde_json::from_str(&t).ok()?;
    if let (Some(then), Some(now)) = (&r.boot_id, paths.boot_id())
        && *then != now
    {
        return None;
    }
    if let (Some(then), Some(now)) = (&r.module_build_id, paths.module_build_id(name))
        && *then != now
    {
        return None;
    }
    Some(r)
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
    /// The patch's description, version and CVE ids, kept from install.
    #[serde(default)]
    pub meta: crate::module::PatchMeta,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// The kernel release these modules are applied on.
    #[serde(alias = "kernel")]
    pub release: String,
    /// Load order at boot: install order, so stacks rebuild as they were.
    pub modules: Vec<Installed>,
    /// GNU build id of the kernel they were installed on, when that was the
    /// running one: a rebuild that keeps `uname -r` has another id, and
    /// patches built for other code must not be applied to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_build_id: Option<String>,
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
            kernel_build_id: None,
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
    check_release(release)?;
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    if crate::module::sha256_hex(&bytes) != sha256 {
        bail!("{} changed while it was being installed", file.display());
    }
    install_bytes(paths, release, name, &bytes, file)
}

/// The file name an installed module is stored under: by content, so a
/// reinstall never overwrites the file the current manifest names.
pub fn stored_name(name: &str, sha256: &str) -> String {
    format!("{name}-{sha256}.ko")
}

/// Store exactly `bytes` (the bytes that were hashed and inspected) for
/// `release` and record them in the manifest. The module file is durable
/// before the manifest names it, and the file it replaces is removed only
/// once the manifest no longer does, so a power cut at any point leaves a
/// manifest whose files are all there. A reinstall keeps the module's place
/// in the boot order.
pub fn install_bytes(
    paths: &Paths,
    release: &str,
    name: &str,
    bytes: &[u8],
    source: &Path,
) -> Result<Installed> {
    check_name(name)?;
    // What the stored bytes say about themselves (a file that cannot be
    // inspected was refused before it got here).
    let meta = crate::module::inspect(bytes)
        .map(|i| i.meta())
        .unwrap_or_default();
    let sha256 = crate::module::sha256_hex(bytes);
    let mut m = read_manifest(paths, release)?;
    let dir = paths.installed_dir(release);
    let fname = stored_name(name, &sha256);
    write_atomic(&dir.join(&fname), bytes)?;
    let entry = Installed {
        name: name.to_string(),
        file: fname,
        sha256,
        installed_unix_ms: livehost_common::unix_ms(),
        installed_by: actor(),
        meta,
        source: std::fs::canonicalize(source)
            .unwrap_or_else(|_| source.to_path_buf())
            .display()
            .to_string(),
    };
    if paths.release().ok().as_deref() == Some(release) {
        m.kernel_build_id = paths.kernel_build_id().or(m.kernel_build_id);
    }
    let old = match m.modules.iter_mut().find(|e| e.name == name) {
        Some(e) => Some(std::mem::replace(e, entry.clone())),
        None => {
            m.modules.push(entry.clone());
            None
        }
    };
    write_manifest(paths, &m)?;
    if let Some(old) = old
        && old.file != entry.file
        && plain_file_name(&old.file)
    {
        let _ = std::fs::remove_file(dir.join(&old.file));
        let _ = sync_dir(&dir);
    }
    Ok(entry)
}

/// A manifest's `file` is a bare file name in the release's directory:
/// never a path, a hidden file or anything but a `.ko`.
fn plain_file_name(f: &str) -> bool {
    f.len() <= 200
        && f.ends_with(".ko")
        && !f.starts_with('.')
        && f.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// Where the installed module `e` is, once its manifest `file` field is
/// checked to name a file inside the release's directory.
pub fn installed_file(paths: &Paths, release: &str, e: &Installed) -> Result<PathBuf> {
    if !plain_file_name(&e.file) {
        bail!(
            "the manifest for {release} gives {} the file {:?}, which is not a plain .ko file name in {}; refusing to use it (reinstall the module)",
            e.name,
            e.file,
            paths.installed_dir(release).display()
        );
    }
    Ok(paths.installed_dir(release).join(&e.file))
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
    if let Ok(f) = installed_file(paths, release, &e) {
        let _ = std::fs::remove_file(f);
        let _ = sync_dir(&paths.installed_dir(release));
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_paths() -> (tempfile::TempDir, Paths) {
        let d = tempfile::tempdir().unwrap();
        let p = Paths {
            state: d.path().join("state"),
            run: d.path().join("run"),
            ..Paths::default()
        };
        (d, p)
    }

    /// The lock is host-wide: a second state dir does not get a second
    /// lock (the kernel allows one transition at a time, full stop).
    #[test]
    fn one_lock_for_the_host_whatever_the_state_dir() {
        let (d, p) = tmp_paths();
        let other = Paths {
            state: d.path().join("other"),
            ..p.clone()
        };
        let _held = lock(&p, Duration::from_millis(10)).unwrap();
        let err = lock(&other, Duration::from_millis(60)).err().unwrap();
        assert!(err.to_string().contains("another hotpatch run"), "{err}");
    }

    /// A state dir others can write, a symlinked one, and a lock path that
    /// is a planted link are refused with the reason; the link's target is
    /// not touched.
    #[test]
    fn unsafe_state_dir_and_planted_lock_link_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (d, p) = tmp_paths();
        std::fs::create_dir_all(&p.state).unwrap();
        std::fs::set_permissions(&p.state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = format!("{:#}", lock(&p, Duration::ZERO).err().unwrap());
        assert!(e.contains("group- or world-writable (mode 777)"), "{e}");
        std::fs::set_permissions(&p.state, std::fs::Permissions::from_mode(0o755)).unwrap();
        let linked = Paths {
            state: d.path().join("link"),
            ..p.clone()
        };
        std::os::unix::fs::symlink(&p.state, &linked.state).unwrap();
        let e = format!("{:#}", lock(&linked, Duration::ZERO).err().unwrap());
        assert!(e.contains("symbolic link"), "{e}");
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        std::fs::create_dir_all(p.lock().parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&victim, p.lock()).unwrap();
        assert!(lock(&p, Duration::ZERO).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    }

    /// A load record from another boot (same name, maybe another module
    /// now) is not believed.
    #[test]
    fn a_load_record_from_another_boot_is_ignored() {
        let (d, mut p) = tmp_paths();
        p.proc = d.path().join("proc");
        std::fs::create_dir_all(p.proc.join("sys/kernel/random")).unwrap();
        std::fs::write(p.proc.join("sys/kernel/random/boot_id"), "b2\n").unwrap();
        let mut rec = LoadedRecord {
            name: "m".into(),
            sha256: "h".into(),
            path: "/x".into(),
            replace: None,
            loaded_unix_ms: 0,
            forced: false,
            boot_id: Some("b1".into()),
            meta: Default::default(),
            module_build_id: None,
        };
        save_loaded(&p, &rec).unwrap();
        assert!(loaded_record(&p, "m").is_none());
        rec.boot_id = Some("b2".into());
        save_loaded(&p, &rec).unwrap();
        assert_eq!(loaded_record(&p, "m"), Some(rec));
        assert!(
            p.loaded_dir().starts_with(&p.run),
            "runtime records live under the run dir"
        );
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

    /// Files are stored by content; a reinstall keeps the module's place
    /// in the boot order (install a, then b, both patching f: reinstalling
    /// a must not move it on top of b), and removes the file it replaced
    /// only after the manifest moved on.
    #[test]
    fn install_keeps_order_stores_by_content_and_uninstall_removes() {
        let (d, p) = tmp_paths();
        let ko = d.path().join("a.ko");
        let sha = |b: &[u8]| crate::module::sha256_hex(b);
        std::fs::write(&ko, b"one").unwrap();
        install(&p, "6.1", "a", &sha(b"one"), &ko).unwrap();
        std::fs::write(&ko, b"bee").unwrap();
        install(&p, "6.1", "b", &sha(b"bee"), &ko).unwrap();
        std::fs::write(&ko, b"two").unwrap();
        install(&p, "6.1", "a", &sha(b"two"), &ko).unwrap();
        let m = read_manifest(&p, "6.1").unwrap();
        let order: Vec<&str> = m.modules.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(order, ["a", "b"], "reinstall moved a");
        assert_eq!(m.modules[0].sha256, sha(b"two"));
        assert_eq!(m.modules[0].file, format!("a-{}.ko", sha(b"two")));
        let dir = p.installed_dir("6.1");
        assert_eq!(std::fs::read(dir.join(&m.modules[0].file)).unwrap(), b"two");
        assert!(!dir.join(format!("a-{}.ko", sha(b"one"))).exists());
        assert_eq!(std::fs::read(dir.join(&m.modules[1].file)).unwrap(), b"bee");
        // A file that changed since it was hashed is not stored.
        assert!(install(&p, "6.1", "c", &sha(b"xyz"), &ko).is_err());
        uninstall(&p, "6.1", "a").unwrap();
        assert!(!dir.join(format!("a-{}.ko", sha(b"two"))).exists());
        let err = uninstall(&p, "6.1", "zz").unwrap_err().to_string();
        assert!(err.contains("installed: b"), "{err}");
        // Other kernels are separate.
        assert!(read_manifest(&p, "6.2").unwrap().modules.is_empty());
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    /// A manifest `file` that is not a bare .ko name in the release's
    /// directory is never used as a path.
    #[test]
    fn manifest_file_field_is_validated() {
        let (_d, p) = tmp_paths();
        let e = |f: &str| Installed {
            name: "a".into(),
            file: f.into(),
            sha256: "h".into(),
            installed_unix_ms: 0,
            installed_by: "root".into(),
            meta: Default::default(),
            source: "/x".into(),
        };
        for bad in [
            "../../etc/shadow",
            "/etc/passwd",
            "a/b.ko",
            ".a.ko",
            "a.sh",
            "",
        ] {
            let err = installed_file(&p, "6.1", &e(bad)).unwrap_err().to_string();
            assert!(err.contains("not a plain .ko file name"), "{bad}: {err}");
        }
        let ok = installed_file(&p, "6.1", &e("a-00ff.ko")).unwrap();
        assert_eq!(ok, p.installed_dir("6.1").join("a-00ff.ko"));
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
                boot_id: None,
                meta: Default::default(),
                module_build_id: None,
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
