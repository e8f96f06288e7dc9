/*
 * Unit tests for http/ and server/: the request parser fed with strings (no loop), then a
 * real server on 127.0.0.1:0 driven by a blocking socket client in a second thread. The
 * handler runs on the loop thread; the client thread reports back through atomics and one
 * uv_async that stops the server.
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "http/http.h"
#include "server/server.h"
#include "test.h"
#include "util/util.h"

/* ======================= parser, no sockets ======================= */

/* Feeds s in pieces of `step` bytes (0: all at once) until a request, an error or the end. */
static enum http_parse_ev feed(struct http_parser *p, const char *s, size_t len, size_t step,
                               size_t *ret_used)
{
    size_t off = 0;
    enum http_parse_ev ev = HTTP_P_MORE;
    while (off < len) {
        size_t n = step ? MIN(step, len - off) : len - off, used;
        ev = http__parser_feed(p, s + off, n, &used);
        off += used;
        while (ev == HTTP_P_HEADERS) {
            size_t n2 = used < n ? n - used : 0, used2;
            ev = http__parser_feed(p, s + off, n2, &used2);
            off += used2;
            used += used2;
        }
        if (ev == HTTP_P_REQUEST || ev == HTTP_P_ERROR)
            break;
    }
    if (ret_used != NULL)
        *ret_used = off;
    return ev;
}

static enum http_parse_ev feed_str(struct http_parser *p, const char *s, size_t step)
{
    return feed(p, s, strlen(s), step, NULL);
}

static void check_basic(size_t step)
{
    struct http_parser p;
    const char *req = "GET /api/v1/processes/a%2Fb/x%20y?follow=1&x=2 HTTP/1.1\r\n"
                      "Host: example\r\n"
                      "X-Foo:   bar baz  \r\n"
                      "X-Empty:\r\n"
                      "\r\n";
    http__parser_init(&p, 1024);
    ASSERT_EQ(feed_str(&p, req, step), HTTP_P_REQUEST);
    struct http_req *r = &p.req;
    ASSERT_EQ(r->method, HTTP_M_GET);
    ASSERT_STREQ(r->method_str, "GET");
    ASSERT_STREQ(r->target, "/api/v1/processes/a%2Fb/x%20y?follow=1&x=2");
    ASSERT_STREQ(r->path, "/api/v1/processes/a%2Fb/x%20y");
    ASSERT_STREQ(r->query, "follow=1&x=2");
    ASSERT_EQ(r->nseg, 5);
    ASSERT_STREQ(r->seg[0], "api");
    ASSERT_STREQ(r->seg[1], "v1");
    ASSERT_STREQ(r->seg[2], "processes");
    ASSERT_STREQ(r->seg[3], "a/b");
    ASSERT_STREQ(r->seg[4], "x y");
    ASSERT_EQ(r->nheaders, 3);
    ASSERT_STREQ(http_header(r, "host"), "example");
    ASSERT_STREQ(http_header(r, "HOST"), "example");
    ASSERT_STREQ(http_header(r, "x-foo"), "bar baz");
    ASSERT_STREQ(http_header(r, "x-empty"), "");
    ASSERT(http_header(r, "x-missing") == NULL);
    ASSERT_STREQ(r->headers[0].name, "Host");
    ASSERT_EQ(r->body_len, 0);
    ASSERT_STREQ(r->body, "");
    ASSERT(r->keep_alive);
    http__parser_free(&p);
}

TEST(http_parse_basic)
{
    check_basic(0);
}

TEST(http_parse_byte_by_byte)
{
    check_basic(1);
    check_basic(7);
}

TEST(http_parse_methods_and_body)
{
    struct http_parser p;
    http__parser_init(&p, 1024);
    ASSERT_EQ(feed_str(&p, "POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 3),
              HTTP_P_REQUEST);
    ASSERT_EQ(p.req.method, HTTP_M_POST);
    ASSERT_EQ(p.req.body_len, 5);
    ASSERT_STREQ(p.req.body, "hello");
    http__parser_next(&p);
    ASSERT_EQ(feed_str(&p, "DELETE /x HTTP/1.1\r\n\r\n", 0), HTTP_P_REQUEST);
    ASSERT_EQ(p.req.method, HTTP_M_DELETE);
    http__parser_next(&p);
    ASSERT_EQ(feed_str(&p, "PATCH / HTTP/1.1\r\n\r\n", 0), HTTP_P_REQUEST);
    ASSERT_EQ(p.req.method, HTTP_M_PATCH);
    ASSERT_EQ(p.req.nseg, 0);
    ASSERT_STREQ(p.req.path, "/");
    ASSERT_STREQ(p.req.query, "");
    http__parser_next(&p);
    ASSERT_EQ(feed_str(&p, "PROPFIND /x HTTP/1.1\r\n\r\n", 0), HTTP_P_REQUEST);
    ASSERT_EQ(p.req.method, HTTP_M_OTHER);
    ASSERT_STREQ(p.req.method_str, "PROPFIND");
    http__parser_next(&p);
    /* absolute-form target */
    ASSERT_EQ(feed_str(&p, "GET http://h:1/a/b?q=1 HTTP/1.1\r\n\r\n", 0), HTTP_P_REQUEST);
    ASSERT_STREQ(p.req.path, "/a/b");
    ASSERT_STREQ(p.req.query, "q=1");
    ASSERT_EQ(p.req.nseg, 2);
    http__parser_free(&p);
}

TEST(http_parse_segments)
{
    struct http_req r;
    memset(&r, 0, sizeof(r));
    http__split_path(&r, "/");
    ASSERT_EQ(r.nseg, 0);
    http__split_path(&r, "/a//b/");
    ASSERT_EQ(r.nseg, 3);
    ASSERT_STREQ(r.seg[0], "a");
    ASSERT_STREQ(r.seg[1], "");
    ASSERT_STREQ(r.seg[2], "b");
    for (int i = 0; i < r.nseg; i++)
        free(r.seg[i]);
    http__split_path(&r, "/a/b%2");
    ASSERT_EQ(r.nseg, -1);
    http__split_path(&r, "/a/%zz");
    ASSERT_EQ(r.nseg, -1);
    http__split_path(&r, "/a/%00");
    ASSERT_EQ(r.nseg, -1);
    http__split_path(&r, "/1/2/3/4/5/6/7/8");
    ASSERT_EQ(r.nseg, 8);
    for (int i = 0; i < r.nseg; i++)
        free(r.seg[i]);
    http__split_path(&r, "/1/2/3/4/5/6/7/8/9");
    ASSERT_EQ(r.nseg, -1);
    for (int i = 0; i < HTTP_MAX_SEGS; i++)
        ASSERT(r.seg[i] == NULL);

    struct http_parser p;
    http__parser_init(&p, 1024);
    ASSERT_EQ(feed_str(&p, "GET /a/%G1/c HTTP/1.1\r\n\r\n", 0), HTTP_P_REQUEST);
    ASSERT_EQ(p.req.nseg, -1);
    ASSERT_STREQ(p.req.path, "/a/%G1/c");
    http__parser_free(&p);
}

TEST(http_parse_chunked_body)
{
    struct http_parser p;
    const char *req = "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                      "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n";
    for (size_t step = 0; step < 4; step++) {
        http__parser_init(&p, 1024);
        ASSERT_EQ(feed_str(&p, req, step), HTTP_P_REQUEST);
        ASSERT_EQ(p.req.body_len, 11);
        ASSERT_STREQ(p.req.body, "hello world");
        ASSERT(http_header(&p.req, "x-trailer") == NULL);  /* trailers dropped */
        http__parser_free(&p);
    }
}

TEST(http_parse_pipelined)
{
    struct http_parser p;
    const char *two = "GET /one HTTP/1.1\r\n\r\nPOST /two HTTP/1.1\r\nContent-Length: 2\r\n\r\nok";
    size_t used;
    http__parser_init(&p, 1024);
    ASSERT_EQ(feed(&p, two, strlen(two), 0, &used), HTTP_P_REQUEST);
    ASSERT_STREQ(p.req.path, "/one");
    ASSERT(used < strlen(two));
    http__parser_next(&p);
    size_t used2;
    ASSERT_EQ(feed(&p, two + used, strlen(two) - used, 0, &used2), HTTP_P_REQUEST);
    ASSERT_EQ(used + used2, strlen(two));
    ASSERT_STREQ(p.req.path, "/two");
    ASSERT_STREQ(p.req.body, "ok");
    http__parser_free(&p);
}

TEST(http_parse_keep_alive_rules)
{
    struct http_parser p;
    http__parser_init(&p, 1024);
    ASSERT_EQ(feed_str(&p, "GET / HTTP/1.0\r\n\r\n", 0), HTTP_P_REQUEST);
    ASSERT(!p.req.keep_alive);
    ASSERT(p.http10);
    http__parser_free(&p);

    http__parser_init(&p, 1024);
    ASSERT_EQ(feed_str(&p, "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 0),
              HTTP_P_REQUEST);
    ASSERT(p.req.keep_alive);
    http__parser_free(&p);

    http__parser_init(&p, 1024);
    ASSERT_EQ(feed_str(&p, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 0), HTTP_P_REQUEST);
    ASSERT(!p.req.keep_alive);
    ASSERT(!p.http10);
    http__parser_free(&p);
}

TEST(http_parse_limits)
{
    struct http_parser p;
    struct sbuf sb = SBUF_INIT;

    /* HTTP_MAX_HEADERS headers are fine, one more is 431. */
    sbuf_puts(&sb, "GET / HTTP/1.1\r\n");
    for (int i = 0; i < HTTP_MAX_HEADERS; i++)
        sbuf_printf(&sb, "X-H%d: %d\r\n", i, i);
    size_t at = sb.len;
    sbuf_puts(&sb, "\r\n");
    http__parser_init(&p, 1024);
    ASSERT_EQ(feed_str(&p, sb.buf, 0), HTTP_P_REQUEST);
    ASSERT_EQ(p.req.nheaders, HTTP_MAX_HEADERS);
    ASSERT_STREQ(http_header(&p.req, "x-h63"), "63");
    http__parser_free(&p);
    sb.len = at;
    sbuf_puts(&sb, "X-Last: 1\r\n\r\n");
    http__parser_init(&p, 1024);
    ASSERT_EQ(feed_str(&p, sb.buf, 0), HTTP_P_ERROR);
    ASSERT_EQ(p.err_status, 431);
    http__parser_free(&p);

    /* A header section over HTTP_MAX_HEADER_BYTES, at once or byte by byte. */
    sbuf_reset(&sb);
    sbuf_puts(&sb, "GET / HTTP/1.1\r\nX-Big: ");
    for (int i = 0; i < HTTP_MAX_HEADER_BYTES; i++)
        sbuf_putc(&sb, 'a');
    sbuf_puts(&sb, "\r\n\r\n");
    for (size_t step = 0; step < 2; step++) {
        http__parser_init(&p, 1024);
        ASSERT_EQ(feed_str(&p, sb.buf, step), HTTP_P_ERROR);
        ASSERT_EQ(p.err_status, 431);
        http__parser_free(&p);
    }

    /* Content-Length over max_body: 413 as soon as the headers are in. */
    http__parser_init(&p, 10);
    ASSERT_EQ(feed_str(&p, "POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", 0), HTTP_P_ERROR);
    ASSERT_EQ(p.err_status, 413);
    ASSERT_STREQ(p.err_code, "PAYLOAD_TOO_LARGE");
    http__parser_free(&p);
    http__parser_init(&p, 10);
    ASSERT_EQ(feed_str(&p, "POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789", 0),
              HTTP_P_REQUEST);
    http__parser_free(&p);
    /* Chunked: counted while it arrives. */
    http__parser_init(&p, 10);
    ASSERT_EQ(feed_str(&p, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                           "6\r\nabcdef\r\n6\r\nabcdef\r\n0\r\n\r\n", 0),
              HTTP_P_ERROR);
    ASSERT_EQ(p.err_status, 413);
    http__parser_free(&p);

    /* Malformed. */
    http__parser_init(&p, 10);
    ASSERT_EQ(feed_str(&p, "GET / HTTP/1.1\r\nBad Header\r\n\r\n", 0), HTTP_P_ERROR);
    ASSERT_EQ(p.err_status, 400);
    http__parser_free(&p);
    http__parser_init(&p, 10);
    ASSERT_EQ(feed_str(&p, "\x01GARBAGE\r\n\r\n", 0), HTTP_P_ERROR);
    ASSERT_EQ(p.err_status, 400);
    http__parser_free(&p);
    http__parser_init(&p, 10);
    ASSERT_EQ(feed_str(&p, "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: "
                           "chunked\r\n\r\n", 0),
              HTTP_P_ERROR);
    ASSERT_EQ(p.err_status, 400);
    http__parser_free(&p);
    sbuf_free(&sb);
}

TEST(http_parse_expect_continue)
{
    struct http_parser p;
    const char *req = "POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n";
    size_t used;
    http__parser_init(&p, 10);
    ASSERT_EQ(http__parser_feed(&p, req, strlen(req), &used), HTTP_P_HEADERS);
    ASSERT_EQ(used, strlen(req));
    ASSERT(p.expect_continue);
    ASSERT_EQ(http__parser_feed(&p, "", 0, &used), HTTP_P_MORE);
    ASSERT_EQ(http__parser_feed(&p, "abc", 3, &used), HTTP_P_REQUEST);
    ASSERT_STREQ(p.req.body, "abc");
    http__parser_free(&p);
}

TEST(http_status_texts)
{
    ASSERT_STREQ(http_status_text(200), "OK");
    ASSERT_STREQ(http_status_text(404), "Not Found");
    ASSERT_STREQ(http_status_text(431), "Request Header Fields Too Large");
    ASSERT_STREQ(http_status_text(499), "Client Error");
}

/* ======================= real server ======================= */

struct env {
    uv_loop_t loop;
    struct http_server *srv;
    int port;
    uv_async_t done;
    bool stopped;
    _Atomic bool stopping;
    _Atomic int aborts;
    _Atomic int aborts_before_stop;
    _Atomic int drains;
    _Atomic int handled;
    atomic_flag signalled;
};
static struct env E;

/* ---- handler side (loop thread) ---- */

struct job {
    uv_timer_t t;
    struct http_req *r;
    int n;
    size_t sent;
    size_t total;
    bool waiting_drain;
};

static void job_closed(uv_handle_t *h)
{
    free(h->data);
}

static void job_end(struct job *j)
{
    uv_close((uv_handle_t *)&j->t, job_closed);
}

static struct job *job_new(struct http_req *r)
{
    struct job *j = xcalloc(1, sizeof(*j));
    j->r = r;
    uv_timer_init(&E.loop, &j->t);
    j->t.data = j;
    return j;
}

static void on_abort_job(struct http_req *r, void *arg)
{
    struct job *j = arg;
    E.aborts++;
    if (!E.stopping)
        E.aborts_before_stop++;
    if (j != NULL)
        job_end(j);
}

static void echo(struct http_req *r)
{
    struct sbuf sb = SBUF_INIT;
    sbuf_printf(&sb, "%s %s %s %d", r->method_str, r->path, r->query, r->nseg);
    for (int i = 0; i < r->nseg; i++)
        sbuf_printf(&sb, " %s", r->seg[i]);
    sbuf_printf(&sb, " [%.*s]", (int)r->body_len, r->body);
    http_reply(r, 200, "text/plain", "X-Test: 1\r\n", sb.buf, sb.len);
    sbuf_free(&sb);
}

static void on_async_reply(uv_timer_t *t)
{
    struct job *j = t->data;
    char buf[128];
    int n = snprintf(buf, sizeof(buf), "async %s", j->r->path);
    http_reply(j->r, 200, "text/plain", NULL, buf, (size_t)n);
    job_end(j);
}

/* Five events, alternating http_stream_write and reserve/commit (with a short commit and an
 * empty one), one per timer tick; then the end. */
static void on_stream_tick(uv_timer_t *t)
{
    struct job *j = t->data;
    char line[64];
    int n = snprintf(line, sizeof(line), "data: event %d\n\n", j->n);
    if (j->n % 2 == 0) {
        http_stream_write(j->r, line, (size_t)n);
    } else {
        char *p = http_stream_reserve(j->r, 300);
        memcpy(p, line, (size_t)n);
        http_stream_commit(j->r, (size_t)n);
        http_stream_reserve(j->r, 10);
        http_stream_commit(j->r, 0);
    }
    if (++j->n == 5) {
        uv_timer_stop(&j->t);
        http_stream_end(j->r);
        job_end(j);
    }
}

static void on_forever_tick(uv_timer_t *t)
{
    struct job *j = t->data;
    http_stream_write(j->r, "data: x\n\n", 9);
}

static const char pattern[] = "abcdefghijklmnopqrstuvwxyz";

/* Produces j->total bytes of the repeating alphabet in 64 KiB chunks, pausing at
 * HTTP_STREAM_HIGH until on_drain (total 0: forever). */
static void big_produce(struct job *j)
{
    while (j->total == 0 || j->sent < j->total) {
        if (http_stream_queued(j->r) >= HTTP_STREAM_HIGH) {
            j->waiting_drain = true;
            return;
        }
        size_t n = 65536;
        if (j->total != 0)
            n = MIN(n, j->total - j->sent);
        char *p = http_stream_reserve(j->r, n);
        for (size_t i = 0; i < n; i++)
            p[i] = pattern[(j->sent + i) % 26];
        http_stream_commit(j->r, n);
        j->sent += n;
    }
    http_stream_end(j->r);
    job_end(j);
}

static void on_big_drain(struct http_req *r, void *arg)
{
    struct job *j = arg;
    E.drains++;
    ASSERT(j->waiting_drain);
    ASSERT(http_stream_queued(r) < HTTP_STREAM_HIGH / 4);
    j->waiting_drain = false;
    big_produce(j);
}

static const struct http_stream_ops big_ops = {.on_drain = on_big_drain};

static struct http_req *orphan_req;

static void on_orphan_reply(uv_timer_t *t)
{
    http_reply(orphan_req, 200, "text/plain", NULL, "late", 4);
    orphan_req = NULL;
    uv_close((uv_handle_t *)t, job_closed);
}

static void handler(struct http_req *r, void *arg)
{
    const char *what = r->nseg > 0 ? r->seg[0] : "";
    E.handled++;
    if (strcmp(what, "echo") == 0) {
        echo(r);
    } else if (strcmp(what, "error") == 0) {
        http_reply_error(r, 404, "NOT_FOUND", "no \"such\" thing %d", 7);
    } else if (strcmp(what, "empty") == 0) {
        http_reply_empty(r, 204);
    } else if (strcmp(what, "async") == 0) {
        struct job *j = job_new(r);
        http_req_on_abort(r, on_abort_job, j);
        uv_timer_start(&j->t, on_async_reply, 100, 0);
    } else if (strcmp(what, "stream") == 0) {
        struct job *j = job_new(r);
        http_req_on_abort(r, on_abort_job, j);
        http_stream_begin(r, 200, "text/event-stream", "Cache-Control: no-cache\r\n", NULL, NULL);
        uv_timer_start(&j->t, on_stream_tick, 10, 10);
    } else if (strcmp(what, "forever") == 0) {
        struct job *j = job_new(r);
        http_req_on_abort(r, on_abort_job, j);
        http_stream_begin(r, 200, "text/event-stream", NULL, NULL, NULL);
        uv_timer_start(&j->t, on_forever_tick, 5, 5);
    } else if (strcmp(what, "big") == 0) {
        struct job *j = job_new(r);
        j->total = r->nseg > 1 ? strtoul(r->seg[1], NULL, 10) : 0;
        http_req_on_abort(r, on_abort_job, j);
        http_stream_begin(r, 200, "application/octet-stream", NULL, &big_ops, j);
        big_produce(j);
    } else if (strcmp(what, "pending") == 0) {
        http_req_on_abort(r, on_abort_job, NULL);
    } else if (strcmp(what, "orphan") == 0) {
        uv_timer_t *t = xcalloc(1, sizeof(*t));
        uv_timer_init(&E.loop, t);
        t->data = t;
        orphan_req = r;
        uv_timer_start(t, on_orphan_reply, 300, 0);
    } else {
        http_reply_error(r, 404, "NOT_FOUND", "no route");
    }
}

static void on_stopped(void *arg)
{
    E.stopped = true;
}

static void on_client_done(uv_async_t *a)
{
    E.stopping = true;
    http_server_stop(E.srv, on_stopped, NULL);
    uv_close((uv_handle_t *)a, NULL);
}

/* ---- client side (second thread) ---- */

/* Tells the loop thread the client is done: the server stops. Once only. */
static void signal_done(void)
{
    if (!atomic_flag_test_and_set(&E.signalled))
        uv_async_send(&E.done);
}

static void *client_main(void *arg)
{
    void (*fn)(void) = (void (*)(void))arg;
    fn();
    signal_done();
    return NULL;
}

static void run_server(struct http_config *cfg, void (*client)(void))
{
    pthread_t thr;
    memset(&E, 0, sizeof(E));
    ASSERT_EQ(uv_loop_init(&E.loop), 0);
    cfg->host = "127.0.0.1";
    cfg->port = 0;
    cfg->handler = handler;
    ASSERT_EQ(http_server_start(&E.loop, cfg, &E.srv, &E.port), 0);
    ASSERT(E.port > 0);
    ASSERT_EQ(uv_async_init(&E.loop, &E.done, on_client_done), 0);
    ASSERT_EQ(pthread_create(&thr, NULL, client_main, (void *)client), 0);
    ASSERT_EQ(uv_run(&E.loop, UV_RUN_DEFAULT), 0);
    ASSERT_EQ(pthread_join(thr, NULL), 0);
    ASSERT(E.stopped);
    ASSERT_EQ(uv_loop_close(&E.loop), 0);
}

static int cconnect_buf(int rcvbuf)
{
    struct sockaddr_in sin;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ASSERT(fd >= 0);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (rcvbuf > 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)E.port);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    return fd;
}

static int cconnect(void)
{
    return cconnect_buf(0);
}

static void csend(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
        ASSERT(w > 0);
        s += w;
        n -= (size_t)w;
    }
}

static void csends(int fd, const char *s)
{
    csend(fd, s, strlen(s));
}

static void set_rcvtimeo(int fd, int ms)
{
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

struct rd {
    int fd;
    char buf[65536];
    size_t pos, len;
};

static void rd_init(struct rd *r, int fd)
{
    r->fd = fd;
    r->pos = r->len = 0;
}

/* 1: data, 0: EOF, -1: error/timeout */
static int rd_fill(struct rd *r)
{
    if (r->pos < r->len)
        return 1;
    ssize_t n = recv(r->fd, r->buf, sizeof(r->buf), 0);
    if (n <= 0)
        return n == 0 ? 0 : -1;
    r->pos = 0;
    r->len = (size_t)n;
    return 1;
}

/* Reads a CRLF-terminated line (without CRLF) into sb; false at EOF. */
static bool rd_line(struct rd *r, struct sbuf *sb)
{
    sbuf_reset(sb);
    for (;;) {
        if (rd_fill(r) <= 0)
            return false;
        char c = r->buf[r->pos++];
        if (c == '\n') {
            ASSERT(sb->len > 0 && sb->buf[sb->len - 1] == '\r');
            sb->buf[--sb->len] = '\0';
            return true;
        }
        sbuf_putc(sb, c);
    }
}

static void rd_n(struct rd *r, struct sbuf *sb, size_t n)
{
    while (n > 0) {
        ASSERT_EQ(rd_fill(r), 1);
        size_t k = MIN(n, r->len - r->pos);
        sbuf_append(sb, r->buf + r->pos, k);
        r->pos += k;
        n -= k;
    }
}

/* 0: EOF now; 1: more data arrived; -1: timeout */
static int rd_eof(struct rd *r)
{
    return rd_fill(r);
}

struct resp {
    int status;
    struct sbuf head;     /* "\r\nName: value" lines */
    struct sbuf body;
    int nchunks;
};

static const char *resp_header(struct resp *p, const char *name)
{
    static char val[256];
    char pat[128];
    snprintf(pat, sizeof(pat), "\r\n%s: ", name);
    const char *h = strcasestr(p->head.buf != NULL ? p->head.buf : "", pat);
    if (h == NULL)
        return NULL;
    h += strlen(pat);
    size_t n = strcspn(h, "\r");
    snprintf(val, sizeof(val), "%.*s", (int)n, h);
    return val;
}

static void resp_free(struct resp *p)
{
    sbuf_free(&p->head);
    sbuf_free(&p->body);
}

/* Reads one response; checks the framing of chunked bodies strictly. */
static void read_resp(struct rd *r, struct resp *p, bool head_only)
{
    struct sbuf line = SBUF_INIT;
    memset(p, 0, sizeof(*p));
    ASSERT(rd_line(r, &line));
    ASSERT(strncmp(line.buf, "HTTP/1.1 ", 9) == 0);
    p->status = atoi(line.buf + 9);
    sbuf_puts(&p->head, "\r\n");
    for (;;) {
        ASSERT(rd_line(r, &line));
        if (line.len == 0)
            break;
        sbuf_printf(&p->head, "%s\r\n", line.buf);
    }
    sbuf_puts(&p->body, "");
    if (head_only || p->status < 200 || p->status == 204) {
        sbuf_free(&line);
        return;
    }
    const char *te = resp_header(p, "Transfer-Encoding");
    const char *cl = resp_header(p, "Content-Length");
    if (te != NULL) {
        ASSERT_STREQ(te, "chunked");
        ASSERT(cl == NULL);
        for (;;) {
            ASSERT(rd_line(r, &line));
            char *end;
            unsigned long n = strtoul(line.buf, &end, 16);
            ASSERT(end != line.buf && *end == '\0');
            if (n == 0) {
                ASSERT(rd_line(r, &line));
                ASSERT_EQ(line.len, 0);
                break;
            }
            rd_n(r, &p->body, n);
            p->nchunks++;
            struct sbuf crlf = SBUF_INIT;
            rd_n(r, &crlf, 2);
            ASSERT_MEMEQ(crlf.buf, "\r\n", 2);
            sbuf_free(&crlf);
        }
    } else if (cl != NULL) {
        rd_n(r, &p->body, strtoul(cl, NULL, 10));
    } else {
        while (rd_fill(r) == 1) {   /* close-delimited */
            sbuf_append(&p->body, r->buf + r->pos, r->len - r->pos);
            r->pos = r->len;
        }
    }
    sbuf_free(&line);
}

static void wait_for(_Atomic int *v, int want)
{
    for (int i = 0; i < 400 && *v < want; i++)
        usleep(10000);
}

/* ---- tests ---- */

static void client_keepalive(void)
{
    struct rd *r = xmalloc(sizeof(*r));
    struct resp p;
    int fd = cconnect();
    rd_init(r, fd);

    csends(fd, "GET /echo/a%2Fb?x=1 HTTP/1.1\r\nHost: t\r\n\r\n");
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 200);
    ASSERT_STREQ(p.body.buf, "GET /echo/a%2Fb x=1 2 echo a/b []");
    ASSERT_STREQ(resp_header(&p, "Connection"), "keep-alive");
    ASSERT_STREQ(resp_header(&p, "Access-Control-Allow-Origin"), "*");
    ASSERT_STREQ(resp_header(&p, "Content-Type"), "text/plain");
    ASSERT_STREQ(resp_header(&p, "Content-Length"), "33");
    ASSERT_STREQ(resp_header(&p, "X-Test"), "1");
    resp_free(&p);

    csends(fd, "POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
    read_resp(r, &p, false);
    ASSERT_STREQ(p.body.buf, "POST /echo  1 echo [hello]");
    resp_free(&p);

    csends(fd, "GET /error HTTP/1.1\r\n\r\n");
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 404);
    ASSERT_STREQ(resp_header(&p, "Content-Type"), "application/json");
    ASSERT_STREQ(p.body.buf, "{\"error\":\"no \\\"such\\\" thing 7\",\"code\":\"NOT_FOUND\"}");
    resp_free(&p);

    csends(fd, "GET /empty HTTP/1.1\r\n\r\n");
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 204);
    ASSERT(resp_header(&p, "Content-Length") == NULL);
    resp_free(&p);

    csends(fd, "HEAD /echo HTTP/1.1\r\n\r\n");
    read_resp(r, &p, true);
    ASSERT_EQ(p.status, 200);
    ASSERT_STREQ(resp_header(&p, "Content-Length"), "21");
    resp_free(&p);

    csends(fd, "GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n");
    read_resp(r, &p, false);   /* would see the HEAD body here if one had been sent */
    ASSERT_STREQ(p.body.buf, "GET /echo  1 echo []");
    ASSERT_STREQ(resp_header(&p, "Connection"), "close");
    resp_free(&p);
    ASSERT_EQ(rd_eof(r), 0);
    close(fd);
    free(r);
}

TEST(http_server_keepalive)
{
    struct http_config cfg = {0};
    run_server(&cfg, client_keepalive);
    ASSERT_EQ(E.handled, 6);
}

static void client_pipelined(void)
{
    struct rd *r = xmalloc(sizeof(*r));
    struct resp p;
    int fd = cconnect();
    rd_init(r, fd);
    /* The first answer comes 100 ms later, from a timer; the second must still follow it. */
    csends(fd, "GET /async/1 HTTP/1.1\r\n\r\nPOST /echo/2 HTTP/1.1\r\nContent-Length: 3\r\n\r\n"
               "abcGET /async/3 HTTP/1.1\r\n\r\nGET /echo/4 HTTP/1.1\r\nConnection: close\r\n\r\n");
    read_resp(r, &p, false);
    ASSERT_STREQ(p.body.buf, "async /async/1");
    resp_free(&p);
    read_resp(r, &p, false);
    ASSERT_STREQ(p.body.buf, "POST /echo/2  2 echo 2 [abc]");
    resp_free(&p);
    read_resp(r, &p, false);
    ASSERT_STREQ(p.body.buf, "async /async/3");
    resp_free(&p);
    read_resp(r, &p, false);
    ASSERT_STREQ(p.body.buf, "GET /echo/4  2 echo 4 []");
    resp_free(&p);
    ASSERT_EQ(rd_eof(r), 0);
    close(fd);
    free(r);
}

TEST(http_server_pipelined)
{
    struct http_config cfg = {0};
    run_server(&cfg, client_pipelined);
    ASSERT_EQ(E.handled, 4);
    ASSERT_EQ(E.aborts, 0);
}

static void client_431(void)
{
    struct rd *r = xmalloc(sizeof(*r));
    struct resp p;
    struct sbuf sb = SBUF_INIT;
    int fd = cconnect();
    rd_init(r, fd);
    sbuf_puts(&sb, "GET /echo HTTP/1.1\r\n");
    for (int i = 0; i < HTTP_MAX_HEADERS + 1; i++)
        sbuf_printf(&sb, "X-H%d: v\r\n", i);
    sbuf_puts(&sb, "\r\n");
    csend(fd, sb.buf, sb.len);
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 431);
    ASSERT_STREQ(resp_header(&p, "Connection"), "close");
    ASSERT_STREQ(resp_header(&p, "Content-Type"), "application/json");
    ASSERT(strstr(p.body.buf, "\"error\":") != NULL);
    resp_free(&p);
    ASSERT_EQ(rd_eof(r), 0);
    close(fd);

    /* Oversized header section, no final CRLF ever sent. */
    fd = cconnect();
    rd_init(r, fd);
    sbuf_reset(&sb);
    sbuf_puts(&sb, "GET /echo HTTP/1.1\r\nX-Big: ");
    for (int i = 0; i < HTTP_MAX_HEADER_BYTES + 100; i++)
        sbuf_putc(&sb, 'x');
    csend(fd, sb.buf, sb.len);
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 431);
    resp_free(&p);
    ASSERT_EQ(rd_eof(r), 0);
    close(fd);

    /* Malformed request: 400 and close. */
    fd = cconnect();
    rd_init(r, fd);
    csends(fd, "GET /echo HTTP/1.1\r\nNo colon here\r\n\r\n");
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 400);
    ASSERT(strstr(p.body.buf, "BAD_REQUEST") != NULL);
    resp_free(&p);
    ASSERT_EQ(rd_eof(r), 0);
    close(fd);
    sbuf_free(&sb);
    free(r);
}

TEST(http_server_431_400)
{
    struct http_config cfg = {0};
    run_server(&cfg, client_431);
    ASSERT_EQ(E.handled, 0);
}

static void client_413(void)
{
    struct rd *r = xmalloc(sizeof(*r));
    struct resp p;
    char *body = xmalloc(200000);
    memset(body, 'b', 200000);
    int fd = cconnect();
    rd_init(r, fd);

    /* Content-Length over the limit: refused up front; the body we still send is drained. */
    csends(fd, "POST /echo HTTP/1.1\r\nContent-Length: 200000\r\n\r\n");
    csend(fd, body, 200000);
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 413);
    ASSERT_STREQ(resp_header(&p, "Content-Type"), "application/json");
    ASSERT_STREQ(resp_header(&p, "Connection"), "close");
    ASSERT(strstr(p.body.buf, "\"code\":\"PAYLOAD_TOO_LARGE\"") != NULL);
    resp_free(&p);
    ASSERT_EQ(rd_eof(r), 0);
    close(fd);

    /* Chunked: refused once the running total passes the limit. */
    fd = cconnect();
    rd_init(r, fd);
    csends(fd, "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (int i = 0; i < 3; i++) {
        csends(fd, "200\r\n");
        csend(fd, body, 512);
        csends(fd, "\r\n");
    }
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 413);
    ASSERT(strstr(p.body.buf, "PAYLOAD_TOO_LARGE") != NULL);
    resp_free(&p);
    ASSERT_EQ(rd_eof(r), 0);
    close(fd);

    /* Chunked under the limit is assembled. */
    fd = cconnect();
    rd_init(r, fd);
    csends(fd, "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               "5\r\nhello\r\n");
    usleep(20000);
    csends(fd, "6\r\n world\r\n0\r\n\r\n");
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 200);
    ASSERT_STREQ(p.body.buf, "POST /echo  1 echo [hello world]");
    resp_free(&p);

    /* Expect: 100-continue */
    csends(fd, "POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n");
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 100);
    resp_free(&p);
    csends(fd, "abcd");
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 200);
    ASSERT_STREQ(p.body.buf, "POST /echo  1 echo [abcd]");
    resp_free(&p);
    close(fd);
    free(body);
    free(r);
}

TEST(http_server_413_chunked_continue)
{
    struct http_config cfg = {.max_body = 1000};
    run_server(&cfg, client_413);
    ASSERT_EQ(E.handled, 2);
}

static void client_stream(void)
{
    struct rd *r = xmalloc(sizeof(*r));
    struct resp p;
    int fd = cconnect();
    rd_init(r, fd);
    csends(fd, "GET /stream HTTP/1.1\r\n\r\n");
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 200);
    ASSERT_STREQ(resp_header(&p, "Content-Type"), "text/event-stream");
    ASSERT_STREQ(resp_header(&p, "Cache-Control"), "no-cache");
    ASSERT_STREQ(resp_header(&p, "Connection"), "keep-alive");
    ASSERT_STREQ(p.body.buf, "data: event 0\n\ndata: event 1\n\ndata: event 2\n\n"
                             "data: event 3\n\ndata: event 4\n\n");
    ASSERT(p.nchunks >= 1);
    resp_free(&p);

    /* HEAD on a stream: headers only, the connection stays usable. */
    csends(fd, "HEAD /stream HTTP/1.1\r\n\r\n");
    read_resp(r, &p, true);
    ASSERT_STREQ(resp_header(&p, "Transfer-Encoding"), "chunked");
    resp_free(&p);

    /* Keep-alive after streams, and a large stream with backpressure. */
    csends(fd, "GET /big/5000000 HTTP/1.1\r\n\r\n");
    read_resp(r, &p, false);
    ASSERT_EQ(p.body.len, 5000000);
    for (size_t i = 0; i < p.body.len; i++)
        if (p.body.buf[i] != pattern[i % 26])
            ASSERT(0);
    resp_free(&p);
    close(fd);

    /* HTTP/1.0: no chunking, the body ends with the connection. */
    fd = cconnect();
    rd_init(r, fd);
    csends(fd, "GET /stream HTTP/1.0\r\n\r\n");
    read_resp(r, &p, false);
    ASSERT(resp_header(&p, "Transfer-Encoding") == NULL);
    ASSERT_STREQ(resp_header(&p, "Connection"), "close");
    ASSERT_STREQ(p.body.buf, "data: event 0\n\ndata: event 1\n\ndata: event 2\n\n"
                             "data: event 3\n\ndata: event 4\n\n");
    resp_free(&p);
    close(fd);
    free(r);
}

TEST(http_server_stream)
{
    struct http_config cfg = {0};
    run_server(&cfg, client_stream);
    ASSERT(E.drains > 0);
    ASSERT_EQ(E.aborts, 0);
}

static void client_disconnect(void)
{
    struct rd *r = xmalloc(sizeof(*r));
    struct sbuf line = SBUF_INIT;

    /* Mid-stream. */
    int fd = cconnect();
    rd_init(r, fd);
    csends(fd, "GET /forever HTTP/1.1\r\n\r\n");
    ASSERT(rd_line(r, &line));
    ASSERT_STREQ(line.buf, "HTTP/1.1 200 OK");
    do
        ASSERT(rd_line(r, &line));
    while (line.len > 0);
    ASSERT(rd_line(r, &line));      /* first chunk size */
    close(fd);
    wait_for(&E.aborts_before_stop, 1);
    ASSERT_EQ(E.aborts_before_stop, 1);

    /* Pending (handler holds the request, no answer yet). */
    fd = cconnect();
    csends(fd, "GET /pending HTTP/1.1\r\n\r\n");
    wait_for(&E.handled, 2);
    close(fd);
    wait_for(&E.aborts_before_stop, 2);
    ASSERT_EQ(E.aborts_before_stop, 2);

    /* No abort callback: the late answer must not touch freed memory (ASan). */
    fd = cconnect();
    csends(fd, "GET /orphan HTTP/1.1\r\n\r\n");
    wait_for(&E.handled, 3);
    close(fd);
    usleep(500000);

    /* Pending at server stop: aborted by the stop. */
    fd = cconnect();
    rd_init(r, fd);
    csends(fd, "GET /pending HTTP/1.1\r\n\r\n");
    wait_for(&E.handled, 4);
    signal_done();
    ASSERT_EQ(rd_eof(r), 0);
    close(fd);
    sbuf_free(&line);
    free(r);
}

TEST(http_server_disconnect_aborts)
{
    struct http_config cfg = {0};
    run_server(&cfg, client_disconnect);
    ASSERT_EQ(E.aborts_before_stop, 2);
    ASSERT_EQ(E.aborts, 3);
    ASSERT(orphan_req == NULL);
}

static void client_timeouts(void)
{
    struct rd *r = xmalloc(sizeof(*r));
    struct resp p;

    /* Slowloris: an unfinished header section is cut off after header_timeout_ms. */
    uint64_t t0 = mono_ms();
    int fd = cconnect();
    rd_init(r, fd);
    csends(fd, "GET /echo HTTP/1.1\r\nHost: x\r\n");
    usleep(100000);
    csends(fd, "X-More: 1\r\n");    /* trickling bytes does not extend the deadline */
    ASSERT_EQ(rd_eof(r), 0);
    uint64_t dt = mono_ms() - t0;
    ASSERT(dt >= 250 && dt < 2000);
    close(fd);

    /* A connection that never sends anything. */
    t0 = mono_ms();
    fd = cconnect();
    rd_init(r, fd);
    ASSERT_EQ(rd_eof(r), 0);
    ASSERT(mono_ms() - t0 < 2000);
    close(fd);

    /* Idle keep-alive connection. */
    fd = cconnect();
    rd_init(r, fd);
    csends(fd, "GET /echo HTTP/1.1\r\n\r\n");
    read_resp(r, &p, false);
    ASSERT_EQ(p.status, 200);
    resp_free(&p);
    t0 = mono_ms();
    ASSERT_EQ(rd_eof(r), 0);
    dt = mono_ms() - t0;
    ASSERT(dt >= 400 && dt < 2000);
    close(fd);

    /* Write deadline: a client that stops reading is dropped, the stream aborted. */
    fd = cconnect_buf(4096);
    csends(fd, "GET /big HTTP/1.1\r\n\r\n");
    wait_for(&E.aborts_before_stop, 1);
    ASSERT_EQ(E.aborts_before_stop, 1);
    close(fd);
    free(r);
}

TEST_TIMEOUT(http_server_timeouts, 20)
{
    struct http_config cfg = {.header_timeout_ms = 300, .idle_timeout_ms = 500,
                              .write_timeout_ms = 300};
    run_server(&cfg, client_timeouts);
}

static void client_max_conns(void)
{
    struct rd *r1 = xmalloc(sizeof(*r1)), *r2 = xmalloc(sizeof(*r2));
    struct resp p;
    int a = cconnect();
    rd_init(r1, a);
    csends(a, "GET /echo/a HTTP/1.1\r\n\r\n");
    read_resp(r1, &p, false);
    ASSERT_EQ(p.status, 200);
    resp_free(&p);

    /* Second connection: the kernel completes the handshake, the server does not accept. */
    int b = cconnect();
    rd_init(r2, b);
    csends(b, "GET /echo/b HTTP/1.1\r\n\r\n");
    set_rcvtimeo(b, 300);
    ASSERT_EQ(rd_fill(r2), -1);
    set_rcvtimeo(b, 5000);
    close(a);
    read_resp(r2, &p, false);
    ASSERT_STREQ(p.body.buf, "GET /echo/b  2 echo b []");
    resp_free(&p);
    close(b);
    free(r1);
    free(r2);
}

TEST(http_server_max_conns)
{
    struct http_config cfg = {.max_conns = 1};
    run_server(&cfg, client_max_conns);
    ASSERT_EQ(E.handled, 2);
}

TEST(http_server_bad_listen)
{
    uv_loop_t loop;
    struct http_server *s;
    int port;
    struct http_config cfg = {.host = "not-an-ip", .handler = handler};
    ASSERT_EQ(uv_loop_init(&loop), 0);
    ASSERT_EQ(http_server_start(&loop, &cfg, &s, &port), UV_EINVAL);
    cfg.host = "::1";
    int rc = http_server_start(&loop, &cfg, &s, &port);
    if (rc == 0) {   /* IPv6 may be disabled in the sandbox */
        ASSERT(port > 0);
        http_server_stop(s, NULL, NULL);
        ASSERT_EQ(uv_run(&loop, UV_RUN_DEFAULT), 0);
    }
    ASSERT_EQ(uv_loop_close(&loop), 0);
}

static int csocket(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ASSERT(fd >= 0);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    return fd;
}

static void cconnect_fd(int fd)
{
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)E.port);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
}

static void client_emfile(void)
{
    struct rd *r = xmalloc(sizeof(*r));
    struct resp p;
    int a = csocket(), b = csocket();
    /* Room for one more descriptor: the server's conn for a. Its accept for b then fails
     * with EMFILE until a is gone. */
    int lowest = 0;
    while (fcntl(lowest, F_GETFD) >= 0)
        lowest++;
    struct rlimit rl;
    ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &rl), 0);
    rlim_t saved = rl.rlim_cur;
    rl.rlim_cur = (rlim_t)lowest + 1;
    ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &rl), 0);

    cconnect_fd(a);
    rd_init(r, a);
    csends(a, "GET /echo/a HTTP/1.1\r\n\r\n");
    read_resp(r, &p, false);
    ASSERT_STREQ(p.body.buf, "GET /echo/a  2 echo a []");
    resp_free(&p);

    cconnect_fd(b);
    rd_init(r, b);
    csends(b, "GET /echo/b HTTP/1.1\r\n\r\n");
    set_rcvtimeo(b, 400);
    ASSERT_EQ(rd_fill(r), -1);
    set_rcvtimeo(b, 5000);
    close(a);
    read_resp(r, &p, false);
    ASSERT_STREQ(p.body.buf, "GET /echo/b  2 echo b []");
    resp_free(&p);
    close(b);
    rl.rlim_cur = saved;
    ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &rl), 0);
    free(r);
}

TEST(http_server_emfile_backoff)
{
    struct http_config cfg = {0};
    const char *preload = getenv("LD_PRELOAD");
    if (preload != NULL && strstr(preload, "vgpreload") != NULL)
        return;   /* valgrind virtualizes RLIMIT_NOFILE and keeps fds of its own */
    run_server(&cfg, client_emfile);
    ASSERT_EQ(E.handled, 2);
}
