//! The upgrade path: a socket accepted, its request read and answered (101, a refusal,
//! or a plain HTTP answer that then lingers for the peer's close).

use super::*;
use crate::pubsub::history::Subscription;

impl<H: Handler> Core<H> {
    /// A new socket was accepted (`fd`: descriptor or direct-table index).
    pub fn on_accept(&mut self, fd: u32, now: Instant) -> ConnId {
        let inner = &mut self.inner;
        inner.now = now;
        inner.stats().accepted.bump(1);
        let generation = inner.next_generation;
        inner.next_generation = inner.next_generation.wrapping_add(1) & GENERATION_MASK;
        let deadline = now + inner.shared.config.handshake_timeout;
        let slot = inner.slots.insert(Slot {
            conn: BareConnection::new(&inner.shared.proto, now, 0),
            // Nothing boxed: a request that comes in one read is parsed where it was read,
            // and the handshake deadline is the slot's place on the wheel (see `on_tick`).
            extra: None,
            topic: None,
            timer: Link::OFF,
            generation,
            fd,
            flags: Flags::default(),
            phase: Phase::Handshake,
            data: None,
        }) as u32;
        let id = ConnId { slot, generation };
        inner.schedule(id, deadline);
        let sockets = inner.shared.sockets.fetch_add(1, Ordering::AcqRel) + 1;
        if inner.draining.is_some() {
            // Accepted just before the listener closed: refuse politely.
            self.respond_error(id, HandshakeError::Full);
        } else if sockets > inner.shared.socket_limit {
            // Handshakes count too: sockets that never upgrade must not fill the
            // descriptor table. Answered at once, without reading the request.
            inner.stats().refused_sockets.bump(1);
            self.respond_error(id, HandshakeError::Full);
        }
        id
    }

    pub(super) fn on_request(&mut self, id: ConnId, request: Request, rest: Vec<u8>, now: Instant) {
        if !request.wants_upgrade() {
            return self.respond_http(id, &request);
        }
        let upgrade = match request.validate_upgrade() {
            Ok(u) => u,
            Err(e) => return self.respond_error(id, e),
        };
        let origins = &self.inner.shared.config.allowed_origins;
        if !origins.is_empty()
            && !request
                .origin()
                .is_some_and(|o| origins.iter().any(|a| a == o))
        {
            return self.respond_error(id, HandshakeError::Forbidden);
        }
        if self.inner.draining.is_some() {
            return self.respond_error(id, HandshakeError::Full);
        }
        let decision = match self.handler.on_upgrade(&request, &upgrade) {
            Decision::Accept(a) => Ok(a),
            Decision::Reject(r) => Err(r),
            Decision::Defer(f) => return self.defer(id, upgrade, rest, f),
        };
        self.decided(id, &upgrade, decision, rest, now);
    }

    /// `on_upgrade` deferred its decision: the connection waits in its handshake (the
    /// deadline still runs) and the token goes to the application.
    fn defer(
        &mut self,
        id: ConnId,
        upgrade: handshake::Upgrade,
        rest: Vec<u8>,
        f: Box<dyn FnOnce(Deferred<H::Data>)>,
    ) {
        let Some(slot) = slot_of(&mut self.inner.slots, id) else {
            return;
        };
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let extra = slot.extra();
        extra.request = Vec::new();
        extra.rare = Rare::Deferred(Box::new(PendingUpgrade {
            upgrade,
            rest,
            gone: gone.clone(),
        }));
        self.inner.stats().deferred.bump(1);
        f(Deferred::new(
            self.inner.shared.clone(),
            self.inner.index,
            id,
            gone,
        ));
    }

    /// A deferred upgrade's decision arrived (`decision`: a boxed `Result<Accept<D>,
    /// Reject>`, see `Command::Resolve`).
    pub(super) fn on_resolve(
        &mut self,
        id: ConnId,
        decision: Box<dyn std::any::Any + Send>,
        now: Instant,
    ) {
        let pending = slot_of(&mut self.inner.slots, id)
            .filter(|s| {
                s.phase == Phase::Handshake
                    && !s.flags.has(Flags::DEAD)
                    && !s.flags.has(Flags::CLOSING)
            })
            .and_then(|s| s.extra.as_mut())
            .and_then(|e| e.take_deferred());
        let Some(pending) = pending else {
            // Gone meanwhile: the slot was freed (maybe reused) or is closing; the token
            // was told, or its decision raced the client's leaving. Dropped here.
            self.inner.stats().handle_misses.bump(1);
            return;
        };
        let PendingUpgrade { upgrade, rest, .. } = *pending;
        let decision = match decision.downcast::<Result<Accept<H::Data>, Reject>>() {
            Ok(d) => *d,
            // A reject from a dropped token carries no data type.
            Err(other) => match other.downcast::<Result<Accept<()>, Reject>>() {
                Ok(d) => Err((*d).err().unwrap_or_else(|| Reject::status(500))),
                Err(_) => Err(Reject::status(500)),
            },
        };
        self.decided(id, &upgrade, decision, rest, now);
    }

    /// Applies the decision on an upgrade: the 101 and `on_open`, or the rejection.
    fn decided(
        &mut self,
        id: ConnId,
        upgrade: &handshake::Upgrade,
        decision: Result<Accept<H::Data>, Reject>,
        mut rest: Vec<u8>,
        now: Instant,
    ) {
        let accept = match decision {
            Ok(a) => a,
            Err(r) => {
                let mut out = Vec::new();
                let headers = header_refs(&r.headers);
                handshake::encode_response(
                    &mut out,
                    r.status,
                    "text/plain",
                    r.body.as_bytes(),
                    &headers,
                );
                self.inner.stats().rejected.bump(1);
                return self.finish_with(id, out);
            }
        };
        let protocol = match &accept.protocol {
            Some(p) => match upgrade.check_protocol(p) {
                Ok(p) => Some(p),
                Err(e) => return self.respond_error(id, e),
            },
            None => None,
        };
        // The cap counts upgraded connections over all workers.
        let shared = &self.inner.shared;
        let open = shared.open.fetch_add(1, Ordering::AcqRel);
        if open >= shared.config.max_connections {
            shared.open.fetch_sub(1, Ordering::AcqRel);
            shared.stats[self.inner.index].rejected_full.bump(1);
            return self.respond_error(id, HandshakeError::Full);
        }
        // permessage-deflate, if the server offers it and the client asked for it (a
        // malformed offer declines the extension, not the connection).
        let deflate = shared.config.deflate.and_then(|d| {
            let policy = crate::proto::deflate::Policy {
                window_bits: d.window_bits,
                client_no_context_takeover: !d.client_context_takeover,
            };
            crate::proto::deflate::negotiate(&upgrade.extensions, &policy)
        });
        let extension = deflate.map(|a| a.response());
        let mut out = Vec::with_capacity(160);
        let mut headers = header_refs(&accept.headers);
        if let Some(ext) = &extension {
            headers.push(("Sec-WebSocket-Extensions", ext.as_str()));
        }
        handshake::encode_accept(&mut out, &upgrade.key, protocol, &headers);
        let tag = match deflate {
            Some(a) => shared.deflate_tag(a.server_window_bits, !a.client_no_context_takeover),
            None => 0,
        };
        shared.stats[self.inner.index].upgraded.bump(1);
        let Some(slot) = slot_of(&mut self.inner.slots, id) else {
            return;
        };
        slot.flags.set(Flags::COUNTED, true);
        slot.flags.set(Flags::JUST_UPGRADED, true);
        slot.phase = Phase::Open;
        // Broadcasts are compressed once per worker with the server's own window: a
        // client that asked for a smaller one gets them plain (still valid).
        let own_window = self
            .inner
            .shared
            .config
            .deflate
            .map(|d| d.window_bits.clamp(9, 15));
        slot.flags.set(
            Flags::DEFLATE,
            deflate.is_some_and(|a| Some(a.server_window_bits) == own_window),
        );
        self.inner.shared.set_live(self.inner.index, id, true);
        slot.forget_request();
        slot.data = Some(accept.data);
        // A fresh connection: its timers start now.
        slot.conn = BareConnection::new(self.inner.shared.proto_config(tag), now, tag);
        let _ = slot.conn.send_raw(Bytes::from(out));
        let deadline = slot.conn.poll_timeout();
        for topic in &accept.topics {
            self.inner.subscribe(id, topic);
        }
        self.handler.on_open(&mut Conn {
            inner: &mut self.inner,
            id,
        });
        for (topic, sub) in &accept.resume {
            if !self.subscribe_at(id, topic, *sub, false) {
                self.inner.subscribe(id, topic);
            }
        }
        if !rest.is_empty()
            && let Some(slot) = slot_of(&mut self.inner.slots, id)
        {
            let cfg = self.inner.shared.proto_config(slot.conn.tag());
            slot.conn.handle_read(cfg, &mut rest, now);
            self.drain_events(id);
        }
        if let Some(at) = deadline {
            self.inner.schedule(id, at);
        }
        self.inner.mark_dirty(id);
    }

    /// Subscribes `id` to a topic with history from a position: the handler's
    /// `on_subscribed` first, then the replay. `false` if the topic keeps no history or the
    /// connection is not open or already subscribed.
    pub(super) fn subscribe_at(
        &mut self,
        id: ConnId,
        topic: &str,
        sub: Subscription,
        unparked: bool,
    ) -> bool {
        let hook = if unparked {
            match self.inner.parked_hook(topic, id) {
                Some(hook) => hook,
                None => return false, // closed or unsubscribed meanwhile
            }
        } else {
            true
        };
        let (resumed, entries) = match self.inner.join(id, topic, sub, unparked, hook) {
            super::history::Join::Joined(r, e) => (r, e),
            // `on_subscribed` and the replay come with `Command::Unpark`.
            super::history::Join::Parked => return true,
            super::history::Join::No => return false,
        };
        if hook {
            self.handler.on_subscribed(
                &mut Conn {
                    inner: &mut self.inner,
                    id,
                },
                topic,
                &resumed,
            );
        }
        let envelope = sub.envelope;
        self.inner.queue_replay(id, &entries, envelope);
        true
    }

    pub(super) fn respond_http(&mut self, id: ConnId, request: &Request) {
        let mut out = Vec::new();
        if request.method != "GET" && request.method != "HEAD" {
            handshake::encode_error(&mut out, HandshakeError::MethodNotAllowed, &[]);
        } else {
            match self.handler.on_http(request) {
                Some(r) => {
                    let headers = header_refs(&r.headers);
                    handshake::encode_response(
                        &mut out,
                        r.status,
                        &r.content_type,
                        &r.body,
                        &headers,
                    )
                }
                None => handshake::encode_error(&mut out, HandshakeError::NotFound, &[]),
            }
        }
        if request.method == "HEAD"
            && let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n")
        {
            // A HEAD answer is the GET answer's head alone (RFC 9110 §9.3.2); its
            // Content-Length still says how long the body would be.
            out.truncate(end + 4);
        }
        self.inner.stats().http_requests.bump(1);
        self.finish_with(id, out);
    }

    pub(super) fn respond_error(&mut self, id: ConnId, e: HandshakeError) {
        let mut out = Vec::new();
        handshake::encode_error(&mut out, e, &[]);
        self.inner.stats().rejected.bump(1);
        tracing::debug!(
            slot = id.slot,
            status = e.status(),
            "handshake refused: {e}"
        );
        self.finish_with(id, out);
    }

    pub(super) fn finish_with(&mut self, id: ConnId, response: Vec<u8>) {
        if let Some(slot) = slot_of(&mut self.inner.slots, id) {
            slot.phase = Phase::Finish;
            slot.forget_request();
            let _ = slot.conn.send_raw(Bytes::from(response));
        }
        // The answer must be taken, and the peer's EOF come, within the close timeout.
        let at = self.inner.now + self.inner.shared.config.close_timeout;
        self.inner.schedule(id, at);
        self.inner.mark_dirty(id);
    }
}
