//! Embedding wsring in an async service (issue 17), against an in-process server on
//! 127.0.0.1 driven by tokio-tungstenite and a raw TCP client, on both backends: deferred
//! upgrades decided from another thread, the non-blocking and the async publish, sends and
//! (un)subscriptions of one connection through the `Handle` (generation-checked), and
//! per-connection application timers.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use futures_util::StreamExt as _;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use wsring::api::{
    Accept, Conn, Decision, Deferred, GlobalConnId, Gone, Handler, Message, Reject, TryError,
};
use wsring::engine::{BackendChoice, EngineConfig, Handle, Server};
use wsring::proto::OpCode;
use wsring::proto::handshake::{Request, Upgrade};

// ---- the application under test ----

#[derive(Default)]
struct State {
    /// Ids seen in `on_open`, in order.
    opened: Mutex<Vec<GlobalConnId>>,
    closed: AtomicUsize,
    /// Tokens of deferred upgrades, for the test to decide.
    tokens: Mutex<Vec<Deferred<String>>>,
    timers_fired: AtomicUsize,
    /// `true` while a handler holds its worker ("block").
    blocked: AtomicBool,
    /// Opened by the test to let a blocked worker go.
    gate: Mutex<bool>,
    gate_cv: Condvar,
}

/// Routes: `/sub/<topic>` subscribes; `/defer` defers its decision (the token goes to
/// `State::tokens`); `/timer?ms=N` sets an N ms timer in `on_open` (its `on_timer` sends
/// "timer"); anything else is accepted plainly. Messages: "cancel" cancels the timer,
/// "rearm N" sets it again, "block" holds the worker until the test opens the gate.
#[derive(Clone, Default)]
struct App {
    state: Arc<State>,
}

impl Handler for App {
    type Data = String;

    fn on_upgrade(&mut self, request: &Request, _upgrade: &Upgrade) -> Decision<String> {
        if let Some(topic) = request.path.strip_prefix("/sub/") {
            return Decision::Accept(Accept::new(String::new()).subscribe(topic));
        }
        match request.path.as_str() {
            "/defer" => {
                let state = self.state.clone();
                Decision::defer(move |token| state.tokens.lock().unwrap().push(token))
            }
            "/timer" => Decision::Accept(Accept::new(
                request.query_param("ms").unwrap_or("100").to_string(),
            )),
            _ => Decision::Accept(Accept::new(String::new())),
        }
    }

    fn on_open(&mut self, conn: &mut Conn<'_, String>) {
        self.state.opened.lock().unwrap().push(conn.global_id());
        if let Some(ms) = conn.data().and_then(|d| d.parse::<u64>().ok()) {
            conn.set_timer(Duration::from_millis(ms));
        }
    }

    fn on_message(&mut self, conn: &mut Conn<'_, String>, message: Message) {
        match message.text() {
            Some("cancel") => {
                conn.cancel_timer();
                conn.send_text("cancelled");
            }
            Some(t) if t.starts_with("rearm ") => {
                let ms = t["rearm ".len()..].parse().unwrap_or(100);
                conn.set_timer(Duration::from_millis(ms));
                conn.send_text("rearmed");
            }
            Some(t) if conn.data().is_some_and(|d| d == "echo") => {
                let t = t.to_string();
                conn.send_text(&t);
            }
            Some("block") => {
                self.state.blocked.store(true, Ordering::SeqCst);
                let open = self.state.gate.lock().unwrap();
                // Bounded, so that a failing test cannot hold the worker forever.
                let _ =
                    self.state
                        .gate_cv
                        .wait_timeout_while(open, Duration::from_secs(30), |open| !*open);
                self.state.blocked.store(false, Ordering::SeqCst);
                conn.send_text("unblocked");
            }
            _ => {}
        }
    }

    fn on_timer(&mut self, conn: &mut Conn<'_, String>) {
        self.state.timers_fired.fetch_add(1, Ordering::SeqCst);
        conn.send_text("timer");
    }

    fn on_close(&mut self, _conn: &mut Conn<'_, String>, _code: CloseCode, _reason: &str) {
        self.state.closed.fetch_add(1, Ordering::SeqCst);
    }
}

use wsring::proto::CloseCode;

struct Running {
    server: Option<Server>,
    handle: Handle,
    addr: std::net::SocketAddr,
    state: Arc<State>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // A test that failed with the worker blocked must not hang the join.
        *self.state.gate.lock().unwrap() = true;
        self.state.gate_cv.notify_all();
        if let Some(server) = self.server.take() {
            server.handle().abort();
            server.join();
        }
    }
}

fn start(backend: BackendChoice, configure: impl FnOnce(&mut EngineConfig)) -> Running {
    let mut config = EngineConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads: 1,
        backend,
        pin_threads: false,
        ..EngineConfig::default()
    };
    configure(&mut config);
    let app = App::default();
    let state = app.state.clone();
    let server = Server::start(config, move |_| app.clone())
        .unwrap_or_else(|e| panic!("{backend:?} server must start: {e}"));
    Running {
        handle: server.handle(),
        addr: server.local_addr(),
        server: Some(server),
        state,
    }
}

impl Running {
    /// Waits for the next deferred upgrade's token.
    async fn token(&self) -> Deferred<String> {
        eventually(WAIT, "a deferred upgrade", || {
            !self.state.tokens.lock().unwrap().is_empty()
        })
        .await;
        self.state.tokens.lock().unwrap().remove(0)
    }

    /// Waits for the `n`th connection to open and returns its id.
    async fn opened(&self, n: usize) -> GlobalConnId {
        eventually(WAIT, "the connection opens", || {
            self.state.opened.lock().unwrap().len() >= n
        })
        .await;
        self.state.opened.lock().unwrap()[n - 1]
    }

    fn metric(&self, name: &str) -> u64 {
        let text = self.handle.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("wsring_{name}_total ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }
}

/// The next text message, or `None` if nothing arrives within `limit`.
async fn text_within(ws: &mut Ws, limit: Duration) -> Option<String> {
    loop {
        match tokio::time::timeout(limit, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(WsMessage::Text(t)))) => return Some(t.to_string()),
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
            Ok(other) => panic!("expected a text message, got {other:?}"),
        }
    }
}

async fn next_text(ws: &mut Ws) -> String {
    text_within(ws, WAIT)
        .await
        .expect("a text message within the wait")
}

// ---- deferred upgrades ----

/// An upgrade deferred by `on_upgrade` and accepted later from another thread opens with
/// the data and topics of the accept, and the id the token named.
fn a_deferred_upgrade_accepted_from_another_thread_opens_with_its_topics(backend: BackendChoice) {
    let s = start(backend, |_| {});
    runtime().block_on(async {
        let addr = s.addr;
        let client = tokio::spawn(async move { connect(addr, "/defer").await });
        let token = s.token().await;
        let named = token.conn();
        assert!(!token.is_gone());
        assert_eq!(
            s.handle.connections(),
            0,
            "nothing opens before the decision"
        );
        let decided = std::thread::spawn(move || {
            token.accept(Accept::new("late".to_string()).subscribe("deferred-topic"))
        })
        .join()
        .unwrap();
        assert_eq!(decided, Ok(()));
        let mut ws = within(WAIT, "the upgrade completes", client).await.unwrap();
        assert_eq!(s.opened(1).await, named);
        eventually(WAIT, "the subscription", || {
            s.handle.subscriber_count("deferred-topic") == 1
        })
        .await;
        s.handle.publish_text("deferred-topic", "hello");
        assert_eq!(next_text(&mut ws).await, "hello");
        close_normally(&mut ws).await;
    });
}

/// A deferred upgrade rejected later gets the status and opens nothing.
fn a_deferred_upgrade_rejected_later_gets_the_status(backend: BackendChoice) {
    let s = start(backend, |_| {});
    runtime().block_on(async {
        let mut client = RawClient::connect(s.addr).await;
        client.send(upgrade_request("/defer").as_bytes()).await;
        let token = s.token().await;
        assert_eq!(token.reject(Reject::status(401)), Ok(()));
        assert_eq!(client.read_response().await.status, 401);
        client.expect_eof().await;
        drop(client); // the answer lingers for the peer's close
        assert!(s.state.opened.lock().unwrap().is_empty());
        eventually(WAIT, "the socket is released", || {
            s.handle.shared().sockets.load(Ordering::SeqCst) == 0
        })
        .await;
    });
}

/// A token dropped undecided (a task that failed) answers 503 at once.
fn a_dropped_token_answers_503(backend: BackendChoice) {
    let s = start(backend, |_| {});
    runtime().block_on(async {
        let mut client = RawClient::connect(s.addr).await;
        client.send(upgrade_request("/defer").as_bytes()).await;
        drop(s.token().await);
        assert_eq!(client.read_response().await.status, 503);
    });
}

/// A client that leaves before the decision: the token reports it, deciding says `Gone`,
/// and the socket is released.
fn a_client_leaving_before_the_decision_is_reported_gone(backend: BackendChoice) {
    let s = start(backend, |_| {});
    runtime().block_on(async {
        let mut client = RawClient::connect(s.addr).await;
        client.send(upgrade_request("/defer").as_bytes()).await;
        let token = s.token().await;
        drop(client);
        eventually(WAIT, "the token reports the client gone", || {
            token.is_gone()
        })
        .await;
        assert_eq!(token.accept(Accept::new("x".into())), Err(Gone));
        eventually(WAIT, "the socket is released", || {
            s.handle.shared().sockets.load(Ordering::SeqCst) == 0
        })
        .await;
        assert!(s.state.opened.lock().unwrap().is_empty());
    });
}

/// The handshake deadline applies while the decision waits: the client is dropped at it,
/// and a decision after it says `Gone`.
fn a_decision_after_the_handshake_deadline_is_gone(backend: BackendChoice) {
    let s = start(backend, |c| {
        c.handshake_timeout = Duration::from_millis(300)
    });
    runtime().block_on(async {
        let mut client = RawClient::connect(s.addr).await;
        client.send(upgrade_request("/defer").as_bytes()).await;
        let token = s.token().await;
        client.expect_eof().await;
        eventually(WAIT, "the token reports the client gone", || {
            token.is_gone()
        })
        .await;
        assert_eq!(token.reject(Reject::status(401)), Err(Gone));
        assert_eq!(s.handle.shared().sockets.load(Ordering::SeqCst), 0);
    });
}

/// A decision raced by the client's leaving (sent, then the client goes before the
/// worker applies it) and a server shut down while deferred leak nothing and panic nowhere.
fn a_decision_racing_the_client_and_a_shutdown_while_deferred_are_harmless(backend: BackendChoice) {
    let mut s = start(backend, |_| {});
    runtime().block_on(async {
        // Decided while the client is going: either order is fine.
        let mut client = RawClient::connect(s.addr).await;
        client.send(upgrade_request("/defer").as_bytes()).await;
        let token = s.token().await;
        drop(client);
        let _ = token.accept(Accept::new("x".into()));
        eventually(WAIT, "the socket is released", || {
            s.handle.shared().sockets.load(Ordering::SeqCst) == 0
        })
        .await;
        // Shut down with a decision pending: the token then says `Gone`.
        let mut client = RawClient::connect(s.addr).await;
        client.send(upgrade_request("/defer").as_bytes()).await;
        let token = s.token().await;
        let server = s.server.take().unwrap();
        server.handle().shutdown();
        assert!(
            join_before(server, std::time::Instant::now() + Duration::from_secs(20)),
            "the server stops with a deferred upgrade pending"
        );
        assert!(token.is_gone());
        assert_eq!(token.accept(Accept::new("x".into())), Err(Gone));
        client.expect_eof().await;
    });
}

/// Bytes a client sends right after its request, while the decision waits, are held and
/// handed to the connection once accepted (here: a message the handler echoes).
fn bytes_sent_while_deferred_reach_the_accepted_connection(backend: BackendChoice) {
    let s = start(backend, |_| {});
    runtime().block_on(async {
        let mut client = RawClient::connect(s.addr).await;
        let mut out = upgrade_request("/defer").into_bytes();
        out.extend(frame(true, TEXT, b"early"));
        client.send(&out).await;
        let token = s.token().await;
        client.send(&frame(true, TEXT, b"meanwhile")).await;
        // Both writes are in before the decision (the worker reads them in order).
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(token.accept(Accept::new("echo".to_string())), Ok(()));
        assert_eq!(client.read_head().await.status, 101);
        assert_eq!(client.read_frame().await.payload, b"early");
        assert_eq!(client.read_frame().await.payload, b"meanwhile");
    });
}

/// What a client may send while the decision waits is bounded (the header limit):
/// beyond it the connection is dropped and the token says `Gone`.
fn a_client_flooding_while_deferred_is_dropped(backend: BackendChoice) {
    let s = start(backend, |_| {});
    runtime().block_on(async {
        let mut client = RawClient::connect(s.addr).await;
        client.send(upgrade_request("/defer").as_bytes()).await;
        let token = s.token().await;
        for _ in 0..4 {
            // Unmasked, unparsed: only the count matters while deferred. The server may
            // already be gone for the last writes, so their errors are ignored.
            let _ = tokio::io::AsyncWriteExt::write_all(&mut client.stream, &[b'x'; 4096]).await;
        }
        eventually(WAIT, "the token reports the client gone", || {
            token.is_gone()
        })
        .await;
        assert_eq!(token.accept(Accept::new(String::new())), Err(Gone));
        assert!(s.state.opened.lock().unwrap().is_empty());
    });
}

// ---- one connection through the Handle ----

/// Sends, subscriptions and closes by id reach the connection they name; a stale id (its
/// connection closed, its slot reused by another) is an error at once and reaches nobody.
fn a_stale_id_reaches_no_other_connection(backend: BackendChoice) {
    let s = start(backend, |_| {});
    runtime().block_on(async {
        let mut first = connect(s.addr, "/plain").await;
        let old = s.opened(1).await;
        close_normally(&mut first).await;
        eventually(WAIT, "the first connection closed", || {
            s.state.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        let mut second = connect(s.addr, "/plain").await;
        let new = s.opened(2).await;
        assert_eq!(new.id.slot, old.id.slot, "one worker reuses the freed slot");
        assert_ne!(new, old);
        // To the old id: an error, nothing sent; to the new one: its message.
        assert_eq!(
            s.handle.try_send(old, OpCode::Text, b"for the old one"),
            Err(TryError::Stale)
        );
        assert_eq!(
            s.handle
                .send_async(old, OpCode::Text, b"for the old one")
                .await,
            Err(TryError::Stale)
        );
        assert_eq!(s.handle.subscribe(old, "stale-topic"), Err(TryError::Stale));
        assert_eq!(
            s.handle.unsubscribe(old, "stale-topic"),
            Err(TryError::Stale)
        );
        assert_eq!(
            s.handle.close(old, CloseCode::Policy, "stale"),
            Err(TryError::Stale)
        );
        assert_eq!(
            s.handle.try_send(new, OpCode::Text, b"for the new one"),
            Ok(())
        );
        assert_eq!(next_text(&mut second).await, "for the new one");
        assert_eq!(
            s.metric("handle_misses"),
            0,
            "nothing travelled for the old id"
        );
        assert_eq!(s.handle.subscriber_count("stale-topic"), 0);
        // Membership by id.
        assert_eq!(s.handle.subscribe(new, "by-id"), Ok(()));
        eventually(WAIT, "subscribed by id", || {
            s.handle.subscriber_count("by-id") == 1
        })
        .await;
        s.handle.publish_text("by-id", "published");
        assert_eq!(next_text(&mut second).await, "published");
        assert_eq!(s.handle.unsubscribe(new, "by-id"), Ok(()));
        eventually(WAIT, "unsubscribed by id", || {
            s.handle.subscriber_count("by-id") == 0
        })
        .await;
        // Refusals the caller sees at once.
        let nowhere = GlobalConnId {
            worker: 7,
            id: new.id,
        };
        assert_eq!(
            s.handle.try_send(nowhere, OpCode::Text, b"x"),
            Err(TryError::NoSuchWorker)
        );
        assert_eq!(
            s.handle.try_send(new, OpCode::Close, b""),
            Err(TryError::Refused)
        );
        assert_eq!(
            s.handle.try_send(new, OpCode::Ping, &[0; 126]),
            Err(TryError::Refused)
        );
        close_normally(&mut second).await;
    });
}

/// While the worker is held up (a slow handler) and a subscriber never reads, the worker's
/// inbox fills: `try_publish` and `try_send` say `Full` at once, an async publish waits
/// without blocking its thread, and completes once the worker takes its inbox.
fn try_publish_says_full_and_publish_async_completes_when_room_frees(backend: BackendChoice) {
    // Dropped frames keep the subscriber subscribed (the default policy would close it).
    let s = start(backend, |c| c.policy = wsring::Policy::DropNew);
    runtime().block_on(async {
        let _never_reads = RawClient::upgrade(s.addr, "/sub/flood").await;
        let mut blocker = connect(s.addr, "/plain").await;
        let blocker_id = s.opened(2).await;
        eventually(WAIT, "the subscriber", || {
            s.handle.subscriber_count("flood") == 1
        })
        .await;
        send(&mut blocker, WsMessage::text("block")).await;
        eventually(WAIT, "the worker is held", || {
            s.state.blocked.load(Ordering::SeqCst)
        })
        .await;
        let payload = vec![0x5Au8; 1 << 20];
        let mut handed = 0;
        let full = loop {
            match s.handle.try_publish("flood", OpCode::Binary, &payload) {
                Ok(n) => {
                    assert_eq!(n, 1);
                    handed += 1;
                    assert!(handed <= 16, "the inbox took more than its limit");
                }
                Err(e) => break e,
            }
        };
        assert_eq!(full, TryError::Full);
        // 16 frames of 1 MiB and a header each pass the 16 MiB limit: the 17th is refused.
        assert_eq!(handed, 16);
        assert_eq!(
            s.handle.try_send(blocker_id, OpCode::Text, b"x"),
            Err(TryError::Full)
        );
        // The async publish waits (on a task: the test's thread stays free) ...
        let handle = s.handle.clone();
        let payload2 = payload.clone();
        let publish = tokio::spawn(async move {
            handle
                .publish_async("flood", OpCode::Binary, &payload2)
                .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !publish.is_finished(),
            "room cannot free while the worker is held"
        );
        // ... and completes once the worker takes its inbox.
        *s.state.gate.lock().unwrap() = true;
        s.state.gate_cv.notify_all();
        let workers = within(WAIT, "the async publish completes", publish)
            .await
            .unwrap();
        assert_eq!(workers, 1);
        assert_eq!(next_text(&mut blocker).await, "unblocked");
        // With room again, the non-blocking forms queue.
        assert_eq!(
            s.handle.try_send(blocker_id, OpCode::Text, b"room again"),
            Ok(())
        );
        assert_eq!(next_text(&mut blocker).await, "room again");
        assert!(
            s.handle
                .send_async(blocker_id, OpCode::Text, b"async send")
                .await
                .is_ok()
        );
        assert_eq!(next_text(&mut blocker).await, "async send");
    });
}

// ---- application timers ----

/// A timer set in `on_open` fires `on_timer` once.
fn a_timer_fires_once(backend: BackendChoice) {
    let s = start(backend, |_| {});
    runtime().block_on(async {
        let mut ws = connect(s.addr, "/timer?ms=100").await;
        assert_eq!(next_text(&mut ws).await, "timer");
        assert_eq!(text_within(&mut ws, Duration::from_millis(500)).await, None);
        assert_eq!(s.state.timers_fired.load(Ordering::SeqCst), 1);
        close_normally(&mut ws).await;
    });
}

/// A cancelled timer does not fire.
fn a_cancelled_timer_does_not_fire(backend: BackendChoice) {
    let s = start(backend, |_| {});
    runtime().block_on(async {
        let mut ws = connect(s.addr, "/timer?ms=1000").await;
        send(&mut ws, WsMessage::text("cancel")).await;
        assert_eq!(next_text(&mut ws).await, "cancelled");
        assert_eq!(
            text_within(&mut ws, Duration::from_millis(1500)).await,
            None
        );
        assert_eq!(s.state.timers_fired.load(Ordering::SeqCst), 0);
        close_normally(&mut ws).await;
    });
}

/// Setting the timer again replaces it: a 60 s timer re-armed to 100 ms fires within the
/// wait, once; re-armed from `on_timer`'s connection after firing, it fires again.
fn a_rearmed_timer_replaces_the_first(backend: BackendChoice) {
    let s = start(backend, |_| {});
    runtime().block_on(async {
        let mut ws = connect(s.addr, "/timer?ms=60000").await;
        send(&mut ws, WsMessage::text("rearm 100")).await;
        assert_eq!(next_text(&mut ws).await, "rearmed");
        assert_eq!(next_text(&mut ws).await, "timer");
        send(&mut ws, WsMessage::text("rearm 50")).await;
        assert_eq!(next_text(&mut ws).await, "rearmed");
        assert_eq!(next_text(&mut ws).await, "timer");
        assert_eq!(s.state.timers_fired.load(Ordering::SeqCst), 2);
        close_normally(&mut ws).await;
    });
}

/// A connection closed before its timer fires gets no `on_timer`, and a connection that
/// reuses its slot does not inherit the timer.
fn a_timer_of_a_closed_connection_never_fires(backend: BackendChoice) {
    let s = start(backend, |_| {});
    runtime().block_on(async {
        let mut ws = connect(s.addr, "/timer?ms=400").await;
        close_normally(&mut ws).await;
        eventually(WAIT, "closed", || {
            s.state.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        let mut next = connect(s.addr, "/plain").await;
        assert_eq!(
            text_within(&mut next, Duration::from_millis(1000)).await,
            None
        );
        assert_eq!(s.state.timers_fired.load(Ordering::SeqCst), 0);
        close_normally(&mut next).await;
    });
}

for_both_backends!(
    a_deferred_upgrade_accepted_from_another_thread_opens_with_its_topics,
    a_deferred_upgrade_rejected_later_gets_the_status,
    a_dropped_token_answers_503,
    a_client_leaving_before_the_decision_is_reported_gone,
    a_decision_after_the_handshake_deadline_is_gone,
    a_decision_racing_the_client_and_a_shutdown_while_deferred_are_harmless,
    bytes_sent_while_deferred_reach_the_accepted_connection,
    a_client_flooding_while_deferred_is_dropped,
    a_stale_id_reaches_no_other_connection,
    try_publish_says_full_and_publish_async_completes_when_room_frees,
    a_timer_fires_once,
    a_cancelled_timer_does_not_fire,
    a_rearmed_timer_replaces_the_first,
    a_timer_of_a_closed_connection_never_fires,
);
