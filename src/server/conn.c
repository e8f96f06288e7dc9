/*
 * Connection lifecycle: read -> parse -> handler -> write -> next request, with one timer per
 * connection for every deadline (header, body, idle, write progress, linger).
 *
 * Reads go into the server's shared buffer and are parsed at once; only bytes that must wait
 * (pipelined requests behind one the handler still holds) are copied into c->in. Reading goes
 * on while a request is pending so that a client that goes away is noticed and the request
 * aborted; c->in is capped, past that reading stops until the request completes.
 *
 * Writes: c->out is filled by http/response.c, c->wr is on the wire. When the write
 * completes the two swap, so at most one write is in flight and everything queued in the
 * meantime leaves in one go. A write goes to the socket first (uv_try_write); only what it
 * does not take at once becomes a uv_write; one it takes whole completes at the next turn.
 * A request completes once its answer is queued and both buffers are empty; only then is
 * the next pipelined request parsed.
 *
 * Teardown (redis freeClientAsync, libuv close rules): srv__conn_close() marks the conn
 * closing, runs the abort callback of a pending request, and uv_close()s both handles; the
 * memory goes in the last close_cb. Calls that arrive while a handler may be on the stack
 * (a failed uv_write inside http_stream_write) only schedule the close (HTTP_T_CLOSE).
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "server/server.h"

#define IN_CAP (64 * 1024)        /* pipelined input kept while a request is pending */
#define KEEP_BUF 4096             /* idle conns keep buffers up to this size, free bigger */
#define LINGER_MS 2000
#define SHRINK_MS 1000

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);
static void on_timer(uv_timer_t *t);
static void on_close(uv_handle_t *h);
static void process_in(struct http_conn *c);

/* ---- helpers ---- */

static uint64_t now(const struct http_conn *c)
{
    return uv_now(c->tcp.loop);
}

static void timer_set(struct http_conn *c, enum http_tmode mode, uint64_t ms)
{
    c->tmode = (uint8_t)mode;
    if (mode == HTTP_T_NONE)
        uv_timer_stop(&c->timer);
    else
        uv_timer_start(&c->timer, on_timer, ms, 0);
}

/* Arms the timer for what the conn is waiting on now. Modes whose countdown is a deadline
 * (header) or measures progress (write) are left running when already set. */
static void timer_update(struct http_conn *c)
{
    enum http_tmode want;
    uint64_t ms = 0;

    if (c->closing || c->lingering || c->dying || c->tmode == HTTP_T_KICK)
        return;
    const struct http_config *cfg = &c->srv->cfg;
    if (c->writing) {
        want = HTTP_T_WRITE;
        ms = cfg->write_timeout_ms;
    } else if (c->rstate == HTTP_RS_NONE) {
        if (c->p.headers_done) {
            want = HTTP_T_BODY;
            ms = cfg->idle_timeout_ms;
        } else if (c->p.in_message || c->hdr_armed) {
            want = HTTP_T_HEADER;
            ms = c->hdr_deadline > now(c) ? c->hdr_deadline - now(c) : 0;
        } else {
            want = HTTP_T_IDLE;
            ms = cfg->idle_timeout_ms;
        }
    } else if (c->rstate == HTTP_RS_STREAM && c->out.cap + c->wr.cap > 2 * KEEP_BUF) {
        want = HTTP_T_SHRINK;
        ms = SHRINK_MS;
    } else {
        want = HTTP_T_NONE;
    }
    if (want == c->tmode)
        return;
    if (want == HTTP_T_WRITE)
        c->last_progress = now(c);
    timer_set(c, want, ms);
}

static void read_start(struct http_conn *c)
{
    if (c->reading || c->closing || c->peer_eof)
        return;
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0)
        c->reading = true;
}

static void read_stop(struct http_conn *c)
{
    if (!c->reading)
        return;
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = false;
}

static void shrink(struct sbuf *sb)
{
    if (sb->cap > KEEP_BUF)
        sbuf_free(sb);
}

static void conn_free(struct http_conn *c)
{
    http__parser_free(&c->p);
    sbuf_free(&c->in);
    sbuf_free(&c->out);
    sbuf_free(&c->wr);
    free(c);
}

static void close_later(struct http_conn *c)
{
    if (c->closing || c->dying)
        return;
    c->dying = true;
    timer_set(c, HTTP_T_CLOSE, 0);
}

/* ---- lifecycle ---- */

void srv__conn_new(struct http_server *s, int fd)
{
    struct http_conn *c = xcalloc(1, sizeof(*c));
    int rc;

    c->srv = s;
    c->id = ++s->next_id;
    uv_tcp_init(s->loop, &c->tcp);
    uv_timer_init(s->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->nopen = 2;
    s->nhandles += 2;
    list_insert_tail(&s->conns, &c->link);
    s->nconns++;
    http__parser_init(&c->p, s->cfg.max_body);
    c->p.req.conn = c;
    c->p.req.conn_id = c->id;

    rc = uv_tcp_open(&c->tcp, fd);
    if (rc < 0) {
        log_warnx("conn %llu: uv_tcp_open: %s", (unsigned long long)c->id, uv_strerror(rc));
        close(fd);
        srv__conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    /* A fresh connection must send its first header section within header_timeout_ms. */
    c->hdr_armed = true;
    c->hdr_deadline = now(c) + s->cfg.header_timeout_ms;
    read_start(c);
    timer_update(c);
}

void srv__conn_close(struct http_conn *c)
{
    if (c->closing)
        return;
    struct http_server *s = c->srv;
    c->closing = true;
    list_remove(&c->link);
    s->nconns--;
    uv_close((uv_handle_t *)&c->tcp, on_close);
    uv_close((uv_handle_t *)&c->timer, on_close);
    if (c->rstate == HTTP_RS_PENDING || c->rstate == HTTP_RS_STREAM) {
        if (c->abort_cb != NULL) {
            void (*cb)(struct http_req *, void *) = c->abort_cb;
            c->abort_cb = NULL;
            c->rstate = HTTP_RS_ANSWERED;
            cb(&c->p.req, c->abort_arg);
        } else {
            c->orphan = true;
        }
    }
    srv__conn_gone(s);
}

static void on_close(uv_handle_t *h)
{
    struct http_conn *c = h->data;
    struct http_server *s = c->srv;
    if (--c->nopen == 0) {
        if (c->orphan)
            c->srv = NULL;   /* freed by the handler's answer */
        else
            conn_free(c);
    }
    srv__handle_closed(s);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    struct http_conn *c = container_of(req, struct http_conn, sreq);
    if (status < 0 && !c->closing)
        srv__conn_close(c);
}

/* Lingering close (nginx lingering_close, Apache lingering_close): after the last answer,
 * shut down our side and read until the client's EOF, so that unread input (a refused body,
 * pipelined requests) does not turn our close into a RST that destroys the answer. */
static void start_linger(struct http_conn *c)
{
    if (c->peer_eof) {
        srv__conn_close(c);
        return;
    }
    c->lingering = c->discard = true;
    if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown) < 0) {
        srv__conn_close(c);
        return;
    }
    read_start(c);
    timer_set(c, HTTP_T_LINGER, LINGER_MS);
}

/* The answer is queued and written: release the request, then go on with the next one. */
static void finish_request(struct http_conn *c)
{
    c->rstate = HTTP_RS_NONE;
    c->abort_cb = NULL;
    c->ops = NULL;
    c->above_high = false;
    c->hdr_armed = false;
    http__parser_next(&c->p);
    shrink(&c->out);
    shrink(&c->wr);
    /* A client that shut its write side sends no further request: done once answered. */
    if (!c->resp_keep_alive || c->peer_eof || c->srv->stopping) {
        start_linger(c);
        return;
    }
    if (c->in_pos < c->in.len)
        process_in(c);
    if (c->closing)
        return;
    if (c->rstate == HTTP_RS_NONE || c->in.len - c->in_pos < IN_CAP)
        read_start(c);
    timer_update(c);
}

static void maybe_finish(struct http_conn *c)
{
    if (c->rstate == HTTP_RS_ANSWERED && !c->writing && c->out.len == 0 && !c->closing)
        finish_request(c);
}

/* ---- writing ---- */

/* What follows a finished write: send what queued up meanwhile, let a stream that was held
 * for back-pressure go on, complete an answered request. Never runs inside a handler's call:
 * from on_write, or from the kick after a write the socket took at once. */
static void write_done(struct http_conn *c)
{
    c->last_progress = now(c);
    srv__conn_flush(c);
    if (c->closing)
        return;
    if (c->above_high && c->rstate == HTTP_RS_STREAM &&
        http_stream_queued(&c->p.req) < HTTP_STREAM_HIGH / 4) {
        c->above_high = false;
        if (c->ops != NULL && c->ops->on_drain != NULL)
            c->ops->on_drain(&c->p.req, c->ops_arg);
        if (c->closing)
            return;
    }
    maybe_finish(c);
}

static void on_write(uv_write_t *req, int status)
{
    struct http_conn *c = container_of(req, struct http_conn, wreq);

    c->writing = false;
    c->wr.len = 0;
    if (c->closing)
        return;
    if (status < 0) {
        log_debug("conn %llu: write: %s", (unsigned long long)c->id, uv_strerror(status));
        srv__conn_close(c);
        return;
    }
    write_done(c);
    if (!c->closing)
        timer_update(c);
}

void srv__conn_flush(struct http_conn *c)
{
    if (c->writing || c->out.len == 0 || c->closing || c->dying)
        return;
    struct sbuf t = c->wr;
    c->wr = c->out;
    c->out = t;
    c->out.len = 0;
    uv_buf_t b = uv_buf_init(c->wr.buf, (unsigned int)c->wr.len);
    /* The socket first: what it takes at once needs no write request. A uv_write that
     * completes costs libuv an epoll_ctl (uv__drain stops POLLOUT even when it was never
     * started): one syscall per answer, and per write of a stream. Such a write still
     * counts as in flight (c->writing, with c->wr empty) until the kick, in the next loop
     * turn, completes it as on_write would: what this turn queues meanwhile leaves in one
     * write then, as before. */
    int rc = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (rc == (int)b.len) {
        c->wr.len = 0;
        c->writing = true;
        srv__conn_kick(c, 0);
        return;
    }
    if (rc > 0) {
        b.base += rc;
        b.len -= (size_t)rc;
    } else if (rc != UV_EAGAIN) {
        log_debug("conn %llu: write: %s", (unsigned long long)c->id, uv_strerror(rc));
        c->wr.len = 0;
        close_later(c);
        return;
    }
    rc = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (rc < 0) {
        log_debug("conn %llu: uv_write: %s", (unsigned long long)c->id, uv_strerror(rc));
        c->wr.len = 0;
        close_later(c);
        return;
    }
    c->writing = true;
    c->last_wq = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
    if (c->tmode == HTTP_T_KICK)
        c->tmode = HTTP_T_NONE;  /* the kick's job is done; let the write timer take over */
    timer_update(c);
}

void srv__conn_kick(struct http_conn *c, uint64_t ms)
{
    if (c->closing || c->dying || c->lingering)
        return;
    uint64_t at = now(c) + ms;
    if (c->tmode == HTTP_T_KICK && c->kick_at <= at)
        return;
    c->kick_at = at;
    timer_set(c, HTTP_T_KICK, ms);
}

void srv__conn_answered(struct http_conn *c)
{
    c->rstate = HTTP_RS_ANSWERED;
    c->abort_cb = NULL;
    c->ops = NULL;
    if (c->orphan) {
        c->orphan = false;
        if (c->nopen == 0)
            conn_free(c);
        return;
    }
    if (c->closing)
        return;
    srv__conn_flush(c);
    /* Completion runs from on_write (or the kick), never inside the handler's call. */
    if (!c->writing)
        srv__conn_kick(c, 0);
}

/* ---- reading and parsing ---- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct http_conn *c = h->data;
    *buf = uv_buf_init(c->srv->rbuf, SRV_READ_BUF);
}

static void reply_parse_error(struct http_conn *c)
{
    struct sbuf body = SBUF_INIT;

    log_debug("conn %llu: %d %s", (unsigned long long)c->id, c->p.err_status, c->p.err_msg);
    http__format_error_body(&body, c->p.err_code, c->p.err_msg);
    c->head = false;
    c->resp_keep_alive = false;
    http__format_reply(c, c->p.err_status, "application/json", NULL, body.buf, body.len, false);
    sbuf_free(&body);
    c->discard = true;
    c->rstate = HTTP_RS_ANSWERED;
    srv__conn_flush(c);
}

static void dispatch(struct http_conn *c)
{
    struct http_server *s = c->srv;
    struct http_req *r = &c->p.req;

    c->rstate = HTTP_RS_PENDING;
    c->head = r->method == HTTP_M_HEAD;
    c->chunked = !c->p.http10;
    c->resp_keep_alive = false;
    if (s->stopping)
        r->keep_alive = false;
    timer_update(c);
    s->cfg.handler(r, s->cfg.handler_arg);
}

/* Feeds data to the parser until it wants more, a request is with the handler, or the input
 * is bad. Returns the bytes consumed; the rest waits for the current request to complete. */
static size_t process(struct http_conn *c, const char *data, size_t len)
{
    size_t total = 0;

    while (!c->closing && !c->discard && c->rstate == HTTP_RS_NONE) {
        size_t used = 0;
        enum http_parse_ev ev = http__parser_feed(&c->p, data + total, len - total, &used);
        total += used;
        if (c->p.in_message && !c->hdr_armed) {
            c->hdr_armed = true;
            c->hdr_deadline = now(c) + c->srv->cfg.header_timeout_ms;
        }
        switch (ev) {
        case HTTP_P_MORE:
            if (c->p.headers_done && !c->writing)
                timer_set(c, HTTP_T_BODY, c->srv->cfg.idle_timeout_ms);  /* progress */
            return total;
        case HTTP_P_HEADERS:
            if (c->p.expect_continue) {
                sbuf_puts(&c->out, "HTTP/1.1 100 Continue\r\n\r\n");
                srv__conn_flush(c);
            }
            break;  /* go on with the body, even if no byte of it is here yet */
        case HTTP_P_REQUEST:
            dispatch(c);
            break;
        case HTTP_P_ERROR:
            reply_parse_error(c);
            return len;
        }
    }
    return c->discard ? len : total;
}

static void process_in(struct http_conn *c)
{
    size_t n = process(c, c->in.buf + c->in_pos, c->in.len - c->in_pos);
    if (c->closing)
        return;
    c->in_pos += n;
    if (c->in_pos == c->in.len) {
        c->in_pos = 0;
        sbuf_reset(&c->in);
        shrink(&c->in);
    }
}

static void on_eof(struct http_conn *c, ssize_t err)
{
    if (err != UV_EOF)
        log_debug("conn %llu: read: %s", (unsigned long long)c->id, uv_strerror((int)err));
    c->peer_eof = true;
    c->reading = false;
    /* An answer being written still goes out (the client may only have shut its write side);
     * a request the handler still holds is aborted: the client is gone. */
    if (err == UV_EOF && c->rstate == HTTP_RS_ANSWERED && !c->lingering)
        return;
    srv__conn_close(c);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct http_conn *c = st->data;

    if (nread == 0 || c->closing)
        return;
    if (nread < 0) {
        on_eof(c, nread);
        return;
    }
    if (c->discard)
        return;
    size_t n = (size_t)nread;
    if (c->rstate != HTTP_RS_NONE || c->in_pos < c->in.len) {
        sbuf_append(&c->in, buf->base, n);
        if (c->rstate == HTTP_RS_NONE)
            process_in(c);
    } else {
        size_t used = process(c, buf->base, n);
        if (used < n && !c->closing && !c->discard)
            sbuf_append(&c->in, buf->base + used, n - used);
    }
    if (c->closing)
        return;
    if (c->in.len - c->in_pos >= IN_CAP)
        read_stop(c);
    timer_update(c);
}

/* ---- timer ---- */

static void on_timer(uv_timer_t *t)
{
    struct http_conn *c = t->data;
    enum http_tmode mode = c->tmode;
    uint64_t wt = c->srv->cfg.write_timeout_ms;

    c->tmode = HTTP_T_NONE;
    switch (mode) {
    case HTTP_T_NONE:
        break;
    case HTTP_T_HEADER:
        log_debug("conn %llu: header timeout", (unsigned long long)c->id);
        srv__conn_close(c);
        return;
    case HTTP_T_BODY:
    case HTTP_T_IDLE:
    case HTTP_T_LINGER:
    case HTTP_T_CLOSE:
        srv__conn_close(c);
        return;
    case HTTP_T_WRITE: {
        if (!c->writing)
            break;
        size_t wq = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
        if (wq != c->last_wq) {
            c->last_wq = wq;
            c->last_progress = now(c);
        }
        uint64_t idle = now(c) - c->last_progress;
        if (idle >= wt) {
            log_debug("conn %llu: write timeout", (unsigned long long)c->id);
            srv__conn_close(c);
            return;
        }
        timer_set(c, HTTP_T_WRITE, wt - idle);
        return;
    }
    case HTTP_T_SHRINK:
        if (!c->writing && c->out.len == 0 && !c->reserved) {
            sbuf_free(&c->out);
            sbuf_free(&c->wr);
        }
        return;
    case HTTP_T_KICK:
        if (c->writing && c->wr.len == 0)
            c->writing = false;   /* the socket took it at once: completed here */
        if (!c->writing) {
            write_done(c);
            if (c->closing)
                return;
        }
        break;
    }
    if (!c->closing)
        timer_update(c);
}
