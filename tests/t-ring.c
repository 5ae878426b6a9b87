/* Tests of csrc/ring.c: order, full and empty rings, and many producers against one
 * consumer with no event lost or duplicated. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "mg_ring.h"
#include "tap.h"

static mg_event_t ev_of(int64_t epoch, int64_t bytes)
{
    mg_event_t ev;

    memset(&ev, 0, sizeof(ev));
    ev.kind = MG_KIND_BUDGET;
    ev.epoch = epoch;
    ev.bytes = bytes;
    ev.line = 7;
    ev.t = mg_ring_now();
    return ev;
}

static void t_pop_returns_pushes_in_order(void)
{
    mg_event_t ev;

    mg_ring_reset();
    for (int i = 1; i <= 5; i++) {
        ev = ev_of(1, i);
        check_int(mg_ring_push(&ev), ==, 0);
    }
    for (int i = 1; i <= 5; i++) {
        check_int(mg_ring_pop(&ev), ==, 0);
        check_int(ev.bytes, ==, i);
        check_int(ev.line, ==, 7);
    }
}

static void t_empty_pop_says_eagain(void)
{
    mg_event_t ev;

    mg_ring_reset();
    errno = 0;
    check_int(mg_ring_pop(&ev), ==, -1);
    check_int(errno, ==, EAGAIN);
}

static void t_full_ring_drops_and_counts(void)
{
    mg_event_t ev = ev_of(1, 1);
    int pushed = 0;

    mg_ring_reset();
    for (unsigned i = 0; i < MG_RING_SLOTS + 10; i++)
        pushed += mg_ring_push(&ev) == 0;
    check_int(pushed, ==, MG_RING_SLOTS);
    check_uint(mg_ring_dropped(), ==, 10);
    errno = 0;
    check_int(mg_ring_push(&ev), ==, -1);
    check_int(errno, ==, EAGAIN);
}

static void t_ring_wraps_after_pops(void)
{
    mg_event_t ev;
    int ok = 1;

    mg_ring_reset();
    for (int round = 0; round < 5 * (int)MG_RING_SLOTS; round++) {
        ev = ev_of(1, round);
        ok &= mg_ring_push(&ev) == 0;
        ok &= mg_ring_pop(&ev) == 0 && ev.bytes == round;
    }
    check_int(ok, ==, 1);
    check_uint(mg_ring_dropped(), ==, 0);
}

#define PRODUCERS 4
#define PER_PRODUCER 20000

static atomic_int s_go;

static void *producer(void *arg)
{
    int64_t id = (int64_t)(intptr_t)arg;

    while (!atomic_load(&s_go))
        sched_yield();
    for (int64_t i = 0; i < PER_PRODUCER; i++) {
        mg_event_t ev = ev_of(id, i);

        /* Full: wait until the consumer frees a slot (a test may wait; a hook never). Yield,
         * so that under valgrind, which runs one thread at a time, a spinning producer
         * hands its time slice to the consumer instead of burning it (check-valgrind took
         * minutes on this loop). */
        while (mg_ring_push(&ev) != 0)
            sched_yield();
    }
    return NULL;
}

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void t_many_producers_lose_nothing(void)
{
    pthread_t th[PRODUCERS];
    int64_t next[PRODUCERS] = {0};
    int64_t received = 0;
    int64_t strays = 0;
    int in_order = 1;
    int all_of_each = 1;
    double deadline = now_s() + 120.0; /* valgrind runs this loop slowly */
    mg_event_t ev;

    mg_ring_reset();
    atomic_store(&s_go, 0);
    for (intptr_t p = 0; p < PRODUCERS; p++)
        pthread_create(&th[p], NULL, producer, (void *)p);
    atomic_store(&s_go, 1);
    /* Pop until every producer's last event came, or the deadline: a lost event shows as a
     * producer whose count stops short, not as a loop that never ends. */
    for (;;) {
        int done = 1;

        for (int p = 0; p < PRODUCERS; p++)
            done &= next[p] == PER_PRODUCER;
        if (done || now_s() > deadline)
            break;
        if (mg_ring_pop(&ev) != 0) {
            sched_yield(); /* empty: let the producers run (see producer) */
            continue;
        }
        received++;
        if (ev.epoch < 0 || ev.epoch >= PRODUCERS) {
            strays++;
            continue;
        }
        in_order &= ev.bytes == next[ev.epoch];
        next[ev.epoch] = ev.bytes + 1;
    }
    for (int p = 0; p < PRODUCERS; p++)
        pthread_join(th[p], NULL);
    for (int p = 0; p < PRODUCERS; p++)
        all_of_each &= next[p] == PER_PRODUCER;
    /* Nothing is left over (no duplicate), and nothing was pushed beyond what was popped. */
    check_int(mg_ring_pop(&ev), ==, -1);
    check_int(all_of_each, ==, 1);
    check_int(in_order, ==, 1);
    check_int(strays, ==, 0);
    check_int(received, ==, (int64_t)PRODUCERS * PER_PRODUCER);
    check_uint(mg_ring_pushed(), ==, (uint64_t)PRODUCERS * PER_PRODUCER);
}

int main(void)
{
    plan(5);
    TEST(t_pop_returns_pushes_in_order(), "ring_pop returns events in the order they were pushed");
    TEST(t_empty_pop_says_eagain(), "ring_pop on an empty ring fails with EAGAIN");
    TEST(t_full_ring_drops_and_counts(), "ring_push on a full ring drops the event and counts it");
    TEST(t_ring_wraps_after_pops(), "the ring wraps around many times without losing events");
    TEST(t_many_producers_lose_nothing(),
         "4 producer threads and one consumer: every event arrives once, in each producer's order");
    return test_done();
}
