//! [`HugePageAlloc`]: the system allocator, with large blocks backed by
//! transparent huge pages.
//!
//! Why: every Burn Flex op and every training kernel writes a freshly
//! allocated buffer; glibc serves blocks above 32 MiB (and others once
//! trimmed) straight from `mmap`, so each use faults its pages in one 4 KiB
//! page at a time. For a 41 MB activation (g's pairs at 75x75) that is
//! about 10 ms of kernel time against about 3.5 ms with 2 MiB pages, and a
//! training step allocates dozens of such buffers. On Linux systems whose
//! transparent huge pages are in `madvise` mode (the default of most
//! distributions), this asks for them on blocks of at least 4 MiB; the
//! advice is only a hint, so where THP is off nothing changes.
//!
//! The binary and the benchmarks install it with `#[global_allocator]`; the
//! library never does (that is the application's choice).

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks this large (bytes) get the huge-page advice.
pub const HUGE_PAGE_MIN: usize = 4 << 20;

/// See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct HugePageAlloc;

#[cfg(target_os = "linux")]
fn advise(ptr: *mut u8, size: usize) {
    const HUGE: usize = 2 << 20;
    if ptr.is_null() || size < HUGE_PAGE_MIN {
        return;
    }
    // Only the 2 MiB-aligned interior can become huge pages.
    let start = (ptr as usize).next_multiple_of(HUGE);
    let end = (ptr as usize + size) & !(HUGE - 1);
    if end > start {
        // SAFETY: [start, end) lies inside the block just allocated for
        // the caller; MADV_HUGEPAGE changes no contents, only how the
        // pages are backed, and failure (e.g. THP disabled) is harmless.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_ptr: *mut u8, _size: usize) {}

// SAFETY: every method forwards to `System` with the same arguments and
// returns its result unchanged; `advise` only adds a paging hint.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let ptr = unsafe { System.alloc(layout) };
        advise(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        advise(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let ptr = unsafe { System.realloc(ptr, layout, new_size) };
        advise(ptr, new_size);
        ptr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_through_the_allocator() {
        let a = HugePageAlloc;
        for (size, align) in [(16, 8), (HUGE_PAGE_MIN, 64), (3 * HUGE_PAGE_MIN + 5, 4096)] {
            let layout = Layout::from_size_align(size, align).expect("layout");
            // SAFETY: non-zero size; the block is written inside its bounds
            // and freed with its own layout.
            unsafe {
                let z = a.alloc_zeroed(layout);
                assert!(!z.is_null() && (z as usize).is_multiple_of(align));
                let s = std::slice::from_raw_parts_mut(z, size);
                assert!(s.iter().all(|&b| b == 0), "zeroed block of {size}");
                s[size - 1] = 7;
                let r = a.realloc(z, layout, size * 2);
                assert!(!r.is_null());
                assert_eq!(*r.add(size - 1), 7, "realloc keeps the contents");
                a.dealloc(r, Layout::from_size_align(size * 2, align).expect("layout"));
            }
        }
    }
}
