//! Configuration: the YAML file → raw serde structs ([`raw`]) → a validated [`Config`].
//!
//! Every problem is reported as `FILE:LINE:COLUMN: message` (`FILE: message` for the whole
//! file: unreadable, too large). The file is read within bounds ([`input`]), then one pass over
//! its YAML events ([`scan`]) refuses deep nesting and runaway aliases and reports a syntax
//! error and every duplicate key; serde_yaml then deserialises it and stops at the first type
//! error; every semantic error after that is collected, so `lb check` shows them all at once
//! (at positions another pass over the events finds, once there is an error to place).
mod health;
mod http;
mod input;
mod locate;
mod proxy;
pub mod raw;
mod scan;
mod tls;

use crate::affinity::CpuAffinity;
pub use health::{CheckKind, HealthCheck};
pub use http::{Forwarded, HeaderRule, HostMatch, Http, Route};
use locate::{Locator, Step};
pub use proxy::AcceptProxy;
use raw::{RawBackend, RawConfig, RawForwarding, RawKeepalive, RawListener, RawSizeOrAuto, RawTimeouts};
use std::{collections::HashMap, fmt, net::SocketAddr, path::Path, time::Duration};
pub use tls::ListenerTls;

/// How established flows are forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Forwarding {
    /// Kernel forwarding when BPF loads, userspace forwarding (with one warning) otherwise.
    Auto,
    /// Kernel forwarding; lb refuses to start when BPF cannot be loaded.
    Kernel,
    /// Userspace forwarding; BPF is never loaded.
    User,
}

/// `tune.kernel_sndbuf`: the send buffer of a kernel flow's sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendBuffer {
    /// `auto`: a fixed 8 MiB where the running kernel is known to take it, else autotuning.
    Auto,
    /// A size: SO_SNDBUF; `None` (`0`) keeps autotuning.
    Set(Option<u32>),
}

impl SendBuffer {
    /// The SO_SNDBUF to set on a kernel whose release (`uname -r`) is `release`; `None` keeps
    /// autotuning. An unreadable release counts as an old one.
    pub fn on(self, release: &str) -> Option<u32> {
        match self {
            SendBuffer::Set(bytes) => bytes,
            SendBuffer::Auto => {
                let mut parts = release.split(|c: char| !c.is_ascii_digit());
                let mut next = || parts.next().and_then(|p| p.parse::<u32>().ok());
                let version = (next().unwrap_or(0), next().unwrap_or(0));
                (version >= FIXED_SNDBUF_SINCE).then_some(AUTO_KERNEL_SNDBUF)
            }
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub forwarding: Forwarding,
    /// `forwarding.offload_after`: bytes a flow moves in userspace (either direction) before it
    /// is handed to the kernel; 0 = at once.
    pub offload_after: u64,
    pub admin: Option<Admin>,
    pub shutdown_grace: Duration,
    /// SO_SNDBUF for both sockets of a kernel-forwarded flow.
    pub kernel_sndbuf: SendBuffer,
    /// SO_RCVBUF for both sockets of a kernel-forwarded flow; `None` keeps autotuning.
    pub kernel_rcvbuf: Option<u32>,
    /// `flow_control.max_in_flight`: the per-direction brake of kernel flows, in bytes.
    pub max_in_flight: u32,
    /// `tune.threads`: how many session workers run ([`crate::workers`]).
    pub threads: usize,
    /// `tune.cpu_affinity`: which CPU each session worker is bound to.
    pub cpu_affinity: crate::affinity::CpuAffinity,
    /// `tune.kernel_congestion`.
    pub kernel_congestion: KernelCongestion,
    /// `tune.upgrade_moves_kernel_flows`.
    pub upgrade_moves_kernel_flows: bool,
    /// `limits:`, bounds on HTTP messages.
    pub limits: crate::http::request::Limits,
    pub listeners: Vec<Listener>,
    pub backends: Vec<Backend>,
}

/// `admin:`, the admin endpoint.
#[derive(Debug, Clone)]
pub struct Admin {
    pub listen: SocketAddr,
    /// Required of every request when set; without it only loopback clients are served.
    pub token: Option<String>,
}

/// A validated listener.
#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    /// Index into [`Config::backends`].
    pub backend: usize,
    pub backlog: u32,
    pub nodelay: bool,
    pub keepalive: Option<Keepalive>,
    pub transparent: bool,
    pub maxconn: u32,
    pub client_timeout: Duration,
    /// `mode: http`: the HTTP side; `None` for `mode: tcp`.
    pub http: Option<Http>,
    /// `tls:`: clients connect with TLS, which lb terminates.
    pub tls: Option<ListenerTls>,
    /// `route_by_sni:` of a `tcp` listener (empty: every flow goes to `backend`).
    pub sni_routes: Vec<SniRoute>,
    /// How long lb waits for a whole ClientHello when it peeks at it (`route_by_sni` without
    /// `tls:`): `timeouts.tls_handshake`.
    pub peek_timeout: Duration,
    /// `accept_proxy:`: each connection starts with a PROXY header (from these sources).
    pub accept_proxy: Option<AcceptProxy>,
}

/// One entry of `route_by_sni:`.
#[derive(Debug, Clone)]
pub struct SniRoute {
    pub sni: HostMatch,
    /// Index into [`Config::backends`].
    pub backend: usize,
}

impl Listener {
    /// The backend of a TCP flow whose client asked for `sni`.
    pub fn backend_for_sni(&self, sni: Option<&str>) -> usize {
        self.sni_routes
            .iter()
            .find(|r| HostMatch::admits(Some(&r.sni), sni))
            .map_or(self.backend, |r| r.backend)
    }

    /// Whether lb reads the ClientHello of a TLS flow it does not terminate.
    pub fn peeks_sni(&self) -> bool {
        !self.sni_routes.is_empty() && self.tls.is_none()
    }
}

/// Keepalive settings; `None` fields keep the kernel's defaults.
#[derive(Debug, Clone, Default)]
pub struct Keepalive {
    pub idle: Option<Duration>,
    pub interval: Option<Duration>,
    pub count: Option<u32>,
}

/// A validated backend.
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub server_timeout: Duration,
    /// `timeouts.queue`: the longest wait for a server below its `maxconn`.
    pub queue_timeout: Duration,
    /// `retries`: connect attempts after a failed one, each on another server.
    pub retries: u32,
    /// `health_check:`; `None`: servers are taken to be up.
    pub health_check: Option<HealthCheck>,
    /// `observe.max_consecutive_errors`: live errors in a row that take a server down.
    pub max_consecutive_errors: Option<u32>,
    pub servers: Vec<Server>,
}

/// Balancing algorithms (`balance:`, [`crate::balance`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Smooth weighted round robin.
    RoundRobin,
    /// Fewest current sessions per unit of weight.
    LeastConn,
    /// Consistent hash of the client's address.
    Source,
    /// Consistent hash of the request path (HTTP listeners only).
    Uri,
    /// Power of two choices.
    Random,
}

impl Balance {
    /// Its name in the configuration.
    pub fn name(self) -> &'static str {
        Balance::NAMES
            .iter()
            .find(|(_, b)| *b == self)
            .map_or("?", |(n, _)| n)
    }

    const NAMES: [(&'static str, Balance); 5] = [
        ("roundrobin", Balance::RoundRobin),
        ("leastconn", Balance::LeastConn),
        ("source", Balance::Source),
        ("uri", Balance::Uri),
        ("random", Balance::Random),
    ];
}

/// A validated server.
#[derive(Debug, Clone)]
pub struct Server {
    pub name: String,
    pub address: SocketAddr,
    pub weight: u32,
    /// Most sessions at once; `None`: no limit.
    pub maxconn: Option<u32>,
    /// `tls:` (the backend's, with the server's over it): lb connects with TLS.
    pub tls: Option<crate::tls::connect::ServerTls>,
    /// `send_proxy` (the backend's, or the server's own): the PROXY header lb writes first.
    pub send_proxy: Option<crate::proxy_header::Version>,
}

const DEFAULT_CONNECT: Duration = Duration::from_secs(5);
const DEFAULT_IDLE: Duration = Duration::from_secs(60);
const DEFAULT_GRACE: Duration = Duration::from_secs(10);
const MAX_WEIGHT: u32 = 256;
/// HAProxy's default.
const DEFAULT_RETRIES: u32 = 3;
const MAX_RETRIES: u32 = 100;
const MAX_SERVER_MAXCONN: u32 = 1_000_000;
/// Longer timeouts are surely mistakes (and would overflow deadline arithmetic).
const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// TCP_KEEPIDLE / TCP_KEEPINTVL accept 1..=32767 seconds.
const KEEPALIVE_TIME_MIN: Duration = Duration::from_secs(1);
const KEEPALIVE_TIME_MAX: Duration = Duration::from_secs(32767);
/// Four fds a flow: fits the common 20000 open-files limit with room to spare.
const DEFAULT_MAXCONN: u32 = 4096;
/// `tune.kernel_sndbuf: auto` on a kernel that takes a fixed send buffer.
const AUTO_KERNEL_SNDBUF: u32 = 8 << 20;
/// The first Linux release `tune.kernel_sndbuf: auto` fixes the send buffer on: on Debian's
/// 6.1 and 6.12 (the test VMs) fixed buffers of 2 MiB and more under braked bulk flows crashed
/// 6.1 (`kernel BUG at net/ipv4/tcp_output.c:2671`, or in mm/usercopy.c) and reset flows on
/// both, where autotuning passed; 6.18 passed with them. Releases between were not tried.
const FIXED_SNDBUF_SINCE: (u32, u32) = (6, 18);
const DEFAULT_KERNEL_RCVBUF: u64 = 1 << 20;
/// The longest congestion control name the kernel takes (TCP_CA_NAME_MAX, less its NUL).
const MAX_CONGESTION_NAME: usize = 15;
/// `tune.kernel_congestion` when the file sets none.
pub const DEFAULT_KERNEL_CONGESTION: &str = "cubic";

/// `tune.kernel_congestion`: the TCP congestion control of kernel-forwarded flows' sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelCongestion {
    /// `system`: the system's.
    System,
    /// Not set: [`DEFAULT_KERNEL_CONGESTION`] if the kernel has it, else the system's.
    Default,
    /// Named in the file: lb does not start if the kernel lacks it.
    Named(String),
}
const MAX_THREADS: u32 = 1024;
/// Chosen by measurement (docs/benchmarks.md): short flows stay in userspace, where they cost
/// less than the kernel path's set-up, and bulk flows still move almost all their bytes in the
/// kernel.
const DEFAULT_OFFLOAD_AFTER: u64 = 64 << 10;
const DEFAULT_MAX_IN_FLIGHT: u64 = 16 << 20;
/// Below a few segments' worth the brake would hold nearly every segment.
const MIN_MAX_IN_FLIGHT: u64 = 256 << 10;
const MAX_MAX_IN_FLIGHT: u64 = 1 << 30;
/// The kernel doubles SO_SNDBUF and SO_RCVBUF into an int: keep the doubled value representable.
const MAX_SOCKET_BUFFER: u64 = (i32::MAX / 2) as u64;
/// Stands in for an address that failed to parse (the error is already recorded).
const UNSPECIFIED: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// One problem in a configuration file, with its position.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConfigError {
    pub file: String,
    /// Line and column (1-based); `None` for a problem with the whole file (it cannot be
    /// read, it is too large).
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl ConfigError {
    fn at(file: &str, line: usize, column: usize, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            position: Some((line, column)),
            message: message.into(),
        }
    }

    fn whole(file: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_string(),
            position: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(f, "{}:{line}:{column}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// `errors` in their order, each once: a node an alias repeats (a server list shared by two
    /// backends) is checked once per alias, and would show the same error at the same place.
    fn once_each(mut errors: Vec<ConfigError>) -> ConfigErrors {
        let mut seen = std::collections::HashSet::new();
        errors.retain(|e| seen.insert(e.clone()));
        ConfigErrors(errors)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let (file, source) = input::read(path)?;
    parse(&file, &source)
}

/// Reads only the `admin:` section of a configuration file (what the commands for a running
/// lb need; the other sections are the running lb's to judge).
pub fn load_admin(path: &Path) -> Result<Option<Admin>, ConfigErrors> {
    let (file, source) = input::read(path)?;
    let raw = deserialize(&file, &source)?;
    let mut v = Validator {
        file: &file,
        source: &source,
        locator: None,
        errors: Vec::new(),
        tls_clients: Vec::new(),
    };
    let admin = v.admin(raw.admin);
    if v.errors.is_empty() {
        Ok(admin)
    } else {
        Err(ConfigErrors::once_each(v.errors))
    }
}

/// The raw configuration, or the first syntax or type error (after every duplicate key, which
/// [`scan::check`] finds all of).
fn deserialize(file: &str, source: &str) -> Result<RawConfig, ConfigErrors> {
    scan::check(file, source)?;
    serde_yaml::from_str(source).map_err(|e| {
        // serde_yaml appends " at line X column Y"; the position is already in front.
        let message = e.to_string();
        let message = match message.rfind(" at line ") {
            Some(i) => &message[..i],
            None => &message,
        };
        let message = plain(message);
        ConfigErrors(vec![match e.location() {
            Some(l) => ConfigError::at(file, l.line(), l.column(), message),
            None => ConfigError::whole(file, message),
        }])
    })
}

/// serde's words for integers (`expected u32`) as a person would write them; the raw types
/// have their own (`#[serde(expecting)]`).
fn plain(message: &str) -> String {
    const INTEGERS: [(&str, &str); 3] = [
        ("u16", "a whole number from 0 to 65535"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u64", "a whole number from 0 to 18446744073709551615"),
    ];
    for (rust, words) in INTEGERS {
        if let Some(head) = message.strip_suffix(&format!("expected {rust}")) {
            return format!("{head}expected {words}");
        }
    }
    message.to_string()
}

/// Parses and validates configuration text; `file` names it in errors.
pub fn parse(file: &str, source: &str) -> Result<Config, ConfigErrors> {
    let raw = deserialize(file, source)?;
    let mut v = Validator {
        file,
        source,
        locator: None,
        errors: Vec::new(),
        tls_clients: Vec::new(),
    };
    let config = v.config(raw);
    if v.errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors::once_each(v.errors))
    }
}

struct Validator<'a> {
    file: &'a str,
    source: &'a str,
    /// Built for the first error ([`scan::locate`]).
    locator: Option<Locator>,
    errors: Vec<ConfigError>,
    /// TLS client configurations built so far, by (ca, verify, client_cert); `None`: failed
    /// (reported already).
    tls_clients: Vec<(tls::ClientKey, Option<std::sync::Arc<rustls::ClientConfig>>)>,
}

impl Validator<'_> {
    fn error(&mut self, path: &[Step], message: impl Into<String>) {
        let source = self.source;
        let (line, column) = self
            .locator
            .get_or_insert_with(|| scan::locate(source))
            .position(path);
        self.errors
            .push(ConfigError::at(self.file, line, column, message));
    }

    /// The index of the backend `name` that `who` (at `path`) refers to; on error records it
    /// (at `path`'s `backend` key) and returns 0.
    fn backend_named(
        &mut self,
        path: &[Step],
        backends: &HashMap<String, usize>,
        who: &str,
        name: &str,
    ) -> usize {
        match backends.get(name) {
            Some(&i) => i,
            None => {
                self.error(
                    &with(path, Step::Key("backend")),
                    format!("{who} names backend `{name}`, which is not defined under `backends:`"),
                );
                0
            }
        }
    }

    /// A listener's, backend's or server's `name` (under `path`): HAProxy's rule, letters,
    /// digits, `-`, `_`, `.` and `:` only. Names become metric label values, stats rows, log
    /// fields and admin URL segments (`/servers/BACKEND/SERVER/...`), where a quote, a slash, a
    /// space or a control byte would break or forge what surrounds them.
    fn name(&mut self, path: &[Step], what: &str, name: &str) {
        let at = with(path, Step::Key("name"));
        if name.is_empty() {
            self.error(&at, format!("a {what}'s name must not be empty"));
        } else if let Some(bad) = name.chars().find(|&c| !name_char(c)) {
            self.error(
                &at,
                format!(
                    "{what} name `{}`: `{}` is not allowed; names may use only letters, digits, `-`, `_`, `.` and `:`",
                    visible(name),
                    visible(&bad.to_string())
                ),
            );
        }
    }

    /// Parses `IP:PORT`; on error records it and returns `None`.
    fn address(&mut self, path: &[Step], what: &str, text: &str) -> Option<SocketAddr> {
        let parsed = text.parse().ok();
        if parsed.is_none() {
            self.error(path, format!("{what}: `{text}` is not an address; expected IP:PORT such as 127.0.0.1:8080 or [::1]:8080"));
        }
        parsed
    }

    fn admin(&mut self, raw: Option<raw::RawAdmin>) -> Option<Admin> {
        let a = raw?;
        let listen = self.address(
            &[Step::Key("admin"), Step::Key("listen")],
            "admin.listen",
            &a.listen,
        )?;
        if a.token
            .as_ref()
            .is_some_and(|t| t.len() < 16 || t.chars().any(|c| c.is_whitespace()))
        {
            self.error(
                &[Step::Key("admin"), Step::Key("token")],
                "admin.token must be at least 16 characters, without spaces",
            );
        }
        if a.token.is_none() && !listen.ip().is_loopback() {
            self.error(
                &[Step::Key("admin"), Step::Key("listen")],
                "admin.listen is not a loopback address: set admin.token, or anyone who can reach it could drain your servers",
            );
        }
        Some(Admin {
            listen,
            token: a.token,
        })
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let (mode, mode_path, offload_after) = match raw.forwarding {
            None => (None, vec![Step::Key("forwarding")], None),
            Some(RawForwarding::Mode(m)) => (Some(m), vec![Step::Key("forwarding")], None),
            Some(RawForwarding::Settings(s)) => (
                s.mode,
                vec![Step::Key("forwarding"), Step::Key("mode")],
                s.offload_after,
            ),
        };
        let forwarding = match mode.as_deref() {
            None | Some("auto") => Forwarding::Auto,
            Some("kernel") => Forwarding::Kernel,
            Some("user") => Forwarding::User,
            Some(other) => {
                self.error(
                    &mode_path,
                    format!("forwarding: unknown mode `{other}`; expected auto, kernel or user"),
                );
                Forwarding::Auto
            }
        };
        let offload_after = offload_after.map_or(DEFAULT_OFFLOAD_AFTER, |b| b.as_u64());
        let admin = self.admin(raw.admin);
        let defaults = raw.timeouts;
        self.timeouts(&[Step::Key("timeouts")], &defaults);
        let limits = self.limits(&raw.limits);
        let kernel_sndbuf = match raw.tune.kernel_sndbuf {
            None => SendBuffer::Auto,
            Some(RawSizeOrAuto::Word(w)) if w == "auto" => SendBuffer::Auto,
            Some(RawSizeOrAuto::Size(b)) => SendBuffer::Set(self.socket_buffer("kernel_sndbuf", Some(b), 0)),
            Some(other) => {
                let what = match other {
                    RawSizeOrAuto::Word(w) => format!("`{w}`"),
                    _ => "this".to_string(),
                };
                self.error(
                    &[Step::Key("tune"), Step::Key("kernel_sndbuf")],
                    format!("tune.kernel_sndbuf: {what} is neither a size (`8MiB`, `0`) nor `auto`"),
                );
                SendBuffer::Auto
            }
        };
        let kernel_rcvbuf =
            self.socket_buffer("kernel_rcvbuf", raw.tune.kernel_rcvbuf, DEFAULT_KERNEL_RCVBUF);
        let threads = match raw.tune.threads {
            None => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_THREADS as usize),
            Some(n @ 1..=MAX_THREADS) => n as usize,
            Some(_) => {
                self.error(
                    &[Step::Key("tune"), Step::Key("threads")],
                    format!("tune.threads must be between 1 and {MAX_THREADS}"),
                );
                1
            }
        };
        let cpu_affinity = match raw
            .tune
            .cpu_affinity
            .as_ref()
            .map(|a| CpuAffinity::parse(&a.text()))
        {
            None => CpuAffinity::Auto,
            Some(Ok(a)) => a,
            Some(Err(why)) => {
                self.error(
                    &[Step::Key("tune"), Step::Key("cpu_affinity")],
                    format!("tune.cpu_affinity: {why}"),
                );
                CpuAffinity::Auto
            }
        };
        let kernel_congestion = self.kernel_congestion(raw.tune.kernel_congestion.as_deref());
        let max_in_flight = raw
            .flow_control
            .max_in_flight
            .map_or(DEFAULT_MAX_IN_FLIGHT, |b| b.as_u64());
        if !(MIN_MAX_IN_FLIGHT..=MAX_MAX_IN_FLIGHT).contains(&max_in_flight) {
            self.error(
                &[Step::Key("flow_control"), Step::Key("max_in_flight")],
                "flow_control.max_in_flight must be between 256KiB and 1GiB",
            );
        }
        if raw.listeners.is_empty() {
            self.error(&[], "no listeners: add at least one under `listeners:`");
        }
        let mut backend_index = HashMap::new();
        let mut backends = Vec::new();
        for (i, b) in raw.backends.into_iter().enumerate() {
            let path = [Step::Key("backends"), Step::Index(i)];
            self.name(&path, "backend", &b.name);
            if backend_index.insert(b.name.clone(), i).is_some() {
                self.error(
                    &with(&path, Step::Key("name")),
                    format!("backend `{}` is defined twice", b.name),
                );
            }
            backends.push(self.backend(&path, b, &defaults));
        }
        let mut names = HashMap::new();
        let mut listeners = Vec::new();
        for (i, l) in raw.listeners.into_iter().enumerate() {
            let path = [Step::Key("listeners"), Step::Index(i)];
            self.name(&path, "listener", &l.name);
            if names.insert(l.name.clone(), i).is_some() {
                self.error(
                    &with(&path, Step::Key("name")),
                    format!("listener `{}` is defined twice", l.name),
                );
            }
            listeners.push(self.listener(&path, l, &backend_index, &defaults));
        }
        for (i, l) in listeners.iter().enumerate() {
            // A TCP flow has no path to hash (HTTP routes may name such a backend).
            if l.http.is_some() {
                continue;
            }
            let used = std::iter::once((l.backend, vec![Step::Key("backend")])).chain(
                l.sni_routes.iter().enumerate().map(|(j, r)| {
                    (
                        r.backend,
                        vec![Step::Key("route_by_sni"), Step::Index(j), Step::Key("backend")],
                    )
                }),
            );
            for (b, at) in used {
                if backends
                    .get(b)
                    .is_some_and(|b: &Backend| b.balance == Balance::Uri)
                {
                    self.error(
                        &[&[Step::Key("listeners"), Step::Index(i)][..], &at].concat(),
                        format!(
                            "listener `{}` is mode tcp, but backend `{}` balances by uri, which needs HTTP",
                            l.name, backends[b].name
                        ),
                    );
                }
            }
        }
        Config {
            forwarding,
            offload_after,
            admin,
            shutdown_grace: defaults.shutdown_grace.unwrap_or(DEFAULT_GRACE),
            kernel_sndbuf,
            kernel_rcvbuf,
            max_in_flight: max_in_flight.clamp(MIN_MAX_IN_FLIGHT, MAX_MAX_IN_FLIGHT) as u32,
            threads,
            cpu_affinity,
            kernel_congestion,
            upgrade_moves_kernel_flows: raw.tune.upgrade_moves_kernel_flows.unwrap_or(true),
            limits,
            listeners,
            backends,
        }
    }

    fn listener(
        &mut self,
        path: &[Step],
        l: RawListener,
        backends: &HashMap<String, usize>,
        defaults: &RawTimeouts,
    ) -> Listener {
        let bind = self
            .address(&with(path, Step::Key("bind")), "bind", &l.bind)
            .unwrap_or(UNSPECIFIED);
        let http = match l.mode.as_deref() {
            None | Some("tcp") => false,
            Some("http") => true,
            Some(other) => {
                self.error(
                    &with(path, Step::Key("mode")),
                    format!("mode: `{other}` is not supported; expected tcp or http"),
                );
                false
            }
        };
        let http = self.http_listener(path, &l, http, backends, defaults);
        let backend = self.backend_named(path, backends, &format!("listener `{}`", l.name), &l.backend);
        let handshake_timeout = l
            .timeouts
            .as_ref()
            .and_then(|t| t.tls_handshake)
            .or(defaults.tls_handshake);
        let tls = self.listener_tls(path, l.tls.as_ref(), http.is_some(), handshake_timeout);
        let sni_routes = self.sni_routes(
            &with(path, Step::Key("route_by_sni")),
            &l,
            http.is_some(),
            backends,
        );
        if tls.is_none()
            && l.route_by_sni.is_empty()
            && l.timeouts.as_ref().is_some_and(|t| t.tls_handshake.is_some())
        {
            self.error(
                &[path, &[Step::Key("timeouts"), Step::Key("tls_handshake")]].concat(),
                "timeouts.tls_handshake: this listener has no `tls:` and no `route_by_sni:`",
            );
        }
        let mut http = http;
        if let (Some(h), Some(_)) = (&mut http, &tls) {
            h.https = true;
        }
        let timeouts = l.timeouts.unwrap_or_default();
        if timeouts.connect.is_some()
            || timeouts.server.is_some()
            || timeouts.shutdown_grace.is_some()
            || timeouts.queue.is_some()
        {
            self.error(&with(path, Step::Key("timeouts")), "a listener's timeouts may only set `client`, `http_request`, `http_keep_alive`, `tunnel` and `tls_handshake` (connect, server and queue belong to the backend, shutdown_grace to the top level)");
        }
        self.timeouts(&with(path, Step::Key("timeouts")), &timeouts);
        let client_timeout = timeouts.client.or(defaults.client).unwrap_or(DEFAULT_IDLE);
        let keepalive = match l.keepalive {
            None | Some(RawKeepalive::Switch(false)) => None,
            Some(RawKeepalive::Switch(true)) => Some(Keepalive::default()),
            Some(RawKeepalive::Settings(s)) => {
                let ka = with(path, Step::Key("keepalive"));
                for (key, value) in [("idle", s.idle), ("interval", s.interval)] {
                    if value.is_some_and(|d| !(KEEPALIVE_TIME_MIN..=KEEPALIVE_TIME_MAX).contains(&d)) {
                        self.error(
                            &with(&ka, Step::Key(key)),
                            format!("keepalive.{key} must be between 1s and 32767s (the kernel's range)"),
                        );
                    }
                }
                if s.count.is_some_and(|c| !(1..=127).contains(&c)) {
                    self.error(
                        &with(&ka, Step::Key("count")),
                        "keepalive.count must be between 1 and 127",
                    );
                }
                Some(Keepalive {
                    idle: s.idle,
                    interval: s.interval,
                    count: s.count,
                })
            }
        };
        let accept_proxy = self.accept_proxy(&with(path, Step::Key("accept_proxy")), l.accept_proxy.as_ref());
        let maxconn = l.maxconn.unwrap_or(DEFAULT_MAXCONN);
        if maxconn == 0 {
            self.error(&with(path, Step::Key("maxconn")), "maxconn must be at least 1");
        }
        Listener {
            name: l.name,
            bind,
            backend,
            backlog: l.backlog.unwrap_or(1024),
            nodelay: l.nodelay.unwrap_or(true),
            keepalive,
            transparent: l.transparent.unwrap_or(false),
            maxconn,
            client_timeout,
            http,
            tls,
            sni_routes,
            peek_timeout: handshake_timeout.unwrap_or(tls::DEFAULT_HANDSHAKE),
            accept_proxy,
        }
    }

    /// `route_by_sni:`, for `tcp` listeners.
    fn sni_routes(
        &mut self,
        path: &[Step],
        l: &RawListener,
        http: bool,
        backends: &HashMap<String, usize>,
    ) -> Vec<SniRoute> {
        if http && !l.route_by_sni.is_empty() {
            self.error(
                path,
                "route_by_sni: is for tcp listeners; an http listener's `routes:` match `sni:`",
            );
            return Vec::new();
        }
        let mut routes = Vec::new();
        for (i, r) in l.route_by_sni.iter().enumerate() {
            let path = with(path, Step::Index(i));
            let sni = self.host_match(&with(&path, Step::Key("sni")), "sni", &r.sni);
            let backend = self.backend_named(&path, backends, "route_by_sni", &r.backend);
            routes.push(SniRoute { sni, backend });
        }
        routes
    }

    fn backend(&mut self, path: &[Step], b: RawBackend, defaults: &RawTimeouts) -> Backend {
        let balance = match b.balance.as_deref() {
            None => Balance::RoundRobin,
            Some(name) => match Balance::NAMES.iter().find(|(n, _)| *n == name) {
                Some(&(_, balance)) => balance,
                None => {
                    self.error(
                        &with(path, Step::Key("balance")),
                        format!(
                            "balance: unknown algorithm `{name}`; expected one of roundrobin, leastconn, source, uri, random"
                        ),
                    );
                    Balance::RoundRobin
                }
            },
        };
        let timeouts = b.timeouts.unwrap_or_default();
        let client_side = [
            timeouts.client,
            timeouts.shutdown_grace,
            timeouts.http_request,
            timeouts.http_keep_alive,
            timeouts.tunnel,
            timeouts.tls_handshake,
        ];
        if client_side.iter().any(Option::is_some) {
            self.error(
                &with(path, Step::Key("timeouts")),
                "a backend's timeouts may only set `connect`, `server` and `queue`",
            );
        }
        self.timeouts(&with(path, Step::Key("timeouts")), &timeouts);
        let connect_timeout = timeouts.connect.or(defaults.connect).unwrap_or(DEFAULT_CONNECT);
        let server_timeout = timeouts.server.or(defaults.server).unwrap_or(DEFAULT_IDLE);
        let queue_timeout = timeouts.queue.or(defaults.queue).unwrap_or(connect_timeout);
        if b.servers.is_empty() {
            self.error(path, format!("backend `{}` has no servers", b.name));
        } else if b.servers.iter().all(|s| s.weight == Some(0)) {
            self.error(
                &with(path, Step::Key("servers")),
                format!(
                    "every server of backend `{}` has weight 0: it would receive no flows",
                    b.name
                ),
            );
        }
        let send_proxy = self
            .send_proxy(&with(path, Step::Key("send_proxy")), b.send_proxy.as_ref())
            .flatten();
        let mut seen = HashMap::new();
        let mut servers = Vec::new();
        for (i, s) in b.servers.into_iter().enumerate() {
            let spath = with(&with(path, Step::Key("servers")), Step::Index(i));
            self.name(&spath, "server", &s.name);
            if seen.insert(s.name.clone(), i).is_some() {
                self.error(
                    &with(&spath, Step::Key("name")),
                    format!("server `{}` appears twice in backend `{}`", s.name, b.name),
                );
            }
            let address = self.address(&with(&spath, Step::Key("address")), "address", &s.address);
            if address.is_some_and(|a| a.port() == 0) {
                self.error(
                    &with(&spath, Step::Key("address")),
                    "address: port 0 cannot be connected to",
                );
            }
            let address = address.unwrap_or(UNSPECIFIED);
            let weight = s.weight.unwrap_or(1);
            if weight > MAX_WEIGHT {
                self.error(
                    &with(&spath, Step::Key("weight")),
                    format!("weight {weight} is above the maximum {MAX_WEIGHT}"),
                );
            }
            if s.maxconn.is_some_and(|m| !(1..=MAX_SERVER_MAXCONN).contains(&m)) {
                self.error(
                    &with(&spath, Step::Key("maxconn")),
                    format!("maxconn must be between 1 and {MAX_SERVER_MAXCONN}"),
                );
            }
            let tls = self.server_tls(path, b.tls.as_ref(), &spath, s.tls.as_ref(), address);
            let send_proxy = self
                .send_proxy(&with(&spath, Step::Key("send_proxy")), s.send_proxy.as_ref())
                .unwrap_or(send_proxy);
            servers.push(Server {
                name: s.name,
                address,
                weight,
                maxconn: s.maxconn,
                tls,
                send_proxy,
            });
        }
        let retries = b.retries.unwrap_or(DEFAULT_RETRIES);
        if retries > MAX_RETRIES {
            self.error(
                &with(path, Step::Key("retries")),
                format!("retries must be between 0 and {MAX_RETRIES}"),
            );
        }
        let health_check = self.health_check(&with(path, Step::Key("health_check")), b.health_check.as_ref());
        let max_consecutive_errors = self.observe(path, b.observe.as_ref(), health_check.is_some());
        Backend {
            name: b.name,
            balance,
            connect_timeout,
            server_timeout,
            queue_timeout,
            retries,
            health_check,
            max_consecutive_errors,
            servers,
        }
    }

    /// `tune.kernel_congestion`: `system`, or a name as the kernel spells them (checked
    /// against the kernel only when lb starts).
    fn kernel_congestion(&mut self, value: Option<&str>) -> KernelCongestion {
        match value {
            None => KernelCongestion::Default,
            Some("system") => KernelCongestion::System,
            Some(name)
                if (1..=MAX_CONGESTION_NAME).contains(&name.len())
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                KernelCongestion::Named(name.to_string())
            }
            Some(name) => {
                self.error(
                    &[Step::Key("tune"), Step::Key("kernel_congestion")],
                    format!(
                        "tune.kernel_congestion: `{}` is not a congestion control's name (letters, digits, `_` and `-`, at most {MAX_CONGESTION_NAME}), nor `system`",
                        name.escape_debug()
                    ),
                );
                KernelCongestion::Default
            }
        }
    }

    /// A `tune.*` socket buffer size: `0` keeps the kernel's autotuning (`None`).
    fn socket_buffer(&mut self, key: &'static str, value: Option<raw::Size>, default: u64) -> Option<u32> {
        match value.map_or(default, |b| b.as_u64()) {
            0 => None,
            n if n > MAX_SOCKET_BUFFER => {
                self.error(
                    &[Step::Key("tune"), Step::Key(key)],
                    format!("tune.{key}: at most {MAX_SOCKET_BUFFER} bytes"),
                );
                None
            }
            n => Some(n as u32),
        }
    }

    /// Checks the durations of one `timeouts:` block, where it is written.
    fn timeouts(&mut self, path: &[Step], t: &RawTimeouts) {
        let values = [
            ("connect", t.connect),
            ("client", t.client),
            ("server", t.server),
            ("shutdown_grace", t.shutdown_grace),
            ("http_request", t.http_request),
            ("http_keep_alive", t.http_keep_alive),
            ("tunnel", t.tunnel),
            ("queue", t.queue),
            ("tls_handshake", t.tls_handshake),
        ];
        for (key, value) in values {
            let Some(d) = value else { continue };
            if d.is_zero() {
                self.error(
                    &with(path, Step::Key(key)),
                    format!("timeouts.{key} must be longer than zero"),
                );
            } else if d > MAX_TIMEOUT {
                self.error(
                    &with(path, Step::Key(key)),
                    format!("timeouts.{key} is longer than the maximum, 30 days"),
                );
            }
        }
    }
}

/// Whether `c` may appear in a name: HAProxy's `invalid_char()` allows ASCII letters and digits,
/// `-`, `_`, `.` and `:`.
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')
}

/// `s` with its control characters escaped (`\n`, `\u{1b}`): an error message shows them
/// instead of letting the terminal act on them.
pub fn visible(s: &str) -> String {
    s.chars()
        .map(|c| match c.is_control() {
            true => c.escape_debug().to_string(),
            false => c.to_string(),
        })
        .collect()
}

fn with(path: &[Step], step: Step) -> Vec<Step> {
    let mut v = path.to_vec();
    v.push(step);
    v
}

#[cfg(test)]
mod tests;
