//! `cargo xtask setup`: installs what the eBPF build needs on a Debian machine of this kind.
//!
//! Each step runs only when its result is missing, says in one line what it installs, why and
//! how long it took, and shows the installer's output only when it fails (the whole output is
//! kept in `target/xtask-setup/`). The eBPF toolchain is the one pinned in
//! lb-ebpf/rust-toolchain.toml: setup installs that dated toolchain and nothing else with rustup,
//! so the machine's unversioned `nightly` and `stable` are never installed, updated or switched.
use anyhow::{bail, Context, Result};
use std::{
    fmt,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

/// bpf-linker version known to work with aya 0.14.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM bpf-linker is built against (its `llvm-22` feature, Debian's llvm-22-dev). The
/// pinned toolchain must use the same LLVM: bpf-linker cannot read a newer LLVM's bitcode.
const LLVM_MAJOR: u32 = 22;
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_PACKAGES: [&str; 4] = ["llvm-22-dev", "libpolly-22-dev", "libzstd-dev", "zlib1g-dev"];

/// The eBPF toolchain as lb-ebpf/rust-toolchain.toml pins it.
#[derive(serde::Deserialize)]
pub struct Toolchain {
    pub channel: String,
    components: Vec<String>,
    profile: String,
}

impl Toolchain {
    /// Reads lb-ebpf/rust-toolchain.toml, the one place the eBPF toolchain is named (lb-user's
    /// build script reads it too).
    pub fn pinned() -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct File {
            toolchain: Toolchain,
        }
        let path = crate::root().join("lb-ebpf/rust-toolchain.toml");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let file: File = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(file.toolchain)
    }

    /// `rustup run <channel> …`, never installing anything by itself (rustup's auto-install
    /// would fetch the default profile without rust-src).
    fn run(&self, program: &str) -> Command {
        let mut cmd = Command::new("rustup");
        cmd.args(["run", &self.channel, program])
            .env("RUSTUP_AUTO_INSTALL", "0");
        cmd
    }

    /// The toolchain's `rustc -vV`, if it is installed.
    fn version(&self) -> Option<String> {
        let out = self.run("rustc").arg("-vV").output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl fmt::Display for Toolchain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} with {}", self.channel, self.components.join(", "))
    }
}

/// The set-up steps, in order (bpf-linker is built against the LLVM of the first).
#[derive(Clone, Copy, PartialEq)]
enum Step {
    Llvm,
    Toolchain,
    Linker,
}

impl Step {
    const ALL: [Step; 3] = [Step::Llvm, Step::Toolchain, Step::Linker];

    fn what(self, toolchain: &Toolchain) -> String {
        match self {
            Step::Llvm => format!("LLVM {LLVM_MAJOR} development files (apt)"),
            Step::Toolchain => format!("{toolchain} (rustup)"),
            Step::Linker => format!("bpf-linker {BPF_LINKER_VERSION} (cargo install)"),
        }
    }

    fn why(self) -> &'static str {
        match self {
            Step::Llvm => "bpf-linker is built on them",
            Step::Toolchain => "compiles the eBPF program, pinned in lb-ebpf/rust-toolchain.toml",
            Step::Linker => "links the eBPF program",
        }
    }

    /// About how long the step takes here, for the plan line.
    fn seconds(self) -> u64 {
        match self {
            Step::Llvm => 20,
            Step::Toolchain => 15,
            Step::Linker => 60,
        }
    }

    fn log_name(self) -> &'static str {
        match self {
            Step::Llvm => "llvm",
            Step::Toolchain => "toolchain",
            Step::Linker => "bpf-linker",
        }
    }

    fn present(self, toolchain: &Toolchain) -> bool {
        match self {
            // The unversioned libLLVM.so link and llvm-config come with llvm-22-dev only.
            Step::Llvm => {
                let prefix = Path::new(LLVM_PREFIX);
                prefix.join("lib/libLLVM.so").exists() && prefix.join("bin/llvm-config").exists()
            }
            Step::Toolchain => {
                let out = toolchain.run("rustc").args(["--print", "sysroot"]).output();
                out.is_ok_and(|o| {
                    o.status.success()
                        && Path::new(String::from_utf8_lossy(&o.stdout).trim())
                            .join("lib/rustlib/src/rust/library/core")
                            .is_dir()
                })
            }
            // That version, built against that LLVM (its `--version` does not say which).
            Step::Linker => {
                let Some(linker) = which("bpf-linker") else {
                    return false;
                };
                let version = Command::new(&linker).arg("--version").output();
                let libs = Command::new("ldd").arg(&linker).output();
                version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
                    && libs.is_ok_and(|o| {
                        String::from_utf8_lossy(&o.stdout).contains(&format!("libLLVM.so.{LLVM_MAJOR}."))
                    })
            }
        }
    }

    fn install(self, toolchain: &Toolchain, log: &Path) -> Result<()> {
        match self {
            Step::Llvm => apt_install(&LLVM_PACKAGES, log),
            Step::Toolchain => {
                let mut cmd = Command::new("rustup");
                cmd.args([
                    "toolchain",
                    "install",
                    &toolchain.channel,
                    "--profile",
                    &toolchain.profile,
                ]);
                for component in &toolchain.components {
                    cmd.args(["--component", component]);
                }
                // Checked before bpf-linker's minute of building for nothing.
                quietly(&mut cmd, log).and_then(|()| same_llvm(toolchain))
            }
            Step::Linker => quietly(
                Command::new("cargo").env("LLVM_PREFIX", LLVM_PREFIX).args([
                    "install",
                    "bpf-linker",
                    // Replaces one built against another LLVM.
                    "--force",
                    "--locked",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    &format!("llvm-{LLVM_MAJOR}"),
                ]),
                log,
            ),
        }
    }
}

/// Makes sure the eBPF toolchain is installed. Returns whether it is usable. With `strict`, a
/// failure is an error; otherwise it is a warning and lb builds with userspace forwarding only.
pub fn ensure(strict: bool) -> Result<bool> {
    let toolchain = Toolchain::pinned()?;
    let todo: Vec<Step> = Step::ALL.into_iter().filter(|s| !s.present(&toolchain)).collect();
    // An installed toolchain is checked first; the toolchain step checks the one it installs.
    let result = if todo.contains(&Step::Toolchain) {
        Ok(())
    } else {
        same_llvm(&toolchain)
    }
    .and_then(|()| {
        if todo.is_empty() {
            eprintln!(
                "xtask setup: the eBPF toolchain is installed ({toolchain}; bpf-linker {BPF_LINKER_VERSION}; LLVM {LLVM_MAJOR})"
            );
            Ok(())
        } else {
            install(&toolchain, &todo)
        }
    });
    match result {
        Ok(()) => Ok(true),
        Err(err) if strict => Err(err),
        Err(err) => {
            eprintln!("xtask setup: WARNING: {err:#}; lb will be built without its eBPF program");
            Ok(false)
        }
    }
}

/// Runs `todo`, one line per step.
fn install(toolchain: &Toolchain, todo: &[Step]) -> Result<()> {
    let total: u64 = todo.iter().map(|s| s.seconds()).sum();
    eprintln!(
        "xtask setup: installing what the eBPF build needs: {} step(s), about {} s here",
        todo.len(),
        total
    );
    for (i, step) in todo.iter().enumerate() {
        let line = format!(
            "xtask setup: [{}/{}] {}: {}",
            i + 1,
            todo.len(),
            step.what(toolchain),
            step.why()
        );
        timed(&line, || {
            let log = log_file(step.log_name())?;
            step.install(toolchain, &log)?;
            if !step.present(toolchain) {
                bail!("installed, yet still missing (output: {})", log.display())
            }
            Ok(())
        })
        .with_context(|| format!("installing {}", step.what(toolchain)))?;
    }
    Ok(())
}

/// Runs `f` on one line: `line ... done in N s`, or `FAILED after N s`.
fn timed(line: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    eprint!("{line} ... ");
    let _ = std::io::stderr().flush();
    let started = Instant::now();
    let result = f();
    let secs = started.elapsed().as_secs();
    match &result {
        Ok(()) => eprintln!("done in {secs} s"),
        Err(_) => eprintln!("FAILED after {secs} s"),
    }
    result
}

/// Fails unless the pinned toolchain's LLVM is the one bpf-linker is built against.
fn same_llvm(toolchain: &Toolchain) -> Result<()> {
    let version = toolchain.version().context("the pinned toolchain does not run")?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    if !llvm.starts_with(&format!("{LLVM_MAJOR}.")) {
        bail!(
            "{} uses LLVM {llvm}, and bpf-linker is built against LLVM {LLVM_MAJOR}: pin a toolchain with LLVM {LLVM_MAJOR} in lb-ebpf/rust-toolchain.toml",
            toolchain.channel
        );
    }
    Ok(())
}

/// Installs from Debian each `(program, package)` whose program is not on PATH, in one line
/// that names `who` and `why`. A program `python3:MODULE` is a Python module Debian's python3
/// (`/usr/bin/python3`, the one Debian's packages install for) must import.
pub fn ensure_programs(who: &str, why: &str, programs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = programs
        .iter()
        .filter(|(program, _)| !present(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    timed(
        &format!("{who}: installing {} (apt: {why})", missing.join(" ")),
        || apt_install(&missing, &log_file("apt")?),
    )
}

/// `apt-get update`, then `apt-get install` of `packages`, output to `log`.
fn apt_install(packages: &[&str], log: &Path) -> Result<()> {
    quietly(Command::new("apt-get").args(["update", "-q"]), log)?;
    quietly(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q"])
            .args(packages),
        log,
    )
}

/// Runs `cmd` with its output appended to `log`; when it fails, the error carries the output's
/// last lines.
pub fn quietly(cmd: &mut Command, log: &Path) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if status.success() {
        return Ok(());
    }
    let output = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = output.lines().collect();
    let tail: String = lines[lines.len().saturating_sub(40)..]
        .iter()
        .map(|l| format!("\n    {l}"))
        .collect();
    bail!(
        "{:?} failed: {status}; the end of its output ({} has all of it):{tail}",
        cmd.get_program(),
        log.display()
    )
}

/// Whether `program` (see [`ensure_programs`]) is there.
fn present(program: &str) -> bool {
    match program.strip_prefix("python3:") {
        Some(module) => Command::new(DEBIAN_PYTHON)
            .args(["-c", &format!("import {module}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        None => which(program).is_some(),
    }
}

/// Debian's Python: a `python3` earlier on PATH (pyenv's, say) does not see the modules Debian's
/// packages install.
const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// Where `program` is on PATH, if it is.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// An empty `xtask-setup/NAME.log` in the target directory, for one step's output.
fn log_file(name: &str) -> Result<PathBuf> {
    let dir = crate::target_dir().join("xtask-setup");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = dir.join(format!("{name}.log"));
    std::fs::write(&log, "").with_context(|| format!("creating {}", log.display()))?;
    Ok(log)
}
