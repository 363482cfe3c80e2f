//! Operating-system plumbing for the benchmark: network namespaces and child processes that are
//! always cleaned up (guards with `Drop`), CPU counters from /proc, and Ctrl-C handling.
//!
//! Every wait here is bounded in time, and every loop checks [`interrupted`] so that a Ctrl-C
//! unwinds through the guards instead of leaving namespaces and servers behind.
use anyhow::{bail, Context, Result};
use std::{
    fs,
    os::unix::process::CommandExt,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: anything else is not async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT and SIGTERM into a flag the benchmark loops poll, so that guards run on Ctrl-C.
/// The handler resets itself: a second Ctrl-C kills at once.
pub fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: sigaction with a zeroed struct, an empty mask and a handler that only stores
        // to an atomic is the documented way to install a signal handler.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Whether the user asked to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails when the user asked to stop, so that `?` unwinds through the guards.
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps in small steps, returning early with an error on Ctrl-C.
pub fn sleep(total: Duration) -> Result<()> {
    let end = Instant::now() + total;
    loop {
        check_interrupt()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// A network namespace with loopback up, deleted on drop.
///
/// Each configuration gets a fresh one: proxied connections leave TIME_WAIT sockets behind that
/// made later connection-rate runs swing by 2× when they shared a namespace.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: String) -> Result<Netns> {
        crate::run_cmd(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        let ns = Netns { name };
        crate::run_cmd(ns.command("ip").args(["link", "set", "lo", "up"]))
            .with_context(|| format!("bringing loopback up in {}", ns.name))?;
        Ok(ns)
    }

    /// A command that runs `program` inside the namespace. `ip netns exec` execs the program
    /// (no fork), so the child's pid is the program's: its /proc entries are the ones we want.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Deletes `lbbench-<pid>-…` namespaces left by a benchmark process that no longer exists
/// (killed with SIGKILL, so its guards never ran).
pub fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("lbbench-") else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    what: String,
    child: Child,
    done: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` in its own process group (so Ctrl-C reaches only us, and we stop it in
    /// order) and with a parent-death signal (so it cannot outlive a SIGKILLed benchmark).
    pub fn spawn(what: &str, mut cmd: Command) -> Result<Proc> {
        cmd.stdin(Stdio::null()).process_group(0);
        // The death signal follows the spawning *thread*: every spawn happens on the main thread,
        // which lives as long as the benchmark.
        // SAFETY: prctl is a plain syscall, async-signal-safe, and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {what}: {cmd:?}"))?;
        Ok(Proc {
            what: what.to_string(),
            child,
            done: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.done.is_none() {
            self.done = self.child.try_wait().ok().flatten();
        }
        self.done
    }

    /// Waits for the process to end by itself, at most `limit`; kills it past that.
    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            check_interrupt()?;
            if Instant::now() >= end {
                self.stop();
                bail!("{} did not finish within {limit:?}", self.what);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, up to 5 s for a clean exit, then SIGKILL.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the pid of our own unreaped child: it cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if self.exited().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.done = self.child.wait().ok();
    }

    /// Waits until the process (inside its own namespace) has a TCP socket listening on `port`,
    /// at most 100 × 50 ms. Reading /proc/PID/net/tcp* shows the process's namespace and, unlike
    /// a probe connection, does not hand the backend a bogus client.
    pub fn wait_listening(&mut self, port: u16) -> Result<()> {
        for _ in 0..100 {
            if let Some(status) = self.exited() {
                bail!("{} exited ({status}) before listening on port {port}", self.what);
            }
            if listening(self.pid(), port) {
                return Ok(());
            }
            sleep(Duration::from_millis(50))?;
        }
        bail!("{} is not listening on port {port} after 5 s", self.what)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn listening(pid: u32, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|file| {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        text.lines().skip(1).any(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1).unwrap_or("");
            let state = fields.nth(1).unwrap_or("");
            // State 0A is LISTEN; the local address ends with the port in hex.
            state == "0A"
                && local
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
    })
}

/// Clock ticks per second of the /proc CPU counters.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds of a process and all its threads (fields 14 and 15 of
/// /proc/PID/stat).
pub fn process_cpu(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may contain spaces: count fields after its closing ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3, so field N is fields[N - 3].
    let tick = |n: usize| -> Result<f64> {
        let field = fields
            .get(n - 3)
            .with_context(|| format!("{path} has no field {n}"))?;
        field
            .parse::<f64>()
            .with_context(|| format!("{path} field {n}: {field}"))
    };
    Ok((tick(14)? + tick(15)?) / clock_ticks())
}

/// CPU seconds of a process's live threads, to the nanosecond (the first field of each
/// /proc/PID/task/TID/schedstat): the 10 ms ticks of /proc/PID/stat are too coarse for a
/// process that forwards a gigabyte with a few tens of milliseconds of work. Threads that
/// exited are not counted (lb's threads live as long as lb).
pub fn process_cpu_precise(pid: u32) -> Result<f64> {
    let dir = format!("/proc/{pid}/task");
    let mut ns = 0u64;
    for task in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        ns += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("malformed {}", path.display()))?;
    }
    Ok(ns as f64 / 1e9)
}

/// Busy CPU seconds of the whole machine since boot, from the first line of /proc/stat: user,
/// nice, system, irq, softirq and steal (idle and iowait excluded). Forwarding in the kernel
/// shows up in system and softirq time of any process or kernel worker, which per-process
/// counters miss.
pub fn machine_cpu() -> Result<f64> {
    let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text.lines().next().context("/proc/stat is empty")?;
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .collect();
    if values.len() < 8 {
        bail!("unexpected /proc/stat line: {line}");
    }
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    let busy = values[0] + values[1] + values[2] + values[5] + values[6] + values[7];
    Ok(busy / clock_ticks())
}

/// CPU counters at one instant, to subtract from a later reading.
#[derive(Clone, Copy)]
pub struct CpuMark {
    proxy: Option<f64>,
    machine: f64,
}

impl CpuMark {
    /// Reads the proxy's (if any) and the machine's counters.
    pub fn now(proxy_pid: Option<u32>) -> Result<CpuMark> {
        let proxy = proxy_pid.map(process_cpu).transpose()?;
        Ok(CpuMark {
            proxy,
            machine: machine_cpu()?,
        })
    }

    /// (proxy CPU-s, machine CPU-s) spent since `self`.
    pub fn since(&self, proxy_pid: Option<u32>) -> Result<(Option<f64>, f64)> {
        let later = CpuMark::now(proxy_pid)?;
        let proxy = match (self.proxy, later.proxy) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        Ok((proxy, later.machine - self.machine))
    }
}

/// A scratch directory removed on drop.
pub struct TempDir {
    pub path: std::path::PathBuf,
    /// Left in place when dropped (`bench --keep`).
    pub keep: bool,
}

impl TempDir {
    pub fn create() -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("lb-bench-{}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}
