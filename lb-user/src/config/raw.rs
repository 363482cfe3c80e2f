//! The configuration file as written: serde structs that mirror the YAML one to one.
//!
//! Every struct denies unknown keys, so a typo is an error with its position instead of a
//! silently ignored setting. Values are checked and turned into the validated
//! [`Config`](super::Config) by [`super::validate`].
use serde::Deserialize;
use std::time::Duration;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of sections such as listeners: and backends:"
)]
pub struct RawConfig {
    /// How established TCP flows are forwarded: a mode (`auto`, `kernel`, `user`), or
    /// `{ mode, offload_after }`. `lb run --forwarding` overrides the mode.
    #[serde(default)]
    pub forwarding: Option<RawForwarding>,
    /// The admin endpoint (metrics). Optional.
    #[serde(default)]
    pub admin: Option<RawAdmin>,
    /// Global tuning (HAProxy's `tune.*`).
    #[serde(default)]
    pub tune: RawTune,
    /// Per-flow bounds of kernel forwarding.
    #[serde(default)]
    pub flow_control: RawFlowControl,
    /// Default timeouts for every listener and backend (HAProxy's `defaults` section).
    #[serde(default)]
    pub timeouts: RawTimeouts,
    /// Bounds on HTTP messages (`mode: http` listeners).
    #[serde(default)]
    pub limits: RawLimits,
    /// Where clients connect.
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    /// Groups of servers that listeners forward to.
    #[serde(default)]
    pub backends: Vec<RawBackend>,
}

/// `forwarding:` either a mode or the mode with its settings. (Not `untagged`, like the other
/// enums here but [`RawSizeOrAuto`], which never fails: serde's untagged enums report a mistake
/// at the enclosing mapping, in the enum's Rust name.)
#[derive(Debug)]
pub enum RawForwarding {
    /// `forwarding: auto`.
    Mode(String),
    /// `forwarding: { mode: auto, offload_after: 64KiB }`.
    Settings(RawForwardingSettings),
}

impl<'de> Deserialize<'de> for RawForwarding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawForwarding;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("auto, kernel, user, or { mode, offload_after }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawForwarding, E> {
                Ok(RawForwarding::Mode(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawForwarding, A::Error> {
                settings(map).map(RawForwarding::Settings)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A mapping's settings, for a visitor that meets a mapping.
fn settings<'de, T: Deserialize<'de>, A: serde::de::MapAccess<'de>>(map: A) -> Result<T, A::Error> {
    T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
}

/// A size in bytes: a number, or a number and a unit (`64KiB`, `16MiB`, `1.5GB`) as bytesize
/// reads them. (bytesize's own errors say `expected parsable string`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size such as 65536, 64KiB or 16MiB")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse::<bytesize::ByteSize>()
                    .map(|b| Size(b.as_u64()))
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Explicit forwarding settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with mode and offload_after")]
pub struct RawForwardingSettings {
    /// `auto` (kernel when BPF loads, else userspace with one warning), `kernel` (fail at start
    /// when BPF cannot be loaded), `user` (never load BPF). Default `auto`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Bytes a flow moves in userspace, in either direction, before it is handed to the kernel
    /// mid-stream (kernel forwarding only): short flows never pay the kernel path's set-up.
    /// `0` hands every flow to the kernel at once (default 64KiB).
    #[serde(default)]
    pub offload_after: Option<Size>,
}

/// `admin:`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with listen (and token)")]
pub struct RawAdmin {
    /// `IP:PORT` of the admin HTTP endpoint (metrics, stats, runtime commands). A non-loopback
    /// address needs a `token`.
    pub listen: String,
    /// A secret every request must carry (`Authorization: Bearer TOKEN`, or HTTP Basic auth
    /// with any user and the token as password, which browsers ask for), at least 16
    /// characters. Without it, only loopback clients are served.
    #[serde(default)]
    pub token: Option<String>,
}

/// `tune:`
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of tuning settings such as threads: 8"
)]
pub struct RawTune {
    /// Send buffer of both sockets of a kernel-forwarded flow (SO_SNDBUF, which the kernel
    /// doubles), e.g. `8MiB`; `0` keeps the kernel's autotuning. The kernel's forwarding worker
    /// pauses for a timer tick whenever the destination's send buffer is full, so a buffer
    /// larger than autotuning's `tcp_wmem` maximum (4 MiB) is what lets it keep up (measured
    /// in docs/benchmarks.md). `auto` (the default): 8MiB on Linux 6.18 and later, autotuning
    /// before: on Debian's 6.1 and 6.12 a fixed buffer of 2 MiB or more under braked bulk
    /// flows crashed the kernel (6.1) or reset flows (both); with autotuning they passed.
    #[serde(default)]
    pub kernel_sndbuf: Option<RawSizeOrAuto>,
    /// Receive buffer of both sockets of a kernel-forwarded flow (SO_RCVBUF, which the kernel
    /// doubles), e.g. `1MiB`; `0` keeps the kernel's autotuning. It is what a braked direction
    /// holds before TCP's window closes on the sender, and what the daemon copies to hand the
    /// direction back to the kernel; redirected bytes never wait in it (default 1MiB). Applied
    /// before the handshake (on the listening socket and on each server socket), to every flow
    /// while kernel forwarding is on.
    #[serde(default)]
    pub kernel_rcvbuf: Option<Size>,
    /// Threads that run sessions (HAProxy's `nbthread`), `1` to `1024`; each connection stays
    /// on one thread from accept to close (default: one per CPU lb may run on).
    #[serde(default)]
    pub threads: Option<u32>,
    /// Which CPU each session thread is bound to (HAProxy's `cpu-map`): `auto` binds thread `i`
    /// to the `i`-th CPU lb may run on when there is one thread per such CPU (the default
    /// thread count) and binds none otherwise; `none` binds none; a CPU list as `taskset -c`
    /// takes it (`0-3,6`) binds thread `i` to its `i`-th CPU, round robin (default `auto`).
    #[serde(default)]
    pub cpu_affinity: Option<RawCpuList>,
    /// TCP congestion control of both sockets of a flow the kernel forwards, set at the
    /// hand-off: a name the kernel has (`cubic`, `reno`, `bbr`, ...), or `system` to keep the
    /// system's (`net.ipv4.tcp_congestion_control`). Measured with the system on BBR (one
    /// iperf3 stream on loopback): with lb's sockets on BBR the kernel forwarded 4.7 Gbit/s
    /// (client sends) and 3.4 (backend sends), and about 1.2 % of the bytes went through lb;
    /// on cubic 14.1 and 13.3 (docs/benchmarks.md), 0.2-0.6 %. Flows forwarded in userspace
    /// keep the system's. lb does not start if a name set here is one the kernel lacks
    /// (default `cubic`, or the system's if the kernel has no cubic).
    #[serde(default)]
    pub kernel_congestion: Option<String>,
    /// Whether an upgrade moves the kernel-forwarded flows to the new process (with the
    /// program's maps), instead of leaving them in the old one until they end, as HAProxy's
    /// old processes do (default `true`).
    #[serde(default)]
    pub upgrade_moves_kernel_flows: Option<bool>,
}

/// A CPU list as YAML reads it: a lone CPU (`1`) is a number, anything else a string.
#[derive(Debug)]
pub enum RawCpuList {
    One(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawCpuList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawCpuList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("auto, none, or a CPU list such as 0-3,6")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawCpuList, E> {
                Ok(RawCpuList::One(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawCpuList, E> {
                Ok(RawCpuList::Text(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl RawCpuList {
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            RawCpuList::One(n) => n.to_string().into(),
            RawCpuList::Text(t) => t.as_str().into(),
        }
    }
}

/// A size, or the word `auto`. Whatever is neither (another word, a bool, a list) lands in
/// `Word` or `Other` rather than failing here, so that validation says so at the value itself
/// (serde's untagged error would point at the enclosing mapping).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSizeOrAuto {
    Size(Size),
    Word(String),
    Other(serde::de::IgnoredAny),
}

/// `flow_control:`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with max_in_flight")]
pub struct RawFlowControl {
    /// The brake of kernel forwarding, per direction of a flow: when more than this many bytes
    /// lb received from one side are not yet acknowledged by the other side's peer, the kernel
    /// stops forwarding that direction and the bytes stay in lb's receive buffer, so TCP's
    /// window closes on the sender; once the reader has drained to its low-water mark (what it
    /// reads in 100 ms, between 1 MiB and a quarter of the bound; the quarter under a 4 MiB
    /// bound), lb forwards the held bytes itself and hands the direction back to the kernel.
    /// Above half the bound the sender is throttled (its window shrunk), so a brake holds
    /// little. Bounds the memory a slow reader can make lb hold. `256KiB` to `1GiB` (default
    /// 16MiB).
    #[serde(default)]
    pub max_in_flight: Option<Size>,
}

/// `timeouts:` at the top level, in a listener or in a backend. Durations are written like
/// `500ms`, `5s`, `2m`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of timeouts such as connect: 5s")]
pub struct RawTimeouts {
    /// Time allowed to establish the TCP connection to a server (default 5s).
    #[serde(default, with = "humantime_serde")]
    pub connect: Option<Duration>,
    /// Close a flow whose client side moved no byte, in either direction, for this long
    /// (default 60s).
    #[serde(default, with = "humantime_serde")]
    pub client: Option<Duration>,
    /// Close a flow whose server side moved no byte, in either direction, for this long
    /// (default 60s).
    #[serde(default, with = "humantime_serde")]
    pub server: Option<Duration>,
    /// On SIGTERM/SIGINT, how long live flows may take to finish before they are closed
    /// (top level only; default 10s).
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
    /// HTTP: time a client has to send a whole request head, from its first byte (from the
    /// connection's start for the first request); 408 after it (HAProxy's `timeout
    /// http-request`; default 10s). Top level or listener.
    #[serde(default, with = "humantime_serde")]
    pub http_request: Option<Duration>,
    /// HTTP: how long a kept-alive client connection may wait for its next request (HAProxy's
    /// `timeout http-keep-alive`; default `http_request`). Top level or listener.
    #[serde(default, with = "humantime_serde")]
    pub http_keep_alive: Option<Duration>,
    /// HTTP: idle limit of a tunnel (after a WebSocket upgrade or a CONNECT) in either
    /// direction (HAProxy's `timeout tunnel`; default 1h). Top level or listener.
    #[serde(default, with = "humantime_serde")]
    pub tunnel: Option<Duration>,
    /// How long a new session may wait for a server below its `maxconn` when every one is at
    /// it; 503 (HTTP) or a closed connection (TCP) after it (HAProxy's `timeout queue`; default
    /// `connect`). Top level or backend.
    #[serde(default, with = "humantime_serde")]
    pub queue: Option<Duration>,
    /// A listener with `tls:`: time a client has to complete the TLS handshake, from its
    /// connection (default 10s). Top level or listener.
    #[serde(default, with = "humantime_serde")]
    pub tls_handshake: Option<Duration>,
}

/// `limits:` bounds on HTTP messages.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with max_header_bytes, max_body_bytes and max_header_fields"
)]
pub struct RawLimits {
    /// Largest request or response head (request line or status line and header fields) lb
    /// holds while it analyzes it; a longer request is refused with 431 (414 when the request
    /// line alone is longer), a longer response with 502 (default 16KiB, at most 1MiB).
    #[serde(default)]
    pub max_header_bytes: Option<Size>,
    /// Largest request body; a longer one is refused with 413 (default: unbounded).
    #[serde(default)]
    pub max_body_bytes: Option<Size>,
    /// Most header fields in a request or response head (HAProxy's `tune.http.maxhdr`): a
    /// request with more is refused with 431, a response with more answered 502 (default 100,
    /// 1 to 1000).
    #[serde(default)]
    pub max_header_fields: Option<u32>,
}

/// One entry of `listeners:`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a listener: a mapping with name, bind and backend"
)]
pub struct RawListener {
    /// Unique name, used in logs and metrics labels: ASCII letters, digits, `-`, `_`, `.` and
    /// `:` only (HAProxy's rule, for every name).
    pub name: String,
    /// `IP:PORT` to listen on (`0.0.0.0:80`, `[::]:443`, `127.0.0.1:0` for any free port).
    pub bind: String,
    /// `tcp` (default: bytes forwarded as they are) or `http` (each request analyzed, routed and
    /// rewritten).
    #[serde(default)]
    pub mode: Option<String>,
    /// Name of the backend that receives this listener's flows; in `http` mode, the requests
    /// no route matches. Also spelled `default_backend`, as in HAProxy.
    #[serde(alias = "default_backend")]
    pub backend: String,
    /// `http` mode: routes tried in order; the first that matches a request picks its backend.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// `http` mode: which forwarding headers lb adds to requests.
    #[serde(default)]
    pub forwarded: Option<RawForwarded>,
    /// `http` mode: header rules applied to each request before it is sent, in order.
    #[serde(default)]
    pub request_headers: Vec<RawHeaderRule>,
    /// `http` mode: header rules applied to each response before it is sent, in order.
    #[serde(default)]
    pub response_headers: Vec<RawHeaderRule>,
    /// `http` mode: the access log, one record per request on the `lb::access` log target:
    /// `text` (default), `json` or `off`.
    #[serde(default)]
    pub access_log: Option<String>,
    /// Listen backlog (default 1024).
    #[serde(default)]
    pub backlog: Option<u32>,
    /// Set TCP_NODELAY on accepted and server sockets (default true).
    #[serde(default)]
    pub nodelay: Option<bool>,
    /// TCP keepalive on accepted sockets: `true`/`false`, or `{ idle, interval, count }`
    /// (default false).
    #[serde(default)]
    pub keepalive: Option<RawKeepalive>,
    /// Transparent listener: read each connection's original destination (SO_ORIGINAL_DST,
    /// set by an iptables REDIRECT/DNAT rule) and log it with the session (default false).
    #[serde(default)]
    pub transparent: Option<bool>,
    /// Maximum concurrent flows on this listener; further connections wait in the backlog
    /// (default 4096). Each flow needs two open files; lb raises its limit to the hard one.
    #[serde(default)]
    pub maxconn: Option<u32>,
    /// Terminate TLS: clients connect with TLS, lb analyzes (`http`) or forwards (`tcp`) the
    /// decrypted bytes.
    #[serde(default)]
    pub tls: Option<RawListenerTls>,
    /// `tcp` mode: pick the backend by the name the client asks for in its TLS ClientHello
    /// (SNI), tried in order; a flow no entry matches goes to `backend`. Without `tls:`, lb
    /// peeks at the ClientHello and forwards the TLS flow as it is (HAProxy's `req_ssl_sni`),
    /// within `timeouts.tls_handshake`; with `tls:`, the name comes from lb's handshake.
    #[serde(default)]
    pub route_by_sni: Vec<RawSniRoute>,
    /// Take the client's address from a PROXY protocol header (v1 or v2) that the load
    /// balancer in front of lb sends before the client's bytes (HAProxy's `accept-proxy`):
    /// `true` for connections from anywhere, or the networks allowed to connect (CIDRs such as
    /// `10.0.0.0/8`, or single addresses); a connection from elsewhere is closed at once. Every
    /// connection must then start with a valid header, whole within `timeouts.client`, or it
    /// is closed before a server is chosen (default false).
    #[serde(default)]
    pub accept_proxy: Option<RawAcceptProxy>,
    /// Overrides `timeouts.client` (and the HTTP timeouts `http_request`, `http_keep_alive`,
    /// `tunnel`, and `tls_handshake`) for this listener.
    #[serde(default)]
    pub timeouts: Option<RawTimeouts>,
}

/// `keepalive:` either a switch or the three kernel settings.
#[derive(Debug)]
pub enum RawKeepalive {
    /// `keepalive: true` uses the kernel's defaults.
    Switch(bool),
    /// `keepalive: { idle: 60s, interval: 10s, count: 5 }`.
    Settings(RawKeepaliveSettings),
}

impl<'de> Deserialize<'de> for RawKeepalive {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawKeepalive;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false, or { idle, interval, count }")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawKeepalive, E> {
                Ok(RawKeepalive::Switch(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawKeepalive, A::Error> {
                settings(map).map(RawKeepalive::Settings)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Explicit keepalive settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with idle, interval and count")]
pub struct RawKeepaliveSettings {
    /// Idle time before the first probe (TCP_KEEPIDLE).
    #[serde(default, with = "humantime_serde")]
    pub idle: Option<Duration>,
    /// Time between probes (TCP_KEEPINTVL).
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT).
    #[serde(default)]
    pub count: Option<u32>,
}

/// One entry of `backends:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a backend: a mapping with name and servers")]
pub struct RawBackend {
    /// Unique name, referenced by listeners' `backend:` (letters, digits, `-`, `_`, `.`, `:`).
    pub name: String,
    /// Balancing algorithm: `roundrobin` (weighted, smooth; the default), `leastconn` (fewest
    /// current sessions per unit of weight), `source` (consistent hash of the client address),
    /// `uri` (consistent hash of the request path; HTTP only), `random` (power of two choices).
    /// Every one honours the servers' weights.
    #[serde(default)]
    pub balance: Option<String>,
    /// Overrides `timeouts.connect` and `timeouts.server` for this backend.
    #[serde(default)]
    pub timeouts: Option<RawTimeouts>,
    /// Connect attempts after a failed one, each on a server not tried yet for this session
    /// (HAProxy's `retries` with `option redispatch`), 0..=100 (default 3).
    #[serde(default)]
    pub retries: Option<u32>,
    /// Active health checks of every server (none by default: servers are taken to be up).
    #[serde(default)]
    pub health_check: Option<RawHealthCheck>,
    /// Passive checks: what live traffic may tell about a server (needs `health_check`, which
    /// brings an ejected server back).
    #[serde(default)]
    pub observe: Option<RawObserve>,
    /// Connect to every server with TLS (a server's own `tls:` overrides it key by key).
    #[serde(default)]
    pub tls: Option<RawServerTls>,
    /// Write a PROXY protocol header, `v1` (text) or `v2` (binary), before a flow's first byte
    /// to every server (HAProxy's `send-proxy` and `send-proxy-v2`), and on their health
    /// checks; `off` or `false` (default) sends none. A server's own `send_proxy` overrides it.
    #[serde(default)]
    pub send_proxy: Option<RawSendProxy>,
    /// The servers; at least one.
    #[serde(default)]
    pub servers: Vec<RawServer>,
}

/// A backend's `health_check:` (HAProxy's `check`, `inter`, `rise`, `fall`, `option httpchk`,
/// `http-check expect status`).
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of health check settings such as interval: 2s"
)]
pub struct RawHealthCheck {
    /// `tcp` (a connection is accepted; the default) or `http` (a `GET path` is answered with
    /// the expected status).
    #[serde(default)]
    pub kind: Option<String>,
    /// Time between two checks of a server, from 100ms (default 2s).
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<std::time::Duration>,
    /// How long one check may take, at most the interval (default: the interval).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<std::time::Duration>,
    /// Consecutive successes that bring a DOWN server UP, 1..=100 (default 2).
    #[serde(default)]
    pub rise: Option<u32>,
    /// Consecutive failures that take an UP server DOWN, 1..=100 (default 3).
    #[serde(default)]
    pub fall: Option<u32>,
    /// `http` checks: the path requested (default `/`).
    #[serde(default)]
    pub path: Option<String>,
    /// `http` checks: the status that means healthy (default: any 2xx or 3xx).
    #[serde(default)]
    pub expect_status: Option<u16>,
}

/// A backend's `observe:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with max_consecutive_errors")]
pub struct RawObserve {
    /// Connect failures (and, on HTTP listeners, 5xx responses from the server) in a row that
    /// take a server DOWN until its health check brings it back, 1..=1000.
    pub max_consecutive_errors: u32,
}

/// One entry of a backend's `servers:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a server: a mapping with name and address")]
pub struct RawServer {
    /// Name unique within the backend, used in logs and metrics labels (letters, digits, `-`,
    /// `_`, `.`, `:`).
    pub name: String,
    /// `IP:PORT` of the server.
    pub address: String,
    /// Relative share of new flows, 1..=256 (default 1); 0 sends it nothing.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Most sessions at once (TCP flows, HTTP server connections), 1..=1000000; new ones wait
    /// in the backend's queue for `timeouts.queue` when every server is full (default: no
    /// limit).
    #[serde(default)]
    pub maxconn: Option<u32>,
    /// TLS to this server: settings that override the backend's `tls:` key by key, or `false`
    /// for a server that speaks plain TCP in a TLS backend.
    #[serde(default)]
    pub tls: Option<RawServerTls>,
    /// Overrides the backend's `send_proxy` for this server: `v1`, `v2` or `off` (`false`).
    #[serde(default)]
    pub send_proxy: Option<RawSendProxy>,
}

/// A listener's `tls:` (HAProxy's `bind ... ssl crt ...`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with certificates")]
pub struct RawListenerTls {
    /// PEM certificate chains and keys, at least one. The certificate a client gets is the one
    /// whose subjectAltName (else CN) matches the name it asked for (SNI; `*.example.com`
    /// matches one label); the first is the default, for clients that send no name or one no
    /// certificate has. Relative paths are relative to the configuration file.
    pub certificates: Vec<RawCertFiles>,
    /// Refuse the handshake (alert `access_denied`) when the client's SNI matches no
    /// certificate, instead of presenting the first (HAProxy's `strict-sni`; default false).
    #[serde(default)]
    pub strict_sni: Option<bool>,
    /// Application protocols offered in ALPN, preferred first (default `[http/1.1]` on an
    /// `http` listener, none on a `tcp` one). lb speaks HTTP/1.x only, so an `http` listener
    /// cannot offer `h2`.
    #[serde(default)]
    pub alpn: Option<Vec<String>>,
    /// The oldest TLS version accepted: `1.2` (default) or `1.3` (also written `TLSv1.2`).
    #[serde(default)]
    pub min_version: Option<String>,
    /// Hand each session to the kernel's TLS (kTLS) after its handshake, where the kernel has
    /// it (default true; HAProxy's `ktls on`): the kernel encrypts and decrypts, lb moves
    /// plaintext. Without kTLS in the kernel this changes nothing.
    #[serde(default)]
    pub ktls: Option<bool>,
}

/// One entry of a `tcp` listener's `route_by_sni:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with sni and backend")]
pub struct RawSniRoute {
    /// The name: `example.com` exactly, or `*.example.com` for any name ending in
    /// `.example.com` (compared without case).
    pub sni: String,
    /// The backend that receives the matching flows.
    pub backend: String,
}

/// A certificate chain and its key, both PEM files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with cert and key")]
pub struct RawCertFiles {
    /// The certificate chain: the server's certificate first, then its intermediates.
    pub cert: String,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

/// `tls:` of a backend or a server: `true`/`false`, or settings. (Not `untagged`: a typo in
/// the settings must be reported with the key's name, which an untagged enum loses.)
#[derive(Debug)]
pub enum RawServerTls {
    Switch(bool),
    Settings(RawServerTlsSettings),
}

impl<'de> Deserialize<'de> for RawServerTls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawServerTls;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false, or { sni, ca, verify, client_cert }")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawServerTls, E> {
                Ok(RawServerTls::Switch(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawServerTls, A::Error> {
                settings(map).map(RawServerTls::Settings)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `send_proxy:` of a backend or server: a version's name, or `false`.
#[derive(Debug)]
pub enum RawSendProxy {
    Word(String),
    Switch(bool),
}

impl<'de> Deserialize<'de> for RawSendProxy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawSendProxy;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("v1, v2, off or false")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawSendProxy, E> {
                Ok(RawSendProxy::Switch(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawSendProxy, E> {
                Ok(RawSendProxy::Word(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `accept_proxy:` of a listener: `true`/`false`, or the trusted networks.
#[derive(Debug)]
pub enum RawAcceptProxy {
    Switch(bool),
    From(Vec<String>),
}

impl<'de> Deserialize<'de> for RawAcceptProxy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawAcceptProxy;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false, or a list of networks such as [10.0.0.0/8]")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawAcceptProxy, E> {
                Ok(RawAcceptProxy::Switch(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<RawAcceptProxy, A::Error> {
                Vec::<String>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(RawAcceptProxy::From)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// TLS to servers (HAProxy's `server ... ssl sni ... ca-file ... verify ... crt ...`).
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with sni, ca, verify and client_cert"
)]
pub struct RawServerTlsSettings {
    /// The name sent in SNI and checked against the server's certificate (default: none is
    /// sent, and the certificate must name the server's IP address).
    #[serde(default)]
    pub sni: Option<String>,
    /// PEM file of the CA certificates that may sign the server's certificate (default: the
    /// system's CA store).
    #[serde(default)]
    pub ca: Option<String>,
    /// Check the server's certificate (default true). `false` accepts any certificate: the
    /// connection is encrypted but not authenticated.
    #[serde(default)]
    pub verify: Option<bool>,
    /// A certificate and key lb presents when the server asks for one (mutual TLS).
    #[serde(default)]
    pub client_cert: Option<RawCertFiles>,
}

/// One entry of a listener's `routes:`. At least one of `host`, `sni` and `path_prefix`.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a route: a mapping with backend and host, sni or path_prefix"
)]
pub struct RawRoute {
    /// The request's host (Host field, or the target's authority), compared without port and
    /// case: `example.com` exactly, or `*.example.com` for any name ending in `.example.com`.
    #[serde(default)]
    pub host: Option<String>,
    /// The name the client asked for in the TLS handshake (SNI; listeners with `tls:` only),
    /// written like `host`.
    #[serde(default)]
    pub sni: Option<String>,
    /// A prefix of the request target's path, such as `/api/` (compared case-sensitively).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// The backend that receives the matching requests.
    pub backend: String,
}

/// A listener's `forwarded:` switches.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with x_forwarded_for, x_forwarded_proto and forwarded"
)]
pub struct RawForwarded {
    /// Append the client's address to `X-Forwarded-For` (default true).
    #[serde(default)]
    pub x_forwarded_for: Option<bool>,
    /// Set `X-Forwarded-Proto` to the listener's scheme (default true).
    #[serde(default)]
    pub x_forwarded_proto: Option<bool>,
    /// Append a `Forwarded: for=...;proto=...` element (RFC 7239; default false).
    #[serde(default)]
    pub forwarded: Option<bool>,
}

/// One header rule: exactly one of `set` (replace every field of that name), `add` (append
/// a field) or `remove` (drop every field of that name), naming the field; `value` for set and
/// add.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a header rule: a mapping with set, add or remove (and value)"
)]
pub struct RawHeaderRule {
    #[serde(default)]
    pub set: Option<String>,
    #[serde(default)]
    pub add: Option<String>,
    #[serde(default)]
    pub remove: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}
