//! The guest's report on `ttyS1`, framed and base64-encoded by our init
//! (`init.sh`), parsed back into the command's status and output.

use crate::guest::GuestStatus;

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

/// Marker lines init writes as it goes; the host watches for them.
pub(crate) const INIT_MARK: &[u8] = b"LIVEHOST-INIT ";
pub(crate) const CMD_MARK: &[u8] = b"LIVEHOST-CMD ";
pub(crate) const END_MARK: &[u8] = b"LIVEHOST-END";

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

impl Frame {
    /// Store a base64 section's decoded text.
    fn section(&mut self, name: &str, b64: &str) {
        let data = livehost_common::base64::decode(b64).unwrap_or_default();
        let s = String::from_utf8_lossy(&data).into_owned();
        match name {
            "stdout" => self.stdout = s,
            "stderr" => self.stderr = s,
            "dmesg" => self.dmesg = s,
            _ => {}
        }
    }

    /// A line outside a section; true when it is the end marker.
    fn line<'a>(&mut self, line: &'a str, section: &mut Option<&'a str>) -> bool {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("LIVEHOST-INIT"), Some(u)) => self.uptime_init = u.parse().ok(),
            (Some("LIVEHOST-CMD"), Some(u)) => self.uptime_cmd = u.parse().ok(),
            (Some("LIVEHOST-CMD-END"), Some(u)) => self.uptime_end = u.parse().ok(),
            (Some("LIVEHOST-SETUP-FAILED"), _) => {
                let why = line.trim_start_matches("LIVEHOST-SETUP-FAILED").trim();
                self.setup_failure = Some(why.to_string())
            }
            (Some("status"), Some("timeout")) => self.status = Some(GuestStatus::Timeout),
            (Some("status"), Some(n)) => self.status = n.parse().ok().map(GuestStatus::Exited),
            (Some(s @ ("stdout" | "stderr" | "dmesg")), None) => *section = Some(s),
            (Some("LIVEHOST-END"), _) => return true,
            _ => {}
        }
        false
    }
}

pub(crate) fn parse_result(text: &str) -> Frame {
    let mut f = Frame::default();
    let mut section: Option<&str> = None;
    let mut buf = String::new();
    let mut complete = false;
    for line in text.lines() {
        let line = line.trim_end();
        match section {
            Some(sec) if line == "end" => {
                f.section(sec, &buf);
                buf.clear();
                section = None;
            }
            Some(_) => buf.push_str(line.trim()),
            None => complete |= f.line(line, &mut section),
        }
    }
    if !complete {
        // A torn frame (guest died mid-report) must not pass for a result.
        f.status = None;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_frame_roundtrip() {
        let b64 = |s: &str| livehost_common::base64::encode(s.as_bytes());
        let text = format!(
            "LIVEHOST-INIT 1.50\nLIVEHOST-CMD 1.60\nLIVEHOST-CMD-END 1.70\nLIVEHOST-BEGIN\nstatus 3\nstdout\n{}\nend\nstderr\n{}\nend\ndmesg\n\nend\nLIVEHOST-END\n",
            b64("out\nline"),
            b64("err")
        );
        let f = parse_result(&text);
        assert_eq!(f.status, Some(GuestStatus::Exited(3)));
        assert_eq!(f.stdout, "out\nline");
        assert_eq!(f.stderr, "err");
        assert_eq!(f.uptime_init, Some(1.5));
    }

    #[test]
    fn torn_frame_is_not_a_result() {
        let f = parse_result("LIVEHOST-INIT 1.0\nLIVEHOST-BEGIN\nstatus 0\nstdout\n");
        assert_eq!(f.status, None);
    }

    #[test]
    fn setup_failure_keeps_its_reason() {
        let f = parse_result("LIVEHOST-SETUP-FAILED loading module x failed\n");
        assert_eq!(f.setup_failure.as_deref(), Some("loading module x failed"));
    }
}
