//! Starting and stopping the real `lb` binary.
use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

/// Path of the `lb` binary built next to the test binaries (target/<profile>/lb).
pub fn lb_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory");
    let lb = dir.join("lb");
    assert!(
        lb.exists(),
        "{} is missing: build it first (`cargo build -p lb-user`, or run the suite with `cargo xtask test`)",
        lb.display()
    );
    lb
}

/// Builds an lb configuration with one TCP listener on 127.0.0.1:0 and one backend.
pub struct LbBuilder {
    servers: Vec<SocketAddr>,
    forwarding: String,
    timeouts: Vec<(String, String)>,
    backend_timeouts: Vec<(String, String)>,
    extra_args: Vec<String>,
    log_filter: Option<String>,
    env: Vec<(String, String)>,
    sections: Vec<(String, String, String)>,
    offload_after: Option<String>,
    balance: String,
    weights: Vec<u32>,
    backend_yaml: Vec<String>,
    server_options: String,
    admin_token: Option<String>,
    listener_yaml: Vec<String>,
    /// More backends after `pool`: (name, servers).
    backends: Vec<(String, Vec<SocketAddr>)>,
}

impl LbBuilder {
    pub fn new(servers: &[SocketAddr]) -> LbBuilder {
        LbBuilder {
            servers: servers.to_vec(),
            forwarding: "auto".into(),
            timeouts: Vec::new(),
            backend_timeouts: Vec::new(),
            extra_args: Vec::new(),
            log_filter: None,
            env: Vec::new(),
            sections: Vec::new(),
            offload_after: None,
            balance: "roundrobin".into(),
            weights: Vec::new(),
            backend_yaml: Vec::new(),
            server_options: String::new(),
            admin_token: None,
            listener_yaml: Vec::new(),
            backends: Vec::new(),
        }
    }

    /// Another backend, `name`, with `servers` (named s0, s1, ...), after `pool`.
    pub fn backend(mut self, name: &str, servers: &[SocketAddr]) -> Self {
        self.backends.push((name.to_string(), servers.to_vec()));
        self
    }
    /// YAML lines for the listener, indented as its keys (4 spaces), e.g. a `tls:` block.
    pub fn listener_yaml(mut self, yaml: &str) -> Self {
        self.listener_yaml.push(yaml.into());
        self
    }
    /// `admin.token`: every admin request must then carry it ([`Lb::metrics`] cannot).
    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.into());
        self
    }
    /// More keys for every server's flow mapping, e.g. `"maxconn: 1"`.
    pub fn server_options(mut self, keys: &str) -> Self {
        self.server_options = format!(", {keys}");
        self
    }
    /// YAML lines for the backend, indented as its keys (4 spaces), e.g.
    /// `"    health_check: { interval: 200ms }\n"`.
    pub fn backend_yaml(mut self, yaml: &str) -> Self {
        self.backend_yaml.push(yaml.into());
        self
    }
    /// The backend's `balance:` algorithm (default roundrobin).
    pub fn balance(mut self, algorithm: &str) -> Self {
        self.balance = algorithm.into();
        self
    }
    /// The servers' weights, in order (default: none set, so 1).
    pub fn weights(mut self, weights: &[u32]) -> Self {
        self.weights = weights.to_vec();
        self
    }
    /// An environment variable for lb (e.g. a fault-injection knob).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    /// RUST_LOG for lb (default `info`, or LB_TEST_LOG when set).
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = Some(filter.into());
        self
    }
    /// `forwarding:` in the file.
    pub fn forwarding(mut self, mode: &str) -> Self {
        self.forwarding = mode.into();
        self
    }
    /// A top-level timeout, e.g. `("client", "500ms")`.
    pub fn timeout(mut self, name: &str, value: &str) -> Self {
        self.timeouts.push((name.into(), value.into()));
        self
    }
    /// A backend timeout (`connect`, `server`).
    pub fn backend_timeout(mut self, name: &str, value: &str) -> Self {
        self.backend_timeouts.push((name.into(), value.into()));
        self
    }
    /// `forwarding.offload_after`, e.g. `0` (straight to the kernel) or `64KiB`.
    pub fn offload_after(mut self, bytes: &str) -> Self {
        self.offload_after = Some(bytes.into());
        self
    }
    /// A key of a top-level section, e.g. `("flow_control", "max_in_flight", "1MiB")`.
    pub fn set(mut self, section: &str, key: &str, value: &str) -> Self {
        self.sections.push((section.into(), key.into(), value.into()));
        self
    }
    /// Extra `lb run` arguments, e.g. `--forwarding user`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    pub fn config_text(&self) -> String {
        let mut y = match &self.offload_after {
            None => format!("forwarding: {}\n", self.forwarding),
            Some(b) => format!(
                "forwarding: {{ mode: {}, offload_after: {b} }}\n",
                self.forwarding
            ),
        };
        y += "admin:\n  listen: 127.0.0.1:0\n";
        if let Some(t) = &self.admin_token {
            y += &format!("  token: {t}\n");
        }
        let mut sections: Vec<&str> = Vec::new();
        for (section, _, _) in &self.sections {
            if !sections.contains(&section.as_str()) {
                sections.push(section);
            }
        }
        for section in sections {
            y += &format!("{section}:\n");
            for (_, k, v) in self.sections.iter().filter(|(s, _, _)| s == section) {
                y += &format!("  {k}: {v}\n");
            }
        }
        if !self.timeouts.is_empty() {
            y += "timeouts:\n";
            for (k, v) in &self.timeouts {
                y += &format!("  {k}: {v}\n");
            }
        }
        y += "listeners:\n  - name: test\n    bind: 127.0.0.1:0\n    mode: tcp\n    backend: pool\n";
        for line in &self.listener_yaml {
            y += line;
        }
        y += &format!("backends:\n  - name: pool\n    balance: {}\n", self.balance);
        for line in &self.backend_yaml {
            y += line;
        }
        if !self.backend_timeouts.is_empty() {
            y += "    timeouts:\n";
            for (k, v) in &self.backend_timeouts {
                y += &format!("      {k}: {v}\n");
            }
        }
        y += "    servers:\n";
        for (i, s) in self.servers.iter().enumerate() {
            match self.weights.get(i) {
                Some(w) => {
                    y += &format!(
                        "      - {{ name: s{i}, address: \"{s}\", weight: {w}{} }}\n",
                        self.server_options
                    )
                }
                None => {
                    y += &format!(
                        "      - {{ name: s{i}, address: \"{s}\"{} }}\n",
                        self.server_options
                    )
                }
            }
        }
        for (name, servers) in &self.backends {
            y += &format!("  - name: {name}\n    servers:\n");
            for (i, s) in servers.iter().enumerate() {
                y += &format!("      - {{ name: s{i}, address: \"{s}\" }}\n");
            }
        }
        y
    }

    /// Starts lb and waits (at most 20 s) until its listener and admin endpoint are up.
    pub fn spawn(self) -> Lb {
        self.try_spawn()
            .unwrap_or_else(|e| panic!("lb did not start: {e}"))
    }

    /// Starts lb; `Err` carries lb's output if it exited before it was ready.
    pub fn try_spawn(self) -> Result<Lb, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lb.yaml");
        std::fs::write(&path, self.config_text()).expect("write config");
        let mut cmd = Command::new(lb_binary());
        cmd.args(["run", "-c"]).arg(&path).args(&self.extra_args);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(filter) = &self.log_filter {
            cmd.env("RUST_LOG", filter);
        }
        spawn_command(cmd, dir)
    }
}

/// Runs `cmd` (an `lb run`) and waits until it reports its listener and admin addresses.
pub fn spawn_command(mut cmd: Command, dir: tempfile::TempDir) -> Result<Lb, String> {
    if cmd.get_envs().all(|(k, _)| k != "RUST_LOG") {
        cmd.env(
            "RUST_LOG",
            std::env::var("LB_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
    }
    cmd.env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn lb");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let log2 = log.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // Into the log first: whoever receives a line can then find it, and every line
            // before it, in `Lb::log`.
            log2.lock().unwrap().push_str(&format!("{line}\n"));
            let _ = tx.send(line);
        }
    });
    let (listener, admin) = match wait_until_listening(&rx) {
        Ok(addrs) => addrs,
        Err(why) => {
            let _ = child.kill();
            let _ = child.wait();
            // The pipe is closed now: the reader thread has collected all of lb's output.
            let _ = reader.join();
            return Err(format!("{why}:\n{}", log.lock().unwrap()));
        }
    };
    Ok(Lb {
        child,
        listener,
        admin,
        log,
        tls: None,
        _dir: dir,
    })
}

/// Reads lb's log lines until both the listener's and the admin endpoint's addresses were
/// logged (at most 20 s).
fn wait_until_listening(lines: &mpsc::Receiver<String>) -> Result<(SocketAddr, SocketAddr), &'static str> {
    let (mut listener, mut admin) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let (Some(l), Some(a)) = (listener, admin) {
            return Ok((l, a));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .map_err(|_| "lb exited or timed out before listening")?;
        if let Some(addr) = addr_after(&line, "listening on ") {
            if line.contains("admin endpoint") {
                admin = Some(addr);
            } else {
                listener = Some(addr);
            }
        } else if line.contains("lb ready") {
            return Err("lb ready without both addresses");
        }
    }
}

fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// A running lb. Dropping it kills the process.
pub struct Lb {
    child: Child,
    pub listener: SocketAddr,
    pub admin: SocketAddr,
    log: Arc<Mutex<String>>,
    /// Set when the listener terminates TLS: how to reach it.
    pub tls: Option<crate::tls::TlsClient>,
    _dir: tempfile::TempDir,
}

impl Lb {
    /// The directory of lb's configuration file (and of the test's certificates).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// How to reach the listener (plain, or TLS when it terminates TLS), for a task.
    pub fn dialer(&self) -> crate::tls::Dialer {
        crate::tls::Dialer {
            addr: self.listener,
            tls: self.tls.clone(),
        }
    }

    /// A client connection to the listener: TLS when it terminates TLS.
    pub async fn connect(&self) -> Box<dyn crate::tls::Io> {
        self.dialer().connect().await
    }

    /// Sends `request` on a new client connection and reads until lb closes it (at most
    /// 10 s); everything received.
    pub async fn exchange(&self, request: &[u8]) -> Vec<u8> {
        self.dialer().exchange(request).await
    }

    /// The URL of `path` on the listener, and the curl arguments that reach it (the CA and
    /// the name's address for a TLS listener).
    pub fn url(&self, path: &str) -> (String, Vec<String>) {
        match &self.tls {
            None => (format!("http://{}{path}", self.listener), Vec::new()),
            Some(t) => (
                format!("https://{}:{}{path}", t.name, self.listener.port()),
                vec![
                    "--cacert".into(),
                    t.ca.display().to_string(),
                    "--resolve".into(),
                    format!("{}:{}:{}", t.name, self.listener.port(), self.listener.ip()),
                ],
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most `limit`, polling every 20 ms) for the lb process to exit by itself.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything lb logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `GET /metrics`, parsed into `name{labels}` → value.
    pub fn metrics(&self) -> Metrics {
        let mut s = TcpStream::connect(self.admin).expect("connect admin");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Named by address: the endpoint refuses other names (DNS rebinding).
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        );
        s.write_all(request.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read metrics");
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let mut values = HashMap::new();
        for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            if let Some((k, v)) = line.rsplit_once(' ') {
                values.insert(k.to_string(), v.parse().unwrap_or(f64::NAN));
            }
        }
        Metrics {
            values,
            text: body.to_string(),
        }
    }

    /// Waits (at most 250 × 20 ms) until lb's log contains `needle`: a line lb writes after an
    /// event reaches the test through a pipe and a reader thread, after the event itself.
    pub async fn wait_for_log(&self, needle: &str) {
        for _ in 0..250 {
            if self.log().contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("lb's log never contained `{needle}`:\n{}", self.log());
    }

    /// Polls the metrics until `cond` holds (at most 250 × 20 ms) and returns that scrape.
    pub async fn wait_for(&self, what: &str, cond: impl Fn(&Metrics) -> bool) -> Metrics {
        for _ in 0..250 {
            let m = self.metrics();
            if cond(&m) {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}:\n{}", self.metrics().text);
    }

    /// Sends SIGTERM and waits (at most `bound`) for lb to exit.
    pub fn terminate(&mut self, bound: Duration) -> Option<ExitStatus> {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Number of open file descriptors of the lb process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        // A failing test shows what lb said (the test's output is shown only when it fails):
        // why it cut a flow, for one, is only in its log.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(100)..];
            eprintln!(
                "lb's log at the failure (last {} lines):\n{}",
                tail.len(),
                tail.join("\n")
            );
            // The whole log too, when asked for (a flow cut early scrolls out of the tail).
            if let Some(dir) = std::env::var_os("LB_TEST_LOG_DIR") {
                let path = std::path::Path::new(&dir).join(format!("lb-{}.log", self.child.id()));
                match std::fs::write(&path, &log) {
                    Ok(()) => eprintln!("lb's whole log: {}", path.display()),
                    Err(e) => eprintln!("writing lb's log to {}: {e}", path.display()),
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scrape of lb's metrics.
pub struct Metrics {
    values: HashMap<String, f64>,
    pub text: String,
}

impl Metrics {
    /// The value of `series`, if lb exports it yet (a labelled series appears with its first
    /// event).
    pub fn value(&self, series: &str) -> Option<f64> {
        self.values.get(series).copied()
    }

    /// The value of `series` (e.g. `lb_forwarded_bytes_total{path="kernel"}`); a series lb
    /// does not export fails the test, so a renamed metric cannot pass as a zero.
    pub fn get(&self, series: &str) -> f64 {
        match self.values.get(series) {
            Some(v) => *v,
            None => panic!("lb exports no series `{series}`:\n{}", self.text),
        }
    }
    /// A labelled series of a family: 0 while it has not counted yet (a family exports a
    /// series only from its first count on).
    pub fn counted(&self, series: &str) -> f64 {
        self.values.get(series).copied().unwrap_or(0.0)
    }
    /// Every series of one metric, whatever its labels, added up.
    pub fn sum(&self, name: &str) -> f64 {
        self.values
            .iter()
            .filter(|(series, _)| {
                *series == name || series.strip_prefix(name).is_some_and(|l| l.starts_with('{'))
            })
            .map(|(_, v)| v)
            .sum()
    }
    pub fn kernel_bytes(&self) -> f64 {
        self.get("lb_forwarded_bytes_total{path=\"kernel\"}")
    }
    pub fn user_bytes(&self) -> f64 {
        self.get("lb_forwarded_bytes_total{path=\"user\"}")
    }
}

/// The lb processes upgrades started (not the test's children): killed when dropped.
pub struct Successors(pub Vec<u32>);

impl Drop for Successors {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: a plain signal to a pid this test started (through lb).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Whether process `pid` runs (a zombie does not).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}
