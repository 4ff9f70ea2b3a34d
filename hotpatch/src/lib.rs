//! hotpatch: a kernel livepatch manager.
//!
//! Inspect a livepatch module without trusting it ([`module`]), preflight it
//! against the running kernel ([`check`]), load it and follow the transition
//! task by task, rolling back when it stalls ([`ops`]), and keep the patches
//! that should survive a reboot ([`state`]). Every path to the kernel is
//! injectable ([`paths::Paths`]) so the decisions are unit-testable; the
//! end-to-end proof runs in QEMU guests (tests/guest.rs).

pub mod check;
pub mod host;
pub mod kernel;
pub mod kmod;
pub mod measure;
pub mod module;
pub mod ops;
pub mod paths;
pub mod state;
#[doc(hidden)]
pub mod testelf;

/// Kernel command-line switch that makes `load --installed` do nothing, for
/// a boot where a re-applied patch is suspected of causing trouble.
pub const SKIP_SWITCH: &str = "hotpatch.skip=1";

/// True when the kernel command line asks to skip re-applying patches.
pub fn boot_skip_requested(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == SKIP_SWITCH)
}

#[cfg(test)]
mod tests {
    #[test]
    fn skip_switch_is_a_whole_word() {
        assert!(super::boot_skip_requested("ro quiet hotpatch.skip=1 x"));
        assert!(!super::boot_skip_requested("hotpatch.skip=10"));
        assert!(!super::boot_skip_requested("xhotpatch.skip=1"));
        assert!(!super::boot_skip_requested(""));
    }
}
