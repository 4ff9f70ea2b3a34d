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
