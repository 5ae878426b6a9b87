/* Owns the counting step shared by every allocator hook: bytes into mg_acct, blocks at or
 * above the attribution threshold into mg_sites with their cell line, and a budget event
 * into the ring on the first crossing in a cell. Any thread, with or without the GIL. */
#include <malloc.h>

#include "mg_acct.h"
#include "mg_frames.h"
#include "mg_hooks.h"
#include "mg_ring.h"
#include "mg_sites.h"

/* Line not read yet: mg_frames_cell_line returns -1 for "unknown", never -2. */
#define LINE_UNREAD (-2)

MG_HOOKSAFE void mg_hooks_count_alloc(mg_domain_t d, size_t n, void *p)
{
    mg_event_t ev;
    int line = LINE_UNREAD;
    int crossed = mg_acct_alloc(d, n);

    /* Rare path: blocks of at least the threshold (one frame walk each, only with the
     * GIL: mg_frames_cell_line checks) are recorded with their site. */
    if (n >= mg_sites_threshold()) {
        line = mg_frames_cell_line();
        mg_sites_alloc(p, n, mg_acct_epoch(), line);
    }
    if (!crossed)
        return;
    /* Rarer still: once per cell. */
    ev.kind = MG_KIND_BUDGET;
    ev.line = line == LINE_UNREAD ? mg_frames_cell_line() : line;
    ev.epoch = mg_acct_epoch();
    ev.bytes = (int64_t)n;
    ev.usage = mg_acct_cell_usage();
    ev.count = 0;
    ev.t = mg_ring_now();
    (void)mg_ring_push(&ev); /* a full ring counts the drop itself */
}

MG_HOOKSAFE void mg_hooks_count_free(mg_domain_t d, size_t n, void *p)
{
    if (n >= mg_sites_threshold())
        mg_sites_free(p);
    mg_acct_free(d, n);
}

MG_HOOKSAFE void mg_hooks_after_alloc(int was, mg_domain_t d, void *p)
{
    if (p != NULL && !was && mg_acct_enabled())
        mg_hooks_count_alloc(d, malloc_usable_size(p), p);
}

MG_HOOKSAFE void mg_hooks_before_free(int was, mg_domain_t d, void *ptr)
{
    /* Called before the real free, so the address cannot be reused in between. */
    if (ptr != NULL && !was && mg_acct_enabled())
        mg_hooks_count_free(d, malloc_usable_size(ptr), ptr);
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
    old = malloc_usable_size(ptr);
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
    mg_acct_free(d, old);
    mg_hooks_count_alloc(d, malloc_usable_size(p), p);
}
