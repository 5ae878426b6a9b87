/* Tests of csrc/usable.c: the header read is chosen exactly where glibc's malloc is the
 * process's allocator, and mg_usable_size equals malloc_usable_size for every kind of live
 * block either way (heap and mmapped chunks, aligned ones, reallocated ones, blocks of
 * other threads' arenas). Under ASan, TSan and valgrind, whose malloc is not glibc's, the
 * read must not be chosen. */
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mg_usable.h"
#include "tap.h"

/* GCC defines __SANITIZE_*__; clang answers __has_feature. */
#ifndef __has_feature
#define __has_feature(x) 0
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) ||                        \
    __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SANITIZED 1
#else
#define SANITIZED 0
#endif

/* valgrind preloads its own malloc into the client (vgpreload_*.so in LD_PRELOAD). */
static int under_valgrind(void)
{
    const char *pre = getenv("LD_PRELOAD");

    return pre != NULL && strstr(pre, "vgpreload") != NULL;
}

static void t_chosen_only_on_glibcs_own_malloc(void)
{
    int expect = MG_USABLE_HEADER && !SANITIZED && !under_valgrind();
    int got = mg_usable_init();

    printf("# header read %s (expected %s)\n", got ? "on" : "off", expect ? "on" : "off");
    check_int(got, ==, expect);
    check_int(mg_usable_init(), ==, got); /* decided once */
    check_int(atomic_load(&mg_usable_header), ==, got);
}

/* Every block of a range of sizes from each allocation function: mismatches counted. */
static int mismatches(void)
{
    int bad = 0;

    for (size_t n = 0; n < 70000; n = n < 64 ? n + 1 : n + n / 3) {
        void *blocks[6] = {malloc(n), calloc(3, n / 3 + 1), NULL, NULL, NULL, NULL};
        void *grow = malloc(n / 4 + 1);
        void *shrink = malloc(2 * n + 1);

        if (posix_memalign(&blocks[2], 64, n) != 0)
            blocks[2] = NULL;
        blocks[3] = aligned_alloc(4096, (n + 4095) & ~(size_t)4095);
        blocks[4] = grow != NULL ? realloc(grow, n + 1) : NULL;
        blocks[5] = shrink != NULL ? realloc(shrink, n / 2 + 1) : NULL;
        for (int i = 0; i < 6; i++) {
            if (blocks[i] != NULL) {
                memset(blocks[i], 0xA5, malloc_usable_size(blocks[i]));
                bad += mg_usable_size(blocks[i]) != malloc_usable_size(blocks[i]);
            }
            free(blocks[i]);
        }
    }
    /* mmapped chunks: past glibc's largest dynamic mmap threshold (32 MiB on 64-bit) */
    for (size_t n = (33u << 20) - 3; n < (36u << 20); n += (1u << 20) + 7) {
        void *p = malloc(n);
        void *q = NULL;

        if (posix_memalign(&q, 4096, n) != 0)
            q = NULL;
        if (p != NULL)
            bad += mg_usable_size(p) != malloc_usable_size(p);
        if (q != NULL)
            bad += mg_usable_size(q) != malloc_usable_size(q);
        free(p);
        free(q);
    }
    return bad;
}

static void t_agrees_with_malloc_usable_size_on_this_thread(void)
{
    check_int(mismatches(), ==, 0);
}

static void *thread_mismatches(void *arg)
{
    (void)arg;
    return (void *)(intptr_t)mismatches();
}

static void t_agrees_on_blocks_of_other_threads_arenas(void)
{
    enum { THREADS = 4 };
    pthread_t th[THREADS];
    intptr_t bad = 0;

    for (int i = 0; i < THREADS; i++)
        pthread_create(&th[i], NULL, thread_mismatches, NULL);
    for (int i = 0; i < THREADS; i++) {
        void *r;

        pthread_join(th[i], &r);
        bad += (intptr_t)r;
    }
    check_int(bad, ==, 0);
}

int main(void)
{
    plan(3);
    TEST(t_chosen_only_on_glibcs_own_malloc(),
         "the header read is chosen on glibc's own malloc only, once");
    TEST(t_agrees_with_malloc_usable_size_on_this_thread(),
         "mg_usable_size equals malloc_usable_size for heap, aligned, reallocated and mmapped blocks");
    TEST(t_agrees_on_blocks_of_other_threads_arenas(),
         "and for blocks of four other threads' arenas");
    return test_done();
}
