/*
 * httpload: a small HTTP/1.1 load client for sandboxd's benchmark (bench/bench.py).
 * Adapted from the team's side-by-side harness (shared/bench/src/httpload.c).
 * It replays one pre-built raw request (a file written by bench.py) and parses
 * responses framed by Content-Length, chunked encoding, or connection close.
 * Connects to 127.0.0.1 only.
 *
 *   httpload lat    --port P --req FILE --n N [--warmup W] [--expect STR]
 *                   [--samples FILE]
 *       sequential requests over one keep-alive connection (blocking I/O);
 *       prints latency percentiles in microseconds; --samples writes every
 *       measured latency (µs), one a line.
 *   httpload tput   --port P --req FILE --conns C --duration S [--expect STR]
 *                   [--max-requests M]
 *       C keep-alive connections, each with one request in flight, driven by
 *       a single epoll loop for S seconds; prints completions per second.
 *   httpload stream --port P --req FILE --mode MODE --expect-bytes B
 *                   [--line-len L] [--idle-timeout S] [--timeout S]
 *                   [--start-req FILE]
 *       one request whose body carries a process's stdout.  With --start-req,
 *       that request is sent first on the same connection, "pid":N is taken
 *       from its answer and replaces {PID} in --req (start, then follow);
 *       elapsed_s then counts from the start request.  ttfb_s is the time from
 *       the streaming request to the first decoded stdout byte.  MODE is
 *         raw               count body bytes
 *         jsonstr:FIELD     body is JSON; decode the string value of FIELD
 *         sse-b64           SSE events with "data":"<base64>" and "stream"
 *         sse-line          SSE events with "line":"<json string>", ending at
 *                           an event carrying "exit_code" or "signal"
 *       decoded stdout bytes go through a content checker (lines of L bytes of
 *       'a' ending in '\n').
 *
 * Output: one JSON object on stdout.  Every run is bounded by count and time.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}
static void die(const char *m) { fprintf(stderr, "httpload: %s (%s)\n", m, strerror(errno)); exit(2); }

/* ------------------------------------------------------------------ */
/* options                                                             */
static const char *o_host = "127.0.0.1"; /* fixed: loopback only */
static int o_port = 0;
static const char *o_req = NULL;
static long o_n = 300, o_warmup = 50, o_conns = 8, o_maxreq = 1000000;
static double o_duration = 10, o_idle = 10, o_timeout = 600;
static const char *o_expect = NULL;
static const char *o_mode = "raw";
static long long o_expect_bytes = -1;
static long o_line_len = 0;
static const char *o_samples = NULL, *o_start_req = NULL;

static char *g_req; static size_t g_reqlen;

static char *load_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("open request file");
    struct stat st; fstat(fileno(f), &st);
    char *b = malloc(st.st_size + 1); *len = fread(b, 1, st.st_size, f); fclose(f);
    b[*len] = 0;
    return b;
}
static void load_req(void) { g_req = load_file(o_req, &g_reqlen); }

static int dial(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(o_port)};
    inet_pton(AF_INET, o_host, &a.sin_addr);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { close(fd); return -1; }
    int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

/* ------------------------------------------------------------------ */
/* incremental HTTP/1.1 response parser                                */
enum { R_HEAD, R_CL, R_CHSIZE, R_CHDATA, R_CHCRLF, R_TRAILER, R_EOFBODY, R_DONE, R_ERR };
typedef void (*body_cb)(void *ctx, const char *p, size_t n);
typedef struct {
    int st, status, chunked, close;
    long long cl, rem, body;
    char hdr[16384]; size_t hlen;
    char line[256]; size_t llen;
    body_cb cb; void *ctx;
} resp_t;

static void resp_init(resp_t *r, body_cb cb, void *ctx) {
    memset(r, 0, sizeof *r); r->cl = -1; r->cb = cb; r->ctx = ctx;
}

static void parse_headers(resp_t *r) {
    r->hdr[r->hlen] = 0;
    int minor = 1;
    if (sscanf(r->hdr, "HTTP/1.%d %d", &minor, &r->status) != 2) { r->st = R_ERR; return; }
    if (minor == 0) r->close = 1;
    char *save, *ln = strtok_r(r->hdr, "\r\n", &save);
    while ((ln = strtok_r(NULL, "\r\n", &save))) {
        char *c = strchr(ln, ':'); if (!c) continue;
        *c = 0; char *v = c + 1; while (*v == ' ' || *v == '\t') v++;
        if (!strcasecmp(ln, "content-length")) r->cl = atoll(v);
        else if (!strcasecmp(ln, "transfer-encoding") && strcasestr(v, "chunked")) r->chunked = 1;
        else if (!strcasecmp(ln, "connection") && strcasestr(v, "close")) r->close = 1;
    }
    if (r->chunked) r->st = R_CHSIZE;
    else if (r->cl >= 0) { r->rem = r->cl; r->st = r->cl ? R_CL : R_DONE; }
    else if (r->status == 204 || r->status == 304 || r->status / 100 == 1) r->st = R_DONE;
    else { r->st = R_EOFBODY; r->close = 1; }
}

static void emit(resp_t *r, const char *p, size_t n) { r->body += n; if (r->cb && n) r->cb(r->ctx, p, n); }

/* returns bytes consumed; stops at R_DONE / R_ERR */
static size_t resp_feed(resp_t *r, const char *p, size_t n) {
    size_t i = 0;
    while (i < n && r->st != R_DONE && r->st != R_ERR) {
        switch (r->st) {
        case R_HEAD:
            if (r->hlen >= sizeof r->hdr - 1) { r->st = R_ERR; break; }
            r->hdr[r->hlen++] = p[i++];
            if (r->hlen >= 4 && !memcmp(r->hdr + r->hlen - 4, "\r\n\r\n", 4)) parse_headers(r);
            break;
        case R_CL: case R_CHDATA: {
            size_t k = n - i; if ((long long)k > r->rem) k = r->rem;
            emit(r, p + i, k); i += k; r->rem -= k;
            if (!r->rem) r->st = r->st == R_CL ? R_DONE : R_CHCRLF;
            break; }
        case R_EOFBODY: emit(r, p + i, n - i); i = n; break;
        case R_CHCRLF: if (p[i++] == '\n') { r->st = R_CHSIZE; r->llen = 0; } break;
        case R_CHSIZE: case R_TRAILER: {
            char c = p[i++];
            if (c != '\n') { if (r->llen < sizeof r->line - 1) r->line[r->llen++] = c; break; }
            r->line[r->llen] = 0;
            if (r->st == R_CHSIZE) {
                r->rem = strtoll(r->line, NULL, 16); r->llen = 0;
                r->st = r->rem ? R_CHDATA : R_TRAILER;
            } else {
                size_t l = r->llen; r->llen = 0;
                if (l == 0 || (l == 1 && r->line[0] == '\r')) r->st = R_DONE;
            }
            break; }
        }
    }
    return i;
}

/* ------------------------------------------------------------------ */
/* latency stats                                                       */
static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b; return x < y ? -1 : x > y;
}
static double pct(uint64_t *v, long n, double q) {
    if (!n) return 0;
    long i = (long)(q * (n - 1) + 0.5);
    return v[i] / 1000.0;
}
static void print_lat(const char *key, uint64_t *v, long n) {
    qsort(v, n, sizeof *v, cmp_u64);
    double sum = 0; for (long i = 0; i < n; i++) sum += v[i];
    printf("\"%s\":{\"n\":%ld,\"min_us\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,"
           "\"max_us\":%.1f,\"mean_us\":%.1f}", key, n, n ? v[0] / 1000.0 : 0, pct(v, n, .5), pct(v, n, .9),
           pct(v, n, .99), n ? v[n - 1] / 1000.0 : 0, n ? sum / n / 1000.0 : 0);
}

/* body capture for --expect */
typedef struct { char buf[65536]; size_t len; } cap_t;
static void cap_cb(void *ctx, const char *p, size_t n) {
    cap_t *c = ctx; size_t k = sizeof c->buf - 1 - c->len; if (n < k) k = n;
    memcpy(c->buf + c->len, p, k); c->len += k; c->buf[c->len] = 0;
}
static int body_ok(resp_t *r, cap_t *c) {
    if (r->status < 200 || r->status > 299) return 0;
    return !o_expect || memmem(c->buf, c->len, o_expect, strlen(o_expect)) != NULL;
}

/* ------------------------------------------------------------------ */
/* mode: lat (blocking, one connection)                                */
static int do_lat(void) {
    long total = o_warmup + o_n;
    uint64_t *lat = calloc(o_n, sizeof *lat);
    int fd = dial(); if (fd < 0) die("connect");
    long bad = 0, reconnects = 0, statuses[6] = {0};
    char *buf = malloc(1 << 20);
    static cap_t cap; resp_t r;
    double deadline = now_s() + o_timeout;
    for (long i = 0; i < total && now_s() < deadline; i++) {
        cap.len = 0; resp_init(&r, cap_cb, &cap);
        uint64_t t0 = now_ns();
        if (write(fd, g_req, g_reqlen) != (ssize_t)g_reqlen) goto reconnect;
        while (r.st != R_DONE && r.st != R_ERR) {
            ssize_t k = read(fd, buf, 1 << 20);
            if (k <= 0) { if (r.st == R_EOFBODY) { r.st = R_DONE; break; } goto reconnect; }
            resp_feed(&r, buf, k);
        }
        uint64_t t1 = now_ns();
        if (r.status >= 100 && r.status < 600) statuses[r.status / 100]++;
        if (r.st != R_DONE || !body_ok(&r, &cap)) {
            bad++;
            if (bad <= 3) fprintf(stderr, "bad response %d: %.300s\n", r.status, cap.buf);
        }
        if (i >= o_warmup) lat[i - o_warmup] = t1 - t0;
        if (r.close) { close(fd); fd = dial(); reconnects++; if (fd < 0) die("reconnect"); }
        continue;
    reconnect:
        close(fd); fd = dial(); reconnects++; bad++; if (fd < 0) die("reconnect");
        if (i >= o_warmup) lat[i - o_warmup] = now_ns() - t0;
        if (bad > 1000) break;
    }
    if (o_samples) {
        FILE *sf = fopen(o_samples, "w");
        if (sf) { for (long i = 0; i < o_n; i++) fprintf(sf, "%.1f\n", lat[i] / 1000.0); fclose(sf); }
    }
    printf("{\"mode\":\"lat\",\"bad\":%ld,\"reconnects\":%ld,\"status_2xx\":%ld,\"status_4xx\":%ld,\"status_5xx\":%ld,",
           bad, reconnects, statuses[2], statuses[4], statuses[5]);
    print_lat("latency", lat, o_n);
    printf("}\n");
    return 0;
}

/* ------------------------------------------------------------------ */
/* mode: tput (epoll, C connections)                                   */
typedef struct { int fd; size_t woff; uint64_t t0; resp_t r; cap_t cap; int busy; } conn_t;

static int conn_open(int ep, conn_t *c) {
    c->fd = dial(); if (c->fd < 0) return -1;
    fcntl(c->fd, F_SETFL, O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    return 0;
}
static void conn_start(conn_t *c) {
    c->woff = 0; c->cap.len = 0; resp_init(&c->r, cap_cb, &c->cap); c->t0 = now_ns(); c->busy = 1;
}
static int conn_write(conn_t *c) {
    while (c->woff < g_reqlen) {
        ssize_t k = write(c->fd, g_req + c->woff, g_reqlen - c->woff);
        if (k < 0) return errno == EAGAIN ? 0 : -1;
        c->woff += k;
    }
    return 0;
}

static int do_tput(void) {
    int ep = epoll_create1(0);
    conn_t *cs = calloc(o_conns, sizeof *cs);
    size_t cap = 1 << 22; uint64_t *lat = malloc(cap * sizeof *lat); long nlat = 0;
    long done = 0, bad = 0, conn_err = 0, issued = 0, statuses[6] = {0};
    char *buf = malloc(1 << 20);
    double t_start = now_s(), t_end = t_start + o_duration, hard_end = t_end + 30;
    for (long i = 0; i < o_conns; i++) {
        if (conn_open(ep, &cs[i]) < 0) die("connect");
        conn_start(&cs[i]); issued++; conn_write(&cs[i]);
    }
    long inflight = o_conns;
    struct epoll_event evs[256];
    while (inflight > 0) {
        double t = now_s();
        if (t > hard_end) break;
        int n = epoll_wait(ep, evs, 256, 100);
        for (int e = 0; e < n; e++) {
            conn_t *c = evs[e].data.ptr;
            if (!c->busy) continue;
            if (evs[e].events & EPOLLOUT) { if (conn_write(c) < 0) goto cerr; }
            if (!(evs[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) continue;
            for (;;) {
                ssize_t k = read(c->fd, buf, 1 << 20);
                if (k == 0) { if (c->r.st == R_EOFBODY) { c->r.st = R_DONE; break; } goto cerr; }
                if (k < 0) { if (errno == EAGAIN) break; goto cerr; }
                resp_feed(&c->r, buf, k);
                if (c->r.st == R_DONE || c->r.st == R_ERR) break;
            }
            if (c->r.st != R_DONE && c->r.st != R_ERR) continue;
            {
                uint64_t t1 = now_ns();
                if (c->r.status >= 100 && c->r.status < 600) statuses[c->r.status / 100]++;
                int ok = c->r.st == R_DONE && body_ok(&c->r, &c->cap);
                if (!ok) { bad++; if (bad <= 3) fprintf(stderr, "bad response %d: %.300s\n", c->r.status, c->cap.buf); }
                if (t1 / 1e9 <= t_end) { done++; if (nlat < (long)cap) lat[nlat++] = t1 - c->t0; }
                c->busy = 0; inflight--;
                if (c->r.close) { epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd); if (conn_open(ep, c) < 0) die("reconnect"); }
            }
            goto next;
        cerr:
            conn_err++; c->busy = 0; inflight--;
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd);
            if (conn_err > 1000 || conn_open(ep, c) < 0) { fprintf(stderr, "too many connection errors\n"); goto out; }
        next:
            if (now_s() < t_end && issued < o_maxreq) { conn_start(c); issued++; inflight++; if (conn_write(c) < 0) goto cerr; }
        }
    }
out:;
    double elapsed = now_s() - t_start;
    double window = elapsed < o_duration ? elapsed : o_duration;
    printf("{\"mode\":\"tput\",\"conns\":%ld,\"duration_s\":%.3f,\"completed\":%ld,\"per_s\":%.1f,\"bad\":%ld,"
           "\"conn_errors\":%ld,\"status_2xx\":%ld,\"status_4xx\":%ld,\"status_5xx\":%ld,\"unfinished\":%ld,",
           o_conns, window, done, done / window, bad, conn_err, statuses[2], statuses[4], statuses[5], inflight);
    print_lat("latency", lat, nlat);
    printf("}\n");
    return 0;
}

/* ------------------------------------------------------------------ */
/* stream consumers                                                    */
/* content checker: every decoded stdout byte comes through here; lines of
 * o_line_len bytes ('a' * (L-1) + '\n') are expected */
typedef struct { long long bytes, lines, bad_lines, bad_bytes, cur; } chk_t;
static chk_t chk;
static double t_first_out; /* monotonic seconds of the first decoded stdout byte */
static double now_s(void);
static long long count_not_a(const unsigned char *p, size_t n) {
    long long nb = 0;
    for (size_t i = 0; i < n; i++) nb += p[i] != 'a';   /* vectorised at -O3 */
    return nb;
}
static void chk_feed(const unsigned char *p, size_t n) {
    if (!n) return;
    if (!t_first_out) t_first_out = now_s();
    chk.bytes += n;
    while (n) {
        const unsigned char *nl = memchr(p, '\n', n);
        size_t seg = nl ? (size_t)(nl - p) : n;
        chk.bad_bytes += count_not_a(p, seg); chk.cur += seg;
        if (!nl) break;
        chk.lines++;
        if (o_line_len && chk.cur + 1 != o_line_len) chk.bad_lines++;
        chk.cur = 0; p = nl + 1; n -= seg + 1;
    }
}

/* one '\n' (the newline a stripped line is owed) */
static void chk_nl(void) {
    chk.bytes++; chk.lines++;
    if (o_line_len && chk.cur + 1 != o_line_len) chk.bad_lines++;
    chk.cur = 0;
}

/* incremental JSON string decoder */
typedef struct { int st; unsigned u, hi; int nu; unsigned char out[65536]; size_t on; } jdec_t;
static void jd_flush(jdec_t *d) { chk_feed(d->out, d->on); d->on = 0; }
static void jd_put(jdec_t *d, unsigned cp) {
    if (d->on > sizeof d->out - 8) jd_flush(d);
    unsigned char *o = d->out + d->on;
    if (cp < 0x80) { o[0] = cp; d->on += 1; }
    else if (cp < 0x800) { o[0] = 0xC0 | cp >> 6; o[1] = 0x80 | (cp & 63); d->on += 2; }
    else if (cp < 0x10000) { o[0] = 0xE0 | cp >> 12; o[1] = 0x80 | (cp >> 6 & 63); o[2] = 0x80 | (cp & 63); d->on += 3; }
    else { o[0] = 0xF0 | cp >> 18; o[1] = 0x80 | (cp >> 12 & 63); o[2] = 0x80 | (cp >> 6 & 63); o[3] = 0x80 | (cp & 63); d->on += 4; }
}
/* feed string content (after the opening quote); returns index just past the
 * closing quote, or n if the string continues.  Runs of plain bytes go to the
 * checker directly. */
static size_t jd_feed(jdec_t *d, const char *p, size_t n, int *closed) {
    *closed = 0;
    size_t i = 0;
    while (i < n) {
        if (d->st == 0) {
            const char *q = memchr(p + i, '"', n - i);
            const char *e = q ? q : p + n;
            const char *b = memchr(p + i, '\\', e - (p + i));
            const char *stop = b ? b : e;
            size_t run = stop - (p + i);
            if (run) { jd_flush(d); chk_feed((const unsigned char *)p + i, run); i += run; }
            if (i >= n) break;
            if (p[i] == '"') { jd_flush(d); *closed = 1; return i + 1; }
            d->st = 1; i++;   /* backslash */
            continue;
        }
        unsigned char c = p[i++];
        if (d->st == 1) {
            d->st = 0;
            switch (c) {
            case 'n': jd_put(d, '\n'); break; case 't': jd_put(d, '\t'); break;
            case 'r': jd_put(d, '\r'); break; case 'b': jd_put(d, '\b'); break;
            case 'f': jd_put(d, '\f'); break; case 'u': d->st = 2; d->u = 0; d->nu = 0; break;
            default: jd_put(d, c);
            }
        } else {
            int v = c <= '9' ? c - '0' : (c | 32) - 'a' + 10;
            d->u = d->u << 4 | (v & 15);
            if (++d->nu == 4) {
                d->st = 0;
                if (d->u >= 0xD800 && d->u < 0xDC00) d->hi = d->u;
                else if (d->u >= 0xDC00 && d->u < 0xE000 && d->hi) { jd_put(d, 0x10000 + ((d->hi - 0xD800) << 10) + (d->u - 0xDC00)); d->hi = 0; }
                else jd_put(d, d->u);
            }
        }
    }
    return n;
}

/* jsonstr:FIELD — find "FIELD":" and decode; keep everything else as meta */
static char js_pat[128]; static size_t js_patlen;
static int js_state; /* 0 searching, 1 in string, 2 after */
static jdec_t jd;
static char meta[65536]; static size_t metalen;
static void meta_add(const char *p, size_t n) {
    size_t k = sizeof meta - 1 - metalen; if (n < k) k = n; memcpy(meta + metalen, p, k); metalen += k; meta[metalen] = 0;
}
static void js_cb(void *ctx, const char *p, size_t n) {
    (void)ctx;
    while (n) {
        if (js_state == 1) {
            int closed; size_t k = jd_feed(&jd, p, n, &closed);
            p += k; n -= k;
            if (closed) { js_state = 2; meta_add("<elided>\"", 9); }
            continue;
        }
        if (js_state == 2) { meta_add(p, n); return; }
        /* searching: the pattern may straddle calls; keep the tail in meta */
        size_t before = metalen;
        meta_add(p, n);
        char *hit = memmem(meta + (before > js_patlen ? before - js_patlen : 0), metalen - (before > js_patlen ? before - js_patlen : 0), js_pat, js_patlen);
        if (!hit) return;
        size_t used = (hit + js_patlen) - (meta + before);  /* bytes of p consumed through the pattern */
        metalen = hit + js_patlen - meta; meta[metalen] = 0;
        js_state = 1; p += used; n -= used;
    }
}

/* SSE: split body into lines; handle data: lines */
static char *sl; static size_t sl_len, sl_cap;
static int sse_b64 = 0, sse_done = 0;
static long long sse_events, sse_seq_gaps, sse_last_seq = 0, sse_other_bytes, sse_comments;
static int sse_nl_mode = -1; /* sse-line: -1 undecided, 0 line has its newline, 1 append '\n' */
static int sse_nl_pending = 0;
static char sse_final[1024];
static unsigned char *b64buf; static size_t b64cap;
static signed char b64t[256];
static void b64init(void) {
    memset(b64t, -1, sizeof b64t);
    for (int i = 0; i < 26; i++) { b64t['A' + i] = i; b64t['a' + i] = 26 + i; }
    for (int i = 0; i < 10; i++) b64t['0' + i] = 52 + i;
    b64t['+'] = b64t['-'] = 62;
    b64t['/'] = b64t['_'] = 63;
}
static size_t b64dec(const char *s, size_t n, unsigned char *o) {
    unsigned acc = 0; int bits = 0; size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64t[(unsigned char)s[i]];
        if (v < 0) continue;
        acc = acc << 6 | v; bits += 6;
        if (bits >= 8) { bits -= 8; o[k++] = acc >> bits & 255; }
    }
    return k;
}
/* find a JSON string value "key":"..." in a complete line; returns start of content and its raw length */
static const char *json_str(const char *s, size_t n, const char *key, size_t *len) {
    char pat[64]; int pl = snprintf(pat, sizeof pat, "\"%s\":\"", key);
    const char *h = memmem(s, n, pat, pl); if (!h) return NULL;
    const char *b = h + pl, *e = s + n, *q = b;
    for (;;) {  /* closing quote: the first '"' not escaped */
        const char *dq = memchr(q, '"', e - q);
        if (!dq) { q = e; break; }
        const char *bs = memchr(q, '\\', dq - q);
        if (!bs) { q = dq; break; }
        q = bs + 2;
        if (q > e) { q = e; break; }
    }
    *len = q - b; return b;
}
/* does p[0..n) contain "stream":"stderr" (cheaper than memmem for short spans) */
static int has_stderr_tag(const char *p, size_t n) {
    static const char tag[] = "\"stream\":\"stderr\"";
    const char *e = p + n;
    while (e - p >= 17) {
        const char *q = memchr(p, '"', e - p - 16);
        if (!q) return 0;
        if (!memcmp(q, tag, 17)) return 1;
        p = q + 1;
    }
    return 0;
}
static void sse_line(const char *s, size_t n) {
    if (n && s[n - 1] == '\r') n--;
    if (n == 0) return;
    if (s[0] == ':') { sse_comments++; return; }
    if (n < 5 || memcmp(s, "data:", 5)) return;
    s += 5; n -= 5; if (n && *s == ' ') { s++; n--; }
    sse_events++;
    size_t L;
    if (sse_b64) {
        const char *st = memmem(s, n, "\"stream\":\"stderr\"", 17);
        const char *seq = memmem(s, n, "\"sequence\":", 11);
        if (seq) { long long q = atoll(seq + 11); if (sse_last_seq && q != sse_last_seq + 1) sse_seq_gaps++; sse_last_seq = q; }
        const char *d = json_str(s, n, "data", &L);
        if (!d) return;
        if (b64cap < L) { b64cap = L * 2; b64buf = realloc(b64buf, b64cap); }
        size_t k = b64dec(d, L, b64buf);
        if (st) sse_other_bytes += k; else chk_feed(b64buf, k);
        if (o_expect_bytes >= 0 && chk.bytes >= o_expect_bytes) sse_done = 1;
        return;
    }
    /* "line" events: find the value's start, take the stream tag from the short head or
     * tail of the event (a raw '"' cannot occur inside the JSON string), then decode the
     * value straight into the checker; jd_feed finds the closing quote. */
    const char *h = n >= 9 && !memcmp(s, "{\"line\":\"", 9) ? s + 1 : memmem(s, n, "\"line\":\"", 8);
    if (h) {
        const char *d = h + 8, *e = s + n;
        const char *tl = e - d > 64 ? e - 64 : d;
        int is_err = has_stderr_tag(tl, e - tl) || (h > s && has_stderr_tag(s, h - s));
        static jdec_t dd; int closed;
        if (is_err) { sse_other_bytes += e - d; return; }
        if (sse_nl_pending) { chk_nl(); sse_nl_pending = 0; }
        /* fast path: a value with no escapes and only 'a' (two vector passes) */
        const char *q = memchr(d, '"', e - d);
        if (q && sse_nl_mode == 1 && q > d && !count_not_a((const unsigned char *)d, q - d)) {
            if (!t_first_out) t_first_out = now_s();
            chk.bytes += q - d; chk.cur += q - d;
            sse_nl_pending = 1;
            return;
        }
        dd.st = 0; dd.nu = 0; dd.hi = 0; dd.on = 0;
        size_t used = jd_feed(&dd, d, e - d, &closed); jd_flush(&dd);
        L = closed ? used - 1 : used;
        int ends_nl = L >= 2 && d[L - 2] == '\\' && d[L - 1] == 'n';
        if (sse_nl_mode < 0) sse_nl_mode = ends_nl ? 0 : 1;
        /* newline-stripped lines: the newline is owed lazily, before the next
         * line, so a final partial line is not given one it never had */
        if (sse_nl_mode == 1) sse_nl_pending = 1;
        return;
    }
    if (memmem(s, n, "\"exit_code\"", 11) || memmem(s, n, "\"signal\"", 8)) {
        size_t k = n < sizeof sse_final - 1 ? n : sizeof sse_final - 1; memcpy(sse_final, s, k); sse_final[k] = 0;
        sse_done = 1;
    }
}
static void sse_cb(void *ctx, const char *p, size_t n) {
    (void)ctx;
    while (n && !sse_done) {
        const char *nl = memchr(p, '\n', n);
        size_t seg = nl ? (size_t)(nl - p) : n;
        if (nl && sl_len == 0) { sse_line(p, seg); p += seg + 1; n -= seg + 1; continue; }  /* whole line in place */
        if (sl_len + seg + 1 > sl_cap) { sl_cap = (sl_len + seg + 1) * 2; sl = realloc(sl, sl_cap); }
        memcpy(sl + sl_len, p, seg); sl_len += seg;
        if (!nl) return;
        sse_line(sl, sl_len); sl_len = 0;
        p += seg + 1; n -= seg + 1;
    }
}
static void raw_cb(void *ctx, const char *p, size_t n) { (void)ctx; chk_feed((const unsigned char *)p, n); }

/* --start-req: send it, read the whole answer, return "pid":N from it (or -1) */
static long long start_process(int fd, int *status) {
    size_t len; char *req = load_file(o_start_req, &len);
    if (write(fd, req, len) != (ssize_t)len) die("write start request");
    free(req);
    static cap_t cap; resp_t r; cap.len = 0; resp_init(&r, cap_cb, &cap);
    char buf[65536];
    while (r.st != R_DONE && r.st != R_ERR) {
        ssize_t k = read(fd, buf, sizeof buf);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        resp_feed(&r, buf, k);
    }
    *status = r.status;
    const char *p = memmem(cap.buf, cap.len, "\"pid\":", 6);
    if (r.st != R_DONE || r.status / 100 != 2 || !p) {
        fprintf(stderr, "start request failed: %d %.300s\n", r.status, cap.buf);
        return -1;
    }
    return atoll(p + 6);
}

/* replace every {PID} in g_req */
static void subst_pid(long long pid) {
    char num[32]; int nl = snprintf(num, sizeof num, "%lld", pid);
    char *out = malloc(g_reqlen * 2 + 64); size_t on = 0;
    for (size_t i = 0; i < g_reqlen;) {
        if (i + 5 <= g_reqlen && !memcmp(g_req + i, "{PID}", 5)) { memcpy(out + on, num, nl); on += nl; i += 5; }
        else out[on++] = g_req[i++];
    }
    free(g_req); g_req = out; g_reqlen = on;
}

static int do_stream(void) {
    body_cb cb = raw_cb;
    if (!strncmp(o_mode, "jsonstr:", 8)) { js_patlen = snprintf(js_pat, sizeof js_pat, "\"%s\":\"", o_mode + 8); cb = js_cb; }
    else if (!strcmp(o_mode, "sse-b64")) { sse_b64 = 1; cb = sse_cb; b64init(); }
    else if (!strcmp(o_mode, "sse-line")) { cb = sse_cb; }
    else if (strcmp(o_mode, "raw")) { fprintf(stderr, "unknown mode\n"); return 2; }
    int fd = dial(); if (fd < 0) die("connect");
    size_t bsz = 4 << 20; char *buf = malloc(bsz);
    resp_t r; resp_init(&r, cb, NULL);
    double t_start = now_s();
    long long pid = -1; int start_status = 0;
    if (o_start_req) {
        pid = start_process(fd, &start_status);
        if (pid < 0) {
            printf("{\"mode\":\"stream\",\"submode\":\"%s\",\"status\":%d,\"end\":\"start-failed\",\"complete\":false,"
                   "\"stdout_bytes\":0,\"expected_bytes\":%lld,\"mb_per_s\":0,\"ttfb_s\":-1,\"elapsed_s\":0}\n",
                   o_mode, start_status, o_expect_bytes);
            return 0;
        }
        subst_pid(pid);
    }
    double t0 = now_s(), tfirst = 0, tlast = t0, hard = t0 + o_timeout;
    const char *end_reason = "complete";
    if (write(fd, g_req, g_reqlen) != (ssize_t)g_reqlen) die("write");
    struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    long long wire = 0;
    while (r.st != R_DONE && r.st != R_ERR && !sse_done) {
        ssize_t k = read(fd, buf, bsz);
        double t = now_s();
        if (k < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (t - tlast > o_idle) { end_reason = "idle-timeout"; break; }
            if (t > hard) { end_reason = "timeout"; break; }
            continue;
        }
        if (k <= 0) { if (r.st == R_EOFBODY) r.st = R_DONE; else end_reason = "eof-mid-response"; break; }
        if (!tfirst) tfirst = t;
        wire += k;
        long long before = chk.bytes;
        resp_feed(&r, buf, k);
        if (chk.bytes != before || r.st == R_DONE || sse_done) tlast = now_s();
        if (t > hard) { end_reason = "timeout"; break; }
    }
    double tdone = !strcmp(end_reason, "complete") ? now_s() : tlast;
    /* stripped newline owed to the last line: only a full-length line had one */
    if (sse_nl_pending && o_line_len && chk.cur + 1 == o_line_len) chk_feed((const unsigned char *)"\n", 1);
    if (r.st == R_ERR) end_reason = "http-parse-error";
    close(fd);
    double el = tdone - t_start;
    printf("{\"mode\":\"stream\",\"submode\":\"%s\",\"status\":%d,\"end\":\"%s\",\"pid\":%lld,\"elapsed_s\":%.4f,"
           "\"stream_elapsed_s\":%.4f,\"ttfb_s\":%.6f,\"ttfb_wire_s\":%.6f,\"t_start_mono\":%.6f,\"t_req_mono\":%.6f,"
           "\"t_first_out_mono\":%.6f,\"t_done_mono\":%.6f,"
           "\"wire_bytes\":%lld,\"body_bytes\":%lld,\"stdout_bytes\":%lld,\"expected_bytes\":%lld,\"lines\":%lld,"
           "\"bad_lines\":%lld,\"bad_bytes\":%lld,\"mb_per_s\":%.1f,\"mib_per_s\":%.1f,\"complete\":%s,",
           o_mode, r.status, end_reason, pid, el, tdone - t0, t_first_out ? t_first_out - t0 : -1,
           tfirst ? tfirst - t0 : -1, t_start, t0, t_first_out, tdone,
           wire, r.body, chk.bytes, o_expect_bytes,
           chk.lines, chk.bad_lines, chk.bad_bytes, chk.bytes / el / 1e6, chk.bytes / el / 1048576.0,
           chk.bytes == o_expect_bytes && !chk.bad_lines && !chk.bad_bytes && r.status / 100 == 2 ? "true" : "false");
    printf("\"sse_events\":%lld,\"sse_comments\":%lld,\"sse_seq_gaps\":%lld,\"stderr_bytes\":%lld,\"sse_nl_appended\":%d,",
           sse_events, sse_comments, sse_seq_gaps, sse_other_bytes, sse_nl_mode);
    printf("\"final_event\":\"");
    for (char *q = sse_final; *q; q++) printf(*q == '"' || *q == '\\' ? "\\%c" : "%c", *q);
    printf("\",\"meta\":\"");
    for (size_t i = 0; i < metalen && i < 4000; i++) {
        unsigned char c = meta[i];
        if (c == '"' || c == '\\') printf("\\%c", c); else if (c < 32) printf("\\u%04x", c); else putchar(c);
    }
    printf("\"}\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: httpload lat|tput|stream [options]\n"); return 2; }
    const char *mode = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { fprintf(stderr, "missing value for %s\n", a); return 2; }
        i++;
        if (!strcmp(a, "--port")) o_port = atoi(v);
        else if (!strcmp(a, "--req")) o_req = v;
        else if (!strcmp(a, "--n")) o_n = atol(v);
        else if (!strcmp(a, "--warmup")) o_warmup = atol(v);
        else if (!strcmp(a, "--conns")) o_conns = atol(v);
        else if (!strcmp(a, "--duration")) o_duration = atof(v);
        else if (!strcmp(a, "--max-requests")) o_maxreq = atol(v);
        else if (!strcmp(a, "--expect")) o_expect = v;
        else if (!strcmp(a, "--mode")) o_mode = v;
        else if (!strcmp(a, "--expect-bytes")) o_expect_bytes = atoll(v);
        else if (!strcmp(a, "--line-len")) o_line_len = atol(v);
        else if (!strcmp(a, "--idle-timeout")) o_idle = atof(v);
        else if (!strcmp(a, "--timeout")) o_timeout = atof(v);
        else if (!strcmp(a, "--samples")) o_samples = v;
        else if (!strcmp(a, "--start-req")) o_start_req = v;
        else { fprintf(stderr, "unknown option %s\n", a); return 2; }
    }
    if (!o_port || !o_req) { fprintf(stderr, "--port and --req are required\n"); return 2; }
    load_req();
    if (!strcmp(mode, "lat")) return do_lat();
    if (!strcmp(mode, "tput")) return do_tput();
    if (!strcmp(mode, "stream")) return do_stream();
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
