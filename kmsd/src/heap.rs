//! How kmsd's memory allocator gives memory back.
//!
//! glibc's malloc raises its mmap threshold each time a large block it mapped is freed,
//! so that later large blocks come from the heap instead, where freed memory stays mapped
//! unless it is at the top. A whole `list` of 100,000 keys builds replies of tens of
//! megabytes: after ten of them, kmsd's resident set grew from 122 to 271 MiB and stayed
//! there (docs/PERFORMANCE.md, "Scale"). A fixed trim threshold turns that adjustment off:
//! blocks of 128 KiB and more keep mappings of their own, unmapped when freed (138 MiB
//! after the same ten lists), and free memory beyond 1 MiB at the top of the main heap is
//! returned too. Smaller blocks, which every call allocates, are not affected.

/// Sets the allocator's trim threshold (glibc only; elsewhere nothing). Called first in
/// `main`, before any other thread exists.
#[allow(unsafe_code)]
pub fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const TRIM_THRESHOLD: libc::c_int = 1 << 20;
        // SAFETY: mallopt only changes malloc's tuning parameters; it is called while the
        // process has one thread, before any allocation depends on them. Its result (0 on
        // failure) is not needed: failing, malloc keeps its default, which costs memory,
        // not correctness.
        let _ = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) };
    }
}
