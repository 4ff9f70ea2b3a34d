//! SIGINT, SIGTERM and SIGHUP during a change (Ctrl-C, systemd's stop
//! timeout, an SSH drop) must not kill hotpatch with a patch in
//! transition: while a change runs they only set a flag, and the transition
//! wait sees it and takes the rollback path. SIGKILL cannot be caught; the
//! journal's "begin" entries cover that ([`crate::reconcile`]).

use std::sync::atomic::{AtomicI32, Ordering};

static CAUGHT: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    CAUGHT.store(sig, Ordering::SeqCst);
}

/// The signals turned into a rollback.
pub const CAUGHT_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Catch [`CAUGHT_SIGNALS`] from now on (for the rest of the process: the
/// commands that change the kernel call this first).
pub fn catch() {
    for sig in CAUGHT_SIGNALS {
        // SAFETY: a zeroed sigaction with a handler that only stores to an
        // atomic; no SA_RESTART, so a blocking call returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The signal caught since the process started, if any.
pub fn caught() -> Option<i32> {
    match CAUGHT.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The signal's name, for messages and the journal.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}
