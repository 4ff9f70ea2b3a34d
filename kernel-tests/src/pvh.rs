//! Booting the kernel's own ELF at its PVH entry instead of the bzImage.
//!
//! Under TCG every instruction is emulated, so the bzImage's real-mode
//! setup and its self-decompression of a ~50 MB kernel are a measurable
//! part of each boot (0.3-0.5 s of ~3 s here). QEMU can start an
//! uncompressed `vmlinux` directly in 32-bit protected mode through the
//! PVH entry point (Xen ELF note 18) when the kernel is built with
//! `CONFIG_PVH`, as Debian's are. We recover that ELF from the bzImage's
//! payload once and cache it beside the image.

use anyhow::{Context, Result, anyhow, bail};
use livehost_common::elf::{pvh_entry_in_notes, u16_at, u32_at, u64_at};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The compressed payload of a bzImage, with the decompressor it needs and
/// the uncompressed size the kernel build appended to it.
#[derive(Debug, PartialEq, Eq)]
pub struct Payload<'a> {
    pub tool: &'static str,
    pub data: &'a [u8],
    pub size: u32,
}

/// Locate the payload through the x86 boot protocol header (`HdrS`,
/// version 2.08 or later for `payload_offset`/`payload_length`).
pub fn payload(bz: &[u8]) -> Result<Payload<'_>> {
    if bz.get(0x202..0x206) != Some(b"HdrS") {
        bail!("not an x86 bzImage (no HdrS boot header)");
    }
    let version = u16_at(bz, 0x206).unwrap_or(0);
    if version < 0x208 {
        bail!("boot protocol {version:#x} predates payload fields (2.08)");
    }
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let pm = (setup_sects + 1) * 512;
    let off = u32_at(bz, 0x248).unwrap_or(0) as usize;
    let len = u32_at(bz, 0x24c).unwrap_or(0) as usize;
    let start = pm
        .checked_add(off)
        .ok_or_else(|| anyhow!("payload offset overflows"))?;
    let whole = start
        .checked_add(len)
        .and_then(|end| bz.get(start..end))
        .ok_or_else(|| anyhow!("payload ({len} bytes at {start}) lies outside the file"))?;
    // The build appends the uncompressed size (le32) to every x86 payload.
    let (data, tail) = whole
        .split_at_checked(whole.len().saturating_sub(4))
        .filter(|(_, t)| t.len() == 4)
        .ok_or_else(|| anyhow!("payload too short"))?;
    let size = u32_at(tail, 0).unwrap_or(0);
    let tool = match data {
        [0x1f, 0x8b, ..] => "gzip",
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => "xz",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [0x02, 0x21, 0x4c, 0x18, ..] => "lz4",
        [b'B', b'Z', b'h', ..] => "bzip2",
        [0x89, b'L', b'Z', b'O', ..] => "lzop",
        [0x5d, 0, 0, ..] => "lzma",
        _ => bail!("unknown compression of the kernel payload"),
    };
    Ok(Payload { tool, data, size })
}

/// Whether `elf` is a 64-bit little-endian ELF with a PVH entry note.
pub fn has_pvh_note(elf: &[u8]) -> bool {
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (u64_at(elf, 0x20), u16_at(elf, 0x36), u16_at(elf, 0x38))
    else {
        return false;
    };
    (0..phnum as u64).any(|i| {
        let Some(ph) = (phoff as usize).checked_add((i * phentsize as u64) as usize) else {
            return false;
        };
        if u32_at(elf, ph) != Some(4) {
            return false; // not PT_NOTE
        }
        let (Some(off), Some(size)) = (u64_at(elf, ph + 0x08), u64_at(elf, ph + 0x20)) else {
            return false;
        };
        let Some(notes) = (off as usize)
            .checked_add(size as usize)
            .and_then(|end| elf.get(off as usize..end))
        else {
            return false;
        };
        pvh_entry_in_notes(notes).is_some()
    })
}

fn decompress(p: &Payload) -> Result<Vec<u8>> {
    let mut child = Command::new(p.tool)
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {} (install it to boot through PVH)", p.tool))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let out = std::thread::scope(|s| {
        let writer = s.spawn(move || stdin.write_all(p.data));
        let out = child.wait_with_output();
        let _ = writer.join();
        out
    })?;
    if !out.status.success() && out.stdout.len() != p.size as usize {
        bail!(
            "{} -dc failed: {}",
            p.tool,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// The PVH-bootable ELF for `bzimage`, made once and cached as
/// `<bzimage>.pvh`. An error says why the bzImage must be booted instead.
pub fn image_for(bzimage: &Path) -> Result<PathBuf> {
    let cached = PathBuf::from(format!("{}.pvh", bzimage.display()));
    let newer = |a: &Path, b: &Path| -> bool {
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => match (a.modified(), b.modified()) {
                (Ok(a), Ok(b)) => a >= b,
                _ => false,
            },
            _ => false,
        }
    };
    if newer(&cached, bzimage) {
        return Ok(cached);
    }
    let bz =
        std::fs::read(bzimage).with_context(|| format!("cannot read {}", bzimage.display()))?;
    let p = payload(&bz)?;
    let elf = decompress(&p)?;
    if elf.len() != p.size as usize {
        bail!(
            "the payload decompressed to {} bytes, the image says {}",
            elf.len(),
            p.size
        );
    }
    if !has_pvh_note(&elf) {
        bail!("the kernel has no PVH entry (built without CONFIG_PVH)");
    }
    // Written aside and renamed: concurrent runs never see half a file.
    let tmp = PathBuf::from(format!("{}.{}.tmp", cached.display(), std::process::id()));
    std::fs::write(&tmp, &elf).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &cached)
        .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    Ok(cached)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 0x1000];
        b[0x1f1] = 1; // (1 + 1) * 512: protected-mode code at 0x400
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&0x10u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.truncate(0x410);
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn finds_the_payload_and_its_size() {
        let mut pl = vec![0x28, 0xb5, 0x2f, 0xfd, 9, 9];
        pl.extend_from_slice(&1234u32.to_le_bytes());
        let bz = bzimage(&pl);
        let p = payload(&bz).unwrap();
        assert_eq!(p.tool, "zstd");
        assert_eq!(p.size, 1234);
        assert_eq!(p.data, &pl[..6]);
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        assert!(payload(b"").is_err());
        assert!(payload(&[0u8; 0x300]).is_err());
        let mut bz = bzimage(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(
            payload(&bz)
                .unwrap_err()
                .to_string()
                .contains("compression")
        );
        bz[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(payload(&bz).unwrap_err().to_string().contains("outside"));
        for cut in 0..bz.len() {
            let _ = payload(&bz[..cut]);
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            let buf: Vec<u8> = (0..2048)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = payload(&buf);
            assert!(!has_pvh_note(&buf));
        }
    }

    #[test]
    fn pvh_note_is_found_in_a_note_segment() {
        let mut elf = vec![0u8; 0x200];
        elf[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[0x40..0x44].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        elf[0x48..0x50].copy_from_slice(&0x100u64.to_le_bytes());
        elf[0x60..0x68].copy_from_slice(&40u64.to_le_bytes());
        // An unrelated note first, then Xen/18.
        let mut notes = Vec::new();
        for (name, kind) in [
            (&b"GNU\0"[..], 3u32),
            (
                &b"Xen\0"[..],
                livehost_common::elf::XEN_ELFNOTE_PHYS32_ENTRY,
            ),
        ] {
            notes.extend_from_slice(&4u32.to_le_bytes());
            notes.extend_from_slice(&4u32.to_le_bytes());
            notes.extend_from_slice(&kind.to_le_bytes());
            notes.extend_from_slice(name);
            notes.extend_from_slice(&[0; 4]);
        }
        elf[0x100..0x100 + notes.len()].copy_from_slice(&notes);
        assert!(has_pvh_note(&elf));
        elf[0x100 + 20 + 8] = 17; // the Xen note's type
        assert!(!has_pvh_note(&elf));
        for cut in 0..elf.len() {
            let _ = has_pvh_note(&elf[..cut]);
        }
    }
}
