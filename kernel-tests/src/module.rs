//! Building out-of-tree kernel modules against a guest kernel's headers.
//!
//! Sources stay in the repository; the build happens in a copy under the
//! cache directory so the source tree never collects kbuild's droppings.

use crate::kernel::{GuestKernel, cache_dir};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Build the module(s) in `src` (a directory with a `Kbuild` or `Makefile`
/// naming `obj-m`) and return the single `.ko` it produces.
pub fn build(kernel: &GuestKernel, src: &Path) -> Result<PathBuf> {
    let mut kos = build_all(kernel, src)?;
    match kos.len() {
        1 => Ok(kos.remove(0)),
        n => bail!(
            "{} produced {n} modules; use module::build_all",
            src.display()
        ),
    }
}

/// Build every module in `src`; returns the `.ko` paths, sorted.
pub fn build_all(kernel: &GuestKernel, src: &Path) -> Result<Vec<PathBuf>> {
    let headers = kernel.headers_dir.as_ref().with_context(|| {
        format!(
            "kernel {} has no headers to build modules against (only Debian kernels bring them)",
            kernel.version
        )
    })?;
    if !src.is_dir() {
        bail!("module source directory {} does not exist", src.display());
    }
    let src = std::fs::canonicalize(src)?;
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "module".into());
    // Key the build dir by source path and kernel so parallel tests building
    // different fixtures, or one fixture for two kernels, do not collide.
    let key = format!("{:x}", {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(src.to_string_lossy().as_bytes());
        h.update(kernel.version.as_bytes());
        h.finalize()
    });
    let build = cache_dir()
        .join("modules")
        .join(format!("{name}-{}", &key[..12]));
    let _lock = livehost_common::lock::FileLock::acquire(&build.with_extension("lock"))?;
    let _ = std::fs::remove_dir_all(&build);
    std::fs::create_dir_all(&build)?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), build.join(e.file_name()))?;
        }
    }
    let out = Command::new("make")
        .arg("-C")
        .arg(headers)
        .arg(format!("M={}", build.display()))
        .arg("modules")
        .output()
        .context("cannot run make: install the make and gcc packages")?;
    if !out.status.success() {
        bail!(
            "building {} against {} failed:\n{}{}",
            src.display(),
            kernel.version,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut kos: Vec<PathBuf> = std::fs::read_dir(&build)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "ko"))
        .collect();
    kos.sort();
    if kos.is_empty() {
        bail!(
            "building {} produced no .ko (does its Kbuild set obj-m?)",
            src.display()
        );
    }
    Ok(kos)
}
