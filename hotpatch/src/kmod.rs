//! The two module syscalls, wrapped once each, with the errno values the
//! kernel documents turned into sentences that say what to do next.

use anyhow::{Result, anyhow};
use nix::errno::Errno;
use nix::kmod::{DeleteModuleFlags, ModuleInitFlags};
use std::ffi::CString;
use std::fs::File;
use std::path::Path;

/// `finit_module(2)` on the file as opened and checked (`path` names it
/// in messages), no parameters, no vermagic override
/// (overriding it is how kernels get crashed; the preflight compares
/// vermagic instead).
///
/// Failure modes: EEXIST (same name loaded), ENOEXEC (format/vermagic),
/// EKEYREJECTED/EBADMSG (signature), EPERM (no CAP_SYS_MODULE, module
/// loading disabled, lockdown), EINVAL/ENODEV/EBUSY (the module's init, here
/// `klp_enable_patch`, refused), ENOSYS (no module support).
pub fn finit_module(f: &File, path: &Path, name: &str) -> Result<()> {
    finit_flags(f, path, name, ModuleInitFlags::empty())
}

/// MODULE_INIT_COMPRESSED_FILE (include/uapi/linux/module.h, 5.17+).
const MODULE_INIT_COMPRESSED_FILE: u32 = 4;

/// Load a compressed module: the file itself where the kernel decompresses
/// (its signature is then checked over the file), else the ELF that was
/// decompressed from the checked bytes, through a sealed memfd.
pub fn finit_compressed(f: &File, elf: &[u8], path: &Path, name: &str) -> Result<()> {
    let flags = ModuleInitFlags::from_bits_retain(MODULE_INIT_COMPRESSED_FILE);
    let params = CString::default();
    match nix::kmod::finit_module(f, &params, flags) {
        Ok(()) => Ok(()),
        // EINVAL: the flag is unknown (before 5.17); EOPNOTSUPP: no
        // CONFIG_MODULE_DECOMPRESS. Neither loaded anything.
        // (EINVAL is also a livepatch init's refusal: then the memfd load
        // is refused the same way, and that is the error reported.)
        Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => {
            let memfd = crate::compressed::sealed_memfd(elf)?;
            finit_flags(&memfd, path, name, ModuleInitFlags::empty())
        }
        Err(e) => Err(explain(e, path, name)),
    }
}

fn finit_flags(f: &File, path: &Path, name: &str, flags: ModuleInitFlags) -> Result<()> {
    let params = CString::default();
    nix::kmod::finit_module(f, &params, flags).map_err(|e| explain(e, path, name))
}

/// What a finit_module errno means, and what to do.
fn explain(e: Errno, path: &Path, name: &str) -> anyhow::Error {
    {
        let why = match e {
            Errno::EEXIST => format!("a module named {name} is already loaded"),
            Errno::ENOEXEC => "the kernel says \"invalid module format\": built for another kernel or config (run `hotpatch check` for what differs; dmesg has the kernel's view)".to_string(),
            Errno::EKEYREJECTED | Errno::EBADMSG | Errno::ENOKEY => {
                "the kernel rejected the module's signature (sign it with a key the kernel trusts)".to_string()
            }
            Errno::EPERM => "not permitted: needs root with CAP_SYS_MODULE, and module loading must not be disabled (kernel.modules_disabled, lockdown)".to_string(),
            Errno::EBUSY => "the kernel is busy with another livepatch transition; wait for it (hotpatch status)".to_string(),
            Errno::EINVAL => "the module's init refused (for a livepatch: a target function or object is wrong, or the patch conflicts); see dmesg".to_string(),
            Errno::ENODEV => "the kernel has no livepatch support for this module".to_string(),
            Errno::ENOSYS => "this kernel cannot load modules (CONFIG_MODULES off)".to_string(),
            other => format!("{other}"),
        };
        anyhow!("loading {} failed ({}): {why}", path.display(), e.desc())
    }
}

/// Outcome of one non-blocking `delete_module` attempt.
pub enum Delete {
    Removed,
    /// Still referenced (refcount > 0) or going away: retry later.
    Busy,
    NotLoaded,
}

/// `delete_module(2)` with O_NONBLOCK: never the forced O_TRUNC, and never
/// blocking inside the kernel, so the caller's deadline holds.
///
/// Failure modes: EWOULDBLOCK/EAGAIN (refcount not yet zero), EBUSY (module
/// still initialising or being removed), ENOENT (not loaded), EPERM (no
/// CAP_SYS_MODULE, or the module has no exit function, e.g. a livepatch made
/// permanent by `force`).
pub fn delete_module(name: &str) -> Result<Delete> {
    let c = CString::new(name).map_err(|_| anyhow!("module name {name:?} contains NUL"))?;
    match nix::kmod::delete_module(&c, DeleteModuleFlags::O_NONBLOCK) {
        Ok(()) => Ok(Delete::Removed),
        Err(Errno::EWOULDBLOCK) | Err(Errno::EBUSY) => Ok(Delete::Busy),
        Err(Errno::ENOENT) => Ok(Delete::NotLoaded),
        Err(Errno::EPERM) => Err(anyhow!(
            "removing {name} not permitted: needs root, and a module made permanent (forced patch, no exit function) can never be removed"
        )),
        Err(e) => Err(anyhow!("removing {name} failed: {}", e.desc())),
    }
}
