/* Tests of csrc/batch.c: per-thread batches of small blocks, their move into mg_acct when
 * full, at thread exit and on flush, the generation reset, and concurrent threads that
 * leave the counters exact. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "mg_acct.h"
#include "mg_batch.h"
#include "tap.h"

/* What a hook does for a small block (include/mg_hooks.h): batch, else move. */
static int small_alloc(mg_domain_t d, size_t n)
{
    if (mg_batch_alloc(d, n))
        return 0;
    return mg_batch_move_alloc(d, n);
}

static void small_free(mg_domain_t d, size_t n)
{
    if (!mg_batch_free(d, n))
        mg_batch_move_free(d, n);
}

static void fresh(void)
{
    mg_batch_flush();
    mg_acct_reset();
    mg_batch_reset();
    mg_batch_flush(); /* drops what the reset made stale */
}

static void t_first_block_registers_then_blocks_wait_in_the_batch(void)
{
    fresh();
    /* A thread's first block takes the slow path (no room yet) and is counted at once. */
    check_int(t_mg.batch_room, ==, MG_BATCH_ROOM);
    (void)small_alloc(MG_DOMAIN_NUMPY, 100);
    check_int(mg_acct_tracked(), ==, 0); /* in the batch */
    for (int i = 0; i < 10; i++)
        (void)small_alloc(MG_DOMAIN_NUMPY, 1000);
    check_int(mg_acct_tracked(), ==, 0);
    check_int(t_mg.batch[MG_DOMAIN_NUMPY], ==, 10100);
    mg_batch_flush();
    check_int(mg_acct_tracked(), ==, 10100);
    check_int(t_mg.batch[MG_DOMAIN_NUMPY], ==, 0);
}

static void t_a_full_batch_moves_with_the_block_that_fills_it(void)
{
    int64_t sum = 0;
    mg_acct_snapshot_t s;

    fresh();
    while (sum <= MG_BATCH_ROOM) {
        (void)small_alloc(MG_DOMAIN_RAW, 4000);
        sum += 4000;
    }
    /* The block past the room moved the whole batch, itself included. */
    check_int(mg_acct_tracked(), ==, sum);
    check_int(t_mg.batch[MG_DOMAIN_RAW], ==, 0);
    (void)small_alloc(MG_DOMAIN_RAW, 10);
    small_free(MG_DOMAIN_RAW, 4000);
    check_int(t_mg.batch[MG_DOMAIN_RAW], ==, -3990);
    mg_batch_flush();
    mg_acct_snapshot(&s);
    check_int(s.domain[MG_DOMAIN_RAW], ==, sum - 3990);
    check_int(s.cell_peak, ==, sum); /* frees move before allocations: no false peak */
}

static void t_frees_batch_down_to_minus_the_room(void)
{
    fresh();
    mg_acct_alloc(MG_DOMAIN_NATIVE, 1 << 20);
    for (int i = 0; i < 16; i++)
        small_free(MG_DOMAIN_NATIVE, 4096);
    check_int(mg_acct_tracked(), ==, 1 << 20); /* -64 KiB waits, exactly the room */
    small_free(MG_DOMAIN_NATIVE, 1);
    check_int(mg_acct_tracked(), ==, (1 << 20) - 65537);
    /* A free larger than the room goes on its own, leaving the batch. */
    small_free(MG_DOMAIN_NATIVE, 100);
    small_free(MG_DOMAIN_NATIVE, 200000);
    check_int(mg_acct_tracked(), ==, (1 << 20) - 65537 - 200000);
    check_int(t_mg.batch[MG_DOMAIN_NATIVE], ==, -100);
}

static void t_moving_a_batch_reports_the_budget_crossing_once(void)
{
    int crossings = 0;

    fresh();
    mg_acct_cell_begin(1, 200000);
    for (int i = 0; i < 400; i++)
        crossings += small_alloc(MG_DOMAIN_NUMPY, 1000);
    check_int(crossings, ==, 1);
    check(mg_acct_cell_usage() > 200000);
    /* A flush (Python's entry points) leaves a crossing to the next allocation. */
    mg_acct_cell_begin(2, 1000);
    (void)small_alloc(MG_DOMAIN_NUMPY, 5000);
    mg_batch_flush();
    check_int(mg_acct_alloc(MG_DOMAIN_NUMPY, 1), ==, 1);
}

static void t_a_reset_drops_batches_from_before_it(void)
{
    fresh();
    (void)small_alloc(MG_DOMAIN_RAW, 3000);
    small_free(MG_DOMAIN_NUMPY, 500);
    mg_acct_reset();
    mg_batch_reset();
    mg_batch_flush();
    check_int(mg_acct_tracked(), ==, 0);
    check_int(t_mg.batch[MG_DOMAIN_RAW], ==, 0);
    check_int(t_mg.batch[MG_DOMAIN_NUMPY], ==, 0);
    (void)small_alloc(MG_DOMAIN_RAW, 7); /* after the move: counted */
    mg_batch_flush();
    check_int(mg_acct_tracked(), ==, 7);
}

/* A thread that allocates and frees small blocks, leaving `net` bytes counted, then exits
 * with whatever its batch holds: the exit flush must move it. */
typedef struct worker {
    unsigned seed;
    int64_t net;
} worker_t;

static void *churn(void *arg)
{
    worker_t *w = arg;
    size_t live[64] = {0};

    for (int i = 0; i < 200000; i++) {
        int k = (int)(rand_r(&w->seed) % 64);

        if (live[k]) {
            small_free(MG_DOMAIN_NATIVE, live[k]);
            w->net -= (int64_t)live[k];
            live[k] = 0;
        } else {
            live[k] = 1 + rand_r(&w->seed) % 3000;
            (void)small_alloc(MG_DOMAIN_NATIVE, live[k]);
            w->net += (int64_t)live[k];
        }
    }
    return NULL;
}

static void t_exiting_threads_leave_the_counters_exact(void)
{
    enum { THREADS = 8, ROUNDS = 5 };
    int64_t want = 0;

    fresh();
    for (int r = 0; r < ROUNDS; r++) {
        pthread_t th[THREADS];
        worker_t w[THREADS];

        for (int i = 0; i < THREADS; i++) {
            w[i].seed = (unsigned)(r * THREADS + i + 1);
            w[i].net = 0;
            pthread_create(&th[i], NULL, churn, &w[i]);
        }
        for (int i = 0; i < THREADS; i++) {
            pthread_join(th[i], NULL);
            want += w[i].net;
        }
    }
    check(want > 0);
    check_int(mg_acct_tracked(), ==, want);
}

int main(void)
{
    plan(6);
    /* The first block of this thread registers it (room 0 before). */
    mg_acct_set_enabled(1);
    (void)small_alloc(MG_DOMAIN_RAW, 1);
    TEST(t_first_block_registers_then_blocks_wait_in_the_batch(),
         "a thread's small blocks wait in its batch until a flush");
    TEST(t_a_full_batch_moves_with_the_block_that_fills_it(),
         "the block that overfills the batch moves it, frees first");
    TEST(t_frees_batch_down_to_minus_the_room(), "frees batch down to minus the room; a large free goes alone");
    TEST(t_moving_a_batch_reports_the_budget_crossing_once(),
         "a moved batch reports the budget crossing once; a flush leaves it to the next allocation");
    TEST(t_a_reset_drops_batches_from_before_it(), "a reset drops the batches counted before it");
    TEST(t_exiting_threads_leave_the_counters_exact(),
         "40 threads churning small blocks leave the counters exact after they exit");
    return test_done();
}
