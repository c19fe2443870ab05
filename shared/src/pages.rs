//! Advice to the kernel about host memory a worker holds, so that its resident memory is what
//! it uses: a checkpoint's mapped pages dropped once copied out, and the KV pool kept on 4 KiB
//! pages, resident only where it is written. Linux only; elsewhere these do nothing.

/// The whole pages inside `len` bytes at `ptr` (the first and last pages may hold other data).
fn whole_pages(ptr: usize, len: usize) -> Option<(usize, usize)> {
    let page = 4096;
    let (start, end) = (ptr.next_multiple_of(page), (ptr + len) / page * page);
    (end > start).then(|| (start, end - start))
}

/// Unmaps the pages of `bytes`, a tensor's part of a memory-mapped checkpoint that has been
/// copied out, from this process: they stop counting toward its resident memory (the kernel's
/// page cache keeps them, and a read would map them again, unchanged), so a worker's peak
/// while loading is what it keeps, not that and the file besides. Only whole pages inside
/// `bytes` are released; those it shares with the next tensor stay.
pub(crate) fn release_mapped(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    if let Some((start, len)) = whole_pages(bytes.as_ptr() as usize, bytes.len()) {
        // SAFETY: the range lies in a read-only mapping of a checkpoint file, which is never
        // written while served; MADV_DONTNEED drops the pages from this process, and a later
        // read faults the same bytes back in from the file.
        #[allow(unsafe_code)]
        unsafe {
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

/// Puts `zeros`, anonymous memory that holds zeros and has not been written since it was
/// allocated (a KV pool tensor), on 4 KiB pages, none of them resident. The allocator asks for
/// 2 MiB pages for its arenas, and a block of the pool touches each head's rows of a layer:
/// with 2 MiB pages one sequence of 192 tokens made 0.9 GB of a 2 GiB pool resident, and the
/// page the allocator had touched at each tensor's start held 2 MiB more of each. With 4 KiB
/// pages the pool is resident as far as it holds tokens.
pub(crate) fn small_untouched_pages<T: Copy>(zeros: &[T]) {
    #[cfg(target_os = "linux")]
    if let Some((start, len)) = whole_pages(zeros.as_ptr() as usize, std::mem::size_of_val(zeros)) {
        // SAFETY: advice about whole pages of this allocation, which the caller holds.
        // MADV_NOHUGEPAGE changes how they are backed, not their contents; MADV_DONTNEED drops
        // them, and anonymous memory reads back as zeros, which is what they hold. A refusal
        // (an old kernel) leaves them as they were.
        #[allow(unsafe_code)]
        unsafe {
            let at = start as *mut libc::c_void;
            libc::madvise(at, len, libc::MADV_NOHUGEPAGE);
            libc::madvise(at, len, libc::MADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = zeros;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_pages_inside_the_range_are_advised() {
        assert_eq!(whole_pages(4096, 8192), Some((4096, 8192)));
        assert_eq!(whole_pages(100, 8192), Some((4096, 4096)));
        assert_eq!(whole_pages(4096, 4095), None);
        assert_eq!(whole_pages(100, 4000), None);
    }
}
