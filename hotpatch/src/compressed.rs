//! Compressed modules (`.ko.xz`, `.ko.zst`: what Debian 13 and Fedora
//! install). The file's own bytes are what is hashed and recorded; the
//! inspector reads the decompressed ELF; `finit_module` gets the file with
//! MODULE_INIT_COMPRESSED_FILE on kernels that decompress (5.17+,
//! CONFIG_MODULE_DECOMPRESS), and otherwise the decompressed ELF through a
//! sealed memfd: derived from the very bytes that were hashed, never from
//! the path again.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::process::{Command, Stdio};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Xz,
    Zstd,
}

impl Compression {
    /// Recognise the container by its magic bytes (not the file name).
    pub fn detect(bytes: &[u8]) -> Option<Compression> {
        if bytes.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0x00]) {
            Some(Compression::Xz)
        } else if bytes.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
            Some(Compression::Zstd)
        } else {
            None
        }
    }

    fn tool(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
        }
    }
}

/// Decompress `data` with the system's `xz`/`zstd` (the tools the distros
/// that compress modules ship), reading at most `limit` bytes of output: a
/// decompression bomb is an error, not an out-of-memory.
pub fn decompress(c: Compression, data: &[u8], limit: u64) -> Result<Vec<u8>> {
    let tool = c.tool();
    let mut child = Command::new(tool)
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {tool} to decompress the module (install it)"))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let input = data.to_vec();
    let feeder = std::thread::spawn(move || {
        // A write error just means the tool stopped reading.
        let _ = stdin.write_all(&input);
    });
    let mut out = Vec::new();
    let read = child
        .stdout
        .take()
        .context("no stdout")?
        .take(limit + 1)
        .read_to_end(&mut out);
    if out.len() as u64 > limit {
        let _ = child.kill();
    }
    let status = child.wait()?;
    let _ = feeder.join();
    read.with_context(|| format!("reading {tool}'s output"))?;
    if out.len() as u64 > limit {
        bail!(
            "decompresses to more than {} MiB: not a kernel module",
            limit >> 20
        );
    }
    if !status.success() {
        bail!("{tool} could not decompress it (corrupt or truncated)");
    }
    Ok(out)
}

/// A sealed memfd holding `elf`: a file nobody can change, for
/// `finit_module` on kernels that cannot decompress themselves.
pub fn sealed_memfd(elf: &[u8]) -> Result<std::fs::File> {
    let name = c"hotpatch-module";
    // SAFETY: a valid C string and flags; the fd is owned below.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: fd is a fresh descriptor we own.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.write_all(elf)
        .context("writing the decompressed module")?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our own descriptor.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sealing the memfd");
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_bounds_output() {
        let data = vec![7u8; 100_000];
        for (c, tool) in [(Compression::Xz, "xz"), (Compression::Zstd, "zstd")] {
            let o = Command::new(tool)
                .arg("-c")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn();
            let Ok(mut child) = o else { continue };
            child.stdin.take().unwrap().write_all(&data).unwrap();
            let packed = child.wait_with_output().unwrap().stdout;
            assert_eq!(Compression::detect(&packed), Some(c));
            assert_eq!(decompress(c, &packed, 1 << 20).unwrap(), data);
            let e = decompress(c, &packed, 1000).unwrap_err().to_string();
            assert!(e.contains("more than"), "{e}");
            assert!(decompress(c, &packed[..packed.len() / 2], 1 << 20).is_err());
        }
        assert_eq!(Compression::detect(b"\x7fELF"), None);
    }
}
