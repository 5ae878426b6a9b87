/* Tests of csrc/measures.c: the /proc parsers on good, short, odd and overflowing input, and a
 * real sample of this process. */
#include <string.h>

#include "mg_measures.h"
#include "tap.h"

static void t_statm_parses_size_and_resident(void)
{
    int64_t vm = -1;
    int64_t rss = -1;
    const char *s = "1234 567 89 10 0 200 0\n";

    check_int(mg_measures_parse_statm(s, strlen(s), &vm, &rss), ==, 0);
    check_int(vm, ==, 1234);
    check_int(rss, ==, 567);
}

static void t_bad_input_is_refused_without_reading_past_it(void)
{
    int64_t a;
    int64_t b;
    size_t used;
    char cut[] = {'1', '2', ' ', '3'}; /* no terminator: the length is the bound */

    check_int(mg_measures_parse_statm("", 0, &a, &b), ==, -1);
    check_int(mg_measures_parse_statm("12", 2, &a, &b), ==, -1);
    check_int(mg_measures_parse_statm("12  3", 5, &a, &b), ==, -1);
    check_int(mg_measures_parse_statm("x 3", 3, &a, &b), ==, -1);
    check_int(mg_measures_parse_statm(cut, sizeof(cut), &a, &b), ==, 0);
    check_int(b, ==, 3);
    check_int(mg_measures_parse_number("-5", 2, &used, &a), ==, -1);
    check_int(mg_measures_parse_number("99999999999999999999", 20, &used, &a), ==, -1);
    check_int(mg_measures_parse_number("9223372036854775807", 19, &used, &a), ==, -1);
    check_int(mg_measures_parse_number("922337203685477580", 18, &used, &a), ==, 0);
    check_uint(used, ==, 18);
}

static void t_this_process_has_a_sane_sample(void)
{
    int64_t rss = mg_measures_sample();
    mg_measures_snapshot_t s;

    mg_measures_snapshot(&s);
    check_int(rss, >, 1 << 20);
    check_int(s.vm, >=, rss);
    check_int(mg_measures_used(MG_MEASURE_RSS), ==, rss);
}

int main(void)
{
    plan(3);
    TEST(t_statm_parses_size_and_resident(), "statm's first two fields are parsed as pages");
    TEST(t_bad_input_is_refused_without_reading_past_it(), "empty, short, malformed and overflowing input is refused within its length");
    TEST(t_this_process_has_a_sane_sample(), "a real sample has RSS > 1 MiB and VM >= RSS");
    return test_done();
}
