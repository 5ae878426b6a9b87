/* Owns the bounded event ring from hooks (any thread, many producers) to the monitor
 * thread (one consumer). Lock-free; see include/mg_ring.h. */
#include <errno.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "mg_ring.h"

/* Bounded MPMC queue after D. Vyukov ("Bounded MPMC queue", 1024cores.net): each slot has a
 * sequence number that says whether it is free for the push at position pos (seq == pos) or
 * holds the event for the pop at pos (seq == pos + 1). A producer claims a slot with a CAS
 * on the write index rather than fetch_add, because a fetch_add claim cannot be given back
 * when the ring is full: the producer would have to wait for the consumer, and a hook must
 * never wait. */
typedef struct ring_slot {
    _Atomic uint64_t seq; /* written by producers (release) and the consumer (release) */
    mg_event_t ev;        /* written by the producer that claimed the slot */
} ring_slot_t;

static ring_slot_t s_slots[MG_RING_SLOTS];
/* Written by producers (CAS, relaxed); read by producers (relaxed) and mg_ring_pushed
 * (acquire). */
static _Atomic uint64_t s_write = 0;
/* Written by the one consumer (relaxed store); read only by it (mg_ring_pop). */
static _Atomic uint64_t s_read = 0;
/* Written by producers on a full ring (relaxed); read by anyone. */
static _Atomic uint64_t s_dropped = 0;
/* Set by mg_ring_reset (release) once the slots hold seq == index; read by push and pop
 * (acquire), which fail with EAGAIN before it. */
static _Atomic int s_ready = 0;

static void ring_init_slots(void)
{
    for (uint64_t i = 0; i < MG_RING_SLOTS; i++)
        atomic_store_explicit(&s_slots[i].seq, i, memory_order_relaxed);
}

/* Slots must start with seq == index, which static zero-initialisation does not give (a
 * zeroed slot i > 0 has seq 0 < i, which a producer reads as "full"), so nothing is pushed
 * before this runs: module.c calls it once at module init, before any hook is installed,
 * and the tests before each use. */
void mg_ring_reset(void)
{
    ring_init_slots();
    atomic_store(&s_write, 0);
    atomic_store(&s_read, 0);
    atomic_store(&s_dropped, 0);
    atomic_store_explicit(&s_ready, 1, memory_order_release);
}

MG_HOOKSAFE int mg_ring_push(const mg_event_t *ev)
{
    uint64_t pos;
    ring_slot_t *slot;

    if (!atomic_load_explicit(&s_ready, memory_order_acquire)) {
        errno = EAGAIN;
        return MG_ERR;
    }
    pos = atomic_load_explicit(&s_write, memory_order_relaxed);
    for (;;) {
        uint64_t seq;
        int64_t dif;

        slot = &s_slots[pos & (MG_RING_SLOTS - 1)];
        seq = atomic_load_explicit(&slot->seq, memory_order_acquire);
        dif = (int64_t)seq - (int64_t)pos;
        if (dif == 0) {
            if (atomic_compare_exchange_weak_explicit(&s_write, &pos, pos + 1,
                                                      memory_order_relaxed, memory_order_relaxed))
                break;
        } else if (dif < 0) {
            atomic_fetch_add_explicit(&s_dropped, 1, memory_order_relaxed);
            errno = EAGAIN;
            return MG_ERR;
        } else {
            pos = atomic_load_explicit(&s_write, memory_order_relaxed);
        }
    }
    memcpy(&slot->ev, ev, sizeof(*ev));
    atomic_store_explicit(&slot->seq, pos + 1, memory_order_release);
    return MG_OK;
}

int mg_ring_pop(mg_event_t *ev)
{
    uint64_t r = atomic_load_explicit(&s_read, memory_order_relaxed);
    ring_slot_t *slot = &s_slots[r & (MG_RING_SLOTS - 1)];
    uint64_t seq = atomic_load_explicit(&slot->seq, memory_order_acquire);

    if (!atomic_load_explicit(&s_ready, memory_order_acquire) || seq != r + 1) {
        errno = EAGAIN;
        return MG_ERR;
    }
    memcpy(ev, &slot->ev, sizeof(*ev));
    atomic_store_explicit(&slot->seq, r + MG_RING_SLOTS, memory_order_release);
    atomic_store_explicit(&s_read, r + 1, memory_order_relaxed);
    return MG_OK;
}

MG_HOOKSAFE double mg_ring_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

uint64_t mg_ring_pushed(void)
{
    return atomic_load_explicit(&s_write, memory_order_acquire);
}

uint64_t mg_ring_dropped(void)
{
    return atomic_load_explicit(&s_dropped, memory_order_relaxed);
}
