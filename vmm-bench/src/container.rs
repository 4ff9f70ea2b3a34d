//! Containers: our own namespace + cgroup launcher, and real `runc` with a
//! generated bundle. Both run the static Linux build of the workload.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Options for one container run.
#[derive(Debug, Clone)]
pub struct ContainerOpts {
    pub args: Vec<String>,
    pub hostname: String,
    /// Also unshare the network namespace (costs a few ms more).
    pub net: bool,
    /// Also unshare a user namespace, mapping root to root.
    pub user: bool,
    pub timeout: Duration,
}

impl Default for ContainerOpts {
    fn default() -> Self {
        ContainerOpts {
            args: vec![],
            hostname: "livehost-ctr".into(),
            net: false,
            user: false,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ContainerRun {
    /// The container's init as the host sees it (reaped by the time you read this).
    pub pid: i32,
    pub stdout: String,
    pub exit_code: i32,
    /// Host wall clock: namespaces + cgroup set up, workload exec'd.
    pub setup_us: f64,
    /// Launch to the workload's exit (output collected), host clock.
    pub total_us: f64,
    pub cgroup: Option<String>,
    pub max_rss_bytes: u64,
}

/// Where this host's cgroup v2 hierarchy is mounted (the unified tree on a
/// hybrid host), from /proc/self/mountinfo.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mi = livehost_common::sysfs::read_text("/proc/self/mountinfo").ok()?;
    mi.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).with_context(|| format!("{s:?} contains a NUL byte"))
}

/// A file holding the static workload (see [`cached_file`]).
pub fn workload_path() -> Result<PathBuf> {
    cached_file("workload", crate::LINUX_INIT, 0o755)
}

/// Write `bytes` once into a shared cache directory under a name that
/// includes a hash of the content, and return its path. Every process and
/// thread reuses the same file (no per-run litter in /tmp); writers race
/// safely through a unique temporary name and an atomic rename.
pub fn cached_file(name: &str, bytes: &[u8], mode: u32) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    // FNV-1a: not for security, only to tell builds apart.
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
    });
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let dir = std::env::temp_dir().join(format!("livehost-vmm-bench-cache-{uid}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let p = dir.join(format!("{name}-{h:016x}"));
    if std::fs::metadata(&p).is_ok_and(|m| m.len() == bytes.len() as u64) {
        return Ok(p);
    }
    let tmp = dir.join(format!(
        ".{name}.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("cannot create {}", p.display()))?;
    Ok(p)
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2 failed");
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A cgroup leaf that is removed when dropped. While it exists it is also
/// known to [`clean_up_on_stop_signals`].
struct CgroupLeaf(PathBuf);

impl CgroupLeaf {
    /// Create the leaf. Registered under the same lock the stop-signal
    /// clean-up takes, so no leaf is created behind its back.
    fn create(path: PathBuf) -> std::io::Result<CgroupLeaf> {
        let mut l = live();
        std::fs::create_dir(&path)?;
        l.leaves.push(path.clone());
        Ok(CgroupLeaf(path))
    }

    /// Take ownership of a leaf the caller just created.
    fn adopt(path: PathBuf) -> CgroupLeaf {
        live().leaves.push(path.clone());
        CgroupLeaf(path)
    }
}

impl Drop for CgroupLeaf {
    fn drop(&mut self) {
        remove_leaf(&self.0);
        live().leaves.retain(|l| *l != self.0);
    }
}

/// Remove a leaf, retrying briefly while the kernel tears its last task
/// down. True when it is gone.
fn remove_leaf(path: &Path) -> bool {
    for _ in 0..50 {
        match std::fs::remove_dir(path) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    false
}

/// What this process has running that a stop signal must not leave behind.
struct Live {
    leaves: Vec<PathBuf>,
    pids: Vec<i32>,
    /// runc containers: killing `runc run` leaves its container running
    /// (runc's init is not our child), so each is deleted through runc.
    runc: Vec<RuncLive>,
}

#[derive(Clone, PartialEq)]
struct RuncLive {
    runc: PathBuf,
    state: PathBuf,
    id: String,
    bundle: PathBuf,
}

impl RuncLive {
    /// `runc delete --force`: kills the container's processes and removes
    /// its state. Errors are ignored: there may be nothing left to delete.
    fn delete(&self) {
        let _ = std::process::Command::new(&self.runc)
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "--force", &self.id])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn live() -> std::sync::MutexGuard<'static, Live> {
    static LIVE: std::sync::Mutex<Live> = std::sync::Mutex::new(Live {
        leaves: Vec::new(),
        pids: Vec::new(),
        runc: Vec::new(),
    });
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Make SIGTERM, SIGINT and SIGHUP end this process cleanly: every child
/// it owns is killed (container inits, QEMU, runc, the native workload),
/// every runc container it started is deleted with its bundle, every
/// cgroup leaf it created is emptied and removed, then it exits with
/// 128 + the signal. Call it from the main thread before any other thread
/// starts (they inherit the blocked mask; one thread waits for the
/// signals). `vmm-bench run` and `vmm-bench report` do.
pub fn clean_up_on_stop_signals() -> Result<()> {
    // SAFETY: sigset manipulation on a local value, then blocking those
    // signals in this thread (and so in every thread it starts later).
    let set = unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut s, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &s, std::ptr::null_mut());
        s
    };
    std::thread::Builder::new()
        .name("stop-signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: waiting for one of the signals blocked above.
            while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
            let left = clean_up_now();
            eprintln!(
                "vmm-bench: stopped by signal {sig}; children killed, {}",
                if left.is_empty() {
                    "cgroup leaves removed".to_string()
                } else {
                    format!("could not remove {left:?}")
                }
            );
            std::process::exit(128 + sig);
        })
        .context("cannot start the stop-signal thread")?;
    Ok(())
}

/// Kill what we own and remove our leaves; returns the leaves that stayed.
/// Keeps the registry locked until the process exits, so nothing new is
/// started meanwhile.
fn clean_up_now() -> Vec<PathBuf> {
    let l = live();
    for &p in &l.pids {
        // SAFETY: signalling a child we own and have not reaped.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    // A container init may not be registered yet (just cloned): everything
    // inside our leaves goes too. Killing a pid namespace's init kills the
    // rest of it.
    for leaf in &l.leaves {
        if std::fs::write(leaf.join("cgroup.kill"), "1").is_err() {
            for p in std::fs::read_to_string(leaf.join("cgroup.procs"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: a process in a cgroup we created for it.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
    for r in &l.runc {
        r.delete();
        let _ = std::fs::remove_dir_all(&r.bundle);
    }
    let t = Instant::now();
    let mut left: Vec<PathBuf> = l.leaves.clone();
    while !left.is_empty() && t.elapsed() < Duration::from_secs(2) {
        // Reap whatever died (all our children: we are exiting).
        let mut status = 0;
        // SAFETY: non-blocking reap of our own children.
        while unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } > 0 {}
        left.retain(|leaf| !remove_leaf(leaf));
    }
    std::mem::forget(l);
    left
}

/// Prefix of the leaves [`run`] creates: `livehost-vmm-bench-PID-SEQ`.
const LEAF_PREFIX: &str = "livehost-vmm-bench-";

/// Remove leaves an earlier vmm-bench left behind (killed with SIGKILL, or
/// died before it could clean up): those whose creating pid no longer
/// exists and that hold no process (rmdir refuses a populated cgroup).
/// [`run`] does this once per process. Returns the leaves removed.
pub fn remove_stale_leaves() -> Vec<PathBuf> {
    let Some(root) = cgroup2_root() else {
        return vec![];
    };
    let Ok(rd) = std::fs::read_dir(&root) else {
        return vec![];
    };
    let mut removed = vec![];
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(LEAF_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest
            .split_once('-')
            .filter(|(_, seq)| seq.parse::<u64>().is_ok())
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if std::fs::remove_dir(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// Run the workload in new pid, mount, uts and ipc namespaces (optionally
/// net and user), inside its own cgroup leaf, with a private /proc.
/// Everything is torn down before returning, also on timeout.
pub fn run(opts: &ContainerOpts) -> Result<ContainerRun> {
    if !livehost_common::is_root() {
        bail!("the container launcher needs root (namespaces, mounts, cgroups): rerun with sudo");
    }
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let exe = workload_path()?;
    let launch = Instant::now();
    static STALE: std::sync::Once = std::sync::Once::new();
    STALE.call_once(|| {
        remove_stale_leaves();
    });
    let cg = match cgroup2_root() {
        Some(root) => {
            let leaf = root.join(format!(
                "{LEAF_PREFIX}{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            Some(
                CgroupLeaf::create(leaf.clone())
                    .with_context(|| format!("cannot create cgroup {}", leaf.display()))?,
            )
        }
        None => None,
    };
    // Everything the child needs is built here: after clone it may only
    // make system calls (another thread may hold the allocator's lock).
    let path = cstr(&exe.to_string_lossy())?;
    let mut argv_c = vec![path.clone()];
    for a in &opts.args {
        argv_c.push(cstr(a)?);
    }
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let host = opts.hostname.clone().into_bytes();
    let proc_s = cstr("proc")?;
    let proc_t = cstr("/proc")?;
    let root = cstr("/")?;
    let (sync_r, sync_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let mut flags =
        libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if opts.net {
        flags |= libc::CLONE_NEWNET;
    }
    if opts.user {
        flags |= libc::CLONE_NEWUSER;
    }
    let (sr, ow) = (sync_r.as_raw_fd(), out_w.as_raw_fd());
    // SAFETY: an empty signal set, for the child's mask (it may inherit the
    // stop signals blocked by clean_up_on_stop_signals).
    let empty = unsafe {
        let mut e: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut e);
        e
    };
    let child = move || -> isize {
        // SAFETY (whole closure): plain system calls on descriptors and
        // strings prepared before clone; any failure ends the child.
        unsafe {
            if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                return 119;
            }
            let mut b = 0u8;
            if libc::read(sr, (&mut b as *mut u8).cast(), 1) != 1 {
                return 120;
            }
            if let Err(status) = isolate(&host, &root, &proc_s, &proc_t) {
                return status;
            }
            if libc::dup2(ow, 1) < 0 {
                return 124;
            }
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            127
        }
    };
    // Open the cgroup directory now: clone3(CLONE_INTO_CGROUP) starts the
    // child in it, which skips the cgroup.procs migration (that write waits
    // for an RCU grace period: ~9 ms on this host the first time).
    let cg_fd = match &cg {
        Some(c) => Some(
            std::fs::File::open(&c.0)
                .with_context(|| format!("cannot open cgroup {}", c.0.display()))?,
        ),
        None => None,
    };
    let (pid, placed) = spawn_child(flags, cg_fd.as_ref().map(|f| f.as_raw_fd()), child)?;
    drop(out_w);
    // From here on the child must be reaped whatever happens.
    let reaper = Reaper::new(pid);
    let setup = (|| -> Result<()> {
        if opts.user {
            std::fs::write(format!("/proc/{pid}/setgroups"), "deny")?;
            std::fs::write(format!("/proc/{pid}/uid_map"), "0 0 1\n")?;
            std::fs::write(format!("/proc/{pid}/gid_map"), "0 0 1\n")?;
        }
        if let Some(cg) = cg.as_ref().filter(|_| !placed) {
            std::fs::write(cg.0.join("cgroup.procs"), pid.to_string())
                .with_context(|| format!("cannot move the container into {}", cg.0.display()))?;
        }
        Ok(())
    })();
    setup?;
    // SAFETY: writing one byte to our pipe releases the child.
    if unsafe { libc::write(sync_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) } != 1 {
        bail!("cannot release the container process");
    }
    let setup_us = launch.elapsed().as_secs_f64() * 1e6;
    let deadline = crate::deadline(launch, opts.timeout);
    let stdout = read_until(out_r, deadline);
    let (code, rss) = reaper.wait(deadline)?;
    let total_us = launch.elapsed().as_secs_f64() * 1e6;
    let stdout = stdout?;
    let cgroup = cg.as_ref().map(|c| c.0.display().to_string());
    drop(cg);
    Ok(ContainerRun {
        pid,
        stdout,
        exit_code: code,
        setup_us,
        total_us,
        cgroup,
        max_rss_bytes: rss,
    })
}

/// `clone_args` for clone3(2), up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Start `child` in new namespaces. With a cgroup fd, clone3 places it in
/// the cgroup at birth (returns `placed = true`); kernels without clone3 or
/// CLONE_INTO_CGROUP (before 5.7) fall back to clone(2), and the caller
/// moves the child through cgroup.procs.
/// In a freshly cloned child: set the hostname, make every mount private and
/// mount a private /proc. Only raw system calls (no allocation), because it
/// runs between clone and exec. On failure, the child's distinct exit status.
///
/// # Safety
/// Call only in the child of a clone with new uts and mount namespaces.
unsafe fn isolate(
    host: &[u8],
    root: &CString,
    proc_s: &CString,
    proc_t: &CString,
) -> Result<(), isize> {
    // SAFETY: plain system calls on NUL-terminated strings the caller keeps alive.
    unsafe {
        if libc::sethostname(host.as_ptr().cast(), host.len()) != 0 {
            return Err(121);
        }
        // Private propagation first, so the /proc mount below (and anything
        // else) never leaks into the host's mount namespace.
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(122);
        }
        if libc::mount(
            proc_s.as_ptr(),
            proc_t.as_ptr(),
            proc_s.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            return Err(123);
        }
    }
    Ok(())
}

fn spawn_child(
    flags: libc::c_int,
    cgroup: Option<libc::c_int>,
    mut child: impl FnMut() -> isize + 'static,
) -> Result<(i32, bool)> {
    if let Some(fd) = cgroup {
        let args = CloneArgs {
            flags: flags as u64 | CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: fd as u64,
            ..Default::default()
        };
        // SAFETY: clone3 without a new stack and without CLONE_VM behaves
        // like fork: the child gets a copy of this address space and
        // returns 0 here. It then only makes system calls (see `child`) and
        // ends in execve or _exit, never returning into Rust code that may
        // need locks another thread held at the time of the clone.
        let r = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if r == 0 {
            let code = child();
            // SAFETY: leave the child without running destructors or atexit.
            unsafe { libc::_exit(code as libc::c_int) };
        }
        if r > 0 {
            return Ok((r as i32, true));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::E2BIG) => {}
            _ => return Err(e).context("clone3 with new namespaces into the cgroup failed"),
        }
    }
    let mut stack = vec![0u8; 64 * 1024];
    // SAFETY: clone without CLONE_VM gives the child its own copy of memory;
    // the callback only makes system calls (see `child`).
    let pid = unsafe {
        nix::sched::clone(
            Box::new(child),
            &mut stack,
            nix::sched::CloneFlags::from_bits_truncate(flags),
            Some(libc::SIGCHLD),
        )
    }
    .context("clone with new namespaces failed (kernel without user/pid namespaces, or a seccomp policy?)")?;
    Ok((pid.as_raw(), false))
}

/// Reads a pipe to EOF or the deadline.
pub(crate) fn read_until(fd: OwnedFd, deadline: Instant) -> Result<String> {
    let (out, eof) = read_pipe(&fd, deadline)?;
    if !eof {
        bail!("timed out waiting for the workload's output");
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Drain a pipe on a thread of its own until EOF or the deadline, so a
/// child writing much to it never blocks while we read something else; the
/// thread returns what it read (at most 1 MiB is kept).
pub(crate) fn drain(fd: OwnedFd, deadline: Instant) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        read_pipe(&fd, deadline)
            .map(|(v, _)| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    })
}

/// Read until EOF (true) or the deadline (false), keeping the first MiB
/// and discarding the rest, so the writer never blocks on a full pipe.
fn read_pipe(fd: &OwnedFd, deadline: Instant) -> Result<(Vec<u8>, bool)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok((out, false));
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll failed");
        }
        if r == 0 {
            continue;
        }
        // SAFETY: reading into our buffer from our descriptor.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            return Ok((out, true));
        }
        if out.len() < 1 << 20 {
            out.extend_from_slice(&buf[..n as usize]);
        }
    }
}

/// Owns a child pid: waits for it with a deadline, kills it past the
/// deadline, and kills + reaps it if dropped unwaited. While owned, the pid
/// is also known to [`clean_up_on_stop_signals`].
pub(crate) struct Reaper(i32);

impl Reaper {
    pub(crate) fn new(pid: i32) -> Reaper {
        live().pids.push(pid);
        Reaper(pid)
    }

    /// Give up ownership (the caller reaps the pid itself).
    pub(crate) fn release(self) -> i32 {
        let pid = self.0;
        live().pids.retain(|&p| p != pid);
        std::mem::forget(self);
        pid
    }

    /// Exit code (128+signal when killed) and the child's peak RSS.
    pub(crate) fn wait(self, deadline: Instant) -> Result<(i32, u64)> {
        let pid = self.0;
        std::mem::forget(self);
        loop {
            let mut status = 0;
            // SAFETY: an all-zero rusage is valid; wait4 fills it.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // Reap and unregister under the registry's lock, so the stop
            // signal clean-up never signals a pid that was reaped (and
            // could be reused).
            let mut l = live();
            // SAFETY: waiting for our own child.
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
            if r == pid || r < 0 {
                l.pids.retain(|&p| p != pid);
            }
            drop(l);
            if r == pid {
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                };
                return Ok((code, ru.ru_maxrss as u64 * 1024));
            }
            if r < 0 {
                return Err(std::io::Error::last_os_error()).context("wait4 failed");
            }
            if Instant::now() >= deadline {
                kill_and_reap(pid);
                bail!("pid {pid} ran past its deadline and was killed");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// SIGKILL an owned child, reap it and unregister it, all under the
/// registry's lock.
fn kill_and_reap(pid: i32) {
    let mut l = live();
    let mut status = 0;
    // SAFETY: our own unreaped child; kill, then a blocking reap (quick
    // after SIGKILL).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, &mut status, 0);
    }
    l.pids.retain(|&p| p != pid);
}

impl Drop for Reaper {
    fn drop(&mut self) {
        kill_and_reap(self.0);
    }
}

/// Where `runc` is, if installed: `$VMM_BENCH_RUNC` when set (a path; one
/// that is not a file means "no runc"), else the first `runc` on PATH.
pub fn find_runc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VMM_BENCH_RUNC") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("runc"))
        .find(|p| p.is_file())
}

/// A generated OCI bundle: busybox (when installed) plus the workload as
/// `/init`, and a config.json running it.
pub struct Bundle {
    pub dir: tempfile::TempDir,
    pub rootfs_bytes: u64,
}

pub fn make_bundle(args: &[String]) -> Result<Bundle> {
    let dir = tempfile::Builder::new()
        .prefix("livehost-runc-")
        .tempdir()
        .context("cannot create a bundle directory")?;
    let rootfs = dir.path().join("rootfs");
    for d in ["bin", "proc", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::write(rootfs.join("init"), crate::LINUX_INIT)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(rootfs.join("init"), std::fs::Permissions::from_mode(0o755))?;
    let mut size = crate::LINUX_INIT.len() as u64;
    // A busybox userland makes the rootfs what a minimal real image holds.
    if let Ok(bb) = std::fs::read("/bin/busybox") {
        size += bb.len() as u64;
        std::fs::write(rootfs.join("bin/busybox"), bb)?;
        std::fs::set_permissions(
            rootfs.join("bin/busybox"),
            std::fs::Permissions::from_mode(0o755),
        )?;
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh"))?;
    }
    let mut argv = vec!["/init".to_string()];
    argv.extend(args.iter().cloned());
    let cfg = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": argv,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "livehost-runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
            "maskedPaths": [], "readonlyPaths": []
        }
    });
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec_pretty(&cfg)?,
    )?;
    Ok(Bundle {
        dir,
        rootfs_bytes: size,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct RuncRun {
    pub stdout: String,
    pub exit_code: i32,
    pub total_us: f64,
    pub max_rss_bytes: u64,
}

/// `runc run` the bundle once, with its own state directory; the container
/// is force-deleted afterwards whatever happened.
pub fn run_runc(runc: &Path, bundle: &Bundle, timeout: Duration) -> Result<RuncRun> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let id = format!(
        "livehost-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let state = bundle.dir.path().join("state");
    let container = RuncLive {
        runc: runc.to_path_buf(),
        state: state.clone(),
        id: id.clone(),
        bundle: bundle.dir.path().to_path_buf(),
    };
    let launch = Instant::now();
    let child = std::process::Command::new(runc)
        .arg("--root")
        .arg(&state)
        .args(["run", "--bundle"])
        .arg(bundle.dir.path())
        .arg(&id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", runc.display()))?;
    let pid = child.id() as i32;
    live().runc.push(container.clone());
    let reaper = Reaper::new(pid);
    let mut child = child;
    let out: OwnedFd = child.stdout.take().context("no stdout pipe")?.into();
    let err: OwnedFd = child.stderr.take().context("no stderr pipe")?.into();
    let deadline = crate::deadline(launch, timeout);
    // Both pipes at once: runc (or the container) writing more than a pipe
    // buffer to one must not stall while we wait on the other.
    let stderr = drain(err, deadline);
    let stdout = read_until(out, deadline);
    let waited = reaper.wait(deadline);
    let stderr = stderr.join().unwrap_or_default();
    let total_us = launch.elapsed().as_secs_f64() * 1e6;
    // Under the registry's lock, so a stop signal's clean-up never races it.
    {
        let mut l = live();
        container.delete();
        l.runc.retain(|r| *r != container);
    }
    let (code, rss) = waited?;
    if code != 0 {
        let last: Vec<&str> = stderr.trim().lines().rev().take(8).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        bail!("runc exited with {code}: {}", last.join(" | "));
    }
    Ok(RuncRun {
        stdout: stdout?,
        exit_code: code,
        total_us,
        max_rss_bytes: rss,
    })
}

/// Options for running an arbitrary command as a container (the CLI's
/// `vmm-bench container`): output is inherited, not captured.
#[derive(Debug, Clone)]
pub struct CommandOpts {
    pub argv: Vec<String>,
    pub hostname: String,
    /// Name of the cgroup leaf under the v2 root; created if absent and
    /// removed afterwards if we created it.
    pub cgroup: String,
    pub net: bool,
    /// None: run until the command exits or we get SIGTERM/SIGINT/SIGHUP.
    pub timeout: Option<Duration>,
}

/// How a command container ended.
#[derive(Debug, Clone, Serialize)]
pub struct CommandEnd {
    pub pid: i32,
    pub cgroup: Option<String>,
    /// Exit status, 128+signal when killed.
    pub exit_code: i32,
    /// The signal we received and answered by killing the container.
    pub stopped_by: Option<i32>,
    pub timed_out: bool,
}

fn resolve(cmd: &str) -> Result<PathBuf> {
    if cmd.contains('/') {
        return Ok(PathBuf::from(cmd));
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            p.to_str()?
                .split(':')
                .map(|d| Path::new(d).join(cmd))
                .find(|p| p.is_file())
        })
        .with_context(|| format!("{cmd} not found on PATH"))
}

/// Run `argv` in new pid, mount, uts, ipc (opt. net) namespaces and a named
/// cgroup leaf, with a private /proc. SIGTERM, SIGINT and SIGHUP to this
/// process kill the container; either way the init is reaped and the leaf
/// removed (if we created it) before returning.
pub fn run_command(opts: &CommandOpts) -> Result<CommandEnd> {
    if !livehost_common::is_root() {
        bail!("the container launcher needs root (namespaces, mounts, cgroups): rerun with sudo");
    }
    let Some(prog) = opts.argv.first() else {
        bail!("no command given: vmm-bench container [OPTIONS] -- COMMAND [ARGS...]");
    };
    if opts.cgroup.is_empty() || opts.cgroup.contains('/') || opts.cgroup.starts_with('.') {
        bail!("cgroup name {:?} must be one path component", opts.cgroup);
    }
    let exe = resolve(prog)?;
    let root = cgroup2_root().context("this host has no cgroup v2 hierarchy mounted")?;
    let leaf_path = root.join(&opts.cgroup);
    let created = match std::fs::create_dir(&leaf_path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            return Err(e).with_context(|| format!("cannot create cgroup {}", leaf_path.display()));
        }
    };
    let leaf = created.then(|| CgroupLeaf::adopt(leaf_path.clone()));
    let cg_fd = std::fs::File::open(&leaf_path)
        .with_context(|| format!("cannot open cgroup {}", leaf_path.display()))?;

    let path = cstr(&exe.to_string_lossy())?;
    let argv_c: Vec<CString> = opts.argv.iter().map(|a| cstr(a)).collect::<Result<_>>()?;
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let env_c: Vec<CString> = std::env::vars()
        .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
        .collect();
    let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let host = opts.hostname.clone().into_bytes();
    let proc_s = cstr("proc")?;
    let proc_t = cstr("/proc")?;
    let rootdir = cstr("/")?;

    // Block the stop signals so they wait for us in sigtimedwait below; the
    // child restores an empty mask before exec.
    // SAFETY: sigset manipulation on local values.
    let (stop, empty) = unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut s, sig);
        }
        let mut e: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut e);
        (s, e)
    };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: changing this thread's mask; restored before returning.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &stop, &mut old) };
    struct Restore(libc::sigset_t);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restoring the mask saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
        }
    }
    let _restore = Restore(old);

    let mut flags =
        libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if opts.net {
        flags |= libc::CLONE_NEWNET;
    }
    let child = move || -> isize {
        // SAFETY (whole closure): system calls on values prepared before
        // clone; any failure ends the child with a distinct status.
        unsafe {
            if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                return 119;
            }
            if let Err(status) = isolate(&host, &rootdir, &proc_s, &proc_t) {
                return status;
            }
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            127
        }
    };
    let (pid, placed) = spawn_child(flags, Some(cg_fd.as_raw_fd()), child)?;
    let reaper = Reaper::new(pid);
    if !placed {
        std::fs::write(leaf_path.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("cannot move the container into {}", leaf_path.display()))?;
    }
    let start = Instant::now();
    let pid = reaper.release();
    let mut end = CommandEnd {
        pid,
        cgroup: Some(leaf_path.display().to_string()),
        exit_code: 0,
        stopped_by: None,
        timed_out: false,
    };
    loop {
        let mut status = 0;
        // SAFETY: polling our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            end.exit_code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            break;
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        // SAFETY: waiting for one of the blocked stop signals, 50 ms at most.
        let sig = unsafe { libc::sigtimedwait(&stop, std::ptr::null_mut(), &ts) };
        let over = opts.timeout.is_some_and(|t| start.elapsed() >= t);
        if sig > 0 || over {
            end.stopped_by = (sig > 0).then_some(sig);
            end.timed_out = over && sig <= 0;
            // Killing the pid namespace's init kills everything in it.
            // SAFETY: our own unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            end.exit_code = 128 + if sig > 0 { sig } else { libc::SIGKILL };
            break;
        }
    }
    drop(cg_fd);
    drop(leaf);
    Ok(end)
}
