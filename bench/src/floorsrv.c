/*
 * floorsrv: a trivial HTTP/1.1 server, to measure the benchmark client's own floor.
 * Adapted from the team's side-by-side harness (shared/bench/src/floorsrv.c).
 *
 *   floorsrv PORT
 *
 * - Any request except the one below: one fixed response shaped like sandboxd's answer to
 *   POST /api/v1/processes/run of /bin/true (text/event-stream, a start event and an exit
 *   event), keep-alive, Content-Length.  Single-threaded epoll loop.
 * - GET /sse/LINELEN/BYTES: a forked child streams BYTES of stdout as sandboxd's SSE line
 *   events (LINELEN-1 'a' per line, newline stripped), chunked, then the exit event, as
 *   fast as the socket takes it: the client's own SSE decoding ceiling.
 * - GET /relay/LINELEN/BYTES: a forked child runs the bench's producer (`yes <LINELEN-1 a> |
 *   head -c BYTES` under sh), reads its pipe in 64 KiB reads, cuts the lines and sends each
 *   as the same SSE event, chunked, then the exit event: the least a daemon speaking this
 *   wire format does (no log, no escaping check, one fixed timestamp, no records). With the
 *   decoding client it is the floor of the whole stream path.
 * - GET /relaylog/LINELEN/BYTES: the same relay, which also keeps every byte it read: each
 *   read is written to an unlinked file in $TMPDIR (or /tmp) before its events go out. A
 *   daemon that keeps all output with bounded memory copies every byte to a file at least
 *   once; this is that copy and nothing else (no records, no writeback control).
 *
 *
 *   floorsrv PORT spawn
 *
 * - The run floor: every request other than the two streams above runs /bin/true with the
 *   plumbing any process daemon does (plumbing.h: 2 pipes, setsid, read to EOF, reap) and
 *   answers with the run-shaped response carrying its real pid and exit code. Each
 *   connection is served by its own forked process, one request at a time: as many runs in
 *   flight as connections, and no loop ever waits for another connection's spawn. No JSON,
 *   no records, no cgroup. On one connection it is the floor of a run over HTTP; at several,
 *   a pre-fork reference (its processes' vfork waits and switches cost more than one loop).
 *
 * Listens on 127.0.0.1 only.  Exits on SIGTERM/SIGINT (workers follow their parent).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "plumbing.h"

typedef struct {
    int fd;
    char buf[65536];
    size_t len;
} cl_t;

static const char run_body[] =
    "data: {\"handle\":1,\"pid\":4242,\"started_at\":1700000000000}\n\n"
    "data: {\"exit_code\":0,\"signal\":null,\"oom_killed\":false}\n\n";
static char resp[1024];
static size_t resplen;
static int spawn_mode;

/* length of one complete request at the start of b, or 0 */
static size_t req_len(const char *b, size_t n)
{
    const char *e = memmem(b, n, "\r\n\r\n", 4);
    if (!e)
        return 0;
    size_t hl = (size_t)(e + 4 - b), cl = 0;
    const char *p = b;
    while (p < e) {
        const char *nl = memchr(p, '\n', (size_t)(e - p));
        if (!nl)
            break;
        if (!strncasecmp(p, "content-length:", 15))
            cl = strtoul(p + 15, NULL, 10);
        p = nl + 1;
    }
    return n >= hl + cl ? hl + cl : 0;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* The run floor's answer: /bin/true run with the plumbing, its pid and exit code. */
static int answer_spawned(int fd)
{
    pid_t pid;
    int st = run_true_plumbed(&pid);
    char body[256], out[512];
    int bl = snprintf(body, sizeof body,
                      "data: {\"handle\":1,\"pid\":%d,\"started_at\":1700000000000}\n\n"
                      "data: {\"exit_code\":%d,\"signal\":null,\"oom_killed\":false}\n\n",
                      (int)pid, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    int ol = snprintf(out, sizeof out,
                      "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                      "Cache-Control: no-cache\r\nContent-Length: %d\r\n\r\n%s", bl, body);
    return write_all(fd, out, (size_t)ol);
}

/* A connection's own process (spawn mode): its requests, one at a time; exits at EOF. */
static void __attribute__((noreturn)) serve_spawning(int fd)
{
    static char buf[65536];
    size_t len = 0, rl;
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    fcntl(fd, F_SETFL, 0);
    for (;;) {
        ssize_t k = read(fd, buf + len, sizeof buf - len);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            _exit(0);
        len += (size_t)k;
        while ((rl = req_len(buf, len))) {
            if (answer_spawned(fd))
                _exit(0);
            memmove(buf, buf + rl, len - rl);
            len -= rl;
        }
        if (len == sizeof buf)
            _exit(1);
    }
}

/* child: the exit event, the last chunk, a short drain of the client; then exit */
static void __attribute__((noreturn)) sse_finish(int fd)
{
    static const char end[] = "data: {\"exit_code\":0,\"signal\":null,\"oom_killed\":false}\n\n";
    char tail[256];
    int tl = snprintf(tail, sizeof tail, "%zx\r\n%s\r\n0\r\n\r\n", sizeof end - 1, end);
    write_all(fd, tail, (size_t)tl);
    shutdown(fd, SHUT_WR);
    char sink[4096];
    for (int i = 0; i < 100 && read(fd, sink, sizeof sink) > 0; i++) {
    }
    _exit(0);
}

/* child: stream BYTES of lines of LINELEN as SSE events, chunked; then exit */
static void sse_stream(int fd, long linelen, long long bytes)
{
    fcntl(fd, F_SETFL, 0);
    static const char hdr[] = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
    if (write_all(fd, hdr, sizeof hdr - 1))
        _exit(1);
    if (linelen < 1 || linelen > (1 << 20))
        _exit(1);
    /* one event */
    size_t evcap = (size_t)linelen + 128;
    char *ev = malloc(evcap);
    int pre = snprintf(ev, evcap, "data: {\"line\":\"");
    memset(ev + pre, 'a', (size_t)linelen - 1);
    int post = snprintf(ev + pre + linelen - 1, evcap - (size_t)pre - (size_t)linelen + 1,
                        "\",\"timestamp\":1700000000000,\"stream\":\"stdout\"}\n\n");
    size_t evlen = (size_t)pre + (size_t)linelen - 1 + (size_t)post;
    /* a batch of whole events of about 256 KiB, framed as one chunk */
    long per = (long)((256 << 10) / evlen);
    if (per < 1)
        per = 1;
    long long lines = bytes / linelen;
    char *batch = malloc((size_t)per * evlen + 32);
    for (;;) {
        long k = lines < per ? (long)lines : per;
        if (k <= 0)
            break;
        int h = sprintf(batch, "%zx\r\n", (size_t)k * evlen);
        for (long i = 0; i < k; i++)
            memcpy(batch + h + (size_t)i * evlen, ev, evlen);
        memcpy(batch + h + (size_t)k * evlen, "\r\n", 2);
        if (write_all(fd, batch, (size_t)h + (size_t)k * evlen + 2))
            _exit(1);
        lines -= k;
    }
    long long rem = bytes % linelen;   /* a final partial line, as `head -c` leaves it */
    if (rem > 0) {
        size_t pl = (size_t)pre + (size_t)rem;
        memcpy(ev + pl, ev + pre + linelen - 1, (size_t)post);
        int h = sprintf(batch, "%zx\r\n", pl + (size_t)post);
        memcpy(batch + h, ev, pl + (size_t)post);
        memcpy(batch + h + pl + (size_t)post, "\r\n", 2);
        if (write_all(fd, batch, (size_t)h + pl + (size_t)post + 2))
            _exit(1);
    }
    sse_finish(fd);
}

static const char sse_pre[] = "data: {\"line\":\"";
static const char sse_post[] = "\",\"timestamp\":1700000000000,\"stream\":\"stdout\"}\n\n";

/* Appends one line's event to *out (room for it is the caller's). */
static char *put_event(char *out, const char *line, size_t n)
{
    memcpy(out, sse_pre, sizeof sse_pre - 1);
    out += sizeof sse_pre - 1;
    memcpy(out, line, n);
    out += n;
    memcpy(out, sse_post, sizeof sse_post - 1);
    return out + sizeof sse_post - 1;
}

/* Sends out[0..n) as one chunk; the chunk header goes into the 16 bytes before out. */
static int put_chunk(int fd, char *out, size_t n)
{
    char h[16];
    int hl = snprintf(h, sizeof h, "%zx\r\n", n);
    memcpy(out - hl, h, (size_t)hl);
    memcpy(out + n, "\r\n", 2);
    return write_all(fd, out - hl, (size_t)hl + n + 2);
}

/* child: run the producer and relay its lines as SSE events; then exit */
static void sse_relay(int fd, long linelen, long long bytes, int keep)
{
    int logfd = -1;
    if (keep) {
        const char *dir = getenv("TMPDIR");
        logfd = open(dir && *dir ? dir : "/tmp", O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
        if (logfd < 0)
            _exit(1);
    }
    fcntl(fd, F_SETFL, 0);
    static const char hdr[] = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
    if (linelen < 1 || linelen > (1 << 20) || write_all(fd, hdr, sizeof hdr - 1))
        _exit(1);
    char *cmd = malloc((size_t)linelen + 64);
    memcpy(cmd, "yes ", 4); /* its "Broken pipe" at the end goes nowhere: */
    memset(cmd + 4, 'a', (size_t)linelen - 1);
    sprintf(cmd + 4 + linelen - 1, " 2>/dev/null | head -c %lld", bytes);
    int rfd;
    pid_t p = spawn_producer(cmd, &rfd);
    /* in: 64 KiB reads after the carried-over partial line; out: a batch of events */
    size_t incap = (size_t)linelen + (64 << 10), outcap = (256 << 10) + 2 * (size_t)linelen + 256;
    char *in = malloc(incap), *outbuf = malloc(outcap + 32), *out = outbuf + 16;
    size_t have = 0, olen = 0;
    for (;;) {
        ssize_t k = read(rfd, in + have, incap - have);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            break;
        if (logfd >= 0 && write_all(logfd, in + have, (size_t)k))
            _exit(1);
        have += (size_t)k;
        char *p0 = in, *end = in + have, *nl;
        while ((nl = memchr(p0, '\n', (size_t)(end - p0))) != NULL) {
            char *o = put_event(out + olen, p0, (size_t)(nl - p0));
            olen = (size_t)(o - out);
            p0 = nl + 1;
            if (olen >= (256 << 10)) {
                if (put_chunk(fd, out, olen))
                    _exit(1);
                olen = 0;
            }
        }
        have = (size_t)(end - p0);
        memmove(in, p0, have);
        if (have == incap) { /* a line longer than the buffer: not in this bench */
            _exit(1);
        }
        if (olen > 0) { /* what this read brought goes out now, like a daemon's loop turn */
            if (put_chunk(fd, out, olen))
                _exit(1);
            olen = 0;
        }
    }
    if (have > 0) {
        olen = (size_t)(put_event(out, in, have) - out);
        if (put_chunk(fd, out, olen))
            _exit(1);
    }
    int st;
    waitpid(p, &st, 0);
    sse_finish(fd);
}

int main(int argc, char **argv)
{
    if (argc < 2 || (argc > 2 && (argc != 3 || strcmp(argv[2], "spawn")))) {
        fprintf(stderr, "usage: floorsrv PORT [spawn]\n");
        return 2;
    }
    spawn_mode = argc == 3;
    /* Stream children are never waited for; in spawn mode each run reaps its own child,
     * and the loop reaps the connections' and streams' processes. */
    signal(SIGCHLD, spawn_mode ? SIG_DFL : SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    resplen = (size_t)snprintf(resp, sizeof resp,
                               "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                               "Cache-Control: no-cache\r\nContent-Length: %zu\r\n\r\n%s",
                               sizeof run_body - 1, run_body);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1024)) {
        perror("bind");
        return 1;
    }
    fcntl(ls, F_SETFL, O_NONBLOCK);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event evs[128];
    for (;;) {
        int n = epoll_wait(ep, evs, 128, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            break;
        if (spawn_mode)
            while (waitpid(-1, NULL, WNOHANG) > 0) {
            }
        for (int i = 0; i < n; i++) {
            cl_t *c = evs[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    if (spawn_mode) {
                        if (fork() == 0) {
                            close(ls);
                            close(ep);
                            serve_spawning(fd);
                        }
                        close(fd);
                        continue;
                    }
                    cl_t *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    struct epoll_event e2 = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e2);
                }
                continue;
            }
            ssize_t k = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
            if (k <= 0) {
                close(c->fd);
                free(c);
                continue;
            }
            c->len += (size_t)k;
            size_t rl;
            int gone = 0;
            while ((rl = req_len(c->buf, c->len))) {
                long linelen;
                long long bytes;
                int relay = 0, keep = 0;
                if (sscanf(c->buf, "GET /sse/%ld/%lld ", &linelen, &bytes) == 2 ||
                    (relay = sscanf(c->buf, "GET /relay/%ld/%lld ", &linelen, &bytes) == 2) ||
                    (relay = keep = sscanf(c->buf, "GET /relaylog/%ld/%lld ", &linelen, &bytes) == 2)) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    if (fork() == 0) {
                        close(ls);
                        signal(SIGCHLD, SIG_DFL); /* the relay waits for its producer */
                        if (relay)
                            sse_relay(c->fd, linelen, bytes, keep);
                        sse_stream(c->fd, linelen, bytes);
                    }
                    close(c->fd);
                    free(c);
                    gone = 1;
                    break;
                }
                if (write_all(c->fd, resp, resplen))
                    break;
                memmove(c->buf, c->buf + rl, c->len - rl);
                c->len -= rl;
            }
            if (!gone && c->len == sizeof c->buf) {
                close(c->fd);
                free(c);
            }
        }
    }
    return 0;
}
