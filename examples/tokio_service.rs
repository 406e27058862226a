//! wsring inside a tokio service: an axum HTTP API and the WebSocket engine in one process.
//!
//! ```sh
//! cargo run --example tokio_service   # WebSockets on 127.0.0.1:9004, HTTP on 127.0.0.1:9005
//! ```
//! (`WS_LISTEN` and `HTTP_LISTEN` change the addresses; port 0 picks a free one.)
//!
//! - `ws://127.0.0.1:9004/ws?topic=news&token=alice-secret`: the token is checked by an
//!   async task before the 101 (a sleep stands in for the database; `<user>-secret`
//!   belongs to `<user>`, anything else gets 401), then the connection is subscribed to
//!   `news` and greeted with `{"welcome":"alice"}`.
//! - `ws://127.0.0.1:9004/ws?topic=news` without a token is accepted, but its first
//!   message must be `{"token":"<user>-secret"}` within 5 s, or it is closed with 1008.
//! - `POST http://127.0.0.1:9005/publish/<topic>` publishes the body to the topic,
//!   `POST /send/<user>` sends it to every connection of that user, `GET /stats` answers
//!   JSON counts.
//!
//! SIGINT/SIGTERM closes every WebSocket with 1001 and exits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use bytes::Bytes;
use wsring::api::{Accept, Conn, Decision, GlobalConnId, Handler, Message, Reject};
use wsring::engine::{EngineConfig, Handle, Server};
use wsring::proto::handshake::{Request, Upgrade};
use wsring::proto::{CloseCode, OpCode};

/// How long an unauthenticated connection has to send its token.
const AUTH_WITHIN: Duration = Duration::from_secs(5);

/// The user a token belongs to: `<user>-secret` is `<user>`'s.
fn user_of(token: &str) -> Option<String> {
    token
        .strip_suffix("-secret")
        .filter(|u| !u.is_empty())
        .map(str::to_string)
}

/// The token check as a real service would do it: asking a database or an auth service.
async fn check_token(token: String) -> Option<String> {
    tokio::time::sleep(Duration::from_millis(50)).await;
    user_of(&token)
}

/// Which connections each user has (kept from `on_open` / `on_close`, read by `/send`).
#[derive(Default)]
struct Users(Mutex<HashMap<String, Vec<GlobalConnId>>>);

impl Users {
    fn add(&self, user: &str, id: GlobalConnId) {
        if let Ok(mut m) = self.0.lock() {
            m.entry(user.to_string()).or_default().push(id);
        }
    }

    fn remove(&self, user: &str, id: GlobalConnId) {
        if let Ok(mut m) = self.0.lock()
            && let Some(ids) = m.get_mut(user)
        {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                m.remove(user);
            }
        }
    }

    fn of(&self, user: &str) -> Vec<GlobalConnId> {
        self.0
            .lock()
            .map(|m| m.get(user).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    fn count(&self) -> usize {
        self.0.lock().map_or(0, |m| m.len())
    }
}

/// A connection: its topic, and its user once authenticated.
struct Session {
    topic: String,
    user: Option<String>,
}

/// The WebSocket side, one per wsring worker.
struct Service {
    runtime: tokio::runtime::Handle,
    users: Arc<Users>,
}

impl Service {
    /// Authenticated: subscribed, known by user, greeted.
    fn welcome(&self, conn: &mut Conn<'_, Session>, user: String) {
        let topic = conn.data().map(|s| s.topic.clone()).unwrap_or_default();
        conn.subscribe(&topic);
        self.users.add(&user, conn.global_id());
        conn.send_text(&format!("{{\"welcome\":{}}}", serde_json::json!(user)));
        if let Some(s) = conn.data() {
            s.user = Some(user);
        }
    }
}

impl Handler for Service {
    type Data = Session;

    fn on_upgrade(&mut self, request: &Request, _upgrade: &Upgrade) -> Decision<Session> {
        if request.path != "/ws" {
            return Decision::Reject(Reject::status(404));
        }
        let Some(topic) = request.query_param("topic").map(str::to_string) else {
            return Decision::Reject(Reject::status(400));
        };
        match request.query_param("token").map(str::to_string) {
            // No token: accepted, it must authenticate with its first message.
            None => Decision::Accept(Accept::new(Session { topic, user: None })),
            // A token: checked asynchronously before the 101.
            Some(token) => {
                let runtime = self.runtime.clone();
                Decision::defer(move |deferred| {
                    runtime.spawn(async move {
                        // `Gone` (the client left meanwhile) needs nothing from us.
                        let _ = match check_token(token).await {
                            Some(user) => deferred.accept(Accept::new(Session {
                                topic,
                                user: Some(user),
                            })),
                            None => deferred.reject(Reject::status(401)),
                        };
                    });
                })
            }
        }
    }

    fn on_open(&mut self, conn: &mut Conn<'_, Session>) {
        match conn.data().and_then(|s| s.user.take()) {
            Some(user) => self.welcome(conn, user),
            None => conn.set_timer(AUTH_WITHIN),
        }
    }

    fn on_message(&mut self, conn: &mut Conn<'_, Session>, message: Message) {
        if conn.data().is_some_and(|s| s.user.is_some()) {
            return; // authenticated clients only listen here
        }
        let user = message
            .text()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
            .and_then(|v| v.get("token")?.as_str().and_then(user_of));
        match user {
            Some(user) => {
                conn.cancel_timer();
                self.welcome(conn, user);
            }
            None => conn.close(CloseCode::Policy, "bad token"),
        }
    }

    fn on_timer(&mut self, conn: &mut Conn<'_, Session>) {
        conn.close(CloseCode::Policy, "no token within 5 s");
    }

    fn on_close(&mut self, conn: &mut Conn<'_, Session>, _code: CloseCode, _reason: &str) {
        let id = conn.global_id();
        if let Some(user) = conn.data().and_then(|s| s.user.as_deref()) {
            self.users.remove(user, id);
        }
    }
}

/// The HTTP side.
#[derive(Clone)]
struct Api {
    handle: Handle,
    users: Arc<Users>,
}

fn opcode_of(body: &[u8]) -> OpCode {
    if std::str::from_utf8(body).is_ok() {
        OpCode::Text
    } else {
        OpCode::Binary
    }
}

async fn publish(State(api): State<Api>, Path(topic): Path<String>, body: Bytes) -> String {
    // Awaits room in the workers' inboxes without blocking this runtime's threads.
    let workers = api
        .handle
        .publish_async(&topic, opcode_of(&body), &body)
        .await;
    format!("{{\"workers\":{workers}}}\n")
}

async fn send(State(api): State<Api>, Path(user): Path<String>, body: Bytes) -> String {
    let mut sent = 0;
    for id in api.users.of(&user) {
        if api
            .handle
            .send_async(id, opcode_of(&body), &body)
            .await
            .is_ok()
        {
            sent += 1;
        }
    }
    format!("{{\"connections\":{sent}}}\n")
}

async fn stats(State(api): State<Api>) -> String {
    format!(
        "{{\"connections\":{},\"topics\":{},\"users\":{}}}\n",
        api.handle.connections(),
        api.handle.topic_count(),
        api.users.count()
    )
}

fn address(var: &str, default: &str) -> SocketAddr {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_string())
        .parse()
        .unwrap_or_else(|e| panic!("{var}: an address like {default}: {e}"))
}

fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    // Before any thread starts, so that wsring's and tokio's threads inherit the blocked
    // signals and the main thread alone takes them.
    let signals = wsring::signals::ShutdownSignals::block();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let users = Arc::new(Users::default());
    let config = EngineConfig {
        listen: address("WS_LISTEN", "127.0.0.1:9004"),
        ..EngineConfig::default()
    };
    let (rt, u) = (runtime.handle().clone(), users.clone());
    let server = Server::start(config, move |_| Service {
        runtime: rt.clone(),
        users: u.clone(),
    })?;
    let api = Api {
        handle: server.handle(),
        users,
    };
    let app = Router::new()
        .route("/publish/{topic}", post(publish))
        .route("/send/{user}", post(send))
        .route("/stats", get(stats))
        .with_state(api);
    let listener = runtime.block_on(tokio::net::TcpListener::bind(address(
        "HTTP_LISTEN",
        "127.0.0.1:9005",
    )))?;
    let http = listener.local_addr()?;
    runtime.spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("HTTP server: {e}");
        }
    });
    println!(
        "WebSockets on ws://{}/ws, HTTP API on http://{http}/ (Ctrl-C to stop)",
        server.local_addr()
    );
    // The first SIGINT/SIGTERM closes every WebSocket with 1001; a second exits at once.
    signals.drain_on_signal(server);
    Ok(())
}
