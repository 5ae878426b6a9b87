/* Owns the byte counters and the current cell's start/peak/budget (include/mg_acct.h).
 * Hooks of any thread update it; Python (GIL held) starts cells; the monitor reads it. */
#include <sched.h>
#include <stdatomic.h>
#include <unistd.h>

#include "mg_acct.h"
#include "mg_measures.h"

/* Written by mg_acct_set_enabled (release, any thread); read by hooks (relaxed): a hook
 * that sees the old value counts or skips one more call, which is harmless. */
static _Atomic int s_enabled = 0;
/* Written by hooks (relaxed RMW); read by everyone (relaxed). Live bytes since install, per
 * allocator domain; the tracked total is their sum (tracked_sum), so a hook pays one atomic
 * read-modify-write per call, not two (bench/overhead.py, small_arrays). */
static _Atomic int64_t s_domain[MG_DOMAIN_COUNT];

/* The cell protocol. A cell is (s_epoch, s_cell_start, s_budget), plus the reset of
 * s_cell_peak. Its only writer is Python with the GIL held (mg_acct_cell_begin,
 * mg_acct_set_budget; mg_acct_reset in tests, with no hook running), which writes inside
 * the sequence lock s_cell_seq: seq made odd (relaxed store), release fence, the fields
 * (relaxed stores), seq made even (release store). A reader loads seq (acquire), the
 * fields it needs (relaxed), then an acquire fence and seq again (relaxed): the same even
 * value twice means the fields belong to one cell (H.-J. Boehm, "Can seqlocks get along
 * with programming language memory models?", MSPC 2012). A hook never waits for the
 * writer: seeing a change under way, it skips the budget check for that one allocation and
 * the next allocation checks it; mg_acct_snapshot (not a hook) tries again. A hook's only
 * read-modify-write stays the one on s_domain: the seqlock adds two plain loads on x86.
 * Outside the lock: s_cell_peak, raised by hooks (relaxed CAS, only while growing) and
 * reset by the writer, read relaxed; s_crossed, the epoch of the last cell that crossed
 * its budget (0 = none), which hooks and the monitor only raise (CAS, acq_rel), so a hook
 * still finishing a check of an earlier cell can never mark the current one crossed, and
 * which set_budget clears (0) to re-arm the crossing. */
static _Atomic uint64_t s_cell_seq = 0;
static _Atomic int64_t s_epoch = 0;
static _Atomic int64_t s_cell_start = 0;
static _Atomic int64_t s_budget = 0; /* 0 = no budget */
static _Atomic int64_t s_cell_peak = 0;
static _Atomic int64_t s_crossed = 0;
/* Written by setters (relaxed, GIL held); read by hooks and the monitor (relaxed), each on
 * its own: a hook racing a change uses the old or the new value of each. */
static _Atomic int s_raise = 0;
static _Atomic int64_t s_limit = 0;
static _Atomic int s_limit_measure = MG_MEASURE_RSS;
static _Atomic int64_t s_limit_ppm = 900000; /* alert fraction in millionths (0.9) */
/* The reserve kept below the limit for what raise mode cannot refuse (reserve_for): written
 * by mg_acct_set_limit with s_limit (relaxed, GIL held); read by hooks (relaxed). */
static _Atomic int64_t s_reserve = 0;
/* The last refusal: fields written by the refusing hook (relaxed), then s_ref_count
 * (release); Python reads s_ref_count (acquire), then the fields. Two refusals racing in
 * two threads may mix fields; the message is then about one of them. */
static _Atomic uint64_t s_ref_count = 0;
static _Atomic int64_t s_ref_bytes = 0;
static _Atomic int s_ref_reason = 0;
static _Atomic int32_t s_ref_line = -1;
static _Atomic int64_t s_ref_epoch = 0;
static _Atomic int64_t s_ref_used = 0;

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

    /* Unrolled: every NumPy allocation sums the domains, and the loop's counter and
     * compare cost more instructions than the loads (bench/overhead.py --callgrind). */
#pragma GCC unroll 8
    for (int d = 0; d < MG_DOMAIN_COUNT; d++)
        sum += atomic_load_explicit(&s_domain[d], memory_order_relaxed);
    return sum;
}

/* One cell as read under the protocol above. */
typedef struct cell_view {
    int64_t epoch;
    int64_t start;
    int64_t budget;
} cell_view_t;

/* One read of the running cell; returns 0 when a cell start or budget change overlapped
 * it (then *v is not to be used). Hook-safe: never waits. */
static int cell_read(cell_view_t *v)
{
    uint64_t seq = atomic_load_explicit(&s_cell_seq, memory_order_acquire);

    v->epoch = atomic_load_explicit(&s_epoch, memory_order_relaxed);
    v->start = atomic_load_explicit(&s_cell_start, memory_order_relaxed);
    v->budget = atomic_load_explicit(&s_budget, memory_order_relaxed);
    atomic_thread_fence(memory_order_acquire);
    return (seq & 1u) == 0 && atomic_load_explicit(&s_cell_seq, memory_order_relaxed) == seq;
}

/* The writer's side: the caller holds the GIL, so writers never overlap. */
static void cell_write_begin(void)
{
    uint64_t seq = atomic_load_explicit(&s_cell_seq, memory_order_relaxed);

    atomic_store_explicit(&s_cell_seq, seq + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
}

static void cell_write_end(void)
{
    uint64_t seq = atomic_load_explicit(&s_cell_seq, memory_order_relaxed);

    atomic_store_explicit(&s_cell_seq, seq + 1, memory_order_release);
}

/* Raise s_crossed to epoch; returns 1 if this call did (the cell had not crossed yet). */
static int cross_epoch(int64_t epoch)
{
    int64_t seen = atomic_load_explicit(&s_crossed, memory_order_relaxed);

    while (seen < epoch) {
        if (atomic_compare_exchange_weak_explicit(&s_crossed, &seen, epoch,
                                                  memory_order_acq_rel, memory_order_relaxed))
            return 1;
    }
    return 0;
}

/* Add n bytes to domain d and raise the cell's peak to the new total; returns the total
 * (with this block: the same thread's RMW comes first). Hook-safe. */
static inline int64_t add_and_peak(mg_domain_t d, int64_t n)
{
    int64_t now;
    int64_t peak;

    atomic_fetch_add_explicit(&s_domain[d], n, memory_order_relaxed);
    now = tracked_sum();
    peak = atomic_load_explicit(&s_cell_peak, memory_order_relaxed);
    while (now > peak &&
           !atomic_compare_exchange_weak_explicit(&s_cell_peak, &peak, now,
                                                  memory_order_relaxed, memory_order_relaxed)) {
        /* peak was reloaded by the failed CAS; retry while we are still higher */
    }
    return now;
}

MG_HOOKSAFE void mg_acct_add(mg_domain_t d, size_t n)
{
    (void)add_and_peak(d, (int64_t)n);
}

MG_HOOKSAFE int mg_acct_alloc(mg_domain_t d, size_t n)
{
    int64_t now = add_and_peak(d, (int64_t)n);
    uint64_t seq;
    int64_t budget;
    int64_t start;
    int64_t epoch;

    /* The cell protocol's read, inlined so the common case (no budget) stops after two
     * loads. A budget of 0 read during a change only skips this one check. */
    seq = atomic_load_explicit(&s_cell_seq, memory_order_acquire);
    budget = atomic_load_explicit(&s_budget, memory_order_relaxed);
    if (budget <= 0)
        return 0;
    start = atomic_load_explicit(&s_cell_start, memory_order_relaxed);
    epoch = atomic_load_explicit(&s_epoch, memory_order_relaxed);
    atomic_thread_fence(memory_order_acquire);
    if ((seq & 1u) || atomic_load_explicit(&s_cell_seq, memory_order_relaxed) != seq)
        return 0; /* a cell is starting: the next allocation checks */
    if (now - start <= budget)
        return 0;
    if (atomic_load_explicit(&s_crossed, memory_order_relaxed) >= epoch)
        return 0; /* cheap early exit: the crossing was already reported this cell */
    return cross_epoch(epoch);
}

MG_HOOKSAFE void mg_acct_free(mg_domain_t d, size_t n)
{
    atomic_fetch_sub_explicit(&s_domain[d], (int64_t)n, memory_order_relaxed);
}

MG_HOOKSAFE int64_t mg_acct_cell_usage(void)
{
    cell_view_t v;

    /* A read overlapping a cell start gets that start, as loaded: the figure goes into an
     * event or a refusal check only, where either cell's start is as good. */
    (void)cell_read(&v);
    return tracked_sum() - v.start;
}

MG_HOOKSAFE int64_t mg_acct_tracked(void)
{
    return tracked_sum();
}

MG_HOOKSAFE int64_t mg_acct_budget(void)
{
    return atomic_load_explicit(&s_budget, memory_order_relaxed);
}

int mg_acct_cross(int64_t epoch)
{
    return cross_epoch(epoch);
}

MG_HOOKSAFE int64_t mg_acct_epoch(void)
{
    return atomic_load_explicit(&s_epoch, memory_order_relaxed);
}

void mg_acct_cell_begin(int64_t epoch, int64_t budget)
{
    int64_t now = tracked_sum();

    cell_write_begin();
    atomic_store_explicit(&s_epoch, epoch, memory_order_relaxed);
    atomic_store_explicit(&s_cell_start, now, memory_order_relaxed);
    atomic_store_explicit(&s_budget, budget > 0 ? budget : 0, memory_order_relaxed);
    atomic_store_explicit(&s_cell_peak, now, memory_order_relaxed);
    cell_write_end();
}

void mg_acct_set_budget(int64_t budget)
{
    cell_write_begin();
    atomic_store_explicit(&s_budget, budget > 0 ? budget : 0, memory_order_relaxed);
    atomic_store_explicit(&s_crossed, 0, memory_order_relaxed);
    cell_write_end();
}

void mg_acct_snapshot(mg_acct_snapshot_t *out)
{
    cell_view_t v;

    out->tracked = 0;
    for (int d = 0; d < MG_DOMAIN_COUNT; d++) {
        out->domain[d] = atomic_load_explicit(&s_domain[d], memory_order_relaxed);
        out->tracked += out->domain[d];
    }
    /* Not a hook: wait out a cell start (the writer is a few stores long). */
    while (!cell_read(&v))
        sched_yield();
    out->epoch = v.epoch;
    out->cell_start = v.start;
    out->budget = v.budget;
    out->cell_peak = atomic_load_explicit(&s_cell_peak, memory_order_relaxed);
    out->crossed = v.epoch > 0 &&
                   atomic_load_explicit(&s_crossed, memory_order_relaxed) >= v.epoch;
}

void mg_acct_set_raise(int on)
{
    atomic_store_explicit(&s_raise, on ? 1 : 0, memory_order_relaxed);
}

MG_HOOKSAFE int mg_acct_raise(void)
{
    return atomic_load_explicit(&s_raise, memory_order_relaxed);
}

int64_t mg_acct_reserve_for(int64_t limit, long cpus)
{
    int64_t reserve;

    if (limit <= 0)
        return 0;
    if (cpus < 1)
        cpus = 1;
    /* docs/design.md, "Limits and measures", the reserve: 32 MiB for what a refused cell
     * allocates once it is refused (the error, its traceback rendered and published, the
     * alert: at most 7.2 MiB measured, so four times that, rounded), limit/256 for the page
     * tables of the memory under the limit (8 bytes per 4 KiB page, 1/512, twice over), and
     * 64 pages per CPU (the charges a memory cgroup batches per CPU before its usage shows
     * them). At most a quarter of a small limit. */
    reserve = ((int64_t)32 << 20) + limit / 256 + (int64_t)cpus * 64 * 4096;
    return reserve < limit / 4 ? reserve : limit / 4;
}

void mg_acct_set_limit(int64_t bytes, int measure, double fraction)
{
    long cpus = sysconf(_SC_NPROCESSORS_CONF);

    atomic_store_explicit(&s_limit_measure, measure, memory_order_relaxed);
    atomic_store_explicit(&s_limit_ppm, (int64_t)(fraction * 1e6 + 0.5), memory_order_relaxed);
    atomic_store_explicit(&s_reserve, mg_acct_reserve_for(bytes, cpus), memory_order_relaxed);
    atomic_store_explicit(&s_limit, bytes > 0 ? bytes : 0, memory_order_relaxed);
}

MG_HOOKSAFE int64_t mg_acct_limit_used(void)
{
    int m = atomic_load_explicit(&s_limit_measure, memory_order_relaxed);

    return mg_measures_estimate((mg_measure_t)m, tracked_sum());
}

/* Whether a request of n bytes would leave less than reserve/2^shift under the limit: shift
 * 0 for NumPy data, 1 for the Python heap, whose line is half the reserve nearer the limit
 * so that, after a NumPy refusal, the error's handling and the next cells still have Python
 * heap to run on (docs/design.md, "Limits and measures"). */
static int over_limit(size_t n, int shift)
{
    int64_t limit = atomic_load_explicit(&s_limit, memory_order_relaxed);
    int64_t reserve = atomic_load_explicit(&s_reserve, memory_order_relaxed);
    int m;

    if (limit <= 0)
        return 0;
    if (n > (size_t)limit)
        return 1;
    if (mg_acct_limit_used() + (int64_t)n <= limit - (reserve >> shift))
        return 0;
    /* Rare path: over the line on the last sample. Confirm with the measure read now
     * before refusing (mg_measures_estimate_now says which staleness this removes). */
    m = atomic_load_explicit(&s_limit_measure, memory_order_relaxed);
    return mg_measures_estimate_now((mg_measure_t)m) + (int64_t)n >
           limit - (reserve >> shift);
}

MG_HOOKSAFE mg_refusal_t mg_acct_check_limit(size_t n)
{
    if (!atomic_load_explicit(&s_raise, memory_order_relaxed))
        return MG_REFUSE_NONE;
    return over_limit(n, 1) ? MG_REFUSE_LIMIT : MG_REFUSE_NONE;
}

void mg_acct_get_limit(int64_t *bytes, int *measure, double *fraction)
{
    *bytes = atomic_load_explicit(&s_limit, memory_order_relaxed);
    *measure = atomic_load_explicit(&s_limit_measure, memory_order_relaxed);
    *fraction = (double)atomic_load_explicit(&s_limit_ppm, memory_order_relaxed) / 1e6;
}

MG_HOOKSAFE int mg_acct_request_over_limit(size_t n)
{
    return n >= MG_SMALL_REQUEST && over_limit(n, 0);
}

MG_HOOKSAFE mg_refusal_t mg_acct_check_request(size_t n)
{
    cell_view_t v;

    /* Warn mode only flags a request that alone would cross the limit (once per cell), and
     * judges requests of at least MG_SMALL_REQUEST only: smaller growth reaches the limit
     * rule of the monitor, and NumPy's many small blocks keep their hook to a few loads
     * (bench/overhead.py --callgrind, small_arrays: the limit's estimate was a third of
     * the hook's instructions). */
    if (!atomic_load_explicit(&s_raise, memory_order_relaxed))
        return mg_acct_request_over_limit(n) ? MG_REFUSE_LIMIT : MG_REFUSE_NONE;
    /* A read overlapping a cell start refuses nothing on the budget (never wrongly). */
    if (cell_read(&v) && v.budget > 0 && tracked_sum() - v.start + (int64_t)n > v.budget)
        return MG_REFUSE_BUDGET;
    /* A small request is judged like the Python heap's, against half the reserve: within
     * the reserve, the block worth refusing is the next large one, not an index array or a
     * scalar that the usage estimate's drift happened to put over the line. */
    return over_limit(n, n < MG_SMALL_REQUEST ? 1 : 0) ? MG_REFUSE_LIMIT : MG_REFUSE_NONE;
}

MG_HOOKSAFE void mg_acct_note_refusal(size_t n, mg_refusal_t reason, int32_t line)
{
    atomic_store_explicit(&s_ref_bytes, (int64_t)n, memory_order_relaxed);
    atomic_store_explicit(&s_ref_reason, (int)reason, memory_order_relaxed);
    atomic_store_explicit(&s_ref_line, line, memory_order_relaxed);
    atomic_store_explicit(&s_ref_epoch, atomic_load_explicit(&s_epoch, memory_order_relaxed),
                          memory_order_relaxed);
    atomic_store_explicit(&s_ref_used, mg_acct_limit_used(), memory_order_relaxed);
    atomic_fetch_add_explicit(&s_ref_count, 1, memory_order_release);
}

void mg_acct_refusal(mg_acct_refusal_t *out)
{
    out->count = atomic_load_explicit(&s_ref_count, memory_order_acquire);
    out->bytes = atomic_load_explicit(&s_ref_bytes, memory_order_relaxed);
    out->reason = atomic_load_explicit(&s_ref_reason, memory_order_relaxed);
    out->line = atomic_load_explicit(&s_ref_line, memory_order_relaxed);
    out->epoch = atomic_load_explicit(&s_ref_epoch, memory_order_relaxed);
    out->used = atomic_load_explicit(&s_ref_used, memory_order_relaxed);
    out->reserve = atomic_load_explicit(&s_reserve, memory_order_relaxed);
}

void mg_acct_reset(void)
{
    for (int d = 0; d < MG_DOMAIN_COUNT; d++)
        atomic_store(&s_domain[d], 0);
    cell_write_begin();
    atomic_store_explicit(&s_cell_start, 0, memory_order_relaxed);
    atomic_store_explicit(&s_cell_peak, 0, memory_order_relaxed);
    atomic_store_explicit(&s_budget, 0, memory_order_relaxed);
    atomic_store_explicit(&s_epoch, 0, memory_order_relaxed);
    atomic_store_explicit(&s_crossed, 0, memory_order_relaxed);
    cell_write_end();
}
