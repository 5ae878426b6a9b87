/* Memory samples (csrc/measures.c): the process's resident set size and address-space size from
 * /proc/self/statm, and its cgroup's usage; sampled by the monitor thread, RSS remembered
 * per cell (start, peak) so the untracked gap (RSS growth no hook counted) can be reported,
 * and the latest samples read by hooks (atomics only) to check the machine's limit. */
#ifndef MEMGUARD_MG_MEASURES_H
#define MEMGUARD_MG_MEASURES_H

#include <stddef.h>
#include <stdint.h>

#include "memguard.h"

/* Parsers of what the kernel writes in /proc and cgroupfs (outside input: fuzzed by
 * tests/fuzz/fuzz-measures.c). Neither needs a NUL terminator nor reads past len.
 * mg_measures_parse_number: the decimal digits at the start of buf into *out, their count into
 * *used; -1 if there is no digit or the number does not fit in int64.
 * mg_measures_parse_statm: the first two fields of statm ("size resident ..."), in pages;
 * -1 if they are not two numbers separated by one space. Any thread. */
int mg_measures_parse_number(const char *buf, size_t len, size_t *used, int64_t *out);
int mg_measures_parse_statm(const char *buf, size_t len, int64_t *vm_pages, int64_t *rss_pages);
/* mg_measures_parse_stat: the value of `key` in a cgroup memory.stat ("key value" lines,
 * cgroup-v2.rst and cgroup-v1/memory.rst): the line must be exactly the key, one space and
 * the digits; -1 if there is no such line or the number does not fit in int64. */
int mg_measures_parse_stat(const char *buf, size_t len, const char *key, int64_t *out);

/* RSS in bytes now: the second field of /proc/self/statm (proc(5)) times the page size,
 * read with pread on a descriptor kept open (about 10 us; 14 us with open/read/close:
 * docs/design.md, Limits and measures). Returns -1 with errno set if /proc cannot be read. Any
 * thread; not async-signal-safe on first use (it opens the file). */
int64_t mg_measures_read(void);

/* Read RSS, the address-space size and the cgroup usage, and record them as the latest
 * samples, raising the cell's RSS peak. Returns the RSS sample (bytes) or -1. The monitor
 * thread. */
int64_t mg_measures_sample(void);

/* Start a cell: the cell's RSS start and peak become RSS now; the address-space and cgroup
 * samples are refreshed too. GIL held (pre_run_cell). */
void mg_measures_cell_begin(void);

/* What the effective limit is compared with: RSS for physical RAM, the address-space size
 * for RLIMIT_AS (which limits exactly that, setrlimit(2)), the cgroup's usage file
 * (memory.current / memory.usage_in_bytes) for a cgroup limit. */
typedef enum mg_measure {
    MG_MEASURE_RSS = 0,
    MG_MEASURE_VM = 1,
    MG_MEASURE_CGROUP = 2,
} mg_measure_t;

/* Use the cgroup usage file at path (opened once, read with pread) for MG_MEASURE_CGROUP;
 * NULL stops reading it. The cgroup measure is the usage minus the reclaimable page cache
 * that memory.stat, in the same directory, reports (v2 memory.current - inactive_file, v1
 * memory.usage_in_bytes - total_inactive_file): what the cgroup's OOM killer acts on. A
 * memory.stat that cannot be opened subtracts nothing. Returns 0, or -1 with errno from
 * open(2) of path. GIL held; the monitor picks the new descriptors up at its next sample. */
int mg_measures_set_cgroup_file(const char *path);

/* What measure m will be once the tracked bytes (mg_acct_tracked, passed in) are all
 * resident: tracked + the measure's untracked part, taken as the larger of its value at the
 * last sample and at the running cell's start, never below 0. The last sample follows what
 * no hook sees (native code, other processes of the cgroup); the cell-start value keeps
 * counting blocks the cell allocated but has not touched yet (a calloc'd NumPy array is
 * tracked at once, resident page by page), which make the sampled part look smaller. Live
 * tracked bytes also cover what hooks counted since the last sample. Hook-safe: two relaxed
 * loads (docs/design.md, "Limits and measures"). */
MG_HOOKSAFE int64_t mg_measures_estimate(mg_measure_t m, int64_t tracked);

/* mg_measures_estimate with the measure read now instead of at the last sample, for a
 * refusal about to be made on that sample. A sample can be stale in a way that refuses
 * wrongly: a hook takes a freed block off the tracked bytes before the real free returns
 * its pages, so a sample between the two sees the block as untracked memory until the next
 * sample. Under load a clean-clone test run saw `del subsets` followed at once by a 400 MB
 * request refused at a cgroup usage of 517 MB where 5 MB were in use. The tracked bytes
 * are read before the measure, as a sample does. Falls back to
 * mg_measures_estimate when the measure cannot be read. Hook-safe on the rare path only:
 * one or two preads (the cgroup's memory.stat, up to 8 KiB on the caller's stack). */
MG_HOOKSAFE int64_t mg_measures_estimate_now(mg_measure_t m);

/* The latest sample of measure m in bytes: 0 before the first sample; for the cgroup, the
 * last readable sample (a failed read keeps it; 0 if the file was never read). Hook-safe:
 * one relaxed atomic load. */
MG_HOOKSAFE int64_t mg_measures_used(mg_measure_t m);

typedef struct mg_measures_snapshot {
    int64_t last;       /* latest sample, bytes (0 before the first) */
    int64_t cell_start; /* RSS when the cell began, bytes */
    int64_t cell_peak;  /* highest sample since then, bytes */
    int64_t vm;         /* latest address-space size sample, bytes */
    int64_t cgroup;     /* latest cgroup usage sample, bytes (0 if none) */
} mg_measures_snapshot_t;

void mg_measures_snapshot(mg_measures_snapshot_t *out);

/* In a forked child: close the inherited descriptor, which still reads the parent's
 * statm (/proc/self is resolved when the file is opened); the next read reopens it. */
void mg_measures_atfork_child(void);

#endif /* MEMGUARD_MG_MEASURES_H */
