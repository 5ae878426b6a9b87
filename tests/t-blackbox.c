/* Tests of csrc/blackbox.c: the file a reader finds after a clean close and after the
 * writer aborts mid-run (a crash), the fork child's silence, and removal on clean close. */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mg_acct.h"
#include "mg_blackbox.h"
#include "mg_monitor.h"
#include "mg_measures.h"
#include "tap.h"

static char s_dir[64];

static int read_box(const char *path, mg_bb_file_t *out)
{
    int fd = open(path, O_RDONLY);
    ssize_t n;

    if (fd < 0)
        return -1;
    n = read(fd, out, sizeof(*out));
    close(fd);
    return n == (ssize_t)sizeof(*out) ? 0 : -1;
}

static const mg_bb_state_t *newest(const mg_bb_file_t *f)
{
    uint64_t a = atomic_load(&f->state[0].seq);
    uint64_t b = atomic_load(&f->state[1].seq);

    if ((a & 1) && (b & 1))
        return NULL;
    if (a & 1)
        return &f->state[1];
    if (b & 1)
        return &f->state[0];
    return a > b ? &f->state[0] : &f->state[1];
}

static mg_bb_file_t s_file; /* 106 KiB: static, not on the stack */

static void t_clean_close_leaves_a_readable_box(void)
{
    char path[128];
    const mg_bb_state_t *st;
    const char *src = "import numpy as np\nx = np.ones(10)\n";

    snprintf(path, sizeof(path), "%s/clean.mgbox", s_dir);
    mg_acct_reset();
    mg_acct_cell_begin(3, 5000);
    check_int(mg_blackbox_open(path, "kernel-abc.json"), ==, 0);
    check_int(mg_blackbox_open(path, "kernel-abc.json"), ==, -1); /* EALREADY */
    mg_blackbox_set_cell(3, 7, src, strlen(src));
    mg_blackbox_add_alert(3, 7, 0, 2, 123456, "over budget", 11);
    mg_acct_alloc(MG_DOMAIN_NUMPY, 4096);
    mg_measures_sample(); /* the monitor samples before it ticks */
    mg_blackbox_tick();
    mg_blackbox_tick();
    mg_blackbox_tick();
    check_int(mg_blackbox_close(0), ==, 0);
    check_int(read_box(path, &s_file), ==, 0);
    check_int(memcmp(s_file.header.magic, MG_BB_MAGIC, 8), ==, 0);
    check_uint(s_file.header.layout, ==, MG_BB_LAYOUT);
    check_int(s_file.header.pid, ==, getpid());
    check_int(strcmp(s_file.header.connection, "kernel-abc.json"), ==, 0);
    check_int(s_file.cell.count, ==, 7);
    check_uint(s_file.cell.source_len, ==, strlen(src));
    check_int(memcmp(s_file.cell.source, src, strlen(src)), ==, 0);
    check_uint(s_file.alerts.total, ==, 1);
    check_int(s_file.alerts.ring[0].bytes, ==, 123456);
    check_uint(atomic_load(&s_file.samples_total), ==, 3);
    st = newest(&s_file);
    check(st != NULL);
    check_int(st->epoch, ==, 3);
    check_int(st->cell_peak - st->cell_start, ==, 4096);
    check_int(st->budget, ==, 5000);
    check_int(st->rss, >, 0);
    unlink(path);
}

static void t_box_survives_an_abort_mid_run(void)
{
    char path[128];
    pid_t pid;
    int status = 0;
    const mg_bb_state_t *st;

    snprintf(path, sizeof(path), "%s/crash.mgbox", s_dir);
    pid = fork();
    if (pid == 0) {
        const char *src = "grow()\n";

        if (mg_blackbox_open(path, "kernel-crash.json") != 0)
            _exit(3);
        mg_acct_cell_begin(9, 0);
        mg_blackbox_set_cell(9, 4, src, strlen(src));
        for (int i = 0; i < 5; i++) {
            mg_acct_alloc(MG_DOMAIN_NUMPY, 1 << 20);
            mg_blackbox_tick();
        }
        signal(SIGABRT, SIG_DFL);
        abort(); /* no close, no unmap: like the OOM killer's SIGKILL */
    }
    waitpid(pid, &status, 0);
    check_int(WIFSIGNALED(status), ==, 1);
    check_int(read_box(path, &s_file), ==, 0);
    check_int(s_file.header.pid, ==, pid);
    check_int(s_file.cell.count, ==, 4);
    check_uint(atomic_load(&s_file.samples_total), ==, 5);
    st = newest(&s_file);
    check(st != NULL);
    check_int(st->epoch, ==, 9);
    check_int(st->cell_peak - st->cell_start, ==, 5 << 20);
    unlink(path);
}

static void t_fork_child_does_not_write_the_parents_box(void)
{
    char path[128];
    pid_t pid;
    int status = 0;

    snprintf(path, sizeof(path), "%s/fork.mgbox", s_dir);
    check_int(mg_blackbox_open(path, "kernel-fork.json"), ==, 0);
    check_int(mg_monitor_atfork_register(), ==, 0);
    pid = fork();
    if (pid == 0) {
        mg_blackbox_set_cell(99, 99, "child", 5); /* must be a no-op */
        _exit(mg_blackbox_is_open() ? 1 : 0);
    }
    waitpid(pid, &status, 0);
    check_int(WIFEXITED(status) && WEXITSTATUS(status) == 0, ==, 1);
    check_int(mg_blackbox_close(0), ==, 0);
    check_int(read_box(path, &s_file), ==, 0);
    check_int(s_file.cell.count, !=, 99);
    unlink(path);
}

static void t_clean_close_with_remove_deletes_the_file(void)
{
    char path[128];
    struct stat sb;

    snprintf(path, sizeof(path), "%s/gone.mgbox", s_dir);
    check_int(mg_blackbox_open(path, "kernel-gone.json"), ==, 0);
    check_int(stat(path, &sb), ==, 0);
    check_int(sb.st_size, ==, (long)sizeof(mg_bb_file_t));
    check_int(sb.st_size, <, 1 << 20);
    check_int(mg_blackbox_close(1), ==, 0);
    check_int(stat(path, &sb), ==, -1);
}

int main(void)
{
    snprintf(s_dir, sizeof(s_dir), "/tmp/mg-t-blackbox-XXXXXX");
    if (mkdtemp(s_dir) == NULL)
        test_skip_all("cannot create a directory in /tmp");
    plan(4);
    TEST(t_clean_close_leaves_a_readable_box(), "a box closed without removal reads back with header, cell, alert, state and samples");
    TEST(t_box_survives_an_abort_mid_run(), "a box whose writer aborted still holds the last state and the cell");
    TEST(t_fork_child_does_not_write_the_parents_box(), "a forked child never writes the parent's box");
    TEST(t_clean_close_with_remove_deletes_the_file(), "the box is under 1 MiB and a clean close removes it");
    rmdir(s_dir);
    return test_done();
}
