//! The stats page (`GET /stats` on the admin endpoint), in the spirit of HAProxy's: the
//! listeners, then one table per backend with a row per server, the state coloured, bytes split
//! between the kernel and userspace. It refreshes itself every few seconds; `/stats.json` has
//! the same data.
use std::fmt::Write;

use crate::stats::{BackendStats, ServerStats, Stats};

/// Seconds between the page's own refreshes.
const REFRESH: u32 = 5;

const STYLE: &str = "body{font-family:sans-serif;margin:1em;background:#fafafa}\
table{border-collapse:collapse;margin-bottom:1.5em;min-width:60em}\
th,td{border:1px solid #bbb;padding:2px 8px;text-align:right}\
th{background:#335;color:#fff}td.name,th.name{text-align:left}\
caption{text-align:left;font-weight:bold;font-size:1.1em;padding:4px 0}\
tr.UP td{background:#c0f0c0}tr.DOWN td{background:#f8b0b0}\
tr.DRAIN td{background:#a0c8f8}tr.MAINT td{background:#c8a0f0}\
tr.total td{background:#e8e8e8;font-weight:bold}";

/// The page for `stats`.
pub fn render(stats: &Stats) -> String {
    let mut h = String::with_capacity(8192);
    let _ = write!(
        h,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{REFRESH}\">\
         <title>lb stats</title><style>{STYLE}</style></head><body>\
         <h1>lb {} statistics</h1><p>Established flows are forwarded by the <b>{}</b>. \
         Refreshes every {REFRESH} s; the same data: <a href=\"/stats.json\">/stats.json</a>, \
         <a href=\"/metrics\">/metrics</a>.</p>",
        escape(&stats.version),
        if stats.forwarding == "kernel" { "kernel (sockmap)" } else { "userspace" },
    );
    if let Some(p) = &stats.process {
        let _ = write!(
            h,
            "<p id=\"process\">{}</p>",
            escape(&crate::stats::process_line(p))
        );
    }
    h.push_str(
        "<table id=\"listeners\"><caption>Listeners</caption><tr><th class=\"name\">listener</th>\
         <th>bind</th><th>mode</th><th class=\"name\">backend</th><th>connections now</th><th>total</th></tr>",
    );
    for l in &stats.listeners {
        let _ = write!(
            h,
            "<tr><td class=\"name\">{}</td><td>{}</td><td>{}</td><td class=\"name\">{}</td><td>{}</td><td>{}</td></tr>",
            escape(&l.name),
            escape(&l.bind),
            l.mode,
            escape(&l.backend),
            l.active,
            l.total
        );
    }
    h.push_str("</table>");
    if let Some(tls) = &stats.tls_forwarding {
        let _ = write!(
            h,
            "<p id=\"tls\">Flows with a TLS side are forwarded by {}.</p>",
            escape(tls)
        );
    }
    for l in &stats.listeners {
        let Some(tls) = &l.tls else { continue };
        let _ = write!(
            h,
            "<p class=\"tls\" data-listener=\"{}\">TLS on {}: {} handshakes, {} failed. Certificates: ",
            escape(&l.name),
            escape(&l.name),
            tls.handshakes,
            tls.failed
        );
        for (i, c) in tls.certificates.iter().enumerate() {
            let sep = if i > 0 { "; " } else { "" };
            let _ = write!(
                h,
                "{sep}{} until {}",
                escape(&c.names.join(", ")),
                escape(&c.not_after)
            );
        }
        h.push_str("</p>");
    }
    for b in &stats.backends {
        backend(&mut h, b);
    }
    h.push_str("</body></html>\n");
    h
}

fn backend(h: &mut String, b: &BackendStats) {
    let _ = write!(
        h,
        "<table class=\"backend\" data-backend=\"{0}\"><caption>Backend {0} ({1}; queue {2}, retries {3}, unserved {4})</caption>\
         <tr><th class=\"name\">server</th><th>address</th><th>state</th><th class=\"name\">last check</th>\
         <th>weight</th><th>sessions</th><th>maxconn</th><th>total</th><th>connect errors</th>\
         <th>check failures</th><th>bytes, kernel</th><th>bytes, userspace</th></tr>",
        escape(&b.name),
        b.balance,
        b.queue,
        b.retries,
        b.unserved
    );
    for s in &b.servers {
        server_row(h, s);
    }
    let sum = |f: fn(&ServerStats) -> u64| b.servers.iter().map(f).sum::<u64>();
    let _ = write!(
        h,
        "<tr class=\"total\"><td class=\"name\">total</td><td></td><td></td><td></td><td></td><td>{}</td><td></td>\
         <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
        sum(|s| u64::from(s.active)),
        sum(|s| s.total),
        sum(|s| s.connect_errors),
        sum(|s| s.check_failures),
        bytes(sum(|s| s.bytes_kernel)),
        bytes(sum(|s| s.bytes_user)),
    );
}

fn server_row(h: &mut String, s: &ServerStats) {
    let _ = write!(
        h,
        "<tr class=\"{state}\" data-server=\"{name}\"><td class=\"name\">{name}</td><td>{}</td><td class=\"state\">{state}</td>\
         <td class=\"name\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        escape(&s.address),
        escape(&s.check),
        s.weight,
        s.active,
        s.maxconn.map_or("-".to_string(), |m| m.to_string()),
        s.total,
        s.connect_errors,
        s.check_failures,
        bytes(s.bytes_kernel),
        bytes(s.bytes_user),
        state = s.state,
        name = escape(&s.name),
    );
}

/// A byte count as people read it (`1.5 MiB`).
fn bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

/// Text for HTML (names come from the configuration file, a check result from a server).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::ListenerStats;

    #[test]
    fn one_table_per_backend_and_a_coloured_row_per_server() {
        let server = |name: &str, state: &str| ServerStats {
            name: name.into(),
            address: "10.0.0.1:80".into(),
            state: state.into(),
            check: "connect: <refused>".into(),
            weight: 1,
            maxconn: None,
            active: 2,
            total: 7,
            connect_errors: 0,
            check_failures: 1,
            bytes_kernel: 3 << 20,
            bytes_user: 512,
        };
        let stats = Stats {
            version: "0.1.0".into(),
            process: None,
            forwarding: "kernel".into(),
            tls_forwarding: None,
            listeners: vec![ListenerStats {
                name: "web".into(),
                bind: "0.0.0.0:80".into(),
                mode: "http".into(),
                backend: "app".into(),
                active: 1,
                total: 9,
                tls: None,
            }],
            backends: vec![
                BackendStats {
                    name: "app".into(),
                    balance: "roundrobin".into(),
                    queue: 0,
                    retries: 0,
                    unserved: 0,
                    servers: vec![server("a1", "UP"), server("a2", "DOWN")],
                },
                BackendStats {
                    name: "db".into(),
                    balance: "leastconn".into(),
                    queue: 0,
                    retries: 0,
                    unserved: 0,
                    servers: vec![server("d1", "DRAIN")],
                },
            ],
        };
        let page = render(&stats);
        assert_eq!(page.matches("<table class=\"backend\"").count(), 2);
        // Names are text too, in cells and in attributes.
        let mut odd = stats;
        odd.backends[0].servers[0].name = "a\"><script>".into();
        let oddpage = render(&odd);
        assert!(
            oddpage.contains(
                "data-server=\"a&quot;&gt;&lt;script&gt;\"><td class=\"name\">a&quot;&gt;&lt;script&gt;</td>"
            ),
            "{oddpage}"
        );
        assert!(!oddpage.contains("<script>"));
        assert!(page.contains("<tr class=\"DOWN\" data-server=\"a2\">"));
        assert!(page.contains("<tr class=\"DRAIN\" data-server=\"d1\">"));
        assert!(page.contains("3.0 MiB"), "{page}");
        // A server's words are text, not markup.
        assert!(page.contains("connect: &lt;refused&gt;"));
        assert!(page.contains("http-equiv=\"refresh\""));
    }
}
