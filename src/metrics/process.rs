//! The standard `process_*` families every Prometheus client library exports, read from
//! `/proc/self` at each scrape: dashboards and alerts written for any process work unchanged.

use std::fs;

/// What the process uses now. A field that cannot be read (no /proc, say) is left out of the
/// exposition rather than reported as 0, which would read as a real value.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub start_time_seconds: Option<f64>,
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub threads: Option<u64>,
}

/// Read the process's stats from /proc/self.
pub fn read() -> ProcessStats {
    let mut s = ProcessStats::default();
    // SAFETY: sysconf only reads configuration values.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if let Ok(stat) = fs::read_to_string("/proc/self/stat") {
        if let Some(f) = stat_fields(&stat) {
            let field = |n: usize| f.get(n).and_then(|v| v.parse::<u64>().ok());
            if ticks > 0 {
                let ticks = ticks as f64;
                if let (Some(u), Some(k)) = (field(UTIME), field(STIME)) {
                    s.cpu_seconds = Some((u + k) as f64 / ticks);
                }
                if let (Some(start), Some(boot)) = (field(STARTTIME), boot_time()) {
                    s.start_time_seconds = Some(boot as f64 + start as f64 / ticks);
                }
            }
            s.threads = field(NUM_THREADS);
            s.virtual_bytes = field(VSIZE);
            if page > 0 {
                s.resident_bytes = field(RSS).map(|p| p * page as u64);
            }
        }
    }
    s.open_fds = fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        s.max_fds = Some(lim.rlim_cur);
    }
    s
}

// Fields of /proc/self/stat counted from the one after the command name (proc(5) numbers them
// from 1 with the state as field 3, so field N is index N - 3 here).
const UTIME: usize = 14 - 3;
const STIME: usize = 15 - 3;
const NUM_THREADS: usize = 20 - 3;
const STARTTIME: usize = 22 - 3;
const VSIZE: usize = 23 - 3;
const RSS: usize = 24 - 3;

/// The fields after the command name: the name is in parentheses and may itself hold spaces
/// and parentheses, so the split starts after the last `)`.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

/// The boot time in Unix seconds (`btime` in /proc/stat): process start times count from it.
fn boot_time() -> Option<u64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_start_after_the_last_parenthesis() {
        let f = stat_fields("42 (a) b) S 1 2 3 4 5 6 7 8 9 10 11 12 13").unwrap();
        assert_eq!(f[0], "S");
        assert_eq!(f[UTIME], "11");
    }

    #[test]
    fn reads_this_process() {
        let s = read();
        assert!(s.threads.unwrap() >= 1);
        assert!(s.open_fds.unwrap() > 0);
        assert!(s.resident_bytes.unwrap() > 0);
        assert!(s.start_time_seconds.unwrap() > 1.0e9);
    }
}
