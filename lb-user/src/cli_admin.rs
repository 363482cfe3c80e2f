//! `lb stats`, `lb server ...` and `lb reload`: commands for a running lb, over its admin endpoint (part
//! of the `lb` binary, not of the library).
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hyper::{Method, StatusCode};
use lb::{
    admin_client::{format_stats, AdminError, Endpoint},
    config,
};
use std::{net::SocketAddr, path::PathBuf};

/// Which lb to talk to.
#[derive(Args)]
pub struct Target {
    /// The running lb's configuration file: its `admin.listen` and `admin.token` are used.
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// The admin endpoint's address (instead of, or over, the file's).
    #[arg(long, value_name = "IP:PORT", global = true)]
    admin: Option<SocketAddr>,
    /// The admin token (instead of, or over, the file's); also read from LB_ADMIN_TOKEN.
    #[arg(long, env = "LB_ADMIN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
pub enum ServerCommand {
    /// Take new flows again (from drain or maintenance).
    Enable { server: String },
    /// Maintenance: no new flows; flows already on the server continue.
    Disable { server: String },
    /// No new flows; flows already on the server continue (to empty it before maintenance).
    Drain { server: String },
    /// Set the server's weight, 0..=256 (0: no new flows).
    Weight { server: String, weight: u32 },
}

impl Target {
    fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let from_file = match &self.config {
            // Only the admin section: the rest (a certificate being replaced, say) is the
            // running lb's to judge.
            Some(path) => {
                let admin = config::load_admin(path).map_err(|e| anyhow::anyhow!("{e}"))?;
                match admin {
                    Some(a) => Some(a),
                    None => bail!(
                        "{}: no `admin:` section, so lb has no admin endpoint",
                        path.display()
                    ),
                }
            }
            None => None,
        };
        let addr = match (self.admin, &from_file) {
            (Some(a), _) => a,
            (None, Some(f)) => f.listen,
            (None, None) => bail!("say which lb: -c FILE (its admin.listen) or --admin IP:PORT"),
        };
        let token = self.token.clone().or(from_file.and_then(|f| f.token));
        Ok(Endpoint { addr, token })
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `lb stats [--json]`.
pub fn stats(target: &Target, json: bool) -> anyhow::Result<()> {
    let endpoint = target.endpoint()?;
    runtime()?.block_on(async {
        if json {
            print!("{}", endpoint.call(Method::GET, "/stats.json").await?);
        } else {
            print!("{}", format_stats(&endpoint.stats().await?));
        }
        Ok(())
    })
}

/// `lb server enable|disable|drain|weight BACKEND/SERVER`.
pub fn server(target: &Target, command: &ServerCommand) -> anyhow::Result<()> {
    let (name, action) = match command {
        ServerCommand::Enable { server } => (server, "enable".to_string()),
        ServerCommand::Disable { server } => (server, "disable".to_string()),
        ServerCommand::Drain { server } => (server, "drain".to_string()),
        ServerCommand::Weight { server, weight } => (server, format!("weight/{weight}")),
    };
    let Some((backend, server)) = name.split_once('/') else {
        bail!("`{name}`: expected BACKEND/SERVER");
    };
    let endpoint = target.endpoint()?;
    runtime()?.block_on(async {
        let path = format!("/servers/{backend}/{server}/{action}");
        let body = endpoint.call(Method::POST, &path).await?;
        let s: lb::stats::ServerStats = serde_json::from_str(&body).context("reading lb's answer")?;
        println!(
            "{}/{}: {} (weight {}, {} session(s) now)",
            config::visible(backend),
            config::visible(&s.name),
            config::visible(&s.state),
            s.weight,
            s.active
        );
        Ok(())
    })
}

/// `lb reload`: the running lb reads its configuration file again and applies it (as on
/// SIGHUP); what changed is printed, or every problem of a refused file (exit status 1).
pub fn reload(target: &Target) -> anyhow::Result<()> {
    let endpoint = target.endpoint()?;
    runtime()?.block_on(async {
        let body = match endpoint.call(Method::POST, "/reload").await {
            Ok(body) => body,
            Err(AdminError::Refused { status, body }) if status == StatusCode::UNPROCESSABLE_ENTITY => {
                let refused: lb::reload::Refused =
                    serde_json::from_str(&body).context("reading lb's answer")?;
                for e in &refused.errors {
                    eprintln!("{e}");
                }
                bail!("reload refused, nothing changed");
            }
            Err(e) => return Err(e.into()),
        };
        let r: lb::reload::Reloaded = serde_json::from_str(&body).context("reading lb's answer")?;
        println!("{}", lb::reload::said(&r));
        let list = |what: &str, c: &lb::reload::Changes| {
            for (how, names) in [
                ("added", &c.added),
                ("removed", &c.removed),
                ("changed", &c.changed),
            ] {
                if !names.is_empty() {
                    println!("  {what} {how}: {}", names.join(", "));
                }
            }
        };
        list("listeners", &r.listeners);
        list("backends", &r.backends);
        list("servers", &r.servers);
        Ok(())
    })
}

/// `lb upgrade [--binary PATH]`: a new lb process (the binary lb was started from, or PATH)
/// replaces the running one; printed once it serves, or why it did not (exit status 1; the
/// running lb goes on).
pub fn upgrade(target: &Target, binary: Option<&std::path::Path>) -> anyhow::Result<()> {
    let endpoint = target.endpoint()?;
    let body = match binary {
        // The running lb resolves a relative path from its own directory: made absolute here.
        Some(p) => std::path::absolute(p)
            .with_context(|| format!("{}", p.display()))?
            .display()
            .to_string(),
        None => String::new(),
    };
    runtime()?.block_on(async {
        // The new process has lb::upgrade::READY_TIMEOUT to start; the answer comes after.
        let limit = lb::upgrade::READY_TIMEOUT + std::time::Duration::from_secs(10);
        let answer = endpoint
            .send(Method::POST, "/upgrade", body.into(), limit)
            .await?;
        let u: lb::upgrade::Upgraded = serde_json::from_str(&answer).context("reading lb's answer")?;
        println!(
            "upgraded: pid {} ({}) serves now, in {:.0} ms; pid {} finishes its flows and exits",
            u.new_pid, u.binary, u.milliseconds, u.old_pid
        );
        Ok(())
    })
}
