//! Fuzz target `worker`: one worker core (the bench protocol: echo and pub/sub) driven by
//! arbitrary interleavings of what its backend and its peers can do — accepts, upgrades,
//! reads of whole, split, fragmented and broken frames, EOFs, flushes through a driver
//! whose sockets take everything, part, nothing (epoll-like) or keep writes in flight
//! (io_uring-like), completions and writable edges, publishes from another thread, time
//! passing — with a small send queue and reassembly budget so that the bounds bite.
//!
//! The body lives in the library so that `tests/fuzz_corpus.rs` replays the seed corpus
//! (`fuzz/corpus/worker/`) on stable; `cargo fuzz run worker` explores further.
//!
//! Invariants checked after every step: a connection's send queue stays within its hard
//! limit plus one frame plus the pong allowance; a read that leaves an open connection's
//! queue past the hard limit stops its reading; the worker's reassembly total equals the sum over its connections;
//! nothing is written to a connection after the driver was told to close it, and each is
//! closed once. At the end, with peers that go silent (no EOF, no reads) and time running
//! on, every connection leaves within its deadlines (pong, close, send, message,
//! handshake), and the worker holds nothing: no slot, no socket, no reassembly bytes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{ConnId, Core, Driver, SendOutcome};
use crate::engine::testing::EchoPubSub;
use crate::engine::{EngineConfig, Handle, Shared};
use crate::proto::frame::encode_client_frame;
use crate::proto::fuzzing::Rng;
use crate::proto::{OpCode, connection::reassembly_total};

const HARD: usize = 16 * 1024;
const SOFT: usize = 4 * 1024;
const MAX_MESSAGE: u64 = 8 * 1024;

/// How the fake sockets take writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Like epoll: written now, in full, in part, or would block.
    Ready,
    /// Like io_uring: every write is in flight until the harness completes it.
    InFlight,
}

#[derive(Default)]
struct Peer {
    /// Bytes offered by an in-flight write (InFlight mode).
    in_flight: Option<usize>,
    /// The socket is full (Ready mode): `on_writable` will come.
    blocked: bool,
    /// The driver was told to close it.
    closed: bool,
    /// Reading is off (the core said so).
    reading_off: bool,
}

struct FakeDriver {
    mode: Mode,
    rng: Rng,
    peers: BTreeMap<(u32, u32), Peer>,
    /// Closes whose `on_closed` is still to come (InFlight mode).
    closing: Vec<ConnId>,
}

fn key(id: ConnId) -> (u32, u32) {
    (id.slot, id.generation)
}

impl Driver for FakeDriver {
    fn send(
        &mut self,
        id: ConnId,
        _fd: u32,
        bufs: &mut dyn Iterator<Item = &[u8]>,
        _last: bool,
    ) -> SendOutcome {
        let offered: usize = bufs.map(<[u8]>::len).sum();
        let mode = self.mode;
        let choice = self.rng.below(8);
        let peer = self.peers.entry(key(id)).or_default();
        assert!(!peer.closed, "a write after close");
        assert!(peer.in_flight.is_none(), "two writes in flight");
        assert!(!peer.blocked, "a write to a socket waiting for writable");
        match mode {
            Mode::InFlight => {
                peer.in_flight = Some(offered);
                SendOutcome::InFlight
            }
            Mode::Ready => match choice {
                0 => {
                    peer.blocked = true;
                    SendOutcome::WouldBlock
                }
                1 | 2 => {
                    let n = (offered / 2).max(usize::from(offered > 0));
                    if n < offered {
                        peer.blocked = true;
                    }
                    SendOutcome::Wrote {
                        n,
                        all: n == offered,
                    }
                }
                _ => SendOutcome::Wrote {
                    n: offered,
                    all: true,
                },
            },
        }
    }

    fn close(&mut self, id: ConnId, _fd: u32) -> bool {
        let peer = self.peers.entry(key(id)).or_default();
        assert!(!peer.closed, "closed twice");
        peer.closed = true;
        match self.mode {
            Mode::Ready => true,
            Mode::InFlight => {
                self.closing.push(id);
                false
            }
        }
    }

    fn set_reading(&mut self, id: ConnId, _fd: u32, on: bool) {
        self.peers.entry(key(id)).or_default().reading_off = !on;
    }

    fn shutdown_write(&mut self, _id: ConnId, _fd: u32) {}
}

/// A client frame: mostly valid (data, control, fragments), sometimes broken.
fn client_bytes(rng: &mut Rng) -> Vec<u8> {
    let key = [0x12, 0x34, 0x56, 0x78];
    let lens = [0usize, 1, 5, 125, 126, 1000, 3000, 6000, 9000];
    let len = lens[rng.below(lens.len() as u64) as usize];
    let payload = vec![b'a'; len];
    let mut out = match rng.below(24) {
        0..=3 => encode_client_frame(OpCode::Text, &payload, key),
        4..=7 => encode_client_frame(OpCode::Binary, &payload, key),
        8 => encode_client_frame(OpCode::Ping, &payload[..len.min(125)], key),
        9 => encode_client_frame(OpCode::Pong, &payload[..len.min(125)], key),
        10..=13 => {
            // A fragmented message: first and last fragments, maybe with a ping between.
            let mut first = encode_client_frame(OpCode::Binary, &payload, key);
            first[0] &= 0x7F;
            let mut last = encode_client_frame(OpCode::Continuation, &payload, key);
            if rng.below(2) == 0 {
                first.extend(encode_client_frame(OpCode::Ping, b"x", key));
            }
            if rng.below(3) != 0 {
                first.append(&mut last);
            }
            first
        }
        14..=19 => {
            // A header announcing a large frame and only part of it.
            let mut f = encode_client_frame(OpCode::Binary, &payload, key);
            f.truncate(f.len().min(2 + rng.below(4000) as usize));
            f
        }
        20 => encode_client_frame(OpCode::Close, &1000u16.to_be_bytes(), key),
        21 => {
            // A burst of pings (the replies collapse past the soft limit).
            let ping = encode_client_frame(OpCode::Ping, &payload[..len.min(125)], key);
            ping.repeat(1 + rng.below(200) as usize)
        }
        _ => {
            let mut f = encode_client_frame(OpCode::Text, &payload, key);
            if let Some(b) = f.get_mut(rng.below(4) as usize) {
                *b ^= 1 << rng.below(8);
            }
            f
        }
    };
    if rng.below(16) == 0 {
        out.truncate(out.len() / 2);
    }
    out
}

struct Harness {
    core: Core<EchoPubSub>,
    driver: FakeDriver,
    handle: Handle,
    shared: Arc<Shared>,
    now: Instant,
    live: Vec<ConnId>,
    next_fd: u32,
}

impl Harness {
    fn flush(&mut self) {
        self.core.flush(&mut self.driver);

        for id in std::mem::take(&mut self.driver.closing) {
            self.core.on_closed(id);
        }
        let slots = &self.core.inner.slots;
        self.live.retain(|id| {
            slots
                .get(id.slot as usize)
                .is_some_and(|s| s.generation == id.generation)
        });
        self.check();
    }

    fn check(&mut self) {
        let mut reassembly = 0;
        for (_, slot) in self.core.inner.slots.iter() {
            let queued = slot.conn.queued_bytes();
            // Hard limit, or one frame into an empty queue; the pongs allowed below the
            // soft limit; our close frame, a ping, the 101.
            let bound = HARD.max(MAX_MESSAGE as usize + 14) + SOFT + 127 + 1024;
            assert!(queued <= bound, "{queued} bytes queued (bound {bound})");
            reassembly += slot.conn.reassembly_bytes();
        }
        assert_eq!(reassembly_total().0, reassembly);
    }

    fn read(&mut self, id: ConnId, bytes: &mut [u8]) {
        if !self.core.wants_read(id) {
            return; // a real backend does not read it now
        }
        self.core.on_data(id, bytes, self.now);
        // A read that leaves the queue past the hard limit stops reading (a publish may
        // push a queue past it between reads: by the pongs queued after the run's room
        // was checked, at most the soft limit more, within the bound of `check`).
        if let Some(slot) = self.core.inner.slots.get(id.slot as usize)
            && slot.generation == id.generation
            && slot.conn.queued_bytes() > HARD
            && matches!(slot.phase, super::Phase::Open)
            // Closing: read on for the peer's close reply.
            && slot.conn.state() == crate::proto::State::Open
            && !slot.flags.has(super::Flags::CLOSING)
            && !slot.flags.has(super::Flags::DEAD)
        {
            assert!(
                !self.core.wants_read(id),
                "read past the hard limit: {} queued, flags {:#x}",
                slot.conn.queued_bytes(),
                slot.flags.0
            );
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.core.on_tick(self.now);
    }

    /// Completes writes: every one in flight, or the first blocked peer becomes writable.
    fn complete(&mut self, rng: &mut Rng, all: bool) {
        let keys: Vec<(u32, u32)> = self.driver.peers.keys().copied().collect();
        for k in keys {
            let id = ConnId {
                slot: k.0,
                generation: k.1,
            };
            let Some(peer) = self.driver.peers.get_mut(&k) else {
                continue;
            };
            if let Some(offered) = peer.in_flight.take() {
                let n = if all || rng.below(2) == 0 {
                    offered
                } else {
                    rng.below(offered as u64 + 1) as usize
                };
                self.core.on_sent(id, i32::try_from(n).unwrap_or(i32::MAX));
            }
            if peer.blocked {
                peer.blocked = false;
                self.core.on_writable(id);
            }
        }
    }
}

/// The fuzz target body: `data` is the script (first byte: driver mode and seed).
pub fn worker(data: &[u8]) {
    let (first, script) = match data {
        [a, rest @ ..] => (*a, rest),
        [] => (0, &[][..]),
    };
    let config = EngineConfig {
        max_message_size: MAX_MESSAGE,
        send_queue_soft: SOFT,
        send_queue_hard: HARD,
        reassembly_budget: 4 * 1024,
        write_batch: 4,
        max_connections: 16,
        message_timeout: Some(Duration::from_secs(60)),
        send_timeout: Some(Duration::from_secs(30)),
        policy: match first >> 6 {
            0 => crate::pubsub::Policy::DropNew,
            1 => crate::pubsub::Policy::Conflate,
            _ => crate::pubsub::Policy::Close,
        },
        ..EngineConfig::default()
    };
    let Ok(shared) = Shared::detached(config) else {
        return;
    };
    let handle = Handle::from_shared(shared.clone());
    let start = Instant::now();
    let mut rng = Rng(u64::from(first) | (1 << 40));
    let mut h = Harness {
        core: Core::new(0, shared.clone(), EchoPubSub::new(handle.clone()), start),
        driver: FakeDriver {
            mode: if first & 1 == 0 {
                Mode::Ready
            } else {
                Mode::InFlight
            },
            rng: Rng(u64::from(first) | (1 << 41)),
            peers: BTreeMap::new(),
            closing: Vec::new(),
        },
        handle,
        shared,
        now: start,
        live: Vec::new(),
        next_fd: 100,
    };
    for &op in script {
        let pick = |h: &Harness, rng: &mut Rng| -> Option<ConnId> {
            (!h.live.is_empty()).then(|| h.live[rng.below(h.live.len() as u64) as usize])
        };
        match op % 16 {
            0 if h.live.len() < 12 => {
                h.next_fd += 1;
                let id = h.core.on_accept(h.next_fd, h.now);
                h.live.push(id);
                let path = if rng.below(2) == 0 {
                    "/echo"
                } else {
                    "/pubsub/t"
                };
                let mut req = format!(
                    "GET {path} HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                     Sec-WebSocket-Version: 13\r\n\r\n"
                )
                .into_bytes();
                let cut = if op & 0x80 != 0 && rng.below(4) == 0 {
                    rng.below(req.len() as u64) as usize
                } else {
                    req.len()
                };
                req.truncate(cut);
                h.read(id, &mut req);
            }
            1..=7 => {
                if let Some(id) = pick(&h, &mut rng) {
                    let mut bytes = client_bytes(&mut rng);
                    if op & 0x40 != 0 && bytes.len() > 1 {
                        let at = 1 + rng.below(bytes.len() as u64 - 1) as usize;
                        let (a, b) = bytes.split_at_mut(at);
                        h.read(id, a);
                        h.read(id, b);
                    } else {
                        h.read(id, &mut bytes);
                    }
                }
            }
            8 | 9 => h.flush(),
            10 | 11 => h.complete(&mut rng, op & 0x80 != 0),
            12 => {
                if let Some(id) = pick(&h, &mut rng) {
                    h.core.on_eof(id);
                }
            }
            13 => {
                let steps = [10u64, 25, 100, 1000, 6000, 21_000, 31_000, 61_000];
                let ms = steps[rng.below(steps.len() as u64) as usize];
                h.advance(Duration::from_millis(ms));
            }
            14 => {
                let len = [1usize, 100, 3000][rng.below(3) as usize];
                h.handle.publish("t", OpCode::Binary, &vec![b'p'; len]);
                h.core.on_commands(h.now);
            }
            _ => {}
        }
        h.check();
        if rng.below(3) == 0 {
            h.flush();
        }
    }
    // The peers go silent (never EOF, never read again unless a write is completed):
    // every connection must leave within its deadlines.
    for _ in 0..400 {
        h.flush();
        h.complete(&mut rng, true);
        h.flush();
        h.advance(Duration::from_millis(500));
        if h.core.is_empty() {
            break;
        }
    }
    h.flush();
    assert!(
        h.core.is_empty(),
        "{} connection(s) outlived every deadline",
        h.core.len()
    );
    assert_eq!(h.shared.sockets.load(Ordering::Acquire), 0);
    assert_eq!(h.shared.open.load(Ordering::Acquire), 0);
    assert_eq!(reassembly_total(), (0, 0));
}
