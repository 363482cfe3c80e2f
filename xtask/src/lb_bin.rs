//! Builds the `lb` binary for the demo, the tests and the benchmarks, and checks that it carries
//! its eBPF program whenever setup made that possible.
use anyhow::{bail, Context, Result};
use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// What `lb --version` says of a binary with its eBPF program (tests/src/lib.rs looks for the
/// same words).
pub const BUILT_IN: &str = "eBPF sockmap forwarding built in";

/// Builds lb (`cargo build -p lb-user --bins`, `--release` when `release`) and returns its path.
/// With `ebpf` (setup found the eBPF toolchain usable), a binary without the program is an error:
/// the build's one warning line says why.
pub fn build(release: bool, ebpf: bool) -> Result<PathBuf> {
    let root = crate::root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root).args(["build", "-p", "lb-user", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    crate::run_cmd(&mut cmd).context("building lb")?;
    let lb = crate::target_dir()
        .join(if release { "release" } else { "debug" })
        .join("lb");
    if !lb.exists() {
        bail!("{} is missing after the build", lb.display());
    }
    if ebpf && !has_ebpf(&lb)? {
        bail!(
            "{} was built without its eBPF program although its toolchain is installed (see the build's warning above)",
            lb.display()
        );
    }
    Ok(lb)
}

/// Whether `lb --version` says the binary carries its eBPF program.
pub fn has_ebpf(lb: &Path) -> Result<bool> {
    Ok(version(lb)?.contains(BUILT_IN))
}

/// What `lb --version` says.
pub fn version(lb: &Path) -> Result<String> {
    let out = Command::new(lb)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", lb.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
