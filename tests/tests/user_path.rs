//! Userspace forwarding (`--forwarding user`), end to end: the same contract as the kernel
//! path (see `kernel_path.rs`). Needs no privilege.
use lb_tests::scenarios::Path;

lb_tests::forwarding_scenarios!(Path::User, |_: &str| true);
