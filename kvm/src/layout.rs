//! The guest-physical layout and port map the exit loop and the long-mode
//! set-up assume. vmm-bench's unikernel repeats these numbers
//! (vmm-bench/unikernel/main.rs); change both.

/// Smallest guest RAM [`run_raw`](crate::run_raw) uses: page tables, a
/// mailbox page and a 2 MiB slot for code at [`CODE_BASE`].
pub const MIN_RAM: usize = 4 << 20;
/// Smallest guest RAM a long-mode vCPU needs: its GDT and page tables lie
/// below this.
pub const LONG_MODE_MIN_RAM: usize = 0x10000;
pub const GDT: u64 = 0x500;
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
/// Four page directories, 0xb000..0xf000: 4 GiB of 2 MiB pages, so the MMIO
/// window at [`RESULT_MMIO`] is mapped too.
pub const PD: u64 = 0xb000;
/// Where long-mode code is loaded (and images linked); the long-mode stack
/// grows down from here.
pub const CODE_BASE: u64 = 0x20_0000;
/// Where real-mode code is loaded (CS base 0, below 64 KiB).
pub const REAL_CODE: u64 = 0x8000;
/// The real-mode stack top.
pub const REAL_STACK: u64 = 0x7000;
pub const SERIAL_PORT: u16 = 0x3f8;
pub const BOOT_TIMER_PORT: u16 = 0x440;
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// A port no device claims: writes to it are pure exit round trips.
pub const NULL_PORT: u16 = 0x441;
/// QEMU's isa-debug-exit port, which ends a run.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// An 8-byte MMIO write here is the guest's result; RAM must stay below it.
pub const RESULT_MMIO: u64 = 0xd000_0000;

/// GDT entries: null, 64-bit code (selector 8), data (selector 0x10).
pub const GDT_ENTRIES: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
/// The code and data selectors matching [`GDT_ENTRIES`].
pub const CODE_SELECTOR: u16 = 8;
pub const DATA_SELECTOR: u16 = 0x10;

/// The bytes of the long-mode tables, as (guest address, contents): the
/// GDT, and page tables identity-mapping the first 4 GiB in 2 MiB pages.
pub fn long_mode_tables() -> [(u64, Vec<u8>); 4] {
    let le = |v: &mut Vec<u8>, x: u64| v.extend_from_slice(&x.to_le_bytes());
    let mut gdt = Vec::new();
    GDT_ENTRIES.iter().for_each(|&e| le(&mut gdt, e));
    let mut pml4 = Vec::new();
    le(&mut pml4, PDPT | 3);
    let mut pdpt = Vec::with_capacity(32);
    (0..4u64).for_each(|i| le(&mut pdpt, (PD + i * 0x1000) | 3));
    let mut pd = Vec::with_capacity(2048 * 8);
    // present | writable | 2 MiB page
    (0..2048u64).for_each(|i| le(&mut pd, (i << 21) | 0x83));
    [(GDT, gdt), (PML4, pml4), (PDPT, pdpt), (PD, pd)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_fit_below_the_long_mode_minimum() {
        for (at, bytes) in long_mode_tables() {
            assert!(at as usize + bytes.len() <= LONG_MODE_MIN_RAM, "{at:#x}");
        }
    }
}
