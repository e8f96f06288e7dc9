/*
 * sandboxd: command line, signal setup, the event loop, and ordered teardown. Nothing else:
 * serving is in server/ + http/, the API in api/, processes in proc/.
 */
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/api.h"
#include "http/http.h"
#include "proc/proc.h"

static struct app app;
static struct http_server *server;
static uv_signal_t sig_term, sig_int;
static bool stopping;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: sandboxd [options]\n"
            "\n"
            "An in-sandbox process daemon: starts processes, captures their output, and serves\n"
            "Tensorlake's (/api/v1/processes) and Blaxel's (/process) APIs over HTTP.\n"
            "\n"
            "  --listen HOST:PORT      address to listen on (default 127.0.0.1:9501); port 0\n"
            "                          picks a free port. Once accepting, one line\n"
            "                          \"listening on HOST:PORT\" is printed to stdout.\n"
            "  --token TOKEN           require \"Authorization: Bearer TOKEN\" on every route\n"
            "                          but /api/v1/health (also from $SANDBOXD_TOKEN).\n"
            "                          Required to listen on a non-loopback address.\n"
            "  --state-dir DIR         where captured output is kept (default\n"
            "                          $SANDBOXD_STATE_DIR or /var/tmp/sandboxd-<uid>)\n"
            "  --max-output BYTES      output log kept per process (default 1 GiB; suffixes\n"
            "                          K, M, G); older output is dropped, explicitly\n"
            "  --max-total-output BYTES  output kept over all processes (default 4 GiB)\n"
            "  --max-records N         ended processes remembered (default 4096, about\n"
            "                          1.3 KiB each); the oldest are forgotten first,\n"
            "                          with their output\n"
            "  --verbose               log each request (never headers or tokens)\n"
            "  --help                  this text\n");
}

static int parse_size(const char *s, uint64_t *ret)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || end == s)
        return -EINVAL;
    switch (*end) {
    case 'k': case 'K': v <<= 10; end++; break;
    case 'm': case 'M': v <<= 20; end++; break;
    case 'g': case 'G': v <<= 30; end++; break;
    default: break;
    }
    if (*end != '\0')
        return -EINVAL;
    *ret = v;
    return 0;
}

/* Splits "HOST:PORT" or "[V6]:PORT". */
static int parse_listen(const char *s, char *host, size_t hostlen, int *port)
{
    const char *colon;
    size_t hl;
    if (s[0] == '[') {
        const char *rb = strchr(s, ']');
        if (rb == NULL || rb[1] != ':')
            return -EINVAL;
        hl = (size_t)(rb - s - 1);
        s++;
        colon = rb + 1;
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL)
            return -EINVAL;
        hl = (size_t)(colon - s);
    }
    if (hl == 0 || hl >= hostlen)
        return -EINVAL;
    memcpy(host, s, hl);
    host[hl] = '\0';
    long p = 0;
    const char *d = colon + 1;
    for (; *d >= '0' && *d <= '9' && p <= 65535; d++)
        p = p * 10 + (*d - '0');
    if (*d != '\0' || d == colon + 1 || p > 65535)
        return -EINVAL;
    *port = (int)p;
    return 0;
}

static bool is_loopback(const char *host)
{
    return strncmp(host, "127.", 4) == 0 || strcmp(host, "::1") == 0 ||
           strcmp(host, "localhost") == 0;
}

static void on_procs_down(void *arg)
{
    (void)arg;
    uv_stop(app.loop);
}

static void on_server_down(void *arg)
{
    (void)arg;
    server = NULL;
    proc_table_shutdown(app.procs, on_procs_down, NULL);
}

static void on_signal(uv_signal_t *h, int signum)
{
    (void)h;
    if (stopping)
        return;
    stopping = true;
    log_info("signal %d: shutting down", signum);
    http_server_stop(server, on_server_down, NULL);
}

static void on_walk_close(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

/* The long options, "--name VALUE" or "--name=VALUE". Parsed here rather than by
 * getopt_long: that is the one caller of a page range of libc an idle daemon otherwise never
 * maps (docs/decisions.md, "idle RSS"). */
static const struct {
    const char *name;
    char key;
    bool has_arg;
} opts[] = {
    {"listen", 'l', true},          {"token", 't', true},
    {"state-dir", 's', true},       {"max-output", 'm', true},
    {"max-total-output", 'M', true}, {"max-records", 'r', true},
    {"verbose", 'v', false},        {"help", 'h', false},
};

/* -> the key of argv[*i] (advanced past its value), 0 at the end, '?' for a bad one. */
static int next_opt(int argc, char **argv, int *i, const char **val)
{
    if (++*i >= argc)
        return 0;
    const char *a = argv[*i];
    if (strncmp(a, "--", 2) != 0 || a[2] == '\0')
        return '?';
    a += 2;
    const char *eq = strchr(a, '=');
    size_t len = eq != NULL ? (size_t)(eq - a) : strlen(a);
    for (size_t k = 0; k < sizeof(opts) / sizeof(opts[0]); k++) {
        if (strlen(opts[k].name) != len || strncmp(opts[k].name, a, len) != 0)
            continue;
        if (!opts[k].has_arg)
            return eq == NULL ? opts[k].key : '?';
        if (eq != NULL)
            *val = eq + 1;
        else if (*i + 1 < argc)
            *val = argv[++*i];
        else
            return '?';
        return opts[k].key;
    }
    return '?';
}

int main(int argc, char **argv)
{
    const char *listen = "127.0.0.1:9501";
    const char *token = getenv("SANDBOXD_TOKEN");
    const char *state_dir = getenv("SANDBOXD_STATE_DIR");
    char state_buf[64];
    struct proc_config pcfg = {
        .max_output_bytes = 1ULL << 30,
        .max_total_output_bytes = 4ULL << 30,
        .drain_grace_ms = 2000,
        .stop_grace_ms = 5000,
        .max_procs = 1024,
        .max_records = 4096,
        .use_cgroups = true,
    };
    char host[256];
    const char *val = NULL;
    int port, c, rc, argi = 0;

    while ((c = next_opt(argc, argv, &argi, &val)) != 0) {
        switch (c) {
        case 'l': listen = val; break;
        case 't': token = val; break;
        case 's': state_dir = val; break;
        case 'm':
            if (parse_size(val, &pcfg.max_output_bytes) < 0)
                fatalx("bad --max-output: %s", val);
            break;
        case 'M':
            if (parse_size(val, &pcfg.max_total_output_bytes) < 0)
                fatalx("bad --max-total-output: %s", val);
            break;
        case 'r': {
            uint64_t v;
            if (parse_size(val, &v) < 0 || v < 1 || v > 1000000)
                fatalx("bad --max-records: %s (1 to 1000000)", val);
            pcfg.max_records = (uint32_t)v;
            break;
        }
        case 'v': log_verbose = 1; break;
        case 'h': usage(stdout); return 0;
        default:
            fprintf(stderr, "sandboxd: unknown or incomplete option: %s\n", argv[argi]);
            usage(stderr);
            return 2;
        }
    }
    if (token != NULL && token[0] == '\0')
        token = NULL;
    if (token != NULL) {
        /* Keep the secret out of every child's environment (and /proc/<pid>/environ of
         * whatever they exec): copy it, then drop the variable. */
        token = xstrdup(token);
        unsetenv("SANDBOXD_TOKEN");
    }
    if (parse_listen(listen, host, sizeof(host), &port) < 0) {
        fprintf(stderr, "sandboxd: bad --listen address: %s (want HOST:PORT)\n", listen);
        return 2;
    }
    if (!is_loopback(host) && token == NULL) {
        fprintf(stderr, "sandboxd: refusing to listen on non-loopback address %s without a "
                        "token (--token or SANDBOXD_TOKEN)\n", host);
        return 2;
    }
    if (state_dir == NULL) {
        snprintf(state_buf, sizeof(state_buf), "/var/tmp/sandboxd-%u", (unsigned)getuid());
        state_dir = state_buf;
    }
    if (mkdir(state_dir, 0700) < 0 && errno != EEXIST)
        fatal("cannot create state dir %s", state_dir);
    pcfg.state_dir = state_dir;

    /* Fixed malloc thresholds instead of glibc's sliding ones. By default, freeing a mmap'ed
     * block raises the mmap threshold to its size: after the first stream, the log's 580 KiB
     * direct-write chunks came from the heap, which then stayed fragmented and resident (a
     * fresh daemon after 12 streams of 256 MiB: 20-23 MiB RSS). Blocks of 512 KiB and more
     * are now always mmap'ed and go back to the system when freed (same daemon: 3.4 MiB);
     * the 256 KiB write-behind buffers stay on the heap, whose free top is kept up to 1 MiB. */
    mallopt(M_MMAP_THRESHOLD, 512 * 1024);
    mallopt(M_TRIM_THRESHOLD, 1024 * 1024);

    /* Writes to a vanished client must fail with EPIPE, not kill the daemon. Children get
     * default dispositions back in the spawn path. */
    signal(SIGPIPE, SIG_IGN);
    /* Under memory pressure the kernel should pick a workload, not the daemon. */
    if (geteuid() == 0) {
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            /* strerror only when it is printed: its table is a page range of libc that an
             * idle daemon otherwise never maps (docs/decisions.md, "idle RSS"). */
            if (write(fd, "-500", 4) < 0 && log_verbose)
                log_debug("oom_score_adj: %s", strerror(errno));
            close(fd);
        }
    }

    app.loop = uv_default_loop();
    app.token = token;
    app.token_len = token ? strlen(token) : 0;
    app.start_ms = now_ms();
    app.is_root = geteuid() == 0;

    if ((rc = proc_table_new(app.loop, &pcfg, &app.procs)) < 0)
        fatalx("cannot set up the process table: %s", uv_strerror(rc));

    struct http_config hcfg = {
        .host = host,
        .port = port,
        .max_body = 1 << 20,
        .header_timeout_ms = 10000,
        .idle_timeout_ms = 60000,
        .write_timeout_ms = 30000,
        .max_conns = 1024,
        .handler = api_handle,
        .handler_arg = &app,
    };
    int bound;
    if ((rc = http_server_start(app.loop, &hcfg, &server, &bound)) < 0)
        fatalx("cannot listen on %s: %s", listen, uv_strerror(rc));

    uv_signal_init(app.loop, &sig_term);
    uv_signal_init(app.loop, &sig_int);
    uv_signal_start(&sig_term, on_signal, SIGTERM);
    uv_signal_start(&sig_int, on_signal, SIGINT);
    uv_unref((uv_handle_t *)&sig_term);
    uv_unref((uv_handle_t *)&sig_int);

    if (strchr(host, ':') != NULL)
        printf("listening on [%s]:%d\n", host, bound);
    else
        printf("listening on %s:%d\n", host, bound);
    fflush(stdout);
    log_info("listening on %s port %d%s", host, bound, token ? " (token required)" : "");

    uv_run(app.loop, UV_RUN_DEFAULT);

    proc_table_free(app.procs);
    uv_walk(app.loop, on_walk_close, NULL);
    uv_run(app.loop, UV_RUN_DEFAULT);
    uv_loop_close(app.loop);
    log_info("stopped");
    return 0;
}
