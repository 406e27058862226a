//! `peer-tokio-tungstenite-broadcast`: the BENCH_PROTOCOL.md server on tokio-tungstenite
//! 0.30 written the way a tokio user writes a broadcast: one `tokio::sync::broadcast`
//! channel per topic (the publisher sends once; every receiver reads the same `Message`,
//! whose payload is shared `Bytes`), and per connection a write task that drains its
//! receiver into the sink half, feeding everything already queued before one flush, while
//! the read half publishes. A receiver that lags past the channel's capacity (4,096
//! messages) is closed, as wsring closes a subscriber that falls too far behind. Echo is
//! `forward`, as in `peer-tokio-tungstenite` (which does pub/sub the way the chat example
//! does: an unbounded channel per subscriber).
//!
//! `--listen ADDR` (port 0 picks a free port), `--threads N` worker threads of a
//! multi-thread runtime (default 1). Prints `listening on ws://ADDR` once bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt, TryStreamExt, future};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_tungstenite::tungstenite::Message;
use wsring_peers::{Route, serve, tungstenite_accept};

/// Messages a topic's channel holds for its slowest receiver.
const CHANNEL_CAPACITY: usize = 4096;

/// One broadcast channel per topic, made by its first subscriber.
type Topics = Arc<Mutex<HashMap<String, broadcast::Sender<Message>>>>;

fn main() -> std::io::Result<()> {
    serve(
        "BENCH_PROTOCOL server on tokio-tungstenite with tokio::sync::broadcast",
        handle_connection,
    )
}

async fn handle_connection(topics: Topics, stream: TcpStream) {
    let Some((route, ws_stream)) = tungstenite_accept(stream).await else {
        return;
    };
    let (mut outgoing, incoming) = ws_stream.split();
    match route {
        Route::Echo => {
            // Pings are answered and the close is completed by the stream half itself.
            let _ = incoming
                .try_filter(|msg| future::ready(msg.is_text() || msg.is_binary()))
                .forward(outgoing)
                .await;
        }
        Route::PubSub(topic) => {
            let (tx, mut rx) = {
                let mut topics = topics.lock().unwrap();
                let tx = topics
                    .entry(topic.clone())
                    .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
                    .clone();
                let rx = tx.subscribe();
                (tx, rx)
            };
            let writer = tokio::spawn(async move {
                loop {
                    let msg = match rx.recv().await {
                        Ok(msg) => msg,
                        // Lagged: this subscriber missed messages; closed, not silently
                        // skipped. Closed: the channel is gone.
                        Err(RecvError::Lagged(_) | RecvError::Closed) => break,
                    };
                    // Everything already queued goes out with one flush.
                    let mut result = outgoing.feed(msg).await;
                    while result.is_ok() {
                        match rx.try_recv() {
                            Ok(msg) => result = outgoing.feed(msg).await,
                            Err(TryRecvError::Empty) => break,
                            Err(_) => {
                                result = Err(tokio_tungstenite::tungstenite::Error::AlreadyClosed)
                            }
                        }
                    }
                    if result.is_err() || outgoing.flush().await.is_err() {
                        break;
                    }
                }
                let _ = outgoing.close().await;
            });
            let _ = incoming
                .try_for_each(|msg| {
                    if msg.is_text() || msg.is_binary() {
                        let _ = tx.send(msg);
                    }
                    future::ok(())
                })
                .await;
            writer.abort();
            drop(tx);
            let mut topics = topics.lock().unwrap();
            // The map's own sender is the last one: nobody is subscribed any more.
            if topics.get(&topic).is_some_and(|t| t.receiver_count() == 0) {
                topics.remove(&topic);
            }
        }
    }
}
