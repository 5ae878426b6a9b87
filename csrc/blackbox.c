/* Owns the black box file and its mapping (include/mg_blackbox.h): opened and closed by
 * Python (GIL held), the cell and alert regions written by Python, the state and timeline
 * written by the monitor thread. Only stores into the mapping after open. */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "mg_acct.h"
#include "mg_blackbox.h"
#include "mg_measures.h"
#include "mg_sites.h"

_Static_assert(sizeof(mg_bb_header_t) == 264, "header layout");
_Static_assert(sizeof(mg_bb_cell_t) == 40 + 16 * MG_BB_CELLS + MG_BB_SOURCE_MAX, "cell layout");
_Static_assert(sizeof(mg_bb_site_t) == 32, "site layout");
_Static_assert(sizeof(mg_bb_state_t) == 120 + 32 * MG_BB_SITES, "state layout");
_Static_assert(sizeof(mg_bb_alert_t) == 40 + MG_BB_MESSAGE, "alert layout");
_Static_assert(sizeof(mg_bb_sample_t) == 40, "sample layout");
_Static_assert(sizeof(mg_bb_file_t) < (1u << 20), "the black box stays under 1 MiB");

/* Written by open/close (GIL held, monitor stopped) and the fork child; read by the
 * monitor (acquire) and Python. */
static _Atomic(mg_bb_file_t *) s_box = NULL;
static char s_path[4096];
/* Monitor only. */
static uint64_t s_state_seq = 0;
static int64_t s_rss_peak = 0;

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
    atomic_store_explicit(&s_box, f, memory_order_release);
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

void mg_blackbox_set_cell(int64_t epoch, int64_t count, const char *source, size_t len)
{
    mg_bb_file_t *f = atomic_load_explicit(&s_box, memory_order_acquire);
    mg_bb_cell_t *c;

    if (f == NULL)
        return;
    c = &f->cell;
    if (len > MG_BB_SOURCE_MAX)
        len = MG_BB_SOURCE_MAX;
    bb_begin(&c->seq);
    c->epoch = epoch;
    c->count = count;
    c->started = bb_wall();
    memcpy(c->source, source, len);
    if (len < MG_BB_SOURCE_MAX)
        memset(c->source + len, 0, MG_BB_SOURCE_MAX - len);
    c->source_len = (uint32_t)len;
    c->cells[c->cells_next % MG_BB_CELLS].epoch = epoch;
    c->cells[c->cells_next % MG_BB_CELLS].count = count;
    c->cells_next++;
    bb_end(&c->seq);
}

void mg_blackbox_add_alert(int64_t epoch, int64_t count, int kind, int line, int64_t bytes,
                           const char *message, size_t len)
{
    mg_bb_file_t *f = atomic_load_explicit(&s_box, memory_order_acquire);
    mg_bb_alert_t *a;

    if (f == NULL)
        return;
    bb_begin(&f->alerts.seq);
    a = &f->alerts.ring[f->alerts.total % MG_BB_ALERTS];
    a->epoch = epoch;
    a->count = count;
    a->kind = kind;
    a->line = line;
    a->bytes = bytes;
    a->t = bb_wall();
    if (len >= MG_BB_MESSAGE)
        len = MG_BB_MESSAGE - 1;
    memcpy(a->message, message, len);
    memset(a->message + len, 0, MG_BB_MESSAGE - len);
    f->alerts.total++;
    bb_end(&f->alerts.seq);
}

void mg_blackbox_tick(void)
{
    mg_bb_file_t *f = atomic_load_explicit(&s_box, memory_order_acquire);
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
     * so nothing in the child can write the parent's box. */
    atomic_store(&s_box, NULL);
}
