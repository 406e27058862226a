//! `memlock`: whether the server's io_uring rings fit under RLIMIT_MEMLOCK, measured by
//! setting them up exactly as the workers do (see the module doc of [`super`]), and the
//! kernel-version rule where it cannot measure.

use super::*;

pub(super) fn mem_available_mib(meminfo: &str) -> Option<u64> {
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
pub(super) const CAP_IPC_LOCK: u32 = 14;

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
pub(super) struct RingEntries {
    ptr: *mut libc::c_void,
    len: usize,
}

impl RingEntries {
    pub(super) fn map(entries: u16) -> std::io::Result<RingEntries> {
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
pub(super) struct WorkerRing {
    _ring: io_uring::IoUring,
    _entries: RingEntries,
}

/// Sets up one ring like a server worker: the io_uring backend's own builder (its flags
/// and entries), a sparse file table of `file_table` slots, and its provided-buffer ring
/// (incremental, else plain).
pub(super) fn set_up_worker_ring(
    file_table: u32,
) -> Result<WorkerRing, (RingStage, std::io::Error)> {
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
/// ring refused with ENOMEM is retried for up to `RING_RELEASE_WAIT` in all.
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
pub(super) fn cap_eff(status: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let hex = l.strip_prefix("CapEff:")?.trim();
        u64::from_str_radix(hex, 16).ok()
    })
}

/// Whether this process holds CAP_IPC_LOCK: io_uring then charges it no locked memory.
pub(super) fn has_cap_ipc_lock() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| cap_eff(&s))
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

pub(super) fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOMEM) => "ENOMEM".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::ENOSYS) => "ENOSYS".into(),
        Some(libc::EMFILE) => "EMFILE".into(),
        _ => e.to_string(),
    }
}

pub(super) fn rings(n: u64) -> String {
    if n == 1 {
        "1 ring".into()
    } else {
        format!("{n} rings")
    }
}

/// What to raise RLIMIT_MEMLOCK to when the rings do not fit under `soft`: their `need`
/// ([`Needed::memlock`]), or that much above the current value when it already is above it
/// (other processes of the user hold the rest). The same rule as `scripts/tune.sh --apply`.
pub(super) fn memlock_raise_to(soft: u64, need: u64) -> u64 {
    if soft >= need {
        soft.saturating_add(need)
    } else {
        need
    }
}

/// The `memlock` line: measured when the root is `/` ([`memlock_fit`]); by the kernel
/// version (`<root>/proc/sys/kernel/osrelease`) on a fake root or when the measurement
/// cannot run. io_uring checks the soft limit.
pub(super) fn memlock_line(
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
