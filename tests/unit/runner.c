/*
 * Unit test runner: forks one child per registered test, enforces its timeout, and prints
 * one line per test plus the closing "unit: N passed, N failed".
 */
#include <errno.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "test.h"

struct test {
    const char *name;
    test_fn *fn;
    int timeout_s;
};

static struct test tests[512];
static int ntests;

void test_register(const char *name, test_fn *fn, int timeout_s)
{
    if (ntests == (int)(sizeof(tests) / sizeof(tests[0]))) {
        fprintf(stderr, "too many tests\n");
        exit(2);
    }
    tests[ntests++] = (struct test){name, fn, timeout_s};
}

static int cmp_test(const void *a, const void *b)
{
    return strcmp(((const struct test *)a)->name, ((const struct test *)b)->name);
}

/* Runs one test in a child; returns true if it exited 0 within its timeout. */
static bool run_one(const struct test *t)
{
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return false;
    }
    if (pid == 0) {
        setpgid(0, 0);
        alarm((unsigned)t->timeout_s);
        t->fn();
        fflush(NULL);
        _exit(0);
    }
    int st = 0;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    kill(-pid, SIGKILL); /* anything the test left behind */
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
        return true;
    if (WIFSIGNALED(st))
        fprintf(stderr, "  %s: killed by signal %d%s\n", t->name, WTERMSIG(st),
                WTERMSIG(st) == SIGALRM ? " (timeout)" : "");
    else
        fprintf(stderr, "  %s: exit status %d\n", t->name, WEXITSTATUS(st));
    return false;
}

int main(int argc, char **argv)
{
    const char *prefix = argc > 1 ? argv[1] : "";
    int passed = 0, failed = 0;
    qsort(tests, (size_t)ntests, sizeof(tests[0]), cmp_test);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 0; i < ntests; i++) {
        if (strncmp(tests[i].name, prefix, strlen(prefix)) != 0)
            continue;
        bool ok = run_one(&tests[i]);
        printf("%s %s\n", ok ? "ok  " : "FAIL", tests[i].name);
        if (ok)
            passed++;
        else
            failed++;
    }
    printf("unit: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
