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
            kernel.release
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
        h.update(kernel.release.as_bytes());
        h.finalize()
    });
    // Build in a private directory, then move each .ko into place with an
    // atomic rename: a path handed out earlier (to another test, another
    // process) always names a complete module, never a half-rebuilt one.
    let dest = cache_dir()
        .join("modules")
        .join(format!("{name}-{}", &key[..12]));
    std::fs::create_dir_all(&dest)?;
    let build = scratch_dir(&dest)?;
    for e in std::fs::read_dir(&src)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), build.path.join(e.file_name()))?;
        }
    }
    let out = Command::new("make")
        .arg("-C")
        .arg(headers)
        .arg(format!("M={}", build.path.display()))
        .arg("modules")
        .output()
        .context("cannot run make: install the make and gcc packages")?;
    if !out.status.success() {
        bail!(
            "building {} against {} failed:\n{}{}",
            src.display(),
            kernel.release,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut kos = Vec::new();
    for e in std::fs::read_dir(&build.path)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "ko") {
            let target = dest.join(p.file_name().unwrap_or_default());
            std::fs::rename(&p, &target)?;
            kos.push(target);
        }
    }
    kos.sort();
    if kos.is_empty() {
        bail!(
            "building {} produced no .ko (does its Kbuild set obj-m?)",
            src.display()
        );
    }
    Ok(kos)
}

/// A uniquely named scratch directory inside `parent`, removed on drop.
struct ScratchDir {
    path: PathBuf,
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn scratch_dir(parent: &Path) -> Result<ScratchDir> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let path = parent.join(format!(
        ".build-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(ScratchDir { path })
}
