//! Builds the eBPF object (lb-ebpf) with aya-build on the toolchain pinned in
//! lb-ebpf/rust-toolchain.toml, and tells the crate whether it has one.
//!
//! Where the program cannot be built (its toolchain, the toolchain's rust-src or bpf-linker
//! missing, or the eBPF build failing), the userspace build still succeeds: an empty object is
//! embedded, lb forwards in userspace only and `lb --version` says so. The build then prints one
//! warning line naming the cause and the command that fixes it; aya-build's own output (every
//! line of the inner cargo, relayed as cargo warnings) goes to a log file instead of the screen.
use std::{
    env, fs,
    io::Write,
    os::fd::{AsRawFd, FromRawFd},
    path::{Path, PathBuf},
    process::Command,
};

const EBPF_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");

/// Why the program is not in this build.
enum NotBuilt {
    /// AYA_BUILD_SKIP asked for a userspace-only build.
    Skipped,
    /// Something the eBPF build needs is not installed.
    Missing(String),
    /// The eBPF build ran and failed: its first error line.
    Failed(String),
}

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let capture = out_dir.join("aya-build.out");
    let mut cargo = Cargo(take_stdout(&capture));
    cargo.say("cargo::rustc-check-cfg=cfg(lb_no_ebpf)");
    cargo.say("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    cargo.say(&format!("cargo:rerun-if-changed={EBPF_DIR}"));
    let object = out_dir.join("lb-ebpf");
    let log = out_dir.join("ebpf-build.log");
    let toolchain = pinned_toolchain();
    let size = |object: &Path| fs::metadata(object).ok().map(|m| m.len());
    let not_built = match build(&mut cargo, &toolchain, &capture, &log) {
        Ok(()) if size(&object).is_some_and(|n| n > 0) => return,
        Ok(()) => NotBuilt::Failed("aya-build produced no lb-ebpf object".into()),
        Err(why) => why,
    };
    // Embed an empty object so include_bytes! works; lb_no_ebpf makes lb say it has none. An
    // empty one already there is left alone: a new mtime would recompile lb on every build.
    if size(&object) != Some(0) {
        fs::write(&object, []).expect("write empty eBPF object");
    }
    cargo.say("cargo:rustc-cfg=lb_no_ebpf");
    let failed = matches!(not_built, NotBuilt::Failed(_));
    let (cause, fix) = match not_built {
        NotBuilt::Skipped => {
            cargo.say("cargo:warning=AYA_BUILD_SKIP is set: lb is built without its eBPF program (userspace forwarding only)");
            return;
        }
        NotBuilt::Missing(what) => (what, "`cargo xtask setup`, then build again".to_string()),
        NotBuilt::Failed(error) => (
            format!("the eBPF build failed: {error}"),
            format!(
                "see {} (`cargo xtask setup` repairs a broken eBPF toolchain)",
                log.display()
            ),
        ),
    };
    cargo.say(&format!("cargo:warning=lb is built WITHOUT its eBPF program, so it forwards in userspace only: {cause}. Fix: {fix}."));
    for watched in retry_when(&out_dir, &toolchain, failed) {
        cargo.say(&format!("cargo:rerun-if-changed={}", watched.display()));
    }
}

/// When to try again. After a failed eBPF build, on every build: whatever repairs it (a fix in
/// lb-ebpf, `cargo xtask setup`) is worth trying at once. When something is missing, once setup
/// has installed something (cargo's bin directory: bpf-linker; the list of toolchains rustup has
/// installed; the pinned toolchain's components: rust-src), not on every build: a rerun of this
/// script recompiles lb (35 s in release). Only paths that exist are watched, since a missing one
/// would make every build rerun it.
fn retry_when(out_dir: &Path, toolchain: &str, failed: bool) -> Vec<PathBuf> {
    if failed {
        return vec![out_dir.join("never-written")];
    }
    let home = |var: &str, default: &str| {
        env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(default)))
    };
    let mut watched = Vec::new();
    watched.extend(home("CARGO_HOME", ".cargo").map(|h| h.join("bin")));
    watched.extend(home("RUSTUP_HOME", ".rustup").map(|h| h.join("update-hashes")));
    watched.extend(sysroot(toolchain).map(|s| s.join("lib/rustlib/components")));
    watched.retain(|p| p.exists());
    watched
}

/// Where this script's directives go: cargo's end of standard output (see [`take_stdout`]).
struct Cargo(fs::File);

impl Cargo {
    fn say(&mut self, line: &str) {
        writeln!(self.0, "{line}").expect("write to cargo");
    }
}

/// Checks that the eBPF toolchain is installed, then builds the program into OUT_DIR.
fn build(cargo: &mut Cargo, toolchain: &str, capture: &Path, log: &Path) -> Result<(), NotBuilt> {
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return Err(NotBuilt::Skipped);
    }
    check_installed(toolchain)?;
    let package = aya_build::Package {
        name: "lb-ebpf",
        root_dir: EBPF_DIR,
        ..Default::default()
    };
    let built = aya_build::build_ebpf([package], aya_build::Toolchain::Custom(toolchain));
    let _ = std::io::stdout().flush();
    let output = fs::read_to_string(capture).unwrap_or_default();
    // Pass on aya-build's directives (rerun-if-changed …); the lines it relays go to the log.
    let mut relayed = String::new();
    for line in output.lines() {
        match line
            .strip_prefix("cargo:warning=")
            .or_else(|| line.strip_prefix("cargo::warning="))
        {
            Some(text) => {
                relayed.push_str(text);
                relayed.push('\n');
            }
            None if line.starts_with("cargo:") => cargo.say(line),
            None => {}
        }
    }
    let _ = fs::write(log, &relayed);
    match built {
        Ok(()) => {
            // The rendered compiler messages, not cargo's summary of them.
            let warnings = relayed
                .lines()
                .filter(|l| l.starts_with("warning") && !l.contains(" generated "))
                .count();
            if warnings > 0 {
                cargo.say(&format!(
                    "cargo:warning=the eBPF program built with {warnings} compiler warning(s): {}",
                    log.display()
                ));
            }
            Ok(())
        }
        Err(err) => {
            // aya-build's error is the whole inner command line; the log keeps it. (The inner
            // cargo's stderr may still be on its way to the capture when aya-build returns.)
            let _ = fs::write(log, format!("{relayed}\n{err:#}\n"));
            let first_error = relayed
                .lines()
                .find(|l| l.starts_with("error"))
                .unwrap_or("the inner cargo failed");
            Err(NotBuilt::Failed(first_error.to_string()))
        }
    }
}

/// The channel of lb-ebpf/rust-toolchain.toml, the one place the eBPF toolchain is named.
fn pinned_toolchain() -> String {
    #[derive(serde::Deserialize)]
    struct File {
        toolchain: Toolchain,
    }
    #[derive(serde::Deserialize)]
    struct Toolchain {
        channel: String,
    }
    let path = format!("{EBPF_DIR}/rust-toolchain.toml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let file: File = toml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    file.toolchain.channel
}

/// What aya-build needs and would otherwise fail on, one line of output later than this says
/// (or, where rustup installs missing toolchains by itself, after a silent download).
fn check_installed(toolchain: &str) -> Result<(), NotBuilt> {
    let missing = |what: String| Err(NotBuilt::Missing(what));
    if !on_path("rustup") {
        return missing("rustup is not installed (the eBPF toolchain is installed with it)".into());
    }
    let Some(sysroot) = sysroot(toolchain) else {
        return missing(format!("its toolchain {toolchain} is not installed"));
    };
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return missing(format!("its toolchain {toolchain} has no rust-src"));
    }
    if !on_path("bpf-linker") {
        return missing("bpf-linker is not installed (or not on PATH)".into());
    }
    Ok(())
}

/// The toolchain's sysroot, if it is installed (never installing it: rustup's auto-install would
/// fetch the default profile, without rust-src, in the middle of a build).
fn sysroot(toolchain: &str) -> Option<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn on_path(program: &str) -> bool {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

/// Points this process's standard output (fd 1) at the file at `capture` for good, and returns
/// a copy of the original descriptor for cargo's directives. aya-build prints every line of its
/// inner cargo as a cargo warning (hundreds of lines on screen); captured, they go to a log. fd 1
/// is never given back because aya-build returns its error while its thread that relays the inner
/// cargo's stderr may still be printing (so the `gag` crate, which restores fd 1, does not fit).
fn take_stdout(capture: &Path) -> fs::File {
    let file = fs::File::create(capture).expect("create the aya-build output file");
    // SAFETY: dup and dup2 on descriptors that are open; the duplicate is owned by the File.
    unsafe {
        let cargo = libc::dup(1);
        assert!(cargo >= 0, "dup(stdout)");
        assert!(libc::dup2(file.as_raw_fd(), 1) >= 0, "dup2(stdout)");
        fs::File::from_raw_fd(cargo)
    }
}
