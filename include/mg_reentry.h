/* Per-thread reentrancy guard for the allocator hooks (csrc/reentry.c).
 * Entered from any thread, with or without the GIL. */
#ifndef MEMGUARD_MG_REENTRY_H
#define MEMGUARD_MG_REENTRY_H

#include "memguard.h"

/* Non-zero while this thread is inside a memguard hook. Written and read only by its own
 * thread, so it needs no atomics. */
extern MG_TLS int t_mg_in_hook;

/* Enter the guard; returns the previous state, to be passed to mg_reentry_leave. A hook that
 * sees a non-zero previous state passes the call through uncounted: the allocation was made
 * by memguard itself or by an allocator below a hook (e.g. pymalloc calling PyMem_RawMalloc
 * under a hook higher up), and counting it would count one block twice. Saving the previous
 * value keeps nested guards safe (memray RecursionGuard::wasLocked). Hook-safe. */
MG_HOOKSAFE static inline int mg_reentry_enter(void)
{
    int was = t_mg_in_hook;
    t_mg_in_hook = 1;
    return was;
}

/* Leave the guard, restoring the state mg_reentry_enter returned. Hook-safe. */
MG_HOOKSAFE static inline void mg_reentry_leave(int was)
{
    t_mg_in_hook = was;
}

#endif /* MEMGUARD_MG_REENTRY_H */
