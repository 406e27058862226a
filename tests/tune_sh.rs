//! Tests of `scripts/tune.sh` on fake filesystem roots (`--root`), so the real host's
//! sysctls and limits are never read for a verdict nor written: `--check` exit codes and
//! output, `--apply` twice then `--revert` restoring the tree byte for byte, "never lower",
//! the knob names shared with `wsring check` (src/cli/check/), memlock by kernel version, and
//! shellcheck on every script. On the real root only `--check` runs, and only its memlock
//! row is looked at: the one `wsring check` measures by setting up the server's rings (with
//! a stand-in binary whose answer is known, and with the real one, whose answer must be
//! the script's).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use wsring::cli::check::{CheckOptions, Status, run_check};

/// The knob lines of `--check` on a fake root, in order (no seccomp line: that one is only
/// read when the root is `/`).
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

/// The knobs a 2 GiB host with stock limits is short of for a million connections.
const SHORT_FOR_A_MILLION: [&str; 9] = [
    "fs.file-max",
    "nofile",
    "memlock",
    "memory",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.core.netdev_max_backlog",
    "net.ipv4.tcp_mem",
    "kernel.io_uring_disabled",
];

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fake filesystem root in a unique directory under the system temp dir, removed on drop.
struct FakeRoot(PathBuf);

impl FakeRoot {
    fn new(tag: &str) -> FakeRoot {
        let dir = std::env::temp_dir().join(format!(
            "wsring-tune-sh-{}-{}-{}",
            std::process::id(),
            tag,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create fake root");
        FakeRoot(dir)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    fn write(&self, rel: &str, content: &str) {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, content).expect("write");
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    fn sysctl_rel(name: &str) -> String {
        format!("proc/sys/{}", name.replace('.', "/"))
    }

    fn set_sysctl(&self, name: &str, value: &str) {
        self.write(&Self::sysctl_rel(name), &format!("{value}\n"));
    }

    fn sysctl(&self, name: &str) -> String {
        self.read(&Self::sysctl_rel(name))
    }

    fn set_limits(&self, nofile: (&str, &str), memlock: (&str, &str)) {
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

    /// Every path under the root (relative) with its bytes; `None` for a directory.
    fn snapshot(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
            for entry in fs::read_dir(dir).expect("read_dir") {
                let path = entry.expect("dir entry").path();
                let rel = path.strip_prefix(base).expect("under base").to_path_buf();
                if path.is_dir() {
                    out.insert(rel, None);
                    walk(base, &path, out);
                } else {
                    out.insert(rel, Some(fs::read(&path).expect("read file")));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.0, &self.0, &mut out);
        out
    }
}

impl Drop for FakeRoot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A host tuned well beyond a million connections.
fn good_host() -> FakeRoot {
    let r = FakeRoot::new("good");
    r.set_sysctl("fs.file-max", "9223372036854775807");
    r.set_sysctl("fs.nr_open", "1073741816");
    r.set_sysctl("net.core.somaxconn", "65535");
    r.set_sysctl("net.ipv4.tcp_max_syn_backlog", "65535");
    r.set_sysctl("net.core.netdev_max_backlog", "16384");
    r.set_sysctl("net.ipv4.ip_local_port_range", "10240\t65535");
    r.set_sysctl("net.ipv4.tcp_rmem", "4096\t16384\t4194304");
    r.set_sysctl("net.ipv4.tcp_wmem", "4096\t16384\t4194304");
    r.set_sysctl("net.ipv4.tcp_mem", "786432\t1048576\t1572864");
    r.set_sysctl("net.ipv4.tcp_fin_timeout", "15");
    r.set_sysctl("net.ipv4.tcp_tw_reuse", "1");
    r.set_sysctl("kernel.io_uring_disabled", "0");
    r.set_sysctl("kernel.io_uring_group", "-1");
    r.write(
        "proc/meminfo",
        "MemTotal:       67108864 kB\nMemFree:        60000000 kB\nMemAvailable:   60000000 kB\n",
    );
    r.set_limits(("1048576", "1048576"), ("unlimited", "unlimited"));
    r
}

/// A small stock host: fine for a thousand connections, short of a million. It has an
/// etc/sysctl.d with a foreign file (must survive apply/revert untouched) and no
/// etc/security (apply creates it, revert must remove it).
fn short_host() -> FakeRoot {
    let r = FakeRoot::new("short");
    r.set_sysctl("fs.file-max", "200000");
    r.set_sysctl("fs.nr_open", "1048576");
    r.set_sysctl("net.core.somaxconn", "4096");
    r.set_sysctl("net.ipv4.tcp_max_syn_backlog", "1024");
    r.set_sysctl("net.core.netdev_max_backlog", "1000");
    r.set_sysctl("net.ipv4.ip_local_port_range", "32768\t60999");
    r.set_sysctl("net.ipv4.tcp_rmem", "4096\t131072\t6291456");
    r.set_sysctl("net.ipv4.tcp_wmem", "4096\t16384\t4194304");
    r.set_sysctl("net.ipv4.tcp_mem", "92160\t122880\t184320");
    r.set_sysctl("net.ipv4.tcp_fin_timeout", "60");
    r.set_sysctl("net.ipv4.tcp_tw_reuse", "2");
    r.set_sysctl("kernel.io_uring_disabled", "2");
    r.set_sysctl("kernel.io_uring_group", "-1");
    r.write(
        "proc/meminfo",
        "MemTotal:        4194304 kB\nMemFree:         1048576 kB\nMemAvailable:    2097152 kB\n",
    );
    // 64 KiB: the stock limit before systemd 253 / Linux 5.16, less than one ring. No
    // proc/sys/kernel/osrelease: an unknown kernel, assumed to charge io_uring to it.
    r.set_limits(("1024", "524288"), ("65536", "65536"));
    r.write("etc/sysctl.d/10-other.conf", "vm.swappiness = 10\n");
    r
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tune.sh")
}

fn tune(args: &[&str]) -> Output {
    Command::new("bash")
        .arg(script())
        .args(args)
        .env_remove("WSRING_TUNE_ROOT")
        .output()
        .expect("run bash scripts/tune.sh")
}

fn tune_root(root: &FakeRoot, connections: u64, mode: &str) -> Output {
    let n = connections.to_string();
    let root = root.0.to_str().expect("utf-8 temp path");
    tune(&["--connections", &n, mode, "--root", root])
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The table rows of a `--check` output: name -> (current, needed, status).
fn table(text: &str) -> Vec<(String, String, String, String)> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in text.lines() {
        if line.starts_with("KNOB ") {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        if line.trim().is_empty() {
            break;
        }
        // Columns are fixed width: 30, 24, 24, then the status.
        let cell = |from: usize, to: usize| line.get(from..to.min(line.len())).unwrap_or("");
        rows.push((
            cell(0, 31).trim().to_string(),
            cell(31, 56).trim().to_string(),
            cell(56, 81).trim().to_string(),
            line.get(81..).unwrap_or("").trim().to_string(),
        ));
    }
    rows
}

fn status_of<'a>(rows: &'a [(String, String, String, String)], name: &str) -> &'a str {
    rows.iter()
        .find(|r| r.0 == name)
        .map(|r| r.3.as_str())
        .unwrap_or_else(|| panic!("no row for {name} in {rows:?}"))
}

#[test]
fn check_passes_on_a_good_host_for_1000() {
    let root = good_host();
    let out = tune_root(&root, 1000, "--check");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let rows = table(&stdout(&out));
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, KNOBS, "{}", describe(&out));
    assert!(rows.iter().all(|r| r.3 != "LOW"), "{}", describe(&out));
    assert!(stdout(&out).contains("result: OK for 1000 connections"));
}

#[test]
fn check_fails_on_a_short_host_for_a_million_and_names_the_short_knobs() {
    let root = short_host();
    let out = tune_root(&root, 1_000_000, "--check");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    let rows = table(&text);
    for name in SHORT_FOR_A_MILLION {
        assert_eq!(status_of(&rows, name), "LOW", "{name}\n{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("result: LOW") && l.contains(name)),
            "summary names {name}\n{text}"
        );
    }
    // Enough already, or advisory only.
    assert_eq!(status_of(&rows, "fs.nr_open"), "OK", "{text}");
    for name in [
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_tw_reuse",
        "net.ipv4.ip_local_port_range",
    ] {
        assert_eq!(status_of(&rows, name), "INFO", "{name}\n{text}");
    }
    let nofile = rows.iter().find(|r| r.0 == "nofile").expect("nofile row");
    assert_eq!(
        (nofile.1.as_str(), nofile.2.as_str()),
        ("1024/524288", "1001024")
    );
}

#[test]
fn the_short_host_is_fine_for_1000() {
    let root = short_host();
    // Only memlock (64 KiB, less than one ring) and io_uring_disabled=2 stand in the way.
    root.set_limits(("1024", "524288"), ("unlimited", "unlimited"));
    root.set_sysctl("kernel.io_uring_disabled", "0");
    let out = tune_root(&root, 1000, "--check");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn check_is_the_default_mode_and_the_root_comes_from_the_environment() {
    let root = short_host();
    let out = Command::new("bash")
        .arg(script())
        .args(["--connections", "1000000"])
        .env("WSRING_TUNE_ROOT", &root.0)
        .output()
        .expect("run tune.sh");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stdout(&out).contains(&format!("root {}", root.0.display())));
}

/// A host like `good_host` with RLIMIT_MEMLOCK `soft` (bytes or "unlimited") and, when
/// given, the kernel release in proc/sys/kernel/osrelease.
fn host_with_kernel(release: Option<&str>, soft: &str) -> FakeRoot {
    let r = good_host();
    r.set_limits(("1048576", "1048576"), (soft, soft));
    if let Some(release) = release {
        r.set_sysctl("kernel.osrelease", release);
    }
    r
}

#[test]
fn script_and_wsring_check_agree() {
    for (root, n) in [
        (good_host(), 1000),
        (good_host(), 1_000_000),
        (short_host(), 1000),
        (short_host(), 1_000_000),
        (host_with_kernel(Some("5.10.0-28-amd64"), "65536"), 1000),
        (host_with_kernel(Some("5.15.0-91-generic"), "65536"), 1000),
        (host_with_kernel(Some("6.18.44-fc-v857"), "8388608"), 1000),
        (host_with_kernel(Some("6.18.44-fc-v857"), "1048576"), 1000),
    ] {
        // The same worker count on both sides: nproc and available_parallelism (which also
        // honours cgroup CPU quotas) may differ.
        let out = tune_workers(&root, n, "--check", 2);
        let rows = table(&stdout(&out));
        let report = run_check(&CheckOptions {
            connections: n,
            proc_root: root.0.clone(),
            threads: 2,
        });
        assert_eq!(
            rows.len(),
            report.lines.len(),
            "{}\n{report}",
            describe(&out)
        );
        for (row, line) in rows.iter().zip(&report.lines) {
            let status = match line.status {
                Status::Ok => "OK",
                Status::Low => "LOW",
                Status::Info => "INFO",
            };
            assert_eq!(row.0, line.name);
            assert_eq!(row.1, line.current, "{}", line.name);
            assert_eq!(row.2, line.needed, "{}", line.name);
            assert_eq!(row.3, status, "{}", line.name);
        }
        assert_eq!(out.status.code() == Some(0), report.passed());
    }
}

fn tune_workers(root: &FakeRoot, connections: u64, mode: &str, workers: u64) -> Output {
    let n = connections.to_string();
    let w = workers.to_string();
    let root = root.0.to_str().expect("utf-8 temp path");
    tune(&["--connections", &n, mode, "--root", root, "--workers", &w])
}

/// The note of knob `name` in a `--check` output.
fn note_of(text: &str, name: &str) -> Option<String> {
    let prefix = format!("  {name} (");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split_once("): "))
        .map(|(_, note)| note.to_string())
}

/// io_uring charges its rings to RLIMIT_MEMLOCK before 5.12 and from 6.14 (and an unknown
/// kernel is assumed to), to the memory cgroup in between: memlock is LOW only where it is
/// charged and short of 1 MiB per worker.
#[test]
fn memlock_follows_the_kernel_version_on_a_fake_root() {
    for (release, soft, workers, needed, status) in [
        (Some("4.19.0-26-amd64"), "65536", 2, "2048KiB", "LOW"),
        (Some("5.10.0-28-amd64"), "65536", 2, "2048KiB", "LOW"),
        (Some("5.10.0-28-amd64"), "8388608", 2, "2048KiB", "OK"),
        (Some("5.12.0"), "65536", 2, "not charged", "OK"),
        (Some("5.15.0-91-generic"), "65536", 2, "not charged", "OK"),
        (Some("6.8.0-45-generic"), "65536", 64, "not charged", "OK"),
        (Some("6.13.12"), "65536", 2, "not charged", "OK"),
        (Some("6.14.0-15-generic"), "65536", 2, "2048KiB", "LOW"),
        (Some("6.18.44-fc-v857"), "8388608", 2, "2048KiB", "OK"),
        (Some("6.18.44-fc-v857"), "8388608", 16, "16384KiB", "LOW"),
        (Some("6.18.44-fc-v857"), "unlimited", 64, "65536KiB", "OK"),
        (None, "65536", 1, "1024KiB", "LOW"),
    ] {
        let root = host_with_kernel(release, soft);
        let out = tune_workers(&root, 1000, "--check", workers);
        let text = stdout(&out);
        let rows = table(&text);
        let row = rows.iter().find(|r| r.0 == "memlock").expect("memlock row");
        let case = format!("{release:?} memlock {soft} x{workers}\n{}", describe(&out));
        assert_eq!((row.2.as_str(), row.3.as_str()), (needed, status), "{case}");
        assert_eq!(
            out.status.code(),
            Some(if status == "LOW" { 1 } else { 0 }),
            "{case}"
        );
        let note = note_of(&text, "memlock").unwrap_or_default();
        if status == "LOW" {
            assert!(
                note.contains("charges io_uring rings to RLIMIT_MEMLOCK"),
                "{case}"
            );
            assert!(
                note.contains(&format!("{workers} worker(s) x 1 MiB")),
                "{case}"
            );
        }
        if needed == "not charged" {
            assert!(note.contains("memory cgroup, not RLIMIT_MEMLOCK"), "{case}");
        }
        // A fake root is never measured.
        assert!(
            !note.contains("measured)") && !note.contains("not measured"),
            "{case}"
        );
    }
}

/// `--apply` writes a memlock limit only where the kernel charges io_uring to it: W x 1 MiB
/// on 5.10, nothing on 5.15.
#[test]
fn apply_raises_memlock_only_where_the_kernel_charges_it() {
    let old = host_with_kernel(Some("5.10.0-28-amd64"), "65536");
    let original = old.snapshot();
    let out = tune_workers(&old, 1000, "--apply", 2);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let limits = old.read("etc/security/limits.d/61-wsring-tune.conf");
    for line in [
        "*     soft  memlock  2048",
        "*     hard  memlock  2048",
        "root  soft  memlock  2048",
    ] {
        assert!(limits.contains(line), "{line:?} in\n{limits}");
    }
    assert!(!limits.contains("nofile"), "{limits}");
    let revert = tune_workers(&old, 1000, "--revert", 2);
    assert_eq!(revert.status.code(), Some(0), "{}", describe(&revert));
    assert_eq!(old.snapshot(), original);

    let memcg = host_with_kernel(Some("5.15.0-91-generic"), "65536");
    let original = memcg.snapshot();
    let out = tune_workers(&memcg, 1000, "--apply", 2);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stdout(&out).contains("nothing to raise"),
        "{}",
        describe(&out)
    );
    assert_eq!(memcg.snapshot(), original);
}

/// `tune.sh --check` on the real root, read only, with `WSRING_BIN` set to `bin` ("" for
/// none); returns the output and the memlock row.
fn real_root_memlock(bin: &str, workers: u64) -> (Output, (String, String, String, String)) {
    let w = workers.to_string();
    let out = Command::new("bash")
        .arg(script())
        .args([
            "--connections",
            "1000",
            "--check",
            "--root",
            "/",
            "--workers",
            &w,
        ])
        .env_remove("WSRING_TUNE_ROOT")
        .env("WSRING_BIN", bin)
        .output()
        .expect("run bash scripts/tune.sh");
    let row = table(&stdout(&out))
        .into_iter()
        .find(|r| r.0 == "memlock")
        .unwrap_or_else(|| panic!("no memlock row\n{}", describe(&out)));
    (out, row)
}

/// On the real root the memlock row is what `wsring check --threads W` says: a stand-in
/// binary that reports 10 of 64 rings fits makes the row LOW with its values and note, and
/// `--check` fail.
#[test]
fn on_the_real_root_memlock_comes_from_wsring_check() {
    let dir = FakeRoot::new("bin");
    let args = dir.path("args");
    dir.write(
        "wsring",
        &format!(
            "#!/usr/bin/env bash\n\
             printf '%s\\n' \"$*\" >'{}'\n\
             printf '%-30s %-24s %-24s %s\\n' KNOB CURRENT NEEDED STATUS\n\
             printf '%-30s %-24s %-24s %s\\n' memlock 8192KiB '64 rings (10 fit)' LOW\n\
             printf '\\nnotes:\\n  memlock (LOW): ring 11 of 64 failed (io_uring_setup: ENOMEM)\\n'\n\
             exit 1\n",
            args.display()
        ),
    );
    let bin = dir.path("wsring");
    let mut perms = fs::metadata(&bin).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    fs::set_permissions(&bin, perms).expect("chmod");

    let (out, row) = real_root_memlock(bin.to_str().expect("utf-8"), 64);
    assert_eq!(
        (row.1.as_str(), row.2.as_str(), row.3.as_str()),
        ("8192KiB", "64 rings (10 fit)", "LOW"),
        "{}",
        describe(&out)
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let note = note_of(&stdout(&out), "memlock").expect("memlock note");
    assert!(
        note.starts_with("ring 11 of 64 failed (io_uring_setup: ENOMEM)"),
        "{note}"
    );
    assert!(note.contains("check --threads 64"), "{note}");
    assert_eq!(
        fs::read_to_string(&args).expect("the binary ran"),
        "check --connections 1000 --threads 64\n"
    );
}

/// With the real binary, the script's memlock row is the binary's own, measured one.
#[test]
fn on_the_real_root_tune_sh_and_wsring_check_agree_on_memlock() {
    let bin = env!("CARGO_BIN_EXE_wsring");
    let (out, row) = real_root_memlock(bin, 2);
    let own = Command::new(bin)
        .args(["check", "--connections", "1000", "--threads", "2"])
        .output()
        .expect("run wsring check");
    let own_row = table(&stdout(&own))
        .into_iter()
        .find(|r| r.0 == "memlock")
        .unwrap_or_else(|| panic!("no memlock row\n{}", describe(&own)));
    assert_eq!(row, own_row, "{}\n{}", describe(&out), describe(&own));
    let note = note_of(&stdout(&out), "memlock").unwrap_or_default();
    assert!(
        note.contains(&format!("from {bin} check --threads 2")),
        "{note}"
    );
}

/// Without a binary the real root is decided by kernel version, and the note says that it
/// was not measured.
#[test]
fn without_a_binary_the_real_root_memlock_is_not_measured() {
    let (out, row) = real_root_memlock("", 2);
    assert!(
        row.2 == "not charged" || row.2 == "2048KiB",
        "{row:?}\n{}",
        describe(&out)
    );
    let note = note_of(&stdout(&out), "memlock").unwrap_or_default();
    assert!(note.starts_with("not measured (no wsring binary"), "{note}");
}

/// The running kernel's (major, minor), from /proc/sys/kernel/osrelease.
fn running_kernel() -> Option<(u32, u32)> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// `wsring check` measures memlock under the limit it runs with: at 64 KiB and without
/// CAP_IPC_LOCK not one ring fits where the kernel charges io_uring to RLIMIT_MEMLOCK
/// (LOW, exit 1), and both do where it does not.
#[test]
fn wsring_check_measures_memlock_under_the_limit_it_runs_with() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsring"));
    cmd.args(["check", "--connections", "1000", "--threads", "2"]);
    // SAFETY: the closure runs in the forked child before exec and only makes system calls
    // (getrlimit, setrlimit, prctl), which are async-signal-safe; it touches no lock or
    // allocation of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = 64 * 1024;
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Root keeps CAP_IPC_LOCK across exec unless it leaves the bounding set (this
            // fails without CAP_SETPCAP, where the capability is not held anyway).
            libc::prctl(libc::PR_CAPBSET_DROP, 14, 0, 0, 0);
            Ok(())
        });
    }
    let out = cmd.output().expect("run wsring check");
    let text = stdout(&out);
    let rows = table(&text);
    let memlock = rows.iter().find(|r| r.0 == "memlock").expect("memlock row");
    // Whether the kernel has io_uring at all: the backend line is OK, or it says that only
    // the server's own rings are refused (here: by the 64 KiB limit, so the server would
    // run epoll).
    let io_uring = status_of(&rows, "backend") == "OK"
        || note_of(&text, "backend").is_some_and(|n| n.contains("the kernel has io_uring"));
    let charged = wsring::cli::check::kernel_charges_memlock(running_kernel());
    assert_eq!(memlock.1, "64KiB", "{}", describe(&out));
    let expected = match (io_uring, charged) {
        (true, true) => ("2 rings (0 fit)", "LOW"),
        (true, false) => ("2 rings fit (measured)", "OK"),
        (false, true) => ("2048KiB", "LOW"),
        (false, false) => ("not charged", "OK"),
    };
    assert_eq!(
        (memlock.2.as_str(), memlock.3.as_str()),
        expected,
        "{}",
        describe(&out)
    );
    if memlock.3 == "LOW" {
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    }
    if io_uring && charged {
        let note = note_of(&text, "memlock").unwrap_or_default();
        assert!(note.contains("(io_uring_setup: ENOMEM)"), "{note}");
    }
}

/// The shipped fragments (tuning/sysctl.d, tuning/limits.d) are what `--check` asks for a
/// million connections: a host with exactly those values passes, advisory knobs included.
#[test]
fn shipped_fragments_satisfy_the_check_for_a_million() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = good_host();
    let sysctl = fs::read_to_string(manifest.join("tuning/sysctl.d/60-wsring.conf"))
        .expect("tuning/sysctl.d/60-wsring.conf");
    let mut keys = Vec::new();
    for line in sysctl.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=').expect("key = value");
        root.set_sysctl(key.trim(), value.trim());
        keys.push(key.trim().to_string());
    }
    for key in &keys {
        assert!(
            KNOBS.contains(&key.as_str()),
            "{key} is not a knob of tune.sh"
        );
    }
    let limits = fs::read_to_string(manifest.join("tuning/limits.d/60-wsring.conf"))
        .expect("tuning/limits.d/60-wsring.conf");
    let value = |item: &str| -> String {
        limits
            .lines()
            .map(str::split_whitespace)
            .filter_map(|mut w| Some((w.next()?, w.next()?, w.next()?, w.next()?)))
            .find(|&(d, t, i, _)| d == "*" && t == "hard" && i == item)
            .map(|(_, _, _, v)| v.to_string())
            .unwrap_or_else(|| panic!("no '* hard {item}' line"))
    };
    let memlock = match value("memlock").as_str() {
        "unlimited" | "infinity" => "unlimited".to_string(),
        kib => (kib.parse::<u64>().expect("KiB") * 1024).to_string(),
    };
    let nofile = value("nofile");
    root.set_limits((&nofile, &nofile), (&memlock, &memlock));
    // 1,000,000 idle connections at 5.5 KiB need ~5.3 GiB available.
    root.write("proc/meminfo", "MemAvailable:   8388608 kB\n");

    let out = tune_root(&root, 1_000_000, "--check");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let rows = table(&stdout(&out));
    for row in &rows {
        let expected = if row.0 == "net.ipv4.ip_local_port_range" {
            "INFO"
        } else {
            "OK"
        };
        assert_eq!(row.3, expected, "{row:?}\n{}", describe(&out));
    }
}

#[test]
fn apply_twice_then_revert_restores_every_file_byte_for_byte() {
    let root = short_host();
    let original = root.snapshot();

    let first = tune_root(&root, 1_000_000, "--apply");
    assert_eq!(first.status.code(), Some(0), "{}", describe(&first));
    let after_first = root.snapshot();
    assert_ne!(after_first, original);

    // Sysctls raised now, in <root>/proc/sys ...
    assert_eq!(root.sysctl("fs.file-max"), "1251280\n");
    assert_eq!(root.sysctl("net.core.somaxconn"), "62500\n");
    assert_eq!(root.sysctl("net.ipv4.tcp_max_syn_backlog"), "62500\n");
    assert_eq!(root.sysctl("net.core.netdev_max_backlog"), "15625\n");
    assert_eq!(root.sysctl("kernel.io_uring_disabled"), "0\n");
    let page: u64 = String::from_utf8(
        Command::new("getconf")
            .arg("PAGESIZE")
            .output()
            .expect("getconf")
            .stdout,
    )
    .expect("utf-8")
    .trim()
    .parse()
    .expect("page size");
    let pressure = (1_000_000u64 * 4096).div_ceil(page);
    assert_eq!(
        root.sysctl("net.ipv4.tcp_mem"),
        format!(
            "{} {} {}\n",
            (pressure * 3).div_ceil(4),
            pressure,
            (pressure * 3).div_ceil(2)
        )
    );
    // ... unchanged where already enough (nr_open) or advisory (rmem) ...
    assert_eq!(root.sysctl("fs.nr_open"), "1048576\n");
    assert_eq!(root.sysctl("net.ipv4.tcp_rmem"), "4096\t131072\t6291456\n");
    // ... and persistently, beside the foreign fragment, which is left alone.
    let fragment = root.read("etc/sysctl.d/61-wsring-tune.conf");
    assert!(fragment.contains("fs.file-max = 1251280\n"), "{fragment}");
    assert!(
        fragment.contains("net.core.somaxconn = 62500\n"),
        "{fragment}"
    );
    assert!(
        fragment.contains("kernel.io_uring_disabled = 0\n"),
        "{fragment}"
    );
    assert!(!fragment.contains("fs.nr_open"), "{fragment}");
    assert_eq!(
        root.read("etc/sysctl.d/10-other.conf"),
        "vm.swappiness = 10\n"
    );
    let limits = root.read("etc/security/limits.d/61-wsring-tune.conf");
    for line in [
        "*     soft  nofile   1001024",
        "*     hard  nofile   1001024",
        "root  hard  nofile   1001024",
        "*     soft  memlock  ",
    ] {
        assert!(limits.contains(line), "{line:?} in\n{limits}");
    }
    let text = stdout(&first);
    assert!(text.contains("next login"), "{text}");
    assert!(
        root.path("var/backups/wsring-tune").is_dir(),
        "backup dir\n{text}"
    );

    // The sysctls now pass; the limits only change at the next login (the fake
    // proc/self/limits stays as it was), and memory cannot be tuned.
    let check = tune_root(&root, 1_000_000, "--check");
    let rows = table(&stdout(&check));
    for name in [
        "fs.file-max",
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "net.core.netdev_max_backlog",
        "net.ipv4.tcp_mem",
        "kernel.io_uring_disabled",
    ] {
        assert_eq!(status_of(&rows, name), "OK", "{name}\n{}", describe(&check));
    }
    assert_eq!(status_of(&rows, "nofile"), "LOW");
    assert_eq!(check.status.code(), Some(1));

    // Idempotent: a second apply changes nothing, the first backup included.
    let second = tune_root(&root, 1_000_000, "--apply");
    assert_eq!(second.status.code(), Some(0), "{}", describe(&second));
    assert_eq!(root.snapshot(), after_first, "{}", describe(&second));
    assert_eq!(
        fs::read(root.path("var/backups/wsring-tune/files/proc/sys/fs/file-max"))
            .expect("backup of file-max"),
        original[Path::new("proc/sys/fs/file-max")]
            .clone()
            .expect("a file")
    );

    let revert = tune_root(&root, 1_000_000, "--revert");
    assert_eq!(revert.status.code(), Some(0), "{}", describe(&revert));
    let restored = root.snapshot();
    let diff: Vec<_> = original
        .keys()
        .chain(restored.keys())
        .filter(|k| original.get(*k) != restored.get(*k))
        .collect();
    assert!(diff.is_empty(), "differs after revert: {diff:?}");
    assert_eq!(restored, original);
    assert!(!root.path("etc/sysctl.d/61-wsring-tune.conf").exists());
    assert!(!root.path("etc/security").exists());
    assert!(!root.path("var").exists());
    assert!(root.path("etc/sysctl.d/10-other.conf").exists());

    // Nothing left to revert.
    let again = tune_root(&root, 1_000_000, "--revert");
    assert_eq!(again.status.code(), Some(0), "{}", describe(&again));
    assert!(stdout(&again).contains("nothing to revert"));
    assert_eq!(root.snapshot(), original);
}

#[test]
fn apply_never_lowers_a_value_that_is_already_higher() {
    let root = short_host();
    root.set_sysctl("net.core.somaxconn", "200000");
    root.set_sysctl("net.ipv4.tcp_mem", "5\t10\t99999999");
    let original = root.snapshot();
    let out = tune_root(&root, 1_000_000, "--apply");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(root.sysctl("net.core.somaxconn"), "200000\n");
    // tcp_mem is raised field by field: max stays, min and pressure rise.
    let mem: Vec<u64> = root
        .sysctl("net.ipv4.tcp_mem")
        .split_whitespace()
        .map(|v| v.parse().expect("number"))
        .collect();
    assert_eq!(mem.len(), 3);
    assert!(mem[0] > 5 && mem[1] > 10, "{mem:?}");
    assert_eq!(mem[2], 99_999_999);
    let fragment = root.read("etc/sysctl.d/61-wsring-tune.conf");
    assert!(!fragment.contains("somaxconn"), "{fragment}");

    // A second apply for fewer connections lowers nothing either.
    let smaller = tune_root(&root, 1000, "--apply");
    assert_eq!(smaller.status.code(), Some(0), "{}", describe(&smaller));
    assert_eq!(root.sysctl("fs.file-max"), "1251280\n");

    let revert = tune_root(&root, 1000, "--revert");
    assert_eq!(revert.status.code(), Some(0), "{}", describe(&revert));
    assert_eq!(root.snapshot(), original);
}

#[test]
fn apply_on_a_host_that_needs_nothing_writes_nothing() {
    let root = good_host();
    let original = root.snapshot();
    let out = tune_root(&root, 1000, "--apply");
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stdout(&out).contains("nothing to raise"),
        "{}",
        describe(&out)
    );
    assert_eq!(root.snapshot(), original);
}

#[test]
fn bad_arguments_exit_2() {
    let root = good_host();
    let r = root.0.to_str().expect("utf-8");
    for args in [
        vec!["--check", "--root", r],
        vec!["--connections", "lots", "--root", r],
        vec!["--connections", "0", "--root", r],
        vec!["--connections", "10", "--frobnicate"],
        vec![
            "--connections",
            "10",
            "--root",
            "/nonexistent/wsring-tune-root",
        ],
    ] {
        let out = tune(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}\n{}", describe(&out));
    }
    let help = tune(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(stdout(&help).contains("--connections"));
}

/// Every shell script of the project passes shellcheck. CI installs it
/// (`apt-get install -y shellcheck`); set WSRING_SKIP_SHELLCHECK=1 to skip locally.
#[test]
fn shellcheck_is_clean() {
    if std::env::var("WSRING_SKIP_SHELLCHECK").as_deref() == Ok("1") {
        eprintln!("WSRING_SKIP_SHELLCHECK=1: shellcheck skipped");
        return;
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut scripts = Vec::new();
    for dir in ["scripts", "tuning"] {
        let Ok(entries) = fs::read_dir(manifest.join(dir)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "sh") {
                scripts.push(path);
            }
        }
    }
    scripts.sort();
    assert!(
        scripts.iter().any(|p| p.ends_with("scripts/tune.sh")),
        "{scripts:?}"
    );
    let out = match Command::new("shellcheck").args(&scripts).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "shellcheck is not installed: install it (apt-get install -y shellcheck; CI does) \
             or set WSRING_SKIP_SHELLCHECK=1 to skip this test"
        ),
        Err(e) => panic!("cannot run shellcheck: {e}"),
    };
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "shellcheck reports problems in {scripts:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
