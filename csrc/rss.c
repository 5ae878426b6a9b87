/* Owns the RSS samples: the latest, and the running cell's start and peak. The monitor
 * thread samples; Python (GIL held) starts cells and reads; no allocator hook enters. */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <unistd.h>

#include "mg_rss.h"

/* Opened once (first reader wins the CAS, a loser closes its own); read with pread, which
 * procfs seq files support at offset 0. Reset in a forked child. */
static _Atomic int s_fd = -1;
/* Written by mg_rss_sample/cell_begin (relaxed); read by anyone. */
static _Atomic int64_t s_last = 0;
static _Atomic int64_t s_cell_start = 0;
static _Atomic int64_t s_cell_peak = 0;

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

int64_t mg_rss_read(void)
{
    char buf[128];
    ssize_t n;
    int fd = rss_fd();
    const char *c;
    int64_t pages = 0;

    if (fd < 0)
        return -1;
    n = pread(fd, buf, sizeof(buf) - 1, 0);
    if (n <= 0) {
        if (n == 0)
            errno = EIO;
        return -1;
    }
    buf[n] = '\0';
    /* "size resident shared text lib data dt", in pages */
    for (c = buf; *c != '\0' && *c != ' '; c++)
        ;
    if (*c != ' ') {
        errno = EIO;
        return -1;
    }
    for (c++; *c >= '0' && *c <= '9'; c++)
        pages = pages * 10 + (*c - '0');
    return pages * (int64_t)sysconf(_SC_PAGESIZE);
}

int64_t mg_rss_sample(void)
{
    int64_t now = mg_rss_read();
    int64_t peak;

    if (now < 0)
        return -1;
    atomic_store_explicit(&s_last, now, memory_order_relaxed);
    peak = atomic_load_explicit(&s_cell_peak, memory_order_relaxed);
    while (now > peak && !atomic_compare_exchange_weak_explicit(
                             &s_cell_peak, &peak, now, memory_order_relaxed,
                             memory_order_relaxed)) {
        /* peak reloaded by the failed CAS */
    }
    return now;
}

void mg_rss_cell_begin(void)
{
    int64_t now = mg_rss_read();

    if (now < 0)
        now = atomic_load_explicit(&s_last, memory_order_relaxed);
    atomic_store_explicit(&s_last, now, memory_order_relaxed);
    atomic_store_explicit(&s_cell_start, now, memory_order_relaxed);
    atomic_store_explicit(&s_cell_peak, now, memory_order_relaxed);
}

void mg_rss_snapshot(mg_rss_snapshot_t *out)
{
    out->last = atomic_load_explicit(&s_last, memory_order_relaxed);
    out->cell_start = atomic_load_explicit(&s_cell_start, memory_order_relaxed);
    out->cell_peak = atomic_load_explicit(&s_cell_peak, memory_order_relaxed);
}

void mg_rss_atfork_child(void)
{
    int fd = atomic_exchange(&s_fd, -1);

    if (fd >= 0)
        close(fd);
}
