/* Owns the native allocation wrappers (include/mg_native.h), the table of anonymous
 * mappings they counted, and the dlopen wrapper that patches objects loaded later. The
 * wrappers run in any thread of any library, with or without the GIL, and follow
 * docs/design.md, "Hook safety": no Py* call, no lock, no malloc; the reentrancy guard makes
 * a call nested in another memguard hook (PyMem RAW, NEP 49, pymalloc arenas) pass through,
 * so nothing is counted twice. Install/uninstall: GIL held (elf_patch.c serializes). */
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <malloc.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mg_acct.h"
#include "mg_elf.h"
#include "mg_frames.h"
#include "mg_ring.h"
#include "mg_hooks.h"
#include "mg_native.h"
#include "mg_reentry.h"
#include "mg_sites.h"

typedef void *(*malloc_fn)(size_t);
typedef void *(*calloc_fn)(size_t, size_t);
typedef void *(*realloc_fn)(void *, size_t);
typedef void (*free_fn)(void *);
typedef int (*posix_memalign_fn)(void **, size_t, size_t);
typedef void *(*aligned_fn)(size_t, size_t);
typedef void *(*reallocarray_fn)(void *, size_t, size_t);
typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);
typedef int (*munmap_fn)(void *, size_t);
typedef void *(*mremap_fn)(void *, size_t, size_t, int, ...);
typedef void *(*dlopen_fn)(const char *, int);

/* The real functions. Written once, by the first mg_native_install (GIL held), before any
 * GOT slot points at a wrapper (the slot store is a release, elf_patch.c), never again;
 * read by the wrappers (plain loads of never-changing values). */
static malloc_fn r_malloc;
static calloc_fn r_calloc;
static realloc_fn r_realloc;
static free_fn r_free;
static posix_memalign_fn r_posix_memalign;
static aligned_fn r_aligned_alloc;
static aligned_fn r_memalign;
static malloc_fn r_valloc;
static malloc_fn r_pvalloc;
static reallocarray_fn r_reallocarray;
static mmap_fn r_mmap;
static munmap_fn r_munmap;
static mremap_fn r_mremap;
static dlopen_fn r_dlopen;
/* CPython's PyMem RAW functions, which NumPy's default handler calls from NumPy 2.5 on
 * (numpy/_core/src/multiarray/alloc.c); same rules. They reach memguard's RAW wrapper
 * (csrc/hooks_pymem.c), nested. */
static malloc_fn r_raw_malloc;
static calloc_fn r_raw_calloc;
static realloc_fn r_raw_realloc;
static free_fn r_raw_free;

/* Written by install/uninstall (release, GIL held); read by the dlopen wrapper (acquire). */
static _Atomic int s_installed = 0;

/* The thread that runs the cells (the one that called mg_native_install: the kernel's main
 * thread). Written by install (GIL held) before any slot is patched; read by the wrappers
 * (relaxed). */
static _Atomic(pthread_t) s_cell_thread;
static _Atomic int s_cell_thread_set = 0;

/* The line to charge a native block to: the cell line when this thread holds the GIL
 * (mg_frames_cell_line); MG_NATIVE_LINE_CELL_THREAD when it is the cell's own thread
 * inside a call that released the GIL (torch, Arrow compute, sqlite and polars do): the
 * relay then names the line that thread is running, which is the call's line; -1 for any
 * other thread (a native worker with no Python frame: line null, never a wrong line). */
static int32_t native_line(void)
{
    int line = mg_frames_cell_line();

    if (line >= 1)
        return line;
    if (atomic_load_explicit(&s_cell_thread_set, memory_order_relaxed) &&
        pthread_equal(pthread_self(),
                      atomic_load_explicit(&s_cell_thread, memory_order_relaxed)))
        return MG_NATIVE_LINE_CELL_THREAD;
    return -1;
}

/* mg_hooks_count_alloc with native_line for the site and the crossing. Hook-safe. */
static inline void native_count_alloc(size_t n, void *p)
{
    mg_hooks_count_alloc_at(MG_DOMAIN_NATIVE, n, p, native_line);
}

/* ---- anonymous mappings -------------------------------------------------------------- */

/* A record per anonymous mapping the wrappers saw, so munmap and mremap touch only what was
 * counted (a file mapping, or one made before install, is not). A mapping is counted by its
 * resident pages, not its length: arena allocators (mimalloc in Arrow, jemalloc in polars)
 * map far more than they touch (measured, docs/design.md "Native memory"). The wrappers
 * count nothing at mmap time (fresh pages are not resident); mg_native_settle_at (the
 * monitor thread at RSS samples, the end of a cell or task) adds or takes off the difference between each mapping's
 * resident bytes (mincore) and what it counted so far; munmap of a whole mapping takes its
 * counted bytes off at once. state: 0 free, 1 being edited by the thread that claimed it
 * (CAS), 2 live. Nobody waits: a record another thread is editing is skipped (settle tries
 * again next time; munmap counts a drop). Written and read by the mmap-family wrappers of
 * any thread and by the monitor thread: state by CAS (acq_rel), the other fields (relaxed)
 * only by the claiming thread, published by the release store of state. */
#define MAP_RECORDS 8192
typedef struct map_rec {
    _Atomic int state;
    _Atomic uintptr_t start;
    _Atomic uintptr_t end;
    _Atomic uintptr_t site;     /* address registered in mg_sites (0: none) */
    _Atomic int64_t counted;    /* bytes of this mapping in MG_DOMAIN_NATIVE now */
} map_rec_t;
static map_rec_t s_maps[MAP_RECORDS];
/* Written by wrappers (relaxed RMW); read by stats and maps_settle (relaxed). */
static _Atomic long s_maps_live = 0;
/* One past the highest record index ever claimed: maps_settle walks no further.
 * Raised by map_claim_free (CAS loop, relaxed: a record it covers is published by the
 * record's own release store of state, which settle acquires); read by settle (relaxed).
 * Never lowered (maps_reset leaves it: the records above are free, state 0). */
static _Atomic int s_maps_hwm = 0;
static _Atomic unsigned long long s_maps_dropped = 0;

static size_t page_size(void)
{
    static _Atomic size_t s_pg = 0; /* any thread, relaxed: every writer stores the same */
    size_t cur = atomic_load_explicit(&s_pg, memory_order_relaxed);

    if (cur == 0) {
        long v = sysconf(_SC_PAGESIZE);

        cur = v > 0 ? (size_t)v : 4096;
        atomic_store_explicit(&s_pg, cur, memory_order_relaxed);
    }
    return cur;
}

static size_t page_round(size_t n)
{
    size_t pg = page_size();

    return (n + pg - 1) & ~(pg - 1);
}

static map_rec_t *map_claim_free(void)
{
    for (int i = 0; i < MAP_RECORDS; i++) {
        int expect = 0;

        if (atomic_load_explicit(&s_maps[i].state, memory_order_relaxed) == 0 &&
            atomic_compare_exchange_strong_explicit(&s_maps[i].state, &expect, 1,
                                                    memory_order_acq_rel,
                                                    memory_order_relaxed)) {
            int hwm = atomic_load_explicit(&s_maps_hwm, memory_order_relaxed);

            while (hwm < i + 1 &&
                   !atomic_compare_exchange_weak_explicit(&s_maps_hwm, &hwm, i + 1,
                                                          memory_order_relaxed,
                                                          memory_order_relaxed))
                ;
            return &s_maps[i];
        }
    }
    return NULL;
}

/* What the last measure (mg_native_settle_at) followed, so a caller can skip one that
 * would find nothing new, or too little to matter (mg_native_settle_needed's slack):
 * s_settled_rss, the RSS (bytes) read just before it began (-1: none), and s_settled_gen,
 * the value s_maps_gen had then. s_maps_gen counts changes to the records (added, cut,
 * removed: map_publish, map_removed, maps_reset, from any thread's mmap-family wrapper),
 * since pages can move from an unmapped mapping to a new one with RSS unchanged. All relaxed: s_maps_gen by RMW; the
 * other two are written by whichever thread measures (the monitor, a cell's end), gen after
 * rss, and a reader that sees one store and not the other compares against an older
 * generation, which can only make it measure again. */
static _Atomic unsigned long s_maps_gen = 0;
static _Atomic int64_t s_settled_rss = -1;
static _Atomic unsigned long s_settled_gen = 0;

static inline void maps_changed(void)
{
    atomic_fetch_add_explicit(&s_maps_gen, 1, memory_order_relaxed);
}

static void map_publish(map_rec_t *r, uintptr_t start, uintptr_t end, uintptr_t site,
                        int64_t counted)
{
    atomic_store_explicit(&r->start, start, memory_order_relaxed);
    atomic_store_explicit(&r->end, end, memory_order_relaxed);
    atomic_store_explicit(&r->site, site, memory_order_relaxed);
    atomic_store_explicit(&r->counted, counted, memory_order_relaxed);
    atomic_store_explicit(&r->state, 2, memory_order_release);
    maps_changed();
}

/* Mappings are not recorded as sites: an arena allocator's mapping holds many allocations,
 * or none yet (mimalloc reserves 1 GiB arenas in libarrow: recorded by length, one such
 * mapping made a 640 MB accumulation read 1.7 GB), so neither its length nor its line
 * describes an allocation. Their bytes still count (mg_native_settle_at), toward the budget
 * too; lines and accumulation come from the malloc family. Returns the site (always 0). */
static uintptr_t map_site(void *p, size_t n)
{
    (void)p;
    (void)n;
    return 0;
}

/* Record a new anonymous mapping [p, p+len). */
static void map_added(void *p, size_t len)
{
    map_rec_t *r = map_claim_free();
    size_t n = page_round(len);

    if (r == NULL) {
        atomic_fetch_add_explicit(&s_maps_dropped, 1, memory_order_relaxed);
        return; /* not counted: its munmap will not be either */
    }
    atomic_fetch_add_explicit(&s_maps_live, 1, memory_order_relaxed);
    map_publish(r, (uintptr_t)p, (uintptr_t)p + n, map_site(p, n), 0);
}

/* Take [a, b) off the recorded mappings. A mapping removed whole takes its counted bytes
 * off now; a mapping cut in part keeps them until the next settle measures what is left. */
static void map_removed(uintptr_t a, uintptr_t b)
{
    for (int i = 0; i < MAP_RECORDS && a < b; i++) {
        map_rec_t *r = &s_maps[i];
        int expect = 2;
        uintptr_t s, e, lo, hi, site;
        int64_t counted;

        if (atomic_load_explicit(&r->state, memory_order_acquire) != 2)
            continue;
        s = atomic_load_explicit(&r->start, memory_order_relaxed);
        e = atomic_load_explicit(&r->end, memory_order_relaxed);
        if (e <= a || s >= b)
            continue;
        if (!atomic_compare_exchange_strong_explicit(&r->state, &expect, 1, memory_order_acq_rel,
                                                     memory_order_relaxed)) {
            atomic_fetch_add_explicit(&s_maps_dropped, 1, memory_order_relaxed);
            continue;
        }
        /* Re-read under our claim: another thread may have changed it before. */
        s = atomic_load_explicit(&r->start, memory_order_relaxed);
        e = atomic_load_explicit(&r->end, memory_order_relaxed);
        site = atomic_load_explicit(&r->site, memory_order_relaxed);
        counted = atomic_load_explicit(&r->counted, memory_order_relaxed);
        lo = a > s ? a : s;
        hi = b < e ? b : e;
        if (hi <= lo) {
            atomic_store_explicit(&r->state, 2, memory_order_release);
        } else if (lo == s && hi == e) {
            if (site != 0)
                mg_sites_free((void *)site);
            if (counted > 0)
                mg_acct_free(MG_DOMAIN_NATIVE, (size_t)counted);
            atomic_fetch_sub_explicit(&s_maps_live, 1, memory_order_relaxed);
            atomic_store_explicit(&r->state, 0, memory_order_release);
            maps_changed();
        } else if (lo == s) {
            map_publish(r, hi, e, site, counted);
        } else if (hi == e) {
            map_publish(r, s, lo, site, counted);
        } else {
            map_rec_t *tail = map_claim_free();

            if (tail != NULL) {
                atomic_fetch_add_explicit(&s_maps_live, 1, memory_order_relaxed);
                map_publish(tail, hi, e, 0, 0);
            } else {
                atomic_fetch_add_explicit(&s_maps_dropped, 1, memory_order_relaxed);
            }
            map_publish(r, s, lo, site, counted);
        }
    }
}

/* The record holding exactly [a, a+n) claimed (state 1), or NULL. */
static map_rec_t *map_claim_exact(uintptr_t a, uintptr_t n)
{
    for (int i = 0; i < MAP_RECORDS; i++) {
        map_rec_t *r = &s_maps[i];
        int expect = 2;

        if (atomic_load_explicit(&r->state, memory_order_acquire) != 2 ||
            atomic_load_explicit(&r->start, memory_order_relaxed) != a)
            continue;
        if (!atomic_compare_exchange_strong_explicit(&r->state, &expect, 1, memory_order_acq_rel,
                                                     memory_order_relaxed))
            return NULL;
        if (atomic_load_explicit(&r->start, memory_order_relaxed) == a &&
            atomic_load_explicit(&r->end, memory_order_relaxed) == a + n)
            return r;
        atomic_store_explicit(&r->state, 2, memory_order_release);
        return NULL;
    }
    return NULL;
}

/* Pages per mincore call in resident_bytes: 64 MiB of 4 KiB pages, so libarrow's 1 GiB
 * mimalloc arena takes 16 calls. The vector lives on the caller's stack (16 KiB): the
 * monitor thread and Python's threads (csrc/module.c) call it. */
#define MINCORE_PAGES 16384

/* Resident bytes of [s, e) (page-aligned), by mincore in chunks. Only bit 0 of each byte
 * of the vector is defined (mincore(2)); it is summed eight bytes at a time. Measured
 * (an idle kernel that used pyarrow, whose 1 GiB arena is settled every RSS sample): the
 * monitor thread's CPU time went from 4.8 % of a core with byte-wise sums of 4096-page
 * vectors to well under 1 % with this and the RSS check in csrc/monitor.c. */
static int64_t resident_bytes(uintptr_t s, uintptr_t e)
{
    uint64_t vec[MINCORE_PAGES / sizeof(uint64_t)];
    unsigned char *bytes = (unsigned char *)vec;
    size_t pg = page_size();
    int64_t total = 0;

    while (s < e) {
        size_t pages = (size_t)(e - s) / pg;
        size_t words;

        if (pages > MINCORE_PAGES)
            pages = MINCORE_PAGES;
        if (mincore((void *)s, pages * pg, bytes) != 0)
            return -1; /* unmapped meanwhile: leave the record as it is */
        words = pages / sizeof(uint64_t);
        /* mincore sets bit 0 of each byte: the eight 0/1 bytes of a word summed by one
         * multiply into the top byte (at most 8, no carry). __builtin_popcountll would be
         * a libgcc call without -mpopcnt, which baseline x86-64 wheels cannot assume:
         * 0.7 M instructions per cell end over Arrow's 1 GiB arena (callgrind). */
        for (size_t i = 0; i < words; i++)
            total += (int64_t)(((vec[i] & 0x0101010101010101ull) * 0x0101010101010101ull) >> 56);
        for (size_t i = words * sizeof(uint64_t); i < pages; i++)
            total += bytes[i] & 1;
        s += pages * pg;
    }
    return total * (int64_t)pg;
}

/* Send the budget crossing that settling a mapping caused, as a hook would (line unknown:
 * the relay uses the line the cell's thread is running). */
static void settle_push_budget(int64_t bytes)
{
    mg_hooks_push(MG_KIND_BUDGET, -1, bytes, 0);
}

int mg_native_has_mappings(void)
{
    return atomic_load_explicit(&s_installed, memory_order_acquire) &&
           atomic_load_explicit(&s_maps_live, memory_order_relaxed) > 0;
}

/* The walk of mg_native_settle_at: each live record brought to its resident pages. */
static void maps_settle(void)
{
    int hwm;

    if (!mg_native_has_mappings() || !mg_acct_enabled())
        return;
    hwm = atomic_load_explicit(&s_maps_hwm, memory_order_relaxed);
    for (int i = 0; i < hwm; i++) {
        map_rec_t *r = &s_maps[i];
        int expect = 2;
        int64_t res;
        int64_t counted;

        if (atomic_load_explicit(&r->state, memory_order_acquire) != 2)
            continue;
        if (!atomic_compare_exchange_strong_explicit(&r->state, &expect, 1, memory_order_acq_rel,
                                                     memory_order_relaxed))
            continue;
        res = resident_bytes(atomic_load_explicit(&r->start, memory_order_relaxed),
                             atomic_load_explicit(&r->end, memory_order_relaxed));
        counted = atomic_load_explicit(&r->counted, memory_order_relaxed);
        if (res > counted) {
            if (mg_acct_alloc(MG_DOMAIN_NATIVE, (size_t)(res - counted)))
                settle_push_budget(res - counted);
            atomic_store_explicit(&r->counted, res, memory_order_relaxed);
        } else if (res >= 0 && res < counted) {
            mg_acct_free(MG_DOMAIN_NATIVE, (size_t)(counted - res));
            atomic_store_explicit(&r->counted, res, memory_order_relaxed);
        }
        atomic_store_explicit(&r->state, 2, memory_order_release);
    }
}

int mg_native_settle_needed(int64_t rss, int64_t slack)
{
    int64_t last = atomic_load_explicit(&s_settled_rss, memory_order_relaxed);
    int64_t moved = rss - last;

    if (rss < 0 || last < 0 || moved > slack || moved < -slack)
        return 1;
    return atomic_load_explicit(&s_maps_gen, memory_order_relaxed) !=
           atomic_load_explicit(&s_settled_gen, memory_order_relaxed);
}

void mg_native_settle_at(int64_t rss)
{
    unsigned long gen = atomic_load_explicit(&s_maps_gen, memory_order_relaxed);

    maps_settle();
    atomic_store_explicit(&s_settled_rss, rss, memory_order_relaxed);
    atomic_store_explicit(&s_settled_gen, gen, memory_order_relaxed);
}

/* Forget every record (install from an uninstalled state: the counters were reset, so
 * bytes counted by an earlier session must not be taken off again). */
static void maps_reset(void)
{
    for (int i = 0; i < MAP_RECORDS; i++)
        atomic_store_explicit(&s_maps[i].state, 0, memory_order_release);
    atomic_store_explicit(&s_maps_live, 0, memory_order_relaxed);
    maps_changed();
}

/* ---- refusals ------------------------------------------------------------------------ */

/* The refusing variants (objects whose callers raise on NULL) refuse only blocks of at
 * least the attribution threshold; mg_hooks_refuse decides (raise mode, budget, limit). */
static inline int native_refuse(int was, size_t n)
{
    return n >= mg_sites_threshold() && mg_hooks_refuse(was, n);
}

/* ---- the malloc family ---------------------------------------------------------------- */

static inline void count_alloc(int was, void *p)
{
    if (p != NULL && !was && mg_acct_enabled())
        native_count_alloc(mg_usable_size(p), p);
}
#define COUNT_ALLOC(was, p) count_alloc((was), (p))

/* The same for NumPy's own calls (variant 2, the NumPy route): domain NUMPY. */
static inline void count_alloc_np(int was, void *p)
{
    if (p != NULL && !was && mg_acct_enabled())
        mg_hooks_count_alloc_at(MG_DOMAIN_NUMPY, mg_usable_size(p), p, native_line);
}

/* ---- the common path on glibc's malloc ----------------------------------------------
 * With glibc's malloc family below (mg_usable_glibc), the real call needs no guard: glibc
 * reaches its helpers by internal calls, never through a patched GOT slot, and the
 * counting step allocates nothing (MG_HOOKSAFE), so no hook can run inside either. A block's size is read from its chunk header, and free calls the real
 * function last, as a tail call (sqlite's row-sized blocks: bench/overhead.py --callgrind,
 * sqlite_insert). The counting is the shared step of every hook (mg_hooks.h). */

/* Count p (not NULL, just allocated) on the glibc path. */
static inline void glibc_count_alloc(void *p)
{
    if (mg_acct_enabled())
        native_count_alloc(mg_usable_from_header(p), p);
}

/* malloc under another allocator: the guard held across the real call. Out of line, so
 * that nat_malloc's glibc path saves no more registers than it uses. */
static __attribute__((noinline)) void *nat_malloc_guarded(size_t n)
{
    int was = mg_reentry_enter();
    void *p = r_malloc(n);

    COUNT_ALLOC(was, p);
    mg_reentry_leave(was);
    return p;
}

static void *nat_malloc(size_t n)
{
    if (t_mg.in_hook) /* nested in another memguard hook (PyMem RAW, NEP 49): a tail call */
        return r_malloc(n);
    if (!mg_usable_glibc())
        return nat_malloc_guarded(n);
    void *p = r_malloc(n);

    if (p != NULL)
        glibc_count_alloc(p);
    return p;
}

/* The refusing wrappers' first step: 1 when native_refuse refuses n bytes, with the
 * reentry guard left and errno ENOMEM, as a failed malloc leaves it. */
static int refused(int was, size_t n)
{
    if (!native_refuse(was, n))
        return 0;
    mg_reentry_leave(was);
    errno = ENOMEM;
    return 1;
}

/* An allocator of one size argument (malloc, valloc, pvalloc): count it and, from the
 * refusing wrappers, refuse it first (native_refuse). */
static void *sized_common(malloc_fn fn, size_t n, int refusing)
{
    int was = mg_reentry_enter();
    void *p;

    if (refusing && refused(was, n))
        return NULL;
    p = fn(n);
    COUNT_ALLOC(was, p);
    mg_reentry_leave(was);
    return p;
}

static void *nat_malloc_r(size_t n) { return sized_common(r_malloc, n, 1); }

static void *nat_calloc(size_t k, size_t n)
{
    if (t_mg.in_hook)
        return r_calloc(k, n);
    if (mg_usable_glibc()) { /* calloc is rarer: one function for both paths */
        void *p = r_calloc(k, n);

        if (p != NULL)
            glibc_count_alloc(p);
        return p;
    }
    int was = mg_reentry_enter();
    void *p = r_calloc(k, n);

    COUNT_ALLOC(was, p);
    mg_reentry_leave(was);
    return p;
}

static void *nat_calloc_r(size_t k, size_t n)
{
    int was = mg_reentry_enter();
    void *p;

    if ((n == 0 || k <= SIZE_MAX / n) && refused(was, k * n))
        return NULL;
    p = r_calloc(k, n);
    COUNT_ALLOC(was, p);
    mg_reentry_leave(was);
    return p;
}

static void *realloc_common(void *ptr, size_t n, int refusing, mg_domain_t d)
{
    int was = mg_reentry_enter();
    int count = mg_hooks_counting(was);
    size_t old;
    void *p;

    if (refusing && count && ptr != NULL) {
        size_t cur = mg_usable_size(ptr);

        if (n > cur && refused(was, n - cur))
            return NULL; /* the old block stays valid */
    } else if (refusing && count && refused(was, n)) {
        return NULL;
    }
    old = mg_hooks_realloc_old(count, ptr);
    p = r_realloc(ptr, n);
    if (p == NULL && n == 0 && ptr != NULL) {
        /* realloc(p, 0) freed p (glibc): count the free */
        if (count)
            mg_hooks_free_bytes(d, old);
    } else if (p != NULL && count) {
        /* free(old) + alloc(new); the old block's site was settled by realloc_old */
        mg_hooks_free_bytes(d, old);
        mg_hooks_count_alloc_at(d, mg_usable_size(p), p, native_line);
    }
    mg_reentry_leave(was);
    return p;
}

static void *nat_realloc(void *ptr, size_t n)
{
    if (t_mg.in_hook)
        return r_realloc(ptr, n);
    return realloc_common(ptr, n, 0, MG_DOMAIN_NATIVE);
}

static void *nat_realloc_r(void *ptr, size_t n)
{
    return realloc_common(ptr, n, 1, MG_DOMAIN_NATIVE);
}

static void *nat_reallocarray(void *ptr, size_t k, size_t n)
{
    if (n != 0 && k > SIZE_MAX / n) {
        errno = ENOMEM;
        return NULL;
    }
    return realloc_common(ptr, k * n, 0, MG_DOMAIN_NATIVE);
}

static void *nat_reallocarray_r(void *ptr, size_t k, size_t n)
{
    if (n != 0 && k > SIZE_MAX / n) {
        errno = ENOMEM;
        return NULL;
    }
    return realloc_common(ptr, k * n, 1, MG_DOMAIN_NATIVE);
}

/* free under another allocator (nat_malloc_guarded's twin). */
static __attribute__((noinline)) void nat_free_guarded(void *ptr)
{
    int was = mg_reentry_enter();

    mg_hooks_before_free(was, MG_DOMAIN_NATIVE, ptr); /* before the real free */
    r_free(ptr);
    mg_reentry_leave(was);
}

static void nat_free(void *ptr)
{
    if (ptr == NULL) /* free(NULL) does nothing (C11 7.22.3.3) */
        return;
    if (t_mg.in_hook) {
        r_free(ptr);
        return;
    }
    if (!mg_usable_glibc()) {
        nat_free_guarded(ptr);
        return;
    }
    if (mg_acct_enabled()) /* before the real free: the address cannot be reused */
        mg_hooks_count_free(MG_DOMAIN_NATIVE, mg_usable_from_header(ptr), ptr);
    r_free(ptr);
}

/* ---- NumPy's own calls (variant 2: the NumPy route, mg_native.h) -------------------------
 * NumPy's default NEP 49 handler calls these through its object's GOT. Nested in the
 * "memguard" handler's counting path (raise mode, or no route) they pass through, as every
 * variant does; on the route they count the block as NumPy data. Each records in t_mg.probe
 * that it ran, for the route's probe (mg_hooks_numpy_route). */

static inline void probe_mark(unsigned bit)
{
    if (t_mg.probe)
        t_mg.probe |= bit;
}

/* A request the handler would have judged reaches these un-nested while the handler's
 * entries are NumPy's own (mg_hooks_numpy_refresh): warn mode's flag for a request beyond
 * the limit is given here (the handler's wrappers, active in raise mode, judge and refuse
 * there, and these run nested). Also for NumPy's other large requests (its buffers), which
 * are allowed as before. */
static inline void np_flag(size_t n)
{
    if (n >= MG_SMALL_REQUEST && mg_acct_enabled() && !mg_acct_raise())
        mg_hooks_flag_request(n, native_line);
}

/* The same for a realloc to n bytes: its growth over the block's usable size. */
static inline void np_flag_growth(void *ptr, size_t n)
{
    if (n >= MG_SMALL_REQUEST) {
        size_t cur = ptr != NULL ? mg_usable_size(ptr) : 0;

        if (n > cur)
            np_flag(n - cur);
    }
}

/* The shared bodies: fn is the real function (the C library's, or CPython's RAW one). */
static inline void *np_alloc(malloc_fn fn, size_t n)
{
    if (t_mg.in_hook)
        return fn(n);
    int was = mg_reentry_enter();
    np_flag(n);
    void *p = fn(n);

    probe_mark(MG_PROBE_MALLOC);
    count_alloc_np(was, p);
    mg_reentry_leave(was);
    return p;
}

static inline void *np_zalloc(calloc_fn fn, size_t k, size_t n)
{
    if (t_mg.in_hook)
        return fn(k, n);
    int was = mg_reentry_enter();
    if (n == 0 || k <= SIZE_MAX / n) /* an overflowing product fails in fn */
        np_flag(k * n);
    void *p = fn(k, n);

    probe_mark(MG_PROBE_CALLOC);
    count_alloc_np(was, p);
    mg_reentry_leave(was);
    return p;
}

static inline void np_release(free_fn fn, void *ptr)
{
    if (ptr == NULL)
        return;
    if (t_mg.in_hook) {
        fn(ptr);
        return;
    }
    int was = mg_reentry_enter();

    probe_mark(MG_PROBE_FREE);
    mg_hooks_before_free(was, MG_DOMAIN_NUMPY, ptr);
    fn(ptr);
    mg_reentry_leave(was);
}

static void *nat_malloc_np(size_t n) { return np_alloc(r_malloc, n); }
static void *nat_calloc_np(size_t k, size_t n) { return np_zalloc(r_calloc, k, n); }
static void nat_free_np(void *ptr) { np_release(r_free, ptr); }

static void *nat_realloc_np(void *ptr, size_t n)
{
    if (t_mg.in_hook)
        return r_realloc(ptr, n);
    probe_mark(MG_PROBE_REALLOC);
    np_flag_growth(ptr, n);
    return realloc_common(ptr, n, 0, MG_DOMAIN_NUMPY);
}

/* The same for NumPy's calls of CPython's PyMem RAW functions (NumPy 2.5 and later). The
 * RAW wrapper and the malloc wrappers below them see the reentrancy flag and pass through. */
static void *raw_malloc_np(size_t n) { return np_alloc(r_raw_malloc, n); }
static void *raw_calloc_np(size_t k, size_t n) { return np_zalloc(r_raw_calloc, k, n); }

static void *raw_realloc_np(void *ptr, size_t n)
{
    if (t_mg.in_hook)
        return r_raw_realloc(ptr, n);
    int was = mg_reentry_enter();
    int count = mg_hooks_counting(was);

    np_flag_growth(ptr, n);
    size_t old = mg_hooks_realloc_old(count, ptr);
    void *p = r_raw_realloc(ptr, n);

    probe_mark(MG_PROBE_REALLOC);
    /* PyMem_RawRealloc(p, 0) returns a block (never frees without one): the rule of
     * mg_hooks_after_realloc applies as it is. */
    mg_hooks_after_realloc(count, MG_DOMAIN_NUMPY, old, p);
    mg_reentry_leave(was);
    return p;
}

static void raw_free_np(void *ptr) { np_release(r_raw_free, ptr); }

static int memalign_common(void **out, size_t align, size_t n, int refusing)
{
    int was = mg_reentry_enter();
    int rc;

    if (refusing && native_refuse(was, n)) {
        mg_reentry_leave(was);
        return ENOMEM; /* *out untouched, as posix_memalign leaves it on failure */
    }
    rc = r_posix_memalign(out, align, n);
    if (rc == 0)
        COUNT_ALLOC(was, *out);
    mg_reentry_leave(was);
    return rc;
}

static int nat_posix_memalign(void **out, size_t align, size_t n)
{
    return memalign_common(out, align, n, 0);
}

static int nat_posix_memalign_r(void **out, size_t align, size_t n)
{
    return memalign_common(out, align, n, 1);
}

static void *aligned_common(aligned_fn fn, size_t align, size_t n, int refusing)
{
    int was = mg_reentry_enter();
    void *p;

    if (refusing && refused(was, n))
        return NULL;
    p = fn(align, n);
    COUNT_ALLOC(was, p);
    mg_reentry_leave(was);
    return p;
}

static void *nat_aligned_alloc(size_t a, size_t n) { return aligned_common(r_aligned_alloc, a, n, 0); }
static void *nat_aligned_alloc_r(size_t a, size_t n) { return aligned_common(r_aligned_alloc, a, n, 1); }
static void *nat_memalign(size_t a, size_t n) { return aligned_common(r_memalign, a, n, 0); }
static void *nat_memalign_r(size_t a, size_t n) { return aligned_common(r_memalign, a, n, 1); }

static void *nat_valloc(size_t n) { return sized_common(r_valloc, n, 0); }
static void *nat_valloc_r(size_t n) { return sized_common(r_valloc, n, 1); }
static void *nat_pvalloc(size_t n) { return sized_common(r_pvalloc, n, 0); }
static void *nat_pvalloc_r(size_t n) { return sized_common(r_pvalloc, n, 1); }

/* ---- the mmap family ------------------------------------------------------------------ */

/* Counted: anonymous mappings that are not pure reservations (PROT_NONE) and do not replace
 * pages in place (MAP_FIXED). */
static int counts_mapping(int prot, int flags)
{
    return (flags & MAP_ANONYMOUS) && prot != PROT_NONE && !(flags & MAP_FIXED);
}

static void *mmap_common(void *addr, size_t len, int prot, int flags, int fd, off_t off,
                         int refusing)
{
    int was = mg_reentry_enter();
    int count = mg_hooks_counting(was) && counts_mapping(prot, flags);
    void *p;

    if (refusing && count && refused(was, page_round(len)))
        return MAP_FAILED;
    p = r_mmap(addr, len, prot, flags, fd, off);
    if (count && p != MAP_FAILED)
        map_added(p, len);
    mg_reentry_leave(was);
    return p;
}

static void *nat_mmap(void *a, size_t l, int p, int f, int fd, off_t o)
{
    if (t_mg.in_hook) /* pymalloc's arenas, under the arena hook */
        return r_mmap(a, l, p, f, fd, o);
    return mmap_common(a, l, p, f, fd, o, 0);
}

static void *nat_mmap_r(void *a, size_t l, int p, int f, int fd, off_t o)
{
    return mmap_common(a, l, p, f, fd, o, 1);
}

static int nat_munmap(void *addr, size_t len)
{
    if (t_mg.in_hook)
        return r_munmap(addr, len);
    int was = mg_reentry_enter();

    /* Before the real munmap, so the range cannot be mapped again in between. */
    if (mg_hooks_counting(was) && len > 0)
        map_removed((uintptr_t)addr, (uintptr_t)addr + page_round(len));
    int rc = r_munmap(addr, len);
    mg_reentry_leave(was);
    return rc;
}

static void *nat_mremap(void *old, size_t oldlen, size_t newlen, int flags, ...)
{
    int was = mg_reentry_enter();
    void *newaddr = NULL;
    map_rec_t *r = NULL;
    uintptr_t site = 0;
    void *p;

    if (flags & MREMAP_FIXED) {
        va_list ap;

        va_start(ap, flags);
        newaddr = va_arg(ap, void *);
        va_end(ap);
    }
    if (mg_hooks_counting(was) && oldlen > 0)
        r = map_claim_exact((uintptr_t)old, page_round(oldlen));
    if (r != NULL) {
        site = atomic_load_explicit(&r->site, memory_order_relaxed);
        if (site != 0)
            mg_sites_free((void *)site); /* before the kernel may hand the range out again */
    }
    p = (flags & MREMAP_FIXED) ? r_mremap(old, oldlen, newlen, flags, newaddr)
                               : r_mremap(old, oldlen, newlen, flags);
    if (r != NULL) {
        int64_t counted = atomic_load_explicit(&r->counted, memory_order_relaxed);

        /* Its bytes follow it; the next settle measures the new size. */
        if (p == MAP_FAILED)
            map_publish(r, (uintptr_t)old, (uintptr_t)old + page_round(oldlen), 0, counted);
        else
            map_publish(r, (uintptr_t)p, (uintptr_t)p + page_round(newlen),
                        map_site(p, page_round(newlen)), counted);
    }
    mg_reentry_leave(was);
    return p;
}

static void *nat_dlopen(const char *file, int flags);

/* ---- the patch set --------------------------------------------------------------------- */

/* Every symbol, its real function (filled by install) and its two variants. Static
 * storage: elf_patch.c keeps a pointer to it. Written by install (GIL held) before the first
 * patch; read under elf_patch.c's mutex. */
static mg_elf_hook_t s_hooks[] = {
    {"malloc", NULL, {(void *)nat_malloc, (void *)nat_malloc_r, (void *)nat_malloc_np}, NULL},
    {"calloc", NULL, {(void *)nat_calloc, (void *)nat_calloc_r, (void *)nat_calloc_np}, NULL},
    {"realloc", NULL, {(void *)nat_realloc, (void *)nat_realloc_r, (void *)nat_realloc_np}, NULL},
    {"reallocarray", NULL, {(void *)nat_reallocarray, (void *)nat_reallocarray_r}, NULL},
    {"free", NULL, {(void *)nat_free, NULL, (void *)nat_free_np}, NULL},
    {"posix_memalign", NULL, {(void *)nat_posix_memalign, (void *)nat_posix_memalign_r}, NULL},
    {"aligned_alloc", NULL, {(void *)nat_aligned_alloc, (void *)nat_aligned_alloc_r}, NULL},
    {"memalign", NULL, {(void *)nat_memalign, (void *)nat_memalign_r}, NULL},
    {"valloc", NULL, {(void *)nat_valloc, (void *)nat_valloc_r}, NULL},
    {"pvalloc", NULL, {(void *)nat_pvalloc, (void *)nat_pvalloc_r}, NULL},
    {"mmap", NULL, {(void *)nat_mmap, (void *)nat_mmap_r}, NULL},
    {"mmap64", NULL, {(void *)nat_mmap, (void *)nat_mmap_r}, NULL},
    {"munmap", NULL, {(void *)nat_munmap, NULL}, NULL},
    {"mremap", NULL, {(void *)nat_mremap, NULL}, NULL},
    {"dlopen", NULL, {(void *)nat_dlopen, NULL}, NULL},
    /* Only in NumPy's core module (variant 2): elsewhere a RAW call is the RAW hook's. */
    {"PyMem_RawMalloc", NULL, {NULL, NULL, (void *)raw_malloc_np}, NULL},
    {"PyMem_RawCalloc", NULL, {NULL, NULL, (void *)raw_calloc_np}, NULL},
    {"PyMem_RawRealloc", NULL, {NULL, NULL, (void *)raw_realloc_np}, NULL},
    {"PyMem_RawFree", NULL, {NULL, NULL, (void *)raw_free_np}, NULL},
};
static const int s_nhooks = (int)(sizeof(s_hooks) / sizeof(s_hooks[0]));

static const char *base_name(const char *path)
{
    const char *b = strrchr(path, '/');

    return b ? b + 1 : path;
}

/* Which objects get which variant (docs/design.md, "Native memory", refusals): 1 for the
 * objects whose allocation failures become Python exceptions, 2 for NumPy's core module
 * (its malloc family counts as NumPy data: the NumPy route, mg_native.h), -1 for objects
 * never patched (sanitizer and valgrind runtimes, allocators that define malloc
 * themselves). */
static int classify(const char *path)
{
    const char *b = base_name(path);
    static const char *const skip[] = {"libasan", "libtsan", "liblsan", "libubsan", "libhwasan",
                                       "vgpreload", "libjemalloc", "libtcmalloc",
                                       "libmimalloc", "libhoard"};

    for (size_t i = 0; i < sizeof(skip) / sizeof(skip[0]); i++)
        if (strncmp(b, skip[i], strlen(skip[i])) == 0)
            return -1;
    /* Arrow's memory pools (mimalloc/jemalloc built in, or the system allocator) live in
     * libarrow.so; torch's CPU allocator (c10::alloc_cpu, posix_memalign) in libc10.so. */
    if (strncmp(b, "libarrow.so", 11) == 0 || strncmp(b, "libc10.so", 9) == 0)
        return 1;
    /* numpy/_core (NumPy 2) or numpy/core (NumPy 1): the default handler's home. */
    if (strncmp(b, "_multiarray_umath.", 18) == 0)
        return 2;
    return 0;
}

static void *resolve(const char *name)
{
    void *alias;

    return mg_elf_definition(name, &alias);
}

/* ---- dlopen ---------------------------------------------------------------------------- */

/* glibc's dlopen searches the caller's DT_RUNPATH (found from its return address), and our
 * wrapper is the caller the real dlopen sees (memray issues #525, #549). For a bare name, a
 * caller with a RUNPATH/RPATH gets its own search path: the first file in its dlinfo
 * RTLD_DI_SERINFO list that exists is opened by full path. */
static void *open_as_caller(const char *file, int flags, const void *ret)
{
    Dl_info info;
    struct link_map *lm = NULL;
    const ElfW(Dyn) *d;
    int has_path = 0;
    void *caller;
    void *h = NULL;
    union {
        Dl_serinfo si;
        char buf[8192];
    } u;

    if (file == NULL || strchr(file, '/') != NULL)
        return NULL;
    if (!dladdr1(ret, &info, (void **)&lm, RTLD_DL_LINKMAP) || lm == NULL || lm->l_ld == NULL)
        return NULL;
    for (d = lm->l_ld; d->d_tag != DT_NULL; d++)
        if (d->d_tag == DT_RUNPATH || d->d_tag == DT_RPATH)
            has_path = 1;
    if (!has_path)
        return NULL;
    h = r_dlopen(file, RTLD_LAZY | RTLD_NOLOAD);
    if (h != NULL) { /* already loaded under that name: the plain call finds it */
        dlclose(h);
        return NULL;
    }
    caller = r_dlopen(lm->l_name[0] ? lm->l_name : NULL, RTLD_LAZY | RTLD_NOLOAD);
    if (caller == NULL)
        return NULL;
    if (dlinfo(caller, RTLD_DI_SERINFOSIZE, &u.si) == 0 && u.si.dls_size <= sizeof(u.buf) &&
        dlinfo(caller, RTLD_DI_SERINFO, &u.si) == 0) {
        for (unsigned i = 0; i < u.si.dls_cnt && h == NULL; i++) {
            char full[4096];
            const char *dir = u.si.dls_serpath[i].dls_name;
            size_t dl = dir ? strlen(dir) : 0;
            size_t fl = strlen(file);

            if (dl == 0 || dl + fl + 2 > sizeof(full))
                continue;
            memcpy(full, dir, dl);
            full[dl] = '/';
            memcpy(full + dl + 1, file, fl + 1);
            if (access(full, F_OK) == 0)
                h = r_dlopen(full, flags);
        }
    }
    dlclose(caller);
    return h;
}

static void *nat_dlopen(const char *file, int flags)
{
    void *h = open_as_caller(file, flags, __builtin_return_address(0));

    if (h == NULL)
        h = r_dlopen(file, flags);
    if (h != NULL && atomic_load_explicit(&s_installed, memory_order_acquire))
        (void)mg_elf_patch(s_hooks, s_nhooks, classify, (const void *)nat_dlopen);
    return h;
}

int mg_native_install(void)
{
    int rc;

    if (r_malloc == NULL) {
        r_malloc = (malloc_fn)resolve("malloc");
        r_calloc = (calloc_fn)resolve("calloc");
        r_realloc = (realloc_fn)resolve("realloc");
        r_free = (free_fn)resolve("free");
        r_posix_memalign = (posix_memalign_fn)resolve("posix_memalign");
        r_aligned_alloc = (aligned_fn)resolve("aligned_alloc");
        r_memalign = (aligned_fn)resolve("memalign");
        r_valloc = (malloc_fn)resolve("valloc");
        r_pvalloc = (malloc_fn)resolve("pvalloc");
        r_reallocarray = (reallocarray_fn)resolve("reallocarray");
        r_mmap = (mmap_fn)resolve("mmap");
        r_munmap = (munmap_fn)resolve("munmap");
        r_mremap = (mremap_fn)resolve("mremap");
        r_dlopen = (dlopen_fn)resolve("dlopen");
        if (r_malloc == NULL || r_calloc == NULL || r_realloc == NULL || r_free == NULL ||
            r_posix_memalign == NULL || r_mmap == NULL || r_munmap == NULL ||
            r_mremap == NULL || r_dlopen == NULL) {
            r_malloc = NULL;
            errno = ENOSYS;
            return -1;
        }
        (void)r_reallocarray;
        s_hooks[0].real = (void *)r_malloc;
        s_hooks[1].real = (void *)r_calloc;
        s_hooks[2].real = (void *)r_realloc;
        s_hooks[3].real = (void *)r_reallocarray;
        s_hooks[4].real = (void *)r_free;
        s_hooks[5].real = (void *)r_posix_memalign;
        s_hooks[6].real = (void *)r_aligned_alloc;
        s_hooks[7].real = (void *)r_memalign;
        s_hooks[8].real = (void *)r_valloc;
        s_hooks[9].real = (void *)r_pvalloc;
        s_hooks[10].real = (void *)r_mmap;
        s_hooks[11].real = resolve("mmap64");
        s_hooks[12].real = (void *)r_munmap;
        s_hooks[13].real = (void *)r_mremap;
        s_hooks[14].real = (void *)r_dlopen;
        /* Absent outside a Python process (the C tests): those slots are never patched. */
        r_raw_malloc = (malloc_fn)resolve("PyMem_RawMalloc");
        r_raw_calloc = (calloc_fn)resolve("PyMem_RawCalloc");
        r_raw_realloc = (realloc_fn)resolve("PyMem_RawRealloc");
        r_raw_free = (free_fn)resolve("PyMem_RawFree");
        if (r_raw_malloc == NULL || r_raw_calloc == NULL || r_raw_realloc == NULL ||
            r_raw_free == NULL) {
            r_raw_malloc = NULL;
            r_raw_calloc = NULL;
            r_raw_realloc = NULL;
            r_raw_free = NULL;
        }
        s_hooks[15].real = (void *)r_raw_malloc;
        s_hooks[16].real = (void *)r_raw_calloc;
        s_hooks[17].real = (void *)r_raw_realloc;
        s_hooks[18].real = (void *)r_raw_free;
        for (int i = 0; i < s_nhooks; i++) {
            void *alias = NULL;

            if (s_hooks[i].real != NULL)
                (void)mg_elf_definition(s_hooks[i].name, &alias);
            s_hooks[i].alias = alias;
        }
    }
    /* A symbol this libc lacks (NULL real) is never bound in any slot, so never patched. */
    if (!atomic_load_explicit(&s_installed, memory_order_relaxed))
        maps_reset();
    atomic_store_explicit(&s_cell_thread, pthread_self(), memory_order_relaxed);
    atomic_store_explicit(&s_cell_thread_set, 1, memory_order_relaxed);
    atomic_store_explicit(&s_installed, 1, memory_order_release);
    rc = mg_elf_patch(s_hooks, s_nhooks, classify, (const void *)mg_native_install);
    if (rc < 0)
        atomic_store_explicit(&s_installed, 0, memory_order_release);
    return rc;
}

int mg_native_uninstall(void)
{
    atomic_store_explicit(&s_installed, 0, memory_order_release);
    return mg_elf_unpatch();
}

int mg_native_installed(void)
{
    return atomic_load_explicit(&s_installed, memory_order_relaxed);
}

void mg_native_stats(mg_native_stats_t *out)
{
    mg_elf_stats_t st;

    mg_elf_stats(&st);
    out->mappings = atomic_load_explicit(&s_maps_live, memory_order_relaxed);
    out->map_dropped = atomic_load_explicit(&s_maps_dropped, memory_order_relaxed);
    out->slots = st.patched;
    out->objects = st.objects;
    out->failed = st.failed;
}
