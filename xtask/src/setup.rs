//! Installs what the eBPF build needs on a fresh Debian machine, idempotently: each step first
//! checks whether its result is already there.
use anyhow::Result;
use std::process::Command;

/// bpf-linker version known to work with aya 0.14 and LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// bpf-linker's LLVM major version (the `llvm-22` feature, /usr/lib/llvm-22).
const LLVM_MAJOR: u32 = 22;
/// A dated nightly built with LLVM 22, installed when the machine's `nightly` is missing or uses
/// another LLVM.
const DATED_NIGHTLY: &str = "nightly-2026-05-19";

/// One set-up step: what it installs, whether it is already there, how to install it.
type Step = (&'static str, fn() -> bool, fn() -> Result<()>);

/// Makes sure the eBPF toolchain is installed. Returns whether it is usable. With `strict`, a
/// failure is an error; otherwise it is a warning and lb builds with userspace forwarding only.
pub fn ensure(strict: bool) -> Result<bool> {
    let steps: [Step; 3] = [
        ("LLVM 22 development files", llvm_present, install_llvm),
        ("nightly rust-src", rust_src_present, install_rust_src),
        ("bpf-linker", bpf_linker_present, install_bpf_linker),
    ];
    for (what, present, install) in steps {
        if present() {
            continue;
        }
        eprintln!("xtask setup: installing {what}");
        if let Err(err) = install().and_then(|()| {
            if present() {
                Ok(())
            } else {
                anyhow::bail!("{what} still missing after install")
            }
        }) {
            if strict {
                return Err(err.context(format!("installing {what}")));
            }
            eprintln!("xtask setup: WARNING: cannot install {what}: {err:#}");
            return Ok(false);
        }
    }
    Ok(true)
}

/// Installs from Debian each `(program, package)` whose program is not on PATH (apt lists
/// refreshed only then); `who` prefixes the message.
pub fn ensure_programs(who: &str, programs: &[(&str, &str)]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let on_path = |program: &str| std::env::split_paths(&path).any(|dir| dir.join(program).is_file());
    let missing: Vec<&str> = programs
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("{who}: installing {}", missing.join(" "));
    crate::run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(&missing),
    )
}

fn llvm_present() -> bool {
    // The unversioned libLLVM.so link and llvm-config come with llvm-22-dev, not the runtime.
    let prefix = std::path::Path::new(LLVM_PREFIX);
    prefix.join("lib/libLLVM.so").exists() && prefix.join("bin/llvm-config").exists()
}

fn install_llvm() -> Result<()> {
    crate::run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args([
                "install",
                "-y",
                "-qq",
                "llvm-22-dev",
                "libpolly-22-dev",
                "libzstd-dev",
                "zlib1g-dev",
            ]),
    )
}

/// The toolchain the eBPF crate is built with (lb-user/build.rs reads LB_BPF_TOOLCHAIN): the
/// machine's `nightly` when its LLVM is the one bpf-linker is built against (the bitcode it emits
/// must be readable by bpf-linker: a newer LLVM's fails with "Invalid record"), else a dated
/// nightly known to use LLVM 22.
pub fn bpf_toolchain() -> String {
    if let Ok(t) = std::env::var("LB_BPF_TOOLCHAIN") {
        return t;
    }
    let nightly_llvm = Command::new("rustup")
        .args(["run", "nightly", "rustc", "-vV"])
        .output();
    let matches = nightly_llvm.is_ok_and(|o| {
        o.status.success()
            && String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with(&format!("LLVM version: {LLVM_MAJOR}.")))
    });
    if matches {
        "nightly".into()
    } else {
        DATED_NIGHTLY.into()
    }
}

fn rust_src_present() -> bool {
    let out = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            &bpf_toolchain(),
        ])
        .output();
    out.is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("rust-src"))
}

fn install_rust_src() -> Result<()> {
    let toolchain = bpf_toolchain();
    crate::run_cmd(Command::new("rustup").args([
        "toolchain",
        "install",
        &toolchain,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn bpf_linker_present() -> bool {
    let out = Command::new("bpf-linker").arg("--version").output();
    out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

fn install_bpf_linker() -> Result<()> {
    if !llvm_present() {
        anyhow::bail!("bpf-linker needs {LLVM_PREFIX}");
    }
    crate::run_cmd(Command::new("cargo").env("LLVM_PREFIX", LLVM_PREFIX).args([
        "install",
        "bpf-linker",
        "--locked",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
    ]))
}
