/* Tests of csrc/acct.c: counters, cell start/peak, the one-time budget crossing, and
 * concurrent updates from several threads. */
#include <pthread.h>

#include "mg_acct.h"
#include "mg_measures.h"
#include "tap.h"

static void t_alloc_and_free_balance(void)
{
    mg_acct_snapshot_t s;

    mg_acct_reset();
    mg_acct_alloc(MG_DOMAIN_RAW, 100);
    mg_acct_alloc(MG_DOMAIN_NUMPY, 1000);
    mg_acct_free(MG_DOMAIN_RAW, 40);
    mg_acct_snapshot(&s);
    check_int(s.tracked, ==, 1060);
    check_int(s.domain[MG_DOMAIN_RAW], ==, 60);
    check_int(s.domain[MG_DOMAIN_NUMPY], ==, 1000);
    check_int(s.domain[MG_DOMAIN_ARENA], ==, 0);
}

static void t_cell_usage_is_relative_to_start(void)
{
    mg_acct_snapshot_t s;

    mg_acct_reset();
    mg_acct_alloc(MG_DOMAIN_RAW, 5000);
    mg_acct_cell_begin(1, 0);
    mg_acct_alloc(MG_DOMAIN_NUMPY, 300);
    mg_acct_free(MG_DOMAIN_NUMPY, 300);
    mg_acct_free(MG_DOMAIN_RAW, 1000);
    mg_acct_snapshot(&s);
    check_int(s.cell_start, ==, 5000);
    check_int(s.cell_peak - s.cell_start, ==, 300);
    check_int(mg_acct_cell_usage(), ==, -1000);
    check_int(s.epoch, ==, 1);
}

static void t_budget_crossing_reported_once(void)
{
    int crossings = 0;

    mg_acct_reset();
    mg_acct_cell_begin(2, 1000);
    crossings += mg_acct_alloc(MG_DOMAIN_NUMPY, 600);
    check_int(crossings, ==, 0);
    crossings += mg_acct_alloc(MG_DOMAIN_NUMPY, 600); /* 1200 > 1000: the crossing */
    check_int(crossings, ==, 1);
    crossings += mg_acct_alloc(MG_DOMAIN_NUMPY, 600);
    mg_acct_free(MG_DOMAIN_NUMPY, 1800);
    crossings += mg_acct_alloc(MG_DOMAIN_NUMPY, 1800);
    check_int(crossings, ==, 1);
}

static void t_new_cell_and_new_budget_rearm_the_crossing(void)
{
    mg_acct_reset();
    mg_acct_cell_begin(3, 100);
    check_int(mg_acct_alloc(MG_DOMAIN_RAW, 200), ==, 1);
    mg_acct_set_budget(1000);
    check_int(mg_acct_alloc(MG_DOMAIN_RAW, 200), ==, 0);
    check_int(mg_acct_alloc(MG_DOMAIN_RAW, 700), ==, 1);
    mg_acct_cell_begin(4, 100);
    check_int(mg_acct_alloc(MG_DOMAIN_RAW, 50), ==, 0);
    check_int(mg_acct_alloc(MG_DOMAIN_RAW, 51), ==, 1);
}

static void t_no_budget_never_crosses(void)
{
    mg_acct_reset();
    mg_acct_cell_begin(5, 0);
    check_int(mg_acct_alloc(MG_DOMAIN_NUMPY, (size_t)1 << 40), ==, 0);
}

static void t_requests_are_refused_only_in_raise_mode_or_past_the_limit(void)
{
    mg_acct_refusal_t r;
    uint64_t before;

    mg_acct_reset();
    mg_acct_set_limit(0, MG_MEASURE_RSS, 0.9);
    mg_acct_cell_begin(8, 1000);
    mg_acct_alloc(MG_DOMAIN_NUMPY, 600);
    mg_acct_set_raise(0);
    check_int(mg_acct_check_request(500), ==, MG_REFUSE_NONE); /* warn: budget never refuses */
    mg_acct_set_raise(1);
    check_int(mg_acct_check_request(400), ==, MG_REFUSE_NONE);  /* 1000: not over */
    check_int(mg_acct_check_request(401), ==, MG_REFUSE_BUDGET);
    /* The limit applies in both modes; the caller refuses only in raise mode. */
    mg_measures_cell_begin();
    mg_acct_set_limit(mg_measures_used(MG_MEASURE_RSS) + 10000, MG_MEASURE_RSS, 0.9);
    mg_acct_set_raise(0);
    check_int(mg_acct_check_request(9000), ==, MG_REFUSE_NONE);
    check_int(mg_acct_check_request(20000), ==, MG_REFUSE_LIMIT);
    mg_acct_set_raise(0);
    mg_acct_set_limit(0, MG_MEASURE_RSS, 0.9);
    mg_acct_refusal(&r);
    before = r.count;
    mg_acct_note_refusal(12345, MG_REFUSE_BUDGET, 7);
    mg_acct_refusal(&r);
    check_uint(r.count, ==, before + 1);
    check_int(r.bytes, ==, 12345);
    check_int(r.line, ==, 7);
    check_int(r.epoch, ==, 8);
}

#define THREADS 8
#define ROUNDS 100000

static void *churn(void *arg)
{
    (void)arg;
    for (int i = 0; i < ROUNDS; i++) {
        mg_acct_alloc(MG_DOMAIN_RAW, 64 + (size_t)(i % 7));
        mg_acct_free(MG_DOMAIN_RAW, 64 + (size_t)(i % 7));
    }
    return NULL;
}

static void t_threads_return_to_zero(void)
{
    pthread_t th[THREADS];
    mg_acct_snapshot_t s;

    mg_acct_reset();
    mg_acct_cell_begin(6, 0);
    for (int i = 0; i < THREADS; i++)
        pthread_create(&th[i], NULL, churn, NULL);
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    mg_acct_snapshot(&s);
    check_int(s.tracked, ==, 0);
    check_int(s.cell_peak, >=, 64);
    check_int(s.cell_peak, <=, THREADS * 70);
}

int main(void)
{
    plan(7);
    TEST(t_alloc_and_free_balance(), "alloc and free update the total and per-domain counters");
    TEST(t_cell_usage_is_relative_to_start(), "a cell's usage and peak are measured from its start");
    TEST(t_budget_crossing_reported_once(), "only the first allocation over the budget reports the crossing");
    TEST(t_new_cell_and_new_budget_rearm_the_crossing(), "a new cell or a new budget re-arms the crossing");
    TEST(t_no_budget_never_crosses(), "with no budget nothing ever crosses");
    TEST(t_requests_are_refused_only_in_raise_mode_or_past_the_limit(), "raise mode refuses past the budget, the limit is judged in every mode, refusals are recorded");
    TEST(t_threads_return_to_zero(), "8 threads allocating and freeing leave the counters at zero");
    return test_done();
}
