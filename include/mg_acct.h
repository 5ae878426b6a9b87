/* Byte accounting shared by every hook: live tracked bytes per allocator domain, the
 * current cell's start, peak and budget (csrc/acct.c). Entered from any thread. */
#ifndef MEMGUARD_MG_ACCT_H
#define MEMGUARD_MG_ACCT_H

#include <stddef.h>
#include <stdint.h>

#include "memguard.h"

/* A copy of the counters, for status and the monitor thread. epoch, cell_start and budget
 * are one cell's (read under the cell protocol, csrc/acct.c); the byte counters and the
 * peak are read one by one (relaxed), so they may come from instants a few instructions
 * apart. Every figure is in bytes except epoch. */
typedef struct mg_acct_snapshot {
    int64_t tracked;                     /* live tracked bytes since install (may be < 0) */
    int64_t domain[MG_DOMAIN_COUNT];     /* the same, per allocator domain */
    int64_t cell_start;                  /* tracked when the current cell began */
    int64_t cell_peak;                   /* highest tracked seen during the current cell */
    int64_t budget;                      /* the cell's budget; 0 means none */
    int64_t epoch;                       /* the current cell's epoch (0 before the first) */
    int crossed;                         /* 1 once the current cell crossed its budget */
} mg_acct_snapshot_t;

/* Enable (1) or disable (0) counting. While disabled the hooks pass every call through.
 * Any thread. */
void mg_acct_set_enabled(int enabled);

/* Non-zero while counting is enabled. Hook-safe (relaxed load). */
MG_HOOKSAFE int mg_acct_enabled(void);

/* Count an allocation of n bytes in domain d. Returns 1 when this allocation is the one
 * that makes the current cell's usage (tracked - cell_start) exceed its budget for the
 * first time in the cell, 0 otherwise. Hook-safe, any thread. */
MG_HOOKSAFE int mg_acct_alloc(mg_domain_t d, size_t n);

/* Count n bytes in domain d like mg_acct_alloc, peak included, but leave the budget to the
 * next mg_acct_alloc (which reports a crossing this made): for a caller that cannot report
 * one (csrc/batch.c at thread exit). Hook-safe, any thread. */
MG_HOOKSAFE void mg_acct_add(mg_domain_t d, size_t n);

/* Count a free of n bytes in domain d. Hook-safe, any thread. */
MG_HOOKSAFE void mg_acct_free(mg_domain_t d, size_t n);

/* The current cell's usage in bytes: tracked - cell_start. Hook-safe. */
MG_HOOKSAFE int64_t mg_acct_cell_usage(void);

/* Live tracked bytes, every domain (may be < 0: blocks allocated before install and freed
 * since). Hook-safe. */
MG_HOOKSAFE int64_t mg_acct_tracked(void);

/* The current cell's budget in bytes (0 = none). Hook-safe. */
MG_HOOKSAFE int64_t mg_acct_budget(void);

/* Mark cell `epoch`'s budget as crossed on behalf of a rule outside the hooks (the
 * monitor's RSS rule). Returns 1 if this call set it, 0 if that cell (or a later one)
 * already crossed. Any thread. */
int mg_acct_cross(int64_t epoch);

/* The current cell's epoch. Hook-safe. */
MG_HOOKSAFE int64_t mg_acct_epoch(void);

/* Start a cell: epoch (> 0, increasing), budget in bytes (0 = none). Resets start and peak
 * to the current tracked bytes; the new epoch has not crossed. Called with the GIL held,
 * from pre_run_cell; hooks of other threads may run concurrently. */
void mg_acct_cell_begin(int64_t epoch, int64_t budget);

/* Change the running cell's budget (bytes, 0 = none) and clear its crossing, so a budget
 * set by %%memguard takes effect for the rest of the cell. GIL held. */
void mg_acct_set_budget(int64_t budget);

/* Fill *out. Any thread. */
void mg_acct_snapshot(mg_acct_snapshot_t *out);

/* raise mode: 1 makes hooks refuse NumPy allocations that would cross the budget or the
 * limit (mg_acct_check_request), 0 (warn) only alerts. Any thread. */
void mg_acct_set_raise(int on);
MG_HOOKSAFE int mg_acct_raise(void);

/* The effective limit in bytes (0 = none), the measure compared with it (mg_measure_t in
 * mg_measures.h) and the fraction of it at which the monitor sends MG_KIND_LIMIT (0 < f <= 1).
 * Any thread. */
void mg_acct_set_limit(int64_t bytes, int measure, double fraction);
void mg_acct_get_limit(int64_t *bytes, int *measure, double *fraction);

/* The reserve raise mode keeps below a limit of `limit` bytes on a machine with `cpus`
 * CPUs, for what it cannot refuse (docs/design.md, "Limits and measures"): 32 MiB +
 * limit/256 + 256 KiB per CPU, at most limit/4; 0 without a limit. mg_acct_set_limit
 * applies it. Any thread. */
int64_t mg_acct_reserve_for(int64_t limit, long cpus);

/* The limit's measure as raise mode judges it: mg_measures_estimate of the limit's measure
 * for the live tracked bytes. Hook-safe. */
MG_HOOKSAFE int64_t mg_acct_limit_used(void);

/* Judge a Python-heap request (RAW or arena) of n bytes: MG_REFUSE_LIMIT when raise mode
 * is on and mg_acct_limit_used() + n would leave less than half the reserve under the limit
 * (NumPy data is refused at the whole reserve, so a NumPy refusal leaves the Python heap
 * room for the error's handling and the next cells),
 * else MG_REFUSE_NONE. No budget here: only NumPy data is refused for a budget. Hook-safe:
 * one relaxed load when raise mode is off. */
MG_HOOKSAFE mg_refusal_t mg_acct_check_limit(size_t n);

/* Requests below this many bytes (1 MiB) are judged against half the reserve, like the
 * Python heap's, and larger ones against the whole reserve (mg_acct_check_request). Under
 * load a clean-clone test run saw the estimate drift 0.7 MB into the reserve and refuse an
 * 8-byte scalar of rng.choice instead of the next 32 MB subset. */
#define MG_SMALL_REQUEST ((size_t)1 << 20)

/* Judge a request of n bytes before it is made. In raise mode: MG_REFUSE_BUDGET when the
 * cell's usage + n exceeds its budget, MG_REFUSE_LIMIT when mg_acct_limit_used() + n would
 * leave less than the reserve under the limit (half the reserve for a request below
 * MG_SMALL_REQUEST), or n alone exceeds it; budget first, it is the user's own setting. In
 * warn mode (the caller then only flags the request): MG_REFUSE_LIMIT for a request of at
 * least MG_SMALL_REQUEST that would leave less than the reserve, else MG_REFUSE_NONE
 * (one relaxed load for a smaller one). Hook-safe. */
MG_HOOKSAFE mg_refusal_t mg_acct_check_request(size_t n);

/* Whether a request of n bytes is one warn mode flags: at least MG_SMALL_REQUEST, and it
 * would leave less than the reserve under the limit (what mg_acct_check_request answers in
 * warn mode, whatever the mode). Hook-safe. */
MG_HOOKSAFE int mg_acct_request_over_limit(size_t n);

/* The last refused request, for the MemoryError message: how many refusals so far (a
 * counter, so Python can tell a new one), its bytes, reason, line and epoch. Written by the
 * refusing hook (relaxed stores, count last with release); read by Python (acquire). */
typedef struct mg_acct_refusal {
    uint64_t count;
    int64_t bytes;
    int reason;     /* mg_refusal_t */
    int32_t line;   /* -1 if unknown */
    int64_t epoch;
    int64_t used;    /* mg_acct_limit_used() when it was refused, bytes */
    int64_t reserve; /* the reserve in force now (mg_acct_reserve_for), bytes */
} mg_acct_refusal_t;
MG_HOOKSAFE void mg_acct_note_refusal(size_t n, mg_refusal_t reason, int32_t line);
void mg_acct_refusal(mg_acct_refusal_t *out);

/* Zero the counters and the cell (csrc/module.c's install from a disabled state, tests);
 * the limit, raise mode and the last refusal stay. Not to be called while hooks count. */
void mg_acct_reset(void);

#endif /* MEMGUARD_MG_ACCT_H */
