//! `peer-sockudo-ws`: a BENCH_PROTOCOL.md server on sockudo-ws 3.1 (tokio runtime, default
//! features), written the way its `simple_echo` and `pubsub_echo` examples are: the
//! handshake is parsed with `parse_request` (routing on the path; bytes after the request
//! are handed to the stream), echo runs on a `WebSocketStream`, and pub/sub uses the
//! library's own `PubSub` registry (one unbounded channel per subscriber) and a `select!`
//! between the stream and that channel, as in `pubsub_echo`. Replies and deliveries are
//! queued with `feed`, which the library documents for batching: the stream flushes
//! before it waits for more input, so a burst goes out in one write. (`pubsub_echo`
//! splits the stream and `send`s each message, one write per delivery; the unsplit stream
//! with `feed` is the library's batching path, as `forward` is tokio-tungstenite's.)
//!
//! `--listen ADDR` (port 0 picks a free port), `--threads N` worker threads of a
//! multi-thread runtime (default 1). Prints `listening on ws://ADDR` once bound.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use sockudo_ws::handshake::{build_response, generate_accept_key, parse_request};
use sockudo_ws::{Config, Message, PubSub, Role, WebSocketStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use wsring_peers::{MAX_MESSAGE_SIZE, Route, serve};

fn main() -> std::io::Result<()> {
    serve(
        "BENCH_PROTOCOL server on sockudo-ws",
        |pubsub: Arc<PubSub>, stream| async move {
            let _ = handle_connection(stream, pubsub).await;
        },
    )
}

/// Reads the upgrade request, answers 101 (or 404 for an unknown path), and returns the
/// route and any bytes the client sent after the request.
async fn handshake(stream: &mut TcpStream) -> sockudo_ws::Result<Option<(Route, Option<Bytes>)>> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(sockudo_ws::Error::ConnectionClosed);
        }
        let Some((request, consumed)) = parse_request(&buf)? else {
            continue;
        };
        let Some(route) = Route::parse(&request.path) else {
            stream
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await?;
            return Ok(None);
        };
        let response = build_response(&generate_accept_key(request.key), None, None);
        stream.write_all(&response).await?;
        let leftover = (consumed < buf.len()).then(|| buf.split_off(consumed).freeze());
        return Ok(Some((route, leftover)));
    }
}

async fn handle_connection(mut stream: TcpStream, pubsub: Arc<PubSub>) -> sockudo_ws::Result<()> {
    let Some((route, leftover)) = handshake(&mut stream).await? else {
        return Ok(());
    };
    let config = Config::builder()
        .max_payload_length(MAX_MESSAGE_SIZE)
        .build();
    let ws = WebSocketStream::from_raw_with_leftover(stream, Role::Server, config, leftover);
    match route {
        Route::Echo => echo(ws).await,
        Route::PubSub(topic) => subscribe(ws, &topic, &pubsub).await,
    }
}

async fn echo(mut ws: WebSocketStream<TcpStream>) -> sockudo_ws::Result<()> {
    // Pings are answered by the stream; a Close is delivered once its reply is flushed.
    while let Some(msg) = ws.next().await {
        match msg? {
            msg @ (Message::Text(_) | Message::Binary(_)) => ws.feed(msg).await?,
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => {}
        }
    }
    Ok(())
}

async fn subscribe(
    mut ws: WebSocketStream<TcpStream>,
    topic: &str,
    pubsub: &PubSub,
) -> sockudo_ws::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = pubsub.create_subscriber(tx);
    pubsub.subscribe(id, topic);
    let result = loop {
        tokio::select! {
            msg = ws.next() => match msg {
                // Payloads are `Bytes`: every subscriber's copy shares them.
                Some(Ok(msg @ (Message::Text(_) | Message::Binary(_)))) => {
                    pubsub.publish(topic, msg);
                }
                Some(Ok(Message::Close(_))) | None => break Ok(()),
                Some(Ok(_)) => {} // Pings are answered by the stream
                Some(Err(e)) => break Err(e),
            },
            Some(msg) = rx.recv() => {
                // Queue everything pending; `next()` flushes before it waits for input.
                let mut queued = ws.feed(msg).await;
                while let (Ok(()), Ok(msg)) = (&queued, rx.try_recv()) {
                    queued = ws.feed(msg).await;
                }
                if let Err(e) = queued {
                    break Err(e);
                }
            }
        }
    };
    pubsub.remove_subscriber(id);
    result
}
