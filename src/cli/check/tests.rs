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
