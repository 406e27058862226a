// A browser (or Node 22+) client for wsring serve's resumable subscriptions
// (docs/history.md): subscribes to a topic, and after every drop reconnects with
// exponential backoff and full jitter and resumes from the last publication it got, so
// that nothing is missed and nothing is seen twice while the server still keeps it.
//
//   const sub = new WsringSubscription('ws://127.0.0.1:9001', 'prices', {
//     onMessage: (data, offset) => console.log(offset, data),
//     onGap: (subscribed) => console.warn('some publications were lost', subscribed),
//   });
//   ...
//   sub.close();
class WsringSubscription {
  constructor(base, topic, handlers = {}) {
    this.base = base;
    this.topic = topic;
    this.handlers = handlers;
    this.epoch = null;   // the stream's epoch, from the server's "subscribed" message
    this.offset = null;  // the offset of the last publication handled
    this.attempt = 0;    // reconnects since the last successful subscription
    this.stopped = false;
    this.connect();
  }

  connect() {
    let url = `${this.base}/pubsub/${encodeURIComponent(this.topic)}?recover=1`;
    if (this.epoch !== null && this.offset !== null) {
      url += `&since=${this.offset}&epoch=${this.epoch}`;
    }
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onmessage = (event) => this.receive(JSON.parse(event.data));
    ws.onclose = () => {
      if (this.stopped || this.ws !== ws) return;
      // Exponential backoff with full jitter: a server restart does not bring every
      // client back in the same millisecond.
      const cap = Math.min(10000, 250 * 2 ** this.attempt);
      this.attempt += 1;
      setTimeout(() => this.connect(), Math.random() * cap);
    };
  }

  receive(m) {
    if (m.type === 'subscribed') {
      if (this.epoch !== null && !m.recovered && this.handlers.onGap) {
        this.handlers.onGap(m); // resumed, but the server no longer had everything
      }
      if (m.epoch !== this.epoch) this.offset = null; // a new stream: offsets start again
      this.epoch = m.epoch;
      if (m.replayed === 0) this.offset = m.offset;
      this.attempt = 0;
      if (this.handlers.onSubscribed) this.handlers.onSubscribed(m);
      return;
    }
    if (m.type !== 'pub') return;
    if (this.offset !== null && m.offset <= this.offset) return; // seen already
    this.offset = m.offset;
    const data = m.data !== undefined
      ? m.data
      : Uint8Array.from(atob(m.data_b64), (c) => c.charCodeAt(0));
    if (this.handlers.onMessage) this.handlers.onMessage(data, m.offset);
  }

  close() {
    this.stopped = true;
    this.ws.close(1000, 'bye');
  }
}

if (typeof module !== 'undefined') module.exports = { WsringSubscription };
