/*
 * physlimits: what this machine does with no HTTP and no daemon (the "floor").
 * Adapted from the team's side-by-side harness (shared/bench/src/physlimits.c).
 *
 *   physlimits spawn     N [SAMPLES]   posix_spawn("/bin/true") + waitpid, N ops after
 *                                      50 warm-up; SAMPLES: file for per-op µs, one a line
 *   physlimits spawnpipe N             the same, plus what any process daemon must do
 *                                      around it: stdout/stderr pipes, setsid, read both
 *                                      to EOF (informative; not a target's floor)
 *   physlimits spawnpar  W S           W worker processes posix_spawn+wait /bin/true in a
 *                                      loop for S seconds: bare spawns/s
 *   physlimits spawnparpipe W S        the same with spawnpipe's plumbing (informative)
 *   physlimits tcp       MIB           one loopback TCP connection, child writes MIB
 *   physlimits producer  BYTES 'cmd'   run `sh -c cmd`, read its stdout through a pipe as
 *                                      fast as possible: the producer's own rate, and its
 *                                      time to first byte
 *   physlimits relay     BYTES 'cmd'   the producer's stdout relayed by this process (64 KiB
 *                                      reads, as a daemon reads a capture pipe) to a loopback
 *                                      TCP connection, read by a sink process that does
 *                                      nothing else: the least any streaming daemon must do
 *                                      (no framing, no log, no decoding client)
 *
 * spawn, spawnpipe and spawnpar also report CPU time (getrusage): the spawning process's own
 * per operation, its children's, and for spawnpar how many CPUs the loop kept busy.
 *
 * Prints one JSON object.  Every loop is bounded by count or time.  Only 127.0.0.1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "plumbing.h"


static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* CPU seconds of this process (RUSAGE_SELF) or of its reaped children (RUSAGE_CHILDREN). */
static double cpu_s(int who)
{
    struct rusage r;
    getrusage(who, &r);
    return (double)(r.ru_utime.tv_sec + r.ru_stime.tv_sec) +
           (double)(r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(const uint64_t *v, long n, double q)
{
    long i = (long)(q * (double)(n - 1) + 0.5);
    return (double)v[i] / 1e3;
}

static char *const true_argv[] = {"/bin/true", NULL};

static uint64_t one_spawn(void)
{
    uint64_t t0 = now_ns();
    pid_t p;
    int st;
    if (posix_spawn(&p, "/bin/true", NULL, NULL, true_argv, environ)) {
        perror("posix_spawn");
        exit(1);
    }
    waitpid(p, &st, 0);
    return now_ns() - t0;
}

/* What a daemon does at minimum per run (plumbing.h). */
static uint64_t one_spawn_pipes(void)
{
    uint64_t t0 = now_ns();
    run_true_plumbed(NULL);
    return now_ns() - t0;
}

static void lat_test(const char *name, uint64_t (*op)(void), long n, const char *samples)
{
    for (int i = 0; i < 50; i++)
        op();
    uint64_t *v = malloc((size_t)n * sizeof *v);
    double self0 = cpu_s(RUSAGE_SELF), kids0 = cpu_s(RUSAGE_CHILDREN);
    for (long i = 0; i < n; i++)
        v[i] = op();
    double self_us = (cpu_s(RUSAGE_SELF) - self0) * 1e6 / (double)n;
    double kids_us = (cpu_s(RUSAGE_CHILDREN) - kids0) * 1e6 / (double)n;
    if (samples) {
        FILE *f = fopen(samples, "w");
        if (f) {
            for (long i = 0; i < n; i++)
                fprintf(f, "%.1f\n", (double)v[i] / 1e3);
            fclose(f);
        }
    }
    qsort(v, (size_t)n, sizeof *v, cmp_u64);
    printf("{\"test\":\"%s\",\"n\":%ld,\"min_us\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,"
           "\"p99_us\":%.1f,\"max_us\":%.1f,\"parent_cpu_us\":%.1f,\"children_cpu_us\":%.1f}\n",
           name, n, (double)v[0] / 1e3, pct(v, n, .5), pct(v, n, .9), pct(v, n, .99),
           (double)v[n - 1] / 1e3, self_us, kids_us);
    free(v);
}

/* W workers each posix_spawn+wait /bin/true in a loop for S seconds (pipes: with the
 * plumbing of one_spawn_pipes) */
static void spawnpar_test(long workers, double secs, int pipes)
{
    int fd[2];
    if (pipe(fd))
        exit(1);
    uint64_t t0 = now_ns(), end = t0 + (uint64_t)(secs * 1e9);
    for (long w = 0; w < workers; w++) {
        if (fork() == 0) {
            long n = 0;
            while (now_ns() < end) {
                if (pipes)
                    one_spawn_pipes();
                else
                    one_spawn();
                n++;
            }
            if (write(fd[1], &n, sizeof n) != sizeof n)
                _exit(1);
            _exit(0);
        }
    }
    close(fd[1]);
    long tot = 0, n;
    while (read(fd[0], &n, sizeof n) == sizeof n)
        tot += n;
    while (wait(NULL) > 0) {
    }
    double s = (double)(now_ns() - t0) / 1e9;
    double cpu = cpu_s(RUSAGE_CHILDREN); /* the workers and every /bin/true they reaped */
    printf("{\"test\":\"posix_spawn_parallel%s\",\"workers\":%ld,\"seconds\":%.3f,\"spawns\":%ld,"
           "\"per_s\":%.1f,\"cpu_us_per_spawn\":%.1f,\"cpus_busy\":%.2f}\n",
           pipes ? "_pipes" : "", workers, s, tot, (double)tot / s, tot ? cpu * 1e6 / (double)tot : 0.0,
           cpu / s);
}

/* A listening socket on 127.0.0.1 with a free port; *a gets its address. */
static int loopback_listener(struct sockaddr_in *a)
{
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    *a = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = 0};
    inet_pton(AF_INET, "127.0.0.1", &a->sin_addr);
    if (bind(ls, (struct sockaddr *)a, sizeof *a) || listen(ls, 1)) {
        perror("bind");
        exit(1);
    }
    socklen_t al = sizeof *a;
    getsockname(ls, (struct sockaddr *)a, &al);
    return ls;
}

static void tcp_test(long mib)
{
    struct sockaddr_in a;
    int ls = loopback_listener(&a);
    pid_t p = fork();
    if (p == 0) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&a, sizeof a))
            _exit(2);
        size_t bs = 1 << 20;
        char *b = malloc(bs);
        memset(b, 'a', bs);
        long long left = (long long)mib << 20;
        while (left > 0) {
            ssize_t k = write(s, b, left < (long long)bs ? (size_t)left : bs);
            if (k <= 0)
                _exit(1);
            left -= k;
        }
        close(s);
        _exit(0);
    }
    int c = accept(ls, NULL, NULL);
    size_t bs = 1 << 20;
    char *b = malloc(bs);
    long long tot = 0;
    ssize_t k;
    uint64_t t0 = now_ns();
    while ((k = read(c, b, bs)) > 0)
        tot += k;
    double s = (double)(now_ns() - t0) / 1e9;
    int st;
    waitpid(p, &st, 0);
    printf("{\"test\":\"tcp_loopback\",\"mib\":%ld,\"seconds\":%.4f,\"mb_per_s\":%.1f,\"ok\":%s}\n",
           mib, s, (double)tot / s / 1e6, tot == (long long)mib << 20 ? "true" : "false");
}

static void producer_test(long long expected, const char *cmd)
{
    int rfd;
    uint64_t t0 = now_ns(), tfirst = 0;
    pid_t p = spawn_producer(cmd, &rfd);
    size_t bs = 1 << 20;
    char *b = malloc(bs);
    long long tot = 0;
    ssize_t k;
    while ((k = read(rfd, b, bs)) > 0) {
        if (!tfirst)
            tfirst = now_ns();
        tot += k;
    }
    uint64_t tlast = now_ns();
    int st;
    waitpid(p, &st, 0);
    double s = (double)(tlast - t0) / 1e9;
    printf("{\"test\":\"producer\",\"bytes\":%lld,\"expected\":%lld,\"seconds\":%.4f,"
           "\"ttfb_s\":%.6f,\"mb_per_s\":%.1f,\"ok\":%s}\n",
           tot, expected, s, tfirst ? (double)(tfirst - t0) / 1e9 : -1.0, (double)tot / s / 1e6,
           tot == expected ? "true" : "false");
}

static void relay_test(long long expected, const char *cmd)
{
    struct sockaddr_in a;
    int ls = loopback_listener(&a);
    int rep[2]; /* the sink reports its byte count and CPU seconds */
    if (pipe(rep))
        exit(1);
    pid_t sink = fork();
    if (sink == 0) {
        close(rep[0]);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&a, sizeof a))
            _exit(2);
        size_t bs = 1 << 20;
        char *b = malloc(bs);
        long long got = 0;
        ssize_t k;
        while ((k = read(s, b, bs)) > 0)
            got += k;
        double c = cpu_s(RUSAGE_SELF);
        if (write(rep[1], &got, sizeof got) != sizeof got || write(rep[1], &c, sizeof c) != sizeof c)
            _exit(1);
        _exit(0);
    }
    close(rep[1]);
    int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0) {
        perror("accept");
        exit(1);
    }
    int rfd;
    double self0 = cpu_s(RUSAGE_SELF), kids0 = cpu_s(RUSAGE_CHILDREN);
    uint64_t t0 = now_ns();
    pid_t p = spawn_producer(cmd, &rfd);
    size_t bs = 64 << 10;
    char *b = malloc(bs);
    long long tot = 0;
    ssize_t k;
    while ((k = read(rfd, b, bs)) > 0) {
        tot += k;
        for (char *q = b; k > 0;) {
            ssize_t w = write(c, q, (size_t)k);
            if (w <= 0) {
                perror("write");
                exit(1);
            }
            q += w;
            k -= w;
        }
    }
    close(c);
    long long got = 0;
    double sink_cpu = 0;
    if (read(rep[0], &got, sizeof got) != sizeof got || read(rep[0], &sink_cpu, sizeof sink_cpu) <= 0)
        got = -1;
    uint64_t t1 = now_ns();
    double relay_cpu = cpu_s(RUSAGE_SELF) - self0;
    int st;
    waitpid(p, &st, 0);
    double prod_cpu = cpu_s(RUSAGE_CHILDREN) - kids0;
    waitpid(sink, &st, 0);
    double s = (double)(t1 - t0) / 1e9;
    printf("{\"test\":\"relay\",\"bytes\":%lld,\"expected\":%lld,\"seconds\":%.4f,\"mb_per_s\":%.1f,"
           "\"relay_cpu_s\":%.4f,\"sink_cpu_s\":%.4f,\"producer_cpu_s\":%.4f,\"ok\":%s}\n",
           got, expected, s, (double)got / s / 1e6, relay_cpu, sink_cpu, prod_cpu,
           got == expected && tot == expected ? "true" : "false");
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: physlimits spawn|spawnpipe|spawnpar|tcp|producer|relay ARGS (see source)\n");
        return 2;
    }
    const char *t = argv[1];
    long a = atol(argv[2]);
    if (!strcmp(t, "spawn"))
        lat_test("posix_spawn_wait", one_spawn, a > 0 ? a : 2000, argc > 3 ? argv[3] : NULL);
    else if (!strcmp(t, "spawnpipe"))
        lat_test("posix_spawn_pipes_setsid_wait", one_spawn_pipes, a > 0 ? a : 2000,
                 argc > 3 ? argv[3] : NULL);
    else if (!strcmp(t, "spawnpar") && argc > 3)
        spawnpar_test(a > 0 ? a : 2, atof(argv[3]), 0);
    else if (!strcmp(t, "spawnparpipe") && argc > 3)
        spawnpar_test(a > 0 ? a : 2, atof(argv[3]), 1);
    else if (!strcmp(t, "tcp"))
        tcp_test(a > 0 ? a : 1024);
    else if (!strcmp(t, "producer") && argc > 3)
        producer_test(atoll(argv[2]), argv[3]);
    else if (!strcmp(t, "relay") && argc > 3)
        relay_test(atoll(argv[2]), argv[3]);
    else {
        fprintf(stderr, "unknown test\n");
        return 2;
    }
    return 0;
}
