//! Guest kernels: which one, where it comes from, and the local cache.
//!
//! Debian kernels are fetched with `apt-get download` through a private apt
//! configuration kept under the cache directory, so the host's own sources
//! are never read or changed, and unpacked with `dpkg -x` (nothing is
//! installed on the host). Each kernel lives in `<cache>/<abi>_<version>/`
//! with the image, its modules (after `depmod`), and its kbuild headers.

use anyhow::{Context, Result, anyhow, bail};
use livehost_common::progress::Progress;
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

/// Which guest kernel to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSpec {
    /// A Debian cloud kernel from a suite's archive (`debian:bookworm-cloud`).
    Debian { suite: DebianSuite },
    /// A local kernel image with an optional modules tree (`/lib/modules/<ver>`)
    /// and config; written `PATH[,modules=DIR][,config=FILE]`.
    Local {
        bzimage: PathBuf,
        modules: Option<PathBuf>,
        config: Option<PathBuf>,
    },
}

/// The Debian suites we know how to fetch kernels from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebianSuite {
    /// Debian 12, linux 6.1 LTS.
    Bookworm,
    /// Debian 13, linux 6.12 LTS.
    Trixie,
}

impl DebianSuite {
    pub fn name(self) -> &'static str {
        match self {
            DebianSuite::Bookworm => "bookworm",
            DebianSuite::Trixie => "trixie",
        }
    }
}

impl Default for KernelSpec {
    fn default() -> Self {
        KernelSpec::Debian {
            suite: DebianSuite::Bookworm,
        }
    }
}

impl fmt::Display for KernelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelSpec::Debian { suite } => write!(f, "debian:{}-cloud", suite.name()),
            KernelSpec::Local { bzimage, .. } => write!(f, "{}", bzimage.display()),
        }
    }
}

impl FromStr for KernelSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "debian" | "debian:bookworm" | "debian:bookworm-cloud" | "bookworm" => {
                return Ok(KernelSpec::Debian {
                    suite: DebianSuite::Bookworm,
                });
            }
            "debian:trixie" | "debian:trixie-cloud" | "trixie" => {
                return Ok(KernelSpec::Debian {
                    suite: DebianSuite::Trixie,
                });
            }
            _ => {}
        }
        if s.starts_with("debian:") {
            bail!(
                "unknown kernel {s:?}: known Debian kernels are debian:bookworm-cloud (6.1, the default) \
                 and debian:trixie-cloud (6.12); or give a path to a bzImage, optionally \
                 PATH,modules=DIR,config=FILE"
            );
        }
        let mut parts = s.split(',');
        let bzimage = PathBuf::from(parts.next().unwrap_or_default());
        let mut modules = None;
        let mut config = None;
        for p in parts {
            match p.split_once('=') {
                Some(("modules", v)) => modules = Some(PathBuf::from(v)),
                Some(("config", v)) => config = Some(PathBuf::from(v)),
                _ => bail!(
                    "kernel {s:?}: unknown option {p:?} (expected modules=DIR or config=FILE)"
                ),
            }
        }
        if !bzimage.is_file() {
            bail!(
                "unknown kernel {s:?}: not a Debian kernel name (debian:bookworm-cloud, debian:trixie-cloud) \
                 and no such file"
            );
        }
        Ok(KernelSpec::Local {
            bzimage,
            modules,
            config,
        })
    }
}

/// A kernel ready to boot: image, modules and (for Debian kernels) headers.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// The kernel release, as `uname -r` prints it in the guest.
    pub release: String,
    /// The Debian package version, when the kernel came from Debian.
    pub package_version: Option<String>,
    pub bzimage: PathBuf,
    /// `lib/modules/<version>` with `modules.dep`, when modules exist.
    pub modules_dir: Option<PathBuf>,
    /// A kbuild tree usable as `make -C <dir> M=<module dir>`.
    pub headers_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

impl GuestKernel {
    /// Whether the kernel config sets `name` (`CONFIG_X=y` or `=m`).
    pub fn has_config(&self, name: &str) -> bool {
        self.config_value(name)
            .is_some_and(|v| v == "y" || v == "m")
    }

    /// The value of a config option, `None` when unset or unknown.
    pub fn config_value(&self, name: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.config.as_ref()?).ok()?;
        let key = format!("{name}=");
        text.lines().find_map(|l| {
            l.strip_prefix(&key)
                .map(|v| v.trim_matches('"').to_string())
        })
    }

    /// Fail with the list of missing options when the config lacks any of
    /// `names`; an unknown config (local kernel without one) is an error too,
    /// because a test that needs a feature should not boot blind.
    pub fn require_config(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        if self.config.is_none() {
            bail!(
                "kernel {} has no known config, so {} cannot be checked: pass config=FILE with the kernel path",
                self.release,
                names.join(", ")
            );
        }
        let missing: Vec<&str> = names
            .iter()
            .map(|n| n.as_str())
            .filter(|n| !self.has_config(n))
            .collect();
        if !missing.is_empty() {
            bail!(
                "kernel {} lacks {} (not set to y or m in its config {}): choose a kernel built with them",
                self.release,
                missing.join(", "),
                self.config.as_ref().unwrap().display()
            );
        }
        Ok(())
    }
}

/// The directory kernels and apt state are cached in: `$LIVEHOST_CACHE`, or
/// `target/kernels` of this workspace.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LIVEHOST_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d).join("kernels");
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("target")
        .join("kernels")
}

/// Fetch (or find in the cache) the kernel `spec` names.
pub fn fetch(spec: &KernelSpec) -> Result<GuestKernel> {
    fetch_with(spec, &Progress::new("kernel"))
}

/// [`fetch`] with a caller-provided progress reporter.
pub fn fetch_with(spec: &KernelSpec, progress: &Progress) -> Result<GuestKernel> {
    match spec {
        KernelSpec::Debian { suite } => fetch_debian(*suite, &cache_dir(), progress),
        KernelSpec::Local {
            bzimage,
            modules,
            config,
        } => local_kernel(bzimage, modules.as_deref(), config.as_deref()),
    }
}

fn local_kernel(
    bzimage: &Path,
    modules: Option<&Path>,
    config: Option<&Path>,
) -> Result<GuestKernel> {
    if !bzimage.is_file() {
        bail!("kernel image {} does not exist", bzimage.display());
    }
    let version = match modules {
        Some(m) => m
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| anyhow!("modules dir {} has no name", m.display()))?,
        None => bzimage_version(bzimage).unwrap_or_else(|| "unknown".into()),
    };
    if let Some(m) = modules
        && !m.join("modules.dep").is_file()
    {
        bail!(
            "{} has no modules.dep: run `depmod -b ROOT {version}` on its tree first",
            m.display()
        );
    }
    Ok(GuestKernel {
        release: version,
        package_version: None,
        bzimage: bzimage.to_path_buf(),
        modules_dir: modules.map(Path::to_path_buf),
        headers_dir: None,
        config: config.map(Path::to_path_buf),
    })
}

/// The release string a bzImage carries in its setup header (offset 0x20e
/// points at it, relative to 0x200), so a bare image can still be named.
fn bzimage_version(path: &Path) -> Option<String> {
    let data = std::fs::read(path).ok()?;
    if data.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let off = u16::from_le_bytes([*data.get(0x20e)?, *data.get(0x20f)?]) as usize + 0x200;
    let tail = data.get(off..off.checked_add(256)?.min(data.len()))?;
    let end = tail.iter().position(|&b| b == 0 || b == b' ')?;
    Some(String::from_utf8_lossy(&tail[..end]).into_owned())
}

/// A private apt setup for one Debian suite: its own sources, lists and
/// cache, and an empty dpkg status so the host's package state is never read.
///
/// The host's apt configuration is not read either: `APT_CONFIG` points at
/// our own file, which moves apt's main file and parts directory to empty
/// private ones. Otherwise a host `apt.conf.d` entry (a `Pre-Invoke` hook
/// run as root, `AllowUnauthenticated`, a proxy) would apply to our
/// downloads, because `-o` options only override the keys they name.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    fn new(cache: &Path, suite: DebianSuite) -> Result<Self> {
        let dir = cache.join("apt").join(suite.name());
        for sub in [
            "lists/partial",
            "cache/archives/partial",
            "etc/preferences.d",
            "etc/sources.list.d",
            "etc/apt.conf.d",
        ] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let s = suite.name();
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        if !Path::new(keyring).exists() {
            bail!("{keyring} is missing: install the debian-archive-keyring package");
        }
        let sources = format!(
            "deb [signed-by={keyring}] http://deb.debian.org/debian {s} main\n\
             deb [signed-by={keyring}] http://deb.debian.org/debian {s}-updates main\n\
             deb [signed-by={keyring}] http://deb.debian.org/debian-security {s}-security main\n"
        );
        std::fs::write(dir.join("etc/sources.list"), sources)?;
        std::fs::write(dir.join("status"), "")?;
        std::fs::write(dir.join("etc/apt.conf"), private_apt_conf(&dir))?;
        Ok(PrivateApt { dir })
    }

    /// An apt command (`apt-get`, `apt-cache`, `apt-config`) that reads only
    /// our configuration.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", self.dir.join("etc/apt.conf"));
        c.args(self.args());
        c
    }

    fn args(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::SourceList={d}/etc/sources.list"),
            format!("-oDir::Etc::SourceParts={d}/etc/sources.list.d"),
            format!("-oDir::Etc::Preferences={d}/etc/preferences"),
            format!("-oDir::Etc::PreferencesParts={d}/etc/preferences.d"),
            format!("-oDir::State::Lists={d}/lists"),
            format!("-oDir::State::status={d}/status"),
            format!("-oDir::Cache={d}/cache"),
            "-oAcquire::Retries=3".into(),
            "-oDebug::NoLocking=1".into(),
        ]
    }

    /// Time since our last successful `update` (apt stamps list files with
    /// the server's dates, so we keep our own stamp).
    fn lists_age(&self) -> Option<Duration> {
        let m = self.dir.join("updated").metadata().ok()?.modified().ok()?;
        SystemTime::now().duration_since(m).ok()
    }

    fn update(&self) -> Result<()> {
        let out = self
            .command("apt-get")
            .args(["-q", "update"])
            .output()
            .context("cannot run apt-get: is this a Debian system with apt?")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success()
            || stderr.contains("Failed to fetch")
            || stderr.contains("Could not resolve")
        {
            bail!(
                "apt-get update for the private Debian package lists failed; check the network to \
                 deb.debian.org:\n{}",
                stderr.trim()
            );
        }
        std::fs::write(self.dir.join("updated"), b"")?;
        Ok(())
    }

    fn cache_cmd(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(args)
            .output()
            .context("cannot run apt-cache")?;
        if !out.status.success() {
            bail!(
                "apt-cache {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The candidate version of a package, if the lists know it.
    fn candidate(&self, pkg: &str) -> Option<String> {
        let text = self.cache_cmd(&["policy", pkg]).ok()?;
        let v = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:"))?
            .trim()
            .to_string();
        (v != "(none)" && !v.is_empty()).then_some(v)
    }

    /// One field of a package version's record.
    fn field(&self, pkg: &str, version: &str, field: &str) -> Result<String> {
        let text = self.cache_cmd(&["show", &format!("{pkg}={version}")])?;
        let key = format!("{field}:");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| anyhow!("package {pkg} {version} has no {field} field"))
    }

    /// Download `pkg` at `version` into `dest`, re-fetching a cached file
    /// whose SHA-256 does not match the archive's.
    fn download(
        &self,
        pkg: &str,
        version: &str,
        dest: &Path,
        progress: &Progress,
    ) -> Result<PathBuf> {
        let filename = self.field(pkg, version, "Filename")?;
        let sha = self.field(pkg, version, "SHA256")?;
        let base = Path::new(&filename)
            .file_name()
            .ok_or_else(|| anyhow!("bad Filename {filename}"))?;
        let path = dest.join(base);
        if path.is_file() {
            if sha256_file(&path)? == sha {
                return Ok(path);
            }
            progress.note(format!(
                "{} is corrupt (checksum mismatch); fetching it again",
                path.display()
            ));
            std::fs::remove_file(&path)?;
        }
        progress.step(format!("downloading {pkg} {version}"));
        let out = self
            .command("apt-get")
            .args(["-q", "download", &format!("{pkg}={version}")])
            .current_dir(dest)
            .output()
            .context("cannot run apt-get download")?;
        if !out.status.success() || !path.is_file() {
            bail!(
                "could not download {pkg} {version} from deb.debian.org: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if sha256_file(&path)? != sha {
            let _ = std::fs::remove_file(&path);
            bail!(
                "downloaded {} does not match the archive's SHA-256; try again",
                path.display()
            );
        }
        Ok(path)
    }
}

/// The file `APT_CONFIG` names: apt reads it first, then the main file and
/// the parts directory it names, so pointing both at empty private places
/// leaves the host's `/etc/apt/apt.conf{,.d}` unread. Downloads run as apt's
/// default unprivileged sandbox user (`_apt`), as the host's apt would.
fn private_apt_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "Dir::Etc::Main \"/dev/null\";\n\
         Dir::Etc::Parts \"{d}/etc/apt.conf.d\";\n\
         APT::Sandbox::User \"_apt\";\n\
         Acquire::AllowInsecureRepositories \"false\";\n\
         Acquire::AllowDowngradeToInsecureRepositories \"false\";\n\
         APT::Get::AllowUnauthenticated \"false\";\n"
    )
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// The package names a Depends line lists, without versions or alternatives.
fn depends_names(line: &str) -> Vec<String> {
    line.split(',')
        .filter_map(|d| d.split('|').next())
        .filter_map(|d| d.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

const READY: &str = ".livehost-ready";

fn fetch_debian(suite: DebianSuite, cache: &Path, progress: &Progress) -> Result<GuestKernel> {
    std::fs::create_dir_all(cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let _lock = livehost_common::lock::FileLock::acquire(&cache.join(".fetch.lock"))?;
    let apt = PrivateApt::new(cache, suite)?;
    let stale = apt
        .lists_age()
        .is_none_or(|age| age > Duration::from_secs(24 * 3600));
    if stale {
        progress.step(format!(
            "updating private package lists for Debian {}",
            suite.name()
        ));
        if let Err(e) = apt.update() {
            // Offline with a kernel already cached: use it rather than fail.
            if let Some(k) = newest_cached(cache, suite) {
                progress.note(format!("{e:#}\nusing the cached kernel {}", k.release));
                return Ok(k);
            }
            return Err(e);
        }
    }
    let meta = "linux-image-cloud-amd64";
    let meta_ver = apt
        .candidate(meta)
        .ok_or_else(|| anyhow!("Debian {} has no {meta} package", suite.name()))?;
    let image_dep = depends_names(&apt.field(meta, &meta_ver, "Depends")?)
        .into_iter()
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| anyhow!("{meta} {meta_ver} depends on no linux-image package"))?;
    let abi = image_dep
        .trim_start_matches("linux-image-")
        .trim_end_matches("-unsigned")
        .to_string();
    let kdir = cache.join(format!("{abi}_{meta_ver}"));
    let root = kdir.join("root");
    if kdir.join(READY).is_file() {
        return Ok(debian_kernel(&root, &abi, &meta_ver));
    }

    // Prefer the unsigned image: same kernel, no secure-boot wrapper.
    let unsigned = format!("linux-image-{abi}-unsigned");
    let image_pkg = if apt.candidate(&unsigned).is_some() {
        unsigned
    } else {
        format!("linux-image-{abi}")
    };
    let headers_pkg = format!("linux-headers-{abi}");
    let mut pkgs = vec![image_pkg, headers_pkg.clone()];
    let hver = apt
        .candidate(&headers_pkg)
        .ok_or_else(|| anyhow!("Debian {} has no {headers_pkg}", suite.name()))?;
    for d in depends_names(&apt.field(&headers_pkg, &hver, "Depends")?) {
        if d.starts_with("linux-headers-") || d.starts_with("linux-kbuild-") {
            pkgs.push(d);
        }
    }
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    let mut files = Vec::new();
    for p in &pkgs {
        let v = apt
            .candidate(p)
            .ok_or_else(|| anyhow!("Debian {} has no {p}", suite.name()))?;
        files.push(apt.download(p, &v, &debs, progress)?);
    }

    let _ = std::fs::remove_dir_all(&kdir);
    unpack(&files, &root, &abi, progress)?;
    fix_headers(&root, &abi)?;
    std::fs::write(kdir.join(READY), format!("{abi} {meta_ver}\n"))?;
    Ok(debian_kernel(&root, &abi, &meta_ver))
}

/// Unpack the downloaded packages into `root` and index its modules.
fn unpack(files: &[PathBuf], root: &Path, abi: &str, progress: &Progress) -> Result<()> {
    std::fs::create_dir_all(root)?;
    for f in files {
        progress.step(format!(
            "unpacking {}",
            f.file_name().unwrap_or_default().to_string_lossy()
        ));
        let st = Command::new("dpkg")
            .args(["-x"])
            .arg(f)
            .arg(root)
            .status()
            .context("cannot run dpkg -x")?;
        if !st.success() {
            bail!(
                "dpkg -x {} failed: the file may be corrupt; delete it and retry",
                f.display()
            );
        }
    }
    // Trixie and later ship a merged /usr (modules in usr/lib/modules); give
    // depmod and our own lookups the classic lib/ path.
    if !root.join("lib").exists() && root.join("usr/lib").is_dir() {
        std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    }
    progress.step("running depmod");
    let st = Command::new("depmod")
        .arg("-b")
        .arg(root)
        .arg(abi)
        .status()
        .context("cannot run depmod: install the kmod package")?;
    if !st.success() {
        bail!("depmod -b {} {abi} failed", root.display());
    }
    Ok(())
}

/// Debian's headers Makefile includes the common tree by its installed
/// absolute path; point it at our unpacked copy instead.
fn fix_headers(root: &Path, abi: &str) -> Result<()> {
    let hdir = root.join("usr/src").join(format!("linux-headers-{abi}"));
    let mk = hdir.join("Makefile");
    let Ok(text) = std::fs::read_to_string(&mk) else {
        return Ok(());
    };
    let ours = root.join("usr/src");
    let fixed = text.replace("/usr/src/", &format!("{}/", ours.display()));
    std::fs::write(&mk, fixed)?;
    Ok(())
}

fn debian_kernel(root: &Path, abi: &str, pkgver: &str) -> GuestKernel {
    let headers = root.join("usr/src").join(format!("linux-headers-{abi}"));
    GuestKernel {
        release: abi.to_string(),
        package_version: Some(pkgver.to_string()),
        bzimage: root.join("boot").join(format!("vmlinuz-{abi}")),
        modules_dir: Some(root.join("lib/modules").join(abi)),
        headers_dir: headers.is_dir().then_some(headers),
        config: Some(root.join("boot").join(format!("config-{abi}"))),
    }
}

fn newest_cached(cache: &Path, suite: DebianSuite) -> Option<GuestKernel> {
    let series = match suite {
        DebianSuite::Bookworm => "6.1.",
        DebianSuite::Trixie => "6.12.",
    };
    let mut found: Vec<(SystemTime, GuestKernel)> = std::fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(READY).is_file())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (abi, ver) = name.split_once('_')?;
            if !abi.starts_with(series) {
                return None;
            }
            let t = e.path().join(READY).metadata().ok()?.modified().ok()?;
            Some((t, debian_kernel(&e.path().join("root"), abi, ver)))
        })
        .collect();
    found.sort_by_key(|(t, _)| *t);
    found.pop().map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Removes a planted host apt configuration file even if the test fails.
    struct Planted(PathBuf);
    impl Drop for Planted {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A host `apt.conf.d` entry must not reach the private apt: not its
    /// keys, not its `Pre-Invoke` hook (run as root), not its proxy (a dead
    /// port here, which would make the update fail if it were read).
    #[test]
    fn host_apt_configuration_does_not_reach_the_private_apt() {
        if !livehost_common::is_root() || !Path::new("/etc/apt/apt.conf.d").is_dir() {
            eprintln!("skipped: needs root and a Debian apt");
            return;
        }
        let scratch = tempfile::tempdir().unwrap();
        let marker = scratch.path().join("pre-invoke-ran");
        let planted = Planted(PathBuf::from(format!(
            "/etc/apt/apt.conf.d/99livehost-test-{}",
            std::process::id()
        )));
        std::fs::write(
            &planted.0,
            format!(
                "Livehost::Planted \"yes\";\n\
                 APT::Update::Pre-Invoke {{ \"touch {}\"; }};\n\
                 Acquire::http::Proxy \"http://127.0.0.1:9/\";\n",
                marker.display()
            ),
        )
        .unwrap();
        let apt = PrivateApt::new(scratch.path(), DebianSuite::Bookworm).unwrap();
        let dump = apt.command("apt-config").arg("dump").output().unwrap();
        let dump = String::from_utf8_lossy(&dump.stdout);
        assert!(!dump.contains("Livehost::Planted"), "{dump}");
        assert!(!dump.contains("127.0.0.1:9"), "{dump}");
        assert!(dump.contains("APT::Sandbox::User \"_apt\""), "{dump}");
        // The host's own apt does read it (so the plant is real).
        let host = Command::new("apt-config").arg("dump").output().unwrap();
        assert!(String::from_utf8_lossy(&host.stdout).contains("Livehost::Planted"));
        // A real update through the private config: no hook, no proxy.
        apt.update().unwrap();
        assert!(!marker.exists(), "the host's Pre-Invoke hook ran");
        drop(planted);
    }

    #[test]
    fn parses_names() {
        assert_eq!(
            KernelSpec::from_str("debian:bookworm-cloud").unwrap(),
            KernelSpec::default()
        );
        assert_eq!(
            KernelSpec::from_str("debian:trixie-cloud").unwrap(),
            KernelSpec::Debian {
                suite: DebianSuite::Trixie
            }
        );
        let e = KernelSpec::from_str("debian:sid-cloud")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown kernel"), "{e}");
        let e = KernelSpec::from_str("/nonexistent/bzImage")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such file"), "{e}");
    }

    #[test]
    fn depends_are_split() {
        assert_eq!(
            depends_names(
                "linux-headers-6.1.0-56-common (= 6.1.192-2), linux-kbuild-6.1 (>= 6.1.192-2), a | b"
            ),
            vec!["linux-headers-6.1.0-56-common", "linux-kbuild-6.1", "a"]
        );
    }

    #[test]
    fn bzimage_version_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0xffu8; 4096]).unwrap();
        assert_eq!(bzimage_version(&p), None);
        std::fs::write(&p, b"").unwrap();
        assert_eq!(bzimage_version(&p), None);
    }
}
