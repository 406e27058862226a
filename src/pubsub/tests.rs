//! The registry driven by an in-memory [`Subscribers`]: no slab, no socket, no eventfd.

use std::collections::HashMap;

use super::*;
use crate::proto::frame::FrameHeader;

/// A connection as the fake sees it: bytes queued and the entries that carried them.
#[derive(Default)]
struct Fake {
    queued: usize,
    entries: Vec<Bytes>,
    closed: bool,
    /// What `queue_with_policy` answers when the frame does not fit.
    full_answer: Option<SendStatus>,
    /// Takes broadcasts compressed.
    deflate: bool,
}

struct Fakes {
    conns: HashMap<u32, Fake>,
    soft: usize,
    hard: usize,
    policy_calls: usize,
}

impl Fakes {
    fn new(n: u32, soft: usize, hard: usize) -> Fakes {
        Fakes {
            conns: (0..n).map(|i| (i, Fake::default())).collect(),
            soft,
            hard,
            policy_calls: 0,
        }
    }

    fn conn(&mut self, id: u32) -> &mut Fake {
        self.conns.get_mut(&id).expect("a fake connection")
    }
}

impl Subscribers for Fakes {
    type Id = u32;

    fn room(&self, id: u32, len: usize, ahead: usize) -> Room {
        let Some(c) = self.conns.get(&id).filter(|c| !c.closed) else {
            return Room::Closed;
        };
        let queued = c.queued + ahead;
        if queued > 0 && queued + len > self.hard {
            Room::Full
        } else {
            Room::Fits {
                over_soft: queued + len > self.soft,
                deflate: c.deflate,
            }
        }
    }

    fn queue_run(&mut self, id: u32, run: &Bytes, twin: Option<&Bytes>) -> bool {
        match self.conns.get_mut(&id).filter(|c| !c.closed) {
            Some(c) => {
                let run = match twin {
                    Some(t) if c.deflate => t,
                    _ => run,
                };
                c.queued += run.len();
                c.entries.push(run.clone());
                true
            }
            None => false,
        }
    }

    fn queue_with_policy(
        &mut self,
        id: u32,
        frame: &Bytes,
        twin: &mut Twin<'_>,
        _topic: &ArcStr,
    ) -> SendStatus {
        self.policy_calls += 1;
        let room = self.room(id, frame.len(), 0);
        let c = self.conn(id);
        let frame = if c.deflate { twin.get() } else { frame };
        match room {
            Room::Closed => SendStatus::Closed,
            Room::Full => c.full_answer.unwrap_or(SendStatus::Dropped),
            Room::Fits { over_soft, .. } => {
                c.queued += frame.len();
                c.entries.push(frame.clone());
                if over_soft {
                    SendStatus::Backpressure
                } else {
                    SendStatus::Queued
                }
            }
        }
    }
}

/// The payloads of the server frames in `bytes`, in order.
fn payloads(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Ok(crate::proto::frame::Parsed::Complete { header, header_len }) =
        FrameHeader::parse(rest, 0)
    {
        let end = header_len + header.payload_len as usize;
        out.push(rest[header_len..end].to_vec());
        rest = &rest[end..];
    }
    assert!(rest.is_empty(), "a partial frame");
    out
}

fn registry_with(topic: &str, ids: &[u32]) -> (Registry<u32>, ArcStr) {
    let mut r = Registry::default();
    let key = r.intern(topic);
    for &id in ids {
        r.add(key.clone(), id);
    }
    (r, key)
}

#[test]
fn publishes_in_a_turn_reach_each_subscriber_as_one_run_in_order() {
    let (mut r, t) = registry_with("t", &[0, 1, 2]);
    let mut subs = Fakes::new(3, 1 << 20, 4 << 20);
    for msg in [&b"one"[..], b"two", b"three"] {
        let report = r.publish(&t, Frame::Message(OpCode::Text, msg), &mut subs);
        assert_eq!(report.queued, 3);
        assert_eq!(report.dropped + report.conflated + report.backpressured, 0);
    }
    assert!(r.has_pending());
    assert!(
        subs.conns.values().all(|c| c.entries.is_empty()),
        "not before the flush"
    );
    r.flush_pending(&mut subs);
    assert!(!r.has_pending());
    for id in 0..3 {
        let c = subs.conn(id);
        assert_eq!(c.entries.len(), 1, "one entry for the whole run");
        assert_eq!(
            payloads(&c.entries[0]),
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
    }
    // The run is one encoded copy, shared.
    let first = subs.conn(0).entries[0].as_ptr();
    assert_eq!(subs.conn(2).entries[0].as_ptr(), first);
}

#[test]
fn a_publish_to_another_topic_hands_out_the_pending_run_first() {
    let mut r = Registry::default();
    let (a, b) = (r.intern("a"), r.intern("b"));
    r.add(a.clone(), 0);
    r.add(b.clone(), 0);
    let mut subs = Fakes::new(1, 1 << 20, 4 << 20);
    r.publish(&a, Frame::Message(OpCode::Binary, b"to a"), &mut subs);
    r.publish(&b, Frame::Message(OpCode::Binary, b"to b"), &mut subs);
    assert_eq!(
        subs.conn(0).entries.len(),
        1,
        "a's run went out before b's frame"
    );
    r.flush_pending(&mut subs);
    let got: Vec<Vec<u8>> = subs
        .conn(0)
        .entries
        .iter()
        .flat_map(|e| payloads(e))
        .collect();
    assert_eq!(got, vec![b"to a".to_vec(), b"to b".to_vec()]);
}

#[test]
fn a_full_subscriber_sends_the_frame_through_each_policy_and_the_report_says_so() {
    let (mut r, t) = registry_with("t", &[0, 1, 2, 3]);
    let mut subs = Fakes::new(4, 100, 200);
    subs.conn(1).queued = 199; // past the hard limit with this 3-byte frame
    subs.conn(1).full_answer = Some(SendStatus::Conflated);
    subs.conn(2).queued = 150; // over soft, under hard
    subs.conn(3).closed = true;
    let report = r.publish(&t, Frame::Message(OpCode::Text, b"x"), &mut subs);
    assert_eq!(
        subs.policy_calls, 4,
        "the slow path asks every subscriber's policy"
    );
    assert_eq!(
        (
            report.queued,
            report.backpressured,
            report.conflated,
            report.dropped
        ),
        (2, 1, 1, 1)
    );
    assert!(!r.has_pending());
    assert_eq!(subs.conn(0).entries.len(), 1);
    assert!(subs.conn(1).entries.is_empty());
}

#[test]
fn a_large_frame_is_never_merged_into_a_run() {
    let (mut r, t) = registry_with("t", &[0, 1]);
    let mut subs = Fakes::new(2, 1 << 20, 4 << 20);
    r.publish(&t, Frame::Message(OpCode::Text, b"small"), &mut subs);
    let big = vec![7u8; PENDING_FRAME_MAX + 1];
    let report = r.publish(&t, Frame::Message(OpCode::Binary, &big), &mut subs);
    assert_eq!(report.queued, 2);
    for id in 0..2 {
        let c = subs.conn(id);
        assert_eq!(
            c.entries.len(),
            2,
            "the small run, then the large frame on its own"
        );
        assert_eq!(payloads(&c.entries[0]), vec![b"small".to_vec()]);
        assert_eq!(payloads(&c.entries[1]), vec![big.clone()]);
    }
    // The large frame is one encoded copy for both.
    assert_eq!(
        subs.conn(0).entries[1].as_ptr(),
        subs.conn(1).entries[1].as_ptr()
    );
}

#[test]
fn membership_counts_and_topics_nobody_is_left_on_are_forgotten() {
    let mut r: Registry<u32> = Registry::default();
    let key = r.intern("room");
    assert_eq!(r.add(key.clone(), 1), 1);
    assert_eq!(r.add(key.clone(), 2), 2);
    assert!(
        ArcStr::ptr_eq(&r.intern("room"), &key),
        "one name per topic"
    );
    assert_eq!(r.subscribers("room"), 2);
    assert_eq!(r.remove(&key, 1), 1);
    assert_eq!(r.remove(&key, 2), 0);
    // Positions: 10, 11, 12 at 0, 1, 2; removing 10 moves 12 into its place.
    for (i, id) in [10, 11, 12].into_iter().enumerate() {
        assert_eq!(r.add(key.clone(), id), i + 1);
    }
    assert_eq!(r.remove_at(&key, 10, 0), (2, Some((12, 0))));
    // A wrong position is not trusted: 11 is found where it is.
    assert_eq!(r.remove_at(&key, 11, 0), (1, None));
    assert_eq!(
        r.remove_at(&key, 99, 0),
        (1, None),
        "not a member: nothing removed"
    );
    assert_eq!(r.remove_at(&key, 12, 0), (0, None));
    assert!(r.is_empty());
    assert_eq!(r.key("room"), None);
    // Nobody subscribed: a publish queues nothing and leaves no run behind.
    let mut subs = Fakes::new(0, 1, 1);
    let report = r.publish(&key, Frame::Message(OpCode::Text, b"lost"), &mut subs);
    assert_eq!(report, PublishReport::default());
    assert!(!r.has_pending());
}

#[test]
fn an_encoded_frame_from_another_worker_joins_the_run_as_it_is() {
    let (mut r, t) = registry_with("t", &[0]);
    let mut subs = Fakes::new(1, 1 << 20, 4 << 20);
    let frame = encode_frame(OpCode::Binary, b"from elsewhere");
    r.publish(&t, Frame::Encoded(&frame), &mut subs);
    r.publish(&t, Frame::Message(OpCode::Binary, b"local"), &mut subs);
    r.flush_pending(&mut subs);
    assert_eq!(
        payloads(&subs.conn(0).entries[0]),
        vec![b"from elsewhere".to_vec(), b"local".to_vec()]
    );
}

/// Frames of `bytes` with their RSV1 bit and payload inflated when set.
fn inflated_payloads(bytes: &[u8]) -> Vec<(bool, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Ok(crate::proto::frame::Parsed::Complete { header, header_len }) =
        FrameHeader::parse(rest, 0b100)
    {
        let end = header_len + header.payload_len as usize;
        let payload = &rest[header_len..end];
        out.push(if header.rsv1 {
            let plain = crate::proto::deflate::inflate(payload, 1 << 20).expect("inflates");
            (true, plain.to_vec())
        } else {
            (false, payload.to_vec())
        });
        rest = &rest[end..];
    }
    assert!(rest.is_empty(), "a partial frame");
    out
}

#[test]
fn a_broadcast_is_compressed_once_for_every_deflate_subscriber() {
    let (mut r, t) = registry_with("t", &[0, 1, 2, 3]);
    r.set_deflate(Some(crate::proto::deflate::Params {
        threshold: 64,
        level: 1,
        window_bits: 15,
        client_context_takeover: false,
    }));
    let mut subs = Fakes::new(4, 1 << 20, 4 << 20);
    subs.conn(1).deflate = true;
    subs.conn(3).deflate = true;
    let big = vec![b'x'; 500];
    for msg in [&big[..], b"small", &big[..]] {
        r.publish(&t, Frame::Message(OpCode::Text, msg), &mut subs);
    }
    r.flush_pending(&mut subs);
    let want = vec![big.clone(), b"small".to_vec(), big.clone()];
    for id in [0, 2] {
        let got = inflated_payloads(&subs.conn(id).entries[0]);
        assert!(got.iter().all(|(z, _)| !z), "plain for {id}");
        assert_eq!(got.into_iter().map(|g| g.1).collect::<Vec<_>>(), want);
    }
    for id in [1, 3] {
        let got = inflated_payloads(&subs.conn(id).entries[0]);
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            vec![true, false, true],
            "compressed at or above the threshold only"
        );
        assert_eq!(got.into_iter().map(|g| g.1).collect::<Vec<_>>(), want);
    }
    // One compressed copy, shared by both.
    assert_eq!(
        subs.conn(1).entries[0].as_ptr(),
        subs.conn(3).entries[0].as_ptr()
    );
    assert!(subs.conn(1).entries[0].len() < subs.conn(0).entries[0].len() / 4);

    // Without a deflate subscriber nothing is compressed: a plain run only.
    let (mut r, t) = registry_with("u", &[0, 2]);
    r.set_deflate(Some(crate::proto::deflate::Params {
        threshold: 64,
        level: 1,
        window_bits: 15,
        client_context_takeover: false,
    }));
    r.publish(&t, Frame::Message(OpCode::Text, &big), &mut subs);
    assert!(r.pending.deflated.is_none());
    r.flush_pending(&mut subs);
}

#[test]
fn the_policy_path_compresses_a_frame_once_too() {
    let (mut r, t) = registry_with("t", &[0, 1, 2]);
    r.set_deflate(Some(crate::proto::deflate::Params {
        threshold: 64,
        level: 1,
        window_bits: 15,
        client_context_takeover: false,
    }));
    let mut subs = Fakes::new(3, 1 << 20, 4 << 20);
    subs.conn(1).deflate = true;
    subs.conn(2).deflate = true;
    // Larger than a run takes: through each connection's policy.
    let large = vec![b'y'; 20 * 1024];
    r.publish(&t, Frame::Message(OpCode::Binary, &large), &mut subs);
    assert_eq!(subs.policy_calls, 3);
    assert_eq!(
        subs.conn(1).entries[0].as_ptr(),
        subs.conn(2).entries[0].as_ptr()
    );
    let got = inflated_payloads(&subs.conn(2).entries[0]);
    assert_eq!(got, vec![(true, large.clone())]);
    assert_eq!(
        inflated_payloads(&subs.conn(0).entries[0]),
        vec![(false, large)]
    );
}
