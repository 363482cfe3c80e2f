//! The configuration's validation: each error with its file:line:column.
use super::*;

/// The one error `src` has, as printed.
fn only_error(src: &str) -> String {
    let e = parse("t.yaml", src).unwrap_err().0;
    assert_eq!(
        e.len(),
        1,
        "{}",
        e.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
    );
    e[0].to_string()
}

const GOOD: &str = "listeners:\n  - name: web\n    bind: 127.0.0.1:8080\n    backend: app\nbackends:\n  - name: app\n    servers:\n      - { name: s1, address: 127.0.0.1:9001, weight: 3 }\n";

#[test]
fn minimal_config_gets_defaults() {
    let c = parse("t.yaml", GOOD).unwrap();
    assert_eq!(c.forwarding, Forwarding::Auto);
    assert_eq!(c.listeners[0].client_timeout, DEFAULT_IDLE);
    assert_eq!(c.backends[0].connect_timeout, DEFAULT_CONNECT);
    assert_eq!(c.backends[0].servers[0].weight, 3);
    assert!(c.listeners[0].nodelay);
    assert_eq!(c.kernel_sndbuf, SendBuffer::Auto);
    assert!(c.upgrade_moves_kernel_flows);
    assert_eq!(c.max_in_flight, 16 << 20);
}

#[test]
fn forwarding_is_a_mode_or_settings() {
    let c = parse("t.yaml", &format!("forwarding: user\n{GOOD}")).unwrap();
    assert_eq!(
        (c.forwarding, c.offload_after),
        (Forwarding::User, DEFAULT_OFFLOAD_AFTER)
    );
    let c = parse(
        "t.yaml",
        &format!("forwarding: {{ mode: kernel, offload_after: 0 }}\n{GOOD}"),
    )
    .unwrap();
    assert_eq!((c.forwarding, c.offload_after), (Forwarding::Kernel, 0));
    let c = parse(
        "t.yaml",
        &format!("forwarding: {{ offload_after: 1MiB }}\n{GOOD}"),
    )
    .unwrap();
    assert_eq!((c.forwarding, c.offload_after), (Forwarding::Auto, 1 << 20));
    let e = parse("t.yaml", &format!("forwarding:\n  mode: fast\n{GOOD}"))
        .unwrap_err()
        .0;
    assert!(
        e[0].to_string()
            .starts_with("t.yaml:2:9: forwarding: unknown mode `fast`"),
        "{}",
        e[0]
    );
    let e = parse("t.yaml", &format!("forwarding: {{ offload: 1 }}\n{GOOD}"))
        .unwrap_err()
        .0;
    assert_eq!(e[0].position.map(|p| p.0), Some(1), "{}", e[0]);
}

#[test]
fn max_in_flight_is_checked_where_written() {
    let c = parse(
        "t.yaml",
        &format!("flow_control: {{ max_in_flight: 1MiB }}\n{GOOD}"),
    )
    .unwrap();
    assert_eq!(c.max_in_flight, 1 << 20);
    let e = only_error(&format!("flow_control:\n  max_in_flight: 4KiB\n{GOOD}"));
    assert!(
        e.starts_with("t.yaml:2:18: flow_control.max_in_flight must be between"),
        "{e}"
    );
}

#[test]
fn sizes_parse_with_units() {
    let c = parse("t.yaml", &format!("tune: {{ kernel_sndbuf: 2MiB }}\n{GOOD}")).unwrap();
    assert_eq!(c.kernel_sndbuf, SendBuffer::Set(Some(2 << 20)));
    let c = parse("t.yaml", &format!("tune: {{ kernel_sndbuf: 0 }}\n{GOOD}")).unwrap();
    assert_eq!(c.kernel_sndbuf, SendBuffer::Set(None));
}

#[test]
fn the_send_buffer_is_a_size_or_auto_which_follows_the_kernel() {
    let c = parse("t.yaml", &format!("tune: {{ kernel_sndbuf: auto }}\n{GOOD}")).unwrap();
    assert_eq!(c.kernel_sndbuf, SendBuffer::Auto);
    assert_eq!(
        only_error(&format!("tune:\n  kernel_sndbuf: lots\n{GOOD}")),
        "t.yaml:2:18: tune.kernel_sndbuf: `lots` is neither a size (`8MiB`, `0`) nor `auto`"
    );
    for value in ["true", "-1", "[1]", "1.5"] {
        assert_eq!(
            only_error(&format!("tune:\n  threads: 2\n  kernel_sndbuf: {value}\n{GOOD}")),
            "t.yaml:3:18: tune.kernel_sndbuf: this is neither a size (`8MiB`, `0`) nor `auto`",
            "{value}"
        );
    }
    for (release, want) in [
        ("6.18.0-1-amd64", Some(8 << 20)),
        ("6.18-rc1", Some(8 << 20)),
        ("6.19", Some(8 << 20)),
        ("7.0.2", Some(8 << 20)),
        ("10.0", Some(8 << 20)),
        ("6.2.0", None),
        ("v6.18", None),
        ("garbage", None),
        ("6.12.118+deb13-amd64", None),
        ("6.1.0-57-amd64", None),
        ("5.15.0", None),
        ("", None),
    ] {
        assert_eq!(SendBuffer::Auto.on(release), want, "{release}");
        assert_eq!(SendBuffer::Set(Some(1 << 20)).on(release), Some(1 << 20));
        assert_eq!(SendBuffer::Set(None).on(release), None);
    }
}

#[test]
fn balance_algorithms() {
    for (name, want) in Balance::NAMES {
        let text = GOOD.replace(
            "  - name: app\n",
            &format!("  - name: app\n    balance: {name}\n"),
        );
        // `uri` needs an HTTP listener.
        let text = if want == Balance::Uri {
            text.replace("    backend: app\n", "    mode: http\n    default_backend: app\n")
        } else {
            text
        };
        let c = parse("t.yaml", &text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(c.backends[0].balance, want);
    }
    let e = only_error(&GOOD.replace("  - name: app\n", "  - name: app\n    balance: fastest\n"));
    assert!(
        e.starts_with("t.yaml:7:14: balance: unknown algorithm `fastest`; expected one of roundrobin"),
        "{e}"
    );
    let e = only_error(&GOOD.replace("  - name: app\n", "  - name: app\n    balance: uri\n"));
    assert!(
        e.starts_with("t.yaml:4:14: listener `web` is mode tcp, but backend `app` balances by uri"),
        "{e}"
    );
}

#[test]
fn health_checks() {
    use super::health::{CheckKind, HealthCheck};
    let with_check = |yaml: &str| GOOD.replace("  - name: app\n", &format!("  - name: app\n{yaml}"));
    let c = parse("t.yaml", &with_check("    health_check: {}\n")).unwrap();
    assert_eq!(
        c.backends[0].health_check,
        Some(HealthCheck {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
        })
    );
    assert_eq!(parse("t.yaml", GOOD).unwrap().backends[0].health_check, None);
    let c = parse(
        "t.yaml",
        &with_check("    health_check: { kind: http, path: /hc, expect_status: 204, timeout: 1s }\n    observe: { max_consecutive_errors: 5 }\n"),
    )
    .unwrap();
    let hc = c.backends[0].health_check.clone().unwrap();
    assert_eq!(
        hc.kind,
        CheckKind::Http {
            path: "/hc".into(),
            expect_status: Some(204)
        }
    );
    assert_eq!(hc.timeout, Duration::from_secs(1));
    assert_eq!(c.backends[0].max_consecutive_errors, Some(5));
    for (yaml, message) in [
        (
            "    health_check: { interval: 10ms }\n",
            "t.yaml:7:31: health_check.interval must be between 100ms and 1h",
        ),
        (
            "    health_check: { timeout: 3s }\n",
            "t.yaml:7:30: health_check.timeout must be above 0 and at most",
        ),
        (
            "    health_check: { rise: 0 }\n",
            "t.yaml:7:27: health_check.rise must be between 1 and 100",
        ),
        (
            "    health_check: { path: /x }\n",
            "t.yaml:7:27: health_check.path needs kind: http",
        ),
        (
            "    health_check: { kind: http, path: x }\n",
            "t.yaml:7:39: health_check.path must start with /",
        ),
        (
            "    health_check: { kind: udp }\n",
            "t.yaml:7:27: health_check.kind: `udp` is not supported",
        ),
        (
            "    observe: { max_consecutive_errors: 2 }\n",
            "t.yaml:7:14: observe needs a health_check",
        ),
        (
            "    health_check: { fall: 1, rise: 1, speed: 2 }\n",
            "t.yaml:7:39: backends[0].health_check: unknown field `speed`",
        ),
    ] {
        let e = only_error(&with_check(yaml));
        assert!(e.starts_with(message), "{yaml}: {e}");
    }
}

#[test]
fn cpu_affinity_is_auto_unless_set() {
    use crate::affinity::CpuAffinity;
    assert_eq!(parse("t.yaml", GOOD).unwrap().cpu_affinity, CpuAffinity::Auto);
    for (text, want) in [
        ("none", CpuAffinity::Unbound),
        ("1", CpuAffinity::Cpus(vec![1])),
        ("0-1", CpuAffinity::Cpus(vec![0, 1])),
        ("\"2,0\"", CpuAffinity::Cpus(vec![0, 2])),
    ] {
        let c = parse("t.yaml", &format!("tune: {{ cpu_affinity: {text} }}\n{GOOD}")).unwrap();
        assert_eq!(c.cpu_affinity, want, "{text}");
    }
    let e = only_error(&format!("tune:\n  cpu_affinity: all\n{GOOD}"));
    assert!(
        e.starts_with("t.yaml:2:17: tune.cpu_affinity: `all` is neither `auto`, `none` nor a CPU list"),
        "{e}"
    );
}

#[test]
fn kernel_congestion_is_cubic_unless_set_and_a_bad_name_is_refused_at_its_value() {
    assert_eq!(
        parse("t.yaml", GOOD).unwrap().kernel_congestion,
        KernelCongestion::Default
    );
    for (text, want) in [
        ("system", KernelCongestion::System),
        ("bbr", KernelCongestion::Named("bbr".into())),
        ("reno", KernelCongestion::Named("reno".into())),
    ] {
        let c = parse(
            "t.yaml",
            &format!("tune: {{ kernel_congestion: {text} }}\n{GOOD}"),
        )
        .unwrap();
        assert_eq!(c.kernel_congestion, want, "{text}");
    }
    for bad in ["\"cu bic\"", "\"\"", "a_name_far_too_long"] {
        let e = only_error(&format!("tune:\n  kernel_congestion: {bad}\n{GOOD}"));
        assert!(
            e.starts_with("t.yaml:2:22: tune.kernel_congestion: `"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn threads_default_to_the_cpus_and_are_bounded() {
    let c = parse("t.yaml", GOOD).unwrap();
    assert_eq!(c.threads, std::thread::available_parallelism().unwrap().get());
    let c = parse("t.yaml", &format!("tune: {{ threads: 3 }}\n{GOOD}")).unwrap();
    assert_eq!(c.threads, 3);
    for bad in ["0", "1025"] {
        let e = only_error(&format!("tune: {{ threads: {bad} }}\n{GOOD}"));
        assert!(
            e.starts_with("t.yaml:1:18: tune.threads must be between 1 and 1024"),
            "{e}"
        );
    }
}

#[test]
fn unknown_key_is_located() {
    let src = GOOD.replace("    backend: app\n", "    backend: app\n    bakclog: 5\n");
    let e = parse("t.yaml", &src).unwrap_err().0;
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].position, Some((5, 5)), "{}", e[0]);
    assert!(e[0].message.contains("unknown field `bakclog`"), "{}", e[0]);
}

#[test]
fn every_semantic_error_is_reported_with_its_position() {
    let src = GOOD
        .replace("bind: 127.0.0.1:8080", "bind: nowhere")
        .replace("backend: app", "backend: nope");
    let e = parse("t.yaml", &src).unwrap_err().0;
    let shown: Vec<String> = e.iter().map(|e| e.to_string()).collect();
    assert_eq!(e.len(), 2, "{shown:?}");
    assert!(shown[0].starts_with("t.yaml:3:11: bind: `nowhere`"), "{shown:?}");
    assert!(
        shown[1].starts_with("t.yaml:4:14: listener `web` names backend `nope`"),
        "{shown:?}"
    );
}

#[test]
fn the_header_field_limit_is_set_within_its_bounds() {
    assert_eq!(parse("t.yaml", GOOD).unwrap().limits.max_header_fields, 100);
    let c = parse("t.yaml", &format!("limits: {{ max_header_fields: 200 }}\n{GOOD}")).unwrap();
    assert_eq!(c.limits.max_header_fields, 200);
    for n in [0, 1001] {
        let e = only_error(&format!("limits: {{ max_header_fields: {n} }}\n{GOOD}"));
        assert!(
            e.starts_with("t.yaml:1:30: limits.max_header_fields must be between 1 and 1000"),
            "{e}"
        );
    }
}

#[test]
fn out_of_range_values_are_refused_where_written() {
    let src = GOOD
        .replace(
            "    backend: app\n",
            "    backend: app\n    keepalive: { idle: 0s, count: 500 }\n",
        )
        .replace("weight: 3", "weight: 0");
    let src = format!("timeouts: {{ server: 100d }}\n{src}");
    let e = parse("t.yaml", &src).unwrap_err().0;
    let shown: Vec<String> = e.iter().map(|e| e.to_string()).collect();
    assert_eq!(e.len(), 4, "{shown:?}");
    assert!(
        shown[0].starts_with("t.yaml:1:21: timeouts.server is longer than the maximum"),
        "{shown:?}"
    );
    assert!(
        shown[1].starts_with("t.yaml:10:7: every server of backend `app` has weight 0"),
        "{shown:?}"
    );
    assert!(
        shown[2].starts_with("t.yaml:6:24: keepalive.idle must be between"),
        "{shown:?}"
    );
    assert!(
        shown[3].starts_with("t.yaml:6:35: keepalive.count must be between"),
        "{shown:?}"
    );
}

#[test]
fn durations_parse_and_zero_is_refused() {
    let src = format!("timeouts: {{ connect: 250ms, client: 0s }}\n{GOOD}");
    let e = parse("t.yaml", &src).unwrap_err().0;
    assert!(
        e[0].message.contains("timeouts.client must be longer than zero"),
        "{}",
        e[0]
    );
}

#[test]
fn retries_default_to_three_and_are_bounded() {
    assert_eq!(parse("t.yaml", GOOD).unwrap().backends[0].retries, 3);
    let with = |n: &str| GOOD.replace("  - name: app\n", &format!("  - name: app\n    retries: {n}\n"));
    assert_eq!(parse("t.yaml", &with("0")).unwrap().backends[0].retries, 0);
    let e = only_error(&with("101"));
    assert!(
        e.starts_with("t.yaml:7:14: retries must be between 0 and 100"),
        "{e}"
    );
}

#[test]
fn maxconn_and_the_queue_timeout() {
    let c = parse("t.yaml", GOOD).unwrap();
    assert_eq!(c.backends[0].servers[0].maxconn, None);
    // The queue waits as long as a connect may take, unless set.
    assert_eq!(c.backends[0].queue_timeout, c.backends[0].connect_timeout);
    let text = GOOD.replace("weight: 3 }", "weight: 3, maxconn: 10 }");
    let c = parse("t.yaml", &format!("timeouts: {{ queue: 2s }}\n{text}")).unwrap();
    assert_eq!(c.backends[0].servers[0].maxconn, Some(10));
    assert_eq!(c.backends[0].queue_timeout, Duration::from_secs(2));
    let e = only_error(&GOOD.replace("weight: 3 }", "weight: 3, maxconn: 0 }"));
    assert!(e.contains("maxconn must be between 1 and 1000000"), "{e}");
    let e = only_error(&GOOD.replace(
        "    backend: app\n",
        "    backend: app\n    timeouts: { queue: 1s }\n",
    ));
    assert!(e.contains("a listener's timeouts may only set"), "{e}");
}

#[test]
fn admin_tokens() {
    let with_admin = |yaml: &str| format!("admin: {yaml}\n{GOOD}");
    let c = parse("t.yaml", &with_admin("{ listen: 127.0.0.1:9000 }")).unwrap();
    assert_eq!(c.admin.unwrap().token, None);
    let c = parse(
        "t.yaml",
        &with_admin("{ listen: 0.0.0.0:9000, token: 0123456789abcdef }"),
    )
    .unwrap();
    assert_eq!(c.admin.unwrap().token.as_deref(), Some("0123456789abcdef"));
    let e = only_error(&with_admin("{ listen: 0.0.0.0:9000 }"));
    assert!(
        e.contains("admin.listen is not a loopback address: set admin.token"),
        "{e}"
    );
    let e = only_error(&with_admin("{ listen: 127.0.0.1:9000, token: short }"));
    assert!(e.contains("admin.token must be at least 16 characters"), "{e}");
}

#[test]
fn route_by_sni_on_tcp_listeners() {
    let routed = GOOD.replace(
        "    backend: app\n",
        "    backend: app\n    route_by_sni:\n      - { sni: API.test, backend: app }\n      - { sni: \"*.b.test\", backend: app }\n    timeouts: { tls_handshake: 3s }\n",
    );
    let c = parse("t.yaml", &routed).unwrap();
    let l = &c.listeners[0];
    assert!(l.peeks_sni());
    assert_eq!(l.peek_timeout, Duration::from_secs(3));
    assert_eq!(l.sni_routes[0].sni, HostMatch::Exact("api.test".into()));
    assert_eq!(l.backend_for_sni(Some("x.b.test")), 0);
    let e = only_error(&routed.replace(
        "backend: app }\n      - { sni: \"*",
        "backend: nope }\n      - { sni: \"*",
    ));
    assert!(e.starts_with("t.yaml:6:35: ") && e.contains("`nope`"), "{e}");
    let e = only_error(&routed.replace("sni: API.test", "sni: \"a b\""));
    assert!(
        e.starts_with("t.yaml:6:16: ") && e.contains("is not a host name"),
        "{e}"
    );
    let e = only_error(&routed.replace(
        "    backend: app\n    route",
        "    mode: http\n    backend: app\n    route",
    ));
    assert!(e.contains("route_by_sni: is for tcp listeners"), "{e}");
    // tls_handshake needs tls: or route_by_sni:.
    let e = only_error(&GOOD.replace(
        "    backend: app\n",
        "    backend: app\n    timeouts: { tls_handshake: 3s }\n",
    ));
    assert!(e.contains("no `tls:` and no `route_by_sni:`"), "{e}");
}

#[test]
fn accept_proxy_is_a_switch_or_trusted_networks() {
    let with = |value: &str| {
        GOOD.replace(
            "    backend: app\n",
            &format!("    backend: app\n    accept_proxy: {value}\n"),
        )
    };
    let c = parse("t.yaml", GOOD).unwrap();
    assert_eq!(c.listeners[0].accept_proxy, None);
    let c = parse("t.yaml", &with("true")).unwrap();
    assert_eq!(c.listeners[0].accept_proxy, Some(AcceptProxy::Anyone));
    assert_eq!(
        parse("t.yaml", &with("false")).unwrap().listeners[0].accept_proxy,
        None
    );
    let c = parse("t.yaml", &with("[10.1.2.3/8, 192.0.2.9, 'fd00::/8']")).unwrap();
    let trusted = c.listeners[0].accept_proxy.clone().unwrap();
    for (ip, trusts) in [
        ("10.200.0.1", true),
        ("::ffff:10.0.0.1", true),
        ("192.0.2.9", true),
        ("192.0.2.10", false),
        ("fd12::1", true),
        ("127.0.0.1", false),
    ] {
        assert_eq!(trusted.trusts(ip.parse().unwrap()), trusts, "{ip}");
    }
    assert_eq!(
        only_error(&with("[10.0.0.0/8, 10.0.0.0/33]")),
        "t.yaml:5:32: accept_proxy: `10.0.0.0/33` is not a network; expected an address or a CIDR such as 10.0.0.0/8 or fd00::/8"
    );
    assert!(only_error(&with("[]")).starts_with("t.yaml:5:19: accept_proxy: an empty list trusts no one"));
    assert!(only_error(&with("yes")).contains("expected true, false, or a list of networks"));
}

#[test]
fn send_proxy_is_the_backends_unless_a_server_overrides_it() {
    let src = "listeners:\n  - name: web\n    bind: 127.0.0.1:8080\n    backend: app\nbackends:\n  - name: app\n    send_proxy: v2\n    servers:\n      - { name: s1, address: 127.0.0.1:9001 }\n      - { name: s2, address: 127.0.0.1:9002, send_proxy: v1 }\n      - { name: s3, address: 127.0.0.1:9003, send_proxy: off }\n";
    let c = parse("t.yaml", src).unwrap();
    let versions: Vec<_> = c.backends[0].servers.iter().map(|s| s.send_proxy).collect();
    use crate::proxy_header::Version;
    assert_eq!(versions, [Some(Version::V2), Some(Version::V1), None]);
    assert_eq!(
        parse("t.yaml", GOOD).unwrap().backends[0].servers[0].send_proxy,
        None
    );
    assert_eq!(
        only_error(&src.replace("send_proxy: v1", "send_proxy: v3")),
        "t.yaml:10:58: send_proxy: `v3` is not a PROXY protocol version; expected v1, v2 or off"
    );
    let off = parse("t.yaml", &src.replace("send_proxy: off", "send_proxy: false")).unwrap();
    assert_eq!(off.backends[0].servers[2].send_proxy, None);
    assert!(
        only_error(&src.replace("send_proxy: v1", "send_proxy: true")).contains("does not say which version")
    );
}

#[test]
fn names_are_haproxys_characters_only() {
    // Everything HAProxy allows passes.
    let ok = GOOD
        .replace("name: web", "name: Web-1.prod:8080_x")
        .replace("name: s1", "name: s.1:a-b_C");
    assert!(parse("t.yaml", &ok).is_ok());
    // Each kind of name is checked, at its value.
    let e = only_error(&GOOD.replace("name: web", "name: 'web\"prod'"));
    assert_eq!(
        e,
        "t.yaml:2:11: listener name `web\"prod`: `\"` is not allowed; names may use only letters, digits, `-`, `_`, `.` and `:`"
    );
    let e = only_error(
        &GOOD
            .replace("name: app\n", "name: \"a\\x1bpp\"\n")
            .replace("backend: app", "backend: \"a\\x1bpp\""),
    );
    assert!(
        e.starts_with("t.yaml:6:11: backend name `a\\u{1b}pp`: `\\u{1b}` is not allowed"),
        "{e}"
    );
    let e = only_error(&GOOD.replace("name: s1", "name: \"s 1\""));
    assert!(
        e.starts_with("t.yaml:8:17: server name `s 1`: ` ` is not allowed"),
        "{e}"
    );
    let e = only_error(&GOOD.replace("name: s1", "name: s/1"));
    assert!(e.contains("server name `s/1`: `/` is not allowed"), "{e}");
    let e = only_error(&GOOD.replace("name: s1", "name: ''"));
    assert!(
        e.starts_with("t.yaml:8:17: a server's name must not be empty"),
        "{e}"
    );
}

// Hostile input: each case is refused after reading or parsing a bounded prefix, with its
// position where it has one. (Before the bounds, /dev/zero took 4 GB, the aliases 3 GB and the
// nesting 40 s: a regression shows as a test that does not end.)

/// The one error of loading `path`, as printed.
fn only_load_error(path: &Path) -> String {
    let e = load(path).unwrap_err().0;
    assert_eq!(e.len(), 1, "{e:?}");
    e[0].to_string()
}

#[test]
fn a_device_is_refused_before_it_is_read() {
    assert_eq!(
        only_load_error(Path::new("/dev/zero")),
        "/dev/zero: a character device, not a configuration file"
    );
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        only_load_error(dir.path()),
        format!("{}: a directory, not a configuration file", dir.path().display())
    );
}

#[test]
fn a_file_over_the_size_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    let limit = input::MAX_FILE_BYTES as usize;
    std::fs::write(&path, vec![b'#'; limit + 1]).unwrap();
    assert_eq!(
        only_load_error(&path),
        format!(
            "{}: larger than 16 MiB, the most a configuration file may hold",
            path.display()
        )
    );
    // Exactly the limit is read to its last byte, which is what is wrong with it.
    let mut at_limit = vec![b' '; limit - 1];
    at_limit.push(0xff);
    std::fs::write(&path, at_limit).unwrap();
    assert_eq!(
        only_load_error(&path),
        format!("{}:1:{limit}: not UTF-8 text (byte 0xff)", path.display())
    );
}

#[test]
fn a_byte_order_mark_is_not_part_of_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bom.yaml");
    std::fs::write(&path, format!("\u{feff}{GOOD}")).unwrap();
    assert_eq!(load(&path).unwrap().backends[0].servers[0].weight, 3);
    std::fs::write(
        &path,
        format!("\u{feff}{}", GOOD.replace("weight: 3", "weight: 300")),
    )
    .unwrap();
    // Columns count from the first character after the mark.
    assert_eq!(
        only_load_error(&path),
        format!("{}:8:54: weight 300 is above the maximum 256", path.display())
    );
}

#[test]
fn an_endless_pipe_is_read_up_to_the_size_limit() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fifo");
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // Writes until the reader closes its end (EPIPE: Rust ignores SIGPIPE).
    let writer = std::thread::spawn({
        let path = path.clone();
        move || {
            let mut w = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let chunk = vec![b'#'; 1 << 16];
            while w.write_all(&chunk).is_ok() {}
        }
    });
    assert_eq!(
        only_load_error(&path),
        format!(
            "{}: larger than 16 MiB, the most a configuration file may hold",
            path.display()
        )
    );
    writer.join().unwrap();
}

#[test]
fn aliases_may_not_repeat_more_than_the_limit() {
    let big = "x".repeat(1 << 20);
    let aliases = vec!["*a"; 3000].join(", ");
    let src = format!(
        "listeners:\n  - name: &a \"{big}\"\n    bind: 127.0.0.1:80\n    backend: app\n    tls:\n      certificates: []\n      alpn: [{aliases}]\n"
    );
    // Each alias repeats 1 MiB and a byte; the 16th crosses 16 MiB. `      alpn: [` is 13
    // characters and each `*a, ` 4.
    assert_eq!(
        only_error(&src),
        format!(
            "t.yaml:7:{}: aliases repeat more than 16 MiB; with this one the document would be too large to read",
            13 + 15 * 4 + 1
        )
    );
    // The classic: nine levels of ten aliases each, 10^9 scalars from a few hundred bytes.
    let mut laughs = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let p = format!("*a{}", i - 1);
        laughs += &format!("a{i}: &a{i} [{}]\n", [p.as_str(); 10].join(", "));
    }
    let e = only_error(&laughs);
    assert!(
        e.starts_with("t.yaml:") && e.contains("aliases repeat more than 16 MiB"),
        "{e}"
    );
}

#[test]
fn an_alias_inside_the_node_it_names_is_refused() {
    assert_eq!(
        only_error("a: &a [1, *a]\n"),
        "t.yaml:1:11: this alias is inside the node it names"
    );
}

#[test]
fn anchors_used_modestly_work_and_errors_point_into_them() {
    let src = "listeners:\n  - { name: web, bind: 127.0.0.1:8080, backend: one }\n  - { name: api, bind: 127.0.0.1:8081, backend: two }\nbackends:\n  - name: one\n    servers: &shared\n      - { name: s1, address: 127.0.0.1:9001 }\n      - { name: s2, address: 127.0.0.1:9002 }\n  - name: two\n    balance: leastconn\n    servers: *shared\n";
    let c = parse("t.yaml", src).unwrap();
    assert_eq!(c.backends[1].servers.len(), 2);
    assert_eq!(
        c.backends[1].servers[1].address,
        "127.0.0.1:9002".parse().unwrap()
    );
    // A mistake in the shared list is reported where it is written, once.
    assert_eq!(
        only_error(&src.replace("127.0.0.1:9002", "nowhere")),
        "t.yaml:8:30: address: `nowhere` is not an address; expected IP:PORT such as 127.0.0.1:8080 or [::1]:8080"
    );
}

#[test]
fn deep_nesting_is_refused_at_its_position() {
    const DEEP: usize = 100_000;
    let cases = [
        // yaml-rust2 gives up at its 256th flow level, before any event of them.
        (
            format!("listeners: {}{}\n", "[".repeat(DEEP), "]".repeat(DEEP)),
            "t.yaml:1:267",
        ),
        // The root mapping is level 1: the 64th `{a: ` opens the 65th.
        (
            format!("listeners: {}1{}\n", "{a: ".repeat(DEEP), "}".repeat(DEEP)),
            "t.yaml:1:264",
        ),
        (format!("listeners:\n{}1\n", "- ".repeat(DEEP)), "t.yaml:2:127"),
    ];
    for (src, at) in cases {
        assert_eq!(
            only_error(&src),
            format!("{at}: collections are nested more than 64 levels deep")
        );
    }
    // 64 levels are allowed (the error is then serde's, about the type).
    let e = only_error(&format!("listeners: {}{}\n", "[".repeat(63), "]".repeat(63)));
    assert!(e.contains("expected a listener"), "{e}");
    // An alias counts with the levels of the node it names.
    let e = only_error(&format!(
        "a: &deep {}{}\nb: [[[*deep]]]\n",
        "[".repeat(62),
        "]".repeat(62)
    ));
    assert_eq!(e, "t.yaml:2:7: collections are nested more than 64 levels deep");
}

#[test]
fn syntax_errors_are_positioned_and_plain() {
    let admin = |rest: &str| format!("admin:\n{rest}{GOOD}");
    let cases = [
        (
            admin("\tlisten: 127.0.0.1:9000\n"),
            "t.yaml:2:2: tabs disallowed within this context (block indentation)",
        ),
        (
            admin("  listen: \"127.0.0.1:9000\n"),
            "t.yaml:2:11: invalid indentation in quoted scalar",
        ),
        (
            "listeners: [\n".to_string(),
            "t.yaml:2:1: while parsing a node, did not find expected node content",
        ),
        (
            "a: &x 1\nb: *y\n".to_string(),
            "t.yaml:2:4: while parsing node, found unknown anchor",
        ),
        (
            format!("{GOOD}---\n{GOOD}"),
            "t.yaml:9:1: a second YAML document starts here; the configuration is one document",
        ),
    ];
    for (src, expected) in cases {
        assert_eq!(only_error(&src), expected);
    }
}

#[test]
fn every_duplicate_key_is_reported_where_it_is_repeated() {
    let src = format!(
        "admin:\n  listen: 127.0.0.1:9000\n  listen: 127.0.0.1:9001\ntune: {{ threads: 1, threads: 2 }}\n{GOOD}"
    );
    let e = parse("t.yaml", &src).unwrap_err().0;
    let shown: Vec<String> = e.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        shown,
        [
            "t.yaml:3:3: duplicate key `listen` (first at line 2, column 3)",
            "t.yaml:4:21: duplicate key `threads` (first at line 4, column 9)",
        ]
    );
}

#[test]
fn type_errors_name_no_rust_type() {
    // A scalar or a list where each kind of mapping, enum or number goes.
    let server = |s: &str| GOOD.replace("      - { name: s1, address: 127.0.0.1:9001, weight: 3 }\n", s);
    let listener = |l: &str| GOOD.replace("    backend: app\n", &format!("    backend: app\n{l}"));
    let cases = [
        String::new(),
        "- a\n- b\n".into(),
        "just words\n".into(),
        format!("admin: 127.0.0.1:9000\n{GOOD}"),
        format!("forwarding: [user]\n{GOOD}"),
        format!("forwarding: {{ mode: [user] }}\n{GOOD}"),
        format!("tune: 4\n{GOOD}"),
        format!("tune: {{ threads: many }}\n{GOOD}"),
        format!("tune: {{ threads: -1 }}\n{GOOD}"),
        format!("tune: {{ cpu_affinity: [1] }}\n{GOOD}"),
        format!("tune: {{ kernel_rcvbuf: lots }}\n{GOOD}"),
        format!("flow_control: on\n{GOOD}"),
        format!("flow_control: {{ max_in_flight: -1 }}\n{GOOD}"),
        format!("timeouts: 5s\n{GOOD}"),
        format!("limits: 1MiB\n{GOOD}"),
        "listeners: web\n".to_string(),
        "listeners: [web]\n".to_string(),
        listener("    keepalive: [1]\n"),
        listener("    keepalive: { idle: [1] }\n"),
        listener("    tls: yes\n"),
        listener("    tls: { certificates: [a] }\n"),
        listener("    route_by_sni: [a]\n"),
        listener("    routes: [a]\n"),
        listener("    forwarded: yes\n"),
        listener("    request_headers: [a]\n"),
        listener("    maxconn: 5000000000\n"),
        format!("{GOOD}  - web\n"),
        GOOD.replace("    servers:\n", "    health_check: yes\n    servers:\n"),
        GOOD.replace(
            "    servers:\n",
            "    health_check: { expect_status: 70000 }\n    servers:\n",
        ),
        GOOD.replace("    servers:\n", "    observe: 3\n    servers:\n"),
        GOOD.replace("    servers:\n", "    tls: { client_cert: x }\n    servers:\n"),
        server("      - s1\n"),
        server("      - { name: s1, address: 127.0.0.1:9001, tls: 1 }\n"),
    ];
    for src in cases {
        let e = parse("t.yaml", &src).expect_err(&src).0;
        let e = e[0].to_string();
        assert!(e.starts_with("t.yaml:"), "{e}");
        for rust in ["Raw", "struct", "enum", "u16", "u32", "u64", "0:0"] {
            assert!(!e.contains(rust), "`{rust}` in: {e}\n{src}");
        }
    }
}
