//! Names for exit reason codes: VMX basic exit reasons (Intel SDM vol. 3
//! appendix C), SVM exit codes (AMD APM vol. 2 appendix C) and KVM's
//! `KVM_EXIT_*` user-space exit reasons (include/uapi/linux/kvm.h). Names
//! follow the kernel's own trace output (lowercase for SVM, upper for VMX).

use crate::intf::{ExitKind, KvmIsa};
use serde::{Deserialize, Serialize};

/// KVM_EXIT_IO: the user-space exit a port access causes.
pub const KVM_EXIT_IO: u32 = 2;
pub const KVM_EXIT_HLT: u32 = 5;

/// SVM exit code of an I/O instruction (what port access exits as on AMD).
pub const SVM_EXIT_IOIO: u32 = 0x7b;
/// SVM exit code of a nested page fault.
pub const SVM_EXIT_NPF: u32 = 0x400;
/// HLT exits (their exit-to-entry time is the guest idling).
pub const SVM_EXIT_HLT: u32 = 0x078;
pub const SVM_EXIT_IDLE_HLT: u32 = 0x0a6;
pub const VMX_EXIT_HLT: u32 = 12;

/// Which table an exit's `reason` code belongs to (`isa` in JSON): the
/// vendor's for hardware exits, KVM's `KVM_EXIT_*` for user-space exits, a
/// port number for port I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReasonTable {
    Vmx,
    Svm,
    /// A hardware exit of a vendor this build does not know.
    Unknown,
    Kvm,
    Port,
}

impl ReasonTable {
    pub fn of(kind: ExitKind, isa: KvmIsa) -> ReasonTable {
        match (kind, isa) {
            (ExitKind::Hw, KvmIsa::Vmx) => ReasonTable::Vmx,
            (ExitKind::Hw, KvmIsa::Svm) => ReasonTable::Svm,
            (ExitKind::Hw, KvmIsa::Unknown) => ReasonTable::Unknown,
            (ExitKind::User, _) => ReasonTable::Kvm,
            (ExitKind::PioIn | ExitKind::PioOut, _) => ReasonTable::Port,
        }
    }
}

pub fn vmx_reason_name(code: u32) -> Option<&'static str> {
    Some(match code {
        0 => "EXCEPTION_NMI",
        1 => "EXTERNAL_INTERRUPT",
        2 => "TRIPLE_FAULT",
        3 => "INIT_SIGNAL",
        4 => "SIPI_SIGNAL",
        7 => "INTERRUPT_WINDOW",
        8 => "NMI_WINDOW",
        9 => "TASK_SWITCH",
        10 => "CPUID",
        12 => "HLT",
        13 => "INVD",
        14 => "INVLPG",
        15 => "RDPMC",
        16 => "RDTSC",
        18 => "VMCALL",
        19 => "VMCLEAR",
        20 => "VMLAUNCH",
        21 => "VMPTRLD",
        22 => "VMPTRST",
        23 => "VMREAD",
        24 => "VMRESUME",
        25 => "VMWRITE",
        26 => "VMOFF",
        27 => "VMON",
        28 => "CR_ACCESS",
        29 => "DR_ACCESS",
        30 => "IO_INSTRUCTION",
        31 => "MSR_READ",
        32 => "MSR_WRITE",
        33 => "INVALID_STATE",
        34 => "MSR_LOAD_FAIL",
        36 => "MWAIT_INSTRUCTION",
        37 => "MONITOR_TRAP_FLAG",
        39 => "MONITOR_INSTRUCTION",
        40 => "PAUSE_INSTRUCTION",
        41 => "MCE_DURING_VMENTRY",
        43 => "TPR_BELOW_THRESHOLD",
        44 => "APIC_ACCESS",
        45 => "EOI_INDUCED",
        46 => "GDTR_IDTR",
        47 => "LDTR_TR",
        48 => "EPT_VIOLATION",
        49 => "EPT_MISCONFIG",
        50 => "INVEPT",
        51 => "RDTSCP",
        52 => "PREEMPTION_TIMER",
        53 => "INVVPID",
        54 => "WBINVD",
        55 => "XSETBV",
        56 => "APIC_WRITE",
        57 => "RDRAND",
        58 => "INVPCID",
        59 => "VMFUNC",
        60 => "ENCLS",
        61 => "RDSEED",
        62 => "PML_FULL",
        63 => "XSAVES",
        64 => "XRSTORS",
        67 => "UMWAIT",
        68 => "TPAUSE",
        74 => "BUS_LOCK",
        75 => "NOTIFY",
        _ => return None,
    })
}

const SVM_CR_DR: [&str; 4] = ["read_cr", "write_cr", "read_dr", "write_dr"];
const EXC_NAMES: [&str; 32] = [
    "DE", "DB", "NMI", "BP", "OF", "BR", "UD", "NM", "DF", "09", "TS", "NP", "SS", "GP", "PF",
    "15", "MF", "AC", "MC", "XM", "VE", "CP", "22", "23", "24", "25", "26", "27", "HV", "VC", "SX",
    "31",
];

/// SVM names. Ranged codes (CR/DR accesses, exceptions) are generated, so the
/// result is owned.
pub fn svm_reason_name(code: u32) -> Option<String> {
    let fixed = match code {
        0x060 => "intr",
        0x061 => "nmi",
        0x062 => "smi",
        0x063 => "init",
        0x064 => "vintr",
        0x065 => "cr0_sel_write",
        0x066 => "read_idtr",
        0x067 => "read_gdtr",
        0x068 => "read_ldtr",
        0x069 => "read_rt",
        0x06a => "write_idtr",
        0x06b => "write_gdtr",
        0x06c => "write_ldtr",
        0x06d => "write_rt",
        0x06e => "rdtsc",
        0x06f => "rdpmc",
        0x070 => "pushf",
        0x071 => "popf",
        0x072 => "cpuid",
        0x073 => "rsm",
        0x074 => "iret",
        0x075 => "swint",
        0x076 => "invd",
        0x077 => "pause",
        0x078 => "hlt",
        0x079 => "invlpg",
        0x07a => "invlpga",
        0x07b => "io",
        0x07c => "msr",
        0x07d => "task_switch",
        0x07e => "ferr_freeze",
        0x07f => "shutdown",
        0x080 => "vmrun",
        0x081 => "hypercall",
        0x082 => "vmload",
        0x083 => "vmsave",
        0x084 => "stgi",
        0x085 => "clgi",
        0x086 => "skinit",
        0x087 => "rdtscp",
        0x088 => "icebp",
        0x089 => "wbinvd",
        0x08a => "monitor",
        0x08b => "mwait",
        0x08c => "mwait_cond",
        0x08d => "xsetbv",
        0x08e => "rdpru",
        0x08f => "write_efer_trap",
        // arch/x86/include/uapi/asm/svm.h: 0x0a0 is INVLPGB, INVPCID is 0x0a2.
        0x0a0 => "invlpgb",
        0x0a1 => "invlpgb_sync",
        0x0a2 => "invpcid",
        0x0a3 => "mcommit",
        0x0a4 => "tlbsync",
        0x0a5 => "buslock",
        0x0a6 => "idle-halt",
        0x400 => "npf",
        0x401 => "avic_incomplete_ipi",
        0x402 => "avic_unaccelerated_access",
        0x403 => "vmgexit",
        0xffff_ffff => "invalid",
        _ => "",
    };
    if !fixed.is_empty() {
        return Some(fixed.to_string());
    }
    match code {
        0x000..=0x03f => Some(format!("{}{}", SVM_CR_DR[(code >> 4) as usize], code & 0xf)),
        0x040..=0x05f => Some(format!("{}_excp", EXC_NAMES[(code - 0x40) as usize])),
        0x090..=0x09f => Some(format!("cr{}_write_trap", code - 0x90)),
        _ => None,
    }
}

/// User-space "exit" reasons of a KVM_RUN that failed (intf.h): no new exit.
pub const USER_EXIT_RESTART: u32 = crate::intf::USER_EXIT_RESTART as u32;
pub const USER_EXIT_ERROR: u32 = crate::intf::USER_EXIT_ERROR as u32;

pub fn kvm_exit_name(code: u32) -> Option<&'static str> {
    match code {
        USER_EXIT_RESTART => return Some("restart"),
        USER_EXIT_ERROR => return Some("error"),
        _ => {}
    }
    const NAMES: [&str; 41] = [
        "UNKNOWN",
        "EXCEPTION",
        "IO",
        "HYPERCALL",
        "DEBUG",
        "HLT",
        "MMIO",
        "IRQ_WINDOW_OPEN",
        "SHUTDOWN",
        "FAIL_ENTRY",
        "INTR",
        "SET_TPR",
        "TPR_ACCESS",
        "S390_SIEIC",
        "S390_RESET",
        "DCR",
        "NMI",
        "INTERNAL_ERROR",
        "OSI",
        "PAPR_HCALL",
        "S390_UCONTROL",
        "WATCHDOG",
        "S390_TSCH",
        "EPR",
        "SYSTEM_EVENT",
        "S390_STSI",
        "IOAPIC_EOI",
        "HYPERV",
        "ARM_NISV",
        "X86_RDMSR",
        "X86_WRMSR",
        "DIRTY_RING_FULL",
        "AP_RESET_HOLD",
        "X86_BUS_LOCK",
        "XEN",
        "RISCV_SBI",
        "RISCV_CSR",
        "NOTIFY",
        "LOONGARCH_IOCSR",
        "MEMORY_FAULT",
        "TDX",
    ];
    NAMES.get(code as usize).copied()
}

/// The display name of a hardware exit: vendor table, else the hex code.
pub fn hw_exit_name(isa: KvmIsa, code: u32) -> String {
    let name = match isa {
        KvmIsa::Vmx => vmx_reason_name(code).map(str::to_string),
        KvmIsa::Svm => svm_reason_name(code),
        KvmIsa::Unknown => None,
    };
    name.unwrap_or_else(|| format!("{:#x}", code))
}

/// The display name of any exit: the reason's name in its table (the code
/// when the table lacks it), or the port in hex for port I/O.
pub fn exit_name(kind: ExitKind, isa: KvmIsa, reason: u32) -> String {
    match kind {
        ExitKind::Hw => hw_exit_name(isa, reason),
        ExitKind::User => kvm_exit_name(reason)
            .map(str::to_string)
            .unwrap_or_else(|| reason.to_string()),
        ExitKind::PioIn | ExitKind::PioOut => format!("{reason:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_tables() {
        assert_eq!(svm_reason_name(SVM_EXIT_IOIO).as_deref(), Some("io"));
        assert_eq!(svm_reason_name(SVM_EXIT_NPF).as_deref(), Some("npf"));
        assert_eq!(svm_reason_name(0x4e).as_deref(), Some("PF_excp"));
        assert_eq!(svm_reason_name(0x13).as_deref(), Some("write_cr3"));
        assert_eq!(svm_reason_name(0x1234), None);
        // The codes around AMD's TLB instructions, as the kernel's svm.h has them.
        assert_eq!(svm_reason_name(0x0a0).as_deref(), Some("invlpgb"));
        assert_eq!(svm_reason_name(0x0a1).as_deref(), Some("invlpgb_sync"));
        assert_eq!(svm_reason_name(0x0a2).as_deref(), Some("invpcid"));
        assert_eq!(svm_reason_name(0x0a4).as_deref(), Some("tlbsync"));
        assert_eq!(vmx_reason_name(30), Some("IO_INSTRUCTION"));
        assert_eq!(vmx_reason_name(48), Some("EPT_VIOLATION"));
        assert_eq!(vmx_reason_name(5), None);
        assert_eq!(kvm_exit_name(KVM_EXIT_IO), Some("IO"));
        assert_eq!(kvm_exit_name(KVM_EXIT_HLT), Some("HLT"));
        assert_eq!(kvm_exit_name(99), None);
        assert_eq!(kvm_exit_name(USER_EXIT_RESTART), Some("restart"));
        assert_eq!(kvm_exit_name(USER_EXIT_ERROR), Some("error"));
        assert_eq!(hw_exit_name(KvmIsa::Svm, 0x7b), "io");
        assert_eq!(hw_exit_name(KvmIsa::Unknown, 0x7b), "0x7b");
        assert_eq!(exit_name(ExitKind::User, KvmIsa::Unknown, 99), "99");
        assert_eq!(exit_name(ExitKind::PioOut, KvmIsa::Unknown, 0x510), "0x510");
    }

    #[test]
    fn reason_tables_serialise_as_the_documented_isa_names() {
        let isa = |k, i| serde_json::to_string(&ReasonTable::of(k, i)).unwrap();
        assert_eq!(isa(ExitKind::Hw, KvmIsa::Svm), "\"svm\"");
        assert_eq!(isa(ExitKind::Hw, KvmIsa::Vmx), "\"vmx\"");
        assert_eq!(isa(ExitKind::Hw, KvmIsa::Unknown), "\"unknown\"");
        assert_eq!(isa(ExitKind::User, KvmIsa::Unknown), "\"kvm\"");
        assert_eq!(isa(ExitKind::PioIn, KvmIsa::Unknown), "\"port\"");
    }
}
