/* Per-thread reentrancy guard for the allocator hooks (csrc/reentry.c).
 * Entered from any thread, with or without the GIL. */
#ifndef MEMGUARD_MG_REENTRY_H
#define MEMGUARD_MG_REENTRY_H

#include "memguard.h"

/* The hooks' per-thread state, in one initial-exec TLS block so that a hook reaches all of
 * it through one GOT entry (one load of the block's offset, not one per variable: objdump of
 * np_malloc). Written and read only by its own thread, so it needs no atomics. */
typedef struct mg_thread {
    int in_hook;                    /* non-zero while inside a memguard hook (below) */
    unsigned probe;                 /* the NumPy route probe's bits (mg_native.h) */
    int64_t batch_room;             /* the small-block batches' room (include/mg_batch.h) */
    int64_t batch[MG_DOMAIN_COUNT]; /* the batched bytes per domain (include/mg_batch.h) */
} mg_thread_t;
extern MG_TLS mg_thread_t t_mg;

/* Enter the guard; returns the previous state, to be passed to mg_reentry_leave. A hook that
 * sees a non-zero previous state passes the call through uncounted: the allocation was made
 * by memguard itself or by an allocator below a hook (e.g. pymalloc calling PyMem_RawMalloc
 * under a hook higher up), and counting it would count one block twice. Saving the previous
 * value keeps nested guards safe (memray RecursionGuard::wasLocked). Hook-safe. */
MG_HOOKSAFE static inline int mg_reentry_enter(void)
{
    int was = t_mg.in_hook;
    t_mg.in_hook = 1;
    return was;
}

/* Leave the guard, restoring the state mg_reentry_enter returned. Hook-safe. */
MG_HOOKSAFE static inline void mg_reentry_leave(int was)
{
    t_mg.in_hook = was;
}

#endif /* MEMGUARD_MG_REENTRY_H */
