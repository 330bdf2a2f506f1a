//! Resource use read from the kernel: CPU seconds, memory and context
//! switches of the gateway and PostgreSQL processes (/proc), the gateway's
//! system calls (`perf stat`), the bench's own CPU (getrusage), how busy the
//! machine's cores were (/proc/stat), and the open-file limit.

use std::path::Path;
use std::time::Duration;

/// Kernel clock ticks per second, the unit of /proc CPU times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Fields of /proc/PID/stat after the command name (which may hold spaces
/// and parentheses, so the split is at the last `)`): index 0 is field 3.
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Vec<u64>> {
    let rest = &text[text.rfind(')')? + 1..];
    // Field 3 is the state letter: keep the slots, parse the numbers.
    Some(rest.split_whitespace().map(|f| f.parse::<u64>().unwrap_or(0)).collect())
}

/// utime + stime of one process.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let f = stat_fields(pid)?;
    // utime and stime are fields 14 and 15.
    let ticks = f.get(11)? + f.get(12)?;
    Some(Duration::from_secs_f64(ticks as f64 / ticks_per_second()))
}

/// CPU of a process and all of its children, living and exited: PostgreSQL
/// is a postmaster with one process per connection.
pub fn process_tree_cpu(root: u32) -> Option<Duration> {
    let f = stat_fields(root)?;
    // utime, stime, and cutime, cstime (its waited-for children).
    let mut ticks = f.get(11)? + f.get(12)? + f.get(13)? + f.get(14)?;
    for child in children_of(root) {
        if let Some(c) = stat_fields(child) {
            ticks += c.get(11).copied().unwrap_or(0) + c.get(12).copied().unwrap_or(0);
        }
    }
    Some(Duration::from_secs_f64(ticks as f64 / ticks_per_second()))
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            // ppid is field 4.
            stat_fields(pid).and_then(|f| f.get(1).copied()) == Some(u64::from(parent))
        })
        .collect()
}

/// Resident memory now and at its peak, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub rss: u64,
    pub peak_rss: u64,
}

pub fn process_memory(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status(&text)
}

fn parse_status(text: &str) -> Option<Memory> {
    let kib = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse::<u64>().ok()
    };
    Some(Memory {
        rss: kib("VmRSS:")? * 1024,
        peak_rss: kib("VmHWM:")? * 1024,
    })
}

/// The bench's own CPU (user + system, every thread).
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we hand it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Context switches of every thread of a process, summed: voluntary ones
/// (the thread waited and was woken: its wake-ups) and involuntary ones
/// (preempted). A thread that exited between two readings takes its counts
/// with it; the gateway's threads live as long as it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Switches {
    pub voluntary: u64,
    pub involuntary: u64,
}

pub fn process_switches(pid: u32) -> Option<Switches> {
    let mut total = Switches::default();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("status")) {
            let s = parse_switches(&text);
            total.voluntary += s.voluntary;
            total.involuntary += s.involuntary;
        }
    }
    Some(total)
}

fn parse_switches(text: &str) -> Switches {
    let count = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Switches {
        voluntary: count("voluntary_ctxt_switches:"),
        involuntary: count("nonvoluntary_ctxt_switches:"),
    }
}

/// Counts a process's system calls between [`SyscallCount::start`] and
/// [`SyscallCount::finish`], with `perf stat` on the `raw_syscalls:sys_enter`
/// tracepoint (Debian's linux-perf). None when perf is missing or may not
/// trace: the report then says so rather than guessing.
pub struct SyscallCount {
    perf: std::process::Child,
    output: std::path::PathBuf,
}

impl SyscallCount {
    pub fn start(pid: u32) -> Option<SyscallCount> {
        let output = std::env::temp_dir().join(format!("ws-gateway-bench-syscalls-{}-{pid}", std::process::id()));
        let perf = std::process::Command::new("perf")
            .args(["stat", "--no-big-num", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&output)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        Some(SyscallCount { perf, output })
    }

    /// Stops counting: the system calls made since the start.
    pub fn finish(mut self) -> Option<u64> {
        // SAFETY: signalling a child we started and have not reaped.
        unsafe { libc::kill(self.perf.id() as i32, libc::SIGINT) };
        let status = self.perf.wait().ok()?;
        let text = std::fs::read_to_string(&self.output).ok();
        let _ = std::fs::remove_file(&self.output);
        if !status.success() && text.is_none() {
            return None;
        }
        parse_perf_count(&text?, "raw_syscalls:sys_enter")
    }
}

/// The count of `event` in `perf stat -x ,` output.
fn parse_perf_count(text: &str, event: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.split(',').nth(2) == Some(event))
        .and_then(|l| l.split(',').next()?.trim().parse().ok())
}

/// Jiffies the machine's cores spent busy and in all, from /proc/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
    /// Interrupt and softirq time: on loopback, much of TCP's receive
    /// processing, charged to no process.
    irq: u64,
}

impl MachineCpu {
    pub fn now() -> Option<MachineCpu> {
        parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Percent of all cores' time that was busy between `earlier` and `self`.
    pub fn busy_pct_since(&self, earlier: &MachineCpu) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        (total > 0).then(|| busy as f64 * 100.0 / total as f64)
    }

    /// CPU seconds all cores spent busy between `earlier` and `self`.
    pub fn busy_seconds_since(&self, earlier: &MachineCpu) -> Option<f64> {
        let busy = self.busy.checked_sub(earlier.busy)?;
        Some(busy as f64 / ticks_per_second())
    }

    /// Of those, seconds in interrupts and softirqs.
    pub fn irq_seconds_since(&self, earlier: &MachineCpu) -> Option<f64> {
        let irq = self.irq.checked_sub(earlier.irq)?;
        Some(irq as f64 / ticks_per_second())
    }
}

fn parse_proc_stat(text: &str) -> Option<MachineCpu> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    // Steal is the hypervisor running someone else: neither ours nor idle.
    let idle = f.get(3)? + f.get(4).copied().unwrap_or(0);
    let total: u64 = f.iter().take(7).sum();
    Some(MachineCpu {
        busy: total - idle,
        total,
        irq: f.get(5).copied().unwrap_or(0) + f.get(6).copied().unwrap_or(0),
    })
}

/// Raises the soft open-file limit to the hard one (children inherit it):
/// every WebSocket client is a descriptor here and one in the gateway.
/// Returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit read and write the struct we hand them.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur as u64;
            }
        }
        limit.rlim_cur as u64
    }
}

/// The postmaster's pid from a data directory's `postmaster.pid`.
pub fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// Logical CPUs, as `nproc` counts them.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (ws gate (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 4 0";
        let f = parse_stat(stat).unwrap();
        assert_eq!(f[1], 1, "ppid");
        assert_eq!((f[11], f[12], f[13], f[14]), (250, 50, 7, 3));

        let status = "Name:\tws-gateway\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(
            parse_status(status),
            Some(Memory {
                rss: 10240 * 1024,
                peak_rss: 20480 * 1024
            })
        );

        let switches = parse_switches("Name:\tx\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n");
        assert_eq!((switches.voluntary, switches.involuntary), (120, 7));
        let perf = "# started on Tue Dec  1 16:05:51 2026\n\n29,,raw_syscalls:sys_enter,493595,100.00,,\n";
        assert_eq!(parse_perf_count(perf, "raw_syscalls:sys_enter"), Some(29));
        assert_eq!(
            parse_perf_count(
                "<not counted>,,raw_syscalls:sys_enter,0,0,,\n",
                "raw_syscalls:sys_enter"
            ),
            None
        );

        let a = parse_proc_stat("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        let b = parse_proc_stat("cpu  180 0 100 850 50 5 15 9 0 0\n").unwrap();
        assert_eq!(b.busy_pct_since(&a), Some(75.0));
        assert_eq!(b.busy_seconds_since(&a), Some(150.0 / ticks_per_second()));
        assert_eq!(b.irq_seconds_since(&a), Some(20.0 / ticks_per_second()));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(process_cpu(me).is_some());
        assert!(process_switches(me).is_some_and(|s| s.voluntary + s.involuntary > 0));
        let memory = process_memory(me).unwrap();
        assert!(memory.rss > 0 && memory.peak_rss >= memory.rss);
        assert!(MachineCpu::now().is_some());
        assert!(raise_fd_limit() > 0);
    }
}
