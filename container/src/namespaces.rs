//! Starting a child in new namespaces (clone3 straight into its cgroup)
//! and what the child does between clone and exec. The child may only make
//! system calls on values prepared before the clone: another thread may
//! have held the allocator's lock at that moment.

use crate::launch::Program;
use crate::{cleanup, cstr};
use anyhow::{Context, Result};
use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};

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
}

impl Isolation {
    pub(crate) fn new(hostname: &str) -> Result<Isolation> {
        Ok(Isolation {
            host: hostname.as_bytes().to_vec(),
            root: cstr("/")?,
            proc_s: cstr("proc")?,
            proc_t: cstr("/proc")?,
            mask: cleanup::no_signals(),
        })
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
