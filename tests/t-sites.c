/* Tests of csrc/sites.c: blocks charged to their site and taken off at free, the
 * accumulation rule (fires once, grows, never on churn), stale and reused slots, listing,
 * a full table, and concurrent threads. Addresses are fake: the table never dereferences. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

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

int main(void)
{
    plan(9);
    TEST(t_site_counts_live_blocks(), "a site counts its live blocks and bytes, and frees take them off");
    TEST(t_accumulation_fires_once_then_grows(), "the accumulation rule fires once at the third block, then updates after 10% growth");
    TEST(t_churn_never_fires(), "a churn loop of 100 MB blocks under a 200 MB budget never fires");
    TEST(t_no_budget_uses_the_absolute_rule(), "without a budget the rule needs 256 MiB");
    TEST(t_stale_record_is_replaced(), "a stale record for a reused address is replaced, not doubled");
    TEST(t_sweep_keeps_live_sites_and_reused_slots_stay_right(), "sweep drops only empty past sites, and a reused slot is not charged for old blocks");
    TEST(t_list_orders_by_bytes_and_truncates(), "listing gives the largest sites first and stops at the limit");
    TEST(t_full_probe_window_drops_and_counts(), "blocks that find no slot are dropped and counted");
    TEST(t_threads_leave_nothing_behind(), "8 threads inserting and removing blocks leave the table empty");
    return test_done();
}
