//! Memory: the page size, and a hint for a large buffer.

/// The system's page size (4 KiB on x86-64, up to 64 KiB on arm64 kernels).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf takes a name and no pointers.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

/// Asks the kernel to back `buf` with huge pages where it can (a hint,
/// `MADV_HUGEPAGE`; nothing changes where transparent huge pages are off).
/// A large buffer about to be written in full then takes one page fault
/// per 2 MiB instead of one per 4 KiB.
pub(crate) fn prefer_huge_pages(buf: &mut [u8]) {
    let page = page_size();
    let start = buf.as_mut_ptr() as usize;
    let first = start.next_multiple_of(page);
    let end = (start + buf.len()) / page * page;
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
