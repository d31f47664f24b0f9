//! The agent's allocator settings (glibc). A node agent's heap swells with a burst of pods and
//! should shrink when they go: one arena instead of one per thread (each kept what its thread
//! had freed), and blocks of 64 KiB and more mapped on their own.
//!
//! Measured with `cargo bench --bench pod_start` (50 pods, three rounds of create and delete,
//! lean build): RssAnon 14.7 -> 11.0 MiB at 50 pods and 16.5 -> 11.5 MiB after the third
//! round. A `malloc_trim(0)` once pods had ended was also tried: no change (10.5 MiB either
//! way), so it is not done.

/// Applies the settings; call first thing, before other threads exist.
pub fn tune() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes glibc's malloc parameters.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 * 1024);
    }
}
