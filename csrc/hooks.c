/* Owns the counting step shared by every allocator hook: bytes into mg_acct, blocks at or
 * above the attribution threshold into mg_sites with their cell line, and a budget event
 * into the ring on the first crossing in a cell. Any thread, with or without the GIL. */
#include <malloc.h>
#include <stdint.h>
#include <stdatomic.h>

#include "mg_acct.h"
#include "mg_batch.h"
#include "mg_frames.h"
#include "mg_hooks.h"
#include "mg_reentry.h"
#include "mg_ring.h"
#include "mg_sites.h"

/* Line not read yet: mg_frames_cell_line returns -1 for "unknown", never -2. */
#define LINE_UNREAD (-2)

/* The epoch in which a request beyond the limit was last flagged (warn mode), so it is
 * flagged once per cell. Hooks (CAS). */
static _Atomic int64_t s_flagged_epoch = 0;

MG_HOOKSAFE void mg_hooks_push(uint32_t kind, int32_t line, int64_t bytes, int64_t count)
{
    mg_event_t ev;

    ev.kind = kind;
    ev.line = line;
    ev.epoch = mg_acct_epoch();
    ev.bytes = bytes;
    ev.usage = mg_acct_cell_usage();
    ev.count = count;
    ev.t = mg_ring_now();
    (void)mg_ring_push(&ev); /* a full ring counts the drop itself */
}

/* Warn mode's answer to a request beyond the limit: one MG_KIND_LIMIT_REQUEST record per
 * cell (the first request of the cell to be flagged wins the CAS). */
static void flag_once(size_t n, int32_t line)
{
    int64_t epoch = mg_acct_epoch();
    int64_t seen = atomic_load_explicit(&s_flagged_epoch, memory_order_relaxed);

    if (seen != epoch && atomic_compare_exchange_strong_explicit(
                             &s_flagged_epoch, &seen, epoch, memory_order_relaxed,
                             memory_order_relaxed))
        mg_hooks_push(MG_KIND_LIMIT_REQUEST, line, (int64_t)n, 0);
}

MG_HOOKSAFE MG_SLOWPATH void mg_hooks_flag_request(size_t n, int32_t (*line_of)(void))
{
    if (mg_acct_request_over_limit(n))
        flag_once(n, line_of());
}

MG_HOOKSAFE MG_SLOWPATH int mg_hooks_refuse_slow(size_t n)
{
    mg_refusal_t why;
    int32_t line;

    why = mg_acct_check_request(n);
    if (why == MG_REFUSE_NONE)
        return 0;
    line = mg_frames_cell_line();
    if (why == MG_REFUSE_LIMIT && !mg_acct_raise()) {
        flag_once(n, line);
        return 0;
    }
    mg_acct_note_refusal(n, why, line);
    mg_hooks_push(MG_KIND_REFUSED, line, (int64_t)n, (int64_t)why);
    return 1;
}

MG_HOOKSAFE MG_SLOWPATH int mg_hooks_refuse_heap_slow(size_t n)
{
    int32_t line;

    if (mg_acct_check_limit(n) == MG_REFUSE_NONE)
        return 0;
    /* Rare path (within the reserve of the limit): one frame walk. Only the cell's own
     * code is refused; the kernel's machinery, memguard's relay and the error's handling
     * after the cell's code unwound run on the reserve (docs/design.md, "Limits and
     * measures"). */
    line = mg_frames_cell_line();
    if (line < 1)
        return 0;
    mg_acct_note_refusal(n, MG_REFUSE_LIMIT, line);
    mg_hooks_push(MG_KIND_REFUSED, line, (int64_t)n, (int64_t)MG_REFUSE_LIMIT);
    return 1;
}

MG_HOOKSAFE MG_SLOWPATH void mg_hooks_count_alloc_slow(mg_domain_t d, size_t n, void *p,
                                           int32_t (*line_of)(void))
{
    int32_t line = LINE_UNREAD;
    int crossed;

    if (n < mg_sites_threshold()) {
        /* A small block whose batch is full: the batch moves to the counters. */
        crossed = mg_batch_move_alloc(d, n);
    } else {
        /* Rare path: blocks of at least the threshold (one frame walk each, only with the
         * GIL: mg_frames_cell_line checks) are counted at once and recorded with their
         * site. */
        crossed = mg_acct_alloc(d, n);
        line = line_of();
        mg_sites_alloc(p, n, mg_acct_epoch(), line);
    }
    if (!crossed)
        return;
    /* Rarer still: once per cell. */
    mg_hooks_push(MG_KIND_BUDGET, line == LINE_UNREAD ? line_of() : line, (int64_t)n, 0);
}

MG_HOOKSAFE MG_SLOWPATH void mg_hooks_count_free_slow(mg_domain_t d, size_t n, void *p)
{
    if (n >= mg_sites_threshold())
        mg_sites_free(p);
    mg_hooks_free_bytes(d, n);
}

MG_HOOKSAFE int mg_hooks_counting(int was)
{
    return !was && mg_acct_enabled();
}

MG_HOOKSAFE size_t mg_hooks_realloc_old(int count, void *ptr)
{
    size_t old;

    if (!count || ptr == NULL)
        return 0;
    old = mg_usable_size(ptr);
    /* The old block leaves its site now, before the real realloc can hand its address to
     * another thread. A realloc that then fails keeps the block without a site; it is
     * still counted in bytes. */
    if (old >= mg_sites_threshold())
        mg_sites_free(ptr);
    return old;
}

MG_HOOKSAFE void mg_hooks_after_realloc(int count, mg_domain_t d, size_t old, void *p)
{
    /* A realloc that succeeds is free(old) + alloc(new); one that fails changed nothing.
     * The old block's site was settled in mg_hooks_realloc_old. */
    if (p == NULL || !count)
        return;
    mg_hooks_free_bytes(d, old);
    mg_hooks_count_alloc(d, mg_usable_size(p), p);
}

MG_HOOKSAFE void *mg_hooks_realloc(mg_domain_t d, int (*refuse)(int was, size_t n),
                                   void *(*real)(void *ctx, void *ptr, size_t n), void *ctx,
                                   void *ptr, size_t n)
{
    int was = mg_reentry_enter();
    int count = mg_hooks_counting(was);
    size_t cur = (count && ptr != NULL) ? mg_usable_size(ptr) : 0;
    size_t old;
    void *p;

    if (count && n > cur && refuse(was, n - cur)) {
        mg_reentry_leave(was);
        return NULL; /* the old block stays valid, as after a failed realloc */
    }
    old = mg_hooks_realloc_old(count, ptr);
    p = real(ctx, ptr, n);
    mg_hooks_after_realloc(count, d, old, p);
    mg_reentry_leave(was);
    return p;
}

MG_HOOKSAFE void *mg_hooks_calloc(mg_domain_t d, int (*refuse)(int was, size_t n),
                                  void *(*real)(void *ctx, size_t nelem, size_t elsize),
                                  void *ctx, size_t nelem, size_t elsize)
{
    int was = mg_reentry_enter();
    void *p;

    if ((elsize == 0 || nelem <= SIZE_MAX / elsize) && refuse(was, nelem * elsize)) {
        mg_reentry_leave(was);
        return NULL;
    }
    p = real(ctx, nelem, elsize);
    mg_hooks_after_alloc(was, d, p);
    mg_reentry_leave(was);
    return p;
}
