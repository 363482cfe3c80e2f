//! Builds the eBPF object (lb-ebpf) with aya-build and tells the crate whether it has one.
//!
//! When the eBPF toolchain (nightly rust-src, bpf-linker) is missing, the userspace build still
//! succeeds: an empty object is embedded and lb runs with userspace forwarding only
//! (`cargo xtask setup` installs the toolchain).
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(lb_no_ebpf)");
    println!("cargo:rerun-if-env-changed=LB_BPF_TOOLCHAIN");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let object = out_dir.join("lb-ebpf");
    let toolchain = env::var("LB_BPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_string());
    let package = aya_build::Package {
        name: "lb-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf"),
        ..Default::default()
    };
    let built = aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain));
    let usable = match built {
        Ok(()) => object.exists(),
        Err(err) => {
            println!("cargo:warning=eBPF program not built ({err:#}); lb will forward in userspace only. Run `cargo xtask setup`.");
            // Try again once bpf-linker appears (a missing file counts as changed, so until
            // then every build retries, which fails fast).
            if let Some(home) = env::var_os("CARGO_HOME")
                .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").into()))
            {
                println!(
                    "cargo:rerun-if-changed={}",
                    PathBuf::from(home).join("bin/bpf-linker").display()
                );
            }
            false
        }
    };
    if !usable {
        // AYA_BUILD_SKIP or a failed build: embed an empty object so include_bytes! works.
        fs::write(&object, []).expect("write empty eBPF object");
        println!("cargo:rustc-cfg=lb_no_ebpf");
    }
}
