/* Owns the memory samples: RSS (the latest, and the running cell's start and peak), the
 * address-space size and the cgroup usage. The monitor thread samples; Python (GIL held)
 * starts cells and reads; hooks read the latest samples only (mg_measures_used). */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "mg_acct.h"
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
/* The cgroup usage file and the memory.stat next to it: set by mg_measures_set_cgroup_file
 * (exchange acq_rel, GIL held), read by the samplers (acquire). A replaced descriptor is
 * never closed: a sample may be reading it, and knowing when none is would take a lock; it
 * is two per set_limit call. s_cg_stat_key: which memory.stat key holds the reclaimable
 * page cache (0 = none, 1 = v2 "inactive_file", 2 = v1 "total_inactive_file"); written
 * (release) before s_cg_stat_fd, read (acquire) after it, by the same functions. */
static _Atomic int s_cg_fd = -1;
static _Atomic int s_cg_stat_fd = -1;
static _Atomic int s_cg_stat_key = 0;
static const char *const s_stat_keys[] = {NULL, "inactive_file", "total_inactive_file"};
/* The untracked part of each measure (mg_measure_t index): the measure minus the tracked
 * bytes, at the last sample (s_untracked) and at the running cell's start (s_floor), for
 * mg_measures_estimate. Written by mg_measures_sample (the monitor) and
 * mg_measures_cell_begin (GIL held), relaxed, each on its own; read by hooks (relaxed). A
 * hook reading one measure's pair from two different instants gets a figure from one
 * sample or the other, each a valid estimate then. */
#define MEASURE_COUNT 3
static _Atomic int64_t s_untracked[MEASURE_COUNT];
static _Atomic int64_t s_floor[MEASURE_COUNT];

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

int mg_measures_parse_stat(const char *buf, size_t len, const char *key, int64_t *out)
{
    size_t klen = strlen(key);
    size_t at = 0;

    while (at < len) {
        size_t end = at;
        size_t used;

        while (end < len && buf[end] != '\n')
            end++;
        /* "key value": the key, one space, the digits, then the end of the line. */
        if (end - at > klen + 1 && memcmp(buf + at, key, klen) == 0 && buf[at + klen] == ' ' &&
            mg_measures_parse_number(buf + at + klen + 1, end - at - klen - 1, &used, out) == 0 &&
            at + klen + 1 + used == end)
            return 0;
        at = end + 1;
    }
    return -1;
}

/* The cgroup's usage as its OOM killer sees it, in bytes, or -1: the usage file minus the
 * page cache the kernel can reclaim before it kills (memory.stat's inactive_file, v2, or
 * total_inactive_file, v1, which counts the descendants as usage_in_bytes does). Clean
 * inactive file pages are dropped by reclaim, so counting them would refuse on memory that
 * is not at risk (docs/design.md, "Limits and measures"). A missing or unreadable stat file
 * subtracts nothing. Reads up to 8 KiB of memory.stat (about 1.5 KiB with every v1 or v2
 * key on Linux 6.x) on the caller's stack: the monitor thread, or Python at a cell start. */
static int64_t rss_read_cgroup(void)
{
    char buf[32];
    char stat[8192];
    int fd = atomic_load_explicit(&s_cg_fd, memory_order_acquire);
    int sfd = atomic_load_explicit(&s_cg_stat_fd, memory_order_acquire);
    int key = atomic_load_explicit(&s_cg_stat_key, memory_order_acquire);
    ssize_t n;
    size_t used;
    int64_t v;
    int64_t inactive;

    if (fd < 0)
        return -1;
    n = pread(fd, buf, sizeof(buf), 0);
    if (n <= 0 || mg_measures_parse_number(buf, (size_t)n, &used, &v) < 0)
        return -1;
    if (sfd < 0 || key <= 0 || key > 2)
        return v;
    n = pread(sfd, stat, sizeof(stat), 0);
    if (n > 0 && mg_measures_parse_stat(stat, (size_t)n, s_stat_keys[key], &inactive) == 0)
        v = inactive < v ? v - inactive : 0;
    return v;
}

int mg_measures_set_cgroup_file(const char *path)
{
    int fd = -1;
    int sfd = -1;
    int key = 0;

    if (path != NULL) {
        const char *slash = strrchr(path, '/');
        size_t dir = slash == NULL ? 0 : (size_t)(slash - path) + 1;
        char stat_path[4096];

        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return -1;
        /* memory.stat next to the usage file; v2's usage file is memory.current. */
        key = strcmp(path + dir, "memory.current") == 0 ? 1 : 2;
        if (dir + sizeof("memory.stat") <= sizeof(stat_path)) {
            memcpy(stat_path, path, dir);
            memcpy(stat_path + dir, "memory.stat", sizeof("memory.stat"));
            sfd = open(stat_path, O_RDONLY | O_CLOEXEC);
        }
    }
    atomic_store_explicit(&s_cg_stat_key, sfd < 0 ? 0 : key, memory_order_release);
    (void)atomic_exchange_explicit(&s_cg_stat_fd, sfd, memory_order_acq_rel);
    (void)atomic_exchange_explicit(&s_cg_fd, fd, memory_order_acq_rel);
    return 0;
}

/* Record each measure's untracked part (measure - tracked); at a cell start also its floor.
 * vm and rss < 0: not read this time; cg < 0: no cgroup sample (its part stays as it was). */
static void note_untracked(int64_t tracked, int64_t rss, int64_t vm, int64_t cg, int floor)
{
    int64_t v[MEASURE_COUNT] = {rss, vm, cg};

    for (int m = 0; m < MEASURE_COUNT; m++) {
        if (v[m] < 0)
            continue;
        atomic_store_explicit(&s_untracked[m], v[m] - tracked, memory_order_relaxed);
        if (floor)
            atomic_store_explicit(&s_floor[m], v[m] - tracked, memory_order_relaxed);
    }
}

static int measure_index(mg_measure_t m)
{
    return m == MG_MEASURE_VM ? 1 : (m == MG_MEASURE_CGROUP ? 2 : 0);
}

/* tracked + the larger of `untracked` and measure i's cell-start floor, never below 0. */
static int64_t estimate_with(int i, int64_t tracked, int64_t untracked)
{
    int64_t floor = atomic_load_explicit(&s_floor[i], memory_order_relaxed);
    int64_t used = tracked + (untracked > floor ? untracked : floor);

    return used > 0 ? used : 0;
}

MG_HOOKSAFE int64_t mg_measures_estimate(mg_measure_t m, int64_t tracked)
{
    int i = measure_index(m);

    return estimate_with(i, tracked, atomic_load_explicit(&s_untracked[i], memory_order_relaxed));
}

MG_HOOKSAFE int64_t mg_measures_estimate_now(mg_measure_t m)
{
    int64_t before = mg_acct_tracked(); /* before the measure, as a sample reads it */
    int64_t vm = -1;
    int64_t rss = -1;
    int64_t v;

    if (m == MG_MEASURE_CGROUP)
        v = rss_read_cgroup();
    else
        v = rss_read_statm(&vm, &rss) < 0 ? -1 : (m == MG_MEASURE_VM ? vm : rss);
    if (v < 0)
        return mg_measures_estimate(m, before);
    return estimate_with(measure_index(m), mg_acct_tracked(), v - before);
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
    /* Tracked bytes read before the files: an allocation counted in between makes the
     * untracked part look larger by its size until the next sample (the safe side). */
    int64_t tracked = mg_acct_tracked();
    int64_t cg = rss_read_cgroup();
    int64_t peak;

    if (cg >= 0)
        atomic_store_explicit(&s_cg_last, cg, memory_order_relaxed);
    if (rss_read_statm(&vm, &now) < 0) {
        note_untracked(tracked, -1, -1, cg, 0);
        return -1;
    }
    note_untracked(tracked, now, vm, cg, 0);
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
    int64_t tracked = mg_acct_tracked();
    int64_t cg = rss_read_cgroup();

    if (cg >= 0)
        atomic_store_explicit(&s_cg_last, cg, memory_order_relaxed);
    if (rss_read_statm(&vm, &now) < 0) {
        now = atomic_load_explicit(&s_last, memory_order_relaxed);
        note_untracked(tracked, -1, -1, cg, 1);
    } else {
        atomic_store_explicit(&s_vm_last, vm, memory_order_relaxed);
        note_untracked(tracked, now, vm, cg, 1);
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

