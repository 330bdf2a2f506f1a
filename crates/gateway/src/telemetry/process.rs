//! The process's own resources, for `/metrics` and the regression
//! detector: resident memory, CPU time, open file descriptors and their
//! limit. Linux reads `/proc/self`; elsewhere what is not known is `None`.

/// One reading of the process's resources.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    pub rss_bytes: Option<u64>,
    /// User plus system CPU time since start, microseconds.
    pub cpu_us: Option<u64>,
    pub open_fds: Option<u64>,
    /// The soft limit on open files (`LimitNOFILE`, `ulimit -n`).
    pub max_fds: Option<u64>,
}

impl ProcessStats {
    pub fn read() -> ProcessStats {
        ProcessStats {
            rss_bytes: rss_bytes(),
            cpu_us: cpu_us(),
            open_fds: std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64),
            max_fds: max_fds(),
        }
    }
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (page > 0).then(|| pages * page as u64)
}

fn cpu_us() -> Option<u64> {
    // SAFETY: getrusage writes into the struct it is given, nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Some(us(usage.ru_utime) + us(usage.ru_stime))
}

fn max_fds() -> Option<u64> {
    // SAFETY: getrlimit writes into the struct it is given, nothing else.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    Some(limit.rlim_cur as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reads_its_own_resources() {
        let before = ProcessStats::read();
        // Spend a little CPU.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let after = ProcessStats::read();
        assert!(after.rss_bytes.unwrap() > 1 << 20, "{after:?}");
        assert!(after.cpu_us.unwrap() >= before.cpu_us.unwrap());
        assert!(after.open_fds.unwrap() >= 3);
        assert!(after.max_fds.unwrap() >= after.open_fds.unwrap());
    }
}
