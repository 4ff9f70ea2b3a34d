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

    let common = [
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
        // Plain scalar code: a nested host's KVM may emulate every guest
        // instruction, and its emulator knows few vector instructions.
        // Vectorising passes and SSE itself are off, so the compiler emits no
        // vector instructions an emulating KVM could not execute.
        "-C",
        "no-vectorize-loops",
        "-C",
        "no-vectorize-slp",
        "-C",
        "target-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2",
        // Dropping SSE draws a "required by the ABI" warning: our freestanding
        // code passes no floats, so the ABI question does not arise.
        "-A",
        "warnings",
    ];
    let mut a: Vec<&str> = common.to_vec();
    let wl_src = p("workload/src/lib.rs");
    let img_dir = img.to_string_lossy().into_owned();
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

    let rlib = format!("vmm_bench_workload={}", o("libvmm_bench_workload.rlib"));
    let link_static = [
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
    let script = format!("link-arg=-Wl,-T,{}", p("unikernel/link.ld"));
    let uk_src = p("unikernel/main.rs");
    let uk_out = o("unikernel.elf");
    let mut a: Vec<&str> = common.to_vec();
    a.extend(link_static);
    a.extend([
        "-C",
        &script,
        "--crate-type",
        "bin",
        "--crate-name",
        "unikernel",
        "--extern",
        &rlib,
        "-L",
        &img_dir,
        &uk_src,
        "-o",
        &uk_out,
    ]);
    rustc(&a, "unikernel");

    let li_src = p("linux-init/main.rs");
    let li_out = o("linux-init");
    let mut a: Vec<&str> = common.to_vec();
    a.extend(link_static);
    a.extend([
        "--crate-type",
        "bin",
        "--crate-name",
        "linux_init",
        "--extern",
        &rlib,
        "-L",
        &img_dir,
        &li_src,
        "-o",
        &li_out,
    ]);
    rustc(&a, "static Linux init");

    println!("cargo:rustc-env=VMM_BENCH_UNIKERNEL={}", uk_out);
    println!("cargo:rustc-env=VMM_BENCH_LINUX_INIT={}", li_out);
}
