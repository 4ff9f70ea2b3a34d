//! Builds the two freestanding images every run needs, with the rustc cargo
//! gave us, the host target and our own flags (so the workspace's profile and
//! panic strategy are untouched):
//! - `unikernel.elf`: workload + ring-0 runtime, linked at 2 MiB with a PVH note;
//! - `linux-init`: workload + raw-syscall runtime, a static no-libc Linux program.
//!
//! Both link the same `vmm-bench-workload` source, compiled once here as a
//! panic=abort, static-relocation rlib.

use std::path::PathBuf;
use std::process::Command;

fn rustc(args: &[&str], what: &str) {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .args(args)
        // A wrapper's or the user's flags are for host crates, not for a
        // freestanding image.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {rustc} to build the {what}: {e}"));
    if !out.status.success() {
        panic!(
            "building the {what} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Flags every image gets: no unwinding, static code, and plain scalar
/// instructions (a nested host's KVM may emulate every guest instruction,
/// and its emulator knows few vector instructions, so vectorising passes
/// and SSE itself are off). Dropping SSE draws a "required by the ABI"
/// warning: our freestanding code passes no floats, so it does not arise.
const COMMON: &[&str] = &[
    "--edition",
    "2024",
    "-C",
    "panic=abort",
    "-C",
    "opt-level=2",
    "-C",
    "relocation-model=static",
    "-C",
    "debuginfo=0",
    "-C",
    "no-vectorize-loops",
    "-C",
    "no-vectorize-slp",
    "-C",
    "target-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2",
    "-A",
    "warnings",
];

/// Static, no-libc, no start files: the images bring their own entry.
const LINK_STATIC: &[&str] = &[
    "-C",
    "target-feature=+crt-static",
    "-C",
    "link-arg=-nostdlib",
    "-C",
    "link-arg=-nostartfiles",
    "-C",
    "link-arg=-Wl,--build-id=none",
    "-C",
    "strip=symbols",
];

/// One freestanding binary linked against the workload rlib in `dir`.
fn image(name: &str, src: &str, extra: &[&str], dir: &str, out: &str, what: &str) {
    let rlib = format!("vmm_bench_workload={dir}/libvmm_bench_workload.rlib");
    let mut a: Vec<&str> = COMMON.to_vec();
    a.extend(LINK_STATIC);
    a.extend(extra);
    a.extend([
        "--crate-type",
        "bin",
        "--crate-name",
        name,
        "--extern",
        &rlib,
        "-L",
        dir,
        src,
        "-o",
        out,
    ]);
    rustc(&a, what);
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let img = out.join("images");
    std::fs::create_dir_all(&img).unwrap();
    let p = |rel: &str| manifest.join(rel).to_string_lossy().into_owned();
    let o = |f: &str| img.join(f).to_string_lossy().into_owned();
    for f in [
        "workload/src/lib.rs",
        "unikernel/main.rs",
        "unikernel/link.ld",
        "linux-init/main.rs",
        "freestanding/libc.rs",
    ] {
        println!("cargo:rerun-if-changed={}", p(f));
    }

    let img_dir = img.to_string_lossy().into_owned();
    let wl_src = p("workload/src/lib.rs");
    let mut a: Vec<&str> = COMMON.to_vec();
    a.extend([
        "--crate-type",
        "rlib",
        "--crate-name",
        "vmm_bench_workload",
        &wl_src,
        "--out-dir",
        &img_dir,
    ]);
    rustc(&a, "workload rlib");

    let script = format!("link-arg=-Wl,-T,{}", p("unikernel/link.ld"));
    let uk_out = o("unikernel.elf");
    let uk_src = p("unikernel/main.rs");
    image(
        "unikernel",
        &uk_src,
        &["-C", &script],
        &img_dir,
        &uk_out,
        "unikernel",
    );
    let li_out = o("linux-init");
    let li_src = p("linux-init/main.rs");
    image(
        "linux_init",
        &li_src,
        &[],
        &img_dir,
        &li_out,
        "static Linux init",
    );

    println!("cargo:rustc-env=VMM_BENCH_UNIKERNEL={}", uk_out);
    println!("cargo:rustc-env=VMM_BENCH_LINUX_INIT={}", li_out);
}
