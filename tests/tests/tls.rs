//! TLS end to end: certificates chosen by SNI (curl, openssl s_client, Python), TLS to servers
//! with a private CA, certificate reloads, a TLS-terminating TCP listener, a tunnel over TLS,
//! routing by SNI without termination, mutual TLS to servers, and bad input on a TLS port.
//! Every certificate is made by the test (rcgen).
use lb_tests::{
    http::{read_response, run_tool, status_of, HttpLbBuilder, Reflector},
    lb::LbBuilder,
    servers,
    tls::{
        connect, https_server, https_server_requiring_client_cert, listener_tls_yaml, peer_common_name, Pki,
    },
};
use rand::{rngs::SmallRng, RngCore, SeedableRng};
use std::time::{Duration, Instant};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[tokio::test]
async fn each_name_gets_its_certificate_and_its_route() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "names");
    let a = pki.issue("a", &["a.test"]);
    let b = pki.issue("b", &["b.test", "*.b.test"]);
    let (app_a, app_b) = (Reflector::start("A").await, Reflector::start("B").await);
    let lb = HttpLbBuilder::new(&[app_a.addr])
        .backend("bees", &[app_b.addr])
        .listener_yaml(&listener_tls_yaml(&[&a, &b], &[]))
        .listener_yaml("    routes:\n      - { sni: '*.b.test', backend: bees }\n      - { sni: b.test, backend: bees }\n")
        .spawn();
    let port = lb.listener.port();
    let ca = pki.ca_pem.display().to_string();
    for (name, subject, served_by) in [
        ("a.test", "CN=a.test", "A GET /"),
        ("b.test", "CN=b.test", "B GET /"),
        ("www.b.test", "CN=b.test", "B GET /"),
    ] {
        let resolve = format!("{name}:{port}:127.0.0.1");
        let url = format!("https://{name}:{port}/");
        let out = run_tool(
            "curl",
            &[
                "-sS",
                "-v",
                "--cacert",
                &ca,
                "--resolve",
                &resolve,
                &url,
                "--stderr",
                "-",
            ],
        )
        .await;
        assert!(out.contains(&format!("subject: {subject}")), "{name}: {out}");
        assert!(out.contains("ALPN: server accepted http/1.1"), "{name}: {out}");
        assert!(out.contains(served_by), "{name} went to the wrong backend: {out}");
    }
    // TLS 1.2 too, with each kind of cipher (AES-GCM's explicit nonces and ChaCha20's, which
    // the kernel's TLS takes over where it has it).
    for cipher in [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ] {
        let resolve = format!("a.test:{port}:127.0.0.1");
        let url = format!("https://a.test:{port}/tls12");
        let out = run_tool(
            "curl",
            &[
                "-sS",
                "-v",
                "--cacert",
                &ca,
                "--resolve",
                &resolve,
                "--tls-max",
                "1.2",
                "--ciphers",
                cipher,
                &url,
                "--stderr",
                "-",
            ],
        )
        .await;
        assert!(out.contains("TLSv1.2") && out.contains(cipher), "{cipher}: {out}");
        assert!(out.contains("A GET /tls12"), "{cipher}: {out}");
    }
    // openssl s_client: ALPN negotiated, the certificate verified against the test's CA.
    let connect_to = format!("127.0.0.1:{port}");
    let out = run_tool(
        "openssl",
        &[
            "s_client",
            "-connect",
            &connect_to,
            "-servername",
            "a.test",
            "-alpn",
            "http/1.1",
            "-CAfile",
            &ca,
            "-verify_return_error",
        ],
    )
    .await;
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    // Python's ssl module, asking for b.test: b's certificate, verified, and its route.
    let script = format!(
        r#"
import socket, ssl
ctx = ssl.create_default_context(cafile="{ca}")
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port}), timeout=10), server_hostname="b.test")
s.sendall(b"GET /py HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
cn = dict(x[0] for x in s.getpeercert()["subject"])["commonName"]
head, body = data.decode().split("\r\n\r\n", 1)
print(head.split()[1], s.selected_alpn_protocol(), cn, body.splitlines()[0])
"#
    );
    let out = run_tool("python3", &["-c", &script]).await;
    assert_eq!(out.trim(), "200 http/1.1 b.test B GET /py");
    // No name at all (SNI is optional): the default, the first certificate.
    let client = connect(lb.listener, "127.0.0.1", pki.client()).await;
    // The default certificate does not name 127.0.0.1: the client refuses it, which shows
    // which one it got.
    let Err(err) = client else {
        panic!("a certificate for a.test only passed for 127.0.0.1");
    };
    // The client names the certificate it got: a.test's, the first.
    let err = err.to_string();
    assert!(
        err.contains("not valid for name") && err.contains("\"a.test\"") && !err.contains("b.test"),
        "{err}"
    );
    let m = lb
        .wait_for("the refused handshake counted", |m| {
            m.sum("lb_tls_handshake_failures_total") == 1.0
        })
        .await;
    // Three curl (TLS 1.3), three curl (TLS 1.2), openssl, Python.
    assert_eq!(
        m.get("lb_tls_handshakes_total{listener=\"web\"}"),
        8.0,
        "{}",
        m.text
    );
    // Each handed to the kernel's TLS, where the kernel has it; none refused. openssl s_client,
    // with no input, closes right after its handshake: when its close arrives before the
    // hand-off (seen in a slow VM), rustls keeps that session, as it should.
    let kernel = m.get("lb_ktls_handoffs_total{listener=\"web\",result=\"kernel\"}");
    let kept = m.get("lb_ktls_handoffs_total{listener=\"web\",result=\"kept\"}");
    assert_eq!(
        m.get("lb_ktls_handoffs_total{listener=\"web\",result=\"failed\"}"),
        0.0,
        "{}",
        m.text
    );
    if lb_tests::tls::kernel_has_ktls() {
        assert!(kernel >= 7.0 && kernel + kept == 8.0, "{}", m.text);
    } else {
        assert_eq!(kernel, 0.0, "{}", m.text);
    }
}

#[tokio::test]
async fn tls_to_a_server_with_a_private_ca_and_502_with_the_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let servers_ca = Pki::new(dir.path(), "servers");
    let other_ca = Pki::new(dir.path(), "other");
    let cert = servers_ca.issue("backend", &["backend.test"]);
    let secure = https_server(&cert, "secure hello").await;
    let tls = |ca: &std::path::Path| format!("{{ sni: backend.test, ca: \"{}\" }}", ca.display());
    let lb = HttpLbBuilder::new(&[secure])
        .app_yaml(&format!("    tls: {}\n", tls(&servers_ca.ca_pem)))
        .backend("wrong", &[secure])
        .backend("unverified", &[secure])
        .listener_yaml("    routes:\n      - { path_prefix: /wrong, backend: wrong }\n      - { path_prefix: /unverified, backend: unverified }\n")
        .backend_yaml("wrong", &format!("    tls: {}\n", tls(&other_ca.ca_pem)))
        .backend_yaml("unverified", "    tls: { verify: false }\n")
        .spawn();
    let answer = lb
        .exchange(b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 200 ") && text.ends_with("secure hello"),
        "{text}"
    );
    let answer = lb
        .exchange(b"GET /wrong HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(
        status_of(&answer),
        Some(502),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    lb.wait_for_log("failed: invalid peer certificate: UnknownIssuer")
        .await;
    let log = lb.log();
    let line = log.lines().find(|l| l.contains("UnknownIssuer")).unwrap();
    assert!(
        line.contains("TLS to server s0") && line.contains("backend=wrong"),
        "{line}"
    );
    // verify: false takes any certificate (still encrypted).
    let answer = lb
        .exchange(b"GET /unverified HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(
        status_of(&answer),
        Some(200),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let m = lb.metrics();
    assert_eq!(
        m.get("lb_server_tls_failures_total{backend=\"wrong\",server=\"s0\"}"),
        1.0,
        "{}",
        m.text
    );
}

/// `client_cert:` to a server that requires one (mutual TLS): the server sees lb's
/// certificate; a backend without `client_cert` is refused by it (502).
#[tokio::test]
async fn a_client_certificate_is_presented_to_a_server_that_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let servers_ca = Pki::new(dir.path(), "servers");
    let clients_ca = Pki::new(dir.path(), "clients");
    let cert = servers_ca.issue("backend", &["backend.test"]);
    let lb_cert = clients_ca.issue("lb-client", &["lb-client.test"]);
    let server = https_server_requiring_client_cert(&cert, &clients_ca.ca_pem).await;
    let tls = format!("{{ sni: backend.test, ca: \"{}\"", servers_ca.ca_pem.display());
    let lb = HttpLbBuilder::new(&[server])
        .app_yaml(&format!(
            "    tls: {tls}, client_cert: {{ cert: \"{}\", key: \"{}\" }} }}\n",
            lb_cert.cert.display(),
            lb_cert.key.display()
        ))
        .backend("anonymous", &[server])
        .listener_yaml("    routes:\n      - { path_prefix: /anonymous, backend: anonymous }\n")
        .backend_yaml("anonymous", &format!("    tls: {tls} }}\n"))
        .spawn();
    let answer = lb
        .exchange(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 200 ") && text.ends_with("client lb-client.test"),
        "{text}"
    );
    let answer = lb
        .exchange(b"GET /anonymous HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(
        status_of(&answer),
        Some(502),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn a_reload_installs_a_new_certificate_and_keeps_open_sessions() {
    let app = Reflector::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "reload");
    let first = pki.issue_with("site", &["site.test"], |p| {
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "first");
    });
    let lb = HttpLbBuilder::new(&[app.addr])
        .listener_yaml(&listener_tls_yaml(&[&first], &[]))
        .spawn();
    let org = |s: &tokio_rustls::client::TlsStream<TcpStream>| {
        let der = &s.get_ref().1.peer_certificates().unwrap()[0];
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        let o = cert
            .subject()
            .iter_organization()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        o
    };
    let mut kept = connect(lb.listener, "site.test", pki.client()).await.unwrap();
    assert_eq!(org(&kept), "first");
    kept.write_all(b"GET /1 HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200 "));

    // The files are replaced, then SIGHUP.
    pki.issue_with("site", &["site.test"], |p| {
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "second");
    });
    // SAFETY: a plain signal to the child's pid.
    assert_eq!(unsafe { libc::kill(lb.pid() as i32, libc::SIGHUP) }, 0);
    lb.wait_for_log("SIGHUP: reloaded: listeners +0 -0 ~1").await;
    let fresh = connect(lb.listener, "site.test", pki.client()).await.unwrap();
    assert_eq!(org(&fresh), "second");
    // The open keep-alive session goes on, on its first certificate's session.
    kept.write_all(b"GET /2 HTTP/1.1\r\nHost: site.test\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut kept).await;
    assert!(
        answer.starts_with("HTTP/1.1 200 ") && answer.contains("app GET /2"),
        "{answer}"
    );

    // A key that does not match its certificate is refused by `lb reload`, which says which
    // file and why, where the file names it; the certificate in use stays.
    let stray = pki.issue("stray", &["stray.test"]);
    let site_key = dir.path().join("site.key");
    std::fs::copy(&stray.key, &site_key).unwrap();
    let out = std::process::Command::new(lb_tests::lb::lb_binary())
        .args(["reload", "--admin", &lb.admin.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad certificate was accepted");
    let config = lb.dir().join("lb.yaml");
    assert!(
        stderr.contains(&format!(
            "{}: the private key does not match the certificate",
            site_key.display()
        )) && stderr.starts_with(&format!("{}:", config.display()))
            && stderr.contains("reload refused, nothing changed"),
        "{stderr}"
    );
    let still = connect(lb.listener, "site.test", pki.client()).await.unwrap();
    assert_eq!(org(&still), "second");
    let m = lb.metrics();
    assert_eq!(m.get("lb_reloads_total{result=\"ok\"}"), 1.0, "{}", m.text);
    assert_eq!(m.get("lb_reloads_total{result=\"refused\"}"), 1.0, "{}", m.text);
    // And `lb stats` shows the certificate in use.
    let out = std::process::Command::new(lb_tests::lb::lb_binary())
        .args(["stats", "--admin", &lb.admin.to_string()])
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(
        stats.contains("TLS web: ") && stats.contains("O=second") && stats.contains("[site.test]"),
        "{stats}"
    );
    // With the process and how its last reload went.
    assert!(
        stats.contains(&format!("pid {}, started ", lb.pid()))
            && stats.contains("by lb reload: refused (reload refused, nothing changed"),
        "{stats}"
    );
    let said = if lb_tests::tls::kernel_has_ktls() {
        "flows with a TLS side forwarded by userspace, client sessions encrypted and decrypted by the kernel (kTLS: AES-128-GCM"
    } else {
        "flows with a TLS side forwarded by userspace: kTLS unavailable"
    };
    assert!(stats.contains(said), "{stats}");
}

#[tokio::test]
async fn a_tcp_listener_terminates_tls_and_forwards_every_byte() {
    let echo = servers::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "tcp");
    let cert = pki.issue("echo", &["echo.test"]);
    let lb = LbBuilder::new(&[echo])
        .listener_yaml(&listener_tls_yaml(&[&cert], &[]))
        .spawn();
    let mut rng = SmallRng::seed_from_u64(7);
    let mut payload = vec![0u8; 4 << 20];
    rng.fill_bytes(&mut payload);
    let s = connect(lb.listener, "echo.test", pki.client()).await.unwrap();
    assert_eq!(peer_common_name(&s), "echo.test");
    let (mut rx, mut tx) = tokio::io::split(s);
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        tx.write_all(&sent).await.unwrap();
        // close_notify and FIN: the echo server sees the end and closes its side.
        tx.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), rx.read_to_end(&mut back))
        .await
        .expect("the echo did not end")
        .unwrap();
    writer.await.unwrap();
    assert!(
        back == payload,
        "the echo differs ({} of {} bytes)",
        back.len(),
        payload.len()
    );
    let m = lb
        .wait_for("the flow's end", |m| {
            m.get("lb_active_connections{listener=\"test\"}") == 0.0
        })
        .await;
    // Copied by lb both ways (the sockmap path takes plain TCP only); decrypted and encrypted
    // by the kernel's TLS where the kernel has it, else by rustls.
    assert!(m.user_bytes() >= 2.0 * payload.len() as f64, "{}", m.text);
    assert_eq!(m.kernel_bytes(), 0.0, "{}", m.text);
    let in_kernel = m.get("lb_ktls_handoffs_total{listener=\"test\",result=\"kernel\"}");
    let expected = if lb_tests::tls::kernel_has_ktls() {
        1.0
    } else {
        0.0
    };
    assert_eq!(in_kernel, expected, "{}", m.text);
}

/// `route_by_sni:` without `tls:`: a tcp listener peeks at the ClientHello, picks the backend
/// by the name asked for, and forwards the TLS flow untouched (the client gets the server's
/// own certificate); a name no route has goes to the listener's backend; plain HTTP is closed
/// and counted.
#[tokio::test]
async fn a_tcp_listener_routes_tls_by_sni_without_terminating_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "sni");
    let a = https_server(&pki.issue("a", &["a.test"]), "server a").await;
    let b = https_server(&pki.issue("b", &["b.test", "x.b.test"]), "server b").await;
    let d = https_server(&pki.issue("d", &["default.test"]), "server d").await;
    let lb = LbBuilder::new(&[d])
        .backend("a", &[a])
        .backend("b", &[b])
        .listener_yaml("    route_by_sni:\n      - { sni: A.test, backend: a }\n      - { sni: \"*.b.test\", backend: b }\n")
        .spawn();
    for (name, cn, body) in [
        ("a.test", "a.test", "server a"),
        ("x.b.test", "b.test", "server b"),
        ("default.test", "default.test", "server d"),
    ] {
        let mut s = connect(lb.listener, name, pki.client()).await.unwrap();
        assert_eq!(peer_common_name(&s), cn, "{name}");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the server's answer within 10 s")
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.ends_with(body), "{name}: {text}");
    }
    let mut plain = TcpStream::connect(lb.listener).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = until_closed(&mut plain).await;
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    let m = lb.metrics();
    assert_eq!(
        m.get("lb_tls_handshake_failures_total{listener=\"test\",reason=\"not_tls\"}"),
        1.0,
        "{}",
        m.text
    );
}

#[tokio::test]
async fn a_websocket_over_tls_is_tunnelled() {
    use futures_util::{SinkExt, StreamExt};
    let chat = servers::websocket_echo().await;
    let app = Reflector::start("app").await;
    let lb = HttpLbBuilder::new(&[app.addr])
        .backend("chat", &[chat])
        .listener_yaml("    routes:\n      - { path_prefix: /chat, backend: chat }\n")
        .tls(true)
        .spawn();
    let tls = lb.tls.clone().unwrap();
    let stream = tls.connect(lb.listener).await.unwrap();
    let url = format!("wss://{}:{}/chat", tls.name, lb.listener.port());
    let (mut ws, response) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("the WebSocket upgrade through lb failed");
    assert_eq!(response.status(), 101);
    let mut rng = SmallRng::seed_from_u64(9);
    for size in [1usize, 70_000, 1 << 20] {
        let mut payload = vec![0u8; size];
        rng.fill_bytes(&mut payload);
        ws.send(tokio_tungstenite::tungstenite::Message::binary(payload.clone()))
            .await
            .unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            back.into_data() == payload,
            "a {size}-byte message came back altered"
        );
    }
    ws.close(None).await.unwrap();
    // The closing handshake ends before the socket closes: a socket closed with the server's
    // close frame unread sends a reset (then logged as "tunnel reset"; seen in a slow VM).
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the closing handshake did not end");
    drop(ws);
    lb.wait_for_log("tunnel closed").await;
}

/// Reads what lb sends until it closes (at most 10 s); with how long that took.
async fn until_closed(s: &mut TcpStream) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("lb did not close the connection");
    (got, started.elapsed())
}

#[tokio::test]
async fn bad_input_on_a_tls_port_is_closed_promptly_and_counted() {
    // A TCP-mode listener connects to a server as soon as a handshake is over: a bad one that
    // got through would show as a server connection.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = server.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(s);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "bad");
    let cert = pki.issue("known", &["known.test"]);
    let lb = LbBuilder::new(&[server_addr])
        .listener_yaml(&listener_tls_yaml(&[&cert], &["strict_sni: true"]))
        // Long enough for a whole handshake in a VM without KVM (software-emulated crypto took
        // over 1 s there), short enough for the stalled client below.
        .listener_yaml("    timeouts: { tls_handshake: 3s }\n")
        .spawn();
    // A TLS alert record: content type 21.
    const ALERT: u8 = 0x15;

    // Plain HTTP on the TLS port: an alert, and the connection closed (counted as not_tls
    // below, not as a timeout: closed at once).
    let mut s = TcpStream::connect(lb.listener).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: known.test\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = until_closed(&mut s).await;
    assert_eq!(got.first(), Some(&ALERT), "{got:?}");

    // A handshake record holding an empty ClientHello.
    let mut s = TcpStream::connect(lb.listener).await.unwrap();
    s.write_all(b"\x16\x03\x01\x00\x04\x01\x00\x00\x00")
        .await
        .unwrap();
    let (got, _) = until_closed(&mut s).await;
    assert_eq!(got.first(), Some(&ALERT), "{got:?}");

    // A name no certificate has, with strict_sni: refused with an alert.
    let err = connect(lb.listener, "unknown.test", pki.client())
        .await
        .expect_err("a handshake for an unknown name succeeded");
    assert!(err.to_string().contains("AccessDenied"), "{err}");

    // A client that does not trust lb's certificate says so (an alert of its own).
    let stranger = Pki::new(dir.path(), "stranger");
    assert!(connect(lb.listener, "known.test", stranger.client())
        .await
        .is_err());

    // A client that stalls within its ClientHello is closed at timeouts.tls_handshake.
    let mut s = TcpStream::connect(lb.listener).await.unwrap();
    s.write_all(b"\x16\x03\x01").await.unwrap();
    let (_, took) = until_closed(&mut s).await;
    assert!(took >= Duration::from_millis(2900), "{took:?}");

    let m = lb
        .wait_for("the failures counted", |m| {
            m.sum("lb_tls_handshake_failures_total") >= 5.0
        })
        .await;
    for reason in ["not_tls", "protocol", "unknown_sni", "client_alert", "timeout"] {
        assert_eq!(
            m.get(&format!(
                "lb_tls_handshake_failures_total{{listener=\"test\",reason=\"{reason}\"}}"
            )),
            1.0,
            "{reason}:\n{}",
            m.text
        );
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a bad handshake reached the server"
    );
    // The listener still serves: a good handshake does reach it.
    let _ok = connect(lb.listener, "known.test", pki.client()).await.unwrap();
    lb.wait_for("the good handshake's server connection", |m| {
        m.get("lb_tls_handshakes_total{listener=\"test\"}") == 1.0
    })
    .await;
    // What became of the good session: the kernel's TLS took it where the kernel has kTLS.
    let m = lb.metrics();
    if lb_tests::tls::kernel_has_ktls() {
        assert_eq!(m.get("lb_ktls_available"), 1.0, "{}", m.text);
        assert_eq!(lb.log().matches("kTLS available").count(), 1, "{}", lb.log());
        assert_eq!(
            m.get("lb_ktls_handoffs_total{listener=\"test\",result=\"kernel\"}"),
            1.0,
            "{}",
            m.text
        );
    } else {
        assert_eq!(m.get("lb_ktls_available"), 0.0, "{}", m.text);
        assert_eq!(lb.log().matches("kTLS unavailable").count(), 1, "{}", lb.log());
        assert_eq!(m.sum("lb_ktls_handoffs_total"), 0.0, "{}", m.text);
    }
}

/// A TLS server that sends `hello`, then ends its TCP stream without a close_notify
/// (`truncate`), or resets it once the client answered.
async fn cutting_server(files: &lb_tests::tls::CertFiles, truncate: bool) -> std::net::SocketAddr {
    let acceptor = lb_tests::tls::acceptor(files);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut s) = acceptor.accept(tcp).await else {
                continue;
            };
            s.write_all(b"hello").await.unwrap();
            s.flush().await.unwrap();
            let (tcp, _) = s.get_mut();
            if truncate {
                tcp.shutdown().await.unwrap();
                // Held open (its FIN sent) until lb closes.
                let mut rest = Vec::new();
                let _ = tcp.read_to_end(&mut rest).await;
            } else {
                // Once the client got `hello` (it then sends a byte): a reset.
                let _ = tcp.read(&mut [0u8; 64]).await;
                socket2::SockRef::from(&*tcp)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
        }
    });
    addr
}

#[tokio::test]
async fn a_cut_or_a_reset_is_passed_on_as_such_not_as_a_clean_end() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "cut");
    let front = pki.issue("front", &["front.test"]);
    let back = pki.issue("back", &["back.test"]);
    for truncate in [true, false] {
        let server = cutting_server(&back, truncate).await;
        let lb = LbBuilder::new(&[server])
            .listener_yaml(&listener_tls_yaml(&[&front], &[]))
            .backend_yaml(&format!(
                "    tls: {{ sni: back.test, ca: \"{}\" }}\n",
                pki.ca_pem.display()
            ))
            .spawn();
        let mut client = connect(lb.listener, "front.test", pki.client()).await.unwrap();
        let mut hello = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut hello))
            .await
            .expect("no hello through lb")
            .unwrap();
        assert_eq!(&hello, b"hello");
        if !truncate {
            client.write_all(b"go").await.unwrap();
        }
        let mut rest = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
            .await
            .expect("lb did not end the client's connection");
        assert!(rest.is_empty(), "{rest:?}");
        let kind = end.expect_err("a cut stream ended like a complete one").kind();
        let expected = if truncate {
            // A FIN without a close_notify, as the server sent it.
            std::io::ErrorKind::UnexpectedEof
        } else {
            std::io::ErrorKind::ConnectionReset
        };
        assert_eq!(kind, expected, "truncate: {truncate}");
    }
}
