//! Compiles the BPF programs with clang and generates the libbpf-rs skeleton.
//! Only the committed minimal header is used, so the build does not need the
//! build host's kernel BTF.

use libbpf_cargo::SkeletonBuilder;
use std::path::PathBuf;

const SRC: &str = "src/bpf/overhead.bpf.c";

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    // clang-19 is what the project's setup installs; LIVEHOST_CLANG overrides.
    let clang = std::env::var("LIVEHOST_CLANG").unwrap_or_else(|_| {
        if std::path::Path::new("/usr/bin/clang-19").exists() {
            "/usr/bin/clang-19".into()
        } else {
            "clang".into()
        }
    });
    let result = SkeletonBuilder::new()
        .source(SRC)
        .clang(&clang)
        .clang_args(["-Isrc/bpf", "-Wall", "-Wno-visibility"])
        .build_and_generate(out.join("overhead.skel.rs"));
    if let Err(e) = result {
        panic!(
            "building {SRC} with {clang} failed: {e:#}\n(install clang-19, libelf-dev, zlib1g-dev, pkg-config)"
        );
    }
    println!("cargo:rerun-if-changed=src/bpf");
    println!("cargo:rerun-if-env-changed=LIVEHOST_CLANG");
}
