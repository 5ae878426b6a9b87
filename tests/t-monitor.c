/* Tests of csrc/monitor.c over real ZeroMQ sockets: a PULL socket bound to an ipc://
 * endpoint receives what the monitor thread sends; errors; fork leaves the child quiet. */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "mg_acct.h"
#include "mg_monitor.h"
#include "mg_ring.h"
#include "mg_measures.h"
#include "mg_zmq.h"
#include "tap.h"

static void *s_ctx;
static void *s_pull;
static char s_endpoint[128];

/* Stand-ins for csrc/hooks_native.c's settle functions, which monitor.c declares weak
 * (t_settle_spaced_by_its_cost). Off, they measure nothing and say nothing is needed.
 * s_settle_on: written by the test thread, read by the monitor (relaxed: a poll that sees
 * the old value merely settles one poll later or sooner). The others: written by the
 * monitor thread (relaxed RMW or store), read by the test thread after mg_monitor_stop
 * joined it. */
static _Atomic int s_settle_on = 0;
static _Atomic int s_settle_calls = 0;
static _Atomic int64_t s_settle_slack = -1;

static int64_t thread_cpu_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int mg_native_settle_needed(int64_t rss, int64_t slack)
{
    (void)rss;
    atomic_store_explicit(&s_settle_slack, slack, memory_order_relaxed);
    return atomic_load_explicit(&s_settle_on, memory_order_relaxed);
}

/* On: 2 ms of this thread's CPU time, as a large mapping's mincore walk would take. */
void mg_native_settle_at(int64_t rss)
{
    int64_t until;

    (void)rss;
    if (!atomic_load_explicit(&s_settle_on, memory_order_relaxed))
        return;
    atomic_fetch_add_explicit(&s_settle_calls, 1, memory_order_relaxed);
    until = thread_cpu_ns() + 2000000;
    while (thread_cpu_ns() < until) {
    }
}

static int recv_wire(mg_wire_t *w, int timeout_ms)
{
    zmq_setsockopt(s_pull, ZMQ_RCVTIMEO, &timeout_ms, sizeof(timeout_ms));
    return zmq_recv(s_pull, w, sizeof(*w), 0);
}

/* What every test starts from, whatever the one before it left: no monitor, zeroed
 * counters and ring, no limit, counting off, and no record waiting on the PULL socket. */
static void fresh(void)
{
    mg_wire_t w;

    mg_monitor_stop();
    mg_acct_set_enabled(0);
    mg_acct_reset();
    mg_ring_reset();
    mg_acct_set_limit(0, MG_MEASURE_RSS, 0.9);
    while (recv_wire(&w, 0) >= 0) {
        /* a record a previous test did not read */
    }
}

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The budget event of cell 42 (line 3, 1500 bytes over a budget of 1000), pushed to the
 * ring, and the monitor started: the first record on the socket is its budget record. */
static void start_with_budget_event(void)
{
    mg_event_t ev;

    mg_acct_cell_begin(42, 1000);
    mg_acct_alloc(MG_DOMAIN_NUMPY, 1500);
    memset(&ev, 0, sizeof(ev));
    ev.kind = MG_KIND_BUDGET;
    ev.epoch = 42;
    ev.line = 3;
    ev.bytes = 1500;
    ev.usage = 1500;
    ev.t = mg_ring_now();
    check_int(mg_ring_push(&ev), ==, 0);
    check_int(mg_monitor_start(s_endpoint, 1, NULL), ==, 0);
}

static void t_budget_event_arrives_as_a_record(void)
{
    mg_wire_t w;

    fresh();
    start_with_budget_event();
    check_int(recv_wire(&w, 2000), ==, (int)sizeof(w));
    check_uint(w.version, ==, MG_WIRE_VERSION);
    check_uint(w.kind, ==, MG_KIND_BUDGET);
    check_int(w.epoch, ==, 42);
    check_int(w.line, ==, 3);
    check_int(w.bytes, ==, 1500);
    check_int(w.budget, ==, 1000);
    check_int(w.peak, ==, 1500);
    check_int(mg_monitor_stop(), ==, 0);
}

static void t_peak_growth_sends_an_update(void)
{
    mg_wire_t w;
    uint64_t sent0;

    fresh();
    sent0 = mg_monitor_sent(); /* counts over the process's life */
    start_with_budget_event();
    check_int(recv_wire(&w, 2000), ==, (int)sizeof(w));
    check_uint(w.kind, ==, MG_KIND_BUDGET); /* epoch 42 is alerted */
    mg_acct_alloc(MG_DOMAIN_NUMPY, 1000); /* usage 2500: +67% > MG_GROW_STEP */
    check_int(recv_wire(&w, 2000), ==, (int)sizeof(w));
    check_uint(w.kind, ==, MG_KIND_BUDGET_GROW);
    check_int(w.epoch, ==, 42);
    check_int(w.line, ==, 3);
    check_int(w.usage, ==, 2500);
    /* The monitor counts a send after zmq_send returns, which may be after we received. */
    for (int i = 0; i < 1000 && mg_monitor_sent() < sent0 + 2; i++)
        usleep(1000);
    check_uint(mg_monitor_sent(), ==, sent0 + 2);
    check_int(mg_monitor_stop(), ==, 0);
}

static void t_second_start_says_ealready(void)
{
    fresh();
    check_int(mg_monitor_start(s_endpoint, 1, NULL), ==, 0);
    errno = 0;
    check_int(mg_monitor_start(s_endpoint, 1, NULL), ==, -1);
    check_int(errno, ==, EALREADY);
    check_int(mg_monitor_running(), ==, 1);
    check_int(mg_monitor_stop(), ==, 0);
}

static void t_stop_joins_and_is_idempotent(void)
{
    fresh();
    check_int(mg_monitor_start(s_endpoint, 1, NULL), ==, 0);
    check_int(mg_monitor_running(), ==, 1);
    check_int(mg_monitor_stop(), ==, 0);
    check_int(mg_monitor_running(), ==, 0);
    check_int(mg_monitor_stop(), ==, 0);
}

static void t_bad_period_and_endpoint_fail_cleanly(void)
{
    fresh();
    errno = 0;
    check_int(mg_monitor_start(s_endpoint, 0, NULL), ==, -1);
    check_int(errno, ==, EINVAL);
    errno = 0;
    check_int(mg_monitor_start(s_endpoint, 1001, NULL), ==, -1);
    check_int(errno, ==, EINVAL);
    check_int(mg_monitor_start("nonsense://x", 5, NULL), ==, -1);
    check_int(mg_monitor_running(), ==, 0);
}

static void t_forked_child_is_quiet(void)
{
    pid_t pid;
    int status = 0;
    int fds[2];
    char verdict = 'x';
    mg_wire_t w;

    fresh();
    mg_acct_set_enabled(1);
    check_int(pipe(fds), ==, 0);
    check_int(mg_monitor_start(s_endpoint, 1, NULL), ==, 0);
    pid = fork();
    if (pid == 0) {
        mg_event_t ev;
        char ok;

        memset(&ev, 0, sizeof(ev));
        ev.kind = MG_KIND_BUDGET;
        ev.epoch = 99;
        mg_ring_push(&ev);
        /* The verdict goes through a pipe, not the exit status: under valgrind the child's
         * exit status reports the zmq context it leaks on purpose. */
        ok = mg_acct_enabled() == 0 && mg_monitor_running() == 0 && mg_monitor_stop() == 0 ? 'y' : 'n';
        if (write(fds[1], &ok, 1) != 1)
            _exit(2);
        _exit(0);
    }
    close(fds[1]);
    check_int(read(fds[0], &verdict, 1), ==, 1);
    close(fds[0]);
    waitpid(pid, &status, 0);
    check_int(WIFEXITED(status), ==, 1);
    check_int(verdict, ==, 'y');
    check_int(mg_acct_enabled(), ==, 1);
    /* The child's push went to its own copy of the ring; nothing reaches the parent's peer. */
    check_int(recv_wire(&w, 200), ==, -1);
    check_int(mg_monitor_stop(), ==, 0);
    mg_acct_set_enabled(0);
}

static void t_limit_and_rss_budget_records(void)
{
    mg_wire_t w;
    int64_t rss = mg_measures_read();
    int got_limit = 0;
    int got_rss = 0;

    fresh();
    mg_measures_cell_begin();
    mg_acct_cell_begin(7, 4096); /* tiny budget: RSS growth of one page-in crosses it */
    /* A limit already half used: the monitor's first sample passes a 0.5 fraction. */
    mg_acct_set_limit(rss + rss / 2, MG_MEASURE_RSS, 0.5);
    check_int(mg_monitor_start(s_endpoint, 1, NULL), ==, 0);
    {
        /* Grow RSS by 8 MB outside every hook, as native code would. */
        static char block[8 << 20];
        memset(block, 1, sizeof(block));
    }
    for (int i = 0; i < 4 && !(got_limit && got_rss); i++) {
        if (recv_wire(&w, 2000) != (int)sizeof(w))
            break;
        if (w.kind == MG_KIND_LIMIT) {
            got_limit = 1;
            check_int(w.count, ==, MG_MEASURE_RSS);
            check_int(w.bytes, >=, rss / 2);
        } else if (w.kind == MG_KIND_BUDGET_RSS) {
            got_rss = 1;
            check_int(w.epoch, ==, 7);
            check_int(w.usage, >, 4096);
            check_int(w.bytes, >, 0); /* untracked: no hook counted the 8 MB */
        }
    }
    check_int(got_limit, ==, 1);
    check_int(got_rss, ==, 1);
    check_int(mg_monitor_stop(), ==, 0);
    mg_acct_set_limit(0, MG_MEASURE_RSS, 0.9);
}

/* In a context lent by the caller (as pyzmq's is in a kernel), inproc:// reaches a PULL
 * socket of that context, and stopping the monitor leaves the context usable. */
static void t_lent_context_reaches_inproc_peer(void)
{
    void *pull = zmq_socket(s_ctx, ZMQ_PULL);
    void *saved = s_pull;
    mg_event_t ev;
    mg_wire_t w;
    int linger = 0;

    fresh();
    zmq_setsockopt(pull, ZMQ_LINGER, &linger, sizeof(linger));
    check_int(zmq_bind(pull, "inproc://mg-t-monitor"), ==, 0);
    mg_acct_cell_begin(7, 1000);
    memset(&ev, 0, sizeof(ev));
    ev.kind = MG_KIND_BUDGET;
    ev.epoch = 7;
    ev.bytes = 1234;
    ev.t = mg_ring_now();
    check_int(mg_ring_push(&ev), ==, 0);
    check_int(mg_monitor_start("inproc://mg-t-monitor", 1, s_ctx), ==, 0);
    s_pull = pull;
    check_int(recv_wire(&w, 2000), ==, (int)sizeof(w));
    s_pull = saved;
    check_int(w.epoch, ==, 7);
    check_int(w.bytes, ==, 1234);
    check_int(mg_monitor_stop(), ==, 0);
    /* The lent context was not terminated: a new socket can still be made in it. */
    void *again = zmq_socket(s_ctx, ZMQ_PUSH);
    check_int(again != NULL, ==, 1);
    zmq_close(again);
    zmq_close(pull);
}

static void on_usr1(int sig)
{
    (void)sig; /* only there to interrupt the monitor's sleep */
}

/* The monitor thread's id, found by the name it gives itself, or 0. */
static pid_t monitor_tid(void)
{
    char path[300];
    char name[32];
    DIR *dir = opendir("/proc/self/task");
    struct dirent *de;
    pid_t tid = 0;

    if (dir == NULL)
        return 0;
    while (tid == 0 && (de = readdir(dir)) != NULL) {
        FILE *f;

        if (de->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "/proc/self/task/%s/comm", de->d_name);
        f = fopen(path, "r");
        if (f == NULL)
            continue;
        if (fgets(name, sizeof(name), f) != NULL && strncmp(name, "memguard-mon", 12) == 0)
            tid = (pid_t)atoi(de->d_name);
        fclose(f);
    }
    closedir(dir);
    return tid;
}

/* A period of 1000 ms (the longest allowed) sleeps a whole second between polls, even
 * when signals interrupt the sleep: nanosleep must get a valid timespec (tv_nsec below
 * 1e9) and, on EINTR, sleep what remains. */
static void t_longest_period_sleeps_it_whole_despite_signals(void)
{
    struct sigaction sa;
    struct sigaction old;
    uint64_t first;
    double t0;
    double deadline;
    pid_t tid = 0;
    int signals = 0;

    fresh();
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_usr1; /* no SA_RESTART: the sleep fails with EINTR */
    sigemptyset(&sa.sa_mask);
    check_int(sigaction(SIGUSR1, &sa, &old), ==, 0);
    check_int(mg_monitor_start(s_endpoint, 1000, NULL), ==, 0);
    deadline = now_s() + 5.0;
    while (mg_monitor_polls() == 0 && now_s() < deadline)
        usleep(1000);
    first = mg_monitor_polls();
    check_uint(first, >=, 1);
    t0 = now_s();
    for (deadline = t0 + 5.0; tid == 0 && now_s() < deadline; usleep(1000))
        tid = monitor_tid();
    check_int(tid, >, 0);
    /* Interrupt the sleep every 50 ms until the next poll comes. */
    while (mg_monitor_polls() == first && now_s() < deadline) {
        if (tid > 0 && syscall(SYS_tgkill, getpid(), tid, SIGUSR1) == 0)
            signals++;
        usleep(50000);
    }
    check_uint(mg_monitor_polls(), ==, first + 1);
    check_double(now_s() - t0, >=, 0.9); /* the poll's own work is under 100 ms */
    check_int(signals, >=, 2);
    check_int(mg_monitor_stop(), ==, 0);
    sigaction(SIGUSR1, &old, NULL);
}

/* The monitor measures native mappings at RSS samples (every 10 ms at a 1 ms period) when
 * told RSS moved by more than MG_SETTLE_RSS_STEP, but no sooner than MG_SETTLE_COST_RATIO
 * times the last measure's CPU time after it: with every measure taking 2 ms of CPU and
 * needed at every sample, they come at least 200 ms apart, not 10, and its counters give
 * their number and CPU time. */
static void t_settle_spaced_by_its_cost(void)
{
    uint64_t settles0 = mg_monitor_settles();
    uint64_t cpu0 = mg_monitor_settle_cpu_ns();
    double t0;
    double elapsed;
    int calls;

    fresh();
    atomic_store_explicit(&s_settle_calls, 0, memory_order_relaxed);
    atomic_store_explicit(&s_settle_on, 1, memory_order_relaxed);
    t0 = now_s();
    check_int(mg_monitor_start(s_endpoint, 1, NULL), ==, 0);
    while (atomic_load_explicit(&s_settle_calls, memory_order_relaxed) < 3 && now_s() < t0 + 20)
        usleep(1000);
    check_int(mg_monitor_stop(), ==, 0);
    elapsed = now_s() - t0;
    atomic_store_explicit(&s_settle_on, 0, memory_order_relaxed);
    calls = atomic_load_explicit(&s_settle_calls, memory_order_relaxed);
    check_int(calls, >=, 3);
    /* n measures span at least (n - 1) x 200 ms: the first comes at the first sample. */
    check_double(elapsed, >=, (calls - 1) * 0.2 * 0.95);
    check_int(atomic_load_explicit(&s_settle_slack, memory_order_relaxed), ==,
              MG_SETTLE_RSS_STEP);
    check_uint(mg_monitor_settles() - settles0, ==, (uint64_t)calls);
    check_uint(mg_monitor_settle_cpu_ns() - cpu0, >=, (uint64_t)calls * 2000000u);
}

int main(void)
{
    int linger = 0;
    const char *why = NULL;

    if (mg_zmq_load(NULL, &why) != 0)
        test_skip_all(why);

    snprintf(s_endpoint, sizeof(s_endpoint), "ipc:///tmp/mg-t-monitor-%d", (int)getpid());
    s_ctx = zmq_ctx_new();
    s_pull = zmq_socket(s_ctx, ZMQ_PULL);
    zmq_setsockopt(s_pull, ZMQ_LINGER, &linger, sizeof(linger));
    if (zmq_bind(s_pull, s_endpoint) != 0)
        test_skip_all("cannot bind an ipc:// endpoint in /tmp");
    if (mg_monitor_atfork_register() != 0)
        test_skip_all("pthread_atfork failed");
    plan(10);
    TEST(t_budget_event_arrives_as_a_record(), "a budget event in the ring reaches the PULL peer as a 64-byte record");
    TEST(t_peak_growth_sends_an_update(), "peak growth of more than 10% after an alert sends an update record");
    TEST(t_second_start_says_ealready(), "starting a running relay fails with EALREADY");
    TEST(t_stop_joins_and_is_idempotent(), "mg_monitor_stop joins the thread and can be called twice");
    TEST(t_bad_period_and_endpoint_fail_cleanly(), "a bad period or endpoint fails without starting a thread");
    TEST(t_forked_child_is_quiet(), "a forked child stops counting, has no monitor and sends nothing");
    TEST(t_limit_and_rss_budget_records(), "the monitor sends a limit record past the fraction and a budget record for untracked RSS growth");
    TEST(t_longest_period_sleeps_it_whole_despite_signals(),
         "a 1000 ms period sleeps a whole second between polls, even when signals interrupt it");
    TEST(t_settle_spaced_by_its_cost(),
         "native settles needed at every sample are spaced by 100 times their CPU time, and counted");
    TEST(t_lent_context_reaches_inproc_peer(), "in a lent context the monitor reaches an inproc:// peer and leaves the context alive");
    zmq_close(s_pull);
    zmq_ctx_term(s_ctx);
    unlink(s_endpoint + strlen("ipc://"));
    return test_done();
}
