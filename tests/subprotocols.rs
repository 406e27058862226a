//! What `wsring serve` answers to a client that offers subprotocols, seen from
//! tokio-tungstenite (which, like Chromium, fails a connection whose 101 names none of the
//! protocols it offered), and the bound on `/pubsub/<topic>` names. A real server on
//! 127.0.0.1 with the bench-protocol handler, on both backends: `io_uring::<name>` and
//! `epoll::<name>` (see the macro at the end).

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{Error, Message};
use wsring::cli::serve::{BenchProtocol, MAX_TOPIC_BYTES};
use wsring::engine::{BackendChoice, Server};

/// A browser's offer, in its order of preference.
const OFFER: &str = "chat.v2, chat.v1";

/// A server whose bench-protocol handler speaks `protocols` (what `--protocols` gives it),
/// aborted and joined on drop.
struct ProtocolServer {
    server: Option<Server>,
    addr: SocketAddr,
}

impl ProtocolServer {
    fn start(backend: BackendChoice, protocols: &[&str]) -> ProtocolServer {
        let config = test_config(backend);
        let protocols: std::sync::Arc<[String]> = protocols.iter().map(|p| p.to_string()).collect();
        let server = Server::start(config, move |handle| {
            BenchProtocol::new(handle).with_protocols(protocols.clone())
        })
        .unwrap_or_else(|e| panic!("{backend:?} server must start: {e}"));
        let expected = match backend {
            BackendChoice::IoUring => wsring::engine::Backend::IoUring,
            _ => wsring::engine::Backend::Epoll,
        };
        assert_eq!(server.backend(), expected, "the backend asked for runs");
        let addr = server.local_addr();
        ProtocolServer {
            server: Some(server),
            addr,
        }
    }
}

impl Drop for ProtocolServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.handle().abort();
            server.join();
        }
    }
}

/// Upgrades to `path` offering `offer` (None: no Sec-WebSocket-Protocol header); returns
/// the connection and the protocol the 101 named, or tungstenite's error.
async fn upgrade(
    addr: SocketAddr,
    path: &str,
    offer: Option<&str>,
) -> Result<(Ws, Option<String>), Error> {
    within(WAIT, &format!("upgrade to {path}"), async {
        let tcp = TcpStream::connect(addr).await.expect("TCP connect");
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let mut request = format!("ws://{addr}{path}")
            .into_client_request()
            .expect("request");
        if let Some(offer) = offer {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                offer.parse().expect("header value"),
            );
        }
        let (ws, response) = tokio_tungstenite::client_async(request, tcp).await?;
        assert_eq!(response.status(), 101);
        let protocol = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().expect("ASCII header").to_string());
        Ok((ws, protocol))
    })
    .await
}

/// Upgrades offering `offer`, checks the 101's protocol, and that a message echoes.
async fn echo_with(addr: SocketAddr, offer: Option<&str>, expected: Option<&str>) {
    let (mut ws, protocol) = upgrade(addr, "/echo", offer)
        .await
        .unwrap_or_else(|e| panic!("offering {offer:?}: {e}"));
    assert_eq!(protocol.as_deref(), expected, "offering {offer:?}");
    send(&mut ws, Message::text("after the handshake")).await;
    assert_eq!(
        next_data(&mut ws).await,
        Message::text("after the handshake"),
        "offering {offer:?}"
    );
    close_normally(&mut ws).await;
}

/// Without `--protocols` a browser's offer gets its own first choice back, and a client
/// that offers nothing gets no header.
fn without_a_list_the_clients_first_offer_is_answered(backend: BackendChoice) {
    let server = ProtocolServer::start(backend, &[]);
    block_on(async {
        echo_with(server.addr, Some(OFFER), Some("chat.v2")).await;
        echo_with(server.addr, None, None).await;
    });
}

/// With `--protocols chat.v1,chat.v2` the server's preference wins over the client's.
fn the_servers_preference_wins_among_the_offered(backend: BackendChoice) {
    let server = ProtocolServer::start(backend, &["chat.v1", "chat.v2"]);
    block_on(async {
        echo_with(server.addr, Some(OFFER), Some("chat.v1")).await;
        // Only one of the server's protocols offered: that one.
        echo_with(server.addr, Some("chat.v2"), Some("chat.v2")).await;
        echo_with(server.addr, None, None).await;
    });
}

/// With `--protocols mqtt` a client offering only others still gets its first offer (a
/// browser would fail the connection otherwise).
fn an_offer_of_only_unknown_protocols_gets_the_clients_first(backend: BackendChoice) {
    let server = ProtocolServer::start(backend, &["mqtt"]);
    block_on(async {
        echo_with(server.addr, Some(OFFER), Some("chat.v2")).await;
        echo_with(server.addr, None, None).await;
    });
}

/// A topic name of 300 bytes is refused with 414 before any upgrade; one of exactly
/// [`MAX_TOPIC_BYTES`] (256) is subscribed to, and its messages come back.
fn a_topic_longer_than_256_bytes_gets_414(backend: BackendChoice) {
    assert_eq!(MAX_TOPIC_BYTES, 256);
    let server = ProtocolServer::start(backend, &[]);
    block_on(async {
        let long = format!("/pubsub/{}", "t".repeat(300));
        match upgrade(server.addr, &long, None).await {
            Err(Error::Http(response)) => {
                assert_eq!(response.status(), 414);
                let body = response.body().as_deref().unwrap_or_default();
                assert!(
                    String::from_utf8_lossy(body).contains("longer than 256 bytes"),
                    "{response:?}"
                );
            }
            Err(e) => panic!("a 300-byte topic: expected HTTP 414, got {e}"),
            Ok((_, protocol)) => panic!("a 300-byte topic was accepted ({protocol:?})"),
        }

        let longest = format!("/pubsub/{}", "t".repeat(MAX_TOPIC_BYTES));
        let (mut ws, _) = upgrade(server.addr, &longest, Some(OFFER))
            .await
            .unwrap_or_else(|e| panic!("a 256-byte topic: {e}"));
        send(&mut ws, Message::text("to the longest topic")).await;
        assert_eq!(
            next_data(&mut ws).await,
            Message::text("to the longest topic")
        );
        close_normally(&mut ws).await;
    });
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod io_uring {
            $(
                #[test]
                fn $name() {
                    super::$name(wsring::engine::BackendChoice::IoUring);
                }
            )*
        }
        mod epoll {
            $(
                #[test]
                fn $name() {
                    super::$name(wsring::engine::BackendChoice::Epoll);
                }
            )*
        }
    };
}

on_both_backends!(
    without_a_list_the_clients_first_offer_is_answered,
    the_servers_preference_wins_among_the_offered,
    an_offer_of_only_unknown_protocols_gets_the_clients_first,
    a_topic_longer_than_256_bytes_gets_414,
);
