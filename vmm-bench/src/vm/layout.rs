//! Guest-physical layout shared by the VMM and the unikernel
//! (vmm-bench/unikernel/main.rs repeats these numbers; change both). The
//! generic part (GDT, page tables, port map) is `livehost_kvm::layout`.

pub use livehost_kvm::layout::{
    BOOT_TIMER_MAGIC, BOOT_TIMER_PORT, DEBUG_EXIT_PORT, GDT, GDT_ENTRIES, MIN_RAM, NULL_PORT, PD,
    PDPT, PML4, RESULT_MMIO, SERIAL_PORT,
};

pub const MAILBOX: u64 = 0x1000;
pub const MAILBOX_MAGIC: u64 = 0x4c48_4d42_5543_4b31;
/// Where images are linked and raw code is loaded.
pub const IMAGE_BASE: u64 = livehost_kvm::layout::CODE_BASE;
/// Where the workload buffer starts in guest RAM.
pub const BUF_BASE: u64 = 16 << 20;

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
