//! The node's side of a broker: which topics this node is subscribed to on the broker
//! (while any worker has a local subscriber), and the one publish per message.
//!
//! Interest is reference counted across workers by the [`Directory`]: a worker whose local
//! count of a topic goes from 0 to 1, or back to 0, calls [`Backplane::interest_changed`],
//! which compares the directory's node-wide count with what the broker was told, under one
//! lock, and subscribes or unsubscribes. Reconciling with the directory (instead of counting
//! the calls) keeps it right whichever order two workers' changes arrive in: the last call
//! reads the last state.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::Directory;
use super::broker::{Broker, BrokerStats, NodeId, Sink};
use crate::proto::OpCode;

/// What [`Backplane::interest_changed`] told the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interest {
    /// Nothing: the node's interest is what it was.
    Unchanged,
    /// The node subscribed to the topic.
    Subscribed,
    /// The node unsubscribed from it.
    Unsubscribed,
}

/// A broker joined to this node (see the module docs).
pub struct Backplane {
    broker: Arc<dyn Broker>,
    node: NodeId,
    /// Topics the broker was told to subscribe this node to.
    subscribed: Mutex<HashSet<Arc<str>>>,
}

impl std::fmt::Debug for Backplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backplane")
            .field("broker", &self.broker.describe())
            .field("node", &format_args!("{:016x}", self.node))
            .finish_non_exhaustive()
    }
}

impl Backplane {
    /// This node (`node`: its id in every payload it publishes) joined through `broker`.
    pub fn new(broker: Arc<dyn Broker>, node: NodeId) -> Backplane {
        Backplane {
            broker,
            node,
            subscribed: Mutex::new(HashSet::new()),
        }
    }

    /// Starts the broker client, which hands what other nodes publish to `sink`.
    ///
    /// # Errors
    /// If the client's thread cannot start.
    pub fn start(&self, sink: Arc<dyn Sink>) -> std::io::Result<()> {
        self.broker.start(self.node, sink)
    }

    /// Stops the broker client (idempotent).
    pub fn stop(&self) {
        self.broker.stop();
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The broker client's counters.
    pub fn stats(&self) -> &BrokerStats {
        self.broker.stats()
    }

    /// What the broker client connects to.
    pub fn describe(&self) -> String {
        self.broker.describe()
    }

    /// A worker's local subscriber count of `topic` went to or from zero: subscribe or
    /// unsubscribe this node on the broker to match the node-wide count.
    pub fn interest_changed(&self, topic: &Arc<str>, directory: &Directory) -> Interest {
        let Ok(mut subscribed) = self.subscribed.lock() else {
            return Interest::Unchanged;
        };
        let wanted = directory.count(topic) > 0;
        if wanted {
            if subscribed.insert(topic.clone()) {
                self.broker.subscribe(topic);
                return Interest::Subscribed;
            }
        } else if subscribed.remove(topic) {
            self.broker.unsubscribe(topic);
            return Interest::Unsubscribed;
        }
        Interest::Unchanged
    }

    /// Whether the broker numbers publications to topics with history (see
    /// [`Broker::numbers`]).
    pub fn numbers(&self) -> bool {
        self.broker.numbers()
    }

    /// Publishes to a topic with history for the broker to number ([`Broker::publish_numbered`]).
    pub fn publish_numbered(
        &self,
        topic: &str,
        opcode: OpCode,
        payload: &[u8],
        limits: &crate::pubsub::history::Limits,
    ) -> bool {
        self.broker.publish_numbered(topic, opcode, payload, limits)
    }

    /// Asks for a topic's stream from the broker ([`Broker::load`]).
    pub fn load(&self, topic: &str, limits: &crate::pubsub::history::Limits) {
        self.broker.load(topic, limits);
    }

    /// Topics this node is subscribed to on the broker.
    pub fn topics(&self) -> usize {
        self.subscribed.lock().map_or(0, |s| s.len())
    }

    /// Publishes a message to the other nodes (never blocks; see [`Broker::publish`]).
    pub fn publish(&self, topic: &str, opcode: OpCode, payload: &[u8]) -> bool {
        self.broker.publish(topic, opcode, payload)
    }
}
