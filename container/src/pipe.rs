//! Pipes to a child and bounded reads of them: at most 1 MiB is kept and
//! the rest discarded, so a chatty child never blocks on a full pipe.

use crate::reap::TimedOut;
use anyhow::{Context, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2 failed");
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads a pipe to EOF or the deadline ([`TimedOut::Output`]).
pub fn read_until(fd: OwnedFd, deadline: Instant) -> Result<String> {
    let (out, eof) = read_pipe(&fd, deadline)?;
    if !eof {
        return Err(TimedOut::Output.into());
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Drain a pipe on a thread of its own until EOF or the deadline, so a
/// child writing much to it never blocks while we read something else; the
/// thread returns what it read (at most 1 MiB is kept).
pub fn drain(fd: OwnedFd, deadline: Instant) -> std::thread::JoinHandle<String> {
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
