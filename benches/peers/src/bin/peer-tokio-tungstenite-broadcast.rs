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
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures_util::{SinkExt, StreamExt, TryStreamExt, future};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Largest message (and frame) accepted.
const MAX_MESSAGE_SIZE: usize = 16 << 20;
/// Messages a topic's channel holds for its slowest receiver.
const CHANNEL_CAPACITY: usize = 4096;

#[derive(Parser, Debug)]
#[command(about = "BENCH_PROTOCOL server on tokio-tungstenite with tokio::sync::broadcast")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Worker threads of the tokio multi-thread runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// What the request path asked for.
enum Route {
    Echo,
    PubSub(String),
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        match path {
            "/echo" => Some(Route::Echo),
            _ => path
                .strip_prefix("/pubsub/")
                .filter(|topic| !topic.is_empty())
                .map(|topic| Route::PubSub(topic.to_owned())),
        }
    }
}

/// One broadcast channel per topic, made by its first subscriber.
type Topics = Arc<Mutex<HashMap<String, broadcast::Sender<Message>>>>;

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?
        .block_on(serve(args.listen))
}

async fn serve(listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening on ws://{}", listener.local_addr()?);
    let topics = Topics::default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle_connection(topics.clone(), stream));
            }
            // Out of descriptors and the like: back off instead of spinning.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn handle_connection(topics: Topics, stream: TcpStream) {
    let mut route = None;
    // The error type is tungstenite's (an HTTP response), not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| match Route::parse(request.uri().path())
    {
        Some(r) => {
            route = Some(r);
            Ok(response)
        }
        None => {
            let mut not_found = ErrorResponse::new(None);
            *not_found.status_mut() = StatusCode::NOT_FOUND;
            Err(not_found)
        }
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_MESSAGE_SIZE));
    let Ok(ws_stream) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await
    else {
        return;
    };
    let (mut outgoing, incoming) = ws_stream.split();
    match route {
        Some(Route::Echo) => {
            // Pings are answered and the close is completed by the stream half itself.
            let _ = incoming
                .try_filter(|msg| future::ready(msg.is_text() || msg.is_binary()))
                .forward(outgoing)
                .await;
        }
        Some(Route::PubSub(topic)) => {
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
                            Err(_) => result = Err(tokio_tungstenite::tungstenite::Error::AlreadyClosed),
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
        None => {}
    }
}
