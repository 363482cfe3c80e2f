//! `cargo xtask bench reload`, second part: the time from `lb upgrade` to the old process's
//! exit, with thousands of kernel flows moved.
//!
//! In a fresh namespace: a backend that echoes and holds every connection (`bench-hold`), lb
//! handing every flow to the kernel at once, and a client (`bench-idle-client`) holding N
//! connections, each having carried one byte both ways (as in `bench idle`). Then `lb upgrade`
//! is run several times in a row, each new process replacing the last; for each: the command's
//! time (to the new process's `ready`), the old process's exit, and the flows the new one says
//! moved in. The hard open-files limit here (20,000 a process) bounds N: two sockets a flow.
use super::{
    configs::Env,
    idle::raise_nofile,
    sys::{self, Netns, Proc},
};
use anyhow::{bail, Context, Result};
use std::{
    fs,
    process::Stdio,
    time::{Duration, Instant},
};

const BACKEND_PORT: u16 = 7201;
const PROXY_PORT: u16 = 17201;
const ADMIN_PORT: u16 = 18201;

/// One upgrade, in milliseconds.
pub struct UpgradeRun {
    /// `lb upgrade`: from the command's start to its answer (the new process ready).
    pub ready: f64,
    /// From the command's start to the old process's exit.
    pub exit: f64,
    /// Kernel flows the new process says moved in.
    pub moved: u64,
}

/// Runs `upgrades` upgrades in a row with `flows` kernel flows held.
pub fn measure(env: &Env, flows: u64, upgrades: usize) -> Result<Vec<UpgradeRun>> {
    let lb_path = env
        .lb
        .as_ref()
        .map_err(|e| anyhow::anyhow!("lb did not build: {e}"))?;
    let lb_bin = lb_path.to_string_lossy().to_string();
    let ns = Netns::create(format!("lbbench-{}-upgrade", std::process::id()))?;
    let mut holder = ns.command(&env.helper.to_string_lossy());
    holder
        .args([
            "bench-hold",
            "--port",
            &BACKEND_PORT.to_string(),
            "--lifetime",
            "900",
        ])
        .stdout(Stdio::null());
    raise_nofile(&mut holder);
    let mut holder = Proc::spawn("hold server", holder)?;
    holder.wait_listening(BACKEND_PORT)?;
    let conf = env.dir.join("upgrade.yaml");
    fs::write(
        &conf,
        format!(
            "forwarding: {{ mode: kernel, offload_after: 0 }}
tune: {{ upgrade_moves_kernel_flows: true }}
admin: {{ listen: 127.0.0.1:{ADMIN_PORT} }}
timeouts: {{ client: 10m, server: 10m }}
listeners:
  - {{ name: held, bind: 127.0.0.1:{PROXY_PORT}, backend: b, maxconn: {max} }}
backends:
  - name: b
    servers: [ {{ name: s, address: 127.0.0.1:{BACKEND_PORT} }} ]
",
            max = flows + 100
        ),
    )?;
    let log = fs::File::create(env.dir.join("upgrade-lb.log"))?;
    let mut cmd = ns.command(&lb_bin);
    cmd.args(["run", "-c"])
        .arg(&conf)
        .env("RUST_LOG", "warn,lb::daemon=info")
        .stdout(Stdio::null())
        .stderr(log);
    raise_nofile(&mut cmd);
    let mut first = Proc::spawn("lb", cmd)?;
    first.wait_listening(PROXY_PORT)?;
    first.wait_listening(ADMIN_PORT)?;
    // Every process an upgrade starts, to stop at the end (they are not our children).
    let mut started: Vec<u32> = Vec::new();
    let result = run(env, &ns, &lb_bin, &mut first, flows, upgrades, &mut started);
    for pid in started {
        // SAFETY: kill(2) of a pid an upgrade in this benchmark started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    first.stop();
    holder.stop();
    result
}

fn run(
    env: &Env,
    ns: &Netns,
    lb: &str,
    first: &mut Proc,
    flows: u64,
    upgrades: usize,
    started: &mut Vec<u32>,
) -> Result<Vec<UpgradeRun>> {
    let out_path = env.dir.join("upgrade-client.txt");
    let mut client = ns.command(&env.helper.to_string_lossy());
    client
        .args([
            "bench-idle-client",
            "--port",
            &PROXY_PORT.to_string(),
            "--admin-port",
        ])
        .arg(ADMIN_PORT.to_string())
        .arg("--count")
        .arg(flows.to_string())
        .arg("--hold")
        .arg("600")
        .stdout(fs::File::create(&out_path)?);
    raise_nofile(&mut client);
    let mut client = Proc::spawn("idle client", client)?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let text = loop {
        let text = fs::read_to_string(&out_path).unwrap_or_default();
        if text.contains("kernel_flows=") {
            break text;
        }
        if let Some(status) = client.exited() {
            bail!("the client exited ({status}) before holding its connections: {text}");
        }
        if Instant::now() >= deadline {
            bail!("the client did not open its connections within 180 s: {text}");
        }
        sys::sleep(Duration::from_millis(100))?;
    };
    eprintln!("xtask bench: {}", text.trim());
    let admin = format!("127.0.0.1:{ADMIN_PORT}");
    let mut runs = Vec::new();
    let mut old = first.pid();
    for u in 0..upgrades {
        sys::check_interrupt()?;
        let t0 = Instant::now();
        let out = ns
            .command(lb)
            .args(["upgrade", "--admin", &admin])
            .output()
            .context("running lb upgrade")?;
        let ready = t0.elapsed().as_secs_f64() * 1000.0;
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            bail!(
                "upgrade {u} failed: {said}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let new: u32 = said
            .strip_prefix("upgraded: pid ")
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no pid in: {said}"))?;
        started.push(new);
        // The old process's exit (the first is our child: reaped by `exited`).
        let exit_deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let gone = if u == 0 {
                first.exited().is_some()
            } else {
                !alive(old)
            };
            if gone {
                break;
            }
            if Instant::now() >= exit_deadline {
                bail!("upgrade {u}: the old process {old} did not exit within 60 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let exit = t0.elapsed().as_secs_f64() * 1000.0;
        let stats = ns
            .command(lb)
            .args(["stats", "--json", "--admin", &admin])
            .output()
            .context("running lb stats")?;
        let v: serde_json::Value =
            serde_json::from_slice(&stats.stdout).context("reading lb stats --json")?;
        let detail = v["process"]["last_upgrade"]["detail"]
            .as_str()
            .unwrap_or_default();
        let moved = detail
            .split(", ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no moved flows in {detail:?}"))?;
        eprintln!(
            "xtask bench: upgrade {u}: ready {ready:.0} ms, old exited {exit:.0} ms, {moved} flows moved"
        );
        runs.push(UpgradeRun { ready, exit, moved });
        old = new;
    }
    client.stop();
    Ok(runs)
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}
