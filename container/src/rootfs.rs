//! A real container's file system, built by the child between clone and
//! exec from steps prepared before the clone: a tmpfs root holding the
//! host's busybox (bound read-only, as `/bin/busybox` and `/bin/sh`, the
//! same userland runc's bundle gets), its own /dev with six device nodes,
//! /proc with runc's masked and read-only paths, /sys and the cgroup
//! namespace's cgroup2 read-only, a tmpfs /tmp; entered by pivot_root (or,
//! where the host's root is the initial ramfs and pivot_root is refused,
//! by moving it over / and chroot) and then made read-only itself.

use crate::cstr;
use anyhow::Result;
use std::ffi::CString;

/// Where the new root is assembled inside the child's private mount
/// namespace (mounted over, never touching the host's directory).
const STAGE: &str = "/tmp";

/// /proc entries runc masks: files get /dev/null bound over them,
/// directories an empty read-only tmpfs.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

/// /proc entries runc makes read-only (sysrq-trigger among them).
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The device nodes of the container's /dev: (name, major, minor).
pub const DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

enum Step {
    Mount {
        src: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// Mask: bind /dev/null over a file, or an empty read-only tmpfs over
    /// a directory; missing entries (this kernel lacks them) are skipped.
    Mask(CString),
    /// Bind a path onto itself and remount it read-only; skipped if missing.
    ReadOnly(CString),
    Mkdir(CString),
    Touch(CString),
    Mknod(CString, libc::dev_t),
    Symlink(CString, CString),
    Pivot(CString),
    /// Where pivot_root is refused (the root is the initial ramfs): move
    /// the new root over / and chroot into it.
    MoveRoot(CString),
}

/// Whether pivot_root can leave this host's root: not when the root is
/// the initial ramfs (an initramfs that never switched root, like
/// kernel-tests' guests), where the kernel refuses it with EINVAL.
pub fn can_pivot() -> bool {
    let Ok(mi) = livehost_common::sysfs::read_text("/proc/self/mountinfo") else {
        return true;
    };
    // The last mount on / is the one on top.
    let fstype = mi.lines().rev().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (pre.split_whitespace().nth(4)? == "/").then(|| post.split_whitespace().next())?
    });
    fstype != Some("rootfs")
}

/// The prepared steps.
pub(crate) struct Rootfs {
    steps: Vec<Step>,
    dot: CString,
    slash: CString,
    devnull: CString,
    tmpfs: CString,
}

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;
const RDONLY: libc::c_ulong = libc::MS_RDONLY;

fn mount(
    src: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<Step> {
    Ok(Step::Mount {
        src: src.map(cstr).transpose()?,
        target: cstr(target)?,
        fstype: fstype.map(cstr).transpose()?,
        flags,
        data: data.map(cstr).transpose()?,
    })
}

impl Rootfs {
    /// The steps for a root holding `busybox` (a host path, when there is
    /// one), with cgroup2 mounted read-only at /sys/fs/cgroup when `cgroup2`.
    pub(crate) fn new(busybox: Option<&str>, cgroup2: bool, pivot: bool) -> Result<Rootfs> {
        let s = |p: &str| format!("{STAGE}{p}");
        let mut steps = vec![mount(
            Some("tmpfs"),
            STAGE,
            Some("tmpfs"),
            NOSUID | NODEV,
            Some("mode=755,size=1m"),
        )?];
        for d in ["/bin", "/dev", "/proc", "/sys", "/tmp"] {
            steps.push(Step::Mkdir(cstr(&s(d))?));
        }
        if let Some(bb) = busybox {
            steps.push(Step::Touch(cstr(&s("/bin/busybox"))?));
            steps.push(mount(
                Some(bb),
                &s("/bin/busybox"),
                None,
                libc::MS_BIND,
                None,
            )?);
            steps.push(Step::ReadOnly(cstr(&s("/bin/busybox"))?));
            steps.push(Step::Symlink(cstr("busybox")?, cstr(&s("/bin/sh"))?));
        }
        steps.extend(Self::dev()?);
        steps.push(mount(
            Some("proc"),
            &s("/proc"),
            Some("proc"),
            NOSUID | NODEV | NOEXEC,
            None,
        )?);
        steps.push(mount(
            Some("sysfs"),
            &s("/sys"),
            Some("sysfs"),
            RDONLY | NOSUID | NODEV | NOEXEC,
            None,
        )?);
        if cgroup2 {
            steps.push(mount(
                Some("cgroup2"),
                &s("/sys/fs/cgroup"),
                Some("cgroup2"),
                RDONLY | NOSUID | NODEV | NOEXEC,
                None,
            )?);
        }
        for p in MASKED_PATHS {
            steps.push(Step::Mask(cstr(&s(p))?));
        }
        for p in READONLY_PATHS {
            steps.push(Step::ReadOnly(cstr(&s(p))?));
        }
        steps.push(mount(
            Some("tmpfs"),
            &s("/tmp"),
            Some("tmpfs"),
            NOSUID | NODEV,
            Some("mode=1777,size=16m"),
        )?);
        steps.push(match pivot {
            true => Step::Pivot(cstr(STAGE)?),
            false => Step::MoveRoot(cstr(STAGE)?),
        });
        // The root itself last: nothing above can be written any more.
        steps.push(mount(
            None,
            "/",
            None,
            libc::MS_REMOUNT | libc::MS_BIND | RDONLY | NOSUID | NODEV,
            None,
        )?);
        Ok(Rootfs {
            steps,
            dot: cstr(".")?,
            slash: cstr("/")?,
            devnull: cstr(&s("/dev/null"))?,
            tmpfs: cstr("tmpfs")?,
        })
    }

    /// /dev: a small tmpfs, the device nodes, the usual links into /proc.
    fn dev() -> Result<Vec<Step>> {
        let s = |p: &str| format!("{STAGE}/dev{p}");
        let mut steps = vec![mount(
            Some("tmpfs"),
            &s(""),
            Some("tmpfs"),
            NOSUID | NOEXEC,
            Some("mode=755,size=64k"),
        )?];
        for &(name, major, minor) in DEVICES {
            steps.push(Step::Mknod(
                cstr(&s(&format!("/{name}")))?,
                libc::makedev(major, minor),
            ));
        }
        for (name, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            steps.push(Step::Symlink(cstr(target)?, cstr(&s(&format!("/{name}")))?));
        }
        Ok(steps)
    }

    /// Run every step; on failure [`crate::namespaces::status::ROOTFS`] or
    /// `PIVOT`.
    ///
    /// # Safety
    /// Call only in a child of a clone with a new mount namespace whose
    /// mounts are already private.
    pub(crate) unsafe fn build(&self) -> Result<(), isize> {
        use crate::namespaces::status;
        let null = std::ptr::null::<libc::c_char>;
        let opt = |c: &Option<CString>| c.as_ref().map_or(null(), |c| c.as_ptr());
        // SAFETY: system calls on NUL-terminated strings this struct owns.
        unsafe {
            libc::umask(0);
            for step in &self.steps {
                let ok = match step {
                    Step::Mount {
                        src,
                        target,
                        fstype,
                        flags,
                        data,
                    } => {
                        libc::mount(
                            opt(src),
                            target.as_ptr(),
                            opt(fstype),
                            *flags,
                            opt(data).cast(),
                        ) == 0
                    }
                    Step::Mask(p) => self.mask(p),
                    Step::ReadOnly(p) => read_only(p),
                    Step::Mkdir(p) => libc::mkdir(p.as_ptr(), 0o755) == 0,
                    Step::Touch(p) => {
                        let fd = libc::open(p.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o755);
                        fd >= 0 && libc::close(fd) == 0
                    }
                    Step::Mknod(p, dev) => {
                        libc::mknod(p.as_ptr(), libc::S_IFCHR | 0o666, *dev) == 0
                    }
                    Step::Symlink(t, l) => libc::symlink(t.as_ptr(), l.as_ptr()) == 0,
                    Step::Pivot(root) => {
                        if !self.pivot(root) {
                            return Err(status::PIVOT);
                        }
                        true
                    }
                    Step::MoveRoot(root) => {
                        if !self.move_root(root) {
                            return Err(status::PIVOT);
                        }
                        true
                    }
                };
                if !ok {
                    return Err(status::ROOTFS);
                }
            }
            libc::umask(0o022);
        }
        Ok(())
    }

    unsafe fn mask(&self, p: &CString) -> bool {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: stat into a local, then a mount on our own strings.
        unsafe {
            if libc::stat(p.as_ptr(), &mut st) != 0 {
                return *libc::__errno_location() == libc::ENOENT;
            }
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                let flags = RDONLY | NOSUID | NODEV | NOEXEC;
                let t = self.tmpfs.as_ptr();
                libc::mount(t, p.as_ptr(), t, flags, std::ptr::null()) == 0
            } else {
                let b = libc::MS_BIND;
                libc::mount(
                    self.devnull.as_ptr(),
                    p.as_ptr(),
                    std::ptr::null(),
                    b,
                    std::ptr::null(),
                ) == 0
            }
        }
    }

    /// chdir into the new root, pivot_root(".", ".") and detach the old
    /// root stacked on it (runc's way: no directory for the old root needed).
    unsafe fn pivot(&self, root: &CString) -> bool {
        // SAFETY: system calls on our own strings.
        unsafe {
            libc::chdir(root.as_ptr()) == 0
                && libc::syscall(libc::SYS_pivot_root, self.dot.as_ptr(), self.dot.as_ptr()) == 0
                && libc::umount2(self.dot.as_ptr(), libc::MNT_DETACH) == 0
                && libc::chdir(self.slash.as_ptr()) == 0
        }
    }
}

impl Rootfs {
    /// chdir into the new root, move it over / and chroot into it (runc's
    /// no-pivot way). The old root stays below, reachable only through
    /// chroot, which the container then may not call (no CAP_SYS_CHROOT,
    /// and the seccomp filter refuses it).
    unsafe fn move_root(&self, root: &CString) -> bool {
        // SAFETY: system calls on our own strings.
        unsafe {
            libc::chdir(root.as_ptr()) == 0
                && libc::mount(
                    self.dot.as_ptr(),
                    self.slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_MOVE,
                    std::ptr::null(),
                ) == 0
                && libc::chroot(self.dot.as_ptr()) == 0
                && libc::chdir(self.slash.as_ptr()) == 0
        }
    }
}

/// Bind `p` onto itself and remount that read-only; true if `p` is missing.
unsafe fn read_only(p: &CString) -> bool {
    let null = std::ptr::null();
    // SAFETY: mounts on our own string.
    unsafe {
        if libc::mount(
            p.as_ptr(),
            p.as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REC,
            null.cast(),
        ) != 0
        {
            return *libc::__errno_location() == libc::ENOENT;
        }
        let flags = libc::MS_REMOUNT | libc::MS_BIND | RDONLY | NOSUID | NODEV;
        libc::mount(null, p.as_ptr(), null, flags, null.cast()) == 0
    }
}
