//! `peer-tokio-tungstenite`: a BENCH_PROTOCOL.md server on tokio-tungstenite 0.30, written
//! the way its `echo-server` and `server` (chat) examples are: `accept_hdr_async` with a
//! callback that routes on the request path, `forward` for echo, and for pub/sub an
//! unbounded `futures_channel::mpsc` per connection in a shared map, drained into the sink
//! half by `forward` while the stream half publishes.
//!
//! `--listen ADDR` (port 0 picks a free port), `--threads N` worker threads of a
//! multi-thread runtime (default 1). Prints `listening on ws://ADDR` once bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures_channel::mpsc::{UnboundedSender, unbounded};
use futures_util::{StreamExt, TryStreamExt, future, pin_mut};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Largest message (and frame) accepted.
const MAX_MESSAGE_SIZE: usize = 16 << 20;

#[derive(Parser, Debug)]
#[command(about = "BENCH_PROTOCOL server on tokio-tungstenite")]
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

type Tx = UnboundedSender<Message>;

/// Subscribers per topic, each with an id so it can leave.
#[derive(Default)]
struct Topics {
    next_id: u64,
    subscribers: HashMap<String, Vec<(u64, Tx)>>,
}

type TopicMap = Arc<Mutex<Topics>>;

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
    let topics = TopicMap::default();
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

async fn handle_connection(topics: TopicMap, stream: TcpStream) {
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
    let (outgoing, incoming) = ws_stream.split();
    match route {
        Some(Route::Echo) => {
            // Pings are answered and the close is completed by the stream half itself.
            let _ = incoming
                .try_filter(|msg| future::ready(msg.is_text() || msg.is_binary()))
                .forward(outgoing)
                .await;
        }
        Some(Route::PubSub(topic)) => {
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
        None => {}
    }
}
