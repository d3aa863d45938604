//! Compiles the sk_lookup program (src/bpf/steer.bpf.c) with clang and writes
//! its libbpf-rs skeleton to `$OUT_DIR/steer.skel.rs`, included by src/bpf/mod.rs.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use libbpf_cargo::SkeletonBuilder;

/// The BPF program; its file stem names the skeleton (`SteerSkelBuilder`).
const SRC: &str = "src/bpf/steer.bpf.c";
/// Directory scanned for headers the program may include.
const BPF_DIR: &str = "src/bpf";
/// Written into `OUT_DIR`.
const SKEL: &str = "steer.skel.rs";
/// `<linux/bpf.h>` comes from the system's kernel uapi headers, not from libbpf-cargo.
const LINUX_BPF_H: &str = "/usr/include/linux/bpf.h";

fn main() {
    println!("cargo:rerun-if-changed={SRC}");
    println!("cargo:rerun-if-env-changed=CLANG");
    for header in headers(Path::new(BPF_DIR)) {
        println!("cargo:rerun-if-changed={}", header.display());
    }

    let clang = env::var_os("CLANG").map_or_else(|| PathBuf::from("clang"), PathBuf::from);
    if Command::new(&clang).arg("--version").output().is_err() {
        panic!(
            "`{}` not found. flyproxy's eBPF program needs clang to build: \
             apt-get install clang libelf-dev zlib1g-dev pkg-config \
             (or point the CLANG environment variable at a clang binary)",
            clang.display()
        );
    }
    if !Path::new(LINUX_BPF_H).exists() {
        panic!(
            "{LINUX_BPF_H} not found. flyproxy's eBPF program needs the kernel uapi headers: \
             apt-get install linux-libc-dev"
        );
    }

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"))
        .join(SKEL);
    // With `-target bpf` clang does not search the multiarch include directory, where
    // Debian/Ubuntu keep <asm/types.h> (pulled in by <linux/bpf.h>); name it explicitly.
    // A directory that does not exist (other distributions) is ignored by clang.
    let multiarch = format!("-I/usr/include/{}", multiarch_triplet());
    SkeletonBuilder::new()
        .source(SRC)
        .clang(&clang)
        .clang_args([multiarch.as_str(), "-Wall"])
        .build_and_generate(&out)
        .unwrap_or_else(|err| panic!("building the eBPF skeleton from {SRC} failed: {err:#}"));
}

/// The Debian multiarch triplet of the target, e.g. `x86_64-linux-gnu`.
fn multiarch_triplet() -> String {
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let little_endian = env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() == Ok("little");
    match arch.as_str() {
        "arm" => "arm-linux-gnueabihf".to_owned(),
        "x86" => "i386-linux-gnu".to_owned(),
        "powerpc64" if little_endian => "powerpc64le-linux-gnu".to_owned(),
        // x86_64, aarch64, riscv64, s390x, ...
        other => format!("{other}-linux-gnu"),
    }
}

/// The `.h` files in `dir`, so that editing one rebuilds the skeleton.
fn headers(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = dir.read_dir() else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "h"))
        .collect()
}
