//! The kernel's switches: `kernel.io_uring_disabled`, seccomp, the kernel version, and
//! the io_uring probe that `wsring serve`'s backend choice and this check share.

use super::*;

/// `kernel.io_uring_disabled` (Linux 6.6+): 0 everyone, 1 root and `kernel.io_uring_group`,
/// 2 nobody.
pub(super) fn io_uring_disabled_line(b: &mut Builder, root: &Path) {
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

pub(super) fn seccomp_mode() -> Option<String> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_string()))
}

pub(super) fn seccomp_line(b: &mut Builder) {
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
pub(super) fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

pub(super) fn kernel_release() -> Option<String> {
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
pub(super) const MIN_KERNEL: (u32, u32) = (6, 1);

/// Size of the kernel's `struct io_uring_params`.
pub(super) const IO_URING_PARAMS_SIZE: usize = 120;

/// Would `wsring serve --backend auto` run io_uring here, and why (not)? The answer is the
/// io_uring backend's own probe (`engine::uring::probe`, shared with `serve`); a refusal
/// is explained further by a bare `io_uring_setup` of 8 entries whose errno is mapped to
/// its usual cause: ENOSYS (no io_uring in the kernel or the sandbox), EPERM
/// (`kernel.io_uring_disabled` or a seccomp filter), ENOMEM (RLIMIT_MEMLOCK).
pub fn backend_probe() -> (bool, String) {
    // The decision is the server's own: the io_uring backend's probe (kernel version,
    // a ring of the workers' size, every operation, sparse file table, buffer rings), so
    // `check` and `serve --backend auto` cannot disagree. What follows only explains a
    // refusal in more detail (which sysctl, which seccomp mode).
    let why = match crate::engine::uring::probe(&crate::engine::EngineConfig::default()) {
        Ok(()) => {
            let kernel = kernel_release().unwrap_or_else(|| "?".into());
            return (
                true,
                format!("io_uring_setup works and the backend's probe passes (kernel {kernel})"),
            );
        }
        Err(why) => why,
    };
    match setup_diagnosis() {
        (true, _) => (
            false,
            format!(
                "{why} (a bare io_uring_setup works, so the kernel has io_uring: the \
                 server's own rings are what it refuses)"
            ),
        ),
        (false, detail) => (false, format!("{why}; {detail}")),
    }
}

/// A bare `io_uring_setup` and what its errno means on this host.
fn setup_diagnosis() -> (bool, String) {
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
