//! Cgroup ids to paths, paths to container names, and the cgroupfs files
//! that tell contention apart from self-inflicted throttling.
//!
//! The BPF side reports default-hierarchy (v2) cgroup ids. A v2 cgroup's id
//! is its directory's inode number, so ids are resolved by walking the v2
//! mount. On hybrid hosts (v1 controllers, v2 at /sys/fs/cgroup/unified) the
//! v2 tree has no cpu controller, so throttling falls back to the v1 cpu
//! controller's directory with the same relative path.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where the cgroup v2 hierarchy and the v1 cpu controller are mounted.
#[derive(Debug, Clone, Default)]
pub struct Mounts {
    pub v2: Option<PathBuf>,
    pub v1_cpu: Option<PathBuf>,
}

/// Parse /proc/self/mountinfo text. Unknown or short lines are skipped.
pub fn parse_mountinfo(text: &str) -> Mounts {
    let mut m = Mounts::default();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split_whitespace().collect();
        let rfields: Vec<&str> = right.split_whitespace().collect();
        let (Some(mnt), Some(fstype)) = (fields.get(4), rfields.first()) else {
            continue;
        };
        match *fstype {
            "cgroup2" if m.v2.is_none() => m.v2 = Some(PathBuf::from(mnt)),
            "cgroup" => {
                let opts = rfields.get(2).copied().unwrap_or("");
                if opts.split(',').any(|o| o == "cpu") && m.v1_cpu.is_none() {
                    m.v1_cpu = Some(PathBuf::from(mnt));
                }
            }
            _ => {}
        }
    }
    m
}

pub fn mounts() -> Mounts {
    livehost_common::sysfs::read_text("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// Id -> path cache over the v2 tree.
#[derive(Debug, Default)]
pub struct Resolver {
    pub mounts: Mounts,
    paths: HashMap<u64, String>,
    last_walk: Option<std::time::Instant>,
}

/// Unknown ids (cgroups created since the last walk, or already gone) start
/// a new walk at most this often, so a burst of short-lived cgroups costs
/// one walk per report, not one per id.
const REWALK_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// A bound on the walk so a huge or looping tree cannot stall a refresh.
const MAX_CGROUPS: usize = 100_000;

impl Resolver {
    pub fn new() -> Self {
        let mut r = Resolver {
            mounts: mounts(),
            paths: HashMap::new(),
            last_walk: None,
        };
        r.refresh();
        r
    }

    pub fn refresh(&mut self) {
        self.last_walk = Some(std::time::Instant::now());
        self.paths.clear();
        let Some(root) = self.mounts.v2.clone() else {
            return;
        };
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            if self.paths.len() >= MAX_CGROUPS {
                break;
            }
            let Ok(md) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = dir
                .strip_prefix(&root)
                .map(|p| p.to_string_lossy().into_owned());
            let rel = format!("/{}", rel.unwrap_or_default());
            self.paths.insert(md.ino(), rel);
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
    }

    /// Path of a cgroup id relative to the v2 root ("/" for the root), walking
    /// the tree again once if the id is new (cgroups come and go).
    pub fn path(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if !self.paths.contains_key(&id)
            && self.last_walk.is_none_or(|t| t.elapsed() >= REWALK_AFTER)
        {
            self.refresh();
        }
        self.paths.get(&id).cloned()
    }

    /// The root cgroup's id (1 on every kernel, but ask the filesystem).
    pub fn root_id(&self) -> u64 {
        self.mounts
            .v2
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.ino())
            .unwrap_or(1)
    }

    /// Turn a `--cgroup` argument (numeric id, path relative to the v2 root,
    /// or an absolute path under it) into an id, or say why not.
    pub fn lookup(&mut self, arg: &str) -> anyhow::Result<u64> {
        if let Ok(id) = arg.parse::<u64>() {
            if !self.paths.contains_key(&id) {
                self.refresh();
            }
            if self.paths.contains_key(&id) {
                return Ok(id);
            }
            anyhow::bail!("no cgroup with id {id} exists in the cgroup v2 hierarchy");
        }
        let Some(root) = self.mounts.v2.clone() else {
            anyhow::bail!("no cgroup v2 hierarchy is mounted; cannot resolve --cgroup {arg}");
        };
        let p = Path::new(arg);
        let full = if p.starts_with(&root) {
            p.to_path_buf()
        } else {
            root.join(arg.trim_start_matches('/'))
        };
        match std::fs::metadata(&full) {
            Ok(md) if md.is_dir() => Ok(md.ino()),
            _ => anyhow::bail!(
                "cgroup {arg} does not exist (looked for {}); list them with `ls {}`",
                full.display(),
                root.display()
            ),
        }
    }
}

/// A container name from a cgroup path, following the runtimes' naming
/// conventions; None for paths that are not a container's.
pub fn container_name(path: &str) -> Option<String> {
    let short = |id: &str| id.chars().take(12).collect::<String>();
    let is_hex_id = |s: &str| s.len() >= 32 && s.chars().all(|c| c.is_ascii_hexdigit());
    // Innermost matching component wins: a container's own scope is deeper
    // than the pod or slice holding it.
    for comp in path.rsplit('/') {
        if let Some(name) = livehost_common::container::name_from_leaf(comp) {
            return Some(format!("livehost:{name}"));
        }
        let stem = comp.strip_suffix(".scope").unwrap_or(comp);
        for (prefix, runtime) in [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "crio"),
            ("libpod-", "podman"),
        ] {
            if let Some(id) = stem.strip_prefix(prefix)
                && is_hex_id(id)
            {
                return Some(format!("{runtime}:{}", short(id)));
            }
        }
        if is_hex_id(stem) {
            // cgroupfs driver: /docker/<id>, /kubepods/.../<id>, /machine.slice/libpod-...
            let runtime = if path.contains("docker") {
                "docker"
            } else if path.contains("kubepods") {
                "k8s"
            } else {
                "container"
            };
            return Some(format!("{runtime}:{}", short(stem)));
        }
        if let Some(rest) = stem.strip_suffix(".slice")
            && let Some(pos) = rest.rfind("-pod")
            && rest.starts_with("kubepods")
        {
            return Some(format!("k8s-pod:{}", &rest[pos + 4..]));
        }
        if let Some(uid) = stem.strip_prefix("pod")
            && uid.len() >= 32
        {
            return Some(format!("k8s-pod:{uid}"));
        }
        if let Some(name) = comp.strip_suffix(".service") {
            return Some(format!("systemd:{name}"));
        }
    }
    None
}

/// Throttling and pressure, from cgroupfs; fields are None where the file
/// is absent (a v2 tree without the cpu controller, a kernel without PSI).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CpuFiles {
    pub nr_periods: Option<u64>,
    pub nr_throttled: Option<u64>,
    pub throttled_usec: Option<u64>,
    /// `cpu.pressure` "some" line: avg10 (percent) and total (µs).
    pub pressure_some_avg10: Option<f64>,
    pub pressure_some_total_usec: Option<u64>,
    /// Which hierarchy the throttling numbers came from: "v2" or "v1".
    pub source: Option<CpuSource>,
}

/// Which cgroup hierarchy a `cpu.stat` was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuSource {
    /// The unified hierarchy (`cpu.stat` with `throttled_usec`).
    V2,
    /// The v1 cpu controller (`cpu.stat` with `throttled_time` in ns).
    V1,
}

fn kv(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Parse cgroup v2 `cpu.stat` / v1 `cpu.stat` text into `out`.
pub fn parse_cpu_stat(text: &str, source: CpuSource, out: &mut CpuFiles) {
    out.nr_periods = kv(text, "nr_periods");
    out.nr_throttled = kv(text, "nr_throttled");
    out.throttled_usec = match source {
        CpuSource::V1 => kv(text, "throttled_time").map(|ns| ns / 1000),
        CpuSource::V2 => kv(text, "throttled_usec"),
    };
}

/// Parse `cpu.pressure` ("some avg10=0.00 avg60=0.00 avg300=0.00 total=0").
pub fn parse_pressure(text: &str, out: &mut CpuFiles) {
    let Some(line) = text.lines().find(|l| l.starts_with("some ")) else {
        return;
    };
    for field in line.split_whitespace().skip(1) {
        match field.split_once('=') {
            Some(("avg10", v)) => out.pressure_some_avg10 = v.parse().ok(),
            Some(("total", v)) => out.pressure_some_total_usec = v.parse().ok(),
            _ => {}
        }
    }
}

pub fn cpu_files(mounts: &Mounts, rel: &str) -> CpuFiles {
    let mut out = CpuFiles::default();
    let rel = rel.trim_start_matches('/');
    if let Some(v2) = &mounts.v2 {
        let dir = v2.join(rel);
        if let Ok(t) = livehost_common::sysfs::read_text(dir.join("cpu.stat"))
            && t.contains("nr_throttled")
        {
            parse_cpu_stat(&t, CpuSource::V2, &mut out);
            out.source = Some(CpuSource::V2);
        }
        if let Ok(t) = livehost_common::sysfs::read_text(dir.join("cpu.pressure")) {
            parse_pressure(&t, &mut out);
        }
    }
    if out.source.is_none()
        && let Some(v1) = &mounts.v1_cpu
    {
        // Where the cgroup's processes sit in the v1 cpu hierarchy, which
        // need not mirror the v2 path (a tool may manage only one of them);
        // the same path is the guess for a cgroup with no process.
        let member = mounts.v2.as_ref().and_then(|v2| {
            let procs =
                livehost_common::sysfs::read_text(v2.join(rel).join("cgroup.procs")).ok()?;
            let pid = procs.split_whitespace().next()?;
            let own = livehost_common::sysfs::read_text(format!("/proc/{pid}/cgroup")).ok()?;
            v1_cpu_path(&own)
        });
        for dir in member.iter().map(String::as_str).chain([rel]) {
            let dir = v1.join(dir.trim_start_matches('/'));
            if let Ok(t) = livehost_common::sysfs::read_text(dir.join("cpu.stat")) {
                parse_cpu_stat(&t, CpuSource::V1, &mut out);
                out.source = Some(CpuSource::V1);
                break;
            }
        }
    }
    out
}

/// Default-hierarchy cgroup path of a process ("0::/path" line).
pub fn pid_cgroup_path(pid: u32) -> Option<String> {
    let text = livehost_common::sysfs::read_text(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// The path of the v1 hierarchy holding the `cpu` controller, from a
/// /proc/PID/cgroup text (`ID:CONTROLLERS:PATH` lines).
pub fn v1_cpu_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        (controllers.split(',').any(|c| c == "cpu") && path.starts_with('/'))
            .then(|| path.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_hybrid_and_garbage() {
        let text = "25 20 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
30 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
garbage line\n - \n";
        let m = parse_mountinfo(text);
        assert_eq!(m.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(
            m.v1_cpu.as_deref(),
            Some(Path::new("/sys/fs/cgroup/cpu,cpuacct"))
        );
        let m = parse_mountinfo("\u{0}\u{1}xx - \n");
        assert!(m.v2.is_none() && m.v1_cpu.is_none());
    }

    #[test]
    fn v1_cpu_path_from_proc_cgroup() {
        let text = "12:pids:/user.slice\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/x\n0::/system.slice/docker-abc.scope\n";
        assert_eq!(v1_cpu_path(text).as_deref(), Some("/docker/abc"));
        // "cpuacct" or "cpuset" alone is not the cpu controller.
        assert_eq!(v1_cpu_path("3:cpuset:/a\n5:cpuacct:/b\n"), None);
        for garbage in [
            "",
            "::",
            "4:cpu",
            "4:cpu:relative",
            "\u{0}:cpu:\n",
            "x:y:z:w",
        ] {
            assert_eq!(v1_cpu_path(garbage), None, "{garbage:?}");
        }
        assert_eq!(v1_cpu_path("4:cpu:/a:b").as_deref(), Some("/a:b"));
    }

    #[test]
    fn container_names() {
        assert_eq!(
            container_name("/livehost-demo-app.scope").as_deref(),
            Some("livehost:demo-app")
        );
        let id = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00998877665544332211";
        assert_eq!(
            container_name(&format!("/system.slice/docker-{id}.scope")).as_deref(),
            Some("docker:3f4e5d6c7b8a")
        );
        assert_eq!(
            container_name(&format!("/docker/{id}")).as_deref(),
            Some("docker:3f4e5d6c7b8a")
        );
        assert_eq!(
            container_name(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234abcd_5678_90ab_cdef_1234567890ab.slice/cri-containerd-{id}.scope"
            ))
            .as_deref(),
            Some("containerd:3f4e5d6c7b8a")
        );
        assert_eq!(
            container_name(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234abcd_5678_90ab_cdef_1234567890ab.slice"
            )
            .as_deref(),
            Some("k8s-pod:1234abcd_5678_90ab_cdef_1234567890ab")
        );
        assert_eq!(
            container_name(&format!("/machine.slice/libpod-{id}.scope")).as_deref(),
            Some("podman:3f4e5d6c7b8a")
        );
        assert_eq!(
            container_name("/system.slice/nginx.service").as_deref(),
            Some("systemd:nginx")
        );
        assert_eq!(container_name("/user.slice"), None);
        assert_eq!(container_name("/"), None);
        assert_eq!(container_name("/docker-xyz.scope"), None);
    }

    #[test]
    fn cpu_stat_and_pressure() {
        let mut f = CpuFiles::default();
        parse_cpu_stat(
            "usage_usec 10\nnr_periods 7\nnr_throttled 3\nthrottled_usec 1500\n",
            CpuSource::V2,
            &mut f,
        );
        assert_eq!(
            (f.nr_periods, f.nr_throttled, f.throttled_usec),
            (Some(7), Some(3), Some(1500))
        );
        let mut f = CpuFiles::default();
        parse_cpu_stat(
            "nr_periods 7\nnr_throttled 2\nthrottled_time 5000000\n",
            CpuSource::V1,
            &mut f,
        );
        assert_eq!(f.throttled_usec, Some(5000));
        let mut f = CpuFiles::default();
        parse_pressure(
            "some avg10=1.50 avg60=0.00 avg300=0.00 total=12345\nfull avg10=0 total=1\n",
            &mut f,
        );
        assert_eq!(f.pressure_some_avg10, Some(1.5));
        assert_eq!(f.pressure_some_total_usec, Some(12345));
        let mut f = CpuFiles::default();
        parse_pressure("some avg10=x total=\n\u{fffd}", &mut f);
        parse_cpu_stat("nr_throttled\nnr_periods -1\n", CpuSource::V2, &mut f);
        assert_eq!(f, CpuFiles::default());
    }
}
