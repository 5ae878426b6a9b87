/* The process's resident set size (csrc/rss.c): read from /proc/self/statm, sampled by the
 * monitor thread, and remembered per cell (start, peak) so the untracked gap (RSS growth
 * that no hook counted) can be reported. Any thread; never from an allocator hook. */
#ifndef MEMGUARD_MG_RSS_H
#define MEMGUARD_MG_RSS_H

#include <stdint.h>

#include "memguard.h"

/* RSS in bytes now: the second field of /proc/self/statm (proc(5)) times the page size,
 * read with pread on a descriptor kept open (about 10 us here; platform-facts measured
 * 14 us with open/read/close). Returns -1 with errno set if /proc cannot be read. Any
 * thread; not async-signal-safe on first use (it opens the file). */
int64_t mg_rss_read(void);

/* Read RSS and record it as the latest sample, raising the cell's RSS peak. Returns the
 * sample (bytes) or -1. The monitor thread. */
int64_t mg_rss_sample(void);

/* Start a cell: the cell's RSS start and peak become RSS now. GIL held (pre_run_cell). */
void mg_rss_cell_begin(void);

typedef struct mg_rss_snapshot {
    int64_t last;       /* latest sample, bytes (0 before the first) */
    int64_t cell_start; /* RSS when the cell began, bytes */
    int64_t cell_peak;  /* highest sample since then, bytes */
} mg_rss_snapshot_t;

void mg_rss_snapshot(mg_rss_snapshot_t *out);

/* In a forked child: close the inherited descriptor, which still reads the parent's
 * statm (/proc/self is resolved when the file is opened); the next read reopens it. */
void mg_rss_atfork_child(void);

#endif /* MEMGUARD_MG_RSS_H */
