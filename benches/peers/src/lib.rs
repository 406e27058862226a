//! What the Rust peers of `scripts/bench.sh` share, so that each binary is only what its
//! library does: the command line, the routes of BENCH_PROTOCOL.md, the runtime, the
//! accept loop, and (for the two tokio-tungstenite peers) the routed upgrade.

use std::future::Future;
use std::net::SocketAddr;

use clap::{CommandFactory, FromArgMatches, Parser};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Largest message (and frame) a peer accepts.
pub const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// Every peer's flags.
#[derive(Parser, Debug)]
pub struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9001")]
    pub listen: SocketAddr,
    /// Worker threads of the tokio multi-thread runtime.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// What the request path asked for.
pub enum Route {
    Echo,
    PubSub(String),
}

impl Route {
    /// `/echo` or `/pubsub/<topic>` (a query is ignored).
    pub fn parse(path: &str) -> Option<Route> {
        let path = path.split('?').next().unwrap_or(path);
        match path {
            "/echo" => Some(Route::Echo),
            _ => path
                .strip_prefix("/pubsub/")
                .filter(|topic| !topic.is_empty())
                .map(|topic| Route::PubSub(topic.to_owned())),
        }
    }
}

/// A peer's whole `main`: parses the flags (`about` for `--help`), starts a tokio
/// multi-thread runtime with `--threads` workers, binds `--listen`, prints
/// `listening on ws://ADDR`, and spawns `handle(state, stream)` for every accepted stream
/// (TCP_NODELAY set), `state` being one shared value (a topic map) made by `Default`.
/// When accept fails (out of descriptors and the like) it backs off 10 ms instead of
/// spinning.
pub fn serve<S, F, Fut>(about: &'static str, handle: F) -> std::io::Result<()>
where
    S: Default + Clone + Send + 'static,
    F: Fn(S, TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let matches = Args::command().about(about).get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(args.listen).await?;
            println!("listening on ws://{}", listener.local_addr()?);
            let state = S::default();
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(handle(state.clone(), stream));
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
        })
}

/// tokio-tungstenite's upgrade as its examples do it (`accept_hdr_async` with a callback
/// that routes on the path; 404 for another path), accepting 16 MiB messages.
pub async fn tungstenite_accept(stream: TcpStream) -> Option<(Route, WebSocketStream<TcpStream>)> {
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
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config))
        .await
        .ok()?;
    Some((route?, ws))
}
