/* Tests of csrc/blackbox.c: the file a reader finds after a clean close and after the
 * writer aborts mid-run (a crash), the fork child's silence, and removal on clean close. */
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mg_acct.h"
#include "mg_blackbox.h"
#include "mg_monitor.h"
#include "mg_measures.h"
#include "mg_ring.h"
#include "mg_zmq.h"
#include "tap.h"

static char s_dir[64];

static int read_box(const char *path, mg_bb_file_t *out)
{
    int fd = open(path, O_RDONLY);
    ssize_t n;

    if (fd < 0)
        return -1;
    n = read(fd, out, sizeof(*out));
    close(fd);
    return n == (ssize_t)sizeof(*out) ? 0 : -1;
}

static const mg_bb_state_t *newest(const mg_bb_file_t *f)
{
    uint64_t a = atomic_load(&f->state[0].seq);
    uint64_t b = atomic_load(&f->state[1].seq);

    if ((a & 1) && (b & 1))
        return NULL;
    if (a & 1)
        return &f->state[1];
    if (b & 1)
        return &f->state[0];
    return a > b ? &f->state[0] : &f->state[1];
}

static mg_bb_file_t s_file; /* 106 KiB: static, not on the stack */

static void t_clean_close_leaves_a_readable_box(void)
{
    char path[128];
    const mg_bb_state_t *st;
    const char *src = "import numpy as np\nx = np.ones(10)\n";
    const char *parent = "{\"msg_id\": \"abc_1\", \"msg_type\": \"execute_request\"}";

    snprintf(path, sizeof(path), "%s/clean.mgbox", s_dir);
    mg_acct_reset();
    mg_acct_cell_begin(3, 5000);
    check_int(mg_blackbox_open(path, "kernel-abc.json"), ==, 0);
    check_int(mg_blackbox_open(path, "kernel-abc.json"), ==, -1); /* EALREADY */
    mg_blackbox_set_cell(3, 7, src, strlen(src), parent, strlen(parent));
    mg_blackbox_add_alert(3, 7, 0, 2, 123456, "over budget", 11);
    mg_acct_alloc(MG_DOMAIN_NUMPY, 4096);
    mg_measures_sample(); /* the monitor samples before it ticks */
    mg_blackbox_tick();
    mg_blackbox_tick();
    mg_blackbox_tick();
    check_int(mg_blackbox_close(0), ==, 0);
    check_int(read_box(path, &s_file), ==, 0);
    check_int(memcmp(s_file.header.magic, MG_BB_MAGIC, 8), ==, 0);
    check_uint(s_file.header.layout, ==, MG_BB_LAYOUT);
    check_int(s_file.header.pid, ==, getpid());
    check_int(strcmp(s_file.header.connection, "kernel-abc.json"), ==, 0);
    check_int(s_file.cell.count, ==, 7);
    check_uint(s_file.cell.source_len, ==, strlen(src));
    check_int(memcmp(s_file.cell.source, src, strlen(src)), ==, 0);
    check_uint(s_file.cell.parent_len, ==, strlen(parent));
    check_int(memcmp(s_file.cell.parent, parent, strlen(parent)), ==, 0);
    /* A shorter cell after a longer one leaves nothing of the longer one behind it. */
    {
        static char longer[MG_BB_SOURCE_MAX + 100];
        mg_bb_file_t *after = calloc(1, sizeof(*after));

        memset(longer, 'x', sizeof(longer));
        check_int(mg_blackbox_open(path, "kernel-abc.json"), ==, 0);
        mg_blackbox_set_cell(4, 8, longer, sizeof(longer), parent, strlen(parent));
        mg_blackbox_set_cell(5, 9, "y = 1\n", 6, "{}", 2);
        check_int(mg_blackbox_close(0), ==, 0);
        check_int(read_box(path, after), ==, 0);
        check_uint(after->cell.source_len, ==, 6);
        check_int(memcmp(after->cell.source, "y = 1\n", 6), ==, 0);
        check_uint(after->cell.parent_len, ==, 2);
        int dirty = 0;
        for (size_t i = 6; i < MG_BB_SOURCE_MAX; i++)
            dirty += after->cell.source[i] != 0;
        for (size_t i = 2; i < MG_BB_PARENT_MAX; i++)
            dirty += after->cell.parent[i] != 0;
        check_int(dirty, ==, 0);
        free(after);
    }
    check_uint(s_file.alerts.total, ==, 1);
    check_int(s_file.alerts.ring[0].bytes, ==, 123456);
    check_uint(atomic_load(&s_file.samples_total), ==, 3);
    st = newest(&s_file);
    check(st != NULL);
    check_int(st->epoch, ==, 3);
    check_int(st->cell_peak - st->cell_start, ==, 4096);
    check_int(st->budget, ==, 5000);
    check_int(st->rss, >, 0);
    unlink(path);
}

static void t_box_survives_an_abort_mid_run(void)
{
    char path[128];
    pid_t pid;
    int status = 0;
    const mg_bb_state_t *st;

    snprintf(path, sizeof(path), "%s/crash.mgbox", s_dir);
    pid = fork();
    if (pid == 0) {
        const char *src = "grow()\n";

        if (mg_blackbox_open(path, "kernel-crash.json") != 0)
            _exit(3);
        mg_acct_cell_begin(9, 0);
        mg_blackbox_set_cell(9, 4, src, strlen(src), NULL, 0);
        for (int i = 0; i < 5; i++) {
            mg_acct_alloc(MG_DOMAIN_NUMPY, 1 << 20);
            mg_blackbox_tick();
        }
        signal(SIGABRT, SIG_DFL);
        abort(); /* no close, no unmap: like the OOM killer's SIGKILL */
    }
    waitpid(pid, &status, 0);
    check_int(WIFSIGNALED(status), ==, 1);
    check_int(read_box(path, &s_file), ==, 0);
    check_int(s_file.header.pid, ==, pid);
    check_int(s_file.cell.count, ==, 4);
    check_uint(atomic_load(&s_file.samples_total), ==, 5);
    st = newest(&s_file);
    check(st != NULL);
    check_int(st->epoch, ==, 9);
    check_int(st->cell_peak - st->cell_start, ==, 5 << 20);
    unlink(path);
}

static void t_fork_child_does_not_write_the_parents_box(void)
{
    char path[128];
    pid_t pid;
    int status = 0;

    snprintf(path, sizeof(path), "%s/fork.mgbox", s_dir);
    check_int(mg_blackbox_open(path, "kernel-fork.json"), ==, 0);
    check_int(mg_monitor_atfork_register(), ==, 0);
    pid = fork();
    if (pid == 0) {
        mg_blackbox_set_cell(99, 99, "child", 5, NULL, 0); /* must be a no-op */
        _exit(mg_blackbox_is_open() ? 1 : 0);
    }
    waitpid(pid, &status, 0);
    check_int(WIFEXITED(status) && WEXITSTATUS(status) == 0, ==, 1);
    check_int(mg_blackbox_close(0), ==, 0);
    check_int(read_box(path, &s_file), ==, 0);
    check_int(s_file.cell.count, !=, 99);
    unlink(path);
}

static void t_clean_close_with_remove_deletes_the_file(void)
{
    char path[128];
    struct stat sb;

    snprintf(path, sizeof(path), "%s/gone.mgbox", s_dir);
    check_int(mg_blackbox_open(path, "kernel-gone.json"), ==, 0);
    check_int(stat(path, &sb), ==, 0);
    check_int(sb.st_size, ==, (long)sizeof(mg_bb_file_t));
    check_int(sb.st_size, <, 1 << 20);
    check_int(mg_blackbox_close(1), ==, 0);
    check_int(stat(path, &sb), ==, -1);
}

/* Reads the box at path into s_file until pred() holds or 5 s pass; returns pred(). */
static int poll_box(const char *path, int (*pred)(void))
{
    struct timespec ts;
    double deadline;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    deadline = (double)ts.tv_sec + 5.0;
    for (;;) {
        if (read_box(path, &s_file) == 0 && pred())
            return 1;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        if ((double)ts.tv_sec > deadline)
            return 0;
        usleep(1000);
    }
}

static int one_alert(void)
{
    return s_file.alerts.total >= 1 && atomic_load(&s_file.alerts.seq) % 2 == 0;
}

static int two_alerts(void)
{
    return s_file.alerts.total >= 2 && atomic_load(&s_file.alerts.seq) % 2 == 0;
}

static void push_event(uint32_t kind, int64_t epoch, int32_t line, int64_t bytes, int64_t count)
{
    mg_event_t ev;

    memset(&ev, 0, sizeof(ev));
    ev.kind = kind;
    ev.epoch = epoch;
    ev.line = line;
    ev.bytes = bytes;
    ev.usage = bytes;
    ev.count = count;
    ev.t = mg_ring_now();
    check_int(mg_ring_push(&ev), ==, 0);
}

/* The monitor writes each alert record into the box itself, with no Python involved (a
 * kernel that dies while C code holds the GIL still leaves its alerts); Python's later add
 * of the same alert (richer message) updates that entry instead of adding a second. */
static void t_monitor_writes_alerts_without_python(void)
{
    char path[128];
    char endpoint[160];
    const mg_bb_alert_t *a;

    snprintf(path, sizeof(path), "%s/monitor.mgbox", s_dir);
    snprintf(endpoint, sizeof(endpoint), "ipc://%s/nobody", s_dir); /* no peer: sends drop */
    mg_acct_reset();
    mg_ring_reset();
    mg_acct_cell_begin(12, 1000);
    mg_acct_alloc(MG_DOMAIN_NUMPY, 1500);
    check_int(mg_blackbox_open(path, "kernel-mon.json"), ==, 0);
    mg_blackbox_set_cell(12, 5, "x = grow()\n", 11, NULL, 0);
    push_event(MG_KIND_BUDGET, 12, 1, 1500, 0);
    check_int(mg_monitor_start(endpoint, 1, NULL), ==, 0);
    check_int(poll_box(path, one_alert), ==, 1);
    a = &s_file.alerts.ring[0];
    check_uint(s_file.alerts.total, ==, 1);
    check_int(a->kind, ==, MG_BB_KIND_BUDGET);
    check_int(a->epoch, ==, 12);
    check_int(a->count, ==, 5);
    check_int(a->line, ==, 1);
    check_int(a->bytes, ==, 1500);
    check_int(strlen(a->message), >, 0);
    push_event(MG_KIND_ACCUMULATION, 12, 1, 900, 3);
    check_int(poll_box(path, two_alerts), ==, 1);
    check_uint(s_file.alerts.total, ==, 2);
    check_int(s_file.alerts.ring[1].kind, ==, MG_BB_KIND_ACCUMULATION);
    check_int(s_file.alerts.ring[1].bytes, ==, 900);
    check_int(mg_monitor_stop(), ==, 0);
    /* The relay's add of the same budget alert, with its full message: merged. */
    mg_blackbox_add_alert(12, 5, MG_BB_KIND_BUDGET, 1, 2500, "the cell used 2.5 kB", 20);
    check_int(read_box(path, &s_file), ==, 0);
    check_uint(s_file.alerts.total, ==, 2);
    check_int(s_file.alerts.ring[0].bytes, ==, 2500);
    check_int(strcmp(s_file.alerts.ring[0].message, "the cell used 2.5 kB"), ==, 0);
    check_int(mg_blackbox_close(1), ==, 0);
}

static atomic_int s_tick_stop;
static atomic_uint s_ticks;

static void *ticker(void *arg)
{
    (void)arg;
    while (!atomic_load(&s_tick_stop)) {
        mg_blackbox_tick();
        atomic_fetch_add(&s_ticks, 1);
        sched_yield(); /* valgrind runs one thread at a time: hand over at once */
    }
    return NULL;
}

static void wait_ticks(unsigned n)
{
    unsigned from = atomic_load(&s_ticks);

    while (atomic_load(&s_ticks) - from < n)
        sched_yield();
}

/* Closing the box while another thread ticks it (as the monitor does) must wait for the
 * tick in progress: once mg_blackbox_close returns, nothing writes the unmapped box. The
 * test waits for further ticks after each close before reopening, so a tick still writing
 * the old mapping would fault rather than land in a new mapping at the same address. */
static void t_close_waits_for_a_tick_in_progress(void)
{
    char path[128];
    pthread_t th;
    int opened = 0;

    snprintf(path, sizeof(path), "%s/ticked.mgbox", s_dir);
    atomic_store(&s_tick_stop, 0);
    check_int(pthread_create(&th, NULL, ticker, NULL), ==, 0);
    struct timespec t0, t;
    int rounds = 0;

    clock_gettime(CLOCK_MONOTONIC, &t0);
    /* 200 rounds, or 3 s once 20 are done (valgrind is slow at hand-overs). */
    for (int i = 0; i < 200; i++, rounds++) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (i >= 20 && (t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 > 3.0)
            break;
        opened += mg_blackbox_open(path, "kernel-tick.json") == 0;
        wait_ticks(2);
        mg_blackbox_close(1);
        wait_ticks(2);
    }
    atomic_store(&s_tick_stop, 1);
    pthread_join(th, NULL);
    check_int(opened, ==, rounds);
    check_int(mg_blackbox_is_open(), ==, 0);
}

int main(void)
{
    snprintf(s_dir, sizeof(s_dir), "/tmp/mg-t-blackbox-XXXXXX");
    if (mkdtemp(s_dir) == NULL)
        test_skip_all("cannot create a directory in /tmp");
    const char *why = NULL;

    /* This test calls no zmq_* itself, so the linker drops -lzmq: load it by name. */
    if (mg_zmq_load("libzmq.so.5", &why) != 0)
        test_skip_all(why);
    plan(6);
    TEST(t_clean_close_leaves_a_readable_box(), "a box closed without removal reads back with header, cell, alert, state and samples");
    TEST(t_box_survives_an_abort_mid_run(), "a box whose writer aborted still holds the last state and the cell");
    TEST(t_fork_child_does_not_write_the_parents_box(), "a forked child never writes the parent's box");
    TEST(t_clean_close_with_remove_deletes_the_file(), "the box is under 1 MiB and a clean close removes it");
    TEST(t_monitor_writes_alerts_without_python(),
         "the monitor writes its alert records into the box, and a later add of the same alert updates it");
    TEST(t_close_waits_for_a_tick_in_progress(),
         "closing the box while another thread ticks it waits for the tick: no write after close");
    rmdir(s_dir);
    return test_done();
}
