/* A minimal TAP producer for memguard's C unit tests, after git's t/unit-tests/test-lib.h
 * and c-tap-harness: plan(n) first, then TEST(t_x(), "sentence") per test; checks put the
 * operator in the middle (check_int(a, ==, b)). Output is read by prove(1). */
#ifndef MEMGUARD_TESTS_TAP_H
#define MEMGUARD_TESTS_TAP_H

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

static int tap_test_no = 0;
static int tap_failed_checks = 0; /* failed checks in the running test */
static int tap_checks = 0;        /* checks in the running test */
static int tap_any_failed = 0;

static inline void plan(int n)
{
    printf("1..%d\n", n);
    fflush(stdout);
}

static inline void test_skip_all(const char *why)
{
    printf("1..0 # SKIP %s\n", why);
    exit(0);
}

#define TAP_CHECK(ok, fmt, a, op, b, as, bs)                                                \
    do {                                                                                    \
        tap_checks++;                                                                       \
        if (!(ok)) {                                                                        \
            tap_failed_checks++;                                                            \
            printf("# check failed at %s:%d: %s %s %s\n#   left: " fmt "\n#  right: " fmt "\n", \
                   __FILE__, __LINE__, as, #op, bs, a, b);                                  \
        }                                                                                   \
    } while (0)

#define check_int(a, op, b)                                                                 \
    do {                                                                                    \
        intmax_t tap_a_ = (intmax_t)(a), tap_b_ = (intmax_t)(b);                            \
        TAP_CHECK(tap_a_ op tap_b_, "%jd", tap_a_, op, tap_b_, #a, #b);                     \
    } while (0)

#define check_uint(a, op, b)                                                                \
    do {                                                                                    \
        uintmax_t tap_a_ = (uintmax_t)(a), tap_b_ = (uintmax_t)(b);                         \
        TAP_CHECK(tap_a_ op tap_b_, "%ju", tap_a_, op, tap_b_, #a, #b);                     \
    } while (0)

#define check_double(a, op, b)                                                              \
    do {                                                                                    \
        double tap_a_ = (double)(a), tap_b_ = (double)(b);                                  \
        TAP_CHECK(tap_a_ op tap_b_, "%g", tap_a_, op, tap_b_, #a, #b);                      \
    } while (0)

#define check(cond) check_int(!!(cond), ==, 1)

/* Run one test: a test with no check at all fails, so no test can pass by asserting
 * nothing. */
#define TEST(call, desc)                                                                    \
    do {                                                                                    \
        tap_failed_checks = 0;                                                              \
        tap_checks = 0;                                                                     \
        call;                                                                               \
        tap_test_no++;                                                                      \
        if (tap_checks == 0)                                                                \
            printf("# test made no checks\n");                                              \
        if (tap_failed_checks || tap_checks == 0) {                                         \
            tap_any_failed = 1;                                                             \
            printf("not ok %d - %s\n", tap_test_no, desc);                                  \
        } else {                                                                            \
            printf("ok %d - %s\n", tap_test_no, desc);                                      \
        }                                                                                   \
        fflush(stdout);                                                                     \
    } while (0)

static inline int test_done(void)
{
    return tap_any_failed;
}

#endif /* MEMGUARD_TESTS_TAP_H */
