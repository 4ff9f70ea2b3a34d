//! Executables and images kept in sealed memory files (memfd), so root
//! never runs or hands QEMU a file from a directory another user could
//! have created or can write to (issue 16: a shared `/tmp` cache was such a
//! directory). The memfd has no path in any mount; it is sealed against
//! writes, growing, shrinking and further seal changes, so even someone who
//! reopens it through /proc cannot change it.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

/// `MFD_EXEC` (Linux 6.3): ask for an executable memfd explicitly, so a
/// host with `vm.memfd_noexec = 1` does not make it non-executable.
const MFD_EXEC: libc::c_uint = 0x10;
/// `F_SEAL_EXEC` (Linux 6.3): the exec bits can no longer change.
const F_SEAL_EXEC: libc::c_int = 0x20;

/// A sealed, read-only memory file holding one image.
#[derive(Debug)]
pub struct SealedFile {
    fd: OwnedFd,
    name: String,
    len: u64,
    sha256: [u8; 32],
}

impl SealedFile {
    /// Copy `bytes` into a new memfd called `name`, set its mode (the exec
    /// bits decide whether it can be executed) and seal it.
    pub fn new(name: &str, bytes: &[u8], mode: u32) -> Result<SealedFile> {
        let fd = memfd(name, mode & 0o111 != 0)?;
        let mut f = std::fs::File::from(fd);
        std::io::Write::write_all(&mut f, bytes)
            .with_context(|| format!("cannot fill the memory file {name}"))?;
        let fd = OwnedFd::from(f);
        // SAFETY: fchmod on a descriptor we own.
        if unsafe { libc::fchmod(fd.as_raw_fd(), mode) } != 0 {
            return Err(std::io::Error::last_os_error()).context("fchmod of a memfd failed");
        }
        seal(&fd)?;
        Ok(SealedFile {
            fd,
            name: name.to_string(),
            len: bytes.len() as u64,
            sha256: Sha256::digest(bytes).into(),
        })
    }

    /// The memfd, for `execveat(fd, "", AT_EMPTY_PATH)` (close-on-exec:
    /// only a child between fork and exec sees it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `/proc/self/fd/N`: a path to the file for this process and for a
    /// child it forks, until that child execs (what `Command::new` needs).
    pub fn exec_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// `/proc/PID/fd/N` of this process: a path other processes can open
    /// only if they may inspect this one (root, or our own uid), e.g. QEMU
    /// reading `-kernel` or `-initrd`. No other user can reach it.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.fd.as_raw_fd()
        ))
    }

    /// The process-wide sealed copy of `bytes` under `name`, made on first
    /// use and kept until the process exits (so repeated runs do not copy
    /// the image again). Matched by name, mode, length and SHA-256.
    pub fn cached(name: &str, bytes: &[u8], mode: u32) -> Result<&'static SealedFile> {
        static CACHE: std::sync::Mutex<Vec<(u32, &'static SealedFile)>> =
            std::sync::Mutex::new(Vec::new());
        let sha256: [u8; 32] = Sha256::digest(bytes).into();
        let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, f)) = c.iter().find(|(m, f)| {
            *m == mode && f.name == name && f.len == bytes.len() as u64 && f.sha256 == sha256
        }) {
            return Ok(f);
        }
        let f: &'static SealedFile = Box::leak(Box::new(SealedFile::new(name, bytes, mode)?));
        c.push((mode, f));
        Ok(f)
    }
}

/// A close-on-exec memfd that accepts seals; executable if `exec`.
fn memfd(name: &str, exec: bool) -> Result<OwnedFd> {
    let cname = CString::new(name).context("memfd name contains a NUL byte")?;
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    let create = |flags: libc::c_uint| {
        // SAFETY: a NUL-terminated name and plain flags.
        unsafe { libc::memfd_create(cname.as_ptr(), flags) }
    };
    let mut fd = create(if exec { base | MFD_EXEC } else { base });
    if fd < 0 && exec && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        // A kernel before 6.3: no MFD_EXEC, and memfds are executable.
        fd = create(base);
    }
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("memfd_create({name}) failed"));
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Seal against any change of content or size, and against new seals
/// (and, where the kernel has it, changes of the exec bits).
fn seal(fd: &OwnedFd) -> Result<()> {
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;
    let add = |s: libc::c_int| {
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, s) }
    };
    if add(seals | F_SEAL_EXEC) != 0 && add(seals) != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot seal a memfd");
    }
    if add(libc::F_SEAL_SEAL) != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot seal a memfd");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_files_cannot_change_and_read_back_whole() {
        let f = SealedFile::new("t", b"hello", 0o644).unwrap();
        assert_eq!(std::fs::read(f.exec_path()).unwrap(), b"hello");
        assert_eq!(std::fs::read(f.proc_path()).unwrap(), b"hello");
        // Reopened for writing through /proc, it still refuses writes.
        let w = std::fs::OpenOptions::new().write(true).open(f.proc_path());
        if let Ok(mut w) = w {
            assert!(std::io::Write::write_all(&mut w, b"x").is_err());
        }
        // SAFETY: F_GET_SEALS on a descriptor we own.
        let seals = unsafe { libc::fcntl(f.fd().as_raw_fd(), libc::F_GET_SEALS) };
        for s in [libc::F_SEAL_WRITE, libc::F_SEAL_GROW, libc::F_SEAL_SEAL] {
            assert_ne!(seals & s, 0, "{seals:#x}");
        }
    }

    #[test]
    fn the_cache_reuses_identical_content_only() {
        let a = SealedFile::cached("c", b"one", 0o644).unwrap();
        let b = SealedFile::cached("c", b"one", 0o644).unwrap();
        let c = SealedFile::cached("c", b"two", 0o644).unwrap();
        assert!(std::ptr::eq(a, b));
        assert!(!std::ptr::eq(a, c));
    }

    #[test]
    fn an_executable_memfd_runs() {
        // /bin/true's bytes, run from memory.
        let bytes = std::fs::read("/bin/true").unwrap();
        let f = SealedFile::new("true", &bytes, 0o755).unwrap();
        let st = std::process::Command::new(f.exec_path()).status().unwrap();
        assert!(st.success());
    }
}
