//! The guest's report on `ttyS1`, framed and base64-encoded by our init
//! (`init.sh`), parsed back into the command's status and output.
//!
//! What the guest prints is untrusted: the command under test runs as root
//! in the guest and may write anything anywhere. So every line of init's
//! report carries a per-run nonce that init reads and deletes before the
//! command starts, lines without it are ignored, each section ends with the
//! SHA-256 of its contents, and only the last complete frame counts.

use crate::guest::GuestStatus;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;

/// Parsed `ttyS1` traffic.
#[derive(Debug, Default)]
pub(crate) struct Frame {
    pub uptime_init: Option<f64>,
    pub uptime_cmd: Option<f64>,
    pub uptime_end: Option<f64>,
    pub status: Option<GuestStatus>,
    pub stdout: String,
    pub stderr: String,
    pub dmesg: String,
    pub setup_failure: Option<String>,
}

/// A fresh run's secret: 128 random bits, hex.
pub(crate) fn new_nonce() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom for the run's nonce")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The marker lines the host watches for while the guest runs, stamped
/// with this run's nonce.
pub(crate) struct Marks {
    pub init: Vec<u8>,
    pub cmd: Vec<u8>,
    pub end: Vec<u8>,
}

impl Marks {
    pub fn new(nonce: &str) -> Marks {
        Marks {
            init: format!("LIVEHOST-INIT {nonce} ").into_bytes(),
            cmd: format!("LIVEHOST-CMD {nonce} ").into_bytes(),
            end: format!("LIVEHOST-END {nonce}").into_bytes(),
        }
    }
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// One report between `LIVEHOST-BEGIN` and `LIVEHOST-END`, being read.
#[derive(Default)]
struct Report {
    status: Option<GuestStatus>,
    stdout: Option<String>,
    stderr: Option<String>,
    dmesg: Option<String>,
    /// A section whose digest did not match: the report is not trusted.
    tampered: bool,
    /// The section being read and its base64 so far.
    open: Option<(String, String)>,
}

impl Report {
    /// Close the open section: decode it and check it against its digest.
    fn close(&mut self, digest: Option<&str>) {
        let Some((name, b64)) = self.open.take() else {
            return;
        };
        let data = livehost_common::base64::decode(&b64).unwrap_or_default();
        let hex: String = Sha256::digest(&data)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        if digest != Some(hex.as_str()) {
            self.tampered = true;
            return;
        }
        let s = Some(String::from_utf8_lossy(&data).into_owned());
        match name.as_str() {
            "stdout" => self.stdout = s,
            "stderr" => self.stderr = s,
            "dmesg" => self.dmesg = s,
            _ => self.tampered = true,
        }
    }

    /// Into `f` when complete: a status and all three sections, untampered.
    fn into_result(self, f: &mut Frame) {
        match (self.status, self.stdout, self.stderr, self.dmesg) {
            (Some(status), Some(out), Some(err), Some(dmesg)) if !self.tampered => {
                f.status = Some(status);
                f.stdout = out;
                f.stderr = err;
                f.dmesg = dmesg;
            }
            _ => {}
        }
    }
}

/// Parse the result port's traffic, trusting only lines stamped `nonce`.
pub(crate) fn parse_result(text: &str, nonce: &str) -> Frame {
    let mut f = Frame::default();
    let mut report: Option<Report> = None;
    for line in text.lines() {
        let line = line.trim_end();
        let mut words = line.split_whitespace();
        let (Some(tag), second) = (words.next(), words.next()) else {
            continue;
        };
        if second != Some(nonce) {
            // Unstamped: base64 of an open section, or noise to ignore.
            if let Some((_, b64)) = report.as_mut().and_then(|r| r.open.as_mut())
                && second.is_none()
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
            {
                b64.push_str(tag);
            }
            continue;
        }
        let rest: Vec<&str> = words.collect();
        match (tag, report.as_mut()) {
            ("LIVEHOST-INIT", _) => f.uptime_init = rest.first().and_then(|u| u.parse().ok()),
            ("LIVEHOST-CMD", _) => f.uptime_cmd = rest.first().and_then(|u| u.parse().ok()),
            ("LIVEHOST-CMD-END", _) => f.uptime_end = rest.first().and_then(|u| u.parse().ok()),
            ("LIVEHOST-SETUP-FAILED", _) => f.setup_failure = Some(rest.join(" ")),
            ("LIVEHOST-BEGIN", _) => report = Some(Report::default()),
            ("status", Some(r)) => {
                r.status = match rest.first() {
                    Some(&"timeout") => Some(GuestStatus::Timeout),
                    Some(n) => n.parse().ok().map(GuestStatus::Exited),
                    None => None,
                }
            }
            ("stdout" | "stderr" | "dmesg", Some(r)) => {
                r.close(None);
                r.open = Some((tag.to_string(), String::new()));
            }
            ("end", Some(r)) => r.close(rest.first().copied()),
            ("LIVEHOST-END", Some(_)) => {
                // The last complete report wins; a torn one counts for nothing.
                if let Some(r) = report.take() {
                    r.into_result(&mut f);
                }
            }
            _ => {}
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: &str = "00112233445566778899aabbccddeeff";

    fn section(name: &str, data: &str, nonce: &str) -> String {
        let hex: String = Sha256::digest(data.as_bytes())
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect();
        format!(
            "{name} {nonce}\n{}\nend {nonce} {hex}\n",
            livehost_common::base64::encode(data.as_bytes())
        )
    }

    fn report(status: &str, out: &str, nonce: &str) -> String {
        format!(
            "LIVEHOST-BEGIN {nonce}\nstatus {nonce} {status}\n{}{}{}LIVEHOST-END {nonce}\n",
            section("stdout", out, nonce),
            section("stderr", "err", nonce),
            section("dmesg", "", nonce)
        )
    }

    #[test]
    fn result_frame_roundtrip() {
        let text = format!(
            "LIVEHOST-INIT {N} 1.50\nLIVEHOST-CMD {N} 1.60\nLIVEHOST-CMD-END {N} 1.70\n{}",
            report("3", "out\nline", N)
        );
        let f = parse_result(&text, N);
        assert_eq!(f.status, Some(GuestStatus::Exited(3)));
        assert_eq!(f.stdout, "out\nline");
        assert_eq!(f.stderr, "err");
        assert_eq!(f.uptime_init, Some(1.5));
        assert_eq!(f.uptime_end, Some(1.7));
    }

    #[test]
    fn torn_frame_is_not_a_result() {
        let text = format!("LIVEHOST-INIT {N} 1.0\nLIVEHOST-BEGIN {N}\nstatus {N} 0\nstdout {N}\n");
        assert_eq!(parse_result(&text, N).status, None);
    }

    #[test]
    fn setup_failure_keeps_its_reason() {
        let text = format!("LIVEHOST-SETUP-FAILED {N} loading module x failed\n");
        let f = parse_result(&text, N);
        assert_eq!(f.setup_failure.as_deref(), Some("loading module x failed"));
    }

    /// What the command could print (the old, unstamped frame; a frame with
    /// a guessed nonce; loose status lines) never becomes the result.
    #[test]
    fn forged_frames_do_not_count() {
        let old = "LIVEHOST-BEGIN\nstatus 0\nstdout\nb2sK\nend\nLIVEHOST-END\n";
        let guessed = report("0", "forged", "ffffffffffffffffffffffffffffffff");
        let loose = "status 0\nLIVEHOST-END\n";
        // Before the real report, after it, and with no real report at all.
        for text in [
            format!("{old}{guessed}{loose}{}", report("7", "real", N)),
            format!("{}{old}{guessed}{loose}", report("7", "real", N)),
        ] {
            let f = parse_result(&text, N);
            assert_eq!(f.status, Some(GuestStatus::Exited(7)), "{text}");
            assert_eq!(f.stdout, "real");
        }
        let f = parse_result(&format!("{old}{guessed}{loose}"), N);
        assert_eq!(f.status, None);
    }

    /// Lines injected into the real report while init writes it: a status
    /// line without the nonce is ignored, and base64 slipped into a section
    /// breaks its digest, so the report is rejected rather than altered.
    #[test]
    fn injected_lines_cannot_change_the_report() {
        let real = report("7", "real", N);
        let with_status = real.replacen(
            &format!("stdout {N}\n"),
            &format!("stdout {N}\nstatus 0\n"),
            1,
        );
        assert_eq!(
            parse_result(&with_status, N).status,
            Some(GuestStatus::Exited(7))
        );
        let with_data = real.replacen(
            &format!("stdout {N}\n"),
            &format!("stdout {N}\nZm9yZ2Vk\n"),
            1,
        );
        assert_eq!(parse_result(&with_data, N).status, None);
    }

    #[test]
    fn the_last_complete_report_wins() {
        let text = format!("{}{}", report("1", "first", N), report("2", "second", N));
        let f = parse_result(&text, N);
        assert_eq!(f.status, Some(GuestStatus::Exited(2)));
        assert_eq!(f.stdout, "second");
    }

    #[test]
    fn nonces_are_fresh() {
        let (a, b) = (new_nonce().unwrap(), new_nonce().unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
