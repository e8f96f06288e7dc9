/*
 * Unit test registry and assertions (after libuv test/task.h). Each test file registers its
 * tests with TEST(name) { ... }; the runner (tests/unit/runner.c) runs each in its own forked
 * process with a timeout, so a crash or hang fails one test, not the suite.
 *
 *   build/test_unit            run all
 *   build/test_unit obuf_      run tests whose name starts with "obuf_"
 *
 * The runner ends with the line "unit: N passed, N failed".
 */
#ifndef SANDBOXD_TEST_H
#define SANDBOXD_TEST_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void test_fn(void);
void test_register(const char *name, test_fn *fn, int timeout_s);

#define TEST_TIMEOUT(name, secs)                                                   \
    static void test_##name(void);                                                 \
    __attribute__((constructor)) static void test_register_##name(void)            \
    {                                                                              \
        test_register(#name, test_##name, secs);                                   \
    }                                                                              \
    static void test_##name(void)
#define TEST(name) TEST_TIMEOUT(name, 10)

#define ASSERT(expr)                                                               \
    do {                                                                           \
        if (!(expr)) {                                                             \
            fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__, __LINE__,   \
                    #expr);                                                        \
            abort();                                                               \
        }                                                                          \
    } while (0)
#define ASSERT_EQ(a, b)                                                            \
    do {                                                                           \
        long long a_ = (long long)(a), b_ = (long long)(b);                        \
        if (a_ != b_) {                                                            \
            fprintf(stderr, "%s:%d: %s == %s failed: %lld != %lld\n", __FILE__,    \
                    __LINE__, #a, #b, a_, b_);                                     \
            abort();                                                               \
        }                                                                          \
    } while (0)
#define ASSERT_STREQ(a, b)                                                         \
    do {                                                                           \
        const char *a_ = (a), *b_ = (b);                                           \
        if (a_ == NULL || b_ == NULL || strcmp(a_, b_) != 0) {                     \
            fprintf(stderr, "%s:%d: %s == %s failed: \"%s\" != \"%s\"\n",          \
                    __FILE__, __LINE__, #a, #b, a_ ? a_ : "(null)",                \
                    b_ ? b_ : "(null)");                                           \
            abort();                                                               \
        }                                                                          \
    } while (0)
#define ASSERT_MEMEQ(a, b, n) ASSERT(memcmp((a), (b), (n)) == 0)

#endif
