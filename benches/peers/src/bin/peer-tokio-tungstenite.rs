//! `peer-tokio-tungstenite`: a BENCH_PROTOCOL.md server on tokio-tungstenite 0.30, written
//! the way its `echo-server` and `server` (chat) examples are: `accept_hdr_async` with a
//! callback that routes on the request path, `forward` for echo, and for pub/sub an
//! unbounded `futures_channel::mpsc` per connection in a shared map, drained into the sink
//! half by `forward` while the stream half publishes.
//!
//! `--listen ADDR` (port 0 picks a free port), `--threads N` worker threads of a
//! multi-thread runtime (default 1). Prints `listening on ws://ADDR` once bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_channel::mpsc::{UnboundedSender, unbounded};
use futures_util::{StreamExt, TryStreamExt, future, pin_mut};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wsring_peers::{Route, serve, tungstenite_accept};

type Tx = UnboundedSender<Message>;

/// Subscribers per topic, each with an id so it can leave.
#[derive(Default)]
struct Topics {
    next_id: u64,
    subscribers: HashMap<String, Vec<(u64, Tx)>>,
}

type TopicMap = Arc<Mutex<Topics>>;

fn main() -> std::io::Result<()> {
    serve(
        "BENCH_PROTOCOL server on tokio-tungstenite",
        handle_connection,
    )
}

async fn handle_connection(topics: TopicMap, stream: TcpStream) {
    let Some((route, ws_stream)) = tungstenite_accept(stream).await else {
        return;
    };
    let (outgoing, incoming) = ws_stream.split();
    match route {
        Route::Echo => {
            // Pings are answered and the close is completed by the stream half itself.
            let _ = incoming
                .try_filter(|msg| future::ready(msg.is_text() || msg.is_binary()))
                .forward(outgoing)
                .await;
        }
        Route::PubSub(topic) => {
            let (tx, rx) = unbounded();
            let id = {
                let mut topics = topics.lock().unwrap();
                let id = topics.next_id;
                topics.next_id += 1;
                topics
                    .subscribers
                    .entry(topic.clone())
                    .or_default()
                    .push((id, tx));
                id
            };
            let publish = incoming.try_for_each(|msg| {
                if msg.is_text() || msg.is_binary() {
                    let topics = topics.lock().unwrap();
                    for (_, subscriber) in topics.subscribers.get(&topic).into_iter().flatten() {
                        // Message payloads are `Bytes`: the clone shares the payload.
                        let _ = subscriber.unbounded_send(msg.clone());
                    }
                }
                future::ok(())
            });
            let deliver = rx.map(Ok).forward(outgoing);
            pin_mut!(publish, deliver);
            future::select(publish, deliver).await;
            let mut topics = topics.lock().unwrap();
            if let Some(subscribers) = topics.subscribers.get_mut(&topic) {
                subscribers.retain(|(other, _)| *other != id);
                if subscribers.is_empty() {
                    topics.subscribers.remove(&topic);
                }
            }
        }
    }
}
