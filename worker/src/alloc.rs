//! The process allocator's settings for inference. A step allocates and frees activations of
//! megabytes (a 4096-token chunk's FFN rows are 12 MB on the tiny preset), a few hundred times a
//! second. glibc's defaults serve that badly and unpredictably: its mmap threshold adapts to the
//! largest block freed so far, and its heap is trimmed back to the system whenever 2× that much
//! is free at the top, so whether a buffer comes from reused heap or from fresh zeroed pages
//! depends on the order of earlier frees. Measured on `yoco bench` (tiny, 32K prefill, 2 AMD
//! cores): 1.8–1.9 s with both off, 2.0–2.5 s with the defaults depending on the code's
//! allocation order, 3.0 s with the mmap threshold pinned at its 128 KB default.
//!
//! So large blocks come from the heap and the heap keeps up to 1 GiB free: the process stays at
//! its high-water mark (as jemalloc and mimalloc keep theirs), which for a server is the memory
//! it must have anyway. A `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` set in the
//! environment is left to rule.

/// Applies the settings above (glibc only; elsewhere nothing). Call once, early in `main`.
pub fn tune_for_inference() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some() || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some()
        {
            return;
        }
        // SAFETY: mallopt only changes the allocator's parameters; glibc takes them at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}
