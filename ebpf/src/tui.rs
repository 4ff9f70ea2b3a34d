//! The terminal view of `overhead top`: clears and redraws the plain tables
//! with ANSI sequences; q or Ctrl-C quits.

use crate::report::{Report, render_text};
use anyhow::Result;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub fn run(
    interval: Duration,
    iterations: Option<u64>,
    stop: &AtomicBool,
    mut next: impl FnMut() -> Result<Report>,
) -> Result<()> {
    let mut n = 0;
    let mut out = std::io::stdout();
    while !stop.load(Ordering::SeqCst) && iterations.is_none_or(|m| n < m) {
        let end = Instant::now() + interval;
        while Instant::now() < end && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = next()?;
        let rows = terminal_rows().saturating_sub(8) / 2;
        write!(out, "\x1b[H\x1b[2J{}", render_text(&r, rows.max(3)))?;
        out.flush()?;
        n += 1;
    }
    Ok(())
}

fn terminal_rows() -> usize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills the winsize we pass; failure leaves it zeroed.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 {
        ws.ws_row as usize
    } else {
        40
    }
}
