//! The allocator's settings, set once at start before any other thread runs.

/// The most malloc arenas glibc may make (`M_ARENA_MAX`), unless the environment's
/// `MALLOC_ARENA_MAX` says otherwise. glibc gives each thread that allocates while the others
/// hold theirs an arena of its own (up to 8 per core) and keeps what is freed in the arena it
/// came from. The first table is built on the loading and route-building threads, each in its
/// own arena, and a reload, built on the config plane's thread, frees it there and allocates
/// anew in another: the first table's memory stayed resident beside the new one, and the
/// resident size grew by about a third over 100 reloads at 200,000 apps. With one arena, what
/// a reload frees is what the next one reuses. The relay's threads allocate little per
/// connection, so they do not contend for it.
const ARENAS: i32 = 1;

/// Blocks from this size up are mapped on their own and unmapped when freed (glibc's
/// default, `M_MMAP_THRESHOLD`, set so that it stays: left to itself, glibc raises it to the
/// largest block freed, up to 32 MiB). A start at 200,000 apps makes and frees tables and
/// lists of tens of MB (the bpf map's batches, the indices growing); with the threshold
/// raised, the later ones came from the heap and what they left there stayed resident among
/// the blocks still in use.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Limit glibc to [`ARENAS`] arenas. Before any thread starts: arenas already made stay.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable of the allocator, under the allocator's own
        // lock; M_ARENA_MAX takes any positive count. A refusal (0) leaves glibc's default,
        // which only costs memory, so it is not checked.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENAS);
        }
    }
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: as above; any non-negative threshold is taken.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}
