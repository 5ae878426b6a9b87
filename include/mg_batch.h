/* Per-thread batches of small blocks' bytes (csrc/batch.c). The allocator hooks add a block
 * below the attribution threshold to their own thread's batch instead of to the shared
 * counters of mg_acct, and move the batch there once it holds more than MG_BATCH_ROOM bytes
 * either way: the common allocation then costs a few thread-local instructions instead of
 * an atomic read-modify-write, the domain sum, the peak and the budget check
 * (bench/overhead.py --callgrind, small_arrays and sqlite_insert). Entered from any thread,
 * with or without the GIL.
 *
 * What it costs in exactness: mg_acct's figures (tracked bytes, the cell's usage and peak,
 * the budget crossing, raise mode's judgement) lag each thread's own small blocks by at most
 * MG_BATCH_ROOM bytes (64 KiB) per thread; a block of at least the threshold is never
 * batched, so every attributed block, alert line and refusal of a large request is as
 * before. A thread's batch is moved when the thread exits (a pthread key's destructor), so
 * nothing is lost with the thread; Python's entry points flush the calling thread's batch
 * before they read or start a cell (csrc/module.c). */
#ifndef MEMGUARD_MG_BATCH_H
#define MEMGUARD_MG_BATCH_H

#include <stdint.h>

#include "memguard.h"
#include "mg_reentry.h"

/* Most bytes a thread's batch of one domain holds, either sign, before it is moved (the
 * lag above). 64 KiB: at 100-byte blocks a move every ~650 allocations (its cost vanishes
 * in the average), and far below any budget or limit reserve (32 MiB, mg_acct.h). */
#define MG_BATCH_ROOM ((int64_t)64 << 10)

/* This thread's batched bytes per domain, t_mg.batch (may be < 0: frees of blocks counted
 * elsewhere), and the room it may use, t_mg.batch_room: 0 until the thread's first move
 * registers it for the exit flush, so a new thread's first block takes the slow path once;
 * MG_BATCH_ROOM after. Both live in the hooks' per-thread block (mg_reentry.h). */

/* Batch an allocation of n bytes (n below the attribution threshold) in domain d. Returns 1
 * when batched, 0 when the batch has no room: then call mg_batch_move_alloc. Hook-safe. */
MG_HOOKSAFE static inline int mg_batch_alloc(mg_domain_t d, size_t n)
{
    int64_t v = t_mg.batch[d] + (int64_t)n;

    if (v > t_mg.batch_room)
        return 0;
    t_mg.batch[d] = v;
    return 1;
}

/* Batch a free of n bytes in domain d. Returns 1 when batched, 0 when the batch has no room
 * (or n is larger than it): then call mg_batch_move_free. Hook-safe. */
MG_HOOKSAFE static inline int mg_batch_free(mg_domain_t d, size_t n)
{
    int64_t v = t_mg.batch[d] - (int64_t)n;

    if (v < -t_mg.batch_room)
        return 0;
    t_mg.batch[d] = v;
    return 1;
}

/* The slow paths: add the block (n bytes, alloc or free) to this thread's batch of d and
 * move all of this thread's batches into mg_acct. Returns 1 when the move made the running
 * cell cross its budget (mg_acct_alloc's rule; the caller reports it), else 0. A free of n
 * larger than MG_BATCH_ROOM goes to mg_acct on its own, leaving the batch. Registers the
 * thread for the exit flush on its first call. Hook-safe. */
MG_HOOKSAFE MG_SLOWPATH int mg_batch_move_alloc(mg_domain_t d, size_t n);
MG_HOOKSAFE MG_SLOWPATH void mg_batch_move_free(mg_domain_t d, size_t n);

/* Move this thread's batches into mg_acct now, leaving a budget crossing they make to be
 * reported by the next mg_acct_alloc (mg_acct_add). Hook-safe; Python's entry points call
 * it (GIL held) before they read the counters or start a cell. */
MG_HOOKSAFE void mg_batch_flush(void);

/* Drop every thread's batch at its next move instead of moving it: call with mg_acct_reset,
 * whose zeroed counters must not take bytes counted before them (the blocks stay uncounted,
 * like any block allocated before install). Blocks a thread batched between the reset and
 * its next move are dropped with them: at most MG_BATCH_ROOM bytes per thread. Any
 * thread. */
void mg_batch_reset(void);

#endif /* MEMGUARD_MG_BATCH_H */
