//! vmm-bench's VMM: the generic KVM parts come from the `livehost-kvm`
//! crate (one type per kernel object, the mode set-ups, the exit loop and
//! its watchdog, the probe); what is vmm-bench's own lives here: the
//! unikernel's mailbox layout, its ELF loader, and the boot and bench runs.

pub mod boot;
pub mod elf;
pub mod layout;
pub mod probe;

pub use livehost_kvm::{
    ExitCounts, Kvm, Mode, Observed, Phases, RunEnd, RunError, Vcpu, Vm, Watchdog,
};
