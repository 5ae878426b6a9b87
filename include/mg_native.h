/* Native allocation hooks (csrc/hooks_native.c): wrappers of malloc, calloc, realloc, free,
 * posix_memalign, aligned_alloc, memalign, valloc, pvalloc, reallocarray and anonymous
 * mmap/munmap/mremap, installed into the GOT slots of every loaded shared object (and of
 * every object loaded later, through a dlopen wrapper) by csrc/elf_patch.c. They count into
 * MG_DOMAIN_NATIVE. docs/design.md, "Native memory". */
#ifndef MEMGUARD_MG_NATIVE_H
#define MEMGUARD_MG_NATIVE_H

#include "memguard.h"

/* The line of a native block allocated by the cell's own thread inside a call that released
 * the GIL: the relay names the line that thread is running (records.py). Never a real line
 * (those are >= 1) nor unknown (-1). */
#define MG_NATIVE_LINE_CELL_THREAD 0

/* Resolve the real functions (first call), then patch every loaded object except memguard's
 * own, libc and the dynamic loader. Slots of objects whose callers turn a NULL into an
 * exception (libarrow.so*, libc10.so: see docs/design.md) get the refusing variant. Returns
 * the number of slots patched by this call, -1 with errno set. GIL held (or any thread:
 * serialized inside). */
int mg_native_install(void);

/* Restore every patched slot; counting of native memory stops. Returns slots restored. */
int mg_native_uninstall(void);

/* Bring the native domain's mapping bytes to the mappings' resident pages (mincore), and
 * record `rss` (bytes, read by the caller just before; -1 unknown) as the RSS this measure
 * follows, for mg_native_settle_needed. The monitor thread calls it at RSS samples, the end
 * of a cell or task through core.native_settle. A crossing of the budget it causes is
 * pushed as an MG_KIND_BUDGET event with an unknown line. Any thread, not from a hook
 * (records being edited elsewhere are skipped). */
void mg_native_settle_at(int64_t rss);

/* 0 when a measure now would find nothing that matters: RSS (`rss`, bytes, just read) is
 * within `slack` bytes (>= 0; 0: the same) of what the last mg_native_settle_at followed,
 * and no mapping record was added, cut or removed since it began (resident pages of a
 * mapping cannot grow by more than RSS grew, unless other memory shrank by as much in
 * between); else 1. Any thread; relaxed. */
int mg_native_settle_needed(int64_t rss, int64_t slack);

/* 1 when the native hooks are installed and hold at least one live mapping record (what
 * mg_native_settle_at would measure), else 0. Any thread; relaxed (a record added meanwhile
 * is measured by the next settle). */
int mg_native_has_mappings(void);

/* The NumPy route. NumPy's default NEP 49 handler (default_malloc and friends in
 * numpy/_core/src/multiarray/alloc.c) keeps freed blocks under 1024 bytes in a cache of its
 * own and calls malloc, calloc, realloc and free for everything else (NumPy 2.5 and later:
 * CPython's PyMem_RawMalloc, PyMem_RawCalloc, PyMem_RawRealloc and PyMem_RawFree). The GOT
 * slots of those eight in NumPy's core module (_multiarray_umath) get variant 2 of
 * memguard's wrappers, which count into MG_DOMAIN_NUMPY. Once a probe showed that NumPy's
 * handler reaches them (mg_hooks_numpy_route), the "memguard" handler's malloc, realloc
 * and free entries are NumPy's own outside raise mode (mg_hooks_numpy_refresh), and these
 * count what NumPy takes from and gives back to malloc and flag a request beyond the limit
 * as warn mode does; a block in NumPy's cache counts as NumPy's, which it is for RSS. Then
 * a small array costs no hook at all when NumPy's cache serves it (small_arrays,
 * bench/overhead.py --callgrind). What the handler's own wrappers still judge (every
 * request in raise mode; a calloc of MG_SMALL_REQUEST bytes and more) they count
 * themselves, and these pass it through, nested. Bits a variant-2 wrapper sets in
 * t_mg.probe while the probe has it armed: */
#define MG_PROBE_ARMED 1u
#define MG_PROBE_MALLOC 2u
#define MG_PROBE_CALLOC 4u
#define MG_PROBE_REALLOC 8u
#define MG_PROBE_FREE 16u
#define MG_PROBE_ALL (MG_PROBE_ARMED | MG_PROBE_MALLOC | MG_PROBE_CALLOC | MG_PROBE_REALLOC | \
                      MG_PROBE_FREE)

/* Non-zero between install and uninstall. Any thread (relaxed). */
int mg_native_installed(void);

/* Mappings the anonymous-mmap table holds now, and mappings/refusals it could not record. */
typedef struct mg_native_stats {
    long mappings;
    unsigned long long map_dropped;
    int slots;          /* GOT slots patched now */
    int objects;        /* objects scanned in the last pass */
    int failed;         /* objects that could not be patched (mg_elf_failed) */
} mg_native_stats_t;
void mg_native_stats(mg_native_stats_t *out);

#endif /* MEMGUARD_MG_NATIVE_H */
