#![allow(dead_code)]
//! Helpers shared by the integration tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// These tests load BPF programs and drive /dev/kvm: they need root. CI runs
/// as root; elsewhere they fail loudly instead of passing vacuously.
pub fn require_root() {
    assert!(
        livehost_common::is_root(),
        "this test needs root (BPF programs, /dev/kvm, cgroupfs); run `sudo -E cargo test -p ebpf`"
    );
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Minimal HTTP GET returning (status line, body); bounded by `timeout`.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr.parse().expect("addr"), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.take(64 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    // Prometheus answers chunked; our checks only search the body text.
    Ok((status, body.to_string()))
}

/// Poll `f` every 100 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed (and reaped) on drop, so a failing assertion
/// never leaves it running.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Names of loaded BPF programs (from bpftool), to check nothing leaked.
pub fn loaded_prog_names() -> Vec<String> {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "list", "-j"])
        .output()
        .expect("bpftool (Debian package bpftool) must be installed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.get("name").and_then(|n| n.as_str()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The report of the interval between two snapshots of `obs`.
pub fn interval_report(
    obs: &livehost_ebpf::observer::Observer,
    prev: &livehost_ebpf::snapshot::RawSnapshot,
    cur: &livehost_ebpf::snapshot::RawSnapshot,
    resolver: &mut livehost_ebpf::cgroup::Resolver,
    opts: &livehost_ebpf::report::ReportOptions,
) -> livehost_ebpf::report::Report {
    livehost_ebpf::report::build(
        cur,
        Some(prev),
        resolver,
        livehost_ebpf::report::Programs {
            attached: obs.attached.clone(),
            skipped: vec![],
        },
        opts,
    )
}
