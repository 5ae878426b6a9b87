/* Allocation sites (csrc/sites.c): every attributed block (at or above the attribution
 * threshold, which covers NumPy data, large RAW blocks and pymalloc's 1 MiB arenas) is
 * recorded in a bounded table keyed by its address, and charged to its site, a (cell
 * epoch, cell line) pair that knows its live bytes and live block count. The accumulation
 * rule is checked as a site grows. Hooks of any thread enter it; nothing here allocates. */
#ifndef MEMGUARD_MG_SITES_H
#define MEMGUARD_MG_SITES_H

#include <stddef.h>
#include <stdint.h>

#include "memguard.h"

/* Distinct sites held at once (power of two). A site is dropped by mg_sites_sweep once its
 * cell is over and it has no live block left, so this bounds the sites of the running cell
 * plus those of earlier cells that still hold memory. */
#define MG_SITE_SLOTS 1024u
/* Attributed blocks held at once (power of two): 65,536 blocks of at least the threshold
 * (128 KiB by default) are 8 GiB, and each 1 MiB arena is one block. A block that finds no
 * slot within MG_PROBE probes is counted in bytes as usual but charged to no site
 * (mg_sites_stats().dropped). Static storage: 2 MiB of address space, touched as used. */
#define MG_BLOCK_SLOTS 65536u
/* Longest probe sequence in either table: bounds the cost of a lookup on the free path. */
#define MG_PROBE 64u

/* Default attribution threshold in bytes: glibc's default M_MMAP_THRESHOLD (128 KiB,
 * mallopt(3)), below which blocks come from the heap and are too small and too many to be
 * worth a frame walk. pymalloc arenas (1 MiB, Objects/obmalloc.c ARENA_SIZE) are above it, so
 * small-object growth is attributed one arena at a time. */
#define MG_SITES_THRESHOLD_DEFAULT (128u * 1024u)

/* The accumulation rule (documented in README "Detectors"): a site alerts once it holds at
 * least min_count live blocks and at least fraction x the cell's budget in live bytes, or
 * no_budget_bytes when the cell has no budget. Defaults: 3 blocks, 0.25, 256 MiB. */
typedef struct mg_sites_rule {
    int64_t min_count;
    double budget_fraction;
    int64_t no_budget_bytes;
} mg_sites_rule_t;

/* One site as read by mg_sites_list. Bytes are live bytes of attributed blocks. */
typedef struct mg_site_info {
    int64_t epoch;      /* the cell's epoch */
    int32_t line;       /* 1-based line in the cell's source, or -1 if unknown */
    int64_t live_bytes; /* bytes of attributed blocks from this site still alive */
    int64_t live_count; /* how many of them */
    int64_t reported;   /* live bytes at the last accumulation event; 0 = never alerted */
} mg_site_info_t;

typedef struct mg_sites_stats {
    uint64_t dropped;   /* blocks that found no slot (table full within MG_PROBE) */
    uint64_t sites;     /* sites in use (approximate: read slot by slot) */
    uint64_t blocks;    /* attributed blocks alive */
} mg_sites_stats_t;

/* The attribution threshold in bytes (hook-safe, relaxed load) and its setter (any thread;
 * values below 4096 are raised to 4096 so small blocks never pay a frame walk). */
MG_HOOKSAFE size_t mg_sites_threshold(void);
void mg_sites_set_threshold(size_t bytes);

/* Read and replace the accumulation rule. Any thread; the three fields are read by hooks
 * one by one, so a hook racing a change may mix old and new fields once. */
void mg_sites_get_rule(mg_sites_rule_t *out);
void mg_sites_set_rule(const mg_sites_rule_t *rule);

/* Record the block p of n bytes (n >= threshold), allocated while cell `epoch` ran, at
 * `line` (-1 if unknown), and charge it to that site. When the site meets the
 * accumulation rule for the first time, push an MG_KIND_ACCUMULATION event; when an
 * alerted site has grown by MG_GROW_STEP since its last event, push
 * MG_KIND_ACCUMULATION_GROW. Hook-safe, any thread, lock-free. */
MG_HOOKSAFE void mg_sites_alloc(void *p, size_t n, int64_t epoch, int32_t line);

/* Forget the block p if it was recorded, and take it off its site. Call before the real
 * free (the address must not be reused in between). Hook-safe, any thread, lock-free. */
MG_HOOKSAFE void mg_sites_free(void *p);

/* Copy up to max sites into out (of epoch `epoch`, or every epoch when epoch == 0), largest
 * live bytes first. Returns how many were written. Any thread; not from a hook. */
int mg_sites_list(int64_t epoch, mg_site_info_t *out, int max);

/* The line of the last attributed allocation made while cell `epoch` ran, or -1 (none in
 * that cell). What the black box reports as "the line that was running". Any thread. */
int32_t mg_sites_last_line(int64_t epoch);

/* Drop the sites of cells other than `current_epoch` that have no live block left, so the
 * table holds only sites that matter. GIL held (cell start); hooks may run concurrently. */
void mg_sites_sweep(int64_t current_epoch);

void mg_sites_stats(mg_sites_stats_t *out);

/* Forget every block and site, and the last line (csrc/module.c's install from a disabled
 * state, tests). Blocks recorded before are then freed without a site, which is harmless.
 * Not while hooks count in other threads. */
void mg_sites_reset(void);

#endif /* MEMGUARD_MG_SITES_H */
