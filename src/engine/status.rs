//! The plain-HTTP pages `wsring serve` answers: `GET /` (status and a browser demo that
//! joins `/pubsub/demo`) and `GET /metrics` (Prometheus text format).

use std::fmt::Write as _;

use super::{Shared, WorkerStats};

/// A counter's name, help text and field.
type Counter = (
    &'static str,
    &'static str,
    fn(&WorkerStats) -> &std::sync::atomic::AtomicU64,
);

/// The status page: counters, uptime and a small demo client.
pub fn page(shared: &Shared) -> String {
    let up = shared.started.elapsed().as_secs();
    let open = shared.open.load(std::sync::atomic::Ordering::Relaxed);
    let msgs_in = shared.total(|s| &s.messages_in);
    let msgs_out = shared.total(|s| &s.messages_out);
    let accepted = shared.total(|s| &s.accepted);
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>wsring</title>
<style>body{{font-family:system-ui,sans-serif;max-width:44em;margin:2em auto}}#log{{height:14em;overflow:auto;border:1px solid #ccc;padding:.5em;font-family:monospace}}td{{padding:0 1em}}</style>
</head><body>
<h1>wsring</h1>
<table>
<tr><td>backend</td><td>{backend}, {threads} worker(s)</td></tr>
<tr><td>connections open</td><td id="open">{open}</td></tr>
<tr><td>accepted</td><td id="accepted">{accepted}</td></tr>
<tr><td>messages in / out</td><td><span id="in">{msgs_in}</span> / <span id="out">{msgs_out}</span></td></tr>
<tr><td>uptime</td><td><span id="up">{up}</span> s</td></tr>
</table>
<p><small>The counters refresh every 2 s from <code>/metrics</code>.</small></p>
<p>Endpoints: <code>/echo</code>, <code>/pubsub/&lt;topic&gt;</code>, <code>/metrics</code>.</p>
<h2>Demo: topic <code>demo</code></h2>
<div id="log"></div>
<form id="f"><input id="m" size="40" placeholder="say something to everyone on /pubsub/demo"> <button>send</button></form>
<script>
const log = document.getElementById('log');
const add = t => {{ const d = document.createElement('div'); d.textContent = t; log.appendChild(d); log.scrollTop = log.scrollHeight; }};
const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/pubsub/demo');
ws.onopen = () => add('joined /pubsub/demo');
ws.onmessage = e => add('> ' + e.data);
ws.onclose = e => add('closed: ' + e.code + ' ' + e.reason);
document.getElementById('f').onsubmit = e => {{ e.preventDefault(); const m = document.getElementById('m'); if (m.value) ws.send(m.value); m.value = ''; }};
const show = {{ wsring_connections_open: 'open', wsring_accepted_total: 'accepted', wsring_messages_in_total: 'in', wsring_messages_out_total: 'out', wsring_uptime_seconds: 'up' }};
setInterval(() => fetch('/metrics').then(r => r.text()).then(text => {{
  for (const line of text.split('\n')) {{
    const [name, value] = line.split(' ');
    if (show[name]) document.getElementById(show[name]).textContent = value;
  }}
}}).catch(() => {{}}), 2000);
</script>
</body></html>
"#,
        backend = shared.backend,
        threads = shared.stats.len(),
    )
}

/// Prometheus text exposition of the counters.
pub fn metrics(shared: &Shared) -> String {
    let mut out = String::new();
    let open = shared.open.load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP wsring_connections_open Upgraded connections open now."
    );
    let _ = writeln!(out, "# TYPE wsring_connections_open gauge");
    let _ = writeln!(out, "wsring_connections_open {open}");
    let sockets = shared.sockets.load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP wsring_sockets_open Sockets held now in any phase (handshake, open, closing)."
    );
    let _ = writeln!(out, "# TYPE wsring_sockets_open gauge");
    let _ = writeln!(out, "wsring_sockets_open {sockets}");
    let counters: [Counter; 24] = [
        ("accepted", "Sockets accepted.", |s| &s.accepted),
        ("upgraded", "WebSocket upgrades completed.", |s| &s.upgraded),
        ("rejected", "Handshakes refused with an HTTP error.", |s| {
            &s.rejected
        }),
        (
            "rejected_full",
            "Upgrades refused with 503 at the connection cap.",
            |s| &s.rejected_full,
        ),
        ("http_requests", "Plain HTTP requests answered.", |s| {
            &s.http_requests
        }),
        ("closed", "Sockets closed.", |s| &s.closed),
        ("messages_in", "Messages received.", |s| &s.messages_in),
        (
            "messages_out",
            "Messages sent, pub/sub deliveries included.",
            |s| &s.messages_out,
        ),
        ("bytes_in", "Bytes read.", |s| &s.bytes_in),
        ("bytes_out", "Bytes written.", |s| &s.bytes_out),
        (
            "sends",
            "Write operations issued (messages_out / sends: frames per write).",
            |s| &s.sends,
        ),
        ("turns", "Event-loop turns.", |s| &s.turns),
        (
            "reassembly_pauses",
            "Connections paused because the reassembly budget was spent.",
            |s| &s.reassembly_pauses,
        ),
        ("publishes", "Publishes (handlers and Handle).", |s| {
            &s.publishes
        }),
        (
            "dropped_frames",
            "Frames dropped by the drop policy.",
            |s| &s.dropped,
        ),
        (
            "conflated_frames",
            "Frames replaced by a newer one of their topic.",
            |s| &s.conflated,
        ),
        (
            "backpressure_closes",
            "Connections closed with 1013 by the close policy.",
            |s| &s.backpressure_closes,
        ),
        (
            "protocol_errors",
            "Connections failed for a protocol error.",
            |s| &s.protocol_errors,
        ),
        (
            "queue_pauses",
            "Connections not read while their send queue was past the hard limit.",
            |s| &s.queue_pauses,
        ),
        (
            "send_timeouts",
            "Connections dropped because queued bytes made no progress for the send timeout.",
            |s| &s.send_timeouts,
        ),
        (
            "message_timeouts",
            "Connections closed with 1008: a message was not complete within the message timeout.",
            |s| &s.message_timeouts,
        ),
        (
            "forward_dropped",
            "Cross-worker publishes not handed over: the worker's inbox was full.",
            |s| &s.forward_dropped,
        ),
        (
            "refused_sockets",
            "Sockets answered 503 at accept: the socket limit (connections plus handshakes) was reached.",
            |s| &s.refused_sockets,
        ),
        (
            "accept_errors",
            "Failed accepts (EMFILE, ENFILE, ENOBUFS...); accepting pauses on resource errors.",
            |s| &s.accept_errors,
        ),
    ];
    for (name, help, f) in counters {
        let _ = writeln!(out, "# HELP wsring_{name}_total {help}");
        let _ = writeln!(out, "# TYPE wsring_{name}_total counter");
        let _ = writeln!(out, "wsring_{name}_total {}", shared.total(f));
    }
    for (name, help, pick) in [
        ("close_codes_sent", "Close frames sent, by code.", 0),
        ("close_codes_received", "Close frames received, by code.", 1),
    ] {
        let _ = writeln!(out, "# HELP wsring_{name}_total {help}");
        let _ = writeln!(out, "# TYPE wsring_{name}_total counter");
        for i in 0..17 {
            let n: u64 = shared
                .stats
                .iter()
                .map(|s| {
                    let arr = if pick == 0 {
                        &s.close_codes_sent
                    } else {
                        &s.close_codes_received
                    };
                    arr[i].load(std::sync::atomic::Ordering::Relaxed)
                })
                .sum();
            if n > 0 {
                let code = if i < 16 {
                    (1000 + i).to_string()
                } else {
                    "other".into()
                };
                let _ = writeln!(out, "wsring_{name}_total{{code=\"{code}\"}} {n}");
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP wsring_topics Topics with at least one subscriber."
    );
    let _ = writeln!(out, "# TYPE wsring_topics gauge");
    let _ = writeln!(out, "wsring_topics {}", shared.directory.topics());
    let _ = writeln!(out, "# HELP wsring_uptime_seconds Seconds since start.");
    let _ = writeln!(out, "# TYPE wsring_uptime_seconds gauge");
    let _ = writeln!(
        out,
        "wsring_uptime_seconds {}",
        shared.started.elapsed().as_secs()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_page_refreshes_counters_that_metrics_reports() {
        let shared = Shared::detached(crate::engine::EngineConfig::default()).expect("shared");
        let page = page(&shared);
        let metrics = metrics(&shared);
        for name in [
            "wsring_connections_open",
            "wsring_accepted_total",
            "wsring_messages_in_total",
            "wsring_messages_out_total",
            "wsring_uptime_seconds",
        ] {
            assert!(page.contains(name), "the page does not refresh {name}");
            assert!(
                metrics.lines().any(|l| l.starts_with(&format!("{name} "))),
                "/metrics has no {name}"
            );
        }
        assert!(page.contains("setInterval(() => fetch('/metrics')"));
    }
}
