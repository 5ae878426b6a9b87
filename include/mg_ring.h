/* Bounded lock-free event ring: hooks (any thread) push fixed-size events, the monitor
 * thread (one consumer) pops them (csrc/ring.c). */
#ifndef MEMGUARD_MG_RING_H
#define MEMGUARD_MG_RING_H

#include <stdint.h>

#include "memguard.h"

/* Slot count; a power of two. Events are rare (one per cause per cell), so 256 slots
 * absorb bursts from many threads while the monitor sleeps between polls. */
#define MG_RING_SLOTS 256u

/* One event, as pushed by a hook. */
typedef struct mg_event {
    uint32_t kind;   /* mg_kind_t */
    int32_t line;    /* 1-based line in the cell's source, or -1 if unknown */
    int64_t epoch;   /* the cell's epoch when the event happened */
    int64_t bytes;   /* size of the allocation at issue, bytes */
    int64_t usage;   /* the cell's usage after that allocation, bytes */
    int64_t count;   /* accumulation: live blocks at the site; otherwise 0 */
    double t;        /* CLOCK_MONOTONIC seconds when the hook saw it */
} mg_event_t;

/* Append *ev. Returns 0, or -1 with errno = EAGAIN when the ring is full (the event is
 * dropped and counted in mg_ring_dropped). Hook-safe, any thread, lock-free. */
MG_HOOKSAFE int mg_ring_push(const mg_event_t *ev);

/* Remove the oldest event into *ev. Returns 0, or -1 with errno = EAGAIN when the ring is
 * empty (or the oldest push is still being written). Only one thread may pop. */
int mg_ring_pop(mg_event_t *ev);

/* CLOCK_MONOTONIC in seconds, the clock of mg_event_t.t (vDSO on Linux, no system call).
 * Hook-safe, any thread. */
MG_HOOKSAFE double mg_ring_now(void);

/* Events pushed since the last reset (counting one whose push is still being written).
 * Any thread. */
uint64_t mg_ring_pushed(void);

/* Events dropped because the ring was full. Any thread. */
uint64_t mg_ring_dropped(void);

/* Empty the ring and zero the counters. Only while no thread pushes or pops (tests). */
void mg_ring_reset(void);

#endif /* MEMGUARD_MG_RING_H */
