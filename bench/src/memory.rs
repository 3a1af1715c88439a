//! A process's memory as the kernel accounts it. VmRSS counts every page mapped, shared file
//! pages (the binary, libc) included, which another process of the same binary shares; what a
//! process costs on its own is its private pages (`Private_Clean + Private_Dirty` in
//! `/proc/PID/smaps_rollup`), and its fair share of the rest is `Pss`.
//!
//! `Private_Clean` is mostly the binary's own code and read-only data as read from disk:
//! private only because no other process maps that file, and shared with the next generation
//! of the same binary during a handoff. `Private_Dirty` is what the process wrote: heap,
//! stacks, relocated data.

/// Memory of one process, kB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub rss_kb: u64,
    pub pss_kb: u64,
    pub private_kb: u64,
    pub private_dirty_kb: u64,
}

/// The footprint in the text of `/proc/PID/smaps_rollup`.
pub fn parse_smaps_rollup(text: &str) -> Option<Footprint> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    Some(Footprint {
        rss_kb: field("Rss")?,
        pss_kb: field("Pss")?,
        private_kb: field("Private_Clean")? + field("Private_Dirty")?,
        private_dirty_kb: field("Private_Dirty")?,
    })
}

/// The footprint of `pid` now.
pub fn footprint(pid: u32) -> Option<Footprint> {
    parse_smaps_rollup(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rollup() {
        let text = "55d0c0000000-7ffd00000000 ---p 00000000 00:00 0                          [rollup]\n\
                    Rss:                4128 kB\nPss:                3006 kB\nPss_Dirty:          2316 kB\n\
                    Pss_Anon:            348 kB\nShared_Clean:       1420 kB\nPrivate_Clean:       396 kB\n\
                    Private_Dirty:      2312 kB\nPrivate_Hugetlb:       0 kB\n";
        assert_eq!(
            parse_smaps_rollup(text),
            Some(Footprint {
                rss_kb: 4128,
                pss_kb: 3006,
                private_kb: 2708,
                private_dirty_kb: 2312,
            })
        );
        assert_eq!(parse_smaps_rollup("Rss: 1 kB\n"), None);
        assert!(footprint(std::process::id()).is_some_and(|f| f.private_kb > 0));
    }
}
