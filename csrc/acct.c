/* Owns the byte counters and the current cell's start/peak/budget (include/mg_acct.h).
 * Hooks of any thread update it; Python (GIL held) starts cells; the monitor reads it. */
#include <stdatomic.h>

#include "mg_acct.h"
#include "mg_measures.h"

/* Written by mg_acct_set_enabled (release); read by hooks (relaxed). */
static _Atomic int s_enabled = 0;
/* Written by hooks (relaxed RMW); read by everyone (relaxed). Live bytes since install, per
 * allocator domain; the tracked total is their sum (tracked_sum), so a hook pays one atomic
 * read-modify-write per call, not two (bench/overhead.py, small_arrays). */
static _Atomic int64_t s_domain[MG_DOMAIN_COUNT];
/* Written by mg_acct_cell_begin (relaxed, GIL held); read by hooks and the monitor. */
static _Atomic int64_t s_cell_start = 0;
static _Atomic int64_t s_epoch = 0;
/* Written by mg_acct_cell_begin/set_budget; read by hooks (relaxed). 0 = no budget. */
static _Atomic int64_t s_budget = 0;
/* Raised by hooks (CAS, relaxed); reset by mg_acct_cell_begin; read by the monitor. */
static _Atomic int64_t s_cell_peak = 0;
/* Set by the first hook that crosses the budget in a cell (exchange, acq_rel), so exactly
 * one allocation reports the crossing; cleared by cell_begin/set_budget. */
static _Atomic int s_crossed = 0;
/* Written by setters (relaxed, GIL held); read by hooks and the monitor (relaxed). */
static _Atomic int s_raise = 0;
static _Atomic int64_t s_limit = 0;
static _Atomic int s_limit_measure = MG_MEASURE_RSS;
static _Atomic int64_t s_limit_ppm = 900000; /* alert fraction in millionths (0.9) */
/* The last refusal: fields written by the refusing hook (relaxed), then s_ref_count
 * (release); Python reads s_ref_count (acquire), then the fields. Two refusals racing in
 * two threads may mix fields; the message is then about one of them. */
static _Atomic uint64_t s_ref_count = 0;
static _Atomic int64_t s_ref_bytes = 0;
static _Atomic int s_ref_reason = 0;
static _Atomic int32_t s_ref_line = -1;
static _Atomic int64_t s_ref_epoch = 0;

void mg_acct_set_enabled(int enabled)
{
    atomic_store_explicit(&s_enabled, enabled ? 1 : 0, memory_order_release);
}

MG_HOOKSAFE int mg_acct_enabled(void)
{
    return atomic_load_explicit(&s_enabled, memory_order_relaxed);
}

/* Live tracked bytes: the sum of the domains, each read once (relaxed), so the total may mix
 * instants a few instructions apart, as any snapshot does. Hook-safe. */
static int64_t tracked_sum(void)
{
    int64_t sum = 0;

    for (int d = 0; d < MG_DOMAIN_COUNT; d++)
        sum += atomic_load_explicit(&s_domain[d], memory_order_relaxed);
    return sum;
}

MG_HOOKSAFE int mg_acct_alloc(mg_domain_t d, size_t n)
{
    int64_t now = (int64_t)n;
    int64_t peak;
    int64_t budget;

    for (int i = 0; i < MG_DOMAIN_COUNT; i++) {
        if (i == (int)d)
            now += atomic_fetch_add_explicit(&s_domain[i], (int64_t)n, memory_order_relaxed);
        else
            now += atomic_load_explicit(&s_domain[i], memory_order_relaxed);
    }
    peak = atomic_load_explicit(&s_cell_peak, memory_order_relaxed);
    while (now > peak &&
           !atomic_compare_exchange_weak_explicit(&s_cell_peak, &peak, now,
                                                  memory_order_relaxed, memory_order_relaxed)) {
        /* peak was reloaded by the failed CAS; retry while we are still higher */
    }
    budget = atomic_load_explicit(&s_budget, memory_order_relaxed);
    if (budget <= 0 || now - atomic_load_explicit(&s_cell_start, memory_order_relaxed) <= budget)
        return 0;
    if (atomic_load_explicit(&s_crossed, memory_order_relaxed))
        return 0; /* cheap early exit: the crossing was already reported this cell */
    return atomic_exchange_explicit(&s_crossed, 1, memory_order_acq_rel) == 0;
}

MG_HOOKSAFE void mg_acct_free(mg_domain_t d, size_t n)
{
    atomic_fetch_sub_explicit(&s_domain[d], (int64_t)n, memory_order_relaxed);
}

MG_HOOKSAFE int64_t mg_acct_cell_usage(void)
{
    return tracked_sum() - atomic_load_explicit(&s_cell_start, memory_order_relaxed);
}

MG_HOOKSAFE int64_t mg_acct_budget(void)
{
    return atomic_load_explicit(&s_budget, memory_order_relaxed);
}

int mg_acct_cross(void)
{
    return atomic_exchange_explicit(&s_crossed, 1, memory_order_acq_rel) == 0;
}

MG_HOOKSAFE int64_t mg_acct_epoch(void)
{
    return atomic_load_explicit(&s_epoch, memory_order_relaxed);
}

void mg_acct_cell_begin(int64_t epoch, int64_t budget)
{
    int64_t now = tracked_sum();

    /* Budget 0 first, so no hook compares a new start against the old cell's budget. */
    atomic_store_explicit(&s_budget, 0, memory_order_relaxed);
    atomic_store_explicit(&s_cell_start, now, memory_order_relaxed);
    atomic_store_explicit(&s_cell_peak, now, memory_order_relaxed);
    atomic_store_explicit(&s_crossed, 0, memory_order_relaxed);
    atomic_store_explicit(&s_epoch, epoch, memory_order_release);
    atomic_store_explicit(&s_budget, budget > 0 ? budget : 0, memory_order_release);
}

void mg_acct_set_budget(int64_t budget)
{
    atomic_store_explicit(&s_crossed, 0, memory_order_relaxed);
    atomic_store_explicit(&s_budget, budget > 0 ? budget : 0, memory_order_release);
}

void mg_acct_snapshot(mg_acct_snapshot_t *out)
{
    out->tracked = 0;
    for (int d = 0; d < MG_DOMAIN_COUNT; d++) {
        out->domain[d] = atomic_load_explicit(&s_domain[d], memory_order_relaxed);
        out->tracked += out->domain[d];
    }
    out->cell_start = atomic_load_explicit(&s_cell_start, memory_order_relaxed);
    out->cell_peak = atomic_load_explicit(&s_cell_peak, memory_order_relaxed);
    out->budget = atomic_load_explicit(&s_budget, memory_order_relaxed);
    out->epoch = atomic_load_explicit(&s_epoch, memory_order_acquire);
    out->crossed = atomic_load_explicit(&s_crossed, memory_order_relaxed);
}

void mg_acct_set_raise(int on)
{
    atomic_store_explicit(&s_raise, on ? 1 : 0, memory_order_relaxed);
}

MG_HOOKSAFE int mg_acct_raise(void)
{
    return atomic_load_explicit(&s_raise, memory_order_relaxed);
}

void mg_acct_set_limit(int64_t bytes, int measure, double fraction)
{
    atomic_store_explicit(&s_limit_measure, measure, memory_order_relaxed);
    atomic_store_explicit(&s_limit_ppm, (int64_t)(fraction * 1e6 + 0.5), memory_order_relaxed);
    atomic_store_explicit(&s_limit, bytes > 0 ? bytes : 0, memory_order_relaxed);
}

void mg_acct_get_limit(int64_t *bytes, int *measure, double *fraction)
{
    *bytes = atomic_load_explicit(&s_limit, memory_order_relaxed);
    *measure = atomic_load_explicit(&s_limit_measure, memory_order_relaxed);
    *fraction = (double)atomic_load_explicit(&s_limit_ppm, memory_order_relaxed) / 1e6;
}

MG_HOOKSAFE mg_refusal_t mg_acct_check_request(size_t n)
{
    int64_t budget = atomic_load_explicit(&s_budget, memory_order_relaxed);
    int64_t limit = atomic_load_explicit(&s_limit, memory_order_relaxed);

    if (budget > 0 && atomic_load_explicit(&s_raise, memory_order_relaxed) &&
        mg_acct_cell_usage() + (int64_t)n > budget)
        return MG_REFUSE_BUDGET;
    if (limit > 0) {
        int m = atomic_load_explicit(&s_limit_measure, memory_order_relaxed);
        int64_t used = mg_measures_used((mg_measure_t)m);

        /* used is 0 until the first sample: then only a request beyond the whole limit. */
        if (used + (int64_t)n > limit)
            return MG_REFUSE_LIMIT;
    }
    return MG_REFUSE_NONE;
}

MG_HOOKSAFE void mg_acct_note_refusal(size_t n, mg_refusal_t reason, int32_t line)
{
    atomic_store_explicit(&s_ref_bytes, (int64_t)n, memory_order_relaxed);
    atomic_store_explicit(&s_ref_reason, (int)reason, memory_order_relaxed);
    atomic_store_explicit(&s_ref_line, line, memory_order_relaxed);
    atomic_store_explicit(&s_ref_epoch, atomic_load_explicit(&s_epoch, memory_order_relaxed),
                          memory_order_relaxed);
    atomic_fetch_add_explicit(&s_ref_count, 1, memory_order_release);
}

void mg_acct_refusal(mg_acct_refusal_t *out)
{
    out->count = atomic_load_explicit(&s_ref_count, memory_order_acquire);
    out->bytes = atomic_load_explicit(&s_ref_bytes, memory_order_relaxed);
    out->reason = atomic_load_explicit(&s_ref_reason, memory_order_relaxed);
    out->line = atomic_load_explicit(&s_ref_line, memory_order_relaxed);
    out->epoch = atomic_load_explicit(&s_ref_epoch, memory_order_relaxed);
}

void mg_acct_reset(void)
{
    for (int d = 0; d < MG_DOMAIN_COUNT; d++)
        atomic_store(&s_domain[d], 0);
    atomic_store(&s_cell_start, 0);
    atomic_store(&s_cell_peak, 0);
    atomic_store(&s_budget, 0);
    atomic_store(&s_epoch, 0);
    atomic_store(&s_crossed, 0);
}
