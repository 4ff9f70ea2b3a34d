//! What this host's KVM can do: the probe lives in `livehost_kvm::probe`,
//! the accelerator type in `livehost_common::host`; re-exported here under
//! the names vmm-bench has always used.

pub use livehost_common::host::Accel;
pub use livehost_kvm::probe::{Probe, probe};
