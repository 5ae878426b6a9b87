/* Tests of csrc/measures.c: the /proc parsers on good, short, odd and overflowing input, and a
 * real sample of this process. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

/* Excerpts of real memory.stat files (Linux 6.x): v1 lists the cgroup's own counters, then
 * total_* ones for its subtree; v2 has one set. */
static const char V1_STAT[] = "cache 4096\nrss 600000000\ninactive_anon 0\nactive_anon 600000000\n"
                              "inactive_file 1000\nactive_file 3096\nhierarchical_memory_limit 900000000\n"
                              "total_cache 50000000\ntotal_rss 600000000\n"
                              "total_inactive_file 40000000\ntotal_active_file 10000000\n";
static const char V2_STAT[] = "anon 600000000\nfile 50000000\nkernel 4000000\nfile_mapped 0\n"
                              "active_anon 600000000\ninactive_file 40000000\nactive_file 10000000\n"
                              "workingset_refault_file 0\n";

static void t_memory_stat_keys_are_found_exactly(void)
{
    int64_t v = -1;
    const char cut[] = "inactive_file 12"; /* no newline, no terminator in the bound */

    check_int(mg_measures_parse_stat(V1_STAT, strlen(V1_STAT), "total_inactive_file", &v), ==, 0);
    check_int(v, ==, 40000000);
    check_int(mg_measures_parse_stat(V1_STAT, strlen(V1_STAT), "inactive_file", &v), ==, 0);
    check_int(v, ==, 1000);
    check_int(mg_measures_parse_stat(V2_STAT, strlen(V2_STAT), "inactive_file", &v), ==, 0);
    check_int(v, ==, 40000000);
    check_int(mg_measures_parse_stat(V2_STAT, strlen(V2_STAT), "total_inactive_file", &v), ==, -1);
    check_int(mg_measures_parse_stat(cut, sizeof(cut) - 1, "inactive_file", &v), ==, 0);
    check_int(v, ==, 12);
    check_int(mg_measures_parse_stat(cut, sizeof(cut) - 3, "inactive_file", &v), ==, -1);
    check_int(mg_measures_parse_stat("inactive_file 1x\n", 17, "inactive_file", &v), ==, -1);
    check_int(mg_measures_parse_stat("inactive_file 99999999999999999999\n", 35, "inactive_file", &v), ==, -1);
    check_int(mg_measures_parse_stat("", 0, "inactive_file", &v), ==, -1);
}

static void write_file(const char *dir, const char *name, const char *text)
{
    char path[512];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    f = fopen(path, "w");
    if (f != NULL) {
        fputs(text, f);
        fclose(f);
    }
}

/* Recorded cgroup files in a temporary directory: the cgroup measure is the usage minus the
 * reclaimable page cache, with the key of the file's cgroup version; no memory.stat, the
 * usage as it is. */
static void t_cgroup_measure_leaves_out_reclaimable_page_cache(void)
{
    char v1[] = "/tmp/mg-t-measures-v1-XXXXXX";
    char v2[] = "/tmp/mg-t-measures-v2-XXXXXX";
    char path[512];
    mg_measures_snapshot_t s;

    check(mkdtemp(v1) != NULL && mkdtemp(v2) != NULL);
    write_file(v1, "memory.usage_in_bytes", "700000000\n");
    write_file(v1, "memory.stat", V1_STAT);
    write_file(v2, "memory.current", "700000000\n");
    write_file(v2, "memory.stat", V2_STAT);
    write_file(v2, "memory.max", "900000000\n");
    write_file(v2, "memory.events", "low 0\nhigh 0\nmax 12\noom 0\noom_kill 0\noom_group_kill 0\n");
    snprintf(path, sizeof(path), "%s/memory.usage_in_bytes", v1);
    check_int(mg_measures_set_cgroup_file(path), ==, 0);
    mg_measures_sample();
    mg_measures_snapshot(&s);
    check_int(s.cgroup, ==, 660000000); /* total_inactive_file, not the cgroup's own */
    check_int(mg_measures_used(MG_MEASURE_CGROUP), ==, 660000000);
    snprintf(path, sizeof(path), "%s/memory.current", v2);
    check_int(mg_measures_set_cgroup_file(path), ==, 0);
    mg_measures_sample();
    check_int(mg_measures_used(MG_MEASURE_CGROUP), ==, 660000000);
    snprintf(path, sizeof(path), "%s/memory.stat", v2);
    unlink(path);
    snprintf(path, sizeof(path), "%s/memory.current", v2);
    check_int(mg_measures_set_cgroup_file(path), ==, 0);
    mg_measures_sample();
    check_int(mg_measures_used(MG_MEASURE_CGROUP), ==, 700000000);
    check_int(mg_measures_set_cgroup_file(NULL), ==, 0);
    snprintf(path, sizeof(path), "%s/memory.nope", v2);
    check_int(mg_measures_set_cgroup_file(path), ==, -1);
    check_int(system("rm -rf /tmp/mg-t-measures-v1-* /tmp/mg-t-measures-v2-*"), ==, 0);
}

int main(void)
{
    plan(5);
    TEST(t_statm_parses_size_and_resident(), "statm's first two fields are parsed as pages");
    TEST(t_bad_input_is_refused_without_reading_past_it(), "empty, short, malformed and overflowing input is refused within its length");
    TEST(t_memory_stat_keys_are_found_exactly(), "memory.stat values are found by their exact key, within the length");
    TEST(t_cgroup_measure_leaves_out_reclaimable_page_cache(), "v1 and v2 cgroup usage is read less inactive_file, from recorded files");
    TEST(t_this_process_has_a_sane_sample(), "a real sample has RSS > 1 MiB and VM >= RSS");
    return test_done();
}
