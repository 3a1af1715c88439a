//! Memory hints.

/// Asks the kernel to back `buf` with huge pages where it can (a hint,
/// `MADV_HUGEPAGE`; nothing changes where transparent huge pages are off).
/// A large buffer about to be written in full then takes one page fault
/// per 2 MiB instead of one per 4 KiB.
pub(crate) fn prefer_huge_pages(buf: &mut [u8]) {
    const PAGE: usize = 4096;
    let start = buf.as_mut_ptr() as usize;
    let first = start.next_multiple_of(PAGE);
    let end = (start + buf.len()) / PAGE * PAGE;
    if end <= first {
        return;
    }
    // SAFETY: MADV_HUGEPAGE changes neither contents nor permissions; the
    // range is whole pages inside `buf`, which this function borrows
    // mutably. An error (no THP support) leaves everything as it was.
    unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_changes_no_byte() {
        for len in [0, 100, 4096 * 3 + 17, 8 << 20] {
            let mut buf = vec![0u8; len];
            prefer_huge_pages(&mut buf);
            buf.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
            assert!(buf.iter().enumerate().all(|(i, b)| *b == i as u8));
        }
    }
}
