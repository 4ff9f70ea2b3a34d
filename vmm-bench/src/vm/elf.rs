//! Loading a unikernel ELF into guest RAM. The image is outside data: every
//! field is bounds-checked and a bad image is refused with the reason before
//! anything is written to the guest.

use super::{Vm, layout};
use anyhow::{Result, bail};
use livehost_common::elf::{pvh_entry_in_notes, u16_at, u32_at, u64_at};

/// Largest image we accept; ours is ~12 KB, and a bound keeps a wrong path
/// (a disk image, a core dump) from being read whole.
pub const MAX_IMAGE: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub memsz: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub entry: u64,
    pub segments: Vec<Segment>,
    /// The PVH entry from the Xen ELF note, if present.
    pub pvh_entry: Option<u32>,
}

/// The ELF header's checks: a 64-bit little-endian x86-64 static
/// executable. Returns (entry, phoff, phentsize, phnum).
fn header(b: &[u8]) -> Result<(u64, u64, u64, u64)> {
    if b.len() as u64 > MAX_IMAGE {
        bail!(
            "image is {} bytes, larger than the {} MiB limit: this is not a vmm-bench unikernel",
            b.len(),
            MAX_IMAGE >> 20
        );
    }
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        bail!("not an ELF file (bad magic or shorter than an ELF header)");
    }
    if b[4] != 2 || b[5] != 1 {
        bail!(
            "not a 64-bit little-endian ELF (class {}, data {})",
            b[4],
            b[5]
        );
    }
    let trunc = || anyhow::anyhow!("ELF header is truncated");
    let e_type = u16_at(b, 16).ok_or_else(trunc)?;
    let machine = u16_at(b, 18).ok_or_else(trunc)?;
    if machine != 62 {
        bail!("ELF machine {machine} is not x86-64 (62)");
    }
    if e_type != 2 {
        bail!("ELF type {e_type} is not a static executable (ET_EXEC): link with -no-pie");
    }
    let entry = u64_at(b, 24).ok_or_else(trunc)?;
    let phoff = u64_at(b, 32).ok_or_else(trunc)?;
    let phentsize = u16_at(b, 54).ok_or_else(trunc)? as u64;
    let phnum = u16_at(b, 56).ok_or_else(trunc)? as u64;
    if phentsize < 56 || phnum == 0 || phnum > 64 {
        bail!("ELF has {phnum} program headers of {phentsize} bytes: not a loadable image");
    }
    Ok((entry, phoff, phentsize, phnum))
}

/// Parse and check an image against a guest of `ram` bytes.
pub fn parse(b: &[u8], ram: usize) -> Result<Image> {
    let (entry, phoff, phentsize, phnum) = header(b)?;
    let trunc = || anyhow::anyhow!("ELF header is truncated");
    let mut segments = Vec::new();
    let mut pvh_entry = None;
    for i in 0..phnum {
        // phoff is outside data: every sum is checked, so a header offset
        // near u64::MAX is refused instead of wrapping or panicking.
        let o = phoff
            .checked_add(i * phentsize)
            .filter(|o| o.checked_add(56).is_some_and(|end| end <= b.len() as u64))
            .ok_or_else(|| anyhow::anyhow!("program header {i} lies outside the file"))?
            as usize;
        let p_type = u32_at(b, o).ok_or_else(trunc)?;
        let offset = u64_at(b, o + 8).ok_or_else(trunc)?;
        let paddr = u64_at(b, o + 24).ok_or_else(trunc)?;
        let filesz = u64_at(b, o + 32).ok_or_else(trunc)?;
        let memsz = u64_at(b, o + 40).ok_or_else(trunc)?;
        let in_file = offset
            .checked_add(filesz)
            .is_some_and(|end| end <= b.len() as u64);
        match p_type {
            1 => {
                if !in_file {
                    bail!(
                        "segment {i}: file range {offset:#x}+{filesz:#x} lies outside the {}-byte file",
                        b.len()
                    );
                }
                if filesz > memsz {
                    bail!("segment {i}: file size {filesz:#x} exceeds memory size {memsz:#x}");
                }
                let end = paddr.checked_add(memsz);
                if paddr < layout::IMAGE_BASE || end.is_none_or(|e| e > ram as u64) {
                    bail!(
                        "segment {i} at {paddr:#x}+{memsz:#x} does not fit guest RAM \
                         {:#x}..{:#x} (images are linked at 2 MiB; give the guest more RAM?)",
                        layout::IMAGE_BASE,
                        ram
                    );
                }
                segments.push(Segment {
                    paddr,
                    offset,
                    filesz,
                    memsz,
                });
            }
            4 if in_file => {
                pvh_entry = pvh_entry.or(pvh_entry_in_notes(
                    &b[offset as usize..(offset + filesz) as usize],
                ))
            }
            _ => {}
        }
    }
    if segments.is_empty() {
        bail!("ELF has no loadable segment");
    }
    if !segments
        .iter()
        .any(|s| entry >= s.paddr && entry < s.paddr + s.memsz)
    {
        bail!("entry point {entry:#x} lies outside every loadable segment");
    }
    Ok(Image {
        entry,
        segments,
        pvh_entry,
    })
}

/// Copy the image's segments into guest RAM (bss is already zero: guest RAM
/// comes from a fresh anonymous mapping).
pub fn load(vm: &Vm, bytes: &[u8], img: &Image) -> Result<()> {
    for s in &img.segments {
        vm.memory().write(
            s.paddr,
            &bytes[s.offset as usize..(s.offset + s.filesz) as usize],
        )?;
    }
    Ok(())
}
