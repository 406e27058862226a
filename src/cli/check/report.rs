//! The verdicts: one [`CheckLine`] per knob, gathered in a [`CheckReport`] that prints as
//! a table and names the commands that would fix what is low.

use super::*;

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
pub(super) fn sudo_available() -> bool {
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
