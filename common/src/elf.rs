//! Little-endian field reads and the PVH entry note, for the two places
//! that read ELF images themselves (kernel-tests' vmlinux, vmm-bench's
//! unikernel loader). Both read outside data: every read is bounds-checked
//! and returns `None` rather than panicking.

pub fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

pub fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit entry point a PVH loader (QEMU,
/// our VMM) starts the image at.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// The PVH entry address in a PT_NOTE segment's bytes, if a `Xen` note of
/// type 18 is there.
pub fn pvh_entry_in_notes(notes: &[u8]) -> Option<u32> {
    let mut o = 0usize;
    while o.checked_add(12).is_some_and(|e| e <= notes.len()) {
        let namesz = u32_at(notes, o)? as usize;
        let descsz = u32_at(notes, o + 4)? as usize;
        let ty = u32_at(notes, o + 8)?;
        let name_off = o + 12;
        let desc_off = name_off.checked_add(namesz.checked_add(3)? & !3)?;
        let next = desc_off.checked_add(descsz.checked_add(3)? & !3)?;
        if ty == XEN_ELFNOTE_PHYS32_ENTRY
            && notes.get(name_off..name_off.checked_add(namesz)?)? == b"Xen\0"
            && descsz >= 4
        {
            return u32_at(notes, desc_off);
        }
        o = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], ty: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&ty.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend_from_slice(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    #[test]
    fn finds_the_entry_after_other_notes_and_never_panics() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3]);
        notes.extend(note(b"Xen\0", 18, &0x0100_0000u32.to_le_bytes()));
        assert_eq!(pvh_entry_in_notes(&notes), Some(0x0100_0000));
        for cut in 0..notes.len() {
            let _ = pvh_entry_in_notes(&notes[..cut]);
        }
        assert_eq!(pvh_entry_in_notes(&note(b"Xen\0", 17, &[0; 4])), None);
        let mut huge = note(b"Xen\0", 18, &[0; 4]);
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pvh_entry_in_notes(&huge), None);
        assert_eq!(u64_at(&[0; 8], usize::MAX), None);
    }
}
