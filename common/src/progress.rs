//! Progress lines for long work.
//!
//! On a terminal, progress goes to stderr and rewrites one line; elsewhere
//! (CI logs, pipes) each step is one plain line so logs stay readable, and
//! nothing is written to stdout, which belongs to results and `--json`.

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// A named piece of long work that reports its steps on stderr.
pub struct Progress {
    label: String,
    start: Instant,
    tty: bool,
    quiet: bool,
}

impl Progress {
    pub fn new(label: impl Into<String>) -> Self {
        Progress {
            label: label.into(),
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            quiet: std::env::var_os("LIVEHOST_QUIET").is_some(),
        }
    }

    /// A progress reporter that prints nothing (library callers, tests).
    pub fn silent() -> Self {
        let mut p = Progress::new("");
        p.quiet = true;
        p
    }

    /// Report a step. On a terminal the line is overwritten by the next step.
    pub fn step(&self, msg: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64();
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(
                err,
                "\r\x1b[2K[{} {:>5.1}s] {}",
                self.label,
                secs,
                msg.as_ref()
            );
        } else {
            let _ = writeln!(err, "[{} {:>5.1}s] {}", self.label, secs, msg.as_ref());
        }
        let _ = err.flush();
    }

    /// Report a line that must stay visible (a decision the user should see,
    /// such as which accelerator was chosen).
    pub fn note(&self, msg: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = writeln!(err, "[{}] {}", self.label, msg.as_ref());
    }

    /// End the progress line on a terminal.
    pub fn finish(&self) {
        if self.tty && !self.quiet {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
}
