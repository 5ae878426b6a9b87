/* Owns the per-thread batches of small blocks' bytes (include/mg_batch.h): the thread-local
 * batches, their move into mg_acct, and the exit flush. Every thread that allocates enters
 * it through the hooks. */
#include <pthread.h>
#include <stdatomic.h>

#include "mg_acct.h"
#include "mg_batch.h"
#include "mg_reentry.h"

/* The generation this thread's batches belong to (s_gen when they were started). Owning
 * thread only. */
static MG_TLS uint64_t t_gen = 0;

/* Bumped by mg_batch_reset (relaxed RMW, any thread); read by the moves (relaxed): a move
 * racing a reset may still move one stale batch of at most MG_BATCH_ROOM bytes, which is
 * the lag the counters have anyway. */
static _Atomic uint64_t s_gen = 0;

/* The key whose destructor moves an exiting thread's batches. Created once (pthread_once,
 * which neither allocates nor takes a lock a hook could hold); s_key_ok is written inside
 * the once routine and read after pthread_once returns, which orders the two. A process
 * out of keys gets s_key_ok 0: its threads then keep no room (every block is moved at
 * once), so nothing can be lost at their exit. */
static pthread_once_t s_key_once = PTHREAD_ONCE_INIT;
static pthread_key_t s_key;
static int s_key_ok = 0;

/* Zero this thread's batches if a reset (mg_batch_reset) came after they were started: they
 * hold bytes counted before the counters were zeroed. */
static void drop_stale(void)
{
    uint64_t gen = atomic_load_explicit(&s_gen, memory_order_relaxed);

    if (t_gen == gen)
        return;
    for (int d = 0; d < MG_DOMAIN_COUNT; d++)
        t_mg.batch[d] = 0;
    t_gen = gen;
}

/* Move this thread's batches into mg_acct: frees first, so the peak is not overstated.
 * report: 1 to judge the budget (mg_acct_alloc; returns its crossing), 0 to leave that to
 * the next mg_acct_alloc (mg_acct_add). Call drop_stale first. */
static int move_all(int report)
{
    int crossed = 0;

    for (int d = 0; d < MG_DOMAIN_COUNT; d++) {
        if (t_mg.batch[d] < 0) {
            mg_acct_free((mg_domain_t)d, (size_t)-t_mg.batch[d]);
            t_mg.batch[d] = 0;
        }
    }
    for (int d = 0; d < MG_DOMAIN_COUNT; d++) {
        int64_t v = t_mg.batch[d];

        if (v <= 0)
            continue;
        t_mg.batch[d] = 0;
        if (report)
            crossed |= mg_acct_alloc((mg_domain_t)d, (size_t)v);
        else
            mg_acct_add((mg_domain_t)d, (size_t)v);
    }
    return crossed;
}

/* pthread key destructor: the thread is exiting. Its batches go to mg_acct; room 0 makes
 * any block it still counts (a later destructor's) register again, and glibc then calls
 * this again (up to PTHREAD_DESTRUCTOR_ITERATIONS rounds). */
static void thread_exit(void *unused)
{
    int was = mg_reentry_enter();

    (void)unused;
    drop_stale();
    (void)move_all(0);
    t_mg.batch_room = 0;
    mg_reentry_leave(was);
}

static void key_create(void)
{
    s_key_ok = pthread_key_create(&s_key, thread_exit) == 0;
}

/* Give this thread its room, once it is sure to be flushed at exit. The guard keeps any
 * allocation pthread_setspecific makes (glibc: a second-level block for a key >= 32)
 * uncounted, as memguard's own. */
static void register_thread(void)
{
    int was = mg_reentry_enter();

    pthread_once(&s_key_once, key_create);
    if (s_key_ok && pthread_setspecific(s_key, (void *)1) == 0)
        t_mg.batch_room = MG_BATCH_ROOM;
    mg_reentry_leave(was);
}

/* The slow paths' first step: a thread's first move registers it for the exit flush, and
 * a batch from before a reset is dropped before the new block joins it, so the block
 * itself is never dropped. */
static void begin_move(void)
{
    if (t_mg.batch_room == 0)
        register_thread();
    drop_stale();
}

MG_HOOKSAFE MG_SLOWPATH int mg_batch_move_alloc(mg_domain_t d, size_t n)
{
    begin_move();
    t_mg.batch[d] += (int64_t)n;
    return move_all(1);
}

MG_HOOKSAFE MG_SLOWPATH void mg_batch_move_free(mg_domain_t d, size_t n)
{
    begin_move();
    if ((int64_t)n > MG_BATCH_ROOM) {
        mg_acct_free(d, n);
        return;
    }
    t_mg.batch[d] -= (int64_t)n;
    (void)move_all(0);
}

MG_HOOKSAFE void mg_batch_flush(void)
{
    drop_stale();
    (void)move_all(0);
}

void mg_batch_reset(void)
{
    atomic_fetch_add_explicit(&s_gen, 1, memory_order_relaxed);
}
