//! Builds the C test programs in `programs/` with gcc, each twice:
//! `NAME` (`-fPIE -pie`) and `NAME-nopie` (`-fno-pie -no-pie`), into
//! `$OUT_DIR/bin` (plus `mem_churn-static`, `-static`, when the toolchain
//! can), and tells the tests where they are through
//! `CKPT_TEST_PROGRAMS`. Before them, ckpt's C API library
//! (`../libckpt/ckpt.c`) into `$OUT_DIR/lib/libckpt.so`
//! (`CKPT_TEST_LIBCKPT`), which the programs of [`USE_API`] link against.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Programs that use ckpt's C API (`#include <ckpt.h>`, `-lckpt`).
const USE_API: &[&str] = &["hooks"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let src_dir = manifest.join("programs");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("bin");
    std::fs::create_dir_all(&out).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".to_string());

    println!("cargo:rerun-if-changed=programs");
    println!("cargo:rerun-if-env-changed=CC");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&src_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
    }
    // ckpt's C API, as scripts/install.sh builds it.
    let api = manifest.join("../libckpt");
    let lib = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    println!("cargo:rerun-if-changed={}", api.display());
    let ok = Command::new(&cc)
        .args(["-O2", "-g", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(lib.join("libckpt.so"))
        .arg(api.join("ckpt.c"))
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"))
        .success();
    assert!(ok, "{cc} failed to build libckpt.so from {}", api.display());
    let api_args: Vec<String> = vec![format!("-I{}", api.display()), format!("-L{}", lib.display()), format!("-Wl,-rpath,{}", lib.display())];
    for src in sources.iter().filter(|p| p.extension().is_some_and(|e| e == "c")) {
        let stem = src.file_stem().unwrap().to_str().unwrap();
        let mut extra: Vec<&str> = Vec::new();
        if USE_API.contains(&stem) {
            extra.extend(api_args.iter().map(String::as_str));
        }
        let with = |pie: &[&'static str]| -> Vec<&str> { pie.iter().copied().chain(extra.iter().copied()).collect() };
        build(&cc, src, &out.join(stem), &with(&["-fPIE", "-pie"]), USE_API.contains(&stem));
        build(&cc, src, &out.join(format!("{stem}-nopie")), &with(&["-fno-pie", "-no-pie"]), USE_API.contains(&stem));
    }
    println!("cargo:rustc-env=CKPT_TEST_LIBCKPT={}", lib.join("libckpt.so").display());
    // mem_churn also statically linked (for the soft-dirty VM test's
    // initramfs); optional: a toolchain without a static libc only warns.
    let churn = src_dir.join("mem_churn.c");
    if churn.is_file() && !try_build(&cc, &churn, &out.join("mem_churn-static"), &["-static"], false) {
        println!("cargo:warning=mem_churn-static not built ({cc} -static failed: no static libc?)");
    }
    // The MPI programs (programs/mpi/), once per MPI library, with that
    // library's own compiler wrapper (never the `mpicc` alternative):
    // `NAME-openmpi`, `NAME-mpich`. scripts/test.sh installs both; on a
    // machine without one, its tests say so and skip.
    let mpi_dir = src_dir.join("mpi");
    for (lib, wrapper) in [("openmpi", "mpicc.openmpi"), ("mpich", "mpicc.mpich")] {
        // (A path that does not exist would rerun this script every build.)
        if Path::new("/usr/bin").join(wrapper).exists() {
            println!("cargo:rerun-if-changed=/usr/bin/{wrapper}");
        }
        for src in std::fs::read_dir(&mpi_dir).into_iter().flatten().flatten().map(|e| e.path()) {
            if src.extension().is_none_or(|e| e != "c") {
                continue;
            }
            let stem = src.file_stem().unwrap().to_str().unwrap();
            let exe = out.join(format!("{stem}-{lib}"));
            let _ = std::fs::remove_file(&exe);
            if Command::new(wrapper).arg("-showme").output().is_err() && Command::new(wrapper).arg("-show").output().is_err() {
                println!("cargo:warning={wrapper} not found: {} not built (apt-get install {})", exe.display(), if lib == "openmpi" { "openmpi-bin libopenmpi-dev" } else { "mpich libmpich-dev" });
                continue;
            }
            build(wrapper, &src, &exe, &["-fPIE", "-pie"], false);
        }
    }
    println!("cargo:rustc-env=CKPT_TEST_PROGRAMS={}", out.display());
    println!("cargo:rustc-env=CKPT_TEST_SOURCES={}", src_dir.display());
}

fn build(cc: &str, src: &Path, out: &Path, pie: &[&str], api: bool) {
    assert!(try_build(cc, src, out, pie, api), "{cc} failed to build {}", src.display());
}

fn try_build(cc: &str, src: &Path, out: &Path, pie: &[&str], api: bool) -> bool {
    Command::new(cc)
        .args(["-O2", "-g", "-pthread", "-Wall", "-Wextra", "-Werror"])
        .args(pie)
        .arg("-I")
        .arg(src.parent().unwrap())
        .arg("-o")
        .arg(out)
        .arg(src)
        .args(if api { &["-lckpt"][..] } else { &[][..] })
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cc}: {e}"))
        .success()
}
