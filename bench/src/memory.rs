//! A process's memory as the kernel accounts it. VmRSS counts every page mapped, shared file
//! pages (the binary, libc) included, which another process of the same binary shares; what a
//! process costs on its own is its private pages (`Private_Clean + Private_Dirty` in
//! `/proc/PID/smaps_rollup`), and its fair share of the rest is `Pss`.
//!
//! `Private_Clean` is mostly the binary's own code and read-only data as read from disk:
//! private only because no other process maps that file, and shared with the next generation
//! of the same binary during a handoff. `Private_Dirty` is what the process wrote: heap,
//! stacks, relocated data.
//!
//! The code part of `Private_Clean` is most of the binary's code: the kernel maps the 64 KiB
//! around each page a process touches (fault-around), and the code run at start-up is spread
//! over most 64 KiB stretches of a binary. [`Footprint::code_kb`] and
//! [`Footprint::code_resident_kb`] show that (`Size` and `Rss` of the binary's executable
//! mapping in `/proc/PID/smaps`).

/// Memory of one process, kB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub rss_kb: u64,
    pub pss_kb: u64,
    pub private_kb: u64,
    pub private_dirty_kb: u64,
    /// The binary's executable mapping: its size, and how much of it is resident.
    pub code_kb: u64,
    pub code_resident_kb: u64,
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
        code_kb: 0,
        code_resident_kb: 0,
    })
}

/// `Size` and `Rss` (kB) of the executable mappings of `exe` in the text of
/// `/proc/PID/smaps`.
pub fn parse_code(smaps: &str, exe: &str) -> Option<(u64, u64)> {
    let (mut size, mut rss, mut found, mut ours) = (0, 0, false, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // `start-end perms offset dev inode [path]`: a mapping begins.
            let perms = words.next().unwrap_or("");
            ours = perms.contains('x')
                && line
                    .trim_end()
                    .strip_suffix(exe)
                    .is_some_and(|head| head.ends_with(' '));
            found |= ours;
            continue;
        }
        let mut value = || words.next()?.parse::<u64>().ok();
        match first {
            "Size:" if ours => size += value()?,
            "Rss:" if ours => rss += value()?,
            _ => {}
        }
    }
    found.then_some((size, rss))
}

/// The footprint of `pid` now.
pub fn footprint(pid: u32) -> Option<Footprint> {
    let mut f =
        parse_smaps_rollup(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    (f.code_kb, f.code_resident_kb) = parse_code(&smaps, exe.to_str()?)?;
    Some(f)
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
                code_kb: 0,
                code_resident_kb: 0,
            })
        );
        assert_eq!(parse_smaps_rollup("Rss: 1 kB\n"), None);
        assert!(footprint(std::process::id())
            .is_some_and(|f| f.private_kb > 0 && f.code_kb > 0 && f.code_resident_kb > 0));
    }

    #[test]
    fn code_of_the_binary() {
        let smaps = "5600-5700 r--p 00000000 fe:01 42                         /srv/hello\n\
                     Size:                132 kB\nRss:                 132 kB\n\
                     5700-5800 r-xp 00021000 fe:01 42                         /srv/hello\n\
                     Size:               1616 kB\nKernelPageSize:        4 kB\nRss:                1484 kB\n\
                     7f00-7f10 r-xp 00028000 fe:01 77                         /usr/lib/libc.so.6\n\
                     Size:               1620 kB\nRss:                 900 kB\n\
                     7f20-7f30 rw-p 00000000 00:00 0 \n\
                     Size:                 8 kB\nRss:                   8 kB\n\
                     VmFlags: rd wr mr mw me ac sd\n";
        let cases = [
            ("/srv/hello", Some((1616, 1484))),
            ("/usr/lib/libc.so.6", Some((1620, 900))),
            ("/srv/other", None),
            ("/srv/hell", None),
            ("hello", None),
        ];
        for (exe, want) in cases {
            assert_eq!(parse_code(smaps, exe), want, "{exe}");
        }
    }
}
