//! Starting a child in new namespaces (clone3 straight into its cgroup)
//! and what the child does between clone and exec. The child may only make
//! system calls on values prepared before the clone: another thread may
//! have held the allocator's lock at that moment.

use crate::launch::Program;
use crate::privileges::Privileges;
use crate::rootfs::Rootfs;
use crate::{cleanup, cstr};
use anyhow::{Context, Result};
use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// The userland a real container gets: the host's static busybox, bound
/// read-only as /bin/busybox and /bin/sh (runc's bundle copies the same file).
pub const BUSYBOX: &str = "/bin/busybox";

/// Exit statuses of a container child that failed before its program ran,
/// one per step, so a failed set-up says where it failed.
pub mod status {
    /// Restoring the signal mask failed.
    pub const SIGMASK: isize = 119;
    /// The parent never released the child (sync pipe closed).
    pub const SYNC: isize = 120;
    /// sethostname failed.
    pub const HOSTNAME: isize = 121;
    /// Making every mount private failed.
    pub const PRIVATE_MOUNTS: isize = 122;
    /// Mounting the private /proc failed.
    pub const PROC: isize = 123;
    /// Pointing stdout at the output pipe failed.
    pub const STDOUT: isize = 124;
    /// execve failed.
    pub const EXEC: isize = livehost_common::exit::EXEC_FAILED as isize;
    /// PR_SET_PDEATHSIG failed.
    pub const DEATHSIG: isize = 112;
    /// Installing the seccomp filter failed.
    pub const SECCOMP: isize = 113;
    /// unshare(CLONE_NEWCGROUP) failed.
    pub const CGROUP_NS: isize = 114;
    /// Building the root file system (a mount, a device node) failed.
    pub const ROOTFS: isize = 115;
    /// pivot_root into the new root failed.
    pub const PIVOT: isize = 116;
    /// Dropping capabilities failed.
    pub const CAPABILITIES: isize = 117;
    /// PR_SET_NO_NEW_PRIVS failed.
    pub const NO_NEW_PRIVS: isize = 118;

    /// What a set-up status means, for error messages; None for statuses
    /// a program may return itself.
    pub fn meaning(code: i32) -> Option<&'static str> {
        Some(match code as isize {
            SIGMASK => "restoring the signal mask failed",
            SYNC => "the parent never released the container",
            HOSTNAME => "sethostname failed",
            PRIVATE_MOUNTS => "making the mounts private failed",
            PROC => "mounting /proc failed",
            DEATHSIG => "PR_SET_PDEATHSIG failed",
            SECCOMP => "installing the seccomp filter failed",
            CGROUP_NS => "unshare(CLONE_NEWCGROUP) failed",
            ROOTFS => "building the container's root file system failed",
            PIVOT => "pivot_root into the container's root failed",
            CAPABILITIES => "dropping capabilities failed",
            NO_NEW_PRIVS => "setting no_new_privs failed",
            EXEC => "execve failed (no such program in the container's root?)",
            _ => return None,
        })
    }
}

/// How much isolation a container gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// A real container: its own read-only root (pivot_root), /dev, masked
    /// /proc, read-only /sys, a cgroup namespace, limits where the
    /// controllers exist, a reduced capability set, no_new_privs, seccomp.
    #[default]
    Container,
    /// Namespaces and a cgroup leaf only: the host's file system, /sys and
    /// /dev, full root capabilities, no seccomp. Fast, and no isolation
    /// worth the name.
    NamespacedProcess,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Container => "container (own read-only root, reduced privileges)",
            Mode::NamespacedProcess => "namespaced process, shared host filesystem",
        }
    }
}

/// Which namespaces a container gets beyond pid, mount, uts and ipc.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extra {
    pub net: bool,
    pub user: bool,
}

/// The clone flags for a container with `extra` namespaces.
pub(crate) fn clone_flags(extra: Extra) -> libc::c_int {
    let mut flags =
        libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if extra.net {
        flags |= libc::CLONE_NEWNET;
    }
    if extra.user {
        flags |= libc::CLONE_NEWUSER;
    }
    flags
}

/// The hostname and mount strings the child's set-up needs, prepared
/// before the clone.
pub(crate) struct Isolation {
    host: Vec<u8>,
    root: CString,
    proc_s: CString,
    proc_t: CString,
    mask: libc::sigset_t,
    /// The real container's root and privileges; None for a namespaced
    /// process.
    real: Option<(Rootfs, Privileges)>,
    /// A pidfd of this process (None on kernels before 5.3).
    parent: Option<std::os::fd::OwnedFd>,
}

impl Isolation {
    pub(crate) fn new(hostname: &str, mode: Mode) -> Result<Isolation> {
        let real = match mode {
            Mode::Container => {
                let bb = Path::new(BUSYBOX).is_file().then_some(BUSYBOX);
                let cg2 = crate::cgroup2_root().is_some();
                let pivot = crate::rootfs::can_pivot();
                Some((Rootfs::new(bb, cg2, pivot)?, Privileges::new(!pivot)?))
            }
            Mode::NamespacedProcess => None,
        };
        Ok(Isolation {
            host: hostname.as_bytes().to_vec(),
            root: cstr("/")?,
            proc_s: cstr("proc")?,
            proc_t: cstr("/proc")?,
            mask: cleanup::no_signals(),
            real,
            parent: own_pidfd(),
        })
    }

    /// In the child, right after the clone: be killed when the thread that
    /// cloned us dies (so a SIGKILLed launcher orphans nothing), then wait
    /// for the parent's byte on `sync_r` (closing our copy of `sync_w`
    /// first, so a parent that died already reads as EOF).
    ///
    /// # Safety
    /// Call only in a child between clone and exec.
    pub(crate) unsafe fn wait_for_parent(&self, sync_r: RawFd, sync_w: RawFd) -> Result<(), isize> {
        // SAFETY: prctl, poll, close and read on values we own.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(status::DEATHSIG);
            }
            // A parent that died before the prctl sent no signal: its
            // pidfd (readable once it has exited) says so. (getppid is no
            // help: in a new pid namespace it is 0 either way.)
            if let Some(fd) = &self.parent {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                if libc::poll(&mut p, 1, 0) != 0 {
                    return Err(status::SYNC);
                }
            }
            libc::close(sync_w);
            let mut b = 0u8;
            if libc::read(sync_r, (&mut b as *mut u8).cast(), 1) != 1 {
                return Err(status::SYNC);
            }
            libc::close(sync_r);
        }
        Ok(())
    }

    /// Last step before exec: drop capabilities, no_new_privs, seccomp
    /// (a real container only).
    ///
    /// # Safety
    /// Call only in a child between clone and exec.
    pub(crate) unsafe fn lock_down(&self) -> Result<(), isize> {
        match &self.real {
            // SAFETY: as for this function.
            Some((_, p)) => unsafe { p.apply() },
            None => Ok(()),
        }
    }

    /// First thing in a freshly cloned child: clear the signal mask (it
    /// may inherit the stop signals blocked by the parent).
    ///
    /// # Safety
    /// Call only in a child between clone and exec.
    pub(crate) unsafe fn unblock_signals(&self) -> Result<(), isize> {
        // SAFETY: setting this thread's mask from a prepared set.
        if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &self.mask, std::ptr::null_mut()) } != 0 {
            return Err(status::SIGMASK);
        }
        Ok(())
    }

    /// In the child: set the hostname, make every mount private and mount a
    /// private /proc. On failure, the child's [`status`].
    ///
    /// # Safety
    /// Call only in the child of a clone with new uts and mount namespaces.
    pub(crate) unsafe fn apply(&self) -> Result<(), isize> {
        // SAFETY: plain system calls on NUL-terminated strings we own.
        unsafe {
            // The cgroup namespace is made here, after the parent placed us
            // in our leaf, so its root is the leaf (clone3's
            // CLONE_NEWCGROUP would root it at the parent's cgroup).
            if self.real.is_some() && libc::unshare(libc::CLONE_NEWCGROUP) != 0 {
                return Err(status::CGROUP_NS);
            }
            if libc::sethostname(self.host.as_ptr().cast(), self.host.len()) != 0 {
                return Err(status::HOSTNAME);
            }
            // Private propagation first, so the /proc mount below (and
            // anything else) never leaks into the host's mount namespace.
            if libc::mount(
                std::ptr::null(),
                self.root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(status::PRIVATE_MOUNTS);
            }
            if let Some((rootfs, _)) = &self.real {
                return rootfs.build();
            }
            if libc::mount(
                self.proc_s.as_ptr(),
                self.proc_t.as_ptr(),
                self.proc_s.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ) != 0
            {
                return Err(status::PROC);
            }
        }
        Ok(())
    }
}

/// A pidfd of this process (close-on-exec, as pidfd_open makes them).
fn own_pidfd() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open on our own pid; the descriptor is fresh and ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    // SAFETY: as above.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) })
}

/// What the child executes, prepared before the clone: a path, or a sealed
/// memory file run through `execveat(fd, "", AT_EMPTY_PATH)` (no path at
/// all, so the child's fresh /proc does not matter).
pub(crate) struct Exec {
    target: Target,
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

enum Target {
    Path(CString),
    Fd(RawFd),
}

impl Exec {
    /// `argv` includes argv[0]; `env` as `KEY=VALUE` strings.
    pub(crate) fn new(program: &Program, argv: &[String], env: &[String]) -> Result<Exec> {
        let target = match program {
            Program::Path(p) => Target::Path(cstr(&p.to_string_lossy())?),
            Program::Sealed(f) => Target::Fd(f.fd().as_raw_fd()),
        };
        let argv_c: Vec<CString> = argv.iter().map(|a| cstr(a)).collect::<Result<_>>()?;
        let env_c: Vec<CString> = env.iter().map(|e| cstr(e)).collect::<Result<_>>()?;
        let ptrs = |v: &[CString]| {
            let mut p: Vec<*const libc::c_char> = v.iter().map(|c| c.as_ptr()).collect();
            p.push(std::ptr::null());
            p
        };
        let (argv, envp) = (ptrs(&argv_c), ptrs(&env_c));
        let mut strings = argv_c;
        strings.extend(env_c);
        Ok(Exec {
            target,
            _strings: strings,
            argv,
            envp,
        })
    }

    /// Replace the child with the program; returns only on failure, with
    /// [`status::EXEC`].
    ///
    /// # Safety
    /// Call only in a child between clone and exec.
    pub(crate) unsafe fn exec(&self) -> isize {
        // SAFETY: the pointers point into strings this struct owns.
        unsafe {
            match &self.target {
                Target::Path(p) => {
                    libc::execve(p.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
                }
                Target::Fd(fd) => {
                    libc::syscall(
                        libc::SYS_execveat,
                        *fd,
                        c"".as_ptr(),
                        self.argv.as_ptr(),
                        self.envp.as_ptr(),
                        libc::AT_EMPTY_PATH,
                    );
                }
            }
        }
        status::EXEC
    }
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
/// the cgroup at birth (returns `placed = true`), which skips the
/// cgroup.procs migration (that write waits for an RCU grace period: ~9 ms
/// on this project's host the first time); kernels without clone3 or
/// CLONE_INTO_CGROUP (before 5.7) fall back to clone(2), and the caller
/// moves the child through cgroup.procs.
pub(crate) fn spawn_child(
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

/// In the child: tell the parent which step failed, over the close-on-exec
/// error pipe (a successful exec closes it with nothing written), and
/// return that status as the child's exit status.
///
/// # Safety
/// Call only in a child between clone and exec.
pub(crate) unsafe fn failed(err_w: RawFd, status: isize) -> isize {
    let b = status as u8;
    // SAFETY: one byte to a pipe we own.
    unsafe { libc::write(err_w, (&b as *const u8).cast(), 1) };
    status
}

/// In the parent, after releasing the child: wait until it has exec'd (the
/// error pipe closes empty) or reported a failed step, at most until
/// `deadline`. The write end must be closed in the parent already.
pub(crate) fn exec_outcome(
    err_r: &std::os::fd::OwnedFd,
    deadline: std::time::Instant,
) -> Result<()> {
    let mut pfd = libc::pollfd {
        fd: err_r.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let ms = left.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: poll on one descriptor we own.
    if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
        anyhow::bail!("the container did not reach exec in time");
    }
    let mut b = 0u8;
    // SAFETY: reading one byte into a local.
    match unsafe { libc::read(err_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1) } {
        1 => {
            let why = status::meaning(b as i32).unwrap_or("unknown step");
            anyhow::bail!("the container's set-up failed (status {b}): {why}")
        }
        _ => Ok(()),
    }
}
