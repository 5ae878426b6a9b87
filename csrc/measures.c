/* Owns the memory samples: RSS (the latest, and the running cell's start and peak), the
 * address-space size and the cgroup usage. The monitor thread samples; Python (GIL held)
 * starts cells and reads; hooks read the latest samples only (mg_measures_used). */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <unistd.h>

#include "mg_measures.h"

/* Opened once (first reader wins the CAS, seq_cst, a loser closes its own; readers load it
 * with acquire); read with pread, which procfs seq files support at offset 0. Reset in a
 * forked child. */
static _Atomic int s_fd = -1;
/* Written by mg_measures_sample (the monitor) and mg_measures_cell_begin (GIL held),
 * relaxed, each on its own; read by anyone (relaxed), hooks included. s_cell_peak is
 * raised by a CAS loop; a sample racing a cell start may raise the new cell's peak from
 * a reading of the old one's, which is still RSS at that instant. */
static _Atomic int64_t s_last = 0;
static _Atomic int64_t s_cell_start = 0;
static _Atomic int64_t s_cell_peak = 0;
static _Atomic int64_t s_vm_last = 0;
static _Atomic int64_t s_cg_last = 0;
/* The cgroup usage file: set by mg_measures_set_cgroup_file (exchange acq_rel, GIL held),
 * read by the samplers (acquire). A replaced descriptor is never closed: a sample may be
 * reading it, and knowing when none is would take a lock; it is one per set_limit call. */
static _Atomic int s_cg_fd = -1;

static int rss_fd(void)
{
    int fd = atomic_load_explicit(&s_fd, memory_order_acquire);
    int expected = -1;

    if (fd >= 0)
        return fd;
    fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (!atomic_compare_exchange_strong(&s_fd, &expected, fd)) {
        close(fd);
        fd = expected;
    }
    return fd;
}

int mg_measures_parse_number(const char *buf, size_t len, size_t *used, int64_t *out)
{
    int64_t v = 0;
    size_t i = 0;

    for (; i < len && buf[i] >= '0' && buf[i] <= '9'; i++) {
        if (v > (INT64_MAX - 9) / 10)
            return -1; /* would overflow int64 */
        v = v * 10 + (buf[i] - '0');
    }
    if (i == 0)
        return -1;
    *used = i;
    *out = v;
    return 0;
}

int mg_measures_parse_statm(const char *buf, size_t len, int64_t *vm_pages, int64_t *rss_pages)
{
    size_t used;
    size_t at;

    if (mg_measures_parse_number(buf, len, &used, vm_pages) < 0)
        return -1;
    at = used;
    if (at >= len || buf[at] != ' ')
        return -1;
    at++;
    if (mg_measures_parse_number(buf + at, len - at, &used, rss_pages) < 0)
        return -1;
    return 0;
}

/* The first two fields of /proc/self/statm (size, resident), in bytes. */
static int rss_read_statm(int64_t *vm, int64_t *rss)
{
    char buf[128];
    ssize_t n;
    int fd = rss_fd();
    int64_t pages[2];
    int64_t page = (int64_t)sysconf(_SC_PAGESIZE);

    if (fd < 0)
        return -1;
    n = pread(fd, buf, sizeof(buf), 0);
    if (n < 0)
        return -1;
    if (mg_measures_parse_statm(buf, (size_t)n, &pages[0], &pages[1]) < 0 ||
        pages[0] > INT64_MAX / page || pages[1] > INT64_MAX / page) {
        errno = EIO;
        return -1;
    }
    *vm = pages[0] * page;
    *rss = pages[1] * page;
    return 0;
}

int64_t mg_measures_read(void)
{
    int64_t vm;
    int64_t rss;

    return rss_read_statm(&vm, &rss) < 0 ? -1 : rss;
}

/* A decimal number of bytes from the cgroup usage file, or -1. */
static int64_t rss_read_cgroup(void)
{
    char buf[32];
    int fd = atomic_load_explicit(&s_cg_fd, memory_order_acquire);
    ssize_t n;
    size_t used;
    int64_t v;

    if (fd < 0)
        return -1;
    n = pread(fd, buf, sizeof(buf), 0);
    if (n <= 0 || mg_measures_parse_number(buf, (size_t)n, &used, &v) < 0)
        return -1;
    return v;
}

int mg_measures_set_cgroup_file(const char *path)
{
    int fd = -1;

    if (path != NULL) {
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return -1;
    }
    (void)atomic_exchange_explicit(&s_cg_fd, fd, memory_order_acq_rel);
    return 0;
}

MG_HOOKSAFE int64_t mg_measures_used(mg_measure_t m)
{
    switch (m) {
    case MG_MEASURE_VM:
        return atomic_load_explicit(&s_vm_last, memory_order_relaxed);
    case MG_MEASURE_CGROUP:
        return atomic_load_explicit(&s_cg_last, memory_order_relaxed);
    default:
        return atomic_load_explicit(&s_last, memory_order_relaxed);
    }
}

int64_t mg_measures_sample(void)
{
    int64_t vm;
    int64_t now;
    int64_t cg = rss_read_cgroup();
    int64_t peak;

    if (cg >= 0)
        atomic_store_explicit(&s_cg_last, cg, memory_order_relaxed);
    if (rss_read_statm(&vm, &now) < 0)
        return -1;
    atomic_store_explicit(&s_vm_last, vm, memory_order_relaxed);
    atomic_store_explicit(&s_last, now, memory_order_relaxed);
    peak = atomic_load_explicit(&s_cell_peak, memory_order_relaxed);
    while (now > peak && !atomic_compare_exchange_weak_explicit(
                             &s_cell_peak, &peak, now, memory_order_relaxed,
                             memory_order_relaxed)) {
        /* peak reloaded by the failed CAS */
    }
    return now;
}

void mg_measures_cell_begin(void)
{
    int64_t vm;
    int64_t now;
    int64_t cg = rss_read_cgroup();

    if (cg >= 0)
        atomic_store_explicit(&s_cg_last, cg, memory_order_relaxed);
    if (rss_read_statm(&vm, &now) < 0) {
        now = atomic_load_explicit(&s_last, memory_order_relaxed);
    } else {
        atomic_store_explicit(&s_vm_last, vm, memory_order_relaxed);
    }
    atomic_store_explicit(&s_last, now, memory_order_relaxed);
    atomic_store_explicit(&s_cell_start, now, memory_order_relaxed);
    atomic_store_explicit(&s_cell_peak, now, memory_order_relaxed);
}

void mg_measures_snapshot(mg_measures_snapshot_t *out)
{
    out->last = atomic_load_explicit(&s_last, memory_order_relaxed);
    out->cell_start = atomic_load_explicit(&s_cell_start, memory_order_relaxed);
    out->cell_peak = atomic_load_explicit(&s_cell_peak, memory_order_relaxed);
    out->vm = atomic_load_explicit(&s_vm_last, memory_order_relaxed);
    out->cgroup = atomic_load_explicit(&s_cg_last, memory_order_relaxed);
}

void mg_measures_atfork_child(void)
{
    int fd = atomic_exchange(&s_fd, -1);

    if (fd >= 0)
        close(fd);
}

