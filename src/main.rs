//! `wsring`: the command-line server (`wsring serve`) and the host check (`wsring check`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use wsring::cli::serve::BenchProtocol;
use wsring::engine::{BackendChoice, EngineConfig};

// The system allocator by default: it keeps less memory per idle connection than
// mimalloc (see the `server-mimalloc` feature in Cargo.toml for the figures).
#[cfg(feature = "server-mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "wsring",
    version,
    about = "A WebSocket server engine on io_uring, thread per core"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: `/echo` echoes every message, `/pubsub/<topic>` publishes every
    /// message to all subscribers of <topic> (the sender included; a topic longer than 256
    /// bytes gets HTTP 414), `GET /` is a status page with a browser demo, `GET /metrics`
    /// is Prometheus text.
    Serve(Box<ServeArgs>),
    /// Check whether this host can hold N connections (read only, no root needed).
    ///
    /// One line per knob (current value, value needed, OK/LOW/INFO), then notes. `memlock`
    /// is measured: the check sets up as many io_uring rings as the server would have
    /// workers, with the server's parameters, under the current RLIMIT_MEMLOCK.
    #[command(
        after_help = "Exit status: 0 when no knob is LOW (INFO lines never fail the \
check), 1 when at least one knob is LOW, 2 on a usage error."
    )]
    Check {
        /// Number of concurrent connections to plan for.
        #[arg(long, default_value_t = 100_000)]
        connections: u64,
        /// Worker threads the server will run (as `serve --threads`); 0 = one per online
        /// CPU. The memlock check sets up this many rings.
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Root of the /proc tree to read (for tests).
        #[arg(long, default_value = "/", hide = true)]
        proc_root: std::path::PathBuf,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Worker threads, one io_uring (or epoll) reactor each; 0 = one per online CPU.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// I/O backend: `auto` uses io_uring when the kernel allows it and falls back to
    /// epoll (logging why); `io-uring` fails instead of falling back.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Largest message or frame accepted (e.g. 16MiB, 65536); larger ones close with 1009.
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    max_message_size: u64,
    /// Largest upgrade request header block; larger requests get HTTP 431.
    #[arg(long, default_value = "8KiB", value_parser = parse_size)]
    max_header_bytes: u64,
    /// Time allowed for a client to send its whole upgrade request (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Ping a connection after this long without receiving anything; 0 disables pings.
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    ping_interval: Duration,
    /// Drop a connection whose pong (or any data) does not arrive this long after a ping.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pong_timeout: Duration,
    /// Drop a connection whose close reply does not arrive this long after our close;
    /// also how long a closed connection's last bytes (and an HTTP answer) may wait for a
    /// peer that does not read them.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    close_timeout: Duration,
    /// A frame or message that has begun must be complete within this, else close 1008
    /// (slow-drip senders cannot hold reassembly memory); 0 disables the limit.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    message_timeout: Duration,
    /// Drop a connection whose queued bytes make no progress for this long (a peer that
    /// stopped reading; counted in wsring_send_timeouts_total); 0 disables it.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    send_timeout: Duration,
    /// On SIGINT/SIGTERM: send close 1001 to everyone, wait this long for the close
    /// handshakes, then drop the rest. A second signal exits at once.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Most upgraded connections at once (over all workers); 0 = from RLIMIT_NOFILE (raised
    /// to its hard limit at start). Upgrades beyond get HTTP 503.
    #[arg(long, default_value_t = 0)]
    max_connections: usize,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive). RUST_LOG wins
    /// when set.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// On shutdown, close connections with 1012 (service restart: clients should
    /// reconnect) instead of 1001 (going away).
    #[arg(long)]
    restart: bool,
    /// Do not pin worker i to CPU i.
    #[arg(long)]
    no_pin: bool,
    /// A connection's send queue size past which sends and publishes report backpressure.
    #[arg(long, default_value = "256KiB", value_parser = parse_size)]
    send_queue_soft: u64,
    /// A connection's send queue size past which --policy applies.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    send_queue_hard: u64,
    /// What happens to a connection whose send queue passes the hard limit: close it with
    /// 1013, drop the new frame, or keep only the newest frame per topic (conflate).
    #[arg(long, value_enum, default_value_t = PolicyArg::Close)]
    policy: PolicyArg,
    /// Per worker: how much memory messages split across frames or reads may hold while
    /// they are reassembled. Past it, the connection whose message grows stops being read
    /// (its peer slows down) until others complete theirs; one always keeps reading.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    reassembly_budget: u64,
    /// Most connections a worker writes per loop turn. A wider fan-out is written over
    /// several turns, reads in between; smaller batches mean more frames per write and
    /// more deliveries per second to very large topics, at higher latency.
    #[arg(long, default_value_t = wsring::engine::DEFAULT_WRITE_BATCH as u64, value_parser = clap::value_parser!(u64).range(1..))]
    write_batch: u64,
    /// An Origin allowed to upgrade (repeat the flag for several); without any, every
    /// origin is allowed. Others get HTTP 403.
    #[arg(long = "allowed-origin")]
    allowed_origins: Vec<String>,
    /// Subprotocols the server speaks, in its order of preference (e.g. chat.v2,chat.v1).
    /// A client that offers some (Sec-WebSocket-Protocol) gets the first of this list it
    /// offered; one that offers only others, or any while this list is empty (the
    /// default), gets its own first offer, as Node's `ws` answers, because browsers fail a
    /// connection whose 101 names none of their offers. A client offering none gets no
    /// Sec-WebSocket-Protocol. The messages are the same whatever is chosen.
    #[arg(long, value_delimiter = ',', value_parser = parse_protocol)]
    protocols: Vec<String>,
    /// Join other nodes through a broker: `redis://host:port` (repeat the flag for several
    /// Redis instances; topics are spread over them by a stable hash, so every node must
    /// list the same URLs in the same order) or `nats://host:port` (repeat for the
    /// servers of one NATS cluster). A message published on any node reaches the
    /// subscribers on every node; while the broker is down each node keeps delivering
    /// locally and reconnects by itself.
    #[arg(long = "broker", value_name = "URL")]
    brokers: Vec<String>,
    /// With redis:// brokers: use Redis 7's sharded pub/sub (SSUBSCRIBE/SPUBLISH) on
    /// each instance.
    #[arg(long, requires = "brokers")]
    broker_sharded: bool,
    /// With redis:// brokers: they are seed nodes of one Redis Cluster (Redis 7), not
    /// shards. The slot map is read from the first seed that answers; each topic is
    /// subscribed and published (sharded pub/sub) on the master that owns its key slot,
    /// and a moved slot is followed by itself.
    #[arg(long, requires = "brokers", conflicts_with = "broker_sharded")]
    broker_cluster: bool,
    /// This node's id in what it publishes to the broker, 1 to 16 hex digits (default:
    /// random at start). Nodes must not share one: each skips its own id's messages.
    #[arg(long, value_parser = wsring::cli::broker::parse_node_id, requires = "brokers")]
    node_id: Option<u64>,
    /// permessage-deflate (RFC 7692) for clients that offer it (browsers do): negotiated
    /// without context takeover either way, so an idle connection keeps no compressor.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    deflate: OnOff,
    /// Messages shorter than this are sent uncompressed.
    #[arg(long, default_value = "256B", value_parser = parse_size)]
    deflate_threshold: u64,
    /// The largest window the server compresses with, 9 to 15 (a client may ask for less).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u8).range(9..=15))]
    deflate_window_bits: u8,
    /// Compression level, 1 (fastest) to 9.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=9))]
    deflate_level: u8,
    /// Let clients keep their compression context between messages (better ratios for
    /// what they send, unless they ask otherwise), at about 40 KiB of inflater per such
    /// connection for its life. Off: clients are asked to reset it after every message.
    #[arg(long, value_enum, default_value_t = OnOff::Off)]
    deflate_client_context: OnOff,
    /// Publications kept per topic for clients that resume (`/pubsub/<topic>?recover=1`,
    /// docs/history.md); 0 keeps no history (and `recover=1` is answered 400).
    #[arg(long, default_value_t = 1000)]
    history_size: usize,
    /// How long a publication is kept for resuming clients.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    history_ttl: Duration,
    /// Bytes kept per topic (the newest publication is always kept).
    #[arg(long, default_value = "16MiB", value_parser = parse_size)]
    history_topic_bytes: u64,
    /// Bytes kept over all topics; past it, the topic being published to gives up its
    /// oldest publications first.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    history_max_bytes: u64,
}

/// `--backend`: the CLI's names for [`BackendChoice`] (clap stays out of the engine).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum BackendArg {
    /// io_uring when the kernel has every operation wsring uses, else epoll.
    Auto,
    /// io_uring, or fail to start.
    IoUring,
    /// epoll.
    Epoll,
}

impl From<BackendArg> for BackendChoice {
    fn from(b: BackendArg) -> BackendChoice {
        match b {
            BackendArg::Auto => BackendChoice::Auto,
            BackendArg::IoUring => BackendChoice::IoUring,
            BackendArg::Epoll => BackendChoice::Epoll,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PolicyArg {
    Close,
    Drop,
    Conflate,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s:?}"))
}

/// A subprotocol name: an HTTP token (RFC 6455 section 4.1), so it can go into the
/// response header as given.
fn parse_protocol(s: &str) -> Result<String, String> {
    let separator = |c: char| "()<>@,;:\\\"/[]?={} \t".contains(c);
    if s.is_empty() {
        return Err("an empty subprotocol name".into());
    }
    match s
        .chars()
        .find(|&c| !c.is_ascii() || c.is_ascii_control() || separator(c))
    {
        Some(c) => Err(format!(
            "{c:?} cannot be part of a subprotocol name (an HTTP token): {s:?}"
        )),
        None => Ok(s.to_string()),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} (use ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: escape codes in a log file or the journal are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// glibc's allocator returns freed memory at the top of the heap to the kernel (trim) and
/// serves large blocks with mmap; with messages of tens of KiB that meant a page-fault storm
/// per message (64 KiB echo: 57 server CPU-s per million messages instead of 21). Keep
/// up to 64 MiB of freed heap and serve blocks up to 32 MiB from the heap.
fn tune_allocator() {
    #[cfg(all(target_env = "gnu", not(feature = "server-mimalloc")))]
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

/// The engine configuration `serve`'s flags describe.
fn engine_config(args: &ServeArgs) -> EngineConfig {
    EngineConfig {
        listen: args.listen,
        threads: args.threads,
        backend: args.backend.into(),
        max_message_size: args.max_message_size,
        max_header_bytes: usize::try_from(args.max_header_bytes).unwrap_or(usize::MAX),
        handshake_timeout: args.handshake_timeout,
        ping_interval: (!args.ping_interval.is_zero()).then_some(args.ping_interval),
        pong_timeout: args.pong_timeout,
        close_timeout: args.close_timeout,
        message_timeout: (!args.message_timeout.is_zero()).then_some(args.message_timeout),
        send_timeout: (!args.send_timeout.is_zero()).then_some(args.send_timeout),
        drain_timeout: args.drain_timeout,
        drain_close_code: if args.restart {
            wsring::proto::CloseCode::Restart
        } else {
            wsring::proto::CloseCode::Away
        },
        max_connections: args.max_connections,
        pin_threads: !args.no_pin,
        send_queue_soft: usize::try_from(args.send_queue_soft).unwrap_or(usize::MAX),
        send_queue_hard: usize::try_from(args.send_queue_hard).unwrap_or(usize::MAX),
        policy: match args.policy {
            PolicyArg::Close => wsring::Policy::Close,
            PolicyArg::Drop => wsring::Policy::DropNew,
            PolicyArg::Conflate => wsring::Policy::Conflate,
        },
        reassembly_budget: usize::try_from(args.reassembly_budget).unwrap_or(usize::MAX),
        write_batch: usize::try_from(args.write_batch).unwrap_or(usize::MAX),
        allowed_origins: args.allowed_origins.clone(),
        deflate: (args.deflate == OnOff::On).then(|| wsring::engine::DeflateConfig {
            threshold: usize::try_from(args.deflate_threshold).unwrap_or(usize::MAX),
            level: args.deflate_level,
            window_bits: args.deflate_window_bits,
            client_context_takeover: args.deflate_client_context == OnOff::On,
        }),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    tune_allocator();
    init_logging(&args.log_level);
    // Before any thread starts: the workers inherit the blocked signals.
    let signals = wsring::signals::ShutdownSignals::block();
    let config = engine_config(&args);
    let configured = (args.max_connections > 0).then_some(args.max_connections as u64);
    let (_, limits_line) = wsring::cli::check::startup_limits_summary(configured);
    tracing::info!("{limits_line}");
    let protocols: std::sync::Arc<[String]> = args.protocols.into();
    let mut builder = wsring::engine::ServerBuilder::from(config);
    if args.history_size > 0 {
        builder = builder.history(wsring::api::HistoryConfig {
            limits: wsring::api::HistoryLimits {
                count: args.history_size,
                bytes: usize::try_from(args.history_topic_bytes).unwrap_or(usize::MAX),
                ttl: args.history_ttl,
            },
            max_bytes: usize::try_from(args.history_max_bytes).unwrap_or(usize::MAX),
            envelope: Some(std::sync::Arc::new(wsring::cli::serve::envelope)),
            topics: None,
        });
    }
    if !args.brokers.is_empty() {
        use wsring::cli::broker::RedisMode;
        let mode = match (args.broker_cluster, args.broker_sharded) {
            (true, _) => RedisMode::Cluster,
            (false, true) => RedisMode::Sharded,
            (false, false) => RedisMode::Plain,
        };
        match wsring::cli::broker::from_urls(&args.brokers, mode) {
            Ok(broker) => builder = builder.broker(broker),
            Err(e) => {
                eprintln!("wsring: {e}");
                return ExitCode::from(2);
            }
        }
        if let Some(id) = args.node_id {
            builder = builder.node_id(id);
        }
    }
    let server = match builder
        .start(move |handle| BenchProtocol::new(handle).with_protocols(protocols.clone()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wsring: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shared = server.shared().clone();
    println!(
        "wsring listening on ws://{} (backend {}, {} workers, max {} connections)",
        server.local_addr(),
        server.backend(),
        shared.stats.len(),
        shared.config.max_connections
    );
    if let Some(bp) = shared.backplane() {
        println!("node {:016x} joined through {}", bp.node(), bp.describe());
    }
    let _ = std::io::stdout().flush();
    // The first signal drains (close 1001, or 1012 with --restart); a second exits at once.
    let sig = signals.drain_on_signal(server);
    tracing::info!(signal = sig, "stopped");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Check {
            connections,
            threads,
            proc_root,
        } => {
            let report = wsring::cli::check::run_check(&wsring::cli::check::CheckOptions {
                connections,
                proc_root,
                threads,
            });
            print!("{report}");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("8k"), Ok(8192));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("12 parsecs").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn the_flags_defaults_are_the_engines_defaults() {
        // The CLI spells its defaults as strings for --help; they must say what
        // EngineConfig::default() says, so that `wsring serve` and an embedder agree. The
        // one intended difference: permessage-deflate is on in `wsring serve` (with the
        // engine's own DeflateConfig defaults) and off in the library.
        let Command::Serve(args) = Cli::try_parse_from(["wsring", "serve"])
            .expect("parses")
            .command
        else {
            panic!("not serve");
        };
        let serve = engine_config(&args);
        assert_eq!(
            serve.deflate,
            Some(wsring::engine::DeflateConfig::default())
        );
        assert_eq!(
            EngineConfig {
                deflate: None,
                ..serve
            },
            EngineConfig::default()
        );
        let Command::Serve(off) = Cli::try_parse_from(["wsring", "serve", "--deflate", "off"])
            .expect("parses")
            .command
        else {
            panic!("not serve");
        };
        assert_eq!(engine_config(&off), EngineConfig::default());
    }

    #[test]
    fn protocols_are_a_comma_separated_list_of_tokens() {
        let cli = Cli::try_parse_from(["wsring", "serve", "--protocols", "chat.v2,chat.v1"])
            .expect("parses");
        let Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        assert_eq!(args.protocols, ["chat.v2", "chat.v1"]);
        let Command::Serve(args) = Cli::try_parse_from(["wsring", "serve"])
            .expect("parses")
            .command
        else {
            panic!("not serve");
        };
        assert!(args.protocols.is_empty());
        assert_eq!(parse_protocol("mqtt"), Ok("mqtt".to_string()));
        for bad in ["", "chat v2", "a;b", "x\r\ny", "caf\u{e9}"] {
            assert!(parse_protocol(bad).is_err(), "{bad:?}");
        }
    }
}
