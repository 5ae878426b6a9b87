/* The allocator hooks: PyMem RAW domain and pymalloc arenas (csrc/hooks_pymem.c), NumPy's
 * NEP 49 handler (csrc/hooks_numpy.c), and the counting step they share (csrc/hooks.c).
 * Hooks run in any thread, with or without the GIL. */
#ifndef MEMGUARD_MG_HOOKS_H
#define MEMGUARD_MG_HOOKS_H

#include <Python.h>
#include <malloc.h>
#include <stddef.h>

#include "mg_acct.h"
#include "mg_batch.h"
#include "mg_frames.h"
#include "mg_sites.h"
#include "mg_usable.h"

#include "memguard.h"

/* Push an event of `kind` for the running cell to the ring (its epoch, the cell usage now
 * and the time filled in); a full ring counts the drop itself. `line` -1 if unknown; `count`
 * is kind-specific (the mg_refusal_t of an MG_KIND_REFUSED, else 0). Any thread. Hook-safe. */
MG_HOOKSAFE void mg_hooks_push(uint32_t kind, int32_t line, int64_t bytes, int64_t count);

/* Decide, before a NumPy allocation of n bytes is made, whether it must fail: in raise
 * mode, when it would take the cell over its budget or the process over its limit
 * (mg_acct_check_request); the refusal is recorded (mg_acct_note_refusal, for the
 * MemoryError message) and an MG_KIND_REFUSED event pushed. In warn mode a request beyond
 * the limit is flagged (MG_KIND_LIMIT_REQUEST, once per cell) and allowed. Returns 1 to
 * refuse. Only for allocations whose callers handle NULL (NumPy raises MemoryError).
 * `was` as from mg_reentry_enter: nested calls are never refused. Hook-safe. */
MG_HOOKSAFE MG_SLOWPATH int mg_hooks_refuse_slow(size_t n);

/* Flag a request of n bytes as warn mode does (one MG_KIND_LIMIT_REQUEST record per cell,
 * charged to line_of()) when mg_acct_request_over_limit(n); never refuses. For the NumPy
 * route's wrappers (csrc/hooks_native.c), which see NumPy's requests while its handler's
 * entries are NumPy's own (mg_hooks_numpy_refresh). Hook-safe. */
MG_HOOKSAFE MG_SLOWPATH void mg_hooks_flag_request(size_t n, int32_t (*line_of)(void));
MG_HOOKSAFE static inline int mg_hooks_refuse(int was, size_t n)
{
    /* Inline, the common case: warn mode and a request below MG_SMALL_REQUEST, which
     * mg_acct_check_request never flags there. */
    if (was || !mg_acct_enabled() || (n < MG_SMALL_REQUEST && !mg_acct_raise()))
        return 0;
    return mg_hooks_refuse_slow(n);
}

/* The same for a Python-heap request (a RAW block, or a pymalloc arena: pymalloc then falls
 * back to RAW, which refuses too, and CPython raises MemoryError): in raise mode only, only
 * for the limit (mg_acct_check_limit), and only while the cell's own code is running on
 * this thread (mg_frames_cell_line finds its line; never without the GIL). Returns 1 to
 * refuse. Hook-safe. */
MG_HOOKSAFE MG_SLOWPATH int mg_hooks_refuse_heap_slow(size_t n);
MG_HOOKSAFE static inline int mg_hooks_refuse_heap(int was, size_t n)
{
    /* Inline, the common case: outside raise mode nothing is judged. */
    if (was || !mg_acct_enabled() || !mg_acct_raise())
        return 0;
    return mg_hooks_refuse_heap_slow(n);
}

/* The counting step of every hook, for a block p of n bytes in domain d (n as measured:
 * mg_usable_size, or the size CPython passes for an arena). A block below the
 * attribution threshold (mg_sites_threshold) goes into this thread's batch (mg_batch.h):
 * a few thread-local instructions, the common case. A block of at least the threshold is
 * counted at once, attributed to the line line_of() returns (mg_frames_cell_line; the
 * native hooks pass their own) and recorded in mg_sites, which applies the accumulation
 * rule. When the count makes the running cell cross its budget, an MG_KIND_BUDGET event goes
 * to the ring with that line. Hook-safe. */
MG_HOOKSAFE MG_SLOWPATH void mg_hooks_count_alloc_slow(mg_domain_t d, size_t n, void *p,
                                           int32_t (*line_of)(void));
MG_HOOKSAFE static inline void mg_hooks_count_alloc_at(mg_domain_t d, size_t n, void *p,
                                                      int32_t (*line_of)(void))
{
    if (n < mg_sites_threshold() && mg_batch_alloc(d, n))
        return;
    mg_hooks_count_alloc_slow(d, n, p, line_of);
}

MG_HOOKSAFE static inline void mg_hooks_count_alloc(mg_domain_t d, size_t n, void *p)
{
    mg_hooks_count_alloc_at(d, n, p, mg_frames_cell_line);
}

/* Take n bytes of domain d off the count (no site: the caller settled it). Hook-safe. */
MG_HOOKSAFE static inline void mg_hooks_free_bytes(mg_domain_t d, size_t n)
{
    if (!mg_batch_free(d, n))
        mg_batch_move_free(d, n);
}

/* Count the free of p, n bytes in domain d, and take it off its site. Call before the real
 * free, so the address cannot be reused in between. As for allocations, a block below the
 * threshold leaves this thread's batch inline; a larger one, or a batch at its room, takes
 * the out-of-line slow path (the site table's lookup stays out of every hook's body).
 * Hook-safe. */
MG_HOOKSAFE MG_SLOWPATH void mg_hooks_count_free_slow(mg_domain_t d, size_t n, void *p);
MG_HOOKSAFE static inline void mg_hooks_count_free(mg_domain_t d, size_t n, void *p)
{
    if (n < mg_sites_threshold() && mg_batch_free(d, n))
        return;
    mg_hooks_count_free_slow(d, n, p);
}

/* The counting rule every malloc-backed wrapper follows, in one place. `was` is what
 * mg_reentry_enter returned: a nested call (was != 0) or disabled counting counts nothing.
 * Blocks are measured with mg_usable_size (malloc_usable_size's figure, include/mg_usable.h)
 * on both ends, so alloc and free always agree even when a caller's size arguments drift
 * (docs/design.md, Allocator hooks: exact against mallinfo2); that needs the allocator
 * below to hand out malloc'd pointers. All hook-safe. */
MG_HOOKSAFE static inline void mg_hooks_after_alloc(int was, mg_domain_t d, void *p)
{
    /* p may be NULL */
    if (p != NULL && !was && mg_acct_enabled())
        mg_hooks_count_alloc(d, mg_usable_size(p), p);
}

MG_HOOKSAFE static inline void mg_hooks_before_free(int was, mg_domain_t d, void *ptr)
{
    /* ptr may be NULL */
    if (ptr != NULL && !was && mg_acct_enabled())
        mg_hooks_count_free(d, mg_usable_size(ptr), ptr);
}

/* For realloc, decided once so the old and new blocks are counted alike even if counting is
 * switched off meanwhile: mg_hooks_counting says whether to count (not nested, enabled);
 * mg_hooks_realloc_old reads the old block's size before the real realloc (0 when not
 * counting) and takes it off its site; mg_hooks_after_realloc counts free(old) +
 * alloc(new) once it succeeded. */
MG_HOOKSAFE int mg_hooks_counting(int was);
MG_HOOKSAFE size_t mg_hooks_realloc_old(int count, void *ptr);
MG_HOOKSAFE void mg_hooks_after_realloc(int count, mg_domain_t d, size_t old, void *p);

/* The whole realloc wrapper of an allocator domain whose realloc takes a ctx (PyMem RAW,
 * NEP 49): refuse growth by n - usable size with `refuse` (mg_hooks_refuse or
 * mg_hooks_refuse_heap; the old block then stays valid, as after a failed realloc), else
 * call real(ctx, ptr, n) and count it as above. Hook-safe. */
MG_HOOKSAFE void *mg_hooks_realloc(mg_domain_t d, int (*refuse)(int was, size_t n),
                                   void *(*real)(void *ctx, void *ptr, size_t n), void *ctx,
                                   void *ptr, size_t n);

/* The whole calloc wrapper of such a domain: refuse nelem * elsize bytes with `refuse`
 * (an overflowing product is not refused but left to real, which fails it), else call
 * real(ctx, nelem, elsize) and count the block as mg_hooks_after_alloc does. Hook-safe. */
MG_HOOKSAFE void *mg_hooks_calloc(mg_domain_t d, int (*refuse)(int was, size_t n),
                                  void *(*real)(void *ctx, size_t nelem, size_t elsize),
                                  void *ctx, size_t nelem, size_t elsize);

/* Wrap the PyMem RAW allocator and the pymalloc arena allocator, saving the previous ones
 * as the wrappers' ctx. Idempotent: wrappers still in the chain (even under another layer
 * that stacked on top, such as tracemalloc started later) are not wrapped again; a RAW
 * wrapper that fell out of the chain (tracemalloc started earlier, then stopped, restores
 * what it saved) is detected with a probe allocation and wrapped again. Returns 1 when it
 * had to wrap RAW again, else 0. GIL held. */
int mg_hooks_pymem_install(void);

/* Put back the allocators saved by install, for each one only if ours is still the one
 * installed; otherwise someone stacked on top of us, so ours stays in place (passing calls
 * through once counting is disabled). Returns the number of allocators restored (0-2).
 * GIL held. */
int mg_hooks_pymem_uninstall(void);

/* Make NumPy's default NEP 49 handler capsule point to the "memguard" handler, which wraps
 * a copy of the handler it replaced. Patching the default capsule, rather than setting a
 * ContextVar with PyDataMem_SetHandler, reaches threads and contexts that never inherit
 * the ContextVar (docs/design.md, NumPy NEP 49 handler). Never undone: arrays keep a reference
 * to the capsule and free through it. Returns 0 when the current context's handler is
 * memguard's, 1 when this context uses another, non-default handler (then its arrays are
 * not counted), -1 with a Python exception set (NumPy missing or older than 1.22). GIL
 * held. */
int mg_hooks_numpy_install(void);

/* Turn the NumPy route (include/mg_native.h) on or off. On: only when the handler is
 * installed and the native wrappers are, and when a probe through the handler memguard wraps
 * (malloc, realloc, free and calloc of 4 KiB, past NumPy's cache) reached the variant-2
 * wrapper of each of the four; the probe's blocks are counted and freed. Off (on = 0):
 * before the native wrappers are removed, so that NumPy's calls are counted by the
 * handler again. Returns 1 when the route is on. GIL held. */
int mg_hooks_numpy_route(int on);

/* 1 while the NumPy route is on. Any thread (relaxed). */
int mg_hooks_numpy_routed(void);

/* Point the "memguard" handler's malloc, realloc and free at NumPy's own entries while the
 * route is on outside raise mode (NumPy's calls then reach no memguard code before the
 * route's wrappers), at memguard's wrappers otherwise (csrc/hooks_numpy.c, s_handler).
 * Called by mg_hooks_numpy_route and after every change of raise mode. GIL held. */
void mg_hooks_numpy_refresh(void);

/* 1 while the handler's entries are NumPy's own (mg_hooks_numpy_refresh). GIL held. */
int mg_hooks_numpy_passing(void);

#endif /* MEMGUARD_MG_HOOKS_H */
