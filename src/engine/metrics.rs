//! The counters in Prometheus text format ([`metrics`], also [`super::Handle::metrics_text`]):
//! what `GET /metrics` of `wsring serve` answers, and what an embedding service can serve
//! on its own route.

use std::fmt::Write as _;

use super::{Shared, WorkerStats};

/// A counter's name, help text and field.
type Counter = (
    &'static str,
    &'static str,
    fn(&WorkerStats) -> &std::sync::atomic::AtomicU64,
);

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
    let counters: [Counter; 31] = [
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
            "history_resumes",
            "Subscriptions to a topic with history that asked to resume from a position.",
            |s| &s.history_resumes,
        ),
        (
            "history_recovered",
            "Resumes that got every publication they missed (recovered: true).",
            |s| &s.history_recovered,
        ),
        (
            "history_replayed",
            "Publications replayed to resuming subscribers.",
            |s| &s.history_replayed,
        ),
        (
            "history_repaired",
            "Publications a worker's full inbox missed, taken from the history ring instead.",
            |s| &s.history_repaired,
        ),
        (
            "history_lost",
            "Publications a worker missed and could not take from the ring (no longer kept).",
            |s| &s.history_lost,
        ),
        (
            "deferred_upgrades",
            "Upgrades whose decision the application deferred.",
            |s| &s.deferred,
        ),
        (
            "handle_misses",
            "Sends and (un)subscriptions from a Handle for a connection gone (stale id) or closing.",
            |s| &s.handle_misses,
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
    if shared.config.deflate.is_some() {
        use std::sync::atomic::Ordering::Relaxed;
        let z = &crate::proto::deflate::COUNTERS;
        for (name, help, v) in [
            (
                "deflate_compressions",
                "Messages sent compressed (permessage-deflate).",
                &z.compressions,
            ),
            (
                "deflate_compressed_in_bytes",
                "Bytes of those messages before compression.",
                &z.compressed_in,
            ),
            (
                "deflate_compressed_out_bytes",
                "Bytes of those messages after compression.",
                &z.compressed_out,
            ),
            (
                "deflate_decompressions",
                "Compressed messages received and inflated.",
                &z.decompressions,
            ),
            (
                "deflate_inflated_in_bytes",
                "Bytes of those messages as received.",
                &z.inflated_in,
            ),
            (
                "deflate_inflated_out_bytes",
                "Bytes of those messages once inflated.",
                &z.inflated_out,
            ),
        ] {
            let _ = writeln!(out, "# HELP wsring_{name}_total {help}");
            let _ = writeln!(out, "# TYPE wsring_{name}_total counter");
            let _ = writeln!(out, "wsring_{name}_total {}", v.load(Relaxed));
        }
    }
    if let Some(h) = &shared.history {
        let _ = writeln!(
            out,
            "# HELP wsring_history_topics Topics with a history stream on this node."
        );
        let _ = writeln!(out, "# TYPE wsring_history_topics gauge");
        let _ = writeln!(out, "wsring_history_topics {}", h.topics());
        let _ = writeln!(
            out,
            "# HELP wsring_history_bytes Bytes of publications kept in history on this node."
        );
        let _ = writeln!(out, "# TYPE wsring_history_bytes gauge");
        let _ = writeln!(out, "wsring_history_bytes {}", h.bytes());
        use std::sync::atomic::Ordering::Relaxed;
        let _ = writeln!(
            out,
            "# HELP wsring_history_loads_total Topic streams loaded from the broker (first use, gap repairs, reconnects)."
        );
        let _ = writeln!(out, "# TYPE wsring_history_loads_total counter");
        let _ = writeln!(out, "wsring_history_loads_total {}", h.loads.load(Relaxed));
        let _ = writeln!(
            out,
            "# HELP wsring_history_broker_lost_total Publications the broker numbered that it no longer had when a load looked for them."
        );
        let _ = writeln!(out, "# TYPE wsring_history_broker_lost_total counter");
        let _ = writeln!(
            out,
            "wsring_history_broker_lost_total {}",
            h.lost.load(Relaxed)
        );
    }
    if let Some(bp) = &shared.backplane {
        broker_metrics(&mut out, bp);
    }
    let _ = writeln!(out, "# HELP wsring_uptime_seconds Seconds since start.");
    let _ = writeln!(out, "# TYPE wsring_uptime_seconds gauge");
    let _ = writeln!(
        out,
        "wsring_uptime_seconds {}",
        shared.started.elapsed().as_secs()
    );
    out
}

/// The backplane's part: the broker client's state and counters.
fn broker_metrics(out: &mut String, bp: &crate::pubsub::Backplane) {
    use std::sync::atomic::Ordering::Relaxed;
    let st = bp.stats();
    let gauge = |out: &mut String, name: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {value}");
    };
    gauge(
        out,
        "wsring_broker_state",
        "The broker client's state: 0 connecting, 1 up, 2 degraded (some shards), 3 stopped.",
        (st.state() as u8).to_string(),
    );
    gauge(
        out,
        "wsring_broker_topics",
        "Topics this node is subscribed to on the broker.",
        st.topics.load(Relaxed).to_string(),
    );
    gauge(
        out,
        "wsring_broker_resubscribe_seconds",
        "How long the last resubscription after a (re)connect took.",
        format!("{:.6}", st.resubscribe_micros.load(Relaxed) as f64 / 1e6),
    );
    let counters: [(&str, &str, &std::sync::atomic::AtomicU64); 8] = [
        (
            "wsring_broker_reconnects_total",
            "Connections to the broker re-established after the first.",
            &st.reconnects,
        ),
        (
            "wsring_broker_messages_in_total",
            "Messages from other nodes received through the broker.",
            &st.messages_in,
        ),
        (
            "wsring_broker_messages_out_total",
            "Messages published to the broker.",
            &st.messages_out,
        ),
        (
            "wsring_broker_out_failed_total",
            "Messages that could not be published to the broker (queue full or connection lost).",
            &st.out_failed,
        ),
        (
            "wsring_broker_in_dropped_total",
            "Messages from the broker not handed to a worker whose inbox was full.",
            &st.in_dropped,
        ),
        (
            "wsring_broker_own_skipped_total",
            "This node's own messages echoed back by the broker and skipped.",
            &st.own_skipped,
        ),
        (
            "wsring_broker_decode_errors_total",
            "Broker payloads without a valid wsring header.",
            &st.decode_errors,
        ),
        (
            "wsring_broker_probes_failed_total",
            "Idle probes that did not come back in time (the subscription was rebuilt).",
            &st.probes_failed,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} counter");
        let _ = writeln!(out, "{name} {}", v.load(Relaxed));
    }
}
