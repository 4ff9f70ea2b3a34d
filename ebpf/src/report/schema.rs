//! The records `overhead record --json` prints, one [`Report`] per line:
//! the stable JSON schema documented in the README. Every type serialises
//! and deserialises, so readers (the demo) use these types, not string keys.

use crate::reasons::ReasonTable;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use crate::cgroup::{CpuFiles, CpuSource};
pub use crate::intf::ExitKind;
pub use crate::observer::Skipped;

/// Bumped when a field is renamed or removed (never for additions).
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    pub ts_unix_ms: u64,
    pub interval_s: f64,
    pub vms: Vec<VmRow>,
    pub cgroups: Vec<CgroupRow>,
    pub noisy: Vec<NoisyRow>,
    /// Failed map inserts since start, by counter name (`intf::DropCounter`).
    pub drops: BTreeMap<String, u64>,
    pub programs: Programs,
    /// Kernel memory of the observer's maps (bytes, fdinfo memlock), at start.
    #[serde(default)]
    pub map_memory_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Programs {
    pub attached: Vec<String>,
    pub skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRow {
    pub pid: u32,
    pub comm: String,
    /// Exits of the VM, each counted once: a vCPU's hardware exits where
    /// they are observed (a user-space exit follows a hardware one there),
    /// its user-space exits otherwise.
    pub exits: u64,
    pub exit_ns: u64,
    /// `exit_ns` without HLT exits (time the guest was idle, not a cost).
    #[serde(default)]
    pub busy_exit_ns: u64,
    pub rq_delay_ns: u64,
    pub vcpus: Vec<VcpuRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuRow {
    pub tid: u32,
    /// KVM's vcpu_id; -1 until a hardware exit revealed it.
    pub vcpu_id: i32,
    pub comm: String,
    pub rq_delay_ns: u64,
    pub rq_waits: u64,
    pub exits: Vec<ExitRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitRow {
    /// "hw" (kvm_exit->kvm_entry), "user" (kvm_userspace_exit), "pio_in", "pio_out".
    pub kind: ExitKind,
    /// "vmx", "svm" for hw exits; "kvm" for user exits; "port" for pio.
    pub isa: ReasonTable,
    pub reason: u32,
    pub name: String,
    pub count: u64,
    /// Exits whose re-entry was seen; sum/max/percentiles cover only these
    /// (the last exit of a vCPU that stops is never re-entered).
    pub timed: u64,
    pub sum_ns: u64,
    /// Since the observer started, not per interval.
    pub max_ns: u64,
    /// Largest of this interval (equal to `max_ns` in a since-start report).
    pub interval_max_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

impl VcpuRow {
    /// The vCPU's exits, each counted once (see [`VmRow::exits`]).
    pub fn exit_count(&self) -> u64 {
        let sum = |kind| -> u64 {
            let rows = self.exits.iter().filter(|e| e.kind == kind);
            rows.map(|e| e.count).sum()
        };
        let hw = sum(ExitKind::Hw);
        if hw > 0 {
            return hw;
        }
        // KVM_RUN calls that failed (restart, error) are not exits.
        let failed = self.exits.iter().filter(|e| {
            e.kind == ExitKind::User
                && matches!(
                    e.reason,
                    crate::reasons::USER_EXIT_RESTART | crate::reasons::USER_EXIT_ERROR
                )
        });
        sum(ExitKind::User) - failed.map(|e| e.count).sum::<u64>()
    }

    /// Time from hardware exit to re-entry, HLT exits left out.
    pub fn busy_exit_ns(&self) -> u64 {
        self.exits
            .iter()
            .filter(|e| e.kind == ExitKind::Hw && !e.is_halt())
            .map(|e| e.sum_ns)
            .sum()
    }
}

impl ExitRow {
    /// A hardware exit for HLT: its exit-to-entry time is the guest idling.
    pub fn is_halt(&self) -> bool {
        self.kind == ExitKind::Hw
            && match self.isa {
                ReasonTable::Svm => {
                    matches!(
                        self.reason,
                        crate::reasons::SVM_EXIT_HLT | crate::reasons::SVM_EXIT_IDLE_HLT
                    )
                }
                ReasonTable::Vmx => self.reason == crate::reasons::VMX_EXIT_HLT,
                _ => false,
            }
    }

    /// Whether the row counts exits of the vCPU (hardware or to user space);
    /// port I/O rows detail user-space exits already counted.
    pub fn is_exit(&self) -> bool {
        matches!(self.kind, ExitKind::Hw | ExitKind::User)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CgroupRow {
    pub id: u64,
    pub path: Option<String>,
    pub container: Option<String>,
    pub cpu_ns: u64,
    pub rq_waits: u64,
    pub rq_sum_ns: u64,
    pub rq_p50_ns: u64,
    pub rq_p99_ns: u64,
    /// Since the observer started.
    pub rq_max_ns: u64,
    /// Longest wait of this interval (equal to `rq_max_ns` in a since-start
    /// report).
    pub rq_interval_max_ns: u64,
    pub preempted_by: Vec<PreemptRow>,
    pub cpu_files: CpuFiles,
    pub noisy: bool,
}

/// How the cgroup that held the CPU relates to the one that waited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CulpritClass {
    /// The waiting cgroup itself.
    Same,
    /// Another cgroup (not the root).
    Other,
    /// The root cgroup: the host's own tasks.
    Host,
    /// Nobody: the CPU was idle (wakeup latency).
    Idle,
    /// Not attributable: the wait began on another CPU or outlived the
    /// per-CPU history of `intf::SEGS` stretches.
    Unknown,
}

impl CulpritClass {
    /// The name serde writes.
    pub fn as_str(self) -> &'static str {
        match self {
            CulpritClass::Same => "same",
            CulpritClass::Other => "other",
            CulpritClass::Host => "host",
            CulpritClass::Idle => "idle",
            CulpritClass::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreemptRow {
    /// Cgroup that held the CPU while the victim waited (0: the CPU was
    /// idle; 18446744073709551615: not attributable, see `class`).
    pub cgroup_id: u64,
    pub path: Option<String>,
    pub class: CulpritClass,
    pub wait_ns: u64,
    pub waits: u64,
    pub preemptions: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NoisyRow {
    pub cgroup_id: u64,
    pub path: Option<String>,
    pub container: Option<String>,
    pub rq_p99_ns: u64,
    pub threshold_ns: u64,
    pub top_preempters: Vec<PreemptRow>,
}
