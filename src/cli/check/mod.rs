//! Host check for `wsring check --connections N`: can this host hold N connections?
//!
//! wsring's goal is hundreds of thousands of connections per host, and a stock Linux host
//! stops far short of that: the descriptor limits, the listen backlogs, the TCP memory
//! limits and the io_uring switches all have defaults sized for ordinary programs. This
//! module reads those knobs (read-only, no root needed), computes what N connections need,
//! and reports one line per knob: name, current value, needed value, status and why.
//!
//! The knob names, the formulas and the output mirror `scripts/tune.sh --check`, which can
//! also raise the values (`--apply`) and undo that (`--revert`); `tuning/README.md` explains
//! each knob. Two lines exist only here: `backend` (a real `io_uring_setup` call, see
//! [`backend_probe`]) and, like the script, `seccomp`; both only when the proc root is `/`.
//!
//! `memlock` is measured, not computed, when the proc root is `/`: whether the kernel
//! charges io_uring memory to RLIMIT_MEMLOCK, and how much, changed twice (not charged from
//! 5.12, charged again from 6.14), and the charge is per user, summed over all of its
//! processes. So the check sets up W rings exactly as the server's workers do (same flags,
//! entries, file table and provided-buffer ring) under the current limit, all at once, and
//! reports whether they fit; see [`memlock_fit`]. Only where it cannot measure (a fake proc
//! root, a kernel that refuses the server's ring) does it fall back to the kernel-version
//! rule of the table below, the same one `scripts/tune.sh` applies.
//!
//! [`startup_limits_summary`] is the same arithmetic for `wsring serve`'s start-up log line:
//! how many connections the descriptor limit allows.
//!
//! Formulas (N = connections, W = worker threads = io_uring rings, default online CPUs):
//!
//! | knob | needed |
//! |---|---|
//! | `fs.file-max` | >= nofile * 5/4 |
//! | `fs.nr_open` | >= nofile |
//! | `nofile` (RLIMIT_NOFILE, hard) | >= N + [`HEADROOM_FDS`] |
//! | `memlock` (RLIMIT_MEMLOCK, soft) | measured: W rings set up as the server does fit (root `/`); otherwise by kernel: none on 5.12 to 6.13 (charged to the memory cgroup), >= W * [`RING_MEMLOCK_BYTES`] before 5.12, from 6.14, or when unknown |
//! | `memory` (MemAvailable) | >= N * [`PER_CONNECTION_BYTES`] |
//! | `net.core.somaxconn` | >= clamp(N/16, 4096, 65535) |
//! | `net.ipv4.tcp_max_syn_backlog` | >= clamp(N/16, 1024, 65535) |
//! | `net.core.netdev_max_backlog` | >= clamp(N/64, 1000, 65536) |
//! | `net.ipv4.tcp_mem` (pages) | pressure >= N * 4 KiB / page, max >= 3/2 of that |
//! | `kernel.io_uring_disabled` | 0 (or 1 for root / members of `kernel.io_uring_group`) |
//!
//! `net.ipv4.tcp_rmem`, `tcp_wmem`, `tcp_fin_timeout`, `tcp_tw_reuse` and
//! `ip_local_port_range` are advisory ([`Status::Info`]): they never fail the check.
#![deny(clippy::unwrap_used)]

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

mod kernel;
mod memlock;
mod read;
mod report;

pub use kernel::backend_probe;
use kernel::*;
use memlock::*;
pub use memlock::{RingFit, RingStage, memlock_fit};
use read::*;
pub use report::{CheckLine, CheckReport, Status};

/// Descriptors kept beside the N connection sockets when sizing `nofile`: listeners (one
/// per worker), rings, eventfds, log files, stdio and whatever the embedding program opens.
pub const HEADROOM_FDS: u64 = 1024;

/// Descriptors one wsring process keeps for itself (listeners, rings, eventfds, stdio) when
/// [`startup_limits_summary`] turns RLIMIT_NOFILE into a connection cap.
pub const RESERVED_FDS_PER_PROCESS: u64 = 64;

/// Kernel memory of one idle TCP socket (struct tcp_sock, its file, dentry, inode and
/// epoll/io_uring bookkeeping): about 3.6 KiB, the floor no tuning removes. DESIGN.md budget;
/// `scripts/idle.sh` measured 8-9.5 KiB of Slab growth per loopback connection for both
/// ends together (client and server socket), i.e. about 4-4.7 KiB per end.
pub const KERNEL_TCP_SOCKET_BYTES: u64 = 3_686;

/// Kernel memory of the io_uring multishot recv request parked on each idle connection:
/// about 0.9 KiB. DESIGN.md budget (included in the Slab figure above when measured).
pub const IO_URING_RECV_BYTES: u64 = 922;

/// wsring's own user-space memory per idle connection, planned at its hard limit of 1 KiB
/// (the target is 128 B; `scripts/idle.sh` measured about 300 B of server RSS per idle
/// connection at 15,000 connections).
pub const WSRING_USER_BYTES: u64 = 1_024;

/// Memory per idle connection, all parts together: 5.5 KiB.
pub const PER_CONNECTION_BYTES: u64 =
    KERNEL_TCP_SOCKET_BYTES + IO_URING_RECV_BYTES + WSRING_USER_BYTES;

/// Socket-buffer memory (`net.ipv4.tcp_mem`) budgeted per connection: a socket that holds
/// any queued data is charged at least one 4 KiB page.
pub const TCP_MEM_BYTES_PER_CONNECTION: u64 = 4096;

/// RLIMIT_MEMLOCK budget per worker where the kernel charges io_uring memory to it and the
/// charge cannot be measured (see the module doc): 1 MiB. Measured on Linux 6.18 with 4 KiB
/// pages, one worker's ring at the server's 4096 SQ / 32768 CQ entries charges 788 KiB
/// (SQ/CQ rings and SQEs, 197 pages) and its provided-buffer ring 4 KiB: 792 KiB, rounded up
/// here for larger pages. The receive buffers themselves are ordinary process memory: the
/// kernel pins none of them. A process with CAP_IPC_LOCK is charged nothing; when the
/// limit is short, `io_uring_setup` or the buffer-ring registration fails with ENOMEM.
pub const RING_MEMLOCK_BYTES: u64 = 1024 * 1024;

/// The kernels (from, to exclusive) whose io_uring charges ring memory to the memory cgroup
/// instead of RLIMIT_MEMLOCK: 5.12 moved it to the cgroup, 6.14 (io_uring's region API)
/// charges RLIMIT_MEMLOCK again, as measured on 6.18.
pub const MEMLOCK_UNCHARGED_KERNELS: ((u32, u32), (u32, u32)) = ((5, 12), (6, 14));

/// Whether io_uring on kernel `version` (major, minor) charges ring memory to RLIMIT_MEMLOCK
/// (for a process without CAP_IPC_LOCK); an unknown version is assumed to.
pub fn kernel_charges_memlock(version: Option<(u32, u32)>) -> bool {
    let (from, to) = MEMLOCK_UNCHARGED_KERNELS;
    version.is_none_or(|v| v < from || v >= to)
}

/// The kernel's largest `fs.nr_open` (`sysctl_nr_open_max` on 64-bit).
pub const NR_OPEN_MAX: u64 = 1_073_741_816;

/// Recommended `net.ipv4.tcp_rmem` (min default max, bytes).
pub const RECOMMENDED_TCP_RMEM: [u64; 3] = [4096, 16384, 4_194_304];
/// Recommended `net.ipv4.tcp_wmem` (min default max, bytes).
pub const RECOMMENDED_TCP_WMEM: [u64; 3] = [4096, 16384, 4_194_304];
/// Recommended `net.ipv4.tcp_fin_timeout` (seconds); anything up to 30 passes.
pub const RECOMMENDED_FIN_TIMEOUT: u64 = 15;
/// Recommended `net.ipv4.ip_local_port_range` (for load tools on the same host).
pub const RECOMMENDED_PORT_RANGE: [u64; 2] = [10240, 65535];

const MIB: u64 = 1024 * 1024;

/// Options of `wsring check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// The number of concurrent connections the host should hold.
    pub connections: u64,
    /// Where `proc/` is read from: normally `/`; tests point it at a fake tree.
    /// Only when it is `/` are the process's own limits, seccomp and io_uring probed live
    /// (and the rings for `memlock` really set up).
    pub proc_root: PathBuf,
    /// Worker threads (= io_uring rings) the server will run, as `wsring serve --threads`:
    /// 0 = one per online CPU.
    pub threads: usize,
}

impl CheckOptions {
    /// Options for `connections` on the real host (`proc_root` = `/`), one worker per CPU.
    pub fn new(connections: u64) -> Self {
        CheckOptions {
            connections,
            proc_root: PathBuf::from("/"),
            threads: 0,
        }
    }
}

/// Values N connections need; the same formulas as `scripts/tune.sh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needed {
    /// RLIMIT_NOFILE (hard): N + [`HEADROOM_FDS`].
    pub nofile: u64,
    /// `fs.nr_open`: nofile.
    pub nr_open: u64,
    /// `fs.file-max`: nofile * 5/4, rounded up.
    pub file_max: u64,
    /// `net.core.somaxconn`: clamp(ceil(N/16), 4096, 65535).
    pub somaxconn: u64,
    /// `net.ipv4.tcp_max_syn_backlog`: clamp(ceil(N/16), 1024, 65535).
    pub syn_backlog: u64,
    /// `net.core.netdev_max_backlog`: clamp(ceil(N/64), 1000, 65536).
    pub netdev_backlog: u64,
    /// `net.ipv4.tcp_mem` in pages: [3/4 p, p, 3/2 p] with p = ceil(N * 4 KiB / page).
    pub tcp_mem: [u64; 3],
    /// RLIMIT_MEMLOCK (soft) in bytes where the kernel charges io_uring memory and the
    /// charge is not measured: workers * [`RING_MEMLOCK_BYTES`].
    pub memlock: u64,
    /// MemAvailable in MiB: ceil(N * [`PER_CONNECTION_BYTES`] / MiB).
    pub memory_mib: u64,
}

impl Needed {
    /// Computes the needed values for `connections`, `workers` rings and `page_size`.
    pub fn compute(connections: u64, workers: u64, page_size: u64) -> Needed {
        let n = connections;
        let page = page_size.max(1);
        let nofile = n.saturating_add(HEADROOM_FDS);
        let pressure = n
            .saturating_mul(TCP_MEM_BYTES_PER_CONNECTION)
            .div_ceil(page);
        Needed {
            nofile,
            nr_open: nofile,
            file_max: nofile.saturating_mul(5).div_ceil(4),
            somaxconn: n.div_ceil(16).clamp(4096, 65535),
            syn_backlog: n.div_ceil(16).clamp(1024, 65535),
            netdev_backlog: n.div_ceil(64).clamp(1000, 65536),
            tcp_mem: [
                pressure.saturating_mul(3).div_ceil(4),
                pressure,
                pressure.saturating_mul(3).div_ceil(2),
            ],
            memlock: workers.saturating_mul(RING_MEMLOCK_BYTES),
            memory_mib: n.saturating_mul(PER_CONNECTION_BYTES).div_ceil(MIB),
        }
    }
}

/// A resource limit value; `None` is unlimited.
type Rlim = Option<u64>;

/// Runs every check for `opts.connections`; read-only, needs no privileges.
pub fn run_check(opts: &CheckOptions) -> CheckReport {
    let root = opts.proc_root.as_path();
    let real = is_real_root(root);
    let n = opts.connections;
    let workers = workers(opts.threads);
    let page = page_size();
    let need = Needed::compute(n, workers, page);
    let mut b = Builder { lines: Vec::new() };

    b.min_sysctl(
        root,
        "fs.file-max",
        need.file_max,
        "system-wide open-file limit; every socket is a struct file even as an io_uring direct descriptor",
    );
    b.min_sysctl(
        root,
        "fs.nr_open",
        need.nr_open,
        "ceiling for any process's RLIMIT_NOFILE; a hard nofile above it cannot be set (PAM logins can fail)",
    );

    // RLIMIT_NOFILE: wsring raises soft to hard at start, so the hard limit decides.
    match read_limit(root, "Max open files", libc::RLIMIT_NOFILE) {
        None => b.push(
            "nofile",
            "?".into(),
            need.nofile.to_string(),
            Status::Info,
            "cannot read RLIMIT_NOFILE",
        ),
        Some((soft, hard)) => {
            let cur = format!("{}/{}", rlim_str(soft), rlim_str(hard));
            if !rlim_ge(hard, need.nofile) {
                b.push(
                    "nofile",
                    cur,
                    need.nofile.to_string(),
                    Status::Low,
                    "RLIMIT_NOFILE (soft/hard) caps connections per process (one descriptor each, also the size of a ring's direct-descriptor table)",
                );
            } else if !rlim_ge(soft, need.nofile) {
                b.push(
                    "nofile",
                    cur,
                    need.nofile.to_string(),
                    Status::Ok,
                    "soft limit is below: wsring raises soft to hard at start; other tools (ulimit -n) may need it raised",
                );
            } else {
                b.push("nofile", cur, need.nofile.to_string(), Status::Ok, "");
            }
        }
    }

    let nofile_soft = read_limit(root, "Max open files", libc::RLIMIT_NOFILE).map(|(soft, _)| soft);
    memlock_line(&mut b, root, real, workers, need.memlock, n, nofile_soft);

    // Memory for N idle connections.
    let avail = fs::read_to_string(root.join("proc/meminfo"))
        .ok()
        .and_then(|t| mem_available_mib(&t));
    let need_mem = format!("{}MiB", need.memory_mib);
    match avail {
        None => {
            let why = format!(
                "cannot read MemAvailable from {}",
                root.join("proc/meminfo").display()
            );
            b.push("memory", "?".into(), need_mem, Status::Info, &why);
        }
        Some(mib) if mib >= need.memory_mib => {
            b.push("memory", format!("{mib}MiB"), need_mem, Status::Ok, "");
        }
        Some(mib) => {
            let why = format!(
                "MemAvailable is below N x {PER_CONNECTION_BYTES} B per idle connection (kernel socket + io_uring recv + wsring); add RAM or lower N"
            );
            b.push("memory", format!("{mib}MiB"), need_mem, Status::Low, &why);
        }
    }

    b.min_sysctl(
        root,
        "net.core.somaxconn",
        need.somaxconn,
        "caps every listen() backlog; a reconnect storm overflows a short accept queue and clients wait for SYN retries",
    );
    b.min_sysctl(
        root,
        "net.ipv4.tcp_max_syn_backlog",
        need.syn_backlog,
        "half-open (SYN_RECV) connections kept per listener before SYN cookies take over",
    );
    b.min_sysctl(
        root,
        "net.core.netdev_max_backlog",
        need.netdev_backlog,
        "packets queued per CPU between the NIC and TCP; bursts of many small frames drop beyond it",
    );

    // tcp_mem: "min pressure max" in pages; pressure and max decide.
    let need_tcp_mem = join3(&need.tcp_mem);
    match read_sysctl(root, "net.ipv4.tcp_mem") {
        None => {
            let why = format!(
                "cannot read {}",
                sysctl_path(root, "net.ipv4.tcp_mem").display()
            );
            b.push(
                "net.ipv4.tcp_mem",
                "?".into(),
                need_tcp_mem,
                Status::Info,
                &why,
            );
        }
        Some(cur) => {
            let ok = parse_u64s(&cur).is_some_and(|c| {
                c.len() == 3 && c[1] >= need.tcp_mem[1] && c[2] >= need.tcp_mem[2]
            });
            let why = format!(
                "pages ({page} B) of socket-buffer memory for all TCP sockets together; past 'pressure' buffers shrink, past 'max' sends and receives fail"
            );
            b.push(
                "net.ipv4.tcp_mem",
                cur,
                need_tcp_mem,
                if ok { Status::Ok } else { Status::Low },
                if ok { "" } else { &why },
            );
        }
    }

    // Socket buffer defaults: advisory.
    for (name, rec) in [
        ("net.ipv4.tcp_rmem", RECOMMENDED_TCP_RMEM),
        ("net.ipv4.tcp_wmem", RECOMMENDED_TCP_WMEM),
    ] {
        let rec_s = join3(&rec);
        match read_sysctl(root, name) {
            None => {
                let why = format!("cannot read {}", sysctl_path(root, name).display());
                b.push(name, "?".into(), rec_s, Status::Info, &why);
            }
            Some(cur) => {
                let ok = parse_u64s(&cur).is_some_and(|c| c.len() == 3 && c[1] <= rec[1]);
                let why = format!(
                    "default (middle) buffer above {}: each busy socket may hold more kernel memory; tcp_mem still caps the total (not changed by --apply; tuning/sysctl.d/60-wsring.conf sets it)",
                    rec[1]
                );
                b.push(
                    name,
                    cur,
                    rec_s,
                    if ok { Status::Ok } else { Status::Info },
                    if ok { "" } else { &why },
                );
            }
        }
    }

    let fin_need = format!("<=30 ({RECOMMENDED_FIN_TIMEOUT})");
    let fin = read_sysctl(root, "net.ipv4.tcp_fin_timeout");
    if fin
        .as_deref()
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|v| v <= 30)
    {
        b.push(
            "net.ipv4.tcp_fin_timeout",
            fin.unwrap_or_default(),
            fin_need,
            Status::Ok,
            "",
        );
    } else {
        b.push(
            "net.ipv4.tcp_fin_timeout",
            fin.unwrap_or_else(|| "?".into()),
            fin_need,
            Status::Info,
            "orphaned FIN_WAIT_2 sockets stay this many seconds after wsring closes; lower it under heavy churn (not changed by --apply)",
        );
    }

    let tw = read_sysctl(root, "net.ipv4.tcp_tw_reuse");
    if tw.as_deref() == Some("1") {
        b.push(
            "net.ipv4.tcp_tw_reuse",
            "1".into(),
            "1".into(),
            Status::Ok,
            "",
        );
    } else {
        b.push(
            "net.ipv4.tcp_tw_reuse",
            tw.unwrap_or_else(|| "?".into()),
            "1".into(),
            Status::Info,
            "lets outbound connects reuse TIME_WAIT ports (load tools, upstream proxies); no effect on accepted connections; 2 = loopback only",
        );
    }

    let rec_range = join3(&RECOMMENDED_PORT_RANGE);
    match read_sysctl(root, "net.ipv4.ip_local_port_range") {
        Some(cur) => {
            let ports = parse_u64s(&cur)
                .filter(|c| c.len() == 2 && c[1] >= c[0])
                .map_or(1, |c| c[1] - c[0] + 1);
            let why = format!(
                "server sockets take no ephemeral port; a load tool gets {ports} connections per (source IP, server ip:port), so N needs {} source address(es)",
                n.div_ceil(ports)
            );
            b.push(
                "net.ipv4.ip_local_port_range",
                cur,
                rec_range,
                Status::Info,
                &why,
            );
        }
        None => b.push(
            "net.ipv4.ip_local_port_range",
            "?".into(),
            rec_range,
            Status::Info,
            "cannot read; matters only for load tools",
        ),
    }

    io_uring_disabled_line(&mut b, root);

    if real {
        seccomp_line(&mut b);
        let (usable, reason) = backend_probe();
        if usable {
            b.push(
                "backend",
                "io_uring".into(),
                "io_uring".into(),
                Status::Ok,
                "",
            );
        } else {
            let why = format!("wsring will use its epoll backend: {reason}");
            b.push(
                "backend",
                "epoll".into(),
                "io_uring".into(),
                Status::Info,
                &why,
            );
        }
    }

    CheckReport {
        lines: b.lines,
        connections: n,
        workers,
        proc_root: opts.proc_root.clone(),
    }
}

/// Formats 19936 as "19,936".
fn thousands(v: u64) -> String {
    let digits: Vec<char> = v.to_string().chars().collect();
    let groups: Vec<String> = digits
        .rchunks(3)
        .rev()
        .map(|g| g.iter().collect())
        .collect();
    groups.join(",")
}

/// The connection cap that RLIMIT_NOFILE (soft, as read now: call it after raising soft to
/// hard) and the configured maximum allow, and a log line saying so, e.g.
/// `nofile 20000 caps connections at 19,936`. [`RESERVED_FDS_PER_PROCESS`] descriptors are
/// kept for listeners, rings and stdio.
pub fn startup_limits_summary(max_connections_configured: Option<u64>) -> (u64, String) {
    let Some((soft, hard)) = getrlimit(libc::RLIMIT_NOFILE) else {
        let cap = max_connections_configured
            .unwrap_or(1024 - RESERVED_FDS_PER_PROCESS)
            .min(1024 - RESERVED_FDS_PER_PROCESS);
        return (
            cap,
            format!(
                "cannot read RLIMIT_NOFILE ({}); assuming 1024, connections capped at {}",
                std::io::Error::last_os_error(),
                thousands(cap)
            ),
        );
    };
    let hard_note = match (soft, hard) {
        (Some(s), Some(h)) if h > s => {
            format!(" (hard limit {h}: raise the soft limit to it for more)")
        }
        (Some(_), None) => " (hard limit unlimited: raise the soft limit for more)".to_string(),
        _ => String::new(),
    };
    match soft {
        None => match max_connections_configured {
            Some(m) => (
                m,
                format!(
                    "nofile unlimited; max connections {} caps connections at {}",
                    thousands(m),
                    thousands(m)
                ),
            ),
            None => (
                u64::MAX,
                "nofile unlimited; connections are not capped by descriptors".to_string(),
            ),
        },
        Some(s) => {
            let fd_cap = s.saturating_sub(RESERVED_FDS_PER_PROCESS);
            let mut line = format!("nofile {s} caps connections at {}", thousands(fd_cap));
            let cap = match max_connections_configured {
                Some(m) if m < fd_cap => {
                    line.push_str(&format!(
                        "; max connections {} caps them at {}",
                        thousands(m),
                        thousands(m)
                    ));
                    m
                }
                Some(m) if m > fd_cap => {
                    line.push_str(&format!(
                        ", below the configured max connections {}: raise LimitNOFILE / ulimit -n",
                        thousands(m)
                    ));
                    fd_cap
                }
                _ => fd_cap,
            };
            line.push_str(&hard_note);
            (cap, line)
        }
    }
}

#[cfg(test)]
mod tests;
