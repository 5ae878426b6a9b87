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
#include "mg_reentry.h"

/* csrc/hooks_native.c, when linked (the extension); the C tests link no native hooks. */
extern void mg_native_settle_at(int64_t rss) __attribute__((weak));
extern int mg_native_settle_needed(int64_t rss, int64_t slack) __attribute__((weak));
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
/* Polls made by the thread since mg_monitor_start: written by the thread (relaxed RMW) and
 * zeroed by start before the thread exists; read by anyone (relaxed). */
static _Atomic uint64_t s_polls = 0;
/* The monitor's native settles and their CPU time (ns) since the process began: written by
 * the thread (relaxed RMW), read by anyone (relaxed; counters, nothing ordered on them). */
static _Atomic uint64_t s_settles = 0;
static _Atomic uint64_t s_settle_cpu_ns = 0;

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

/* --- The launcher's socket (include/mg_monitor.h, "The launcher's socket") -------------
 * A second PUSH to memguard's kernel launcher, which publishes alerts on IOPub without this
 * process's GIL. s_launcher_ep: written by mg_monitor_set_launcher (GIL held) while the
 * thread is not running. s_launcher: written by start/stop/atfork while the thread is not
 * running; used only by the thread in between (pthread_create/join order the accesses). */
static char s_launcher_ep[256] = "";
static void *s_launcher = NULL;
/* Written by the thread (relaxed); read by anyone. */
static _Atomic uint64_t s_launcher_sent = 0;
static _Atomic uint64_t s_launcher_dropped = 0;

int mg_monitor_set_launcher(const char *endpoint)
{
    size_t n = endpoint == NULL ? 0 : strlen(endpoint);

    if (atomic_load_explicit(&s_running, memory_order_acquire)) {
        errno = EALREADY;
        return MG_ERR;
    }
    if (n >= sizeof(s_launcher_ep)) {
        errno = ENAMETOOLONG;
        return MG_ERR;
    }
    memcpy(s_launcher_ep, n ? endpoint : "", n + 1);
    return MG_OK;
}

/* In mg_monitor_start, once s_ctx exists: connect the launcher's socket if an endpoint is
 * set. Returns 0 or -1 with errno set by libzmq. */
static int launcher_open(void)
{
    int linger = 0;
    int hwm = 1000;

    if (s_launcher_ep[0] == '\0')
        return 0;
    s_launcher = mg_zmq.socket(s_ctx, MG_ZMQ_PUSH);
    if (s_launcher == NULL)
        return -1;
    if (mg_zmq.setsockopt(s_launcher, MG_ZMQ_LINGER, &linger, sizeof(linger)) < 0 ||
        mg_zmq.setsockopt(s_launcher, MG_ZMQ_SNDHWM, &hwm, sizeof(hwm)) < 0 ||
        mg_zmq.connect(s_launcher, s_launcher_ep) < 0) {
        int saved = errno;

        mg_zmq.close(s_launcher);
        s_launcher = NULL;
        errno = saved;
        return -1;
    }
    return 0;
}

static void launcher_close(void)
{
    if (s_launcher != NULL)
        mg_zmq.close(s_launcher);
    s_launcher = NULL;
}

/* Monitor thread: the record, to the launcher too (never blocks). */
static void launcher_send(const mg_wire_t *w)
{
    if (s_launcher == NULL)
        return;
    if (mg_zmq.send(s_launcher, w, sizeof(*w), MG_ZMQ_DONTWAIT) >= 0)
        atomic_fetch_add_explicit(&s_launcher_sent, 1, memory_order_relaxed);
    else
        atomic_fetch_add_explicit(&s_launcher_dropped, 1, memory_order_relaxed);
}

uint64_t mg_monitor_launcher_sent(void)
{
    return atomic_load_explicit(&s_launcher_sent, memory_order_relaxed);
}

uint64_t mg_monitor_launcher_dropped(void)
{
    return atomic_load_explicit(&s_launcher_dropped, memory_order_relaxed);
}
/* --- end of the launcher's socket ------------------------------------------------------ */

/* Make the record and send it. Every record of an alert kind is first written into the
 * black box (mg_blackbox_monitor_alert), so the box holds it even if the kernel dies before
 * Python sees it. */
static void monitor_send(uint32_t kind, int64_t epoch, int32_t line, int64_t bytes,
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
    mg_blackbox_monitor_alert(&w); /* no-op without an open box */
    if (mg_zmq_check(mg_zmq.send(s_sock, &w, sizeof(w), MG_ZMQ_DONTWAIT)) == 0)
        atomic_fetch_add_explicit(&s_sent, 1, memory_order_relaxed);
    launcher_send(&w); /* the launcher's socket: no-op without one */
}

/* What the monitor thread remembers between polls (its own stack: no other thread). */
typedef struct monitor_state {
    int64_t alerted_epoch; /* the cell whose budget alert was sent last (0 = none) */
    int32_t alerted_line;  /* that alert's line */
    int64_t last_usage;    /* the figure in the last budget record for alerted_epoch */
    int by_rss;            /* that alert came from the RSS rule: follow RSS growth */
    int64_t limit_epoch;   /* the cell that got the last limit record (-1 = none) */
    int64_t limit_last;    /* the measure in that record, bytes */
    unsigned settled_tick; /* the poll of the last native settle (its RSS: hooks_native.c) */
    int64_t settle_ok_ns;  /* CLOCK_MONOTONIC ns before which no settle starts */
} monitor_state_t;

static int64_t clock_ns(clockid_t clock)
{
    struct timespec ts;

    if (clock_gettime(clock, &ts) != 0)
        return 0;
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Measure the native mappings (mg_native_settle_at) at an RSS sample when RSS moved by
 * more than MG_SETTLE_RSS_STEP or a mapping came or went since they were last measured
 * (mg_native_settle_needed), or MG_SETTLE_MAX_MS passed, and no sooner than
 * MG_SETTLE_COST_RATIO times the CPU time the last measure took after it (mg_monitor.h);
 * count the measures and their CPU time (mg_monitor_settles). CPU time, not wall
 * time: a monitor thread preempted on a busy machine would otherwise space the measures
 * far apart, and a budget alert on Arrow's memory could come after its cell ended. */
static void monitor_settle(monitor_state_t *st, int64_t sampled, unsigned tick,
                           unsigned settle_every)
{
    int64_t now;
    int64_t cpu0;
    int64_t cost;

    if (!mg_native_settle_needed(sampled, MG_SETTLE_RSS_STEP) &&
        tick - st->settled_tick < settle_every)
        return;
    now = clock_ns(CLOCK_MONOTONIC);
    if (now < st->settle_ok_ns)
        return;
    cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    mg_native_settle_at(sampled);
    cost = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    st->settle_ok_ns = now + cost * MG_SETTLE_COST_RATIO;
    st->settled_tick = tick;
    atomic_fetch_add_explicit(&s_settles, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s_settle_cpu_ns, (uint64_t)(cost > 0 ? cost : 0),
                              memory_order_relaxed);
}

/* Rule 1, ring forwarding: send every event the hooks pushed, and remember a budget
 * alert so its growth can be followed. */
static void monitor_forward_ring(monitor_state_t *st)
{
    mg_event_t ev;

    while (mg_ring_pop(&ev) == 0) {
        monitor_send(ev.kind, ev.epoch, ev.line, ev.bytes, ev.usage, ev.count, ev.t);
        atomic_fetch_add_explicit(&s_forwarded, 1, memory_order_release);
        if (ev.kind == MG_KIND_BUDGET) {
            st->alerted_epoch = ev.epoch;
            st->alerted_line = ev.line;
            st->last_usage = ev.usage;
            st->by_rss = 0;
        }
    }
}

/* Rule 2, the limit rule (after a fresh sample): once per cell when the limit's measure
 * passes its alert fraction, then an update each time it grows by another MG_LIMIT_STEP of
 * the limit. */
static void monitor_limit_rule(monitor_state_t *st, const mg_acct_snapshot_t *snap)
{
    int64_t limit;
    int measure;
    double fraction;
    int64_t used;

    mg_acct_get_limit(&limit, &measure, &fraction);
    if (limit <= 0)
        return;
    used = mg_measures_used((mg_measure_t)measure);
    if ((double)used < (double)limit * fraction)
        return;
    if (st->limit_epoch == snap->epoch &&
        (double)(used - st->limit_last) < (double)limit * MG_LIMIT_STEP)
        return;
    monitor_send(MG_KIND_LIMIT, snap->epoch, -1, used, used, measure, mg_ring_now());
    st->limit_epoch = snap->epoch;
    st->limit_last = used;
}

/* Rule 3, the RSS budget rule (after a fresh sample): a cell with a budget, not crossed
 * yet, whose RSS grew by more than its budget crosses it on RSS (memory no hook counted).
 * Returns 1 when it sent that record. */
static int monitor_rss_budget_rule(monitor_state_t *st, const mg_acct_snapshot_t *snap)
{
    mg_measures_snapshot_t rss;
    int64_t grown;
    int64_t tracked;
    int won;

    if (snap->budget <= 0 || snap->crossed)
        return 0;
    mg_measures_snapshot(&rss);
    /* cell_start is 0 until a cell began through mg_measures_cell_begin (C tests). */
    if (rss.cell_start <= 0)
        return 0;
    grown = rss.last - rss.cell_start;
    if (grown <= snap->budget)
        return 0;
    won = mg_acct_cross(snap->epoch); /* a hook may have crossed it meanwhile */
    if (!won)
        return 0;
    tracked = snap->tracked - snap->cell_start;
    monitor_send(MG_KIND_BUDGET_RSS, snap->epoch, -1, grown - tracked, grown, 0, mg_ring_now());
    st->alerted_epoch = snap->epoch;
    st->alerted_line = -1;
    st->last_usage = grown;
    st->by_rss = 1;
    return 1;
}

/* Rule 4, growth updates: once the running cell's budget alert is out, a
 * MG_KIND_BUDGET_GROW record each time its peak (RSS peak for an alert from the RSS rule)
 * has grown by MG_GROW_STEP since the last record. */
static void monitor_growth_updates(monitor_state_t *st, const mg_acct_snapshot_t *snap)
{
    int64_t now;

    if (st->alerted_epoch == 0 || snap->epoch != st->alerted_epoch || !snap->crossed)
        return;
    if (st->by_rss) {
        mg_measures_snapshot_t rss;

        mg_measures_snapshot(&rss);
        now = rss.cell_peak - rss.cell_start;
    } else {
        now = snap->cell_peak - snap->cell_start;
    }
    if ((double)now < (double)st->last_usage * (1.0 + MG_GROW_STEP))
        return;
    monitor_send(MG_KIND_BUDGET_GROW, st->alerted_epoch, st->alerted_line, 0, now, 0,
                 mg_ring_now());
    st->last_usage = now;
}

/* Sleep one period. nanosleep(2) fails with EINTR when a signal handler runs in this
 * thread (a process-directed signal may be delivered to any thread): sleep what remains.
 * Any other failure is EINVAL or EFAULT, which the timespec mg_monitor_start validated
 * rules out; returns -1 then, so the caller stops rather than spins. */
static int monitor_nap(const struct timespec *period)
{
    struct timespec left = *period;

    while (nanosleep(&left, &left) != 0) {
        if (errno != EINTR)
            return -1;
    }
    return 0;
}

static void *monitor_main(void *arg)
{
    /* period_ms is 1-1000 (mg_monitor_start), so tv_nsec stays below 1e9. */
    struct timespec period = {s_period_ms / 1000, (long)(s_period_ms % 1000) * 1000000L};
    monitor_state_t st = {0, -1, 0, 0, -1, 0, 0, 0};
    unsigned bb_every = MG_BB_SAMPLE_MS / (unsigned)s_period_ms;
    unsigned rss_every = MG_RSS_SAMPLE_MS / (unsigned)s_period_ms;
    unsigned settle_every = MG_SETTLE_MAX_MS / (unsigned)s_period_ms;
    unsigned tick = 0;

    (void)arg;
    /* This thread's own allocations (libzmq's, through native hooks) are memguard's, not
     * the notebook's: the reentrancy guard stays entered for the thread's life. */
    (void)mg_reentry_enter();
    if (bb_every == 0)
        bb_every = 1;
    if (rss_every == 0)
        rss_every = 1;
    while (!atomic_load_explicit(&s_stop, memory_order_acquire)) {
        mg_acct_snapshot_t snap;
        int rss_crossed = 0;
        int64_t sampled = -1;

        monitor_forward_ring(&st);
        if (tick % rss_every == 0) {
            sampled = mg_measures_sample();
            /* Native mappings are counted by their resident pages, measured here (before
             * the snapshot, so a crossing they cause is seen by the RSS rule). Weak: the C
             * tests link no native hooks. */
            if (mg_native_settle_at != NULL)
                monitor_settle(&st, sampled, tick, settle_every);
        }
        mg_acct_snapshot(&snap);
        /* Rule 5, the black-box tick: state and one timeline sample every MG_BB_SAMPLE_MS. */
        if (tick % bb_every == 0)
            mg_blackbox_tick(); /* no-op without an open box */
        if (tick % rss_every == 0) {
            if (sampled >= 0)
                monitor_limit_rule(&st, &snap);
            rss_crossed = monitor_rss_budget_rule(&st, &snap);
        }
        /* A crossing on RSS this poll is the alert itself: its growth is followed from the
         * next poll on. */
        if (!rss_crossed)
            monitor_growth_updates(&st, &snap);
        tick++;
        atomic_fetch_add_explicit(&s_polls, 1, memory_order_relaxed);
        if (monitor_nap(&period) < 0)
            break;
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
    if (launcher_open() < 0) /* the launcher's socket, when an endpoint is set */
        goto error;
    s_period_ms = period_ms;
    atomic_store_explicit(&s_polls, 0, memory_order_relaxed);
    atomic_store_explicit(&s_stop, 0, memory_order_release);
    rc = pthread_create(&s_thread, NULL, monitor_main, NULL);
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
    launcher_close();
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
    launcher_close();
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

uint64_t mg_monitor_polls(void)
{
    return atomic_load_explicit(&s_polls, memory_order_relaxed);
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

uint64_t mg_monitor_settles(void)
{
    return atomic_load_explicit(&s_settles, memory_order_relaxed);
}

uint64_t mg_monitor_settle_cpu_ns(void)
{
    return atomic_load_explicit(&s_settle_cpu_ns, memory_order_relaxed);
}

/* In the child of fork() only the forking thread exists. The monitor thread is gone and
 * its zmq context belongs to the parent's I/O threads, so the child stops counting and
 * forgets the state without closing anything (memray Tracker::childFork). */
static void monitor_atfork_child(void)
{
    mg_acct_set_enabled(0);
    mg_measures_atfork_child();
    mg_blackbox_atfork_child();
    atomic_store_explicit(&s_running, 0, memory_order_release);
    s_sock = NULL;
    s_launcher = NULL; /* leaked with the parent's context, never closed here */
    s_ctx = NULL;
}

int mg_monitor_atfork_register(void)
{
    static int registered = 0; /* GIL held (module init) */

    if (registered)
        return 0;
    registered = 1;
    return pthread_atfork(NULL, NULL, monitor_atfork_child);
}
