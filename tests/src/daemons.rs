//! Servers no code of ours wrote, run as they are deployed: HAProxy and nginx, each from a
//! configuration written into a temporary directory, in the foreground, killed when dropped.
//! `cargo xtask test` installs both from Debian.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running peer daemon.
pub struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    /// Where its first listener listens.
    pub addr: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Its directory (its configuration, logs and files it serves).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// HAProxy on `config`, where `{PORT}` stands for the port it listens on (picked free
    /// here) and `{DIR}` for its directory.
    pub fn haproxy(config: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, text) = fill(config, dir.path());
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, text).expect("write haproxy.cfg");
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&path);
        start(cmd, dir, addr, "haproxy")
    }

    /// nginx on the `http { ... }` block `http`, where `{PORT}` stands for the port it listens
    /// on (picked free here) and `{DIR}` for its directory; one process, its temporary files
    /// and logs in its directory.
    pub fn nginx(http: &str) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, http) = fill(http, dir.path());
        let d = dir.path().display();
        let text = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{http}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, text).expect("write nginx.conf");
        let mut cmd = Command::new("nginx");
        cmd.arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"));
        start(cmd, dir, addr, "nginx")
    }

    /// What it wrote to its log files and stderr so far.
    pub fn log(&self) -> String {
        let mut out = String::new();
        for name in ["error.log", "access.log", "stderr"] {
            if let Ok(text) = std::fs::read_to_string(self.dir().join(name)) {
                out += &format!("--- {name}\n{text}");
            }
        }
        out
    }
}

/// `text` with `{PORT}` (a free port on 127.0.0.1) and `{DIR}` filled in.
fn fill(text: &str, dir: &Path) -> (SocketAddr, String) {
    let addr = free_port();
    let text = text
        .replace("{PORT}", &addr.port().to_string())
        .replace("{DIR}", &dir.display().to_string());
    (addr, text)
}

/// A port on 127.0.0.1 nothing listens on now (the kernel's pick, let go at once).
pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local_addr")
}

/// Starts `cmd` and waits (at most 10 s) until `addr` accepts connections.
fn start(mut cmd: Command, dir: tempfile::TempDir, addr: SocketAddr, what: &str) -> Daemon {
    let stderr = std::fs::File::create(dir.path().join("stderr")).expect("stderr file");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let mut daemon = Daemon { child, dir, addr };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = daemon.child.try_wait() {
            panic!("{what} exited ({status}) before it listened:\n{}", daemon.log());
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return daemon;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on {addr} within 10 s:\n{}", daemon.log());
}
