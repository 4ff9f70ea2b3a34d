//! Thread and process names: /proc while the task lives, else what the BPF
//! side saw when it first met the thread.

use crate::snapshot::Comm;

pub fn comm(pid: u32) -> String {
    livehost_common::sysfs::read_attr(format!("/proc/{pid}/comm")).unwrap_or_else(|_| "?".into())
}

/// A thread's name: /proc while it lives, else what BPF saw at first sight.
pub fn comm_or(pid: u32, seen: Option<&Comm>) -> String {
    let live = comm(pid);
    if live != "?" {
        return live;
    }
    match seen {
        Some(c) => {
            let end = c.iter().position(|b| *b == 0).unwrap_or(c.len());
            let s = String::from_utf8_lossy(&c[..end]).into_owned();
            if s.is_empty() { live } else { s }
        }
        None => live,
    }
}
