//! `cargo xtask fresh`: what a new machine of this kind gets from the README's first command,
//! checked here against an empty rustup and cargo home (temporary directories under
//! `target/fresh-machine`; Debian's packages stay as they are). `cargo xtask test` runs it, so CI
//! sees what a machine where nothing was installed by hand would see.
//!
//! The temporary home starts with the rustup program and, linked as `host`, the toolchain that
//! runs this command (a fresh machine has its stable). With `--nightly` it also gets the channel's
//! newest unversioned `nightly`, whose LLVM may be newer than bpf-linker's: the state that once
//! left lb without its eBPF program. Then `xtask setup` runs in that home, lb is built there (a
//! quick profile) and must say its eBPF program is built in, and every toolchain that was there
//! before must be exactly as it was.
use anyhow::{bail, ensure, Context, Result};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use crate::{lb_bin, setup};

/// The cargo profile of the build (Cargo.toml: nothing optimised, no debug info).
const PROFILE: &str = "fresh-check";

/// Runs the check; with `nightly`, the home also holds the newest unversioned `nightly`.
pub fn run(nightly: bool) -> Result<()> {
    let dir = crate::root().join("target/fresh-machine");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let home = Home::create(&dir)?;
    let say = |what: &str| eprintln!("xtask fresh: {what}");
    say(&format!(
        "an empty rustup and cargo home in {}, with this machine's {} linked as `host`",
        dir.display(),
        home.host_version
    ));
    if nightly {
        let started = Instant::now();
        setup::quietly(
            home.command("rustup")
                .args(["toolchain", "install", "nightly", "--profile", "minimal"]),
            &dir.join("nightly.log"),
        )
        .context("installing the newest nightly into the temporary home")?;
        let toolchains = home.toolchains()?;
        let version = toolchains.get("nightly").map_or("", String::as_str);
        say(&format!(
            "installed the channel's newest `nightly` in {} s: {}, LLVM {}",
            started.elapsed().as_secs(),
            version.lines().next().unwrap_or("?"),
            version
                .lines()
                .find_map(|l| l.strip_prefix("LLVM version: "))
                .unwrap_or("?")
        ));
    }
    let before = home.toolchains()?;
    let default_before = home.default_toolchain()?;
    if let Some(linker) = home.which("bpf-linker") {
        bail!(
            "{} is on the temporary home's PATH before setup: setup's bpf-linker step would not be checked",
            linker.display()
        );
    }

    let started = Instant::now();
    say("running `xtask setup` in it:");
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    // Its logs, and bpf-linker's build, in the temporary directory too.
    crate::run_cmd(
        home.command(exe.to_str().context("xtask's path")?)
            .arg("setup")
            .env("CARGO_TARGET_DIR", dir.join("target")),
    )
    .context("xtask setup in the temporary home")?;
    let setup_secs = started.elapsed().as_secs();

    let started = Instant::now();
    let log = dir.join("build.log");
    say(&format!(
        "building lb there (`cargo build -p lb-user --bin lb --profile {PROFILE}`; output in {}) ...",
        log.display()
    ));
    setup::quietly(
        home.command("cargo")
            .current_dir(crate::root())
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .args(["build", "-p", "lb-user", "--bin", "lb", "--profile", PROFILE]),
        &log,
    )
    .context("building lb in the temporary home")?;
    let build_secs = started.elapsed().as_secs();
    let lb = dir.join("target").join(PROFILE).join("lb");
    let version = lb_bin::version(&lb)?;
    if !version.contains(lb_bin::BUILT_IN) {
        let build_log = std::fs::read_to_string(&log).unwrap_or_default();
        let warning = build_log
            .lines()
            .find(|l| l.contains("WITHOUT its eBPF program"))
            .unwrap_or("(no warning from the build)");
        bail!("from an empty home, `{version}`: {warning}");
    }

    let after = home.toolchains()?;
    only_added(&before, &after, &setup::Toolchain::pinned()?.channel)?;
    let default_after = home.default_toolchain()?;
    ensure!(
        default_after == default_before,
        "setup or the build switched the default toolchain from {default_before} to {default_after}"
    );
    say(&format!(
        "passed: setup {setup_secs} s, build {build_secs} s; `{version}`; toolchains before {:?}, after {:?}, the ones before unchanged",
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    ));
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}

/// Toolchains by name, each with its `rustc -vV` and installed components.
type Toolchains = BTreeMap<String, String>;

/// Fails unless `after` is `before` plus the `pinned` toolchain, every other one unchanged.
fn only_added(before: &Toolchains, after: &Toolchains, pinned: &str) -> Result<()> {
    for (name, was) in before {
        ensure!(
            after.get(name) == Some(was),
            "setup or the build changed the toolchain {name}: it was\n{was}and is now\n{}",
            after.get(name).map_or("gone\n", String::as_str)
        );
    }
    let added: Vec<&String> = after.keys().filter(|name| !before.contains_key(*name)).collect();
    ensure!(
        added == [pinned],
        "setup should add exactly {pinned}; toolchains before: {:?}, after: {:?}",
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    Ok(())
}

/// The variables the temporary home's commands keep: a machine behind a proxy or a mirror
/// reaches rustup's and crates.io's servers only with them.
const KEPT: [&str; 14] = [
    "HOME",
    "LANG",
    "TERM",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "RUSTUP_DIST_SERVER",
    "RUSTUP_UPDATE_ROOT",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "CARGO_HTTP_CAINFO",
];

/// A rustup and cargo home of its own, and an environment that sees nothing else.
struct Home {
    rustup_home: PathBuf,
    cargo_home: PathBuf,
    /// `rustc --version` of the toolchain linked as `host`.
    host_version: String,
    /// The target triple rustup appends to the names of the toolchains it installs.
    triple: String,
}

impl Home {
    /// Makes the home in `dir`: the rustup program's proxies in `cargo/bin`, and the toolchain
    /// running this command linked as the default, `host`.
    fn create(dir: &Path) -> Result<Self> {
        let home = Home {
            rustup_home: dir.join("rustup"),
            cargo_home: dir.join("cargo"),
            host_version: String::new(),
            triple: String::new(),
        };
        let bin = home.cargo_home.join("bin");
        std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
        std::fs::create_dir_all(&home.rustup_home)?;
        let rustup = setup::which("rustup")
            .context("rustup is not on PATH")?
            .canonicalize()
            .context("resolving rustup's path")?;
        // What rustup's installer puts in a new cargo home: the program, under its proxies' names.
        for name in ["rustup", "cargo", "rustc", "rustdoc"] {
            std::os::unix::fs::symlink(&rustup, bin.join(name))
                .with_context(|| format!("linking {name} to {}", rustup.display()))?;
        }
        let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
        let host_version = output(Command::new("rustc").arg("--version"))?;
        let verbose = output(Command::new("rustc").arg("-vV"))?;
        let triple = verbose
            .lines()
            .find_map(|l| l.strip_prefix("host: "))
            .context("rustc -vV names no host")?;
        output(
            home.command("rustup")
                .args(["toolchain", "link", "host", sysroot.trim()]),
        )?;
        output(home.command("rustup").args(["default", "host"]))?;
        Ok(Home {
            host_version: host_version.trim().to_string(),
            triple: triple.to_string(),
            ..home
        })
    }

    /// `program` with an environment of nothing but this home (and the system's PATH).
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .env("PATH", self.path())
            .env("RUSTUP_HOME", &self.rustup_home)
            .env("CARGO_HOME", &self.cargo_home);
        // What a user's shell has besides: where home is, and how to reach the registries.
        for keep in KEPT {
            if let Some(value) = std::env::var_os(keep) {
                cmd.env(keep, value);
            }
        }
        cmd
    }

    /// Where `program` is on this home's PATH.
    fn which(&self, program: &str) -> Option<PathBuf> {
        std::env::split_paths(&self.path())
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    }

    /// The home's PATH: its cargo/bin, then the system's directories.
    fn path(&self) -> std::ffi::OsString {
        let mut path = self.cargo_home.join("bin").into_os_string();
        path.push(":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        path
    }

    /// The home's default toolchain, as `rustup default` says it.
    fn default_toolchain(&self) -> Result<String> {
        Ok(output(self.command("rustup").arg("default"))?.trim().to_string())
    }

    /// Every toolchain of the home, with its `rustc -vV` and installed components.
    fn toolchains(&self) -> Result<Toolchains> {
        let list = output(self.command("rustup").args(["toolchain", "list"]))?;
        let mut toolchains = BTreeMap::new();
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let version = output(
                self.command("rustup")
                    .args(["run", name, "rustc", "-vV"])
                    .env("RUSTUP_AUTO_INSTALL", "0"),
            )?;
            // rustup's own list (`rustup component list`) refuses linked toolchains.
            let sysroot = output(
                self.command("rustup")
                    .args(["run", name, "rustc", "--print", "sysroot"])
                    .env("RUSTUP_AUTO_INSTALL", "0"),
            )?;
            let components =
                std::fs::read_to_string(Path::new(sysroot.trim()).join("lib/rustlib/components"))
                    .unwrap_or_default();
            // `nightly-x86_64-unknown-linux-gnu` is listed; `nightly` is how it is asked for.
            let short = name.strip_suffix(&format!("-{}", self.triple)).unwrap_or(name);
            toolchains.insert(short.to_string(), version + &components);
        }
        Ok(toolchains)
    }
}

/// A command's standard output; an error when it fails.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toolchains(entries: &[(&str, &str)]) -> Toolchains {
        entries
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    const NIGHTLY: (&str, &str) = ("nightly", "rustc 1.101.0-nightly\nLLVM version: 23.1.0\nrustc\n");
    const HOST: (&str, &str) = ("host", "rustc 1.95.0\nLLVM version: 22.1.2\nrustc\n");
    const PINNED: (&str, &str) = ("nightly-2026-05-19", "rustc 1.97.0-nightly\nrust-src\n");

    #[test]
    fn the_pinned_toolchain_added_and_nothing_else_touched_passes() {
        let before = toolchains(&[HOST, NIGHTLY]);
        let after = toolchains(&[HOST, NIGHTLY, PINNED]);
        only_added(&before, &after, PINNED.0).unwrap();
    }

    #[test]
    fn an_updated_or_extended_nightly_fails() {
        let before = toolchains(&[HOST, NIGHTLY]);
        let updated = toolchains(&[HOST, ("nightly", "rustc 1.102.0-nightly\n"), PINNED]);
        assert!(only_added(&before, &updated, PINNED.0).is_err());
        let with_src = format!("{}rust-src\n", NIGHTLY.1);
        let extended = toolchains(&[HOST, ("nightly", &with_src), PINNED]);
        assert!(only_added(&before, &extended, PINNED.0).is_err());
    }

    #[test]
    fn a_nightly_installed_or_a_toolchain_removed_or_the_pinned_one_missing_fails() {
        let before = toolchains(&[HOST]);
        assert!(only_added(&before, &toolchains(&[HOST, NIGHTLY, PINNED]), PINNED.0).is_err());
        assert!(only_added(&before, &toolchains(&[NIGHTLY, PINNED]), PINNED.0).is_err());
        assert!(only_added(&before, &toolchains(&[HOST]), PINNED.0).is_err());
    }
}
