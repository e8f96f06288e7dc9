/*
 * ostream: the output pump shared by every dialect's streaming answers (follow streams, the
 * run stream, whole-output GETs). It reads records from a process's obuf at its own cursor
 * and formats them into the HTTP stream through the dialect's ops.
 *
 * Why a cursor into the log and not a queue of live events: a follower that attaches late
 * gets the replay and the live tail from the same place, in one order, with no gap and no
 * duplicate; a follower that reads slowly falls behind in the file, costing no memory.
 *
 * Back-pressure: the answer of the request that started the process (ops->paces: a run's
 * stream) paces the child as a terminal would. When it falls more than OSTREAM_HOLD_HI
 * behind the log's end it holds the capture pipes (proc_hold) until it is within
 * OSTREAM_HOLD_LO again. Without it a producer faster than the client fills the log faster
 * than the reader drains it; the reader then falls out of the page cache and every byte is
 * written, dropped and read back from disk (measured: 250 MiB of disk reads per 256 MiB
 * stream, a third of the daemon's CPU). A reader that takes nothing for
 * OSTREAM_HOLD_PATIENCE_MS while holding (a stalled or dead client) lets go, and holds again
 * only after it has caught up, so it can never stop a process for good. Followers never
 * hold: a slow follower must not slow the child (reliability req. 13).
 *
 * It is not a parser of records (obuf does that) nor an HTTP writer (http does that).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "api/api.h"
#include "json/json.h"
#include "obuf/obuf.h"

struct ostream {
    struct app *app;
    struct http_req *r;          /* NULL once aborted or ended */
    struct proc *p;              /* referenced */
    const struct ostream_ops *ops;
    void *ctx;
    bool follow;
    bool pumping;                /* re-entrancy guard: pump() may trigger callbacks */
    bool again;
    bool done;
    uint64_t cursor;
    uint64_t until;              /* follow=false: end offset at start */
    struct proc_watch watch;
    uv_timer_t ka;
    bool ka_active;
    struct obuf_reader rd;       /* follow: registered, so its tail stays in the page cache */
    uv_timer_t hold_timer;       /* patience while holding */
    bool holding;                /* a proc_hold is taken */
    bool hold_spent;             /* let go for lack of progress: no hold until caught up */
    int open_timers;
};

#define OSTREAM_HOLD_HI (4u << 20)
#define OSTREAM_HOLD_LO (1u << 20)
#define OSTREAM_HOLD_PATIENCE_MS 1000

/* One scratch buffer for all pumps: the loop is single-threaded and each batch is formatted
 * and copied into the connection's send buffer before the next one is read. */
static char scratch[OBUF_REC_MAX + 64 * 1024];
static struct sbuf fmt = SBUF_INIT;

static void pump(struct ostream *s);

static void on_timer_close(uv_handle_t *h)
{
    struct ostream *s = h->data;
    if (--s->open_timers > 0)
        return;
    proc_unref(s->p);
    free(s);
}

static void unhold(struct ostream *s)
{
    if (!s->holding)
        return;
    s->holding = false;
    uv_timer_stop(&s->hold_timer);
    proc_unhold(s->p);
}

static void on_hold_timer(uv_timer_t *t)
{
    struct ostream *s = t->data;
    unhold(s);
    s->hold_spent = true;
}

/* Takes or lets go of the process's capture pipes by how far behind this reader is; see the
 * top of the file. progressed: the cursor moved since the last call. */
static void update_hold(struct ostream *s, bool progressed)
{
    struct obuf_stats st;
    if (!s->follow || !s->ops->paces || s->done)
        return;
    obuf_get_stats(s->p->out, &st);
    uint64_t lag = st.end_off - s->cursor;
    if (lag <= OSTREAM_HOLD_LO) {
        s->hold_spent = false;
        unhold(s);
    } else if (s->holding) {
        if (progressed)
            uv_timer_start(&s->hold_timer, on_hold_timer, OSTREAM_HOLD_PATIENCE_MS, 0);
    } else if (lag >= OSTREAM_HOLD_HI && !s->hold_spent && proc_is_running(s->p)) {
        s->holding = true;
        proc_hold(s->p);
        uv_timer_start(&s->hold_timer, on_hold_timer, OSTREAM_HOLD_PATIENCE_MS, 0);
    }
}

/* Releases everything; the request is no longer ours. */
static void release(struct ostream *s)
{
    unhold(s);
    if (s->follow && s->p->out != NULL) /* out is gone if the table was shut down first */
        obuf_reader_del(s->p->out, &s->rd);
    s->done = true;
    s->r = NULL;
    proc_watch_del(&s->watch);
    uv_timer_stop(&s->ka);
    uv_close((uv_handle_t *)&s->ka, on_timer_close);
    uv_close((uv_handle_t *)&s->hold_timer, on_timer_close);
}

static void flush_fmt(struct ostream *s)
{
    if (fmt.len > 0) {
        http_stream_write(s->r, fmt.buf, fmt.len);
        sbuf_reset(&fmt);
    }
}

static void finish(struct ostream *s)
{
    struct http_req *r = s->r;
    sbuf_reset(&fmt);
    if (s->ops->end != NULL)
        s->ops->end(s, &fmt);
    flush_fmt(s);
    if (s->p->state == PROC_DONE)
        obuf_idle(s->p->out);
    release(s);
    http_stream_end(r);
}

static bool at_end(struct ostream *s)
{
    struct obuf_stats st;
    obuf_get_stats(s->p->out, &st);
    if (!s->follow)
        return s->cursor >= s->until;
    return s->p->state == PROC_DONE && s->cursor >= st.end_off;
}

static void pump_once(struct ostream *s)
{
    for (;;) {
        if (http_stream_queued(s->r) >= HTTP_STREAM_HIGH)
            return; /* on_drain resumes */
        if (!s->follow && s->cursor >= s->until)
            break;
        uint64_t base = s->cursor;
        size_t n = 0;
        const char *data;
        int rc = obuf_read_ref(s->p->out, &s->cursor, scratch, sizeof(scratch), &data, &n);
        if (rc == OBUF_GAP) {
            sbuf_reset(&fmt);
            if (s->ops->gap != NULL)
                s->ops->gap(s, s->cursor - base, &fmt);
            flush_fmt(s);
            continue;
        }
        if (rc < 0) {
            /* The log cannot be read (disk error): end the stream rather than spin. */
            log_warnx("output of process %d unreadable: %s", (int)s->p->pid, strerror(-rc));
            break;
        }
        if (n == 0)
            break;
        /* Records are formatted straight into the connection's send buffer. */
        struct sbuf *out = http_stream_chunk_begin(s->r);
        size_t pos = 0;
        struct obuf_rec rec;
        while (obuf_next(data, n, &pos, base, &rec))
            s->ops->rec(s, &rec, out);
        http_stream_chunk_end(s->r);
    }
    if (at_end(s))
        finish(s);
}

static void pump(struct ostream *s)
{
    if (s->done)
        return;
    if (s->pumping) {
        s->again = true;
        return;
    }
    s->pumping = true;
    uint64_t from = s->cursor;
    do {
        s->again = false;
        pump_once(s);
    } while (s->again && !s->done);
    s->pumping = false;
    update_hold(s, s->cursor != from);
}

static void on_proc_event(struct proc *p, enum proc_event ev, void *arg)
{
    (void)p;
    if (ev == PROC_EV_OUTPUT || ev == PROC_EV_EXIT || ev == PROC_EV_RESTART)
        pump(arg);
}

static void on_drain(struct http_req *r, void *arg)
{
    (void)r;
    pump(arg);
}

static void on_abort(struct http_req *r, void *arg)
{
    struct ostream *s = arg;
    (void)r;
    if (s->done)
        return;
    s->r = NULL;
    if (s->ops->abort != NULL)
        s->ops->abort(s);
    release(s);
}

static void on_keepalive(uv_timer_t *t)
{
    struct ostream *s = t->data;
    if (s->done || s->ops->keepalive == NULL)
        return;
    sbuf_reset(&fmt);
    s->ops->keepalive(s, &fmt);
    flush_fmt(s);
}

static const struct http_stream_ops stream_ops = {.on_drain = on_drain};

struct ostream *ostream_start(struct app *app, struct http_req *r, struct proc *p,
                              const struct ostream_ops *ops, void *ctx, bool follow,
                              uint32_t keepalive_ms)
{
    struct ostream *s = xcalloc(1, sizeof(*s));
    struct obuf_stats st;

    s->app = app;
    s->r = r;
    s->p = p;
    s->ops = ops;
    s->ctx = ctx;
    s->follow = follow;
    proc_ref(p);
    obuf_get_stats(p->out, &st);
    s->until = st.end_off;
    uv_timer_init(app->loop, &s->ka);
    s->ka.data = s;
    uv_timer_init(app->loop, &s->hold_timer);
    s->hold_timer.data = s;
    s->open_timers = 2;
    if (keepalive_ms > 0 && ops->keepalive != NULL)
        uv_timer_start(&s->ka, on_keepalive, keepalive_ms, keepalive_ms);
    http_req_on_abort(r, on_abort, s);
    http_stream_begin(r, 200, ops->content_type, ops->extra_headers, &stream_ops, s);
    if (ops->begin != NULL) {
        sbuf_reset(&fmt);
        ops->begin(s, &fmt);
        http_stream_write_held(r, fmt.buf, fmt.len);
        sbuf_reset(&fmt);
    }
    if (follow) {
        s->rd.cursor = &s->cursor;
        obuf_reader_add(p->out, &s->rd);
    }
    proc_watch_add(p, &s->watch, on_proc_event, s);
    pump(s);
    return s;
}

void ostream_json_text(struct sbuf *sb, const struct obuf_rec *rec, size_t n)
{
    if (rec->flags & OBUF_F_PLAIN)
        sbuf_append(sb, rec->data, n);
    else
        json_escape(sb, rec->data, n);
}

void *ostream_ctx(struct ostream *s)
{
    return s->ctx;
}

struct proc *ostream_proc(struct ostream *s)
{
    return s->p;
}
