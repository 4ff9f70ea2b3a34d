//! hotpatch's exit codes: one per state the kernel can be left in, so a
//! script (or a fleet agent) can tell "nothing happened" from "the host is
//! half-patched" without parsing text. 0-4 are the livehost-wide codes
//! (`livehost_common::exit`); 5-9 are hotpatch's own.

use livehost_common::exit;

pub const SUCCESS: i32 = exit::SUCCESS;
/// An error before anything changed in the kernel (missing file, bad
/// module, I/O), or one hotpatch cannot place.
pub const ERROR: i32 = exit::ERROR;
pub const USAGE: i32 = exit::USAGE;
/// A preflight check refused; nothing changed.
pub const REFUSED: i32 = exit::REFUSED;
/// A transition stalled (or the run was interrupted) and was reversed:
/// the kernel is as before.
pub const ROLLED_BACK: i32 = exit::ROLLED_BACK;
/// Stalled and left in transition on purpose (`--no-rollback`).
pub const LEFT_IN_TRANSITION: i32 = 5;
/// The transition stalled and so did its reverse: the patch is
/// half-applied, the kernel is mid-transition (`hotpatch status`).
pub const REVERSE_STALLED: i32 = 6;
/// The patch is off, but the kernel did not free it or its module could
/// not be removed: code no longer runs, the module is still loaded.
pub const MODULE_LEFT: i32 = 7;
/// `--force` failed: the force write was refused or the forced transition
/// did not finish.
pub const FORCE_FAILED: i32 = 8;
/// `status`: the host does not match its installed set (drift, something
/// in transition).
pub const DRIFT: i32 = 9;

/// The exit-code table, as `--help` and the README show it.
pub const HELP: &str = "Exit codes (for runs over several modules: the most severe one):\n  \
0 success (also: --force completed; already loaded)\n  \
1 error: nothing was changed, or a failure hotpatch cannot place\n  \
2 usage (bad arguments or option values)\n  \
3 preflight refused: nothing was changed\n  \
4 stalled, or interrupted by SIGINT/SIGTERM/SIGHUP, and rolled back: the kernel is as before\n  \
5 stalled and left in transition (--no-rollback)\n  \
6 stalled, and the reverse stalled too: half-applied, mid-transition\n  \
7 unpatched, but the patch was not freed or its module not removed\n  \
8 --force failed (write refused, or the forced transition timed out)\n  \
9 status: the host does not match its installed set\n\n\
Every change is journalled to <state-dir>/journal.jsonl (see `hotpatch journal`).";

/// How bad an exit code is for the host, for runs over many modules
/// (`load --installed`, `unload --all`): the worst one is the run's exit
/// code. Numeric order is not severity: a refusal (3) left the kernel
/// untouched, a module left loaded (7) did not.
pub fn severity(code: i32) -> u8 {
    match code {
        SUCCESS => 0,
        REFUSED => 1,
        ROLLED_BACK => 2,
        ERROR => 3,
        USAGE => 3,
        DRIFT => 4,
        MODULE_LEFT => 5,
        LEFT_IN_TRANSITION => 6,
        REVERSE_STALLED => 7,
        FORCE_FAILED => 8,
        _ => 3,
    }
}

/// The most severe of `codes` (success when there are none).
pub fn worst(codes: impl IntoIterator<Item = i32>) -> i32 {
    codes
        .into_iter()
        .max_by_key(|c| severity(*c))
        .unwrap_or(SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_is_by_severity_not_number() {
        // A module left loaded and a clean rollback: the host is not as
        // before, so the run is not "4, kernel as before".
        assert_eq!(worst([MODULE_LEFT, ROLLED_BACK]), MODULE_LEFT);
        assert_eq!(worst([ROLLED_BACK, ERROR]), ERROR);
        assert_eq!(worst([REFUSED, SUCCESS]), REFUSED);
        assert_eq!(worst([FORCE_FAILED, REVERSE_STALLED, 4]), FORCE_FAILED);
        assert_eq!(worst([]), SUCCESS);
    }

    #[test]
    fn help_lists_every_code() {
        for c in 0..=9 {
            assert!(
                HELP.contains(&format!("\n  {c} ")),
                "{c} missing from:\n{HELP}"
            );
        }
    }
}
