//! The inspector against every module of a real distribution kernel: the
//! Debian 6.1 guest kernel's whole `lib/modules` tree (about 1100 modules,
//! none of them a livepatch). Each must give a result or an error, never a
//! panic, and quickly. Runs on the host; no guest, no root needed.
//!
//! This is where the inspector met code relocations with negative addends
//! (vsock, nf_tables, nfsd, aesni-intel, gcm, ...) and panicked on an
//! overflowing offset; see module.rs.

use kernel_tests::KernelSpec;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Far above what any module takes (a few ms in a debug build), low enough
/// to catch a walk that is not bounded.
const PER_MODULE: Duration = Duration::from_secs(5);

fn modules(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            modules(&p, out);
        } else if ft.is_file() {
            let n = p.file_name().unwrap().to_string_lossy();
            if n.ends_with(".ko") || n.ends_with(".ko.xz") || n.ends_with(".ko.zst") {
                out.push(p);
            }
        }
    }
}

fn read_module(p: &Path) -> Vec<u8> {
    let n = p.to_string_lossy();
    let tool = if n.ends_with(".xz") {
        "xz"
    } else if n.ends_with(".zst") {
        "zstd"
    } else {
        return std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    };
    let o = Command::new(tool)
        .arg("-dc")
        .arg(p)
        .output()
        .unwrap_or_else(|e| panic!("{tool} -dc {}: {e}", p.display()));
    assert!(o.status.success(), "{tool} -dc {} failed", p.display());
    o.stdout
}

#[test]
fn inspector_reads_every_module_of_the_debian_kernel() {
    let kernel =
        kernel_tests::fetch(&KernelSpec::default()).expect("fetch the Debian guest kernel");
    let dir = kernel
        .modules_dir
        .clone()
        .expect("the Debian kernel has a modules dir");
    let mut files = Vec::new();
    // `kernel/` holds the modules; build/ and source/ are links to headers.
    modules(&dir.join("kernel"), &mut files);
    files.sort();
    assert!(
        files.len() > 500,
        "only {} modules under {}: not the whole tree?",
        files.len(),
        dir.display()
    );
    let start = Instant::now();
    let mut panicked = Vec::new();
    let mut slow = Vec::new();
    let mut named = 0;
    let mut slowest = (Duration::ZERO, PathBuf::new());
    for f in &files {
        let bytes = read_module(f);
        let t = Instant::now();
        let r = std::panic::catch_unwind(|| hotpatch::module::inspect(&bytes));
        let took = t.elapsed();
        if took > slowest.0 {
            slowest = (took, f.clone());
        }
        if took > PER_MODULE {
            slow.push(format!("{} ({took:?})", f.display()));
        }
        match r {
            Err(_) => panicked.push(f.display().to_string()),
            Ok(Ok(info)) => {
                // Real modules: the name the kernel will use is always found,
                // and none of these is a livepatch.
                if info.name.is_some() && !info.livepatch && info.objects.is_empty() {
                    named += 1;
                }
            }
            Ok(Err(_)) => {}
        }
    }
    eprintln!(
        "inspected {} modules in {:?}; slowest {:?} ({})",
        files.len(),
        start.elapsed(),
        slowest.0,
        slowest.1.display()
    );
    assert!(panicked.is_empty(), "inspect panicked on: {panicked:#?}");
    assert!(
        slow.is_empty(),
        "inspect took over {PER_MODULE:?} on: {slow:#?}"
    );
    assert_eq!(
        named,
        files.len(),
        "every Debian module parses, is named and is not a livepatch"
    );
}
