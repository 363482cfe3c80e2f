//! `lb check`: every configuration (`.yaml`) in conf/ is valid, and each kind of bad input is reported as
//! FILE:LINE:COLUMN: message with exit status 1.
use lb_tests::lb::lb_binary;
use std::{path::Path, process::Command};

fn check(path: &Path) -> (i32, String, String) {
    let out = Command::new(lb_binary())
        .args(["check", "-c"])
        .arg(path)
        .output()
        .expect("run lb check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `text` to a file and checks it; returns the exit code and the error lines.
fn check_text(text: &str) -> (i32, Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, text).unwrap();
    let (code, _, stderr) = check(&path);
    let file = path.display().to_string();
    let lines = stderr.lines().map(|l| l.to_string()).collect();
    (code, lines, file)
}

const GOOD: &str = "\
listeners:
  - name: web
    bind: 127.0.0.1:8080
    backend: app
backends:
  - name: app
    servers:
      - { name: s1, address: 127.0.0.1:9001 }
";

#[test]
fn every_file_in_conf_is_valid() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(&conf).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let (code, stdout, stderr) = check(&path);
            assert_eq!(code, 0, "{}: {stderr}", path.display());
            assert!(stdout.contains("OK"), "{stdout}");
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected the demo and the example configuration in conf/"
    );
}

#[test]
fn malformed_yaml_is_located() {
    let (code, lines, file) = check_text("listeners:\n  - name: web\n    bind: \"127.0.0.1:8080\n");
    assert_eq!(code, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let rest = lines[0]
        .strip_prefix(&format!("{file}:"))
        .unwrap_or_else(|| panic!("{lines:?}"));
    let mut parts = rest.splitn(3, ':');
    let line: usize = parts.next().unwrap().parse().expect("line number");
    let column: usize = parts.next().unwrap().parse().expect("column number");
    assert!(line >= 3 && column >= 1, "{lines:?}");
    assert!(parts.next().unwrap().contains("quoted scalar"), "{lines:?}");
}

#[test]
fn unknown_key_is_an_error_at_its_position() {
    let (code, lines, file) =
        check_text(&GOOD.replace("    backend: app\n", "    backend: app\n    nodelya: true\n"));
    assert_eq!(code, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with(&format!("{file}:5:5: ")), "{lines:?}");
    assert!(lines[0].contains("unknown field `nodelya`"), "{lines:?}");
}

#[test]
fn bad_address_is_an_error_at_the_value() {
    let (code, lines, file) =
        check_text(&GOOD.replace("address: 127.0.0.1:9001", "address: 127.0.0.1:99999"));
    assert_eq!(code, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!(
            "{file}:8:30: address: `127.0.0.1:99999` is not an address"
        )),
        "{lines:?}"
    );
}

#[test]
fn listener_naming_a_missing_backend_is_an_error() {
    let (code, lines, file) = check_text(&GOOD.replace("backend: app", "backend: apps"));
    assert_eq!(code, 1);
    assert!(
        lines[0].starts_with(&format!("{file}:4:14: listener `web` names backend `apps`")),
        "{lines:?}"
    );
}

#[test]
fn every_semantic_error_is_reported_at_once() {
    let text = GOOD
        .replace("bind: 127.0.0.1:8080", "bind: localhost")
        .replace("backend: app", "backend: apps")
        .replace("address: 127.0.0.1:9001", "address: nowhere");
    let (code, lines, file) = check_text(&text);
    assert_eq!(code, 1);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert!(l.starts_with(&format!("{file}:")), "{l}");
    }
}

#[test]
fn names_outside_haproxys_characters_are_refused_at_the_name() {
    // A quote would break the /metrics scrape; a control byte (an escape sequence here) would
    // reach `lb stats` and the logs.
    let text = GOOD
        .replace("name: web", "name: 'web\"prod'")
        .replace("name: s1", "name: \"s1\\e[2J\"");
    let (code, lines, file) = check_text(&text);
    assert_eq!(code, 1);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let allowed = "names may use only letters, digits, `-`, `_`, `.` and `:`";
    // (Backends are checked before the listeners that name them.)
    assert_eq!(
        lines[0],
        format!("{file}:8:17: server name `s1\\u{{1b}}[2J`: `\\u{{1b}}` is not allowed; {allowed}")
    );
    assert_eq!(
        lines[1],
        format!("{file}:2:11: listener name `web\"prod`: `\"` is not allowed; {allowed}")
    );
    // The raw byte is not printed: the terminal shows the error, not what the byte does.
    assert!(!lines.concat().contains('\x1b'), "{lines:?}");
    // What HAProxy allows passes.
    let (code, lines, _) = check_text(&GOOD.replace("name: web", "name: web-1.prod:443_a"));
    assert_eq!(code, 0, "{lines:?}");
}

#[test]
fn missing_file_is_reported() {
    let (code, _, stderr) = check(Path::new("/nonexistent/lb.yaml"));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("/nonexistent/lb.yaml") && stderr.contains("cannot read"),
        "{stderr}"
    );
}

/// Input that cost gigabytes or minutes before lb bounded it: each is refused at once, with
/// its position where it has one. (A regression shows as a test that does not end.)
#[test]
fn hostile_files_are_refused() {
    let (code, _, stderr) = check(Path::new("/dev/zero"));
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim_end(),
        "/dev/zero: a character device, not a configuration file"
    );

    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    std::fs::write(&big, vec![b'#'; (16 << 20) + 1]).unwrap();
    let (code, _, stderr) = check(&big);
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim_end(),
        format!(
            "{}: larger than 16 MiB, the most a configuration file may hold",
            big.display()
        )
    );

    // 3,000 aliases of a 1 MiB string: 3 GB once expanded.
    let (code, lines, file) = check_text(&format!(
        "listeners:\n  - name: &a \"{}\"\n    bind: 127.0.0.1:80\n    backend: app\n    tls: {{ certificates: [], alpn: [{}] }}\n",
        "x".repeat(1 << 20),
        vec!["*a"; 3000].join(", ")
    ));
    assert_eq!(code, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!("{file}:5:"))
            && lines[0].ends_with(
                ": aliases repeat more than 16 MiB; with this one the document would be too large to read"
            ),
        "{lines:?}"
    );

    let (code, lines, file) = check_text(&format!(
        "listeners: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    ));
    assert_eq!(code, 1);
    assert_eq!(
        lines,
        [format!(
            "{file}:1:267: collections are nested more than 64 levels deep"
        )]
    );
}

#[test]
fn version_and_help() {
    let out = Command::new(lb_binary()).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("lb "), "{out:?}");
    let out = Command::new(lb_binary()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("run") && help.contains("check"), "{help}");
}

#[test]
fn bad_certificates_are_named_with_their_file_and_reason() {
    use lb_tests::tls::Pki;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "check");
    let good = pki.issue("good", &["good.test"]);
    let other = pki.issue("other", &["other.test"]);
    let expired = pki.issue_with("expired", &["old.test"], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    // A CN and no subjectAltName: clients would match no name.
    let nameless = pki.issue_with("nameless", &["nameless.test"], |p| p.subject_alt_names.clear());
    let missing = dir.path().join("missing.pem");
    // A directory cannot be read as a file, even by root.
    let unreadable = dir.path().join("a-directory.key");
    std::fs::create_dir(&unreadable).unwrap();
    let listeners = [
        (&missing, &good.key),
        (&good.cert, &unreadable),
        (&expired.cert, &expired.key),
        (&good.cert, &other.key),
        (&nameless.cert, &nameless.key),
        (&good.cert, &good.key),
    ];
    let mut text = String::from("listeners:\n");
    for (i, (cert, key)) in listeners.iter().enumerate() {
        text += &format!(
            "  - name: l{i}\n    bind: 127.0.0.1:0\n    backend: app\n    tls:\n      certificates:\n        - cert: \"{}\"\n          key: \"{}\"\n",
            cert.display(),
            key.display()
        );
    }
    text += "backends:\n  - name: app\n    servers:\n      - { name: s1, address: 127.0.0.1:9001 }\n";
    let path = dir.path().join("tls.yaml");
    std::fs::write(&path, text).unwrap();
    let (code, _, stderr) = check(&path);
    assert_eq!(code, 1, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 5, "{stderr}");
    // Listener i's `cert:` value is on line 7 + 7i, column 17; its `key:` value on the next
    // line, column 16: each error points at the file at fault.
    let cert_at = |i: usize| format!("{}:{}:17: ", path.display(), 7 + 7 * i);
    let key_at = |i: usize| format!("{}:{}:16: ", path.display(), 8 + 7 * i);
    let expected = [
        (
            cert_at(0),
            format!("{}: cannot read: No such file or directory", missing.display()),
        ),
        (
            key_at(1),
            format!("{}: cannot read: Is a directory", unreadable.display()),
        ),
        (
            cert_at(2),
            format!("{}: the certificate expired on", expired.cert.display()),
        ),
        (
            key_at(3),
            format!(
                "{}: the private key does not match the certificate in {}",
                other.key.display(),
                good.cert.display()
            ),
        ),
        (
            cert_at(4),
            format!(
                "{}: the certificate's subjectAltName has no DNS name",
                nameless.cert.display()
            ),
        ),
    ];
    for (l, (at, what)) in lines.iter().zip(expected) {
        assert!(l.starts_with(&at), "expected at {at}: {l}");
        assert!(l.contains(&format!("tls: {what}")), "{l}");
    }
}
