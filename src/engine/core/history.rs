//! Topics with history on one worker: offsets delivered in order, no gap and no duplicate,
//! and subscribers that join (or resume) without a race with live publications.
//!
//! The rule that makes it race-free: a publication to a topic with history is numbered
//! under its topic's lock (`pubsub::history::Locked`) and, under that same lock, handed to
//! every worker whose directory count of the topic is above zero, as a
//! [`Command::Sequenced`] in its inbox; the publishing worker's own subscribers get it
//! through its own inbox too. So every worker receives a topic's publications in offset
//! order. A worker keeps, per topic it has subscribers of, the last offset it delivered
//! (`Local::position`): a repeat is skipped, a gap (an inbox that was full) is repaired
//! from the ring before the next publication goes out.
//!
//! A subscription takes the same lock, reads the replay up to the stream's last offset `L`
//! and records itself in the directory before it lets go: every publication after `L`
//! will reach this worker. Those up to `L` may still be in the inbox (when the worker has
//! other subscribers); the new subscriber therefore waits in `Local::joining` and enters
//! the registry just before the worker delivers `L + 1`. When it is the worker's first
//! subscriber of the topic, nothing is in flight for it, and it joins at once.

use std::collections::HashMap;

use super::*;
use crate::pubsub::history::{Entry, Epoch, Position, Resumed, Subscription};
use arcstr::ArcStr;

/// A topic with history that this worker has subscribers of.
#[derive(Debug)]
pub(super) struct Local {
    /// The last publication delivered here (or, for a fresh topic, the stream's position
    /// when the first subscriber came).
    position: Position,
    /// Subscribers waiting for the publications before their start to go by.
    joining: Vec<Joiner>,
    /// Subscribers waiting for the node's copy of the broker's stream to load
    /// (`engine/history.rs`); they go ahead on `Command::Unpark`. The flag: made with a
    /// position ([`Conn::subscribe_at`] and the like), whose `Handler::on_subscribed` is
    /// then due; a plain subscription gets none.
    parked: Vec<(ConnId, bool)>,
}

/// What a subscription to a topic with history came to.
pub(super) enum Join {
    /// Joined: what it got, and the publications to replay to it (oldest first).
    Joined(Resumed, Vec<Entry>),
    /// Waiting for the topic's history to load from the broker.
    Parked,
    /// Not made: the topic keeps no history, or the connection is not open or is
    /// subscribed already.
    No,
}

#[derive(Debug)]
struct Joiner {
    id: ConnId,
    envelope: bool,
    /// The last offset its replay covered: it joins before `after + 1` is delivered.
    after: u64,
}

/// The worker's topics with history (see the module doc).
pub(super) type Streams = HashMap<Arc<str>, Local>;

impl<D> Inner<D> {
    /// Subscribers of `key` on this worker: in the registry, in the envelope registry, and
    /// waiting to join.
    pub(super) fn local_count(&self, key: &str) -> usize {
        self.registry.subscribers(key)
            + self.framed.subscribers(key)
            + self
                .streams
                .get(key)
                .map_or(0, |l| l.joining.len() + l.parked.len())
    }

    /// Subscribes `id` to a topic with history (see the module doc). `unparked`: the
    /// subscription waited for the topic's history to load and goes ahead now. `hook`:
    /// made with a position, so `on_subscribed` is due (kept while it is parked).
    pub(super) fn join(
        &mut self,
        id: ConnId,
        topic: &str,
        sub: Subscription,
        unparked: bool,
        hook: bool,
    ) -> Join {
        self.flush_pending();
        let shared = self.shared.clone();
        let Some(history) = shared.history_of(topic) else {
            return Join::No;
        };
        if unparked {
            // Still waiting (not closed or unsubscribed meanwhile)?
            let Some(local) = self.streams.get_mut(topic) else {
                return Join::No;
            };
            let Some(at) = local.parked.iter().position(|p| p.0 == id) else {
                return Join::No;
            };
            local.parked.swap_remove(at);
        } else {
            if !self.is_open(id) {
                return Join::No;
            }
            let subscribed = slot_of(&mut self.slots, id).is_none_or(|s| s.has_topic(topic));
            if subscribed {
                return Join::No;
            }
        }
        let envelope = sub.envelope && history.config().envelope.is_some();
        let now = self.now;
        let mut locked = history.lock(topic);
        let (key, stream) = locked.stream(topic);
        let last = stream.position();
        let count = self.local_count(&key);
        if !stream.synced {
            // A copy of the broker's stream that is not loaded yet: wait for it (counted
            // in the directory, so the node subscribes and loads it).
            stream.parked.push((self.index, id, sub));
            self.streams
                .entry(key.clone())
                .or_insert(Local {
                    position: last,
                    joining: Vec::new(),
                    parked: Vec::new(),
                })
                .parked
                .push((id, hook));
            if !unparked {
                let name = self.name(&key);
                if let Some(slot) = slot_of(&mut self.slots, id) {
                    slot.add_topic(name);
                }
            }
            self.shared.directory.set(&key, self.index, count + 1);
            drop(locked);
            if count == 0 {
                self.shared.interest_changed(&key);
            }
            return Join::Parked;
        }
        // With a broker that numbers publications, a client that saw further on another
        // node than this node's copy has reached is not "from the future": it has
        // everything up to its position, so it misses nothing if it gets what comes after
        // it (it waits in `joining` until then). Numbered here, such a position is bogus.
        let ahead = sub
            .since
            .filter(|p| history.broker_numbered && p.epoch == last.epoch && p.offset > last.offset);
        let mut replay = stream.since(sub.since, now, &history.config().limits);
        if ahead.is_some() {
            replay.recovered = true;
            replay.entries.clear();
        }
        let start = ahead.unwrap_or(last);
        let local = self.streams.entry(key.clone()).or_insert(Local {
            position: last,
            joining: Vec::new(),
            parked: Vec::new(),
        });
        if count == 0 {
            // Nothing is in flight to this worker for the topic: it starts here.
            local.position = last;
            local.joining.clear();
        }
        let at_once = local.position == last && ahead.is_none();
        if !at_once {
            local.joining.push(Joiner {
                id,
                envelope,
                after: start.offset,
            });
        }
        if !unparked {
            let name = self.name(&key);
            if let Some(slot) = slot_of(&mut self.slots, id) {
                slot.add_topic(name);
            }
        }
        if at_once {
            self.list(&key, id, envelope);
        }
        // Under the lock: every publication after `last` sees this worker's count.
        self.shared.directory.set(&key, self.index, count + 1);
        drop(locked);
        if count == 0 {
            self.shared.interest_changed(&key);
        }
        let stats = self.stats();
        stats.history_resumes.bump(u64::from(sub.since.is_some()));
        stats.history_recovered.bump(u64::from(replay.recovered));
        let entries = replay.entries;
        Join::Joined(
            Resumed {
                position: start,
                recovered: replay.recovered,
                replayed: entries.len(),
            },
            entries,
        )
    }

    /// Queues a replay on `id`, outside the queue limits (it is bounded by the history's
    /// own), each publication in the form the subscription asked for.
    pub(super) fn queue_replay(&mut self, id: ConnId, entries: &[Entry], envelope: bool) {
        let Some(slot) = slot_of(&mut self.slots, id) else {
            return;
        };
        let mut n = 0u64;
        for e in entries {
            let frame = match (&e.envelope, envelope) {
                (Some(env), true) => env,
                _ => &e.frame,
            };
            if slot.conn.send_shared(frame).is_err() {
                break;
            }
            n += 1;
        }
        let stats = self.stats();
        stats.history_replayed.bump(n);
        stats.messages_out.bump(n);
        self.mark_dirty(id);
    }

    fn registry_for(&mut self, envelope: bool) -> &mut Registry<u32> {
        if envelope {
            &mut self.framed
        } else {
            &mut self.registry
        }
    }

    /// Adds `id`, subscribed to `key` (its slot already holds the membership), to the
    /// plain or the envelope registry, and records where it is there. Returns how many
    /// that registry has for `key` now.
    pub(super) fn list(&mut self, key: &str, id: ConnId, envelope: bool) -> usize {
        let registry = self.registry_for(envelope);
        let own = registry.intern(key);
        let n = registry.add(own.clone(), id.slot);
        if let Some(m) = slot_of(&mut self.slots, id).and_then(|s| s.member_mut(key)) {
            m.pos = (n - 1) as u32;
            m.framed = envelope;
            // The registry's one name, not a copy the membership was made with while
            // it waited unlisted.
            m.key = own;
        }
        n
    }

    /// This worker's one name of `topic` (a member's slot refers to it): the plain
    /// registry's or the envelope registry's, else a new one.
    pub(super) fn name(&self, topic: &str) -> ArcStr {
        self.registry
            .key(topic)
            .or_else(|| self.framed.key(topic))
            .unwrap_or_else(|| ArcStr::from(topic))
    }

    /// Takes `id` out of the registry its membership `m` names, and records the new place
    /// of the member moved into its hole. A membership not listed yet is looked for in
    /// both (a slip would otherwise leave a closed connection listed).
    fn unlist(&mut self, id: ConnId, m: &Member) {
        let places: &[(bool, u32)] = if m.pos == Member::NOT_LISTED {
            &[(false, u32::MAX), (true, u32::MAX)]
        } else {
            &[(m.framed, m.pos)]
        };
        for &(framed, pos) in places {
            let (_, moved) = self.registry_for(framed).remove_at(&m.key, id.slot, pos);
            if let Some((other, at)) = moved
                && let Some(om) = self
                    .slots
                    .get_mut(other as usize)
                    .and_then(|s| s.member_mut(&m.key))
            {
                om.pos = at;
            }
        }
    }

    /// A publication to a topic with history, from the inbox: delivered once, in offset
    /// order (a repeat skipped, a gap repaired from the ring first).
    pub(super) fn on_sequenced(&mut self, topic: &Arc<str>, epoch: Epoch, entry: &Entry) {
        let Some(local) = self.streams.get_mut(topic) else {
            return; // nobody here any more
        };
        if local.position.epoch != epoch {
            // The stream started again (a broker's history was reset): follow it.
            local.position = Position {
                offset: entry.offset.saturating_sub(1),
                epoch,
            };
        }
        let last = local.position.offset;
        if entry.offset <= last {
            return;
        }
        if entry.offset > last + 1 {
            let missing = self
                .shared
                .history
                .as_ref()
                .and_then(|h| {
                    let locked = h.lock(topic);
                    let stream = locked.get(topic)?;
                    (stream.epoch() == epoch).then(|| stream.between(last, entry.offset))
                })
                .unwrap_or_default();
            let lost = entry.offset - last - 1 - missing.len() as u64;
            self.stats().history_repaired.bump(missing.len() as u64);
            self.stats().history_lost.bump(lost);
            for e in &missing {
                self.deliver_sequenced(topic, e);
            }
        }
        self.deliver_sequenced(topic, entry);
    }

    fn deliver_sequenced(&mut self, topic: &Arc<str>, entry: &Entry) {
        let Some(local) = self.streams.get_mut(topic) else {
            return;
        };
        local.position.offset = entry.offset;
        if local.joining.iter().any(|j| j.after < entry.offset) {
            // They have everything before this one: in the registry before it goes out
            // (and after what is pending, which they have too).
            let (ready, waiting) = std::mem::take(&mut local.joining)
                .into_iter()
                .partition::<Vec<_>, _>(|j| j.after < entry.offset);
            local.joining = waiting;
            self.flush_pending();
            for j in ready {
                self.list(topic, j.id, j.envelope);
            }
        }
        self.fanout_in(false, topic, Frame::Encoded(&entry.frame));
        if let Some(env) = &entry.envelope {
            self.fanout_in(true, topic, Frame::Encoded(env));
        }
    }

    /// Forgets `id` as a subscriber of `key` in whichever registry (or joining list) it
    /// is; returns how many subscribers the worker has left.
    pub(super) fn forget_subscriber(&mut self, id: ConnId, m: &Member) -> usize {
        self.unlist(id, m);
        let key: &str = &m.key;
        if let Some(local) = self.streams.get_mut(key) {
            local.joining.retain(|j| j.id != id);
            local.parked.retain(|p| p.0 != id);
        }
        let n = self.local_count(key);
        if n == 0 {
            self.streams.remove(key);
        }
        n
    }

    /// Whether the parked subscription of `id` to `topic` is due an `on_subscribed`
    /// (`None`: it is not parked any more).
    pub(super) fn parked_hook(&self, topic: &str, id: ConnId) -> Option<bool> {
        let local = self.streams.get(topic)?;
        local.parked.iter().find(|p| p.0 == id).map(|p| p.1)
    }

    /// The position of `topic`'s stream (none: it keeps no history, or nothing was
    /// published to it yet on this node).
    pub(super) fn position(&self, topic: &str) -> Option<Position> {
        let history = self.shared.history_of(topic)?;
        history.lock(topic).get(topic).map(|s| s.position())
    }

    /// Every second (worker 0): streams trimmed by age, and those empty with nobody
    /// subscribed forgotten.
    pub(super) fn sweep_history(&mut self) {
        if self.index != 0 || self.now < self.next_sweep {
            return;
        }
        self.next_sweep = self.now + std::time::Duration::from_secs(1);
        if let Some(history) = &self.shared.history {
            let directory = &self.shared.directory;
            history.sweep(self.now, |topic| directory.count(topic) > 0);
        }
    }
}
