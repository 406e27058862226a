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

/// Verdict on one knob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Good enough for the requested number of connections.
    Ok,
    /// Falls short: the check fails.
    Low,
    /// Advisory only, or unreadable: does not fail the check.
    Info,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "OK",
            Status::Low => "LOW",
            Status::Info => "INFO",
        })
    }
}

/// One knob: what it is, what it needs and why it matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    /// Knob name, the same as in `scripts/tune.sh` (sysctl name, `nofile`, `memlock`, ...).
    pub name: String,
    /// Current value as read (`?` when unreadable).
    pub current: String,
    /// Value needed for the requested connections (or the recommendation, for Info knobs).
    pub needed: String,
    /// Verdict.
    pub status: Status,
    /// Why the knob matters; empty when there is nothing to say.
    pub why: String,
}

/// The result of [`run_check`]: one line per knob, in the order of `scripts/tune.sh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// One line per knob.
    pub lines: Vec<CheckLine>,
    /// The connections checked for.
    pub connections: u64,
    /// Worker threads (= io_uring rings) assumed for the memlock budget.
    pub workers: u64,
    /// The proc root that was read.
    pub proc_root: PathBuf,
}

impl CheckReport {
    /// True when no line is [`Status::Low`].
    pub fn passed(&self) -> bool {
        self.lines.iter().all(|l| l.status != Status::Low)
    }

    /// The line for knob `name`, if present.
    pub fn line(&self, name: &str) -> Option<&CheckLine> {
        self.lines.iter().find(|l| l.name == name)
    }

    /// Names of the knobs that fall short.
    pub fn low(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.status == Status::Low)
            .map(|l| l.name.as_str())
            .collect()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "wsring host check: {} connections, {} worker(s), root {}",
            self.connections,
            self.workers,
            self.proc_root.display()
        )?;
        writeln!(
            f,
            "{:<30} {:<24} {:<24} STATUS",
            "KNOB", "CURRENT", "NEEDED"
        )?;
        for l in &self.lines {
            writeln!(
                f,
                "{:<30} {:<24} {:<24} {}",
                l.name, l.current, l.needed, l.status
            )?;
        }
        let mut notes = self.lines.iter().filter(|l| !l.why.is_empty()).peekable();
        if notes.peek().is_some() {
            writeln!(f)?;
            writeln!(f, "notes:")?;
            for l in notes {
                writeln!(f, "  {} ({}): {}", l.name, l.status, l.why)?;
            }
        }
        writeln!(f)?;
        let low = self.low();
        if low.is_empty() {
            writeln!(f, "result: OK for {} connections", self.connections)
        } else {
            writeln!(
                f,
                "result: LOW for {} connections: {}",
                self.connections,
                low.join(" ")
            )?;
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            for line in self.fix_lines(root, sudo_available()) {
                writeln!(f, "{line}")?;
            }
            Ok(())
        }
    }
}

/// Whether a `sudo` is on `PATH`.
fn sudo_available() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("sudo").is_file()))
}

impl CheckReport {
    /// What to run to fix the knobs that are LOW, one command per knob, for a user who is
    /// `root` or has `sudo` (else the commands are marked to run as root): `sysctl -w` for
    /// kernel settings (persist them with `tuning/sysctl.d`), the limit for a shell and for a
    /// systemd service, and the one-step script for a checkout of the repository.
    pub fn fix_lines(&self, root: bool, sudo: bool) -> Vec<String> {
        let low: Vec<&CheckLine> = self
            .lines
            .iter()
            .filter(|l| l.status == Status::Low)
            .collect();
        if low.is_empty() {
            return Vec::new();
        }
        let (prefix, who) = match (root, sudo) {
            (true, _) => ("", ""),
            (false, true) => ("sudo ", ""),
            (false, false) => ("", " (as root)"),
        };
        let mut out = vec![format!("fix{who}:")];
        for l in low {
            let how = if l.name.contains('.') {
                format!("{prefix}sysctl -w {}=\"{}\"", l.name, l.needed)
            } else {
                match l.name.as_str() {
                    "nofile" => format!(
                        "ulimit -n {n} in the shell that starts wsring (the hard limit: {prefix}prlimit --nofile={n}:{n} --pid $$), LimitNOFILE={n} in a systemd unit",
                        n = l.needed
                    ),
                    "memlock" => format!(
                        "ulimit -l {} in the shell that starts wsring, LimitMEMLOCK= in a systemd unit",
                        l.needed.trim_end_matches("KiB")
                    ),
                    _ => format!("needs {} ({})", l.needed, l.why),
                }
            };
            out.push(format!("  {:<28} {how}", l.name));
        }
        out.push(format!(
            "  or, in a checkout of wsring: {prefix}scripts/tune.sh --connections {} --apply   (sysctls at once and at boot; limits at next login)",
            self.connections
        ));
        out
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

fn rlim_str(v: Rlim) -> String {
    v.map_or_else(|| "unlimited".to_string(), |v| v.to_string())
}

fn rlim_kib(v: Rlim) -> String {
    v.map_or_else(
        || "unlimited".to_string(),
        |v| format!("{}KiB", v.div_ceil(1024)),
    )
}

fn rlim_ge(v: Rlim, need: u64) -> bool {
    v.is_none_or(|v| v >= need)
}

fn is_real_root(root: &Path) -> bool {
    root.as_os_str().is_empty() || root == Path::new("/")
}

/// Reads `<root>/proc/sys/<name with dots as slashes>` with whitespace squeezed.
fn read_sysctl(root: &Path, name: &str) -> Option<String> {
    let path = root.join("proc/sys").join(name.replace('.', "/"));
    let text = fs::read_to_string(path).ok()?;
    let v = text.split_whitespace().collect::<Vec<_>>().join(" ");
    (!v.is_empty()).then_some(v)
}

fn parse_u64s(s: &str) -> Option<Vec<u64>> {
    s.split_whitespace().map(|w| w.parse().ok()).collect()
}

fn parse_rlim(s: &str) -> Option<Rlim> {
    if s == "unlimited" {
        Some(None)
    } else {
        s.parse().ok().map(Some)
    }
}

/// Finds `name` ("Max open files") in text in the format of Linux's `/proc/self/limits`
/// and returns (soft, hard).
fn parse_limits(text: &str, name: &str) -> Option<(Rlim, Rlim)> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        let mut fields = rest.split_whitespace();
        let soft = parse_rlim(fields.next()?)?;
        let hard = parse_rlim(fields.next()?)?;
        Some((soft, hard))
    })
}

fn getrlimit(resource: libc::__rlimit_resource_t) -> Option<(Rlim, Rlim)> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `struct rlimit` through the pointer, which points to a
    // live, properly aligned `libc::rlimit` owned by this frame.
    let rc = unsafe { libc::getrlimit(resource, &mut rl) };
    if rc != 0 {
        return None;
    }
    let conv = |v: libc::rlim_t| (v != libc::RLIM_INFINITY).then_some(v);
    Some((conv(rl.rlim_cur), conv(rl.rlim_max)))
}

/// (soft, hard) of a limit: from `<root>/proc/self/limits` when the root is a fake tree
/// holding that file, otherwise from this process via getrlimit.
fn read_limit(
    root: &Path,
    name: &str,
    resource: libc::__rlimit_resource_t,
) -> Option<(Rlim, Rlim)> {
    let fake_limits = (!is_real_root(root))
        .then(|| fs::read_to_string(root.join("proc/self/limits")).ok())
        .flatten();
    match fake_limits {
        Some(text) => parse_limits(&text, name),
        None => getrlimit(resource),
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions; it only reads a configuration value.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).ok().filter(|&v| v > 0).unwrap_or(4096)
}

/// The server's worker count for `--threads threads` (0 = one per CPU, at most
/// [`crate::engine::MAX_WORKERS`], as `Server::start_with` decides).
fn workers(threads: usize) -> u64 {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    n.min(crate::engine::MAX_WORKERS) as u64
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// The effective group and the supplementary groups of this process.
fn groups() -> Vec<u32> {
    // SAFETY: getegid cannot fail and touches no memory of ours.
    let mut out = vec![unsafe { libc::getegid() }];
    // SAFETY: with size 0 getgroups only returns the number of supplementary groups and
    // writes nothing; a null pointer is allowed then.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if let Ok(len) = usize::try_from(n) {
        let mut buf: Vec<libc::gid_t> = vec![0; len];
        // SAFETY: `buf` holds `n` writable gid_t slots and we pass exactly that count.
        let got = unsafe { libc::getgroups(n, buf.as_mut_ptr()) };
        if let Ok(got) = usize::try_from(got) {
            buf.truncate(got);
            out.extend(buf);
        }
    }
    out
}

struct Builder {
    lines: Vec<CheckLine>,
}

impl Builder {
    fn push(&mut self, name: &str, current: String, needed: String, status: Status, why: &str) {
        self.lines.push(CheckLine {
            name: name.to_string(),
            current,
            needed,
            status,
            why: why.to_string(),
        });
    }

    /// A sysctl that must be at least `need`.
    fn min_sysctl(&mut self, root: &Path, name: &str, need: u64, why: &str) {
        match read_sysctl(root, name) {
            None => {
                let why = format!("cannot read {}: {why}", sysctl_path(root, name).display());
                self.push(name, "?".into(), need.to_string(), Status::Info, &why);
            }
            Some(cur) => {
                let ok = cur.parse::<u64>().is_ok_and(|v| v >= need);
                let (status, why) = if ok {
                    (Status::Ok, "")
                } else {
                    (Status::Low, why)
                };
                self.push(name, cur, need.to_string(), status, why);
            }
        }
    }
}

fn sysctl_path(root: &Path, name: &str) -> PathBuf {
    root.join("proc/sys").join(name.replace('.', "/"))
}

fn join3(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}

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

fn mem_available_mib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == "MemAvailable:")
            .then(|| it.next()?.parse::<u64>().ok())
            .flatten()
            .map(|kib| kib / 1024)
    })
}

// The server's ring geometry comes from the io_uring backend itself: the same builder
// (flags, completion-queue size), submission-queue entries and buffer-ring sizes.
use crate::engine::uring::{
    INC_RING_BUFFERS as SERVER_INC_RING_BUFFERS, IOU_PBUF_RING_INC,
    RING_BUFFERS as SERVER_RING_BUFFERS, SQ_ENTRIES as SERVER_SQ_ENTRIES,
};
/// Bit of CAP_IPC_LOCK in the capability sets of `/proc/self/status`.
const CAP_IPC_LOCK: u32 = 14;

/// The step of a worker's ring set-up that failed in [`memlock_fit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingStage {
    /// `io_uring_setup` with the server's flags and entries.
    Setup,
    /// Registering the sparse direct-descriptor table.
    FileTable,
    /// Registering the provided-buffer ring (incremental, else the plain fallback).
    BufferRing,
}

impl fmt::Display for RingStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RingStage::Setup => "io_uring_setup",
            RingStage::FileTable => "sparse file table",
            RingStage::BufferRing => "buffer ring registration",
        })
    }
}

/// What [`memlock_fit`] found.
#[derive(Debug)]
pub enum RingFit {
    /// Every ring was set up, all of them at once.
    Fits,
    /// The rings before `fitted` (0-based) were set up; ring `fitted` failed at `stage`.
    Short {
        /// Rings that were set up before the failure.
        fitted: u64,
        /// The step that failed.
        stage: RingStage,
        /// Its error.
        error: std::io::Error,
    },
}

/// Anonymous memory for a provided-buffer ring's entries, unmapped on drop.
struct RingEntries {
    ptr: *mut libc::c_void,
    len: usize,
}

impl RingEntries {
    fn map(entries: u16) -> std::io::Result<RingEntries> {
        let len = usize::from(entries) * size_of::<io_uring::types::BufRingEntry>();
        let ptr = crate::engine::uring::map(len)?.cast::<libc::c_void>();
        Ok(RingEntries { ptr, len })
    }

    /// Registers these entries as buffer group 0 of `ring`.
    ///
    /// # Safety
    /// `self` must outlive the registration: drop `ring` first.
    unsafe fn register(
        &self,
        ring: &io_uring::IoUring,
        entries: u16,
        flags: u16,
    ) -> std::io::Result<()> {
        // SAFETY: the memory is page-aligned (mmap), holds `entries` entries and, per this
        // function's contract, outlives the registration. The kernel reads entries only
        // between its head and our tail, which is 0: it never reads a buffer address.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(self.ptr as u64, entries, 0, flags)
        }
    }
}

impl Drop for RingEntries {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; the ring it was registered with is gone
        // (`WorkerRing` drops its ring first).
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// One worker's ring as the server sets it up. Fields drop in order: the ring, and with it
/// its registrations, before the buffer-ring memory.
struct WorkerRing {
    _ring: io_uring::IoUring,
    _entries: RingEntries,
}

/// Sets up one ring like a server worker: the io_uring backend's own builder (its flags
/// and entries), a sparse file table of `file_table` slots, and its provided-buffer ring
/// (incremental, else plain).
fn set_up_worker_ring(file_table: u32) -> Result<WorkerRing, (RingStage, std::io::Error)> {
    let ring = crate::engine::uring::builder()
        .build(SERVER_SQ_ENTRIES)
        .map_err(|e| (RingStage::Setup, e))?;
    ring.submitter()
        .register_files_sparse(file_table)
        .map_err(|e| (RingStage::FileTable, e))?;
    let buffer_ring = |entries: u16, flags: u16| -> std::io::Result<RingEntries> {
        let memory = RingEntries::map(entries)?;
        // SAFETY: `memory` is returned to become `WorkerRing::_entries`, dropped after the
        // ring; when registration fails nothing is registered and it may go at once.
        unsafe { memory.register(&ring, entries, flags) }?;
        Ok(memory)
    };
    // Like the server: any failure of the incremental ring falls back to the plain one.
    let entries = buffer_ring(SERVER_INC_RING_BUFFERS, IOU_PBUF_RING_INC)
        .or_else(|_| buffer_ring(SERVER_RING_BUFFERS, 0))
        .map_err(|e| (RingStage::BufferRing, e))?;
    Ok(WorkerRing {
        _ring: ring,
        _entries: entries,
    })
}

/// How long [`memlock_fit`] retries a ring the kernel refused with ENOMEM, in all. io_uring
/// releases a closed ring's charge asynchronously (in a kernel worker, after an RCU grace
/// period): here a previous check's rings still counted for a few tens of milliseconds
/// after it exited (gone within 50 ms), so rings just closed by another process of the
/// user (a previous check, a stopped server) must not make this one short.
pub const RING_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// Sets up `workers` rings exactly as the server's workers do (flags, 4096/32768 entries,
/// a sparse file table of `file_table` slots, the provided-buffer ring), keeps them all at
/// once, as a running server does, and closes them again. This measures what the kernel
/// charges to RLIMIT_MEMLOCK (if anything) under the process's current limit, on this
/// kernel, for this user (the charge is per user: other processes' rings count too). A
/// ring refused with ENOMEM is retried for up to [`RING_RELEASE_WAIT`] in all.
pub fn memlock_fit(workers: u64, file_table: u32) -> RingFit {
    const STEP: std::time::Duration = std::time::Duration::from_millis(10);
    let mut rings = Vec::new();
    let mut waited = std::time::Duration::ZERO;
    for fitted in 0..workers {
        loop {
            match set_up_worker_ring(file_table) {
                Ok(ring) => {
                    rings.push(ring);
                    break;
                }
                Err((_, error))
                    if error.raw_os_error() == Some(libc::ENOMEM) && waited < RING_RELEASE_WAIT =>
                {
                    std::thread::sleep(STEP);
                    waited += STEP;
                }
                Err((stage, error)) => {
                    return RingFit::Short {
                        fitted,
                        stage,
                        error,
                    };
                }
            }
        }
    }
    RingFit::Fits
}

/// The effective capability set from text in the format of `/proc/self/status`.
fn cap_eff(status: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let hex = l.strip_prefix("CapEff:")?.trim();
        u64::from_str_radix(hex, 16).ok()
    })
}

/// Whether this process holds CAP_IPC_LOCK: io_uring then charges it no locked memory.
fn has_cap_ipc_lock() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| cap_eff(&s))
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOMEM) => "ENOMEM".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::ENOSYS) => "ENOSYS".into(),
        Some(libc::EMFILE) => "EMFILE".into(),
        _ => e.to_string(),
    }
}

fn rings(n: u64) -> String {
    if n == 1 {
        "1 ring".into()
    } else {
        format!("{n} rings")
    }
}

/// What to raise RLIMIT_MEMLOCK to when the rings do not fit under `soft`: their `need`
/// ([`Needed::memlock`]), or that much above the current value when it already is above it
/// (other processes of the user hold the rest). The same rule as `scripts/tune.sh --apply`.
fn memlock_raise_to(soft: u64, need: u64) -> u64 {
    if soft >= need {
        soft.saturating_add(need)
    } else {
        need
    }
}

/// The `memlock` line: measured when the root is `/` ([`memlock_fit`]); by the kernel
/// version (`<root>/proc/sys/kernel/osrelease`) on a fake root or when the measurement
/// cannot run. io_uring checks the soft limit.
fn memlock_line(
    b: &mut Builder,
    root: &Path,
    real: bool,
    workers: u64,
    budget: u64,
    connections: u64,
    nofile_soft: Option<Rlim>,
) {
    const NAME: &str = "memlock";
    let Some((soft, _)) = read_limit(root, "Max locked memory", libc::RLIMIT_MEMLOCK) else {
        b.push(
            NAME,
            "?".into(),
            rlim_kib(Some(budget)),
            Status::Info,
            "cannot read RLIMIT_MEMLOCK",
        );
        return;
    };
    let release =
        read_sysctl(root, "kernel.osrelease").or_else(|| real.then(kernel_release).flatten());
    let version = release.as_deref().and_then(parse_kernel_version);
    let kernel = match &release {
        Some(r) => format!("kernel {r}"),
        None => "an unknown kernel (no proc/sys/kernel/osrelease)".to_string(),
    };
    let charges = kernel_charges_memlock(version);

    let mut not_measured = String::new();
    if real {
        let cap = has_cap_ipc_lock();
        let applies = soft.is_some() && !cap;
        // The server's table: max connections + 1024, within RLIMIT_NOFILE (the kernel
        // refuses a table above the soft limit).
        let file_table = connections
            .saturating_add(HEADROOM_FDS)
            .min(nofile_soft.flatten().unwrap_or(u64::MAX))
            .clamp(64, u64::from(u32::MAX));
        let file_table = u32::try_from(file_table).unwrap_or(u32::MAX);
        match memlock_fit(workers, file_table) {
            RingFit::Fits => {
                let why = match (cap, charges) {
                    (false, _) => String::new(),
                    (true, true) => format!(
                        "measured with CAP_IPC_LOCK, which io_uring charges nothing; {kernel} charges a server without it (another user, tuning/wsring.service) about 792 KiB per worker: give it at least {}KiB (LimitMEMLOCK=)",
                        budget.div_ceil(1024)
                    ),
                    (true, false) => format!(
                        "measured with CAP_IPC_LOCK; {kernel} charges io_uring rings to the memory cgroup, not RLIMIT_MEMLOCK, so a server without it needs none either"
                    ),
                };
                b.push(
                    NAME,
                    rlim_kib(soft),
                    format!(
                        "{} {} (measured)",
                        rings(workers),
                        if workers == 1 { "fits" } else { "fit" }
                    ),
                    Status::Ok,
                    &why,
                );
                return;
            }
            RingFit::Short {
                fitted,
                stage,
                error,
            } => {
                let errno = error.raw_os_error();
                let memlock_refused = match stage {
                    RingStage::Setup => errno == Some(libc::ENOMEM),
                    RingStage::BufferRing => {
                        matches!(errno, Some(libc::ENOMEM) | Some(libc::EPERM))
                    }
                    RingStage::FileTable => false,
                };
                let failed = format!(
                    "setting up worker ring {} of {workers} as the server does failed ({stage}: {})",
                    fitted + 1,
                    errno_name(&error)
                );
                let needed = format!("{} ({fitted} fit)", rings(workers));
                if applies && memlock_refused {
                    let cause = if charges {
                        format!(
                            "{kernel} charges io_uring rings to RLIMIT_MEMLOCK (about 792 KiB per worker), summed over every process of this user"
                        )
                    } else {
                        format!(
                            "RLIMIT_MEMLOCK limits this process (no CAP_IPC_LOCK), though {kernel} is expected to charge the memory cgroup instead: if raising it does not help, memory is short"
                        )
                    };
                    let why = format!(
                        "{failed}: {cause}; raise the soft limit to at least {}KiB (LimitMEMLOCK= in the unit, memlock in limits.d) or to unlimited",
                        memlock_raise_to(soft.unwrap_or(0), budget).div_ceil(1024)
                    );
                    b.push(NAME, rlim_kib(soft), needed, Status::Low, &why);
                    return;
                }
                if errno == Some(libc::ENOMEM) {
                    let why = format!(
                        "{failed} although RLIMIT_MEMLOCK does not limit this process (unlimited, or CAP_IPC_LOCK, or not charged): the host or its memory cgroup is out of memory"
                    );
                    b.push(NAME, rlim_kib(soft), needed, Status::Info, &why);
                    return;
                }
                not_measured = format!(
                    "not measured ({stage}: {}; the backend line says which backend runs); ",
                    errno_name(&error)
                );
            }
        }
    }

    // By kernel version.
    if !charges {
        let why = format!(
            "{not_measured}{kernel} charges io_uring rings to the memory cgroup, not RLIMIT_MEMLOCK (5.12 to 6.13)"
        );
        b.push(NAME, rlim_kib(soft), "not charged".into(), Status::Ok, &why);
        return;
    }
    let ok = rlim_ge(soft, budget);
    let why = if ok && not_measured.is_empty() {
        String::new()
    } else {
        format!(
            "{not_measured}{kernel} charges io_uring rings to RLIMIT_MEMLOCK (before 5.12, and again from 6.14) unless the process has CAP_IPC_LOCK: {workers} worker(s) x 1 MiB (792 KiB measured on 6.18), summed over every process of the user; `wsring check` on the host measures it"
        )
    };
    b.push(
        NAME,
        rlim_kib(soft),
        rlim_kib(Some(budget)),
        if ok { Status::Ok } else { Status::Low },
        &why,
    );
}

/// `kernel.io_uring_disabled` (Linux 6.6+): 0 everyone, 1 root and `kernel.io_uring_group`,
/// 2 nobody.
fn io_uring_disabled_line(b: &mut Builder, root: &Path) {
    const NAME: &str = "kernel.io_uring_disabled";
    match read_sysctl(root, NAME).as_deref() {
        None => b.push(
            NAME,
            "absent".into(),
            "0".into(),
            Status::Ok,
            "no such sysctl (kernel before 6.6): io_uring is on unless compiled out",
        ),
        Some("0") => b.push(NAME, "0".into(), "0".into(), Status::Ok, ""),
        Some("1") => {
            let group = read_sysctl(root, "kernel.io_uring_group").unwrap_or_else(|| "-1".into());
            let member = group
                .parse::<u32>()
                .is_ok_and(|gid| groups().contains(&gid));
            if euid() == 0 {
                let why = format!(
                    "1 = root and kernel.io_uring_group ({group}) only; this user is root"
                );
                b.push(NAME, "1".into(), "0".into(), Status::Ok, &why);
            } else if member {
                let why = format!(
                    "1 = root and kernel.io_uring_group only; this user is in group {group}"
                );
                b.push(NAME, "1".into(), "0".into(), Status::Ok, &why);
            } else {
                let why = format!(
                    "1 = only root and kernel.io_uring_group ({group}) may create rings; this user may not, wsring falls back to epoll"
                );
                b.push(NAME, "1".into(), "0".into(), Status::Low, &why);
            }
        }
        Some(other) => b.push(
            NAME,
            other.to_string(),
            "0".into(),
            Status::Low,
            "io_uring is disabled for everyone; wsring falls back to epoll (more syscalls per message)",
        ),
    }
}

fn seccomp_mode() -> Option<String> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_string()))
}

fn seccomp_line(b: &mut Builder) {
    match seccomp_mode().as_deref() {
        Some("0") => b.push("seccomp", "0".into(), "0".into(), Status::Ok, ""),
        Some("1") => b.push(
            "seccomp",
            "1".into(),
            "0".into(),
            Status::Low,
            "strict seccomp: only read/write/exit are allowed; wsring cannot run",
        ),
        Some("2") => b.push(
            "seccomp",
            "2".into(),
            "0".into(),
            Status::Info,
            "a seccomp filter is active (container?): it may deny io_uring_setup; see the backend line",
        ),
        _ => b.push(
            "seccomp",
            "?".into(),
            "0".into(),
            Status::Info,
            "no Seccomp: line in /proc/self/status",
        ),
    }
}

/// Parses "6.18.44-fc-v657" into (6, 18).
fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn kernel_release() -> Option<String> {
    // SAFETY: utsname is plain old data (arrays of c_char); all-zero bytes are a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes one `struct utsname` through the pointer, which points to a live,
    // aligned `libc::utsname` owned by this frame.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Minimum kernel of the io_uring backend (DESIGN.md).
const MIN_KERNEL: (u32, u32) = (6, 1);

/// Size of the kernel's `struct io_uring_params`.
const IO_URING_PARAMS_SIZE: usize = 120;

/// Can this process create an io_uring, and why (not)? Really calls `io_uring_setup` with
/// 8 entries and zeroed parameters, closes the ring at once, and maps a failure to its
/// usual cause: ENOSYS (no io_uring in the kernel or the sandbox), EPERM
/// (`kernel.io_uring_disabled` or a seccomp filter), ENOMEM (RLIMIT_MEMLOCK). A kernel
/// older than 6.1 (the io_uring backend's minimum) also answers false.
pub fn backend_probe() -> (bool, String) {
    let release = kernel_release();
    let version = release.as_deref().and_then(parse_kernel_version);
    if let Some(v) = version.filter(|&v| v < MIN_KERNEL) {
        return (
            false,
            format!(
                "kernel {}.{} is older than {}.{}, the io_uring backend's minimum",
                v.0, v.1, MIN_KERNEL.0, MIN_KERNEL.1
            ),
        );
    }
    // `struct io_uring_params` is 120 bytes of u32/u64 fields; an array of u64 gives the
    // size and an alignment that suits every field.
    let mut params = [0u64; IO_URING_PARAMS_SIZE / 8];
    let entries: libc::c_long = 8;
    // SAFETY: io_uring_setup(entries, params) reads and writes exactly
    // sizeof(struct io_uring_params) = 120 bytes at `params`, which is a live, zeroed,
    // 8-aligned 120-byte buffer owned by this frame; it creates no mapping in our memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_io_uring_setup,
            entries,
            params.as_mut_ptr().cast::<libc::c_void>(),
        )
    };
    if ret >= 0 {
        if let Ok(fd) = libc::c_int::try_from(ret) {
            // SAFETY: `fd` is the ring descriptor just returned to us, owned by nobody else,
            // and closed exactly once here.
            unsafe { libc::close(fd) };
        }
        let kernel = release.unwrap_or_else(|| "?".into());
        return (true, format!("io_uring_setup works (kernel {kernel})"));
    }
    let err = std::io::Error::last_os_error();
    let reason = match err.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring_setup: ENOSYS: the kernel has no io_uring (CONFIG_IO_URING off, or a sandbox such as gVisor that does not implement it)".to_string(),
        Some(libc::EPERM) => {
            let mut causes = Vec::new();
            match read_sysctl(Path::new("/"), "kernel.io_uring_disabled").as_deref() {
                Some("2") => causes.push("kernel.io_uring_disabled=2".to_string()),
                Some("1") => causes.push(
                    "kernel.io_uring_disabled=1 and this user is neither root nor in kernel.io_uring_group".to_string(),
                ),
                _ => {}
            }
            if seccomp_mode().as_deref() == Some("2") {
                causes.push("a seccomp filter (container profile) denies io_uring_setup".into());
            }
            if causes.is_empty() {
                causes.push("kernel.io_uring_disabled or a seccomp filter".into());
            }
            format!("io_uring_setup: EPERM: {}", causes.join("; "))
        }
        Some(libc::ENOMEM) => "io_uring_setup: ENOMEM: RLIMIT_MEMLOCK too low for the ring (raise LimitMEMLOCK / ulimit -l) or out of memory".to_string(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => format!("io_uring_setup: {err}: out of file descriptors"),
        _ => format!("io_uring_setup failed: {err}"),
    };
    (false, reason)
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
mod tests {
    use super::*;

    #[test]
    fn the_fix_names_a_command_per_low_knob_for_root_sudo_or_neither() {
        let line = |name: &str, needed: &str, status| CheckLine {
            name: name.into(),
            current: "1".into(),
            needed: needed.into(),
            status,
            why: "because".into(),
        };
        let report = CheckReport {
            lines: vec![
                line("net.core.somaxconn", "62500", Status::Low),
                line("net.ipv4.tcp_mem", "750000 1000000 1500000", Status::Low),
                line("nofile", "1001024", Status::Low),
                line("fs.file-max", "1251280", Status::Ok),
            ],
            connections: 1_000_000,
            workers: 2,
            proc_root: PathBuf::from("/"),
        };
        let root = report.fix_lines(true, false);
        assert_eq!(root[0], "fix:");
        assert!(
            root[1].ends_with("sysctl -w net.core.somaxconn=\"62500\""),
            "{root:?}"
        );
        assert!(root[2].ends_with("sysctl -w net.ipv4.tcp_mem=\"750000 1000000 1500000\""));
        assert!(root[3].contains("ulimit -n 1001024") && root[3].contains("LimitNOFILE=1001024"));
        assert!(
            !root.iter().any(|l| l.contains("sudo")),
            "root needs no sudo: {root:?}"
        );
        assert!(
            !root.iter().any(|l| l.contains("file-max")),
            "OK knobs are not fixed"
        );
        let sudo = report.fix_lines(false, true);
        assert!(sudo[1].contains("sudo sysctl -w"), "{sudo:?}");
        let neither = report.fix_lines(false, false);
        assert_eq!(neither[0], "fix (as root):");
        assert!(!neither.iter().any(|l| l.contains("sudo")));
        assert!(
            neither
                .last()
                .expect("the checkout line")
                .contains("in a checkout of wsring: scripts/tune.sh")
        );
        let ok = CheckReport {
            lines: vec![line("fs.file-max", "1", Status::Ok)],
            ..report
        };
        assert!(ok.fix_lines(true, true).is_empty());
    }
    use std::sync::atomic::{AtomicUsize, Ordering};

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    /// A fake proc root in a unique temp dir, removed on drop.
    struct FakeRoot(PathBuf);

    impl FakeRoot {
        fn new(tag: &str) -> FakeRoot {
            let dir = std::env::temp_dir().join(format!(
                "wsring-check-{}-{}-{}",
                std::process::id(),
                tag,
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create fake root");
            FakeRoot(dir)
        }

        fn write(&self, rel: &str, content: &str) {
            let path = self.0.join(rel);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(path, content).expect("write");
        }

        fn sysctl(&self, name: &str, value: &str) {
            self.write(
                &format!("proc/sys/{}", name.replace('.', "/")),
                &format!("{value}\n"),
            );
        }

        fn limits(&self, nofile: (&str, &str), memlock: (&str, &str)) {
            self.write(
                "proc/self/limits",
                &format!(
                    "Limit                     Soft Limit           Hard Limit           Units     \n\
                     Max cpu time              unlimited            unlimited            seconds   \n\
                     Max open files            {:<20} {:<20} files     \n\
                     Max locked memory         {:<20} {:<20} bytes     \n",
                    nofile.0, nofile.1, memlock.0, memlock.1
                ),
            );
        }
    }

    impl Drop for FakeRoot {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn good_host() -> FakeRoot {
        let r = FakeRoot::new("good");
        r.sysctl("fs.file-max", "9223372036854775807");
        r.sysctl("fs.nr_open", "1073741816");
        r.sysctl("net.core.somaxconn", "65535");
        r.sysctl("net.ipv4.tcp_max_syn_backlog", "65535");
        r.sysctl("net.core.netdev_max_backlog", "16384");
        r.sysctl("net.ipv4.ip_local_port_range", "10240\t65535");
        r.sysctl("net.ipv4.tcp_rmem", "4096\t16384\t4194304");
        r.sysctl("net.ipv4.tcp_wmem", "4096\t16384\t4194304");
        r.sysctl("net.ipv4.tcp_mem", "786432\t1048576\t1572864");
        r.sysctl("net.ipv4.tcp_fin_timeout", "15");
        r.sysctl("net.ipv4.tcp_tw_reuse", "1");
        r.sysctl("kernel.io_uring_disabled", "0");
        r.write(
            "proc/meminfo",
            "MemTotal:       67108864 kB\nMemAvailable:   60000000 kB\n",
        );
        r.limits(("1048576", "1048576"), ("unlimited", "unlimited"));
        r
    }

    fn short_host() -> FakeRoot {
        let r = FakeRoot::new("short");
        r.sysctl("fs.file-max", "100000");
        r.sysctl("fs.nr_open", "1048576");
        r.sysctl("net.core.somaxconn", "4096");
        r.sysctl("net.ipv4.tcp_max_syn_backlog", "512");
        r.sysctl("net.core.netdev_max_backlog", "1000");
        r.sysctl("net.ipv4.ip_local_port_range", "32768\t60999");
        r.sysctl("net.ipv4.tcp_rmem", "4096\t131072\t6291456");
        r.sysctl("net.ipv4.tcp_wmem", "4096\t16384\t4194304");
        r.sysctl("net.ipv4.tcp_mem", "92160\t122880\t184320");
        r.sysctl("net.ipv4.tcp_fin_timeout", "60");
        r.sysctl("net.ipv4.tcp_tw_reuse", "2");
        r.sysctl("kernel.io_uring_disabled", "2");
        r.write(
            "proc/meminfo",
            "MemTotal:       4194304 kB\nMemAvailable:   2097152 kB\n",
        );
        // 64 KiB: the stock limit before systemd 253 / Linux 5.16, less than one ring.
        r.limits(("1024", "4096"), ("65536", "65536"));
        r
    }

    /// Two workers, whatever this machine's CPU count: the memlock budget depends on it.
    fn opts(connections: u64, root: &FakeRoot) -> CheckOptions {
        CheckOptions {
            connections,
            proc_root: root.0.clone(),
            threads: 2,
        }
    }

    /// The knob names and their order, shared with scripts/tune.sh (tests/tune_sh.rs checks
    /// the script against the same list).
    const KNOBS: [&str; 15] = [
        "fs.file-max",
        "fs.nr_open",
        "nofile",
        "memlock",
        "memory",
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "net.core.netdev_max_backlog",
        "net.ipv4.tcp_mem",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_tw_reuse",
        "net.ipv4.ip_local_port_range",
        "kernel.io_uring_disabled",
    ];

    #[test]
    fn needed_matches_the_script_formulas() {
        let n = Needed::compute(1_000_000, 2, 4096);
        assert_eq!(n.nofile, 1_001_024);
        assert_eq!(n.nr_open, 1_001_024);
        assert_eq!(n.file_max, 1_251_280);
        assert_eq!(n.somaxconn, 62_500);
        assert_eq!(n.syn_backlog, 62_500);
        assert_eq!(n.netdev_backlog, 15_625);
        assert_eq!(n.tcp_mem, [750_000, 1_000_000, 1_500_000]);
        assert_eq!(n.memlock, 2 * MIB);
        assert_eq!(n.memory_mib, 5372);

        let small = Needed::compute(1000, 1, 4096);
        assert_eq!(small.somaxconn, 4096);
        assert_eq!(small.syn_backlog, 1024);
        assert_eq!(small.netdev_backlog, 1000);
        assert_eq!(small.tcp_mem, [750, 1000, 1500]);

        let huge = Needed::compute(10_000_000, 1, 4096);
        assert_eq!(huge.somaxconn, 65535);
        assert_eq!(huge.netdev_backlog, 65536);
        // 64 KiB pages: 16 times fewer pages.
        assert_eq!(Needed::compute(1_000_000, 1, 65536).tcp_mem[1], 62_500);
    }

    #[test]
    fn per_connection_budget_is_5_5_kib() {
        assert_eq!(PER_CONNECTION_BYTES, 5632);
        assert_eq!(PER_CONNECTION_BYTES * 2, 11 * 1024);
    }

    #[test]
    fn good_host_passes_for_1000() {
        let root = good_host();
        let report = run_check(&opts(1000, &root));
        assert!(report.passed(), "{report}");
        let names: Vec<&str> = report.lines.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, KNOBS, "fake root: no seccomp/backend lines");
        for l in &report.lines {
            // The port range is always advisory: it matters only for load tools.
            let expected = if l.name == "net.ipv4.ip_local_port_range" {
                Status::Info
            } else {
                Status::Ok
            };
            assert_eq!(l.status, expected, "{l:?}");
        }
        let text = report.to_string();
        assert!(text.contains("result: OK for 1000 connections"), "{text}");
    }

    #[test]
    fn good_host_also_holds_a_million() {
        let root = good_host();
        let report = run_check(&opts(1_000_000, &root));
        assert!(report.passed(), "{report}");
    }

    #[test]
    fn short_host_fails_for_a_million_and_names_the_knobs() {
        let root = short_host();
        let report = run_check(&opts(1_000_000, &root));
        assert!(!report.passed());
        let low = report.low();
        for name in [
            "fs.file-max",
            "nofile",
            "memlock",
            "memory",
            "net.core.somaxconn",
            "net.ipv4.tcp_max_syn_backlog",
            "net.core.netdev_max_backlog",
            "net.ipv4.tcp_mem",
            "kernel.io_uring_disabled",
        ] {
            assert!(low.contains(&name), "{name} should be LOW in {low:?}");
        }
        // nr_open (1048576) covers 1001024; advisory knobs never fail.
        assert!(!low.contains(&"fs.nr_open"));
        for name in [
            "net.ipv4.tcp_rmem",
            "net.ipv4.tcp_fin_timeout",
            "net.ipv4.tcp_tw_reuse",
            "net.ipv4.ip_local_port_range",
        ] {
            let line = report.line(name).expect("line present");
            assert_eq!(line.status, Status::Info, "{line:?}");
        }
        let nofile = report.line("nofile").expect("nofile line");
        assert_eq!(nofile.current, "1024/4096");
        assert_eq!(nofile.needed, "1001024");
        assert_eq!(report.line("memlock").expect("memlock").current, "64KiB");
        assert_eq!(report.line("memory").expect("memory").current, "2048MiB");
        let text = report.to_string();
        assert!(
            text.contains("result: LOW for 1000000 connections"),
            "{text}"
        );
        for line in text
            .lines()
            .filter(|l| l.starts_with("net.core.somaxconn "))
        {
            assert!(line.ends_with("LOW"), "{line}");
        }
    }

    #[test]
    fn soft_nofile_below_hard_is_ok_with_a_note() {
        let root = good_host();
        root.limits(("1024", "2000000"), ("unlimited", "unlimited"));
        let report = run_check(&opts(1_000_000, &root));
        let line = report.line("nofile").expect("nofile");
        assert_eq!(line.status, Status::Ok);
        assert!(line.why.contains("raises soft to hard"), "{line:?}");
    }

    #[test]
    fn unreadable_knobs_are_info_not_failures() {
        let root = FakeRoot::new("empty");
        root.limits(("1048576", "1048576"), ("unlimited", "unlimited"));
        let report = run_check(&opts(1000, &root));
        assert!(report.passed(), "{report}");
        assert_eq!(
            report.line("fs.file-max").expect("line").status,
            Status::Info
        );
        // No io_uring_disabled sysctl: a kernel before 6.6.
        let line = report.line("kernel.io_uring_disabled").expect("line");
        assert_eq!((line.status, line.current.as_str()), (Status::Ok, "absent"));
    }

    #[test]
    fn io_uring_disabled_1_depends_on_the_user() {
        let root = good_host();
        root.sysctl("kernel.io_uring_disabled", "1");
        root.sysctl("kernel.io_uring_group", "-1");
        let report = run_check(&opts(1000, &root));
        let line = report.line("kernel.io_uring_disabled").expect("line");
        let expected = if euid() == 0 { Status::Ok } else { Status::Low };
        assert_eq!(line.status, expected, "{line:?}");
    }

    #[test]
    fn parses_proc_self_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max open files            20000                20000                files     \n\
                    Max locked memory         unlimited            unlimited            bytes     \n";
        assert_eq!(
            parse_limits(text, "Max open files"),
            Some((Some(20000), Some(20000)))
        );
        assert_eq!(parse_limits(text, "Max locked memory"), Some((None, None)));
        assert_eq!(parse_limits(text, "Max processes"), None);
    }

    #[test]
    fn memlock_is_charged_before_5_12_and_from_6_14() {
        for (version, charged) in [
            (Some((4, 19)), true),
            (Some((5, 11)), true),
            (Some((5, 12)), false),
            (Some((6, 1)), false),
            (Some((6, 13)), false),
            (Some((6, 14)), true),
            (Some((6, 18)), true),
            (None, true),
        ] {
            assert_eq!(kernel_charges_memlock(version), charged, "{version:?}");
        }
    }

    /// On a fake root the memlock line follows the kernel in `proc/sys/kernel/osrelease`:
    /// (release or none, soft limit, threads) -> (needed, status).
    #[test]
    fn memlock_on_a_fake_root_follows_the_kernel_version() {
        for (release, soft, threads, needed, status) in [
            (Some("5.10.0-28-amd64"), "65536", 2, "2048KiB", Status::Low),
            (Some("5.10.0-28-amd64"), "8388608", 2, "2048KiB", Status::Ok),
            (
                Some("5.15.0-91-generic"),
                "65536",
                2,
                "not charged",
                Status::Ok,
            ),
            (
                Some("6.8.0-45-generic"),
                "65536",
                64,
                "not charged",
                Status::Ok,
            ),
            (Some("6.14.0"), "65536", 2, "2048KiB", Status::Low),
            (Some("6.18.44-fc-v857"), "8388608", 2, "2048KiB", Status::Ok),
            (
                Some("6.18.44-fc-v857"),
                "8388608",
                16,
                "16384KiB",
                Status::Low,
            ),
            (
                Some("6.18.44-fc-v857"),
                "unlimited",
                64,
                "65536KiB",
                Status::Ok,
            ),
            (None, "65536", 1, "1024KiB", Status::Low),
        ] {
            let root = good_host();
            root.limits(("1048576", "1048576"), (soft, soft));
            if let Some(release) = release {
                root.sysctl("kernel.osrelease", release);
            }
            let report = run_check(&CheckOptions {
                threads,
                ..opts(1000, &root)
            });
            let line = report.line("memlock").expect("memlock line");
            let case = format!("{release:?} {soft} x{threads}: {line:?}");
            assert_eq!(
                (line.needed.as_str(), line.status),
                (needed, status),
                "{case}"
            );
            assert_eq!(report.passed(), status != Status::Low, "{case}");
            if status == Status::Low {
                assert!(
                    line.why
                        .contains("charges io_uring rings to RLIMIT_MEMLOCK"),
                    "{case}"
                );
            }
            if needed == "not charged" {
                assert!(line.why.contains("memory cgroup"), "{case}");
            }
        }
    }

    #[test]
    fn memlock_raise_leaves_room_beyond_what_others_hold() {
        assert_eq!(memlock_raise_to(64 * 1024, 2 * MIB), 2 * MIB);
        // Already above the budget yet short: other processes of the user hold the rest.
        assert_eq!(memlock_raise_to(8 * MIB, 2 * MIB), 10 * MIB);
    }

    #[test]
    fn parses_the_effective_capabilities() {
        let status = "Name:\tcat\nCapPrm:\t000001ffffffffff\nCapEff:\t0000000000004000\n";
        assert_eq!(cap_eff(status), Some(1 << CAP_IPC_LOCK));
        assert_eq!(cap_eff("Name:\tcat\n"), None);
    }

    /// The server's rings, really set up: where io_uring works and RLIMIT_MEMLOCK does not
    /// limit this process (CAP_IPC_LOCK, or unlimited), two workers' rings fit.
    #[test]
    fn the_servers_rings_fit_where_memlock_does_not_limit() {
        let (usable, reason) = backend_probe();
        let unlimited = getrlimit(libc::RLIMIT_MEMLOCK).is_some_and(|(soft, _)| soft.is_none());
        if !usable || !(has_cap_ipc_lock() || unlimited) {
            eprintln!("skipped: io_uring {reason}; memlock limits this process");
            return;
        }
        match memlock_fit(2, 64) {
            RingFit::Fits => {}
            RingFit::Short {
                fitted,
                stage,
                error,
            } => {
                panic!("ring {fitted} failed at {stage}: {error}")
            }
        }
        let line = run_check(&CheckOptions {
            threads: 2,
            ..CheckOptions::new(1000)
        })
        .lines
        .into_iter()
        .find(|l| l.name == "memlock")
        .expect("memlock line");
        assert_eq!(
            (line.needed.as_str(), line.status),
            ("2 rings fit (measured)", Status::Ok),
            "{line:?}"
        );
    }

    #[test]
    fn parses_meminfo_and_kernel_versions() {
        assert_eq!(
            mem_available_mib("MemTotal: 1 kB\nMemAvailable:   24253172 kB\n"),
            Some(23684)
        );
        assert_eq!(mem_available_mib("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_kernel_version("garbage"), None);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(19_936), "19,936");
        assert_eq!(thousands(1_000_000), "1,000,000");
    }

    #[test]
    fn startup_summary_reserves_descriptors() {
        let (soft, _) = getrlimit(libc::RLIMIT_NOFILE).expect("getrlimit");
        let (cap, line) = startup_limits_summary(None);
        match soft {
            Some(s) => {
                assert_eq!(cap, s.saturating_sub(RESERVED_FDS_PER_PROCESS));
                assert!(
                    line.starts_with(&format!("nofile {s} caps connections at ")),
                    "{line}"
                );
                assert!(line.contains(&thousands(cap)), "{line}");
            }
            None => assert_eq!(cap, u64::MAX),
        }
        let (cap, line) = startup_limits_summary(Some(10));
        assert_eq!(cap, 10, "{line}");
        let (cap, _) = startup_limits_summary(Some(u64::MAX - 1));
        assert!(cap <= soft.unwrap_or(u64::MAX));
    }

    #[test]
    fn backend_probe_gives_a_reason() {
        let (usable, reason) = backend_probe();
        assert!(!reason.is_empty());
        if usable {
            assert!(reason.contains("io_uring_setup works"), "{reason}");
        }
    }

    #[test]
    fn real_root_adds_seccomp_and_backend_lines() {
        let report = run_check(&CheckOptions::new(1000));
        let names: Vec<&str> = report.lines.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(&names[..KNOBS.len()], KNOBS);
        assert_eq!(&names[KNOBS.len()..], ["seccomp", "backend"]);
    }
}
