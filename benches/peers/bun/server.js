// peer-bun: a BENCH_PROTOCOL.md server on Bun.serve, whose WebSocket server is
// uWebSockets underneath, written the way Bun's documentation writes pub/sub: the upgrade
// in `fetch` carries the topic in `data`, `open` subscribes with the native
// `ws.subscribe`, and a message to a topic goes out with `server.publish` (uWS's topic
// tree: every subscriber, the sender included, as BENCH_PROTOCOL.md asks); echo is
// `ws.send`. Pings are answered by uWS.
//
//   bun server.js [--listen HOST:PORT] [--deflate]
//
// `--listen` (port 0 picks a free port; default 127.0.0.1:9001). `--deflate` turns on
// `perMessageDeflate` (a shared compressor, uWS's default for Bun) and asks every send and
// publish to compress: a publication is compressed for each deflate subscriber. Prints `listening on ws://ADDR` once bound. One JavaScript
// thread, as Bun runs.
const args = process.argv.slice(2);
let listen = "127.0.0.1:9001";
let deflate = false;
for (let i = 0; i < args.length; i++) {
  if (args[i] === "--listen") listen = args[++i];
  else if (args[i] === "--deflate") deflate = true;
  else if (args[i] === "--threads") i++; // one thread: accepted for bench.sh's sake
  else {
    console.error(`peer-bun: unknown argument ${args[i]}`);
    process.exit(2);
  }
}
const at = listen.lastIndexOf(":");
const hostname = listen.slice(0, at);
const port = Number(listen.slice(at + 1));

const server = Bun.serve({
  hostname,
  port,
  fetch(req, server) {
    const path = new URL(req.url).pathname;
    let topic = null;
    if (path.startsWith("/pubsub/") && path.length > "/pubsub/".length) {
      topic = decodeURIComponent(path.slice("/pubsub/".length));
    } else if (path !== "/echo") {
      return new Response("not found\n", { status: 404 });
    }
    if (server.upgrade(req, { data: { topic } })) return undefined;
    return new Response("expected a WebSocket upgrade\n", { status: 400 });
  },
  websocket: {
    maxPayloadLength: 16 << 20,
    // The benchmark's idle scenario holds connections silent; uWS would drop them after
    // its default 120 s, beyond any run.
    idleTimeout: 960,
    // Queue rather than drop or close a subscriber that falls behind (wsring's
    // subscribers are closed only past 16 MiB queued by default).
    backpressureLimit: 16 << 20,
    closeOnBackpressureLimit: false,
    sendPings: false,
    perMessageDeflate: deflate,
    open(ws) {
      if (ws.data.topic !== null) ws.subscribe(ws.data.topic);
    },
    message(ws, message) {
      // Bun compresses only what it is asked to (the second argument of send, the third
      // of publish): with --deflate, everything, for the subscribers that negotiated it.
      if (ws.data.topic !== null) server.publish(ws.data.topic, message, deflate);
      else ws.send(message, deflate);
    },
  },
});
console.log(`listening on ws://${server.hostname}:${server.port}`);
