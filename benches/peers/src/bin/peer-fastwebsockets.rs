//! `peer-fastwebsockets`: a BENCH_PROTOCOL.md server on fastwebsockets 0.10, written the
//! way its `echo_server` and `echo_server_split` examples are: hyper 1 serves the HTTP/1.1
//! upgrade (`upgrade::upgrade`), echo runs a `FragmentCollector` in an unconstrained task,
//! and pub/sub splits the socket into a `FragmentCollectorRead` (this task) and a
//! `WebSocketWrite` owned by a writer task that drains an unbounded channel into a
//! buffered write half. The
//! registry maps a topic to the channels of its subscribers; a published payload is
//! copied once into `Bytes` and shared by every subscriber's queue.
//!
//! `--listen ADDR` (port 0 picks a free port), `--threads N` worker threads of a
//! multi-thread runtime (default 1). Prints `listening on ws://ADDR` once bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fastwebsockets::{
    FragmentCollector, FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError, upgrade,
};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::BufWriter;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use wsring_peers::{MAX_MESSAGE_SIZE, Route, serve};

/// One frame queued for a connection's writer task.
#[derive(Debug)]
struct Outgoing {
    opcode: OpCode,
    payload: Bytes,
}

type Tx = UnboundedSender<Outgoing>;

/// Subscribers per topic, each with an id so it can leave.
#[derive(Default)]
struct Topics {
    next_id: u64,
    subscribers: HashMap<String, Vec<(u64, Tx)>>,
}

type TopicMap = Arc<Mutex<Topics>>;

fn main() -> std::io::Result<()> {
    serve(
        "BENCH_PROTOCOL server on fastwebsockets",
        |topics: TopicMap, stream| async move {
            let service = service_fn(move |request| server_upgrade(request, topics.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        },
    )
}

async fn server_upgrade(
    mut request: Request<Incoming>,
    topics: TopicMap,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let Some(route) = Route::parse(request.uri().path()) else {
        let mut not_found = Response::new(Empty::new());
        *not_found.status_mut() = StatusCode::NOT_FOUND;
        return Ok(not_found);
    };
    let (response, upgrade) = upgrade::upgrade(&mut request)?;
    tokio::spawn(async move {
        let _ = match route {
            Route::Echo => tokio::task::unconstrained(echo(upgrade)).await,
            Route::PubSub(topic) => pubsub(upgrade, topic, topics).await,
        };
    });
    Ok(response)
}

async fn echo(upgrade: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = upgrade.await?;
    ws.set_max_message_size(MAX_MESSAGE_SIZE);
    // Pongs and the close reply are sent by the collector itself (auto_pong, auto_close).
    let mut ws = FragmentCollector::new(ws);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
}

async fn pubsub(
    upgrade: upgrade::UpgradeFut,
    topic: String,
    topics: TopicMap,
) -> Result<(), WebSocketError> {
    let mut ws = upgrade.await?;
    ws.set_max_message_size(MAX_MESSAGE_SIZE);
    // The write half is buffered and flushed once the queue is empty, so a burst of
    // deliveries goes out in one write (`WebSocketWrite::flush` exists for buffered
    // streams); tokio-tungstenite's `forward` and sockudo-ws's `feed` batch the same way.
    let (reader, mut writer) = ws.split(|io| {
        let (read, write) = tokio::io::split(io);
        (read, BufWriter::with_capacity(64 * 1024, write))
    });
    let mut reader = FragmentCollectorRead::new(reader);

    let (tx, mut rx) = unbounded_channel::<Outgoing>();
    let id = {
        let mut topics = topics.lock().unwrap();
        let id = topics.next_id;
        topics.next_id += 1;
        topics
            .subscribers
            .entry(topic.clone())
            .or_default()
            .push((id, tx.clone()));
        id
    };
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let frame = Frame::new(true, out.opcode, None, Payload::Borrowed(&out.payload));
            writer.write_frame(frame).await?;
            if out.opcode == OpCode::Close {
                writer.flush().await?;
                break;
            }
            if rx.is_empty() {
                writer.flush().await?;
            }
        }
        Ok::<_, WebSocketError>(())
    });

    // Pongs and the close reply ("obligated sends") go through the writer's queue, after
    // whatever it already holds.
    let mut obligated = |frame: Frame| {
        let queued = tx.send(Outgoing {
            opcode: frame.opcode,
            payload: Bytes::copy_from_slice(&frame.payload),
        });
        async move { queued.map_err(|_| "writer task is gone") }
    };
    let result = loop {
        let frame = match reader.read_frame(&mut obligated).await {
            Ok(frame) => frame,
            Err(e) => break Err(e),
        };
        match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                let payload = Bytes::copy_from_slice(&frame.payload);
                let topics = topics.lock().unwrap();
                for (_, subscriber) in topics.subscribers.get(&topic).into_iter().flatten() {
                    let _ = subscriber.send(Outgoing {
                        opcode: frame.opcode,
                        payload: payload.clone(),
                    });
                }
            }
            OpCode::Close => break Ok(()),
            _ => {}
        }
    };

    {
        let mut topics = topics.lock().unwrap();
        if let Some(subscribers) = topics.subscribers.get_mut(&topic) {
            subscribers.retain(|(other, _)| *other != id);
            if subscribers.is_empty() {
                topics.subscribers.remove(&topic);
            }
        }
    }
    // The writer ends after the close reply, or once every sender is gone and its queue
    // is drained.
    drop(tx);
    let _ = writer.await;
    result
}
