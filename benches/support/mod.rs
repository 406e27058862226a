//! What the load benches (`resume_storm`, `deflate_fanout`) share: the server's CPU time
//! from /proc, and the in-process `wsring serve` they measure when no `--target` is given.

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks as f64 / hz)
}

/// `wsring serve`'s handler on 127.0.0.1 (a free port, one worker) with its defaults:
/// history with the serve envelope, permessage-deflate.
pub fn serve_in_process() -> wsring::Server {
    let config = wsring::EngineConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        threads: 1,
        pin_threads: false,
        deflate: Some(wsring::engine::DeflateConfig::default()),
        ..Default::default()
    };
    wsring::engine::ServerBuilder::from(config)
        .history(wsring::api::HistoryConfig {
            envelope: Some(std::sync::Arc::new(wsring::cli::serve::envelope)),
            ..Default::default()
        })
        .start(wsring::cli::serve::BenchProtocol::new)
        .expect("server")
}
