//! What kind of machine timings were taken on. A latency measured in a
//! QEMU TCG guest says little about hardware, so every measurement carries
//! this label: `livehost_common::host::Host`, probed under hotpatch's
//! `/proc` and `/sys` roots.

use crate::paths::Paths;

/// The host description every livehost report carries; `kind` serialises
/// as `hardware`, `vm-kvm`, `vm-tcg` or `vm-other`.
pub use livehost_common::host::Host as Environment;
pub use livehost_common::host::{HostKind, classify};

/// Probe the host through `paths` (tests point them at fixtures).
pub fn detect(paths: &Paths) -> Environment {
    Environment::probe_at(&paths.proc, &paths.sys)
}
