//! Guest-physical layout shared by the VMM and the unikernel
//! (vmm-bench/unikernel/main.rs repeats these numbers; change both).

use super::Vm;
use anyhow::Result;

/// Smallest guest RAM we accept: page tables, mailbox, a 2 MiB image slot.
pub const MIN_RAM: usize = 4 << 20;
pub const GDT: u64 = 0x500;
pub const MAILBOX: u64 = 0x1000;
pub const MAILBOX_MAGIC: u64 = 0x4c48_4d42_5543_4b31;
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
/// Four page directories, 0xb000..0xf000: 4 GiB of 2 MiB pages, so the MMIO
/// window at 0xd000_0000 is mapped too.
pub const PD: u64 = 0xb000;
/// Where images are linked and raw code is loaded.
pub const IMAGE_BASE: u64 = 0x20_0000;
/// Where the workload buffer starts in guest RAM.
pub const BUF_BASE: u64 = 16 << 20;
pub const SERIAL_PORT: u16 = 0x3f8;
pub const BOOT_TIMER_PORT: u16 = 0x440;
pub const BOOT_TIMER_MAGIC: u8 = 123;
pub const NULL_PORT: u16 = 0x441;
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
pub const RESULT_MMIO: u64 = 0xd000_0000;

/// Mailbox field offsets (u64 each), see the unikernel's `Mailbox`.
pub mod mb {
    pub const MAGIC: u64 = 0;
    pub const BUF_ADDR: u64 = 8;
    pub const BUF_LEN: u64 = 16;
    pub const SEED: u64 = 24;
    pub const LOOP_N: u64 = 32;
    pub const TSC_ENTRY: u64 = 64;
    pub const TSC_READY: u64 = 72;
    pub const TSC_DONE: u64 = 80;
    pub const CHECKSUM: u64 = 88;
    pub const WORKLOAD_CYC: u64 = 96;
    pub const PORT_CYC: u64 = 104;
    pub const CPUID_CYC: u64 = 112;
    pub const CALL_CYC: u64 = 120;
    pub const DONE: u64 = 128;
}

/// GDT entries: null, 64-bit code (selector 8), data (selector 0x10).
pub const GDT_ENTRIES: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

pub(crate) fn write_long_mode_tables(vm: &Vm) -> Result<()> {
    let mut gdt = Vec::new();
    for e in GDT_ENTRIES {
        gdt.extend_from_slice(&e.to_le_bytes());
    }
    vm.write(GDT, &gdt)?;
    vm.write(PML4, &(PDPT | 3).to_le_bytes())?;
    let mut pdpt = Vec::with_capacity(32);
    for i in 0..4u64 {
        pdpt.extend_from_slice(&((PD + i * 0x1000) | 3).to_le_bytes());
    }
    vm.write(PDPT, &pdpt)?;
    let mut pd = Vec::with_capacity(2048 * 8);
    for i in 0..2048u64 {
        // present | writable | 2 MiB page
        pd.extend_from_slice(&((i << 21) | 0x83).to_le_bytes());
    }
    vm.write(PD, &pd)
}
