//! The journal as the tests read it: `journalctl -o export` parsed into entries.

use std::collections::HashMap;

/// One parsed journal entry: field name to value (binary fields decoded lossily; when a field
/// occurs several times in one entry, the last value wins).
pub type JournalEntry = HashMap<String, String>;

/// Parses `journalctl -o export` output: `KEY=VALUE` lines, entries separated by an empty line;
/// a binary field is `KEY\n`, a little-endian u64 length, the data and `\n`.
pub fn parse_journal_export(data: &[u8]) -> Vec<JournalEntry> {
    let mut entries = Vec::new();
    let mut cur = JournalEntry::new();
    let mut i = 0;
    while i < data.len() {
        let end = data[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |p| i + p);
        let line = &data[i..end];
        i = end + 1;
        if line.is_empty() {
            if !cur.is_empty() {
                entries.push(std::mem::take(&mut cur));
            }
        } else if let Some(eq) = line.iter().position(|&b| b == b'=') {
            cur.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
        } else {
            let Some(len) = data.get(i..i + 8) else { break };
            let len = u64::from_le_bytes(len.try_into().unwrap()) as usize;
            i += 8;
            let end = i.saturating_add(len).min(data.len());
            cur.insert(
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(&data[i..end]).into_owned(),
            );
            i = end + 1; // the '\n' after the data
        }
    }
    if !cur.is_empty() {
        entries.push(cur);
    }
    entries
}

/// An entry's `MESSAGE`, or "".
pub fn message(e: &JournalEntry) -> &str {
    field(e, "MESSAGE")
}

/// An entry's field `name`, or "".
pub fn field<'a>(e: &'a JournalEntry, name: &str) -> &'a str {
    e.get(name).map(String::as_str).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_format_parser() {
        let mut data = b"__CURSOR=c1\nMESSAGE=hello\n_PID=42\n".to_vec();
        data.extend_from_slice(b"BIN\n");
        data.extend_from_slice(&7u64.to_le_bytes());
        data.extend_from_slice(b"a\nb=c\0d\n");
        data.extend_from_slice(b"AFTER=x\n\n__CURSOR=c2\nMESSAGE=multi=equals\n\n");
        let e = parse_journal_export(&data);
        assert_eq!(e.len(), 2);
        assert_eq!(message(&e[0]), "hello");
        assert_eq!(field(&e[0], "_PID"), "42");
        assert_eq!(e[0]["BIN"], "a\nb=c\0d");
        assert_eq!(e[0]["AFTER"], "x");
        assert_eq!(message(&e[1]), "multi=equals");
        assert!(parse_journal_export(b"").is_empty());
    }
}
