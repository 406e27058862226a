//! `GET /` of `wsring serve`: a status page (backend, counters, uptime, refreshed every
//! 2 s from `/metrics`) with a browser demo that joins `/pubsub/demo`.

use crate::engine::Shared;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::metrics::metrics;

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
