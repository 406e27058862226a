use super::*;

#[test]
fn validate_refuses_configurations_that_cannot_work() {
    assert_eq!(EngineConfig::default().validate(), Ok(()));
    let b = Server::builder();
    assert_eq!(
        b.clone().threads(65).validate(),
        Err(ConfigError::TooManyThreads(65))
    );
    assert_eq!(
        b.clone().max_message_size(0).validate(),
        Err(ConfigError::Zero("max_message_size"))
    );
    assert_eq!(
        b.clone().send_queue_soft(2).send_queue_hard(1).validate(),
        Err(ConfigError::SoftAboveHard { soft: 2, hard: 1 })
    );
    assert_eq!(
        b.clone().pong_timeout(Duration::ZERO).validate(),
        Err(ConfigError::Zero("pong_timeout"))
    );
    assert_eq!(
        b.clone().reassembly_budget(0).validate(),
        Err(ConfigError::Zero("reassembly_budget"))
    );
    assert_eq!(
        b.clone().write_batch(0).validate(),
        Err(ConfigError::Zero("write_batch"))
    );
    assert_eq!(
        b.clone().drain_close_code(CloseCode::Abnormal).validate(),
        Err(ConfigError::BadCloseCode(1006))
    );
    assert_eq!(
        b.clone().max_header_bytes(10).validate(),
        Err(ConfigError::HeaderLimitTooSmall(10))
    );
    assert_eq!(b.drain_close_code(CloseCode::Restart).validate(), Ok(()));
}

#[test]
fn handler_publishes_to_a_full_inbox_are_counted_not_queued() {
    let config = EngineConfig {
        max_connections: 10,
        ..EngineConfig::default()
    };
    let shared = Shared::new(config, 2, Backend::Epoll, None, None).unwrap();
    let topic = arcstr::ArcStr::from("t");
    let frame = Bytes::from(vec![0u8; 64 * 1024]);
    let (mut taken, mut attempts) = (0, 0);
    while attempts < 2 * HANDLE_QUEUE_LIMIT / frame.len() {
        taken += shared.forward(1 << 1, &topic, &frame, Some(0));
        attempts += 1;
    }
    let pending = shared.inboxes[1].pending_bytes.load(Ordering::Acquire);
    assert!(
        pending <= HANDLE_QUEUE_LIMIT + frame.len(),
        "{pending} bytes queued"
    );
    let dropped = shared.stats[0].forward_dropped.load(Ordering::Relaxed);
    assert_eq!(taken + dropped as usize, attempts);
    assert!(dropped > 0);
    // Once the worker takes its commands, there is room again.
    assert_eq!(shared.take_commands(1).len(), taken);
    assert_eq!(shared.forward(1 << 1, &topic, &frame, Some(0)), 1);
    // `Handle::publish` (from = None) has waited for room itself: never refused.
    for _ in 0..2 * HANDLE_QUEUE_LIMIT / frame.len() {
        assert_eq!(shared.forward(1 << 1, &topic, &frame, None), 1);
    }
}

#[test]
fn the_socket_limit_leaves_room_for_handshakes_within_the_descriptors() {
    assert_eq!(socket_limit(1000, 1 << 20), 1000 + 125 + 16);
    assert_eq!(socket_limit(19_936, 20_000), 20_000 - 32);
    assert_eq!(socket_limit(usize::MAX, u64::MAX), usize::MAX - 32);
    assert_eq!(socket_limit(0, 10), 1);
}

#[test]
fn accept_failures_for_resources_pause_with_a_growing_backoff() {
    let stats = WorkerStats::default();
    let mut b = AcceptBackoff::new();
    let t0 = Instant::now();
    assert!(b.ready(t0) && !b.paused());
    // A client that reset before its accept: counted, no pause.
    assert!(!b.failed(0, libc::ECONNABORTED, &stats, t0));
    assert!(b.ready(t0));
    assert!(b.failed(0, libc::EMFILE, &stats, t0));
    assert!(b.paused());
    assert!(!b.ready(t0 + Duration::from_millis(9)));
    assert!(b.ready(t0 + Duration::from_millis(10)));
    // Failing on: 20 ms, 40 ms, ... up to 1 s.
    assert!(b.failed(0, libc::ENFILE, &stats, t0));
    assert!(!b.ready(t0 + Duration::from_millis(19)));
    for _ in 0..20 {
        b.failed(0, libc::EMFILE, &stats, t0);
    }
    assert!(!b.ready(t0 + Duration::from_millis(999)));
    assert!(b.ready(t0 + Duration::from_secs(1)));
    // Success starts again from the shortest pause.
    b.succeeded();
    assert!(b.failed(0, libc::EMFILE, &stats, t0));
    assert!(b.ready(t0 + Duration::from_millis(10)));
    assert_eq!(stats.accept_errors.load(Ordering::Relaxed), 24);
    // One WARN per 10 s: the failures in between are only counted.
    assert_eq!(b.suppressed, 23);
}

#[test]
fn a_port_in_use_is_reported_with_its_address() {
    // A listener without SO_REUSEPORT holds the port, so wsring's bind fails.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let err = Server::builder()
        .listen(addr)
        .threads(1)
        .start(super::testing::EchoPubSub::new)
        .err()
        .expect("the port is taken");
    assert!(
        matches!(&err, StartError::Bind { addr: a, .. } if *a == addr),
        "{err:?}"
    );
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().starts_with(&addr.to_string()), "{err}");
    // A program whose main returns io::Result keeps the kind through `?`.
    assert_eq!(
        std::io::Error::from(err).kind(),
        std::io::ErrorKind::AddrInUse
    );
}

#[test]
fn an_invalid_configuration_does_not_start() {
    let err = Server::builder()
        .send_queue_soft(10)
        .send_queue_hard(5)
        .listen("127.0.0.1:0".parse().unwrap())
        .start(super::testing::EchoPubSub::new)
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            StartError::Config(ConfigError::SoftAboveHard { soft: 10, hard: 5 })
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn a_connection_tag_names_the_settings_it_negotiated() {
    // Plain connections (tag 0) get the server's settings, without an extension.
    let plain = Shared::detached(EngineConfig::default()).unwrap();
    assert_eq!(plain.deflate_tag(15, true), 0, "no deflate offered: no tag");
    assert_eq!(plain.proto_config(0).deflate, None);
    assert_eq!(plain.proto_config(0).allowed_rsv, 0);

    let config = EngineConfig {
        deflate: Some(DeflateConfig::default()),
        max_message_size: 4096,
        ..EngineConfig::default()
    };
    let shared = Shared::detached(config).unwrap();
    let small = shared.deflate_tag(10, false);
    let large = shared.deflate_tag(15, true);
    assert_ne!(small, 0);
    assert_ne!(large, 0);
    assert_ne!(small, large);
    assert_eq!(
        shared.deflate_tag(10, false),
        small,
        "one tag per combination"
    );
    for (tag, bits, takeover) in [(small, 10, false), (large, 15, true)] {
        let c = shared.proto_config(tag);
        let d = c.deflate.expect("a deflate tag has deflate settings");
        assert_eq!((d.window_bits, d.client_context_takeover), (bits, takeover));
        assert_eq!(c.allowed_rsv, 0b100);
        assert_eq!(c.max_message_size, 4096, "the server's limits still apply");
    }
    // A tag no call made: the plain settings, never a panic.
    assert_eq!(shared.proto_config(200).deflate, None);
    assert_eq!(shared.proto_config(0).deflate, None);
}
