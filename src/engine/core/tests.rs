use std::collections::HashMap;
use std::time::Duration;

use super::*;
use crate::engine::testing::EchoPubSub;
use crate::engine::{EngineConfig, Handle};
use crate::proto::frame::encode_client_frame;

/// Records the order of writes and accepts each in full.
#[derive(Default)]
struct Recorder {
    writes: Vec<(ConnId, Vec<u8>)>,
}

impl Driver for Recorder {
    fn send(
        &mut self,
        id: ConnId,
        _fd: u32,
        bufs: &mut dyn Iterator<Item = &[u8]>,
        _last: bool,
    ) -> SendOutcome {
        let bytes: Vec<u8> = bufs.flat_map(|b| b.iter().copied()).collect();
        let n = bytes.len();
        self.writes.push((id, bytes));
        SendOutcome::Wrote { n, all: true }
    }
    fn close(&mut self, _id: ConnId, _fd: u32) -> bool {
        true
    }
    fn shutdown_write(&mut self, _id: ConnId, _fd: u32) {}
    fn set_reading(&mut self, _id: ConnId, _fd: u32, _on: bool) {}
}

fn masked(payload: &[u8]) -> Vec<u8> {
    encode_client_frame(OpCode::Binary, payload, [9, 8, 7, 6])
}

/// A worker core running the bench protocol, detached from any backend.
fn bench_core(config: EngineConfig, now: Instant) -> Core<EchoPubSub> {
    let shared = Shared::detached(config).expect("shared state");
    Core::new(
        0,
        shared.clone(),
        EchoPubSub::new(Handle::from_shared(shared)),
        now,
    )
}

/// Accepts socket `fd` and upgrades it on `/pubsub/t` (a subscriber of `t`).
fn subscriber(core: &mut Core<EchoPubSub>, fd: u32, now: Instant) -> ConnId {
    let id = core.on_accept(fd, now);
    let mut req = b"GET /pubsub/t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec();
    core.on_data(id, &mut req, now);
    id
}

#[test]
fn a_run_reaches_every_subscriber_in_one_write_and_the_publisher_last() {
    let now = Instant::now();
    let mut core = bench_core(EngineConfig::default(), now);
    let mut driver = Recorder::default();
    let ids: Vec<ConnId> = (0..5u32).map(|fd| subscriber(&mut core, fd, now)).collect();
    core.flush(&mut driver);
    driver.writes.clear();
    // The first subscriber publishes three messages in one read.
    let publisher = ids[0];
    let mut data: Vec<u8> = [b"one".as_slice(), b"two", b"three"]
        .iter()
        .flat_map(|p| masked(p))
        .collect();
    core.on_data(publisher, &mut data, now);
    core.flush(&mut driver);
    let expected: Vec<u8> = [b"one".as_slice(), b"two", b"three"]
        .iter()
        .flat_map(|p| encode_frame(OpCode::Binary, p).to_vec())
        .collect();
    let order: Vec<ConnId> = driver.writes.iter().map(|(id, _)| *id).collect();
    assert_eq!(order.len(), 5, "one write per subscriber: {order:?}");
    assert_eq!(order.last(), Some(&publisher), "{order:?}");
    for (id, bytes) in &driver.writes {
        assert_eq!(bytes, &expected, "what {id:?} got");
    }
}

#[test]
fn a_fanout_wider_than_a_batch_is_written_over_several_turns_in_order() {
    const BATCH: usize = 16;
    let config = EngineConfig {
        write_batch: BATCH,
        ..EngineConfig::default()
    };
    let now = Instant::now();
    let mut core = bench_core(config, now);
    let mut driver = Recorder::default();
    let mut ids = Vec::new();
    let n = BATCH + BATCH / 2;
    for fd in 0..n as u32 {
        ids.push(subscriber(&mut core, fd, now));
        if core.inner.dirty.len() >= BATCH {
            core.flush(&mut driver);
        }
    }
    while core.has_dirty() {
        core.flush(&mut driver);
    }
    driver.writes.clear();
    // The last to subscribe publishes: its place in the queue is the end.
    let publisher = *ids.last().expect("connections");
    core.on_data(publisher, &mut masked(b"one"), now);
    core.flush(&mut driver);
    let first: Vec<ConnId> = driver.writes.iter().map(|(id, _)| *id).collect();
    // The publisher's own entry (its read made it due) may take a place in the batch.
    let written = first.len() - 1;
    assert!(
        (BATCH - 1..=BATCH).contains(&written),
        "one batch: {written}"
    );
    assert_eq!(
        first.first(),
        Some(&publisher),
        "a pass that spans turns: the publisher's copy starts its turn"
    );
    assert_eq!(first[1..], ids[..written], "queue order");
    assert!(core.has_dirty(), "the rest waits for the next turn");
    // A second publish before the rest is written: those still waiting get both
    // messages in one write, ahead of those written already.
    core.on_data(publisher, &mut masked(b"two"), now);
    driver.writes.clear();
    let mut turns = 0;
    while core.has_dirty() {
        let before = driver.writes.len();
        core.flush(&mut driver);
        assert!(driver.writes.len() - before <= BATCH + 1);
        turns += 1;
        assert!(turns < 10, "the queue drains");
    }
    let one = encode_frame(OpCode::Binary, b"one").to_vec();
    let two = encode_frame(OpCode::Binary, b"two").to_vec();
    // Everyone is due again (more than a batch): the publisher's copy first, then those
    // still waiting, ahead of those written already.
    assert_eq!(driver.writes[0].0, publisher, "the publisher's copy first");
    assert_eq!(driver.writes[1].0, ids[written], "the waiting come first");
    assert_eq!(driver.writes[1].1, [one.clone(), two.clone()].concat());
    let mut got: HashMap<ConnId, Vec<u8>> = HashMap::new();
    for (id, bytes) in first
        .iter()
        .map(|id| (*id, one.clone()))
        .chain(driver.writes)
    {
        got.entry(id).or_default().extend_from_slice(&bytes);
    }
    assert_eq!(got.len(), n);
    for id in &ids {
        assert_eq!(
            got[id],
            [one.clone(), two.clone()].concat(),
            "what {id:?} got"
        );
    }
}

#[test]
fn subscribers_leaving_in_any_order_leave_exactly_the_others_listed() {
    // Members are kept in a plain list with each one's index in its slot: every leave
    // moves the last member into the hole, whose index must follow.
    let now = Instant::now();
    let mut core = bench_core(EngineConfig::default(), now);
    let mut driver = Recorder::default();
    let ids: Vec<ConnId> = (0..40u32)
        .map(|fd| subscriber(&mut core, fd, now))
        .collect();
    core.flush(&mut driver);
    // Leave from the front, the middle and the end, so that moved members move again.
    let mut gone = std::collections::HashSet::new();
    for i in [0usize, 39, 7, 1, 38, 20, 21, 5, 37, 2, 19, 36] {
        core.on_closed(ids[i]);
        gone.insert(ids[i]);
        assert_eq!(core.inner.registry.subscribers("t"), ids.len() - gone.len());
        // Every member's slot knows where it is (a stale index would only be found again
        // by a search: checked here, not relied on).
        for (at, id) in core.inner.registry.members("t").iter().enumerate() {
            let slot = core
                .inner
                .slots
                .get_mut(*id as usize)
                .expect("a listed member is open");
            assert_eq!(
                slot.topic.as_ref().map(|m| m.pos),
                Some(at as u32),
                "{id:?}"
            );
        }
    }
    let publisher = ids[10];
    core.on_data(publisher, &mut masked(b"after"), now);
    driver.writes.clear();
    while core.has_dirty() {
        core.flush(&mut driver);
    }
    let frame = encode_frame(OpCode::Binary, b"after").to_vec();
    let got: std::collections::HashSet<ConnId> = driver
        .writes
        .iter()
        .filter(|(_, bytes)| bytes == &frame)
        .map(|(id, _)| *id)
        .collect();
    let want: std::collections::HashSet<ConnId> = ids
        .iter()
        .copied()
        .filter(|id| !gone.contains(id))
        .collect();
    assert_eq!(
        got, want,
        "exactly the members still listed get the publication"
    );
    // A second topic for some, then leaving the first one: the second moves into the
    // slot's own place, and both lists keep their indexes right.
    let left: Vec<ConnId> = ids
        .iter()
        .copied()
        .filter(|id| !gone.contains(id))
        .collect();
    for id in left.iter().step_by(2) {
        assert!(core.inner.subscribe(*id, "u"));
    }
    for id in left.iter().take(9) {
        assert!(core.inner.unsubscribe(*id, "t"));
    }
    for topic in ["t", "u"] {
        for (at, id) in core.inner.registry.members(topic).iter().enumerate() {
            let slot = core
                .inner
                .slots
                .get_mut(*id as usize)
                .expect("listed and open");
            assert_eq!(
                slot.member_mut(topic).map(|m| m.pos),
                Some(at as u32),
                "{topic} {id:?}"
            );
        }
    }
    assert_eq!(core.inner.registry.subscribers("t"), left.len() - 9);
    assert_eq!(core.inner.registry.subscribers("u"), left.len().div_ceil(2));
    // Everyone leaves; the topics are forgotten.
    for id in &ids {
        if !gone.contains(id) {
            core.on_closed(*id);
        }
    }
    assert_eq!(core.inner.registry.subscribers("t"), 0);
    assert!(core.inner.registry.is_empty());
}

/// The wheel's lists run through the slab: connections freed while on it, slots taken
/// again by new ones, deadlines moved earlier (a read) and later, must leave every live
/// connection pinged once when its silence is up, and the freed ones never.
#[test]
fn the_wheel_follows_freed_and_reused_slots() {
    let t0 = Instant::now();
    let ping = Duration::from_millis(500);
    let config = EngineConfig {
        ping_interval: Some(ping),
        pong_timeout: Duration::from_secs(60),
        ..EngineConfig::default()
    };
    let mut core = bench_core(config, t0);
    let mut driver = Recorder::default();
    let mut live: Vec<ConnId> = (0..64u32).map(|fd| subscriber(&mut core, fd, t0)).collect();
    core.flush(&mut driver);
    // Every third one leaves while on the wheel; new ones take their slots 100 ms later.
    let gone: Vec<ConnId> = live.iter().copied().step_by(3).collect();
    live.retain(|id| !gone.contains(id));
    for &id in &gone {
        core.on_eof(id);
    }
    core.flush(&mut driver);
    let t1 = t0 + Duration::from_millis(100);
    core.on_tick(t1);
    let fresh: Vec<ConnId> = (100..100 + gone.len() as u32)
        .map(|fd| subscriber(&mut core, fd, t1))
        .collect();
    assert!(
        fresh.iter().any(|f| gone.iter().any(|g| g.slot == f.slot)),
        "slots are reused"
    );
    // Some of the first ones read at 200 ms: their silence starts again.
    let t2 = t0 + Duration::from_millis(200);
    let readers: Vec<ConnId> = live.iter().copied().step_by(2).collect();
    for &id in &readers {
        let mut frame = encode_client_frame(OpCode::Pong, b"", [1, 2, 3, 4]);
        core.on_data(id, &mut frame, t2);
    }
    core.flush(&mut driver);
    driver.writes.clear();
    let pinged = |driver: &Recorder| -> Vec<ConnId> {
        let mut ids: Vec<ConnId> = driver
            .writes
            .iter()
            .filter(|(_, b)| b.first() == Some(&0x89))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_by_key(|id| (id.slot, id.generation));
        ids
    };
    let sorted = |mut v: Vec<ConnId>| {
        v.sort_by_key(|id| (id.slot, id.generation));
        v
    };
    let quiet: Vec<ConnId> = live
        .iter()
        .copied()
        .filter(|id| !readers.contains(id))
        .collect();
    // At 560 ms: the quiet first ones (silent since 0).
    let step = |at: u64, core: &mut Core<EchoPubSub>, driver: &mut Recorder| {
        core.on_tick(t0 + Duration::from_millis(at));
        core.flush(driver);
        let p = pinged(driver);
        driver.writes.clear();
        p
    };
    assert_eq!(step(560, &mut core, &mut driver), sorted(quiet));
    // At 660 ms: the fresh ones (since 100); at 760 ms: the readers (since 200).
    assert_eq!(step(660, &mut core, &mut driver), sorted(fresh));
    assert_eq!(step(760, &mut core, &mut driver), sorted(readers));
    assert!(step(900, &mut core, &mut driver).is_empty());
}

/// A socket in its handshake has nothing boxed: a request that comes whole is parsed
/// where it was read; one split across reads is kept until it is whole, and the bytes
/// after it in the same read are the connection's first frames.
#[test]
fn a_handshake_boxes_only_a_request_split_across_reads() {
    let now = Instant::now();
    let mut core = bench_core(EngineConfig::default(), now);
    let mut driver = Recorder::default();
    let extra = |core: &Core<EchoPubSub>, id: ConnId| {
        core.inner.slots[id.slot as usize]
            .extra
            .as_ref()
            .map(|e| e.request.len())
    };
    let whole = subscriber(&mut core, 1, now);
    assert_eq!(extra(&core, whole), None, "a whole request keeps nothing");

    let id = core.on_accept(2, now);
    assert_eq!(extra(&core, id), None, "an accepted socket has no Extra");
    let req = b"GET /pubsub/t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let (a, b) = req.split_at(30);
    let (b, c) = b.split_at(40);
    core.on_data(id, &mut a.to_vec(), now);
    assert_eq!(extra(&core, id), Some(30));
    core.on_data(id, &mut b.to_vec(), now);
    assert_eq!(extra(&core, id), Some(70));
    // The end of the request and a frame in one read.
    let mut last = c.to_vec();
    last.extend(masked(b"hello"));
    core.on_data(id, &mut last, now);
    assert_eq!(extra(&core, id), None, "nothing kept once upgraded");
    core.flush(&mut driver);
    let to_it: Vec<u8> = driver
        .writes
        .iter()
        .filter(|(w, _)| *w == id)
        .flat_map(|(_, b)| b.iter().copied())
        .collect();
    assert!(to_it.starts_with(b"HTTP/1.1 101 "), "{to_it:?}");
    // The frame after the request was published to `t`: both subscribers have it.
    let frame = encode_frame(OpCode::Binary, b"hello");
    assert!(to_it.ends_with(&frame), "{to_it:?}");
    assert!(
        driver
            .writes
            .iter()
            .any(|(w, b)| *w == whole && b.ends_with(&frame))
    );
}

/// The handshake deadline is the slot's place on the wheel: it holds until the deadline
/// and drops the socket once it has passed, never before.
#[test]
fn a_handshake_deadline_drops_the_socket_once_passed_and_not_before() {
    let t0 = Instant::now();
    let timeout = Duration::from_millis(300);
    let config = EngineConfig {
        handshake_timeout: timeout,
        ..EngineConfig::default()
    };
    let mut core = bench_core(config, t0);
    let id = core.on_accept(1, t0);
    let dead = |core: &Core<EchoPubSub>| core.inner.slots[id.slot as usize].flags.has(Flags::DEAD);
    core.on_tick(t0 + timeout - Duration::from_millis(1));
    assert!(!dead(&core), "dropped before its deadline");
    core.on_tick(t0 + timeout + crate::engine::wheel::TICK);
    assert!(dead(&core), "not dropped once its deadline passed");
}

/// The registries list slot indexes: a connection that takes the slot of a subscriber
/// that left gets none of that subscriber's publications.
#[test]
fn a_slot_taken_again_inherits_no_membership() {
    let now = Instant::now();
    let mut core = bench_core(EngineConfig::default(), now);
    let mut driver = Recorder::default();
    let publisher = subscriber(&mut core, 1, now);
    let leaver = subscriber(&mut core, 2, now);
    core.flush(&mut driver);
    core.on_eof(leaver);
    core.flush(&mut driver);
    core.on_closed(leaver);
    // An echo connection (no topic) takes the slot.
    let id = core.on_accept(3, now);
    assert_eq!(id.slot, leaver.slot, "the slot is reused");
    let mut req = b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec();
    core.on_data(id, &mut req, now);
    core.flush(&mut driver);
    driver.writes.clear();
    core.on_data(publisher, &mut masked(b"to t"), now);
    core.flush(&mut driver);
    let frame = encode_frame(OpCode::Binary, b"to t");
    let got: Vec<ConnId> = driver
        .writes
        .iter()
        .filter(|(_, b)| b.ends_with(&frame))
        .map(|(w, _)| *w)
        .collect();
    assert_eq!(got, vec![publisher], "only the topic's one subscriber");
    assert_eq!(core.inner.registry.members("t"), &[publisher.slot]);
}
