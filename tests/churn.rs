//! Connection churn: 2,000 connections opened, upgraded and closed, 50 at a time, leave no
//! connection counted as open, counters that add up, and no descriptor behind. A file of its
//! own because it counts the process's descriptors (`/proc/self/fd`), which other tests
//! running alongside would disturb; its two tests take turns for the same reason.

mod common;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use tokio_tungstenite::tungstenite::Message;
use wsring::engine::BackendChoice;

const CONNECTIONS: usize = 2_000;
const AT_ONCE: usize = 50;

/// The tests here count descriptors of the whole process: one at a time.
static DESCRIPTOR_COUNTING: Mutex<()> = Mutex::new(());

/// Connection `n` of the churn: a third close cleanly at once, a third echo a message
/// first, a third vanish without a close frame.
async fn one_connection(addr: SocketAddr, n: usize) {
    let mut ws = connect(addr, "/echo").await;
    match n % 3 {
        0 => close_normally(&mut ws).await,
        1 => {
            let text = format!("connection {n}");
            send(&mut ws, Message::text(text.clone())).await;
            assert_eq!(next_data(&mut ws).await, Message::text(text));
            close_normally(&mut ws).await;
        }
        _ => drop(ws),
    }
}

fn churn_leaves_nothing_open_and_no_descriptor_behind(backend: BackendChoice) {
    let _turn = DESCRIPTOR_COUNTING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rt = runtime();
    let server = TestServer::start(backend);
    let shared = server.shared();
    let addr = server.addr;
    let descriptors_before = open_descriptors();
    rt.block_on(async {
        for batch in 0..CONNECTIONS / AT_ONCE {
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..AT_ONCE {
                tasks.spawn(one_connection(addr, batch * AT_ONCE + i));
            }
            while let Some(done) = within(WAIT, "a batch of connections", tasks.join_next()).await {
                done.expect("connection task");
            }
        }
        let total = CONNECTIONS as u64;
        eventually(
            Duration::from_secs(5),
            "every churned connection to be closed and uncounted",
            || {
                open_connections(&shared) == 0
                    && shared.total(|s| &s.upgraded) == total
                    && shared.total(|s| &s.closed) == total
            },
        )
        .await;
        assert_eq!(shared.total(|s| &s.accepted), total);
        assert_eq!(shared.total(|s| &s.rejected), 0);
        let echoed = (0..CONNECTIONS).filter(|n| n % 3 == 1).count() as u64;
        assert_eq!(shared.total(|s| &s.messages_in), echoed);

        let metrics = http_exchange(addr, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .body_text();
        for line in [
            "wsring_connections_open 0".to_string(),
            format!("wsring_upgraded_total {total}"),
            format!("wsring_closed_total {total}"),
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line:?} in\n{metrics}");
        }
    });
    let descriptors_after = open_descriptors();
    assert!(
        descriptors_after <= descriptors_before + 4,
        "descriptors grew from {descriptors_before} to {descriptors_after} over {CONNECTIONS} connections"
    );
    server.stop();
}

/// Generates `io_uring::<name>` and `epoll::<name>` tests calling `<name>(backend)`.
macro_rules! for_both_backends {
    ($($name:ident),* $(,)?) => {
        mod io_uring {
            $( #[test] fn $name() { super::$name(wsring::engine::BackendChoice::IoUring) } )*
        }
        mod epoll {
            $( #[test] fn $name() { super::$name(wsring::engine::BackendChoice::Epoll) } )*
        }
    };
}

for_both_backends!(churn_leaves_nothing_open_and_no_descriptor_behind);
