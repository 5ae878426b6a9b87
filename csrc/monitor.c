/* Owns the monitor thread and its libzmq PUSH socket: ring events and peak growth become
 * mg_wire_t records for the Python relay. Started/stopped under the GIL; the thread runs
 * without it. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "mg_acct.h"
#include "mg_blackbox.h"
#include "mg_monitor.h"
#include "mg_ring.h"
#include "mg_zmq.h"
#include "mg_measures.h"

_Static_assert(sizeof(mg_wire_t) == 64, "mg_wire_t must have no padding");

/* Written by start/stop (GIL held) while the thread is not running; the thread reads
 * s_sock only between its creation and its join, which order the accesses. s_own_ctx:
 * s_ctx was created here (and is terminated here), not lent by the caller. */
static void *s_ctx = NULL;
static int s_own_ctx = 0;
static void *s_sock = NULL;
static pthread_t s_thread;
static int s_period_ms = 2;
/* Written by start/stop/atfork (release); read by the thread and anyone (acquire). */
static _Atomic int s_running = 0;
static _Atomic int s_stop = 0;
/* Written by the thread (relaxed); read by anyone. */
static _Atomic uint64_t s_sent = 0;
static _Atomic uint64_t s_dropped = 0;
/* Ring events the thread has finished with (sent or dropped); written by the thread
 * (release), read by mg_monitor_pending. */
static _Atomic uint64_t s_forwarded = 0;

/* The one place libzmq return codes are judged (pyzmq _check_rc). EAGAIN on a send means
 * the peer is absent or slow: drop the record and count it, never block. Returns 0 if the
 * call succeeded. The monitor thread holds no GIL, so EINTR is simply a failed send here. */
static int mg_zmq_check(int rc)
{
    if (rc >= 0)
        return 0;
    if (mg_zmq.errno_() == EAGAIN)
        atomic_fetch_add_explicit(&s_dropped, 1, memory_order_relaxed);
    return -1;
}

static void relay_send(uint32_t kind, int64_t epoch, int32_t line, int64_t bytes,
                       int64_t usage, int64_t count, double t)
{
    mg_acct_snapshot_t snap;
    mg_wire_t w;

    mg_acct_snapshot(&snap);
    memset(&w, 0, sizeof(w));
    w.version = MG_WIRE_VERSION;
    w.kind = kind;
    w.epoch = epoch;
    w.line = line;
    w.count = count < 0 ? 0 : (count > UINT32_MAX ? UINT32_MAX : (uint32_t)count);
    w.bytes = bytes;
    w.usage = usage;
    w.peak = snap.epoch == epoch ? snap.cell_peak - snap.cell_start : usage;
    w.budget = snap.budget;
    w.t = t;
    if (mg_zmq_check(mg_zmq.send(s_sock, &w, sizeof(w), MG_ZMQ_DONTWAIT)) == 0)
        atomic_fetch_add_explicit(&s_sent, 1, memory_order_relaxed);
}

static void *relay_main(void *arg)
{
    struct timespec nap = {0, (long)s_period_ms * 1000000L};
    int64_t alerted_epoch = 0; /* the cell whose budget alert was sent last */
    int32_t alerted_line = -1;
    int64_t last_usage = 0;    /* the figure in the last record for alerted_epoch */
    int by_rss = 0;            /* that alert came from the RSS rule: follow RSS growth */
    int64_t limit_epoch = -1;  /* the cell that got the last limit record */
    int64_t limit_last = 0;    /* the measure in that record, bytes */
    unsigned tick = 0;
    unsigned bb_every = MG_BB_SAMPLE_MS / (unsigned)s_period_ms;

    (void)arg;
    while (!atomic_load_explicit(&s_stop, memory_order_acquire)) {
        mg_event_t ev;
        mg_acct_snapshot_t snap;

        while (mg_ring_pop(&ev) == 0) {
            relay_send(ev.kind, ev.epoch, ev.line, ev.bytes, ev.usage, ev.count, ev.t);
            atomic_fetch_add_explicit(&s_forwarded, 1, memory_order_release);
            if (ev.kind == MG_KIND_BUDGET) {
                alerted_epoch = ev.epoch;
                alerted_line = ev.line;
                last_usage = ev.usage;
                by_rss = 0;
            }
        }
        mg_acct_snapshot(&snap);
        if (tick % (bb_every ? bb_every : 1) == 0)
            mg_blackbox_tick(); /* no-op without an open box */
        if (tick % MG_RSS_EVERY == 0 && mg_measures_sample() >= 0) {
            int64_t limit;
            int measure;
            double fraction;
            int64_t used;

            mg_acct_get_limit(&limit, &measure, &fraction);
            used = mg_measures_used((mg_measure_t)measure);
            /* The limit rule: once per cell when the measure passes the fraction, then an
             * update each time it grows by another MG_LIMIT_STEP of the limit. */
            if (limit > 0 && (double)used >= (double)limit * fraction &&
                (limit_epoch != snap.epoch ||
                 (double)(used - limit_last) >= (double)limit * MG_LIMIT_STEP)) {
                relay_send(MG_KIND_LIMIT, snap.epoch, -1, used, used, measure, mg_ring_now());
                limit_epoch = snap.epoch;
                limit_last = used;
            }
        }
        if (tick++ % MG_RSS_EVERY == 0 && snap.budget > 0 && !snap.crossed) {
            mg_measures_snapshot_t rss;
            int64_t grown;

            mg_measures_snapshot(&rss);
            grown = rss.last - rss.cell_start;
            /* cell_start is 0 until a cell began through mg_measures_cell_begin (C tests). */
            if (rss.cell_start > 0 && grown > snap.budget && mg_acct_cross()) {
                int64_t tracked = snap.tracked - snap.cell_start;

                relay_send(MG_KIND_BUDGET_RSS, snap.epoch, -1, grown - tracked, grown, 0,
                           mg_ring_now());
                alerted_epoch = snap.epoch;
                alerted_line = -1;
                last_usage = grown;
                by_rss = 1;
                continue;
            }
        }
        if (alerted_epoch != 0 && snap.epoch == alerted_epoch && snap.crossed) {
            int64_t now;

            if (by_rss) {
                mg_measures_snapshot_t rss;

                mg_measures_snapshot(&rss);
                now = rss.cell_peak - rss.cell_start;
            } else {
                now = snap.cell_peak - snap.cell_start;
            }
            if ((double)now >= (double)last_usage * (1.0 + MG_GROW_STEP)) {
                relay_send(MG_KIND_BUDGET_GROW, alerted_epoch, alerted_line, 0, now, 0,
                           mg_ring_now());
                last_usage = now;
            }
        }
        nanosleep(&nap, NULL);
    }
    return NULL;
}

int mg_monitor_start(const char *endpoint, int period_ms, void *ctx)
{
    int linger = 0;
    int hwm = 1000;
    int rc;

    if (atomic_load_explicit(&s_running, memory_order_acquire)) {
        errno = EALREADY;
        return MG_ERR;
    }
    if (period_ms < 1 || period_ms > 1000) {
        errno = EINVAL;
        return MG_ERR;
    }
    if (!mg_zmq_loaded()) {
        errno = ENOSYS;
        return MG_ERR;
    }
    s_own_ctx = ctx == NULL;
    s_ctx = s_own_ctx ? mg_zmq.ctx_new() : ctx;
    if (s_ctx == NULL)
        return MG_ERR;
    s_sock = mg_zmq.socket(s_ctx, MG_ZMQ_PUSH);
    if (s_sock == NULL)
        goto error;
    if (mg_zmq.setsockopt(s_sock, MG_ZMQ_LINGER, &linger, sizeof(linger)) < 0 ||
        mg_zmq.setsockopt(s_sock, MG_ZMQ_SNDHWM, &hwm, sizeof(hwm)) < 0 ||
        mg_zmq.connect(s_sock, endpoint) < 0)
        goto error;
    s_period_ms = period_ms;
    atomic_store_explicit(&s_stop, 0, memory_order_release);
    rc = pthread_create(&s_thread, NULL, relay_main, NULL);
    if (rc != 0) {
        errno = rc;
        goto error;
    }
    /* Named so it shows as such in top -H, gdb and /proc/<pid>/task/<tid>/comm. */
    (void)pthread_setname_np(s_thread, "memguard-mon");
    atomic_store_explicit(&s_running, 1, memory_order_release);
    return MG_OK;

error:
    rc = errno;
    if (s_sock != NULL)
        mg_zmq.close(s_sock);
    if (s_own_ctx)
        mg_zmq.ctx_term(s_ctx);
    s_sock = NULL;
    s_ctx = NULL;
    errno = rc;
    return MG_ERR;
}

int mg_monitor_stop(void)
{
    if (!atomic_load_explicit(&s_running, memory_order_acquire))
        return MG_OK;
    atomic_store_explicit(&s_stop, 1, memory_order_release);
    pthread_join(s_thread, NULL);
    atomic_store_explicit(&s_running, 0, memory_order_release);
    mg_zmq.close(s_sock);
    if (s_own_ctx)
        mg_zmq.ctx_term(s_ctx);
    s_sock = NULL;
    s_ctx = NULL;
    return MG_OK;
}

int mg_monitor_running(void)
{
    return atomic_load_explicit(&s_running, memory_order_acquire);
}

uint64_t mg_monitor_sent(void)
{
    return atomic_load_explicit(&s_sent, memory_order_relaxed);
}

uint64_t mg_monitor_pending(void)
{
    uint64_t pushed = mg_ring_pushed();
    uint64_t done = atomic_load_explicit(&s_forwarded, memory_order_acquire);

    return pushed > done ? pushed - done : 0;
}

uint64_t mg_monitor_dropped(void)
{
    return atomic_load_explicit(&s_dropped, memory_order_relaxed);
}

/* In the child of fork() only the forking thread exists. The monitor thread is gone and
 * its zmq context belongs to the parent's I/O threads, so the child stops counting and
 * forgets the state without closing anything (memray Tracker::childFork). */
static void relay_atfork_child(void)
{
    mg_acct_set_enabled(0);
    mg_measures_atfork_child();
    mg_blackbox_atfork_child();
    atomic_store_explicit(&s_running, 0, memory_order_release);
    s_sock = NULL;
    s_ctx = NULL;
}

int mg_monitor_atfork_register(void)
{
    static int registered = 0; /* GIL held (module init) */

    if (registered)
        return 0;
    registered = 1;
    return pthread_atfork(NULL, NULL, relay_atfork_child);
}
