/* Tests of csrc/sites.c: blocks charged to their site and taken off at free, the
 * accumulation rule (fires once, grows, never on churn), stale and reused slots, listing,
 * a full table, and concurrent threads. Addresses are fake: the table never dereferences. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "mg_acct.h"
#include "mg_ring.h"
#include "mg_sites.h"
#include "tap.h"

#define MB (1024 * 1024)

static void *addr(uintptr_t i)
{
    return (void *)(0x10000000u + i * 0x1000u);
}

static void fresh(int64_t epoch, int64_t budget)
{
    mg_sites_reset();
    mg_ring_reset();
    mg_acct_reset();
    mg_acct_cell_begin(epoch, budget);
}

static int site(int64_t epoch, int32_t line, mg_site_info_t *out)
{
    mg_site_info_t all[16];
    int n = mg_sites_list(epoch, all, 16);

    for (int i = 0; i < n; i++) {
        if (all[i].line == line) {
            *out = all[i];
            return 1;
        }
    }
    return 0;
}

static int drain(mg_event_t *last, uint32_t kind)
{
    mg_event_t ev;
    int n = 0;

    while (mg_ring_pop(&ev) == 0) {
        if (ev.kind == kind) {
            *last = ev;
            n++;
        }
    }
    return n;
}

static void t_site_counts_live_blocks(void)
{
    mg_site_info_t s;

    fresh(1, 0);
    mg_sites_alloc(addr(1), 2 * MB, 1, 7);
    mg_sites_alloc(addr(2), 3 * MB, 1, 7);
    mg_sites_alloc(addr(3), 1 * MB, 1, 9);
    mg_sites_free(addr(1));
    check_int(site(1, 7, &s), ==, 1);
    check_int(s.live_bytes, ==, 3 * MB);
    check_int(s.live_count, ==, 1);
    check_int(site(1, 9, &s), ==, 1);
    check_int(s.live_bytes, ==, 1 * MB);
}

static void t_accumulation_fires_once_then_grows(void)
{
    mg_event_t ev;

    fresh(2, 100 * MB); /* rule: >= 3 blocks and >= 25 MB */
    mg_sites_alloc(addr(1), 10 * MB, 2, 4);
    mg_sites_alloc(addr(2), 10 * MB, 2, 4);
    check_int(drain(&ev, MG_KIND_ACCUMULATION), ==, 0);
    mg_sites_alloc(addr(3), 10 * MB, 2, 4); /* 3 blocks, 30 MB */
    check_int(drain(&ev, MG_KIND_ACCUMULATION), ==, 1);
    check_int(ev.line, ==, 4);
    check_int(ev.epoch, ==, 2);
    check_int(ev.count, ==, 3);
    check_int(ev.bytes, ==, 30 * MB);
    mg_sites_alloc(addr(4), 1 * MB, 2, 4); /* +3%: no update */
    check_int(drain(&ev, MG_KIND_ACCUMULATION_GROW), ==, 0);
    mg_sites_alloc(addr(5), 10 * MB, 2, 4); /* 41 MB: +37% */
    check_int(drain(&ev, MG_KIND_ACCUMULATION_GROW), ==, 1);
    check_int(ev.count, ==, 5);
    check_int(ev.bytes, ==, 41 * MB);
}

static void t_churn_never_fires(void)
{
    mg_event_t ev;

    fresh(3, 200 * MB);
    for (uintptr_t i = 0; i < 20; i++) {
        mg_sites_alloc(addr(100 + i), 100 * MB, 3, 5);
        if (i > 0)
            mg_sites_free(addr(100 + i - 1)); /* two alive at most, as in x = f(x) */
    }
    check_int(drain(&ev, MG_KIND_ACCUMULATION), ==, 0);
}

static void t_no_budget_uses_the_absolute_rule(void)
{
    mg_event_t ev;

    fresh(4, 0); /* rule: >= 3 blocks and >= 256 MiB */
    for (uintptr_t i = 0; i < 4; i++)
        mg_sites_alloc(addr(i), 50 * MB, 4, 2);
    check_int(drain(&ev, MG_KIND_ACCUMULATION), ==, 0);
    for (uintptr_t i = 4; i < 6; i++)
        mg_sites_alloc(addr(i), 50 * MB, 4, 2);
    check_int(drain(&ev, MG_KIND_ACCUMULATION), ==, 1);
    check_int(ev.bytes, ==, 300 * MB);
}

static void t_stale_record_is_replaced(void)
{
    mg_site_info_t s;

    fresh(5, 0);
    mg_sites_alloc(addr(1), 4 * MB, 5, 1); /* freed later without notice (counting off) */
    mg_sites_alloc(addr(1), 2 * MB, 5, 2); /* malloc hands the address out again */
    check_int(site(5, 1, &s), ==, 0);      /* line 1 lost its stale block */
    check_int(site(5, 2, &s), ==, 1);
    check_int(s.live_bytes, ==, 2 * MB);
    mg_sites_free(addr(1));
    check_int(site(5, 2, &s), ==, 0);
}

static void t_sweep_keeps_live_sites_and_reused_slots_stay_right(void)
{
    mg_site_info_t s;
    mg_site_info_t all[8];

    fresh(6, 0);
    mg_sites_alloc(addr(1), 1 * MB, 6, 1);
    mg_sites_alloc(addr(2), 1 * MB, 6, 2);
    mg_sites_free(addr(2));
    mg_sites_sweep(7); /* cell 7 starts: (6,2) is empty and goes, (6,1) still holds 1 MB */
    check_int(mg_sites_list(6, all, 8), ==, 1);
    check_int(all[0].line, ==, 1);
    mg_sites_alloc(addr(3), 1 * MB, 7, 2);
    mg_sites_free(addr(1));
    check_int(site(7, 2, &s), ==, 1);
    check_int(s.live_bytes, ==, 1 * MB);
}

/* The listing and the sweep skip their walk when no slot holds a site (s_sites_used): after
 * sweeps emptied the table, a site created later must still be listed and swept. */
static void t_emptied_table_still_lists_new_sites(void)
{
    mg_sites_stats_t st;
    mg_site_info_t all[4];

    fresh(20, 0);
    mg_sites_sweep(20); /* nothing to walk */
    for (int round = 0; round < 3; round++) {
        int64_t epoch = 21 + round;

        mg_sites_alloc(addr(1), 2 * MB, epoch, 3);
        mg_sites_alloc(addr(2), 1 * MB, epoch, 4);
        check_int(mg_sites_list(epoch, all, 4), ==, 2);
        mg_sites_free(addr(1));
        mg_sites_free(addr(2));
        mg_sites_sweep(epoch + 1); /* both sites are empty and go */
        mg_sites_stats(&st);
        check_int((int64_t)st.sites, ==, 0);
        check_int(mg_sites_list(0, all, 4), ==, 0);
    }
    mg_sites_alloc(addr(3), 1 * MB, 30, 9);
    check_int(mg_sites_list(30, all, 4), ==, 1);
    check_int(all[0].line, ==, 9);
    mg_sites_free(addr(3));
    mg_sites_sweep(31);
    mg_sites_stats(&st);
    check_int((int64_t)st.sites, ==, 0);
}

static void t_list_orders_by_bytes_and_truncates(void)
{
    mg_site_info_t all[3];

    fresh(8, 0);
    for (int line = 1; line <= 6; line++)
        mg_sites_alloc(addr((uintptr_t)line), (size_t)line * MB, 8, line);
    check_int(mg_sites_list(8, all, 3), ==, 3);
    check_int(all[0].line, ==, 6);
    check_int(all[1].line, ==, 5);
    check_int(all[2].line, ==, 4);
    check_int(mg_sites_list(9, all, 3), ==, 0);
}

static void t_full_probe_window_drops_and_counts(void)
{
    mg_sites_stats_t st;
    uintptr_t n = MG_BLOCK_SLOTS + 100;

    fresh(9, 0);
    for (uintptr_t i = 0; i < n; i++)
        mg_sites_alloc(addr(i), 1 * MB, 9, 1);
    mg_sites_stats(&st);
    check_uint(st.dropped + st.blocks, ==, n);
    check_uint(st.dropped, >=, 100);
    for (uintptr_t i = 0; i < n; i++)
        mg_sites_free(addr(i));
    mg_sites_stats(&st);
    check_uint(st.blocks, ==, 0);
}

static void *worker(void *arg)
{
    uintptr_t base = (uintptr_t)arg * 1000000u;

    for (int round = 0; round < 200; round++) {
        for (uintptr_t i = 0; i < 50; i++)
            mg_sites_alloc(addr(base + i), 256 * 1024, 10, (int32_t)(arg != NULL) + 1);
        for (uintptr_t i = 0; i < 50; i++)
            mg_sites_free(addr(base + i));
    }
    return NULL;
}

static void t_threads_leave_nothing_behind(void)
{
    pthread_t th[8];
    mg_sites_stats_t st;
    mg_site_info_t all[4];
    int n;
    int64_t live = 0;

    fresh(10, 0);
    for (uintptr_t i = 0; i < 8; i++)
        pthread_create(&th[i], NULL, worker, (void *)i);
    for (int i = 0; i < 8; i++)
        pthread_join(th[i], NULL);
    mg_sites_stats(&st);
    check_uint(st.blocks, ==, 0);
    check_uint(st.dropped, ==, 0);
    n = mg_sites_list(10, all, 4);
    for (int i = 0; i < n; i++)
        live += all[i].live_bytes + all[i].live_count;
    check_int(live, ==, 0);
}

/* Inserts from several threads that collide in one probe window, each thread charging
 * its own site (line) with its own block size: every site must end with exactly its own
 * bytes and count, after the inserts and again (zero) after the frees. A check of the sum
 * over all sites cannot catch a block recorded with another thread's site and size: the
 * wrong debits cancel out in the sum. */
#define COLLIDERS 4
#define COLLIDER_BLOCKS 8
#define COLLIDER_ROUNDS 10000
#define COLLIDER_SECONDS 5.0 /* or fewer rounds, under valgrind and TSan */

static uintptr_t s_window[COLLIDERS * COLLIDER_BLOCKS]; /* addresses of one home slot */
static atomic_int s_round_go;
static atomic_int s_round_done;
static atomic_int s_round_stop;

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static size_t home_slot(uintptr_t a)
{
    /* The table's own hash (csrc/sites.c sites_hash of the address >> 4). */
    return (size_t)(((uint64_t)(a >> 4) * 0x9E3779B97F4A7C15ull) >> 40) & (MG_BLOCK_SLOTS - 1);
}

static size_t collider_size(int t)
{
    return (size_t)(t + 1) * MB + (size_t)t * 4096; /* a different size per site */
}

static void *collider(void *arg)
{
    int t = (int)(intptr_t)arg;

    for (int round = 1; round <= COLLIDER_ROUNDS; round++) {
        /* Spin without yielding for up to 1 ms, so the threads leave the barrier together
         * (on separate cores), then yield (valgrind runs one thread at a time). */
        double until = now_s() + 1e-3;

        for (unsigned spin = 0;
             atomic_load(&s_round_go) < round && !atomic_load(&s_round_stop); spin++)
            if (spin % 1024 == 1023 && now_s() > until)
                sched_yield();
        if (atomic_load(&s_round_stop))
            break;
        for (int i = 0; i < COLLIDER_BLOCKS; i++)
            mg_sites_alloc((void *)s_window[t * COLLIDER_BLOCKS + i], collider_size(t), 11,
                           t + 1);
        atomic_fetch_add(&s_round_done, 1);
    }
    return NULL;
}

static void t_colliding_inserts_keep_each_site_exact(void)
{
    pthread_t th[COLLIDERS];
    size_t home;
    int found = 0;
    int exact_after_alloc = 1;
    int exact_after_free = 1;
    double deadline = now_s() + COLLIDER_SECONDS;

    fresh(11, 0);
    home = home_slot((uintptr_t)addr(0));
    for (uintptr_t i = 0; found < COLLIDERS * COLLIDER_BLOCKS && i < 100000000u; i++) {
        uintptr_t a = (uintptr_t)addr(i);

        if (home_slot(a) == home)
            s_window[found++] = a;
    }
    check_int(found, ==, COLLIDERS * COLLIDER_BLOCKS);
    atomic_store(&s_round_go, 0);
    atomic_store(&s_round_done, 0);
    atomic_store(&s_round_stop, 0);
    for (intptr_t t = 0; t < COLLIDERS; t++)
        pthread_create(&th[t], NULL, collider, (void *)t);
    for (int round = 1; round <= COLLIDER_ROUNDS && now_s() < deadline; round++) {
        atomic_store(&s_round_done, 0);
        atomic_store(&s_round_go, round); /* every thread inserts at once */
        while (atomic_load(&s_round_done) < COLLIDERS)
            sched_yield();
        for (int t = 0; t < COLLIDERS; t++) {
            mg_site_info_t s;

            exact_after_alloc &= site(11, t + 1, &s) == 1 &&
                                 s.live_bytes == (int64_t)(COLLIDER_BLOCKS * collider_size(t)) &&
                                 s.live_count == COLLIDER_BLOCKS;
        }
        for (int i = 0; i < COLLIDERS * COLLIDER_BLOCKS; i++)
            mg_sites_free((void *)s_window[i]);
        for (int t = 0; t < COLLIDERS; t++) {
            mg_site_info_t s;

            /* A site with no live block and no alert is not listed at all. */
            if (site(11, t + 1, &s))
                exact_after_free &= s.live_bytes == 0 && s.live_count == 0;
        }
        if (!exact_after_alloc || !exact_after_free) {
            check_int(round, ==, -1); /* the round in which a site went wrong */
            break;
        }
    }
    atomic_store(&s_round_stop, 1);
    for (int t = 0; t < COLLIDERS; t++)
        pthread_join(th[t], NULL);
    check_int(exact_after_alloc, ==, 1);
    check_int(exact_after_free, ==, 1);
}

int main(void)
{
    plan(11);
    TEST(t_site_counts_live_blocks(), "a site counts its live blocks and bytes, and frees take them off");
    TEST(t_accumulation_fires_once_then_grows(), "the accumulation rule fires once at the third block, then updates after 10% growth");
    TEST(t_churn_never_fires(), "a churn loop of 100 MB blocks under a 200 MB budget never fires");
    TEST(t_no_budget_uses_the_absolute_rule(), "without a budget the rule needs 256 MiB");
    TEST(t_stale_record_is_replaced(), "a stale record for a reused address is replaced, not doubled");
    TEST(t_sweep_keeps_live_sites_and_reused_slots_stay_right(), "sweep drops only empty past sites, and a reused slot is not charged for old blocks");
    TEST(t_emptied_table_still_lists_new_sites(),
         "a table emptied by sweeps lists nothing, then lists and sweeps the sites made after");
    TEST(t_list_orders_by_bytes_and_truncates(), "listing gives the largest sites first and stops at the limit");
    TEST(t_full_probe_window_drops_and_counts(), "blocks that find no slot are dropped and counted");
    TEST(t_threads_leave_nothing_behind(), "8 threads inserting and removing blocks leave the table empty");
    TEST(t_colliding_inserts_keep_each_site_exact(),
         "inserts colliding in one probe window from 4 threads leave every site exact in bytes and count");
    return test_done();
}
