//! Exit codes shared by the livehost binaries, so scripts can tell outcomes
//! apart without parsing text.

/// The operation did what was asked.
pub const SUCCESS: i32 = 0;
/// Something went wrong that is not one of the specific outcomes below
/// (I/O error, kernel refused, bug).
pub const ERROR: i32 = 1;
/// The command line was wrong (clap uses 2 as well).
pub const USAGE: i32 = 2;
/// A preflight check refused the operation; nothing was changed.
pub const REFUSED: i32 = 3;
/// A kernel transition stalled and was rolled back; the system is as before.
pub const ROLLED_BACK: i32 = 4;
/// A guest or a wait ran past its deadline.
pub const TIMEOUT: i32 = 124;
/// The guest kernel panicked (kernel-tests).
pub const GUEST_PANIC: i32 = 125;
/// The guest's set-up failed, or it ended without reporting a result
/// (kernel-tests).
pub const GUEST_SETUP_FAILED: i32 = 126;
/// A freshly started process could not execute its program (the shell's
/// "command not found" status).
pub const EXEC_FAILED: i32 = 127;
/// A process killed by signal N ends with `SIGNALED + N` (the shell's
/// convention); see [`signaled`].
pub const SIGNALED: i32 = 128;
/// Whoever read our stdout went away: what a shell tool killed by SIGPIPE
/// reports.
pub const BROKEN_PIPE: i32 = signaled(libc::SIGPIPE);

/// The exit status for "stopped by signal `sig`".
pub const fn signaled(sig: i32) -> i32 {
    SIGNALED + sig
}

#[cfg(test)]
mod tests {
    #[test]
    fn shell_conventions() {
        assert_eq!(super::BROKEN_PIPE, 141);
        assert_eq!(super::signaled(libc::SIGTERM), 143);
    }
}
