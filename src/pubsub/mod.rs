//! Pub/sub: the per-worker topic registry and its fan-out, the cross-worker directory, and
//! the result types of sending and publishing.
//!
//! A worker's [`Registry`] maps each topic to its local subscribers. A publish is checked
//! against every subscriber's queue limits and, when all of them can take it (the usual
//! case), encoded once onto the turn's *pending run* of frames for its topic; the run is
//! handed to every subscriber as one queue entry when the turn ends, or before anything
//! that could reorder it ([`Registry::flush_pending`]). A subscriber therefore costs one
//! queue operation and one write per turn, not per message. When a subscriber cannot take
//! it, the run is handed out first and this frame goes to each subscriber through its
//! connection's policy. The [`PublishReport`] is exact either way.
//!
//! The registry knows nothing of sockets, slabs or the event loop: it reaches connections
//! only through the [`Subscribers`] trait, which the engine implements over its slab
//! (room left, queue a shared run, queue one frame through the policy). The unit tests
//! below drive it with an in-memory implementation. The [`Directory`] says which workers
//! have subscribers of a topic, for the hand-off of a publish to other workers. The
//! [`Backplane`] joins the node to other nodes through a [`broker::Broker`]: subscribed to a
//! topic on the broker while any worker has a local subscriber, one publish per message.
//! [`history`] is the bounded per-topic ring of recent publications with their offsets
//! that a resuming subscriber is replayed from, and the node's store of them.

mod backplane;
pub mod broker;
mod directory;
pub mod history;

pub use backplane::{Backplane, Interest};
pub use directory::Directory;

use std::collections::HashMap;
use std::hash::Hash;

use arcstr::ArcStr;
use bytes::{Bytes, BytesMut};

use crate::proto::OpCode;
use crate::proto::frame::{encode_frame, encode_frame_into, server_frame_len};

/// The result of queuing a frame on one connection (uWebSockets' SUCCESS / BACKPRESSURE /
/// DROPPED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendStatus {
    /// Queued; the queue is below its soft limit.
    Queued,
    /// Queued, but the queue is now over its soft limit: slow down.
    Backpressure,
    /// Not queued: over the hard limit and the policy drops, or the policy closed the
    /// connection (1013).
    Dropped,
    /// Kept as the newest frame of its topic, to be sent when the queue drains
    /// (conflation policy).
    Conflated,
    /// The connection is closing or gone.
    Closed,
}

/// What happens when a connection's send queue passes its hard limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Policy {
    /// Close the connection with 1013 (try again later). The default.
    #[default]
    Close,
    /// Drop the new frame.
    DropNew,
    /// Keep only the newest frame per topic until the queue drains (tickers, order books).
    /// Frames sent directly (not published) are dropped.
    Conflate,
}

/// What one publish did on one worker (summed over workers by
/// [`crate::engine::Handle::publish`] only for the local part).
///
/// Decided when `publish` is called, against each subscriber's queue at that moment. The
/// bytes themselves reach the subscribers' queues at the end of the worker's loop turn
/// (frames published to one topic in a turn travel together; see ARCHITECTURE.md), or
/// earlier when something else is queued; a subscriber that closes in between does not
/// get them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Subscribers the frame was queued on (below or over the soft limit).
    pub queued: usize,
    /// Of those, how many are over their soft limit.
    pub backpressured: usize,
    /// Subscribers that dropped the frame or were closed by the policy.
    pub dropped: usize,
    /// Subscribers that conflated it.
    pub conflated: usize,
    /// Other workers the frame was handed to.
    pub forwarded_workers: usize,
    /// Other workers with subscribers the frame could not be handed to: their inbox
    /// already held `HANDLE_QUEUE_LIMIT` bytes (a handler publishing faster than they fan
    /// out). Counted in `wsring_forward_dropped_total`.
    pub forward_dropped: usize,
    /// For a topic with history: the publication's position (its offset in its epoch).
    /// Its delivery then goes through every worker's inbox, this one's included, so the
    /// per-subscriber counts above stay 0 and `forwarded_workers` counts every worker it
    /// was handed to.
    pub position: Option<history::Position>,
}

/// Whether a connection's send queue takes one more frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    /// Not open for sending (closing, closed, failed).
    Closed,
    /// Past the hard limit: the policy decides.
    Full,
    /// Taken; `over_soft`: past the soft limit (backpressure).
    Fits {
        /// Past the soft limit.
        over_soft: bool,
        /// The connection takes broadcasts compressed (permessage-deflate, with the
        /// window the registry compresses with): it gets the run's compressed twin.
        deflate: bool,
    },
}

/// A published frame's compressed form (permessage-deflate), made at most once, when the
/// first subscriber that takes it asks ([`Subscribers::queue_with_policy`]).
pub struct Twin<'a> {
    frame: &'a Bytes,
    params: Option<crate::proto::deflate::Params>,
    made: Option<Bytes>,
}

impl<'a> Twin<'a> {
    /// The twin of `frame` under `params` (`None`: no deflate here, it is `frame`).
    pub fn new(frame: &'a Bytes, params: Option<crate::proto::deflate::Params>) -> Twin<'a> {
        Twin {
            frame,
            params,
            made: None,
        }
    }

    /// The frame compressed (compressed once, then shared); the plain frame when it is
    /// below the threshold or not a data frame.
    pub fn get(&mut self) -> &Bytes {
        let (frame, params) = (self.frame, self.params);
        self.made.get_or_insert_with(|| match params {
            Some(p) => compressed_twin(frame, &p),
            None => frame.clone(),
        })
    }
}

/// `frame` (one encoded server frame) compressed into a frame with RSV1 when it is a data
/// frame at or above the threshold; otherwise `frame` itself.
fn compressed_twin(frame: &[u8], params: &crate::proto::deflate::Params) -> Bytes {
    let mut out = BytesMut::new();
    append_twin(&mut out, frame, params);
    out.freeze()
}

/// Appends `frame`'s compressed twin (or `frame`) to `out`.
fn append_twin(out: &mut BytesMut, frame: &[u8], params: &crate::proto::deflate::Params) {
    let (Some(&b0), Some(&b1)) = (frame.first(), frame.get(1)) else {
        out.extend_from_slice(frame);
        return;
    };
    let header_len = match b1 & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let opcode = match b0 & 0x0f {
        1 => OpCode::Text,
        2 => OpCode::Binary,
        _ => {
            out.extend_from_slice(frame);
            return;
        }
    };
    let payload = frame.get(header_len..).unwrap_or_default();
    if b0 & 0x70 != 0 || payload.len() < params.threshold {
        out.extend_from_slice(frame);
        return;
    }
    let z = crate::proto::deflate::compress(payload, params);
    let mut header = crate::proto::FrameHeader::whole(opcode, None, z.len() as u64);
    header.rsv1 = true;
    let mut h = [0u8; crate::proto::frame::MAX_HEADER_LEN];
    let n = header.encode(&mut h);
    out.extend_from_slice(h.get(..n).unwrap_or_default());
    out.extend_from_slice(&z);
}

/// What the registry needs of the connections a worker holds. The engine implements it
/// over its slab; the tests over a map.
pub trait Subscribers {
    /// How a connection is named (the engine's slot and generation).
    type Id: Copy + Eq + Hash;

    /// Room for a frame of `len` bytes on `id`, with `ahead` more bytes already promised
    /// to it (the pending run).
    fn room(&self, id: Self::Id, len: usize, ahead: usize) -> Room;

    /// Queues a run of frames that [`Subscribers::room`] accepted, shared (a reference
    /// when large, a copy when small): `twin` (the same frames compressed) for a
    /// connection that takes broadcasts compressed, when there is one; `false` if the
    /// connection is closing or gone.
    fn queue_run(&mut self, id: Self::Id, run: &Bytes, twin: Option<&Bytes>) -> bool;

    /// Queues one frame published to `topic` through the connection's limits and policy
    /// (close with 1013, drop, or conflate per topic); a connection that takes broadcasts
    /// compressed takes `twin.get()`.
    fn queue_with_policy(
        &mut self,
        id: Self::Id,
        frame: &Bytes,
        twin: &mut Twin<'_>,
        topic: &ArcStr,
    ) -> SendStatus;
}

/// A frame to publish.
#[derive(Clone, Copy, Debug)]
pub enum Frame<'a> {
    /// Not encoded yet (a local publish): encoded once, onto the pending run.
    Message(OpCode, &'a [u8]),
    /// Encoded once already (handed over by another worker).
    Encoded(&'a Bytes),
}

impl Frame<'_> {
    /// The encoded frame's length.
    pub fn encoded_len(&self) -> usize {
        match self {
            Frame::Message(_, p) => server_frame_len(p.len()),
            Frame::Encoded(f) => f.len(),
        }
    }

    fn to_bytes(self) -> Bytes {
        match self {
            Frame::Message(opcode, payload) => encode_frame(opcode, payload),
            Frame::Encoded(f) => f.clone(),
        }
    }
}

/// Largest run of pending frames; a publish that would make it longer hands the run out
/// first.
const PENDING_MAX: usize = 256 * 1024;
/// Frames larger than this are never merged into a pending run.
const PENDING_FRAME_MAX: usize = 16 * 1024;

/// A run of frames published to one topic, encoded back to back, handed to every
/// subscriber at once when the turn ends (or before anything else could be queued out of
/// order): each subscriber then gets one queue entry for the whole run, shared (a
/// reference count) when it is large, and the walk over the subscribers happens once per
/// run instead of once per message, which keeps each subscriber's state in cache.
#[derive(Debug, Default)]
struct Pending {
    /// The registry's own name of the run's topic.
    topic: Option<ArcStr>,
    /// The encoded frames; reused from turn to turn (reclaimed in place once the
    /// subscribers' copies have been written).
    batch: BytesMut,
    /// The same frames, those at or above the threshold compressed, when the topic has
    /// subscribers that take them (decided at the run's first frame).
    deflated: Option<BytesMut>,
}

/// One worker's topics and their local subscribers, and the turn's pending run.
#[derive(Debug)]
pub struct Registry<K> {
    /// Each topic's local subscribers, in a plain list (8 bytes per member for a
    /// `ConnId`): the caller keeps each member's index ([`Registry::add`] appends,
    /// [`Registry::remove_at`] says which member moved into the hole), so leaving costs no
    /// search and no hash index. An `IndexSet` cost about 65 B per idle subscriber, cold;
    /// a `HashSet`, 40 B less but 20-60% more CPU per delivery in a wide fan-out
    /// (ARCHITECTURE.md, memory per connection).
    /// Keyed by the topic's one shared name, an 8-byte `ArcStr` (which each member's slot
    /// refers to: see `engine::core::Member`).
    topics: HashMap<ArcStr, Vec<K>>,
    pending: Pending,
    /// How broadcasts are compressed for subscribers that negotiated permessage-deflate
    /// (once per publication on this worker: compress-once); `None`: never.
    deflate: Option<crate::proto::deflate::Params>,
}

impl<K> Default for Registry<K> {
    fn default() -> Self {
        Registry {
            topics: HashMap::new(),
            pending: Pending::default(),
            deflate: None,
        }
    }
}

impl<K> Registry<K> {
    /// Compresses broadcasts with `params` for the subscribers that take them.
    pub fn set_deflate(&mut self, params: Option<crate::proto::deflate::Params>) {
        self.deflate = params;
    }
}

impl<K: Copy + Eq + Hash> Registry<K> {
    /// Topics with at least one local subscriber.
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    /// Whether no topic has a local subscriber.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    /// The registry's own name of `topic` (one allocation per topic, shared by every
    /// subscriber's list), if it has local subscribers.
    pub fn key(&self, topic: &str) -> Option<ArcStr> {
        self.topics.get_key_value(topic).map(|(k, _)| k.clone())
    }

    /// The name to use for `topic`: the registry's own, else a new one.
    pub fn intern(&self, topic: &str) -> ArcStr {
        self.key(topic).unwrap_or_else(|| ArcStr::from(topic))
    }

    /// The local subscribers of `topic`, in the registry's order (a member's index is
    /// what its connection keeps to leave without a search).
    pub fn members(&self, topic: &str) -> &[K] {
        self.topics.get(topic).map_or(&[], Vec::as_slice)
    }

    /// Local subscribers of `topic`.
    pub fn subscribers(&self, topic: &str) -> usize {
        self.topics.get(topic).map_or(0, Vec::len)
    }

    /// Adds `id` to `key`'s subscribers; returns how many it has now (`id` is the last of
    /// them: its index is that count minus one). Call [`Registry::flush_pending`] first:
    /// membership changes take effect between messages, in order. The caller adds a
    /// member once: the list does not look for it.
    pub fn add(&mut self, key: ArcStr, id: K) -> usize {
        let list = self.topics.entry(key).or_default();
        debug_assert!(!list.contains(&id), "a member is added once");
        list.push(id);
        list.len()
    }

    /// Removes `id`, which the caller knows at index `pos`, from `key`'s subscribers
    /// (forgetting a topic nobody is left on). Returns how many are left and the member
    /// moved into `pos` (the last one), whose index the caller updates. A wrong `pos` is
    /// not trusted: `id` is then looked for.
    pub fn remove_at(&mut self, key: &str, id: K, pos: u32) -> (usize, Option<(K, u32)>) {
        let Some(list) = self.topics.get_mut(key) else {
            return (0, None);
        };
        let mut at = pos as usize;
        if list.get(at) != Some(&id) {
            match list.iter().position(|m| *m == id) {
                Some(p) => at = p,
                None => return (list.len(), None),
            }
        }
        list.swap_remove(at);
        let moved = list.get(at).map(|m| (*m, at as u32));
        let n = list.len();
        if n == 0 {
            self.topics.remove(key);
        } else if list.capacity() > 64 && list.capacity() / 4 > n {
            // Memory a crowd left behind goes back as it leaves.
            list.shrink_to(n * 2);
        }
        (n, moved)
    }

    /// Removes `id` from `key`'s subscribers, looking for it; returns how many are left.
    pub fn remove(&mut self, key: &str, id: K) -> usize {
        self.remove_at(key, id, u32::MAX).0
    }

    /// Whether a run of frames waits to be handed out.
    pub fn has_pending(&self) -> bool {
        self.pending.topic.is_some()
    }

    /// Queues `frame` on every local subscriber of `topic` (see the module docs).
    ///
    /// Never inlined: merged into its caller (`Conn::publish`), the walk over the
    /// subscribers, which is the whole cost of a fan-out, compiled to 2 more instructions
    /// per subscriber (callgrind, `fanout`: 48.6 against 46.7 per delivery).
    #[inline(never)]
    pub fn publish<S: Subscribers<Id = K>>(
        &mut self,
        topic: &str,
        frame: Frame<'_>,
        subs: &mut S,
    ) -> PublishReport {
        if self.pending.topic.as_ref().is_some_and(|t| t != topic) {
            self.flush_pending(subs);
        }
        let len = frame.encoded_len();
        if len > PENDING_FRAME_MAX {
            // Nothing to gain from merging a large frame: each subscriber gets a
            // reference to its one encoded copy.
            self.flush_pending(subs);
            return self.publish_now(topic, &frame.to_bytes(), subs);
        }
        if self.pending.batch.len() + len > PENDING_MAX {
            self.flush_pending(subs);
        }
        let ahead = self.pending.batch.len();
        let mut report = PublishReport::default();
        let Some((key, members)) = self.topics.get_key_value(topic) else {
            return report;
        };
        let key = key.clone();
        let mut fits = true;
        let mut deflate = false;
        for &id in members {
            match subs.room(id, len, ahead) {
                Room::Closed => report.dropped += 1,
                Room::Full => {
                    fits = false;
                    break;
                }
                Room::Fits {
                    over_soft,
                    deflate: d,
                } => {
                    report.queued += 1;
                    report.backpressured += usize::from(over_soft);
                    deflate |= d;
                }
            }
        }
        if !fits {
            self.flush_pending(subs);
            return self.publish_now(topic, &frame.to_bytes(), subs);
        }
        let deflate = deflate && self.deflate.is_some();
        if self.pending.topic.is_some() && deflate != self.pending.deflated.is_some() {
            // A run is all plain or all twinned.
            self.flush_pending(subs);
        }
        let start = self.pending.batch.len();
        match frame {
            Frame::Message(opcode, payload) => {
                encode_frame_into(&mut self.pending.batch, opcode, payload)
            }
            Frame::Encoded(f) => self.pending.batch.extend_from_slice(f),
        }
        if let (true, Some(params)) = (deflate, self.deflate) {
            // Compress-once: this worker's one compressed copy, shared by every subscriber
            // that negotiated deflate.
            let twin = self.pending.deflated.get_or_insert_with(BytesMut::new);
            append_twin(
                twin,
                self.pending.batch.get(start..).unwrap_or_default(),
                &params,
            );
        }
        if self.pending.topic.is_none() {
            self.pending.topic = Some(key);
        }
        report
    }

    /// Hands the pending run of frames to every subscriber of its topic.
    pub fn flush_pending<S: Subscribers<Id = K>>(&mut self, subs: &mut S) {
        let Some(topic) = self.pending.topic.take() else {
            return;
        };
        if self.pending.batch.is_empty() {
            return;
        }
        let run = self.pending.batch.split().freeze();
        let twin = self.pending.deflated.take().map(BytesMut::freeze);
        if let Some(members) = self.topics.get(&*topic) {
            for &id in members {
                subs.queue_run(id, &run, twin.as_ref());
            }
        }
    }

    /// Queues `frame` on every local subscriber of `topic` now, each through its limits
    /// and policy.
    fn publish_now<S: Subscribers<Id = K>>(
        &mut self,
        topic: &str,
        frame: &Bytes,
        subs: &mut S,
    ) -> PublishReport {
        let mut report = PublishReport::default();
        let Some((topic, members)) = self.topics.get_key_value(topic) else {
            return report;
        };
        let mut twin = Twin::new(frame, self.deflate);
        for &id in members {
            match subs.queue_with_policy(id, frame, &mut twin, topic) {
                SendStatus::Queued => report.queued += 1,
                SendStatus::Backpressure => {
                    report.queued += 1;
                    report.backpressured += 1;
                }
                SendStatus::Dropped | SendStatus::Closed => report.dropped += 1,
                SendStatus::Conflated => report.conflated += 1,
            }
        }
        report
    }
}

#[cfg(test)]
mod tests;
