//! Userspace forwarding (`--forwarding user`), end to end: the same contract as the kernel
//! path (see `kernel_path.rs`). Needs no privilege.
use lb_tests::scenarios::Path;

lb_tests::scenario_tests!(Path::User, |_: &str| true;
    big_transfer,
    many_flows,
    early_bytes_do_not_stall,
    half_close_client_first,
    half_close_server_first,
    reset_is_passed_on,
    idle_flows_time_out,
    reset_after_half_close,
    shutdown_resets_flows_left_after_the_grace_period,
    idle_timeout_with_bytes_in_flight_resets,
);
