/* Owns the counting step shared by every allocator hook: bytes into mg_acct, and a budget
 * event into the ring on the first crossing in a cell. Any thread, with or without GIL. */
#include <malloc.h>

#include "mg_acct.h"
#include "mg_frames.h"
#include "mg_hooks.h"
#include "mg_ring.h"

MG_HOOKSAFE void mg_hooks_count_alloc(mg_domain_t d, size_t n)
{
    mg_event_t ev;

    if (!mg_acct_alloc(d, n))
        return;
    /* Rare path: once per cell. The line is read only if this thread holds the GIL. */
    ev.kind = MG_KIND_BUDGET;
    ev.line = mg_frames_cell_line();
    ev.epoch = mg_acct_epoch();
    ev.bytes = (int64_t)n;
    ev.usage = mg_acct_cell_usage();
    ev.t = mg_ring_now();
    (void)mg_ring_push(&ev); /* a full ring counts the drop itself */
}

MG_HOOKSAFE void mg_hooks_count_free(mg_domain_t d, size_t n)
{
    mg_acct_free(d, n);
}

MG_HOOKSAFE void mg_hooks_after_alloc(int was, mg_domain_t d, void *p)
{
    if (p != NULL && !was && mg_acct_enabled())
        mg_hooks_count_alloc(d, malloc_usable_size(p));
}

MG_HOOKSAFE void mg_hooks_before_free(int was, mg_domain_t d, void *ptr)
{
    /* Called before the real free, so the address cannot be reused in between. */
    if (ptr != NULL && !was && mg_acct_enabled())
        mg_hooks_count_free(d, malloc_usable_size(ptr));
}

MG_HOOKSAFE int mg_hooks_counting(int was)
{
    return !was && mg_acct_enabled();
}

MG_HOOKSAFE size_t mg_hooks_realloc_old(int count, void *ptr)
{
    return (count && ptr != NULL) ? malloc_usable_size(ptr) : 0;
}

MG_HOOKSAFE void mg_hooks_after_realloc(int count, mg_domain_t d, size_t old, void *p)
{
    /* A realloc that succeeds is free(old) + alloc(new); one that fails changed nothing. */
    if (p == NULL || !count)
        return;
    mg_hooks_count_free(d, old);
    mg_hooks_count_alloc(d, malloc_usable_size(p));
}
