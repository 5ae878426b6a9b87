/* Owns the attributed-block table and the site table (include/mg_sites.h). Hooks of any
 * thread insert and remove blocks; Python (GIL held) sweeps, lists and configures; the
 * accumulation rule runs in the hook that grows a site. Lock-free, never allocates. */
#include <stdatomic.h>
#include <string.h>

#include "mg_acct.h"
#include "mg_monitor.h"
#include "mg_ring.h"
#include "mg_sites.h"

/* Keys 0 and 1 are never real keys: block addresses are aligned, and site keys are
 * ((epoch + 1) << 21) | (line + 1) >= 2^21. A removed entry becomes a tombstone rather than
 * empty, because a concurrent probe may be walking past it; inserts reuse tombstones, and
 * every probe is bounded by MG_PROBE, so tombstones cost at most that many steps. */
#define KEY_EMPTY 0u
#define KEY_TOMB 1u
#define LINE_BITS 21

typedef struct site_slot {
    _Atomic uint64_t key;        /* written by inserts and sweep (CAS, acq_rel); read by
                                  * everyone (acquire; relaxed in mg_sites_stats) */
    _Atomic int64_t live_bytes;  /* hooks (relaxed RMW); zeroed by sweep before the key;
                                  * read relaxed (a listing may mix instants) */
    _Atomic int64_t live_count;  /* same */
    _Atomic int64_t reported;    /* hooks (CAS, relaxed): live bytes at the last
                                  * accumulation event; zeroed by sweep; read relaxed */
} site_slot_t;

/* A block slot is claimed first, then filled: an insert claims a free slot with a CAS on
 * addr (acq_rel), then stores bytes and site (relaxed) and site_key last (release). A
 * lookup loads addr (acquire), then site_key (acquire): KEY_EMPTY there means "claimed but
 * not filled yet", and then bytes and site are not the block's. The free of p removes
 * site_key (relaxed) before it frees addr (release), so the next claimant starts unfilled.
 * Only the thread that got p from malloc inserts p and only the one freeing it removes it,
 * so the fields of a claimed slot have one writer at a time. */
typedef struct block_slot {
    _Atomic uintptr_t addr;      /* inserts (CAS), frees and the stale path (release store);
                                  * read by every lookup (acquire) */
    _Atomic uint64_t site_key;   /* the claimant (release, after bytes and site) and the free
                                  * (relaxed, before addr); read after addr (acquire) */
    _Atomic int64_t bytes;       /* the claimant (relaxed); read after site_key (relaxed) */
    _Atomic uint32_t site;       /* index into s_sites, or UINT32_MAX for none; same */
} block_slot_t;

static site_slot_t s_sites[MG_SITE_SLOTS];
static block_slot_t s_blocks[MG_BLOCK_SLOTS];
/* Written by setters (relaxed); read by hooks (relaxed). */
static _Atomic size_t s_threshold = MG_SITES_THRESHOLD_DEFAULT;
static _Atomic int64_t s_rule_min_count = 3;
static _Atomic int64_t s_rule_fraction_ppm = 250000; /* 0.25 in millionths: no atomic double */
static _Atomic int64_t s_rule_no_budget = 256ll * 1024 * 1024;
/* Written by hooks (relaxed RMW); read by anyone (relaxed). */
static _Atomic uint64_t s_dropped = 0;
static _Atomic int64_t s_blocks_live = 0;
/* Site slots holding a key: incremented by the insert whose CAS claimed a slot, decremented
 * by the sweep whose CAS freed one (relaxed RMW); read (relaxed) by the listing and the
 * sweep, which skip their walk of the whole table when it is 0 (a site inserted at that
 * moment by another thread may be missed, as a walk racing the insert may miss it). */
static _Atomic int64_t s_sites_used = 0;
/* The line and epoch of the last attributed allocation with a known line: written by hooks
 * (relaxed, line then epoch), read by the monitor's black-box tick (relaxed, each on its
 * own: a pair read across two allocations names one of their lines). */
static _Atomic int32_t s_last_line = -1;
static _Atomic int64_t s_last_epoch = 0;

static inline size_t sites_hash(uint64_t x, unsigned slots)
{
    /* Fibonacci hashing (Knuth, TAOCP 6.4): the high bits of x * 2^64/phi. */
    return (size_t)((x * 0x9E3779B97F4A7C15ull) >> 40) & (slots - 1);
}

static inline uint64_t sites_key(int64_t epoch, int32_t line)
{
    uint64_t l = line < 0 ? 0 : (uint64_t)line + 1;

    if (l >= (1u << LINE_BITS))
        l = 0; /* a line past 2 million is reported as unknown */
    return ((uint64_t)(epoch + 1) << LINE_BITS) | l;
}

MG_HOOKSAFE size_t mg_sites_threshold(void)
{
    return atomic_load_explicit(&s_threshold, memory_order_relaxed);
}

void mg_sites_set_threshold(size_t bytes)
{
    atomic_store_explicit(&s_threshold, bytes < 4096 ? 4096 : bytes, memory_order_relaxed);
}

void mg_sites_get_rule(mg_sites_rule_t *out)
{
    out->min_count = atomic_load_explicit(&s_rule_min_count, memory_order_relaxed);
    out->budget_fraction =
        (double)atomic_load_explicit(&s_rule_fraction_ppm, memory_order_relaxed) / 1e6;
    out->no_budget_bytes = atomic_load_explicit(&s_rule_no_budget, memory_order_relaxed);
}

void mg_sites_set_rule(const mg_sites_rule_t *rule)
{
    atomic_store_explicit(&s_rule_min_count, rule->min_count, memory_order_relaxed);
    atomic_store_explicit(&s_rule_fraction_ppm, (int64_t)(rule->budget_fraction * 1e6 + 0.5),
                          memory_order_relaxed);
    atomic_store_explicit(&s_rule_no_budget, rule->no_budget_bytes, memory_order_relaxed);
}

/* The slot of the site `key`, created if absent; -1 if none is free within MG_PROBE. Two
 * threads creating the same site at once may create it twice; both halves stay correct
 * in bytes, and listing merges nothing, which only matters for unknown lines (sites with
 * a known line are created under the GIL, which serializes them). */
static int64_t sites_find_or_add(uint64_t key)
{
    size_t h = sites_hash(key, MG_SITE_SLOTS);

    for (unsigned i = 0; i < MG_PROBE; i++) {
        size_t j = (h + i) & (MG_SITE_SLOTS - 1);
        uint64_t k = atomic_load_explicit(&s_sites[j].key, memory_order_acquire);

        if (k == key)
            return (int64_t)j;
        if (k == KEY_EMPTY || k == KEY_TOMB) {
            if (atomic_compare_exchange_strong_explicit(&s_sites[j].key, &k, key,
                                                        memory_order_acq_rel,
                                                        memory_order_acquire)) {
                atomic_fetch_add_explicit(&s_sites_used, 1, memory_order_relaxed);
                return (int64_t)j;
            }
            if (k == key)
                return (int64_t)j; /* another thread created it just now */
        }
    }
    return -1;
}

static void sites_push(uint32_t kind, int64_t epoch, int32_t line, int64_t live,
                       int64_t count)
{
    mg_event_t ev;

    ev.kind = kind;
    ev.line = line;
    ev.epoch = epoch;
    ev.bytes = live;
    ev.count = count;
    ev.usage = mg_acct_cell_usage();
    ev.t = mg_ring_now();
    (void)mg_ring_push(&ev); /* a full ring counts the drop itself */
}

/* Charge n bytes to site slot s and apply the accumulation rule. */
static void sites_grow(size_t s, int64_t epoch, int32_t line, int64_t n)
{
    site_slot_t *site = &s_sites[s];
    int64_t count = atomic_fetch_add_explicit(&site->live_count, 1, memory_order_relaxed) + 1;
    int64_t live = atomic_fetch_add_explicit(&site->live_bytes, n, memory_order_relaxed) + n;
    int64_t budget;
    int64_t need;
    int64_t rep;

    if (count < atomic_load_explicit(&s_rule_min_count, memory_order_relaxed))
        return;
    budget = mg_acct_budget();
    need = budget > 0
               ? (int64_t)((double)budget *
                           (double)atomic_load_explicit(&s_rule_fraction_ppm,
                                                        memory_order_relaxed) / 1e6)
               : atomic_load_explicit(&s_rule_no_budget, memory_order_relaxed);
    if (live < need)
        return;
    rep = atomic_load_explicit(&site->reported, memory_order_relaxed);
    if (rep == 0) {
        if (atomic_compare_exchange_strong_explicit(&site->reported, &rep, live,
                                                    memory_order_relaxed,
                                                    memory_order_relaxed))
            sites_push(MG_KIND_ACCUMULATION, epoch, line, live, count);
    } else if ((double)live >= (double)rep * (1.0 + MG_GROW_STEP)) {
        if (atomic_compare_exchange_strong_explicit(&site->reported, &rep, live,
                                                    memory_order_relaxed,
                                                    memory_order_relaxed))
            sites_push(MG_KIND_ACCUMULATION_GROW, epoch, line, live, count);
    }
}

/* Take `bytes` off site slot s, if it still holds the site `key` (a swept and reused slot
 * belongs to another site, which must not lose bytes it never had). */
static void sites_shrink(uint32_t s, uint64_t key, int64_t bytes)
{
    if (s >= MG_SITE_SLOTS ||
        atomic_load_explicit(&s_sites[s].key, memory_order_acquire) != key)
        return;
    atomic_fetch_sub_explicit(&s_sites[s].live_bytes, bytes, memory_order_relaxed);
    atomic_fetch_sub_explicit(&s_sites[s].live_count, 1, memory_order_relaxed);
}

/* Take the block recorded in b (whose addr the caller matched) off its site and empty the
 * slot's value, leaving addr to the caller. A slot claimed but not filled yet (site_key
 * still KEY_EMPTY) holds no block: it can only be seen here when a free of p races the
 * insert of p, which malloc rules out, and then nothing is taken off. */
static void block_forget(block_slot_t *b)
{
    uint64_t key = atomic_load_explicit(&b->site_key, memory_order_acquire);

    if (key == KEY_EMPTY)
        return;
    sites_shrink(atomic_load_explicit(&b->site, memory_order_relaxed), key,
                 atomic_load_explicit(&b->bytes, memory_order_relaxed));
    atomic_store_explicit(&b->site_key, (uint64_t)KEY_EMPTY, memory_order_relaxed);
    atomic_fetch_sub_explicit(&s_blocks_live, 1, memory_order_relaxed);
}

MG_HOOKSAFE void mg_sites_alloc(void *p, size_t n, int64_t epoch, int32_t line)
{
    uintptr_t a = (uintptr_t)p;
    size_t h = sites_hash((uint64_t)(a >> 4), MG_BLOCK_SLOTS);
    uint64_t key = sites_key(epoch, line);
    int64_t s = sites_find_or_add(key);

    if (line > 0) {
        atomic_store_explicit(&s_last_line, line, memory_order_relaxed);
        atomic_store_explicit(&s_last_epoch, epoch, memory_order_relaxed);
    }

    for (unsigned i = 0; i < MG_PROBE; i++) {
        block_slot_t *b = &s_blocks[(h + i) & (MG_BLOCK_SLOTS - 1)];
        uintptr_t k = atomic_load_explicit(&b->addr, memory_order_acquire);

        if (k == a) {
            /* A stale record: p was freed while counting was off. Nobody else can hold p
             * (malloc just returned it), so the slot is already ours: take the old block
             * off its site and fill the slot anew. */
            block_forget(b);
        } else if (k != KEY_EMPTY && k != KEY_TOMB) {
            continue;
        } else if (!atomic_compare_exchange_strong_explicit(&b->addr, &k, a,
                                                             memory_order_acq_rel,
                                                             memory_order_relaxed)) {
            continue; /* another insert claimed this free slot first: keep probing */
        }
        /* The slot is ours: fill it, site_key last (release), so a lookup that sees the key
         * sees the bytes and site that go with it. */
        atomic_store_explicit(&b->bytes, (int64_t)n, memory_order_relaxed);
        atomic_store_explicit(&b->site, s < 0 ? UINT32_MAX : (uint32_t)s, memory_order_relaxed);
        atomic_store_explicit(&b->site_key, key, memory_order_release);
        atomic_fetch_add_explicit(&s_blocks_live, 1, memory_order_relaxed);
        if (s >= 0)
            sites_grow((size_t)s, epoch, line, (int64_t)n);
        return;
    }
    atomic_fetch_add_explicit(&s_dropped, 1, memory_order_relaxed);
}

MG_HOOKSAFE void mg_sites_free(void *p)
{
    uintptr_t a = (uintptr_t)p;
    size_t h = sites_hash((uint64_t)(a >> 4), MG_BLOCK_SLOTS);

    for (unsigned i = 0; i < MG_PROBE; i++) {
        block_slot_t *b = &s_blocks[(h + i) & (MG_BLOCK_SLOTS - 1)];
        uintptr_t k = atomic_load_explicit(&b->addr, memory_order_acquire);

        if (k == KEY_EMPTY)
            return; /* inserts fill the first free slot, so p is not further on */
        if (k != a)
            continue;
        block_forget(b);
        /* Only the thread freeing p can remove p, and inserts only CAS free slots, so a
         * plain store is enough. */
        atomic_store_explicit(&b->addr, (uintptr_t)KEY_TOMB, memory_order_release);
        return;
    }
}

int mg_sites_list(int64_t epoch, mg_site_info_t *out, int max)
{
    int n = 0;

    if (atomic_load_explicit(&s_sites_used, memory_order_relaxed) <= 0)
        return 0;
    for (unsigned j = 0; j < MG_SITE_SLOTS && max > 0; j++) {
        uint64_t k = atomic_load_explicit(&s_sites[j].key, memory_order_acquire);
        mg_site_info_t info;
        int at;

        if (k == KEY_EMPTY || k == KEY_TOMB)
            continue;
        info.epoch = (int64_t)(k >> LINE_BITS) - 1;
        info.line = (int32_t)(k & ((1u << LINE_BITS) - 1)) - 1;
        info.live_bytes = atomic_load_explicit(&s_sites[j].live_bytes, memory_order_relaxed);
        info.live_count = atomic_load_explicit(&s_sites[j].live_count, memory_order_relaxed);
        info.reported = atomic_load_explicit(&s_sites[j].reported, memory_order_relaxed);
        if ((epoch != 0 && info.epoch != epoch) || (info.live_count <= 0 && info.reported == 0))
            continue;
        /* Insertion into out, largest live bytes first; the smallest falls off when full. */
        at = n < max ? n : max;
        while (at > 0 && out[at - 1].live_bytes < info.live_bytes)
            at--;
        if (at >= max)
            continue;
        memmove(&out[at + 1], &out[at], (size_t)((n < max ? n : max - 1) - at) * sizeof(*out));
        out[at] = info;
        if (n < max)
            n++;
    }
    return n;
}

int32_t mg_sites_last_line(int64_t epoch)
{
    if (atomic_load_explicit(&s_last_epoch, memory_order_relaxed) != epoch)
        return -1;
    return atomic_load_explicit(&s_last_line, memory_order_relaxed);
}

void mg_sites_sweep(int64_t current_epoch)
{
    if (atomic_load_explicit(&s_sites_used, memory_order_relaxed) <= 0)
        return;
    for (unsigned j = 0; j < MG_SITE_SLOTS; j++) {
        site_slot_t *site = &s_sites[j];
        uint64_t k = atomic_load_explicit(&site->key, memory_order_acquire);

        if (k == KEY_EMPTY || k == KEY_TOMB ||
            (int64_t)(k >> LINE_BITS) - 1 == current_epoch ||
            atomic_load_explicit(&site->live_count, memory_order_relaxed) > 0)
            continue;
        /* Zero first, then free the key (release): whoever claims the slot next starts
         * from zero. A hook of another thread still charging the old cell here (it read
         * the epoch before the cell changed) could be lost; that is a few bytes of a cell
         * that is over. */
        atomic_store_explicit(&site->live_bytes, 0, memory_order_relaxed);
        atomic_store_explicit(&site->live_count, 0, memory_order_relaxed);
        atomic_store_explicit(&site->reported, 0, memory_order_relaxed);
        if (atomic_compare_exchange_strong_explicit(&site->key, &k, (uint64_t)KEY_TOMB,
                                                    memory_order_acq_rel, memory_order_relaxed))
            atomic_fetch_sub_explicit(&s_sites_used, 1, memory_order_relaxed);
    }
}

void mg_sites_stats(mg_sites_stats_t *out)
{
    uint64_t used = 0;

    for (unsigned j = 0; j < MG_SITE_SLOTS; j++) {
        uint64_t k = atomic_load_explicit(&s_sites[j].key, memory_order_relaxed);

        used += (k != KEY_EMPTY && k != KEY_TOMB);
    }
    out->dropped = atomic_load_explicit(&s_dropped, memory_order_relaxed);
    out->sites = used;
    out->blocks = (uint64_t)atomic_load_explicit(&s_blocks_live, memory_order_relaxed);
}

void mg_sites_reset(void)
{
    for (unsigned j = 0; j < MG_SITE_SLOTS; j++) {
        atomic_store(&s_sites[j].key, (uint64_t)KEY_EMPTY);
        atomic_store(&s_sites[j].live_bytes, 0);
        atomic_store(&s_sites[j].live_count, 0);
        atomic_store(&s_sites[j].reported, 0);
    }
    for (unsigned j = 0; j < MG_BLOCK_SLOTS; j++) {
        atomic_store(&s_blocks[j].addr, (uintptr_t)KEY_EMPTY);
        atomic_store(&s_blocks[j].site_key, (uint64_t)KEY_EMPTY);
    }
    atomic_store(&s_dropped, 0);
    atomic_store(&s_blocks_live, 0);
    atomic_store(&s_sites_used, 0);
    atomic_store(&s_last_line, -1);
    atomic_store(&s_last_epoch, 0);
}
