//! An in-process broker: nodes in one process (tests, or several servers in one program)
//! joined as they would be through Redis or NATS, with the same wire header and the same
//! origin check, and one delivery thread per bus standing in for the network.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{Broker, BrokerState, BrokerStats, Incoming, NodeId, Sink, wire};
use crate::proto::OpCode;

/// A node as the bus knows it.
struct Member {
    node: NodeId,
    sink: Arc<dyn Sink>,
    stats: Arc<BrokerStats>,
    topics: HashSet<Arc<str>>,
}

enum Op {
    Join(usize, Member),
    Subscribe(usize, Arc<str>),
    Unsubscribe(usize, Arc<str>),
    Publish(Arc<str>, Bytes),
    Leave(usize),
}

/// The bus: create one, then one [`MemoryBroker`] per node with [`MemoryBus::broker`].
#[derive(Clone)]
pub struct MemoryBus {
    tx: Sender<Op>,
    next: Arc<Mutex<usize>>,
}

impl Default for MemoryBus {
    fn default() -> Self {
        MemoryBus::new()
    }
}

impl MemoryBus {
    /// A bus with its delivery thread (which ends when every handle is dropped).
    pub fn new() -> MemoryBus {
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("wsring-memory-bus".into())
            .spawn(move || run(&rx))
            .map(drop)
            .unwrap_or_else(|e| tracing::error!("memory bus thread: {e}"));
        MemoryBus {
            tx,
            next: Arc::new(Mutex::new(0)),
        }
    }

    /// A broker client on this bus for one node.
    pub fn broker(&self) -> MemoryBroker {
        let id = self.next.lock().map_or(0, |mut n| {
            *n += 1;
            *n
        });
        MemoryBroker {
            id,
            tx: Mutex::new(self.tx.clone()),
            node: Mutex::new(None),
            stats: Arc::new(BrokerStats::default()),
        }
    }
}

fn run(rx: &Receiver<Op>) {
    let mut members: HashMap<usize, Member> = HashMap::new();
    while let Ok(op) = rx.recv() {
        match op {
            Op::Join(id, m) => {
                members.insert(id, m);
            }
            Op::Subscribe(id, t) => {
                if let Some(m) = members.get_mut(&id) {
                    m.topics.insert(t);
                    m.stats
                        .topics
                        .store(m.topics.len() as u64, Ordering::Relaxed);
                }
            }
            Op::Unsubscribe(id, t) => {
                if let Some(m) = members.get_mut(&id) {
                    m.topics.remove(&t);
                    m.stats
                        .topics
                        .store(m.topics.len() as u64, Ordering::Relaxed);
                }
            }
            Op::Leave(id) => {
                members.remove(&id);
            }
            Op::Publish(topic, payload) => {
                for m in members.values() {
                    if !m.topics.contains(&topic) {
                        continue;
                    }
                    match wire::decode(payload.clone()) {
                        Ok(d) if d.origin == m.node => {
                            m.stats.own_skipped.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(d) => {
                            m.stats.messages_in.fetch_add(1, Ordering::Relaxed);
                            m.sink.deliver(&[Incoming {
                                topic: topic.clone(),
                                opcode: d.opcode,
                                payload: d.payload,
                                number: None,
                            }]);
                        }
                        Err(_) => {
                            m.stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
    }
}

/// One node's client of a [`MemoryBus`].
pub struct MemoryBroker {
    id: usize,
    tx: Mutex<Sender<Op>>,
    node: Mutex<Option<NodeId>>,
    stats: Arc<BrokerStats>,
}

impl MemoryBroker {
    fn send(&self, op: Op) -> bool {
        self.tx.lock().is_ok_and(|tx| tx.send(op).is_ok())
    }
}

impl Broker for MemoryBroker {
    fn start(&self, node: NodeId, sink: Arc<dyn Sink>) -> std::io::Result<()> {
        if let Ok(mut n) = self.node.lock() {
            *n = Some(node);
        }
        self.send(Op::Join(
            self.id,
            Member {
                node,
                sink,
                stats: self.stats.clone(),
                topics: HashSet::new(),
            },
        ));
        self.stats.set_state(BrokerState::Up);
        Ok(())
    }

    fn subscribe(&self, topic: &str) {
        self.send(Op::Subscribe(self.id, Arc::from(topic)));
    }

    fn unsubscribe(&self, topic: &str) {
        self.send(Op::Unsubscribe(self.id, Arc::from(topic)));
    }

    fn publish(&self, topic: &str, opcode: OpCode, payload: &[u8]) -> bool {
        let node = self.node.lock().ok().and_then(|n| *n).unwrap_or(0);
        let ok = self.send(Op::Publish(
            Arc::from(topic),
            wire::encode(node, opcode, payload),
        ));
        let counter = if ok {
            &self.stats.messages_out
        } else {
            &self.stats.out_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        ok
    }

    fn stats(&self) -> &BrokerStats {
        &self.stats
    }

    fn describe(&self) -> String {
        format!("memory bus (member {})", self.id)
    }

    fn stop(&self) {
        if self.stats.state() != BrokerState::Stopped {
            self.send(Op::Leave(self.id));
            self.stats.set_state(BrokerState::Stopped);
        }
    }
}
