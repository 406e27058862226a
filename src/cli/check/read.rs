//! Reading the host: sysctls under the proc root, the process's resource limits, its
//! user and groups, and the builder that turns a reading into a [`CheckLine`].

use super::*;

pub(super) fn rlim_str(v: Rlim) -> String {
    v.map_or_else(|| "unlimited".to_string(), |v| v.to_string())
}

pub(super) fn rlim_kib(v: Rlim) -> String {
    v.map_or_else(
        || "unlimited".to_string(),
        |v| format!("{}KiB", v.div_ceil(1024)),
    )
}

pub(super) fn rlim_ge(v: Rlim, need: u64) -> bool {
    v.is_none_or(|v| v >= need)
}

pub(super) fn is_real_root(root: &Path) -> bool {
    root.as_os_str().is_empty() || root == Path::new("/")
}

/// Reads `<root>/proc/sys/<name with dots as slashes>` with whitespace squeezed.
pub(super) fn read_sysctl(root: &Path, name: &str) -> Option<String> {
    let path = root.join("proc/sys").join(name.replace('.', "/"));
    let text = fs::read_to_string(path).ok()?;
    let v = text.split_whitespace().collect::<Vec<_>>().join(" ");
    (!v.is_empty()).then_some(v)
}

pub(super) fn parse_u64s(s: &str) -> Option<Vec<u64>> {
    s.split_whitespace().map(|w| w.parse().ok()).collect()
}

pub(super) fn parse_rlim(s: &str) -> Option<Rlim> {
    if s == "unlimited" {
        Some(None)
    } else {
        s.parse().ok().map(Some)
    }
}

/// Finds `name` ("Max open files") in text in the format of Linux's `/proc/self/limits`
/// and returns (soft, hard).
pub(super) fn parse_limits(text: &str, name: &str) -> Option<(Rlim, Rlim)> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        let mut fields = rest.split_whitespace();
        let soft = parse_rlim(fields.next()?)?;
        let hard = parse_rlim(fields.next()?)?;
        Some((soft, hard))
    })
}

pub(super) fn getrlimit(resource: libc::__rlimit_resource_t) -> Option<(Rlim, Rlim)> {
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
pub(super) fn read_limit(
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

pub(super) fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions; it only reads a configuration value.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).ok().filter(|&v| v > 0).unwrap_or(4096)
}

/// The server's worker count for `--threads threads` (0 = one per CPU, at most
/// [`crate::engine::MAX_WORKERS`], as `Server::start` decides).
pub(super) fn workers(threads: usize) -> u64 {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    n.min(crate::engine::MAX_WORKERS) as u64
}

pub(super) fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// The effective group and the supplementary groups of this process.
pub(super) fn groups() -> Vec<u32> {
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

pub(super) struct Builder {
    pub(super) lines: Vec<CheckLine>,
}

impl Builder {
    pub(super) fn push(
        &mut self,
        name: &str,
        current: String,
        needed: String,
        status: Status,
        why: &str,
    ) {
        self.lines.push(CheckLine {
            name: name.to_string(),
            current,
            needed,
            status,
            why: why.to_string(),
        });
    }

    /// A sysctl that must be at least `need`.
    pub(super) fn min_sysctl(&mut self, root: &Path, name: &str, need: u64, why: &str) {
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

pub(super) fn sysctl_path(root: &Path, name: &str) -> PathBuf {
    root.join("proc/sys").join(name.replace('.', "/"))
}

pub(super) fn join3(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}
