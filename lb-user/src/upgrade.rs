//! Binary upgrades (`lb upgrade`, SIGUSR2): a new lb process replaces the running one without
//! a connection refused or lost in an accept queue.
//!
//! The running (old) process starts the new binary (`lb run -c FILE --upgrade-fd N`) with its
//! listening sockets and its admin endpoint's socket inherited (their descriptors left open
//! across exec), and a Unix socket pair to talk over: one JSON line each way. The new process
//! reads the file (as a reload would), takes the sockets whose address its listeners still
//! have (binding the others, closing the ones it has no listener for), starts, and says
//! `ready`, or why it could not start; a process that says nothing in [`READY_TIMEOUT`] is
//! killed. Only once the new one is ready does the old one stop accepting: it then finishes
//! its flows (as on SIGTERM, within `timeouts.shutdown_grace`) and exits, and a connection
//! queued on a shared socket meanwhile is accepted by the new one. If the new one fails, the
//! old one goes on as before and the command says why.
//!
//! Drawn in LIFECYCLE.md. The wiring module ([`crate::daemon`]) runs both sides.
use serde::{Deserialize, Serialize};
use std::{
    io::{self, BufRead, BufReader, Write},
    net::SocketAddr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{net::UnixStream, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    signal::unix::SignalKind,
    sync::oneshot,
};
use tokio_util::sync::CancellationToken;

use crate::{
    bpf::MapFds,
    config::Forwarding,
    forward::kernel::{MovedState, Moving},
    runtime::{Control, Requests},
    session::{MovedFlow, MovedInfo},
};

/// How long the new process has to start (read the file, load BPF, bind) and say so.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the new process waits for the old one's hand-over message.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// An upgrade asked for.
pub struct Request {
    pub by: &'static str,
    pub from: Option<String>,
    /// The binary to start (`--binary`); `None`: the one lb was started from.
    pub binary: Option<PathBuf>,
    pub answer: oneshot::Sender<Result<Upgraded, Failed>>,
}

/// An upgrade that went through: the new process serves, the old one finishes its flows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Upgraded {
    pub old_pid: u32,
    pub new_pid: u32,
    pub binary: String,
    /// From the request to the new process's `ready`, in milliseconds.
    pub milliseconds: f64,
}

/// Why an upgrade did not happen (the old process goes on as before).
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
#[error("upgrade failed, lb goes on unchanged: {error}")]
pub struct Failed {
    pub error: String,
}

impl Failed {
    fn new(error: impl Into<String>) -> Failed {
        Failed { error: error.into() }
    }
}

/// Asks for an upgrade and waits for its outcome.
pub async fn ask(
    control: &Requests,
    by: &'static str,
    from: Option<String>,
    binary: Option<PathBuf>,
) -> Result<Upgraded, Failed> {
    let (answer, outcome) = oneshot::channel();
    let stopped = || Failed::new("lb is stopping: no more upgrades");
    control
        .send(Control::Upgrade(Request {
            by,
            from,
            binary,
            answer,
        }))
        .await
        .map_err(|_| stopped())?;
    outcome.await.unwrap_or_else(|_| Err(stopped()))
}

/// Asks for an upgrade on each SIGUSR2 until `stop`.
pub fn watch(control: Requests, stop: &CancellationToken) {
    crate::shutdown::on_each(
        SignalKind::user_defined2(),
        "SIGUSR2",
        "no upgrade on it",
        stop,
        move || {
            let control = control.clone();
            // The outcome is logged and recorded where the upgrade is run.
            async move {
                let _ = ask(&control, "SIGUSR2", None, None).await;
            }
        },
    );
}

/// A listening socket handed to the new process: its listener's address (and name, for a
/// listener on port 0, which has a socket of its own) and its descriptor number there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handed {
    pub bind: SocketAddr,
    pub name: Option<String>,
    pub fd: RawFd,
}

/// A kernel flow handed to the new process: its sockets' descriptor numbers there, and its
/// state.
#[derive(Debug, Serialize, Deserialize)]
struct HandedFlow {
    client: RawFd,
    server: RawFd,
    state: MovedState,
    info: MovedInfo,
}

/// The old process's message.
#[derive(Debug, Serialize, Deserialize)]
struct Handover {
    from_pid: u32,
    listeners: Vec<Handed>,
    admin: Option<RawFd>,
    /// The program's maps, when flows are forwarded by the kernel.
    maps: Option<MapFds>,
    flows: Vec<HandedFlow>,
}

/// The new process's answer.
#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    pid: u32,
    /// `None`: ready.
    error: Option<String>,
}

/// What the old process hands over, and how to start the new one.
pub struct Launch<'a> {
    pub binary: &'a Path,
    pub config: &'a Path,
    /// `lb run --forwarding` as the old process was given it.
    pub forwarding: Option<Forwarding>,
    pub listeners: Vec<Handed>,
    pub admin: Option<RawFd>,
    pub maps: Option<MapFds>,
    /// The kernel flows, stopped for the move (this process keeps them until the new one is
    /// ready: they come back if it fails).
    pub flows: &'a [MovedFlow],
}

/// The old side: starts the new process and waits until it is ready; its pid.
pub async fn launch(launch: Launch<'_>) -> Result<u32, Failed> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| Failed::new(format!("socket pair: {e}")))?;
    let mut cmd = Command::new(launch.binary);
    cmd.arg("run")
        .arg("-c")
        .arg(launch.config)
        .arg("--upgrade-fd")
        .arg(theirs.as_raw_fd().to_string())
        .stdin(Stdio::null());
    if let Some(f) = launch.forwarding {
        use clap::ValueEnum;
        if let Some(name) = f.to_possible_value() {
            cmd.arg("--forwarding").arg(name.get_name());
        }
    }
    let mut inherited: Vec<RawFd> = launch.listeners.iter().map(|h| h.fd).collect();
    inherited.extend(launch.admin);
    inherited.extend(launch.maps.iter().flat_map(|m| m.all()));
    let flows: Vec<HandedFlow> = launch
        .flows
        .iter()
        .map(|f| HandedFlow {
            client: f.moving.client.as_raw_fd(),
            server: f.moving.server.as_raw_fd(),
            state: f.moving.state.clone(),
            info: f.info.clone(),
        })
        .collect();
    inherited.extend(flows.iter().flat_map(|f| [f.client, f.server]));
    inherited.push(theirs.as_raw_fd());
    // SAFETY: between fork and exec only fcntl, which is async-signal-safe, on descriptors
    // this process owns.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherited {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Failed::new(format!("cannot start {}: {e}", launch.binary.display())))?;
    drop(theirs);
    let handover = Handover {
        from_pid: std::process::id(),
        listeners: launch.listeners,
        admin: launch.admin,
        maps: launch.maps,
        flows,
    };
    let answer = tokio::time::timeout(READY_TIMEOUT, talk(ours, &handover)).await;
    let failure = match answer {
        Ok(Ok(Answer { pid, error: None })) => return Ok(pid),
        Ok(Ok(Answer {
            error: Some(error), ..
        })) => format!("the new process could not start: {error}"),
        Ok(Err(e)) => format!("the new process left without saying it was ready ({e})"),
        Err(_) => format!("the new process did not say it was ready within {READY_TIMEOUT:?}"),
    };
    let _ = child.kill();
    let _ = child.wait();
    Err(Failed::new(failure))
}

/// Sends the hand-over and reads the answer.
async fn talk(ours: UnixStream, handover: &Handover) -> io::Result<Answer> {
    ours.set_nonblocking(true)?;
    let mut stream = tokio::net::UnixStream::from_std(ours)?;
    let mut line = serde_json::to_vec(handover).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut reader = tokio::io::BufReader::new(stream);
    let mut answer = String::new();
    if reader.read_line(&mut answer).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let answer: Answer = serde_json::from_str(&answer).map_err(io::Error::other)?;
    if answer.error.is_none() {
        // The new process waits for this before it resumes the flows: until then they are
        // still this process's to take back.
        reader.get_mut().write_all(GO).await?;
    }
    Ok(answer)
}

/// The old process's word that the new one may go on with the moved flows.
const GO: &[u8] = b"go\n";

/// The new side: what the old process handed over.
pub struct Inherited {
    pub from_pid: u32,
    /// Listening sockets by (address, name for port 0).
    pub listeners: Vec<(SocketAddr, Option<String>, OwnedFd)>,
    pub admin: Option<OwnedFd>,
    /// The program's maps (their descriptors here), with the kernel path.
    pub maps: Option<MapFds>,
    /// The kernel flows to go on with.
    pub flows: Vec<MovedFlow>,
}

/// The new side: where it tells the old process how its start went.
pub struct Reporter {
    channel: UnixStream,
}

/// Reads the old process's hand-over from descriptor `fd` (`lb run --upgrade-fd`).
pub fn receive(fd: RawFd) -> io::Result<(Inherited, Reporter)> {
    // SAFETY: the descriptor the old process left open for us, named on our command line;
    // nothing else in this process owns it.
    let channel = unsafe { UnixStream::from_raw_fd(fd) };
    set_cloexec(fd)?;
    channel.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&channel).read_line(&mut line)?;
    let handover: Handover = serde_json::from_str(&line).map_err(io::Error::other)?;
    let own = |fd: RawFd| -> io::Result<OwnedFd> {
        set_cloexec(fd)?;
        // SAFETY: a descriptor the old process left open for us and named in its message.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let listeners = handover
        .listeners
        .into_iter()
        .map(|h| Ok((h.bind, h.name, own(h.fd)?)))
        .collect::<io::Result<Vec<_>>>()?;
    let admin = handover.admin.map(own).transpose()?;
    if let Some(maps) = &handover.maps {
        for fd in maps.all() {
            set_cloexec(fd)?;
        }
    }
    let flows = handover
        .flows
        .into_iter()
        .map(|f| {
            Ok(MovedFlow {
                moving: Moving {
                    client: std::net::TcpStream::from(own(f.client)?),
                    server: std::net::TcpStream::from(own(f.server)?),
                    state: f.state,
                },
                info: f.info,
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok((
        Inherited {
            from_pid: handover.from_pid,
            listeners,
            admin,
            maps: handover.maps,
            flows,
        },
        Reporter { channel },
    ))
}

impl Reporter {
    /// Tells the old process this one serves now, then waits for its word before the moved
    /// flows go on here (until then the old process may take them back: see [`launch`]). Whether
    /// they are this process's: the word came, or the old process is gone; not if it left the
    /// channel open without a word for [`READY_TIMEOUT`].
    pub fn ready(mut self) -> bool {
        self.send(Ok(()));
        let _ = self.channel.set_read_timeout(Some(READY_TIMEOUT));
        let mut word = String::new();
        match BufReader::new(&self.channel).read_line(&mut word) {
            Ok(_) if word.as_bytes() == GO => true,
            // The channel closed: the old process exited (it kills this one when it gives up).
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => {
                tracing::error!(
                    "upgrade: no word from the old process ({e}): the moved flows are not resumed"
                );
                false
            }
        }
    }

    /// Tells the old process why this one could not start.
    pub fn fail(mut self, why: String) {
        self.send(Err(why));
    }

    fn send(&mut self, outcome: Result<(), String>) {
        let answer = Answer {
            pid: std::process::id(),
            error: outcome.err(),
        };
        let sent = serde_json::to_vec(&answer)
            .map_err(io::Error::other)
            .and_then(|mut line| {
                line.push(b'\n');
                self.channel.write_all(&line)
            });
        if let Err(e) = sent {
            tracing::warn!("upgrade: cannot answer the old process: {e}");
        }
    }
}

/// The eBPF program and the layout of its maps this binary was built with: an upgrade moves
/// the kernel flows (maps, program and all) only to a binary with the same (`lb abi`).
pub fn abi() -> String {
    crate::bpf::abi()
}

/// Whether `binary` has this binary's [`abi`] (it answers `lb abi` within 10 s).
pub async fn same_abi(binary: &Path) -> bool {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(binary).arg("abi").output(),
    )
    .await;
    match out {
        Ok(Ok(o)) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim() == abi(),
        _ => false,
    }
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
