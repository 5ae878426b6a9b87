/* Owns the black box file and its mapping (include/mg_blackbox.h): opened and closed by
 * Python (GIL held), the cell region written by Python, the alert region by Python and the
 * monitor thread, the state and timeline by the monitor thread. Only stores into the
 * mapping after open. */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "mg_acct.h"
#include "mg_blackbox.h"
#include "mg_measures.h"
#include "mg_monitor.h"
#include "mg_sites.h"

_Static_assert(sizeof(mg_bb_header_t) == 264, "header layout");
_Static_assert(sizeof(mg_bb_cell_t) == 48 + 16 * MG_BB_CELLS + MG_BB_PARENT_MAX + MG_BB_SOURCE_MAX,
               "cell layout");
_Static_assert(sizeof(mg_bb_site_t) == 32, "site layout");
_Static_assert(sizeof(mg_bb_state_t) == 120 + 32 * MG_BB_SITES, "state layout");
_Static_assert(sizeof(mg_bb_alert_t) == 40 + MG_BB_MESSAGE, "alert layout");
_Static_assert(sizeof(mg_bb_sample_t) == 40, "sample layout");
_Static_assert(sizeof(mg_bb_file_t) < (1u << 20), "the black box stays under 1 MiB");

/* The mapping and who is using it. Every access to the mapping goes through bb_enter /
 * bb_leave: bb_enter counts the caller in s_users, then loads s_box; mg_blackbox_close
 * swaps s_box to NULL, then waits until s_users is 0 before it unmaps. Both pairs are
 * seq_cst, so either the user's load sees NULL or the closer sees the user counted (a
 * store-load pattern that acquire/release alone would not order). So the monitor thread
 * may tick or write an alert at any moment, even while Python closes the box.
 * s_box: written by open/close (GIL held) and the fork child; read by every writer.
 * s_users: every writer (seq_cst RMW in, release RMW out); read by close (seq_cst). */
static _Atomic(mg_bb_file_t *) s_box = NULL;
static _Atomic unsigned s_users = 0;
/* Written by open, read by close: both Python, GIL held. */
static char s_path[4096];
/* The state copy counter and the RSS peak: written by open before it publishes s_box
 * (release, ordered by the seq_cst load in bb_enter), then only by the monitor's tick. */
static uint64_t s_state_seq = 0;
static int64_t s_rss_peak = 0;
/* The alert region has two writers, Python and the monitor thread: this flag serializes
 * them around the region's seqlock (test-and-set acquire, clear release). Neither holds it
 * while waiting for anything else, and the monitor never takes the GIL, so no deadlock. */
static atomic_flag s_alerts_lock = ATOMIC_FLAG_INIT;
/* The running cell's epoch and execution count, for the alerts the monitor writes: written
 * by mg_blackbox_set_cell (GIL held; count relaxed, then epoch release); read by the
 * monitor (epoch acquire, then count, then epoch again to check the pair). */
static _Atomic int64_t s_cell_epoch = 0;
static _Atomic int64_t s_cell_count = -1;

static mg_bb_file_t *bb_enter(void)
{
    mg_bb_file_t *f;

    atomic_fetch_add(&s_users, 1);
    f = atomic_load(&s_box);
    if (f == NULL)
        atomic_fetch_sub_explicit(&s_users, 1, memory_order_release);
    return f;
}

static void bb_leave(void)
{
    atomic_fetch_sub_explicit(&s_users, 1, memory_order_release);
}

static double bb_wall(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int mg_blackbox_open(const char *path, const char *connection)
{
    mg_bb_file_t *f;
    int fd;
    int err;

    if (atomic_load(&s_box) != NULL) {
        errno = EALREADY;
        return MG_ERR;
    }
    if (strlen(path) >= sizeof(s_path)) {
        errno = ENAMETOOLONG;
        return MG_ERR;
    }
    fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        return MG_ERR;
    if (ftruncate(fd, (off_t)sizeof(mg_bb_file_t)) < 0)
        goto error;
    f = mmap(NULL, sizeof(mg_bb_file_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (f == MAP_FAILED)
        goto error;
    close(fd); /* the mapping keeps the file */
    /* ftruncate zero-filled the file; fill the header last but the magic, so a reader of a
     * box killed during open sees no magic and sets it aside. */
    f->header.layout = MG_BB_LAYOUT;
    f->header.header_bytes = sizeof(mg_bb_header_t);
    f->header.file_bytes = sizeof(mg_bb_file_t);
    f->header.pid = (int64_t)getpid();
    f->header.started = bb_wall();
    f->header.sample_ms = MG_BB_SAMPLE_MS;
    f->header.n_samples = MG_BB_SAMPLES;
    f->header.n_sites = MG_BB_SITES;
    f->header.n_alerts = MG_BB_ALERTS;
    f->header.source_max = MG_BB_SOURCE_MAX;
    f->header.n_cells = MG_BB_CELLS;
    strncpy(f->header.connection, connection, sizeof(f->header.connection) - 1);
    f->cell.count = -1;
    atomic_thread_fence(memory_order_release);
    memcpy(f->header.magic, MG_BB_MAGIC, sizeof(f->header.magic));
    strcpy(s_path, path);
    s_state_seq = 0;
    s_rss_peak = 0;
    atomic_store(&s_box, f);
    return MG_OK;

error:
    err = errno;
    close(fd);
    unlink(path);
    errno = err;
    return MG_ERR;
}

int mg_blackbox_close(int remove)
{
    mg_bb_file_t *f = atomic_exchange(&s_box, NULL);

    if (f == NULL)
        return MG_OK;
    /* A tick or an alert write that entered before the swap finishes first (a few
     * microseconds); none can enter after it. */
    while (atomic_load(&s_users) != 0)
        sched_yield();
    munmap(f, sizeof(*f));
    if (remove)
        unlink(s_path);
    return MG_OK;
}

int mg_blackbox_is_open(void)
{
    return atomic_load(&s_box) != NULL;
}

/* Seqlock writer: odd before the data, even after (release both). */
static void bb_begin(_Atomic uint64_t *seq)
{
    atomic_store_explicit(seq, atomic_load_explicit(seq, memory_order_relaxed) | 1u,
                          memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
}

static void bb_end(_Atomic uint64_t *seq)
{
    atomic_store_explicit(seq, (atomic_load_explicit(seq, memory_order_relaxed) | 1u) + 1u,
                          memory_order_release);
}

void mg_blackbox_set_cell(int64_t epoch, int64_t count, const char *source, size_t len,
                          const char *parent, size_t parent_len)
{
    mg_bb_file_t *f;
    mg_bb_cell_t *c;
    size_t prev;

    atomic_store_explicit(&s_cell_count, count, memory_order_relaxed);
    atomic_store_explicit(&s_cell_epoch, epoch, memory_order_release);
    f = bb_enter();
    if (f == NULL)
        return;
    c = &f->cell;
    if (len > MG_BB_SOURCE_MAX)
        len = MG_BB_SOURCE_MAX;
    bb_begin(&c->seq);
    c->epoch = epoch;
    c->count = count;
    c->started = bb_wall();
    /* Only the bytes the previous cell's source and parent left beyond the new ones are
     * zeroed, not the whole fields (17 KiB a cell, most of the black box's cost per cell
     * in callgrind); the lengths read back are bounded, whatever the file held. */
    prev = c->source_len < MG_BB_SOURCE_MAX ? c->source_len : MG_BB_SOURCE_MAX;
    memcpy(c->source, source, len);
    if (len < prev)
        memset(c->source + len, 0, prev - len);
    c->source_len = (uint32_t)len;
    if (parent == NULL || parent_len > MG_BB_PARENT_MAX)
        parent_len = 0;
    if (parent_len > 0)
        memcpy(c->parent, parent, parent_len);
    prev = c->parent_len < MG_BB_PARENT_MAX ? c->parent_len : MG_BB_PARENT_MAX;
    if (parent_len < prev)
        memset(c->parent + parent_len, 0, prev - parent_len);
    c->parent_len = (uint32_t)parent_len;
    c->cells[c->cells_next % MG_BB_CELLS].epoch = epoch;
    c->cells[c->cells_next % MG_BB_CELLS].count = count;
    c->cells_next++;
    bb_end(&c->seq);
    bb_leave();
}

/* Alerts of these kinds are one per (cell, line), as the Python side keys them; the
 * others one per cell. */
static int bb_kind_per_line(int kind)
{
    return kind == MG_BB_KIND_ACCUMULATION || kind == MG_BB_KIND_SPARSE;
}

/* Write an alert into the ring, or update the entry of the same alert (same epoch and
 * kind, and line for per-line kinds) among those the ring still holds: the monitor's
 * record and Python's later add of the same alert (or an update of it) make one entry.
 * An update keeps the first time, takes the new bytes and message, and takes the line and
 * count only when known (> 0, >= 0), so the monitor's unknown line never erases one Python
 * gave. Any thread (not a hook). */
static void bb_put_alert(mg_bb_file_t *f, int64_t epoch, int64_t count, int kind, int line,
                         int64_t bytes, const char *message, size_t len)
{
    mg_bb_alerts_t *al = &f->alerts;
    mg_bb_alert_t *a = NULL;
    uint64_t held;

    if (len >= MG_BB_MESSAGE)
        len = MG_BB_MESSAGE - 1;
    while (atomic_flag_test_and_set_explicit(&s_alerts_lock, memory_order_acquire))
        sched_yield();
    held = al->total < MG_BB_ALERTS ? al->total : MG_BB_ALERTS;
    for (uint64_t i = 1; i <= held && a == NULL; i++) {
        mg_bb_alert_t *old = &al->ring[(al->total - i) % MG_BB_ALERTS];

        if (old->epoch == epoch && old->kind == kind &&
            (!bb_kind_per_line(kind) || old->line == line))
            a = old;
    }
    bb_begin(&al->seq);
    if (a == NULL) {
        a = &al->ring[al->total % MG_BB_ALERTS];
        a->epoch = epoch;
        a->count = count;
        a->kind = kind;
        a->line = line;
        a->t = bb_wall();
        al->total++;
    }
    if (count >= 0)
        a->count = count;
    if (line > 0)
        a->line = line;
    a->bytes = bytes;
    memcpy(a->message, message, len);
    memset(a->message + len, 0, MG_BB_MESSAGE - len);
    bb_end(&al->seq);
    atomic_flag_clear_explicit(&s_alerts_lock, memory_order_release);
}

void mg_blackbox_add_alert(int64_t epoch, int64_t count, int kind, int line, int64_t bytes,
                           const char *message, size_t len)
{
    mg_bb_file_t *f = bb_enter();

    if (f == NULL)
        return;
    bb_put_alert(f, epoch, count, kind, line, bytes, message, len);
    bb_leave();
}

/* Decimal bytes for a message, as the Python side's format_size writes them (kB, MB, GB). */
static void bb_size(char *out, size_t n, int64_t bytes)
{
    double b = (double)bytes;

    if (b >= 1e9 || b <= -1e9)
        snprintf(out, n, "%.2f GB", b / 1e9);
    else if (b >= 1e6 || b <= -1e6)
        snprintf(out, n, "%.1f MB", b / 1e6);
    else
        snprintf(out, n, "%.1f kB", b / 1e3);
}

/* The execution count of cell `epoch` if it is the running cell, else -1. */
static int64_t bb_count_of(int64_t epoch)
{
    int64_t e = atomic_load_explicit(&s_cell_epoch, memory_order_acquire);
    int64_t count = atomic_load_explicit(&s_cell_count, memory_order_relaxed);

    atomic_thread_fence(memory_order_acquire);
    if (e != epoch || atomic_load_explicit(&s_cell_epoch, memory_order_relaxed) != e)
        return -1;
    return count;
}

void mg_blackbox_monitor_alert(const mg_wire_t *w)
{
    char msg[MG_BB_MESSAGE];
    char a[32];
    char b[32];
    int kind;
    int64_t bytes;
    int n;
    mg_bb_file_t *f = bb_enter();

    if (f == NULL)
        return;
    switch (w->kind) {
    case MG_KIND_BUDGET:
    case MG_KIND_BUDGET_GROW:
        kind = MG_BB_KIND_BUDGET;
        bytes = w->peak;
        bb_size(a, sizeof(a), w->peak);
        bb_size(b, sizeof(b), w->budget);
        n = snprintf(msg, sizeof(msg), "the cell used %s, over its budget of %s", a, b);
        break;
    case MG_KIND_BUDGET_RSS:
        kind = MG_BB_KIND_BUDGET;
        bytes = w->peak;
        bb_size(a, sizeof(a), w->usage);
        bb_size(b, sizeof(b), w->budget);
        n = snprintf(msg, sizeof(msg),
                     "the cell's RSS grew by %s, over its budget of %s, mostly in memory no "
                     "hook counted", a, b);
        break;
    case MG_KIND_REFUSED:
        kind = w->count == MG_REFUSE_BUDGET ? MG_BB_KIND_BUDGET : MG_BB_KIND_LIMIT;
        bytes = w->bytes;
        bb_size(a, sizeof(a), w->bytes);
        n = snprintf(msg, sizeof(msg), "an allocation of %s was refused: over the %s", a,
                     w->count == MG_REFUSE_BUDGET ? "cell's budget" : "limit");
        break;
    case MG_KIND_LIMIT:
        kind = MG_BB_KIND_LIMIT;
        bytes = w->bytes;
        bb_size(a, sizeof(a), w->bytes);
        n = snprintf(msg, sizeof(msg), "memory in use (%s) passed the limit's alert fraction",
                     a);
        break;
    case MG_KIND_LIMIT_REQUEST:
        kind = MG_BB_KIND_LIMIT;
        bytes = w->bytes;
        bb_size(a, sizeof(a), w->bytes);
        n = snprintf(msg, sizeof(msg),
                     "one allocation of %s asked for more than is left under the limit", a);
        break;
    case MG_KIND_ACCUMULATION:
    case MG_KIND_ACCUMULATION_GROW:
        kind = MG_BB_KIND_ACCUMULATION;
        bytes = w->bytes;
        bb_size(a, sizeof(a), w->bytes);
        n = snprintf(msg, sizeof(msg), "one line keeps %s alive in %u blocks", a,
                     (unsigned)w->count);
        break;
    default:
        bb_leave();
        return;
    }
    bb_put_alert(f, w->epoch, bb_count_of(w->epoch), kind, w->line, bytes, msg,
                 n < 0 ? 0 : (size_t)n);
    bb_leave();
}

void mg_blackbox_tick(void)
{
    mg_bb_file_t *f;
    mg_acct_snapshot_t a;
    mg_measures_snapshot_t r;
    mg_site_info_t sites[MG_BB_SITES];
    mg_bb_state_t *st;
    mg_bb_sample_t *sample;
    uint64_t n;
    int count;
    double fraction;
    int measure;
    int64_t limit;
    double now = bb_wall();

    f = bb_enter();
    if (f == NULL)
        return;
    mg_acct_snapshot(&a);
    mg_measures_snapshot(&r);
    mg_acct_get_limit(&limit, &measure, &fraction);
    if (r.last > s_rss_peak)
        s_rss_peak = r.last;
    count = mg_sites_list(0, sites, (int)MG_BB_SITES);
    /* The older copy is the one to overwrite: the newer stays whole if we die here. */
    st = &f->state[s_state_seq / 2 % 2];
    atomic_store_explicit(&st->seq, s_state_seq + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    st->t = now;
    st->epoch = a.epoch;
    st->line = mg_sites_last_line(a.epoch);
    st->n_sites = count;
    st->tracked = a.tracked;
    st->cell_start = a.cell_start;
    st->cell_peak = a.cell_peak;
    st->rss = r.last;
    st->rss_cell_start = r.cell_start;
    st->rss_cell_peak = r.cell_peak;
    st->rss_peak = s_rss_peak;
    st->budget = a.budget;
    st->limit = limit;
    st->limit_used = mg_measures_used((mg_measure_t)measure);
    st->limit_measure = measure;
    st->raise = mg_acct_raise();
    for (int i = 0; i < count; i++) {
        st->sites[i].epoch = sites[i].epoch;
        st->sites[i].line = sites[i].line;
        st->sites[i].pad = 0;
        st->sites[i].bytes = sites[i].live_bytes;
        st->sites[i].count = sites[i].live_count;
    }
    s_state_seq += 2;
    atomic_store_explicit(&st->seq, s_state_seq, memory_order_release);
    /* One timeline sample. */
    n = atomic_load_explicit(&f->samples_total, memory_order_relaxed);
    sample = &f->samples[n % MG_BB_SAMPLES];
    atomic_store_explicit(&sample->stamp, 0, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    sample->t = now;
    sample->rss = r.last;
    sample->tracked = a.tracked;
    sample->epoch = a.epoch;
    atomic_store_explicit(&sample->stamp, n + 1, memory_order_release);
    atomic_store_explicit(&f->samples_total, n + 1, memory_order_release);
    bb_leave();
}

int mg_blackbox_layout(const char **names, int64_t *values, int max)
{
#define MG_BB_FIELD(name, value)                                                          \
    do {                                                                                  \
        if (n < max) {                                                                    \
            names[n] = name;                                                              \
            values[n] = (int64_t)(value);                                                 \
            n++;                                                                          \
        }                                                                                 \
    } while (0)
    int n = 0;

    MG_BB_FIELD("layout", MG_BB_LAYOUT);
    MG_BB_FIELD("file_bytes", sizeof(mg_bb_file_t));
    MG_BB_FIELD("header_bytes", sizeof(mg_bb_header_t));
    MG_BB_FIELD("cell", offsetof(mg_bb_file_t, cell));
    MG_BB_FIELD("cell_bytes", sizeof(mg_bb_cell_t));
    MG_BB_FIELD("state", offsetof(mg_bb_file_t, state));
    MG_BB_FIELD("state_bytes", sizeof(mg_bb_state_t));
    MG_BB_FIELD("alerts", offsetof(mg_bb_file_t, alerts));
    MG_BB_FIELD("alert_bytes", sizeof(mg_bb_alert_t));
    MG_BB_FIELD("samples_total", offsetof(mg_bb_file_t, samples_total));
    MG_BB_FIELD("samples", offsetof(mg_bb_file_t, samples));
    MG_BB_FIELD("sample_bytes", sizeof(mg_bb_sample_t));
    return n;
#undef MG_BB_FIELD
}

void mg_blackbox_atfork_child(void)
{
    /* The mapping is MAP_SHARED with the parent: drop it without unmapping or unlinking,
     * so nothing in the child can write the parent's box. Only the forking thread exists
     * in the child: a monitor that was inside the box at fork time left its count and
     * maybe the alert lock behind, which nobody will release. */
    atomic_store(&s_box, NULL);
    atomic_store(&s_users, 0);
    atomic_flag_clear(&s_alerts_lock);
}
