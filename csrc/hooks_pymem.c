/* Owns the wrappers of the PyMem RAW domain and of the pymalloc arena allocator. RAW runs
 * in any thread, with or without the GIL; arenas under the GIL. Install/uninstall: GIL. */

#include "mg_acct.h"
#include "mg_reentry.h"
#include "mg_hooks.h"

#include <malloc.h>
#include <stdatomic.h>
#include <string.h>

/* The RAW allocators we wrapped, one slot per distinct allocator below us. A RAW call runs
 * in any thread without the GIL, so a saved allocator is never rewritten once a wrapper
 * can reach it: each wrap fills a slot nobody reads yet (or reuses one that already holds
 * the same allocator, writing nothing), publishes it (release store of `published`), and
 * passes it as the wrapper's ctx; the wrapper reads `published` (acquire) and calls
 * through it. Slots are never freed or cleared: a wrapper still in a chain after uninstall
 * keeps calling through its own. Written by install (GIL held); read by the wrappers. */
#define RAW_SLOTS 16
typedef struct raw_slot {
    PyMemAllocatorEx saved;                      /* written once, before published */
    _Atomic(const PyMemAllocatorEx *) published; /* &saved once filled, else NULL */
} raw_slot_t;
static raw_slot_t s_raw_slots[RAW_SLOTS];
static unsigned s_raw_slots_used = 0; /* GIL held */
/* The arena allocator we wrap, passed as ctx. Arena calls run with the GIL held, as
 * install does, so rewriting it on a later install races nothing. */
static PyObjectArenaAllocator s_prev_arena;
/* The RAW slot of our wrapper now installed (for uninstall). GIL held. */
static raw_slot_t *s_raw_current = NULL;
/* Whether our wrapper is somewhere in the RAW / arena chain. GIL held (install/uninstall). */
static int s_raw_wrapped = 0;
static int s_arena_wrapped = 0;
/* Set by install before a probe allocation; raw_malloc turns 1 into 2, so install can tell
 * whether our RAW wrapper is still in the chain. Thread-local: only the probing thread. */
static MG_TLS int t_probe = 0;

/* RAW blocks are measured with malloc_usable_size (mg_hooks_after_alloc), which needs the
 * RAW chain below us to hand out malloc'd pointers: that is why the Python side refuses to
 * load under PYTHONMALLOC=debug (the debug hooks offset pointers). */
/* The allocator below the wrapper whose ctx is this slot: acquire pairs with install's
 * release, so its fields are seen whole. A ctx reaches a RAW call only through the
 * allocator install set after publishing, so it is never NULL here. Hook-safe. */
static inline const PyMemAllocatorEx *raw_prev(void *ctx)
{
    return atomic_load_explicit(&((raw_slot_t *)ctx)->published, memory_order_acquire);
}

/* Each wrapper's first test: a call nested in another memguard hook (NumPy's RAW calls
 * through the route's wrappers, csrc/hooks_native.c; memguard's own allocations) is a bare
 * call below, as nothing is counted or refused there (small_arrays, bench/overhead.py
 * --callgrind: the nested calls' saved registers and checks were 5 % of memguard's
 * instructions). */
static void *raw_malloc(void *ctx, size_t n)
{
    const PyMemAllocatorEx *prev = raw_prev(ctx);

    if (t_mg.in_hook)
        return prev->malloc(prev->ctx, n);
    int was = mg_reentry_enter();
    void *p;

    if (mg_hooks_refuse_heap(was, n)) { /* raise mode, within the limit's reserve */
        mg_reentry_leave(was);
        return NULL;
    }
    p = prev->malloc(prev->ctx, n);
    if (t_probe)
        t_probe = 2;
    mg_hooks_after_alloc(was, MG_DOMAIN_RAW, p);
    mg_reentry_leave(was);
    return p;
}

static void *raw_calloc(void *ctx, size_t nelem, size_t elsize)
{
    const PyMemAllocatorEx *prev = raw_prev(ctx);

    if (t_mg.in_hook)
        return prev->calloc(prev->ctx, nelem, elsize);
    return mg_hooks_calloc(MG_DOMAIN_RAW, mg_hooks_refuse_heap, prev->calloc, prev->ctx, nelem,
                           elsize);
}

static void *raw_realloc(void *ctx, void *ptr, size_t n)
{
    const PyMemAllocatorEx *prev = raw_prev(ctx);

    if (t_mg.in_hook)
        return prev->realloc(prev->ctx, ptr, n);
    return mg_hooks_realloc(MG_DOMAIN_RAW, mg_hooks_refuse_heap, prev->realloc, prev->ctx, ptr,
                            n);
}

static void raw_free(void *ctx, void *ptr)
{
    const PyMemAllocatorEx *prev;
    int was;

    /* PyMem_RawFree(NULL) does nothing (its documented contract), and NumPy calls it that
     * way for every array without dimensions: 3 of 4 RAW frees in small_arrays (callgrind). */
    if (ptr == NULL)
        return;
    prev = raw_prev(ctx);
    if (t_mg.in_hook) {
        prev->free(prev->ctx, ptr);
        return;
    }
    was = mg_reentry_enter();

    mg_hooks_before_free(was, MG_DOMAIN_RAW, ptr);
    prev->free(prev->ctx, ptr);
    mg_reentry_leave(was);
}

static void *arena_alloc(void *ctx, size_t n)
{
    PyObjectArenaAllocator *prev = ctx;
    int was = mg_reentry_enter();
    void *p;

    /* A refused arena: pymalloc falls back to PyMem_RawMalloc, judged by raw_malloc. */
    if (mg_hooks_refuse_heap(was, n)) {
        mg_reentry_leave(was);
        return NULL;
    }
    p = prev->alloc(prev->ctx, n);

    /* Arenas come from mmap, not malloc: count the size CPython asked for. */
    if (p != NULL && !was && mg_acct_enabled())
        mg_hooks_count_alloc(MG_DOMAIN_ARENA, n, p);
    mg_reentry_leave(was);
    return p;
}

static void arena_free(void *ctx, void *ptr, size_t n)
{
    PyObjectArenaAllocator *prev = ctx;
    int was = mg_reentry_enter();

    if (ptr != NULL && !was && mg_acct_enabled())
        mg_hooks_count_free(MG_DOMAIN_ARENA, n, ptr);
    prev->free(prev->ctx, ptr, n);
    mg_reentry_leave(was);
}

/* Whether a RAW allocation still passes through raw_malloc. tracemalloc.stop() puts back
 * the allocator tracemalloc saved when it started, which drops a wrapper installed after
 * it (Python/tracemalloc.c tracemalloc_stop), so "installed once" is not "still there". */
static int pymem_raw_in_chain(void)
{
    int was = t_mg.in_hook;
    int seen;
    void *p;

    /* raw_malloc marks the probe on its counting path only, which a nested call skips:
     * probe with the guard open (install runs from Python, where it is open anyway). */
    t_mg.in_hook = 0;
    t_probe = 1;
    p = PyMem_RawMalloc(16);
    PyMem_RawFree(p);
    seen = t_probe == 2;
    t_probe = 0;
    t_mg.in_hook = was;
    return seen;
}

int mg_hooks_pymem_install(void)
{
    int rewrapped = 0;

    if (s_raw_wrapped && !pymem_raw_in_chain()) {
        s_raw_wrapped = 0;
        rewrapped = 1;
    }
    if (!s_raw_wrapped) {
        PyMemAllocatorEx mine;
        PyMemAllocatorEx below;
        raw_slot_t *slot = NULL;

        PyMem_GetAllocator(PYMEM_DOMAIN_RAW, &below);
        for (unsigned i = 0; i < s_raw_slots_used && slot == NULL; i++)
            if (memcmp(&s_raw_slots[i].saved, &below, sizeof(below)) == 0)
                slot = &s_raw_slots[i];
        if (slot == NULL && s_raw_slots_used < RAW_SLOTS) {
            slot = &s_raw_slots[s_raw_slots_used++];
            slot->saved = below;
            atomic_store_explicit(&slot->published, &slot->saved, memory_order_release);
        }
        if (slot == NULL)
            goto arena; /* 16 distinct allocators below us: RAW stays unwrapped (uncounted) */
        s_raw_current = slot;
        mine.ctx = slot;           /* the allocator we wrap */
        mine.malloc = raw_malloc;  /* counts malloc_usable_size after success */
        mine.calloc = raw_calloc;  /* same */
        mine.realloc = raw_realloc; /* free(old) + alloc(new) on success */
        mine.free = raw_free;      /* counts before the real free */
        PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &mine);
        s_raw_wrapped = 1;
    }
arena:
    if (!s_arena_wrapped) {
        PyObjectArenaAllocator mine;

        PyObject_GetArenaAllocator(&s_prev_arena);
        mine.ctx = &s_prev_arena; /* the arena allocator we wrap */
        mine.alloc = arena_alloc; /* counts the arena size after success */
        mine.free = arena_free;   /* counts the size CPython passes, before the real free */
        PyObject_SetArenaAllocator(&mine);
        s_arena_wrapped = 1;
    }
    return rewrapped;
}

int mg_hooks_pymem_uninstall(void)
{
    int restored = 0;
    PyMemAllocatorEx raw;
    PyObjectArenaAllocator arena;

    PyMem_GetAllocator(PYMEM_DOMAIN_RAW, &raw);
    if (s_raw_wrapped && raw.malloc == raw_malloc && s_raw_current != NULL) {
        PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &s_raw_current->saved);
        s_raw_wrapped = 0;
        restored++;
    }
    PyObject_GetArenaAllocator(&arena);
    if (s_arena_wrapped && arena.alloc == arena_alloc) {
        PyObject_SetArenaAllocator(&s_prev_arena);
        s_arena_wrapped = 0;
        restored++;
    }
    return restored;
}
