//! A chat server: token authentication in the query string, rooms as topics.
//!
//! ```sh
//! cargo run --release --example chat            # listens on 127.0.0.1:9003
//! ```
//! Open http://127.0.0.1:9003/ in two browser tabs, or connect any WebSocket client to
//! `ws://127.0.0.1:9003/chat/lobby?token=alice-secret` (users: alice, bob, carol; the token
//! is `<name>-secret`). A bad or missing token gets HTTP 401 and opens nothing. Every text
//! message is published to the room as `name: text`; `/join ROOM` moves to another room,
//! `/leave` goes back to `lobby`, `/who` answers with the number of people in the current
//! room. The room in the path is percent-decoded (`/chat/tea%20room` is `tea room`, as
//! `/join tea room` is). SIGINT/SIGTERM closes every client with 1001 (a second signal
//! exits at once).

use std::collections::HashMap;

use bytes::Bytes;
use wsring::api::{Accept, Conn, Decision, Handler, HttpResponse, Message, Reject};
use wsring::engine::{EngineConfig, Handle, Server};
use wsring::proto::handshake::{Request, Upgrade};

/// Who is on a connection and where.
struct User {
    name: String,
    room: String,
}

struct Chat {
    tokens: HashMap<&'static str, &'static str>,
    handle: Handle,
}

impl Chat {
    fn new(handle: Handle) -> Chat {
        let tokens = [
            ("alice-secret", "alice"),
            ("bob-secret", "bob"),
            ("carol-secret", "carol"),
        ]
        .into_iter()
        .collect();
        Chat { tokens, handle }
    }
}

/// Where `/leave` goes.
const LOBBY: &str = "lobby";

fn room_topic(room: &str) -> String {
    format!("room:{room}")
}

/// `%XX` sequences decoded (`+` is left alone: it is a space only in form bodies); `None`
/// for a bad escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

impl Handler for Chat {
    type Data = User;

    fn on_upgrade(&mut self, request: &Request, _upgrade: &Upgrade) -> Decision<User> {
        let Some(room) = request
            .path
            .strip_prefix("/chat/")
            .and_then(percent_decode)
            .filter(|r| !r.trim().is_empty())
        else {
            return Decision::Reject(Reject::status(404));
        };
        let room = room.trim();
        let token = request.query_param("token").unwrap_or("");
        match self.tokens.get(token) {
            Some(name) => Decision::Accept(
                Accept::new(User {
                    name: name.to_string(),
                    room: room.to_string(),
                })
                .subscribe(room_topic(room)),
            ),
            None => {
                let mut r = Reject::status(401);
                r.body = "missing or unknown token\n".into();
                Decision::Reject(r)
            }
        }
    }

    fn on_http(&mut self, request: &Request) -> Option<HttpResponse> {
        (request.path == "/").then(|| {
            HttpResponse::new(
                200,
                "text/html; charset=utf-8",
                Bytes::from_static(PAGE.as_bytes()),
            )
        })
    }

    fn on_open(&mut self, conn: &mut Conn<'_, User>) {
        if let Some(u) = conn.data() {
            let (name, room) = (u.name.clone(), u.room.clone());
            conn.publish(
                &room_topic(&room),
                wsring::proto::OpCode::Text,
                format!("* {name} joined {room}").as_bytes(),
            );
        }
    }

    fn on_message(&mut self, conn: &mut Conn<'_, User>, message: Message) {
        let Some(text) = message.text().map(str::to_owned) else {
            conn.send_text("only text messages, please");
            return;
        };
        let Some(user) = conn.data() else { return };
        let (name, room) = (user.name.clone(), user.room.clone());
        if let Some(new_room) = text
            .strip_prefix("/join ")
            .map(str::trim)
            .filter(|r| !r.is_empty())
        {
            conn.unsubscribe(&room_topic(&room));
            conn.subscribe(&room_topic(new_room));
            if let Some(u) = conn.data() {
                u.room = new_room.to_string();
            }
            conn.send_text(&format!("* you are in {new_room}"));
        } else if text.trim() == "/who" {
            let n = self.handle.subscriber_count(&room_topic(&room));
            conn.send_text(&format!("* {n} in {room}"));
        } else if text.trim() == "/leave" {
            if room == LOBBY {
                conn.send_text("* you are in lobby: /join ROOM to go elsewhere");
                return;
            }
            conn.publish(
                &room_topic(&room),
                wsring::proto::OpCode::Text,
                format!("* {name} left").as_bytes(),
            );
            conn.unsubscribe(&room_topic(&room));
            conn.subscribe(&room_topic(LOBBY));
            if let Some(u) = conn.data() {
                u.room = LOBBY.to_string();
            }
            conn.send_text(&format!("* you left {room}; you are in {LOBBY}"));
        } else {
            conn.publish(
                &room_topic(&room),
                wsring::proto::OpCode::Text,
                format!("{name}: {text}").as_bytes(),
            );
        }
    }

    fn on_close(
        &mut self,
        conn: &mut Conn<'_, User>,
        _code: wsring::proto::CloseCode,
        _reason: &str,
    ) {
        if let Some(u) = conn.data() {
            let (name, room) = (u.name.clone(), u.room.clone());
            conn.publish(
                &room_topic(&room),
                wsring::proto::OpCode::Text,
                format!("* {name} left").as_bytes(),
            );
        }
    }
}

const PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>wsring chat</title>
<p>user <select id="u"><option>alice</option><option>bob</option><option>carol</option></select>
room <input id="r" value="lobby" size="8"> <button id="c">connect</button></p>
<div id="log" style="height:16em;overflow:auto;border:1px solid #ccc;font-family:monospace"></div>
<form id="f"><input id="m" size="50" placeholder="message, /join ROOM, /leave, /who"> <button>send</button></form>
<script>
let ws; const log = t => { const d = document.createElement('div'); d.textContent = t; document.getElementById('log').appendChild(d); };
document.getElementById('c').onclick = () => {
  if (ws) ws.close();
  const u = document.getElementById('u').value, r = document.getElementById('r').value;
  ws = new WebSocket(`ws://${location.host}/chat/${encodeURIComponent(r)}?token=${u}-secret`);
  ws.onmessage = e => log(e.data); ws.onclose = e => log('closed ' + e.code);
};
document.getElementById('f').onsubmit = e => { e.preventDefault(); const m = document.getElementById('m'); if (ws) ws.send(m.value); m.value = ''; };
</script>"#;

fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    // Before the server starts, so that its threads inherit the blocked signals.
    let signals = wsring::signals::ShutdownSignals::block();
    let listen = std::env::var("CHAT_LISTEN").unwrap_or_else(|_| "127.0.0.1:9003".into());
    let config = EngineConfig {
        listen: listen
            .parse()
            .expect("CHAT_LISTEN: an address like 127.0.0.1:9003"),
        ..EngineConfig::default()
    };
    let server = Server::start(config, Chat::new)?;
    println!("chat on http://{}/ (Ctrl-C to stop)", server.local_addr());
    // The first SIGINT/SIGTERM closes every client with 1001; a second exits at once.
    signals.drain_on_signal(server);
    Ok(())
}
