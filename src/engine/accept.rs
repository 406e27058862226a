//! Accepting when resources run out: the backoff both backends share.

use super::*;

/// What a backend does when accept fails for lack of resources (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM): stop accepting for a while (10 ms, doubling to 1 s while it keeps
/// failing) instead of spinning on a listener that stays readable, and log one WARN per
/// 10 s with the number of failures in between.
#[derive(Debug)]
pub(crate) struct AcceptBackoff {
    until: Option<Instant>,
    delay: Duration,
    last_log: Option<Instant>,
    pub(super) suppressed: u64,
}

impl AcceptBackoff {
    const MIN: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn new() -> AcceptBackoff {
        AcceptBackoff {
            until: None,
            delay: Self::MIN,
            last_log: None,
            suppressed: 0,
        }
    }

    /// Whether the error is one a pause helps with; others (a client that reset before
    /// its accept completed) are not the server's problem.
    pub(crate) fn is_resource_error(errno: i32) -> bool {
        matches!(
            errno,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
        )
    }

    /// Records a failed accept at `now`: counted; a resource error starts (or extends)
    /// the pause. Returns whether accepting should pause.
    pub(crate) fn failed(
        &mut self,
        worker: usize,
        errno: i32,
        stats: &WorkerStats,
        now: Instant,
    ) -> bool {
        stats.accept_errors.bump(1);
        let pause = Self::is_resource_error(errno);
        let due = self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Self::LOG_EVERY);
        if due {
            let err = std::io::Error::from_raw_os_error(errno);
            if pause {
                tracing::warn!(
                    worker,
                    failures_since_last_warning = self.suppressed,
                    "accept: {err}; pausing accepts for {:?}",
                    self.delay
                );
            } else {
                tracing::debug!(worker, "accept: {err}");
            }
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        if pause {
            self.until = Some(now + self.delay);
            self.delay = (self.delay * 2).min(Self::MAX);
        }
        pause
    }

    /// A socket was accepted: the next failure starts from the shortest pause again.
    pub(crate) fn succeeded(&mut self) {
        self.delay = Self::MIN;
    }

    /// Whether accepting may resume at `now` (`true` when not paused).
    pub(crate) fn ready(&mut self, now: Instant) -> bool {
        match self.until {
            Some(t) if now < t => false,
            Some(_) => {
                self.until = None;
                true
            }
            None => true,
        }
    }

    /// Whether a pause is running.
    pub(crate) fn paused(&self) -> bool {
        self.until.is_some()
    }
}
