//! The guest's root file system: busybox, our init script, the kernel
//! modules to load, the host files asked for, and the command. Written as
//! an [`Initramfs`].

use crate::guest::RunOptions;
use crate::initramfs::{Initramfs, shared_libraries};
use crate::kernel::GuestKernel;
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Our `/init`: mounts, loads the modules, runs the command under its time
/// limit, and reports on `ttyS1` (see `frame.rs` for the other side).
const INIT: &str = include_str!("init.sh");

pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Build the whole archive for `opts` and write it to `out`.
pub(crate) fn build(
    opts: &RunOptions,
    kernel: &GuestKernel,
    modules: &[String],
    nonce: &str,
    out: &Path,
) -> Result<()> {
    let mut ir = Initramfs::new();
    base_system(&mut ir)?;
    // Read and deleted by init before the command runs (see `frame`).
    ir.file("/livehost/nonce", format!("{nonce}\n").into_bytes(), 0o400)?;
    add_modules(&mut ir, kernel, modules)?;
    // A Debian host keeps its kernel's config in /boot; tools that read it
    // there (hotpatch compares vermagic flags with it) see the guest alike.
    if let Some(cfg) = &kernel.config {
        ir.copy(cfg, &format!("/boot/config-{}", kernel.release))?;
    }
    for (host, guest) in &opts.files {
        if !host.exists() {
            bail!(
                "file to copy into the guest does not exist: {}",
                host.display()
            );
        }
        ir.copy_program(host, guest)
            .with_context(|| format!("cannot put {} into the guest", host.display()))?;
    }
    add_command(&mut ir, opts)?;
    ir.write_file(out)
}

/// Directories, a static busybox with its applets, `/init`, `/etc`.
fn base_system(ir: &mut Initramfs) -> Result<()> {
    for d in [
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/root",
        "/etc",
        "/var",
        "/mnt",
        "/lib",
        "/lib64",
        "/livehost",
    ] {
        ir.dir(d)?;
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!("/bin/busybox is missing: run `./x setup` (or apt-get install busybox-static)");
    }
    if !shared_libraries(busybox)?.is_empty() {
        bail!("/bin/busybox is dynamically linked: install busybox-static, which the guest needs");
    }
    ir.copy(busybox, "/bin/busybox")?;
    for applet in busybox_applets(busybox)? {
        if applet != "/bin/busybox" && applet.starts_with('/') {
            ir.symlink(&applet, "/bin/busybox")?;
        }
    }
    ir.symlink("/bin/sh", "busybox")?;
    ir.file("/init", INIT.as_bytes().to_vec(), 0o755)?;
    ir.file(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        0o644,
    )?;
    ir.file("/etc/group", b"root:x:0:\n".to_vec(), 0o644)?;
    ir.file("/etc/hostname", b"livehost-guest\n".to_vec(), 0o644)
}

/// Modules in load order, decompressed if Debian shipped them compressed
/// (busybox insmod takes plain .ko files only), and the list init loads.
fn add_modules(ir: &mut Initramfs, kernel: &GuestKernel, modules: &[String]) -> Result<()> {
    let order = if modules.is_empty() {
        Vec::new()
    } else {
        module_order(kernel, modules)?
    };
    let mut listed = Vec::new();
    if let Some(mdir) = &kernel.modules_dir {
        for rel in &order {
            let plain = strip_compression(rel);
            let data = read_module(&mdir.join(rel))?;
            ir.file(
                &format!("/lib/modules/{}/{}", kernel.release, plain),
                data,
                0o644,
            )?;
            listed.push(plain);
        }
    }
    ir.file(
        "/livehost/modules",
        format!("{}\n", listed.join("\n")).into_bytes(),
        0o644,
    )
}

/// The command, its time limit and its environment, for init to read.
fn add_command(ir: &mut Initramfs, opts: &RunOptions) -> Result<()> {
    let script = if opts.command.len() == 1 {
        opts.command[0].clone()
    } else {
        let argv: Vec<String> = opts.command.iter().map(|a| shell_quote(a)).collect();
        format!("exec {}", argv.join(" "))
    };
    ir.file("/livehost/cmd", format!("{script}\n").into_bytes(), 0o755)?;
    ir.file(
        "/livehost/timeout",
        format!("{}\n", opts.timeout.as_secs().max(1)).into_bytes(),
        0o644,
    )?;
    if !opts.env.is_empty() {
        let env: String = opts
            .env
            .iter()
            .map(|(k, v)| format!("export {k}={}\n", shell_quote(v)))
            .collect();
        ir.file("/livehost/env", env.into_bytes(), 0o644)?;
    }
    Ok(())
}

fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .context("cannot run busybox --list-full")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| format!("/{}", l.trim()))
        .collect())
}

fn strip_compression(rel: &str) -> String {
    for ext in [".xz", ".zst", ".gz"] {
        if let Some(s) = rel.strip_suffix(ext) {
            return s.to_string();
        }
    }
    rel.to_string()
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return std::fs::read(path).with_context(|| format!("cannot read {}", path.display())),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("cannot run {tool} to decompress {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

/// Module names normalise `-` to `_`, as the kernel does.
fn module_key(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let base = strip_compression(base);
    base.trim_end_matches(".ko").replace('-', "_")
}

/// The modules to load, dependencies first, as relative paths in the
/// modules tree.
pub fn module_order(kernel: &GuestKernel, wanted: &[String]) -> Result<Vec<String>> {
    let mdir = kernel
        .modules_dir
        .as_ref()
        .with_context(|| format!("kernel {} has no modules directory", kernel.release))?;
    let dep_text = std::fs::read_to_string(mdir.join("modules.dep"))
        .with_context(|| format!("cannot read {}/modules.dep", mdir.display()))?;
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep_text.lines() {
        let Some((m, rest)) = line.split_once(':') else {
            continue;
        };
        let d = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_key(m), (m.to_string(), d));
    }
    let builtin: BTreeSet<String> = std::fs::read_to_string(mdir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_key)
        .collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for w in wanted {
        let key = module_key(w);
        if builtin.contains(&key) {
            continue; // built into the kernel: nothing to load
        }
        let Some((path, d)) = deps.get(&key) else {
            bail!(
                "module {w:?} does not exist for kernel {} (not in {}/modules.dep)",
                kernel.release,
                mdir.display()
            );
        };
        // modules.dep lists all transitive dependencies, deepest last.
        for dep in d.iter().rev().chain(std::iter::once(path)) {
            if seen.insert(dep.clone()) {
                order.push(dep.clone());
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_keys_normalise() {
        assert_eq!(module_key("kernel/arch/x86/kvm/kvm-amd.ko"), "kvm_amd");
        assert_eq!(module_key("kernel/fs/x.ko.xz"), "x");
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
