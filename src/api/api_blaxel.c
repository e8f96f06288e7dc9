/*
 * Blaxel sandbox-api's /process endpoints, translated onto the same process core as the
 * Tensorlake dialect (one table: a process started here is visible there and vice versa).
 * Shapes follow ../shared/spec/blaxel-process-api.md; where the Go server has a quirk the spec
 * marks "do not copy", this file does the right thing (README, "Compatibility notes").
 *
 * Identifiers: an integer (optional sign, digits) is a pid (the first run's pid, which stays
 * the process's Blaxel pid across restarts); anything else is a name, newest record wins.
 */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "api/api.h"
#include "json/json.h"
#include "obuf/obuf.h"

#define INLINE_TAIL (64 * 1024)          /* per stream in GET one, list, NDJSON result */
#define LOGS_TAIL (4 * 1024 * 1024)      /* per stream in /logs and waitForCompletion */
#define NDJSON_KEEPALIVE_MS 5000
#define TEXT_KEEPALIVE_MS 15000
#define PORT_POLL_MS 100
#define KEEPALIVE_DEFAULT_TIMEOUT_S 600
#define MAX_WAIT_PORTS 32
#define NAME_MAX_LEN 128

/* ------------------------------------------------------------------------------------------
 * ProcessResponse
 */

static const char *bl_status(const struct proc *p)
{
    if (p->state == PROC_BACKOFF)
        return "failed";
    if (p->state != PROC_DONE)
        return "running";
    switch (p->cause) {
    case PROC_CAUSE_KILLED:
    case PROC_CAUSE_TIMEOUT:
        return "killed";
    case PROC_CAUSE_STOPPED:
    case PROC_CAUSE_SHUTDOWN:
        return "stopped";
    default:
        return p->outcome == PROC_OUT_EXITED && p->exit_code == 0 ? "completed" : "failed";
    }
}

static int bl_exit_code(const struct proc *p)
{
    if (p->state != PROC_DONE && p->state != PROC_BACKOFF)
        return 0;
    if (p->outcome == PROC_OUT_EXITED)
        return p->exit_code;
    return -1; /* signal, OOM, or unknown: Blaxel's convention, never 0 */
}

static void rfc1123(char *buf, size_t len, int64_t ms)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(buf, len, "%a, %d %b %Y %H:%M:%S GMT", &tm);
}

/* Appends the raw bytes of record rec (the line plus its '\n'). */
static void put_raw(struct sbuf *sb, const struct obuf_rec *rec)
{
    sbuf_append(sb, rec->data, rec->len);
    if (rec->flags & OBUF_F_NL)
        sbuf_putc(sb, '\n');
}

/* Keeps only the last `limit` bytes of sb (amortized: trims once it holds twice that). */
static void keep_tail(struct sbuf *sb, size_t limit, bool force, uint64_t *cut)
{
    if (sb->len > limit && (force || sb->len > 2 * limit)) {
        size_t drop = sb->len - limit;
        memmove(sb->buf, sb->buf + drop, limit);
        sb->len = limit;
        sb->buf[limit] = '\0';
        *cut += drop;
    }
}

/* The last `limit` bytes of stdout and stderr as raw text. Markers are part of stdout. */
static void read_tails(struct proc *p, size_t limit, struct sbuf *out, struct sbuf *err,
                       uint64_t *ret_cut_out, uint64_t *ret_cut_err)
{
    static char buf[OBUF_REC_MAX + 64 * 1024];
    struct obuf_stats st;
    uint64_t cursor = 0, cut_out = 0, cut_err = 0;

    obuf_get_stats(p->out, &st);
    if (limit == 0) { /* nothing inlined: everything counts as cut */
        *ret_cut_out = st.bytes[OBUF_STDOUT];
        *ret_cut_err = st.bytes[OBUF_STDERR];
        return;
    }
    cursor = obuf_seek_back(p->out, st.end_off, 4 * (uint64_t)limit + 64 * 1024);
    for (;;) {
        uint64_t base = cursor;
        size_t n = 0;
        int rc = obuf_read(p->out, &cursor, buf, sizeof(buf), &n);
        if (rc == OBUF_GAP)
            continue;
        if (rc < 0 || n == 0)
            break;
        size_t pos = 0;
        struct obuf_rec rec;
        while (obuf_next(buf, n, &pos, base, &rec)) {
            if (rec.stream == OBUF_STDERR) {
                put_raw(err, &rec);
                keep_tail(err, limit, false, &cut_err);
            } else {
                put_raw(out, &rec);
                keep_tail(out, limit, false, &cut_out);
            }
        }
    }
    if (p->state == PROC_DONE)
        obuf_idle(p->out);
    keep_tail(out, limit, true, &cut_out);
    keep_tail(err, limit, true, &cut_err);
    /* Bytes before where the scan started count as cut too. */
    *ret_cut_out = cut_out + (st.bytes[OBUF_STDOUT] > out->len + cut_out
                                  ? st.bytes[OBUF_STDOUT] - out->len - cut_out
                                  : 0);
    *ret_cut_err = cut_err + (st.bytes[OBUF_STDERR] > err->len + cut_err
                                  ? st.bytes[OBUF_STDERR] - err->len - cut_err
                                  : 0);
}

static void put_tail(struct sbuf *dst, const struct sbuf *tail, uint64_t cut)
{
    if (cut > 0)
        sbuf_printf(dst, "[... truncated: %llu earlier bytes not shown; "
                         "GET /process/{identifier}/logs/stream has them all ...]\n",
                    (unsigned long long)cut);
    sbuf_append(dst, tail->buf ? tail->buf : "", tail->len);
}

/* Writes the "stdout", "stderr" and "logs" keys: the last `limit` bytes of each stream
 * (0: none), each led by a line saying how much was cut; logs is stdout + stderr. */
static void write_outputs(struct json_w *w, struct proc *p, size_t limit)
{
    struct sbuf out = SBUF_INIT, err = SBUF_INIT, a = SBUF_INIT, b = SBUF_INIT;
    uint64_t cut_out = 0, cut_err = 0;

    read_tails(p, limit, &out, &err, &cut_out, &cut_err);
    put_tail(&a, &out, cut_out);
    put_tail(&b, &err, cut_err);
    json_kv_strn(w, "stdout", a.buf ? a.buf : "", a.len);
    json_kv_strn(w, "stderr", b.buf ? b.buf : "", b.len);
    sbuf_append(&a, b.buf ? b.buf : "", b.len);
    json_kv_strn(w, "logs", a.buf ? a.buf : "", a.len);
    sbuf_free(&out);
    sbuf_free(&err);
    sbuf_free(&a);
    sbuf_free(&b);
}

static void command_line(const struct proc *p, struct sbuf *sb)
{
    sbuf_puts(sb, p->command);
    for (char **a = p->args; *a != NULL; a++) {
        sbuf_putc(sb, ' ');
        sbuf_puts(sb, *a);
    }
}

/* Writes a ProcessResponse with stdout/stderr tails of `limit` bytes (0: omit output). */
static void write_response(struct json_w *w, struct proc *p, size_t limit)
{
    char tbuf[64];
    struct sbuf cmd = SBUF_INIT;

    json_obj_begin(w);
    json_key(w, "pid");
    snprintf(tbuf, sizeof(tbuf), "%d", (int)p->first_pid);
    json_str(w, tbuf);
    json_kv_str(w, "name", p->name ? p->name : "");
    if (p->dialect == DIALECT_BLAXEL) {
        json_kv_str(w, "command", p->command);
    } else {
        command_line(p, &cmd);
        json_kv_strn(w, "command", cmd.buf, cmd.len);
    }
    json_kv_str(w, "status", bl_status(p));
    rfc1123(tbuf, sizeof(tbuf), p->started_ms);
    json_kv_str(w, "startedAt", tbuf);
    if (p->state == PROC_DONE || p->state == PROC_BACKOFF)
        rfc1123(tbuf, sizeof(tbuf), p->ended_ms);
    else
        tbuf[0] = '\0';
    json_kv_str(w, "completedAt", tbuf);
    json_kv_int(w, "exitCode", bl_exit_code(p));
    json_kv_str(w, "workingDir", p->cwd_display ? p->cwd_display : "");
    write_outputs(w, p, limit);
    json_kv_bool(w, "restartOnFailure", p->restart_on_failure);
    json_kv_int(w, "maxRestarts", p->max_restarts);
    json_kv_int(w, "restartCount", p->restart_count);
    json_kv_bool(w, "keepAlive", p->keep_alive);
    json_obj_end(w);
    sbuf_free(&cmd);
}

static void reply_response(struct http_req *r, struct proc *p, size_t limit)
{
    struct sbuf sb = SBUF_INIT;
    struct json_w w;
    json_init(&w, &sb);
    write_response(&w, p, limit);
    http_reply_json(r, 200, &sb);
    sbuf_free(&sb);
}

static void reply_message(struct http_req *r, const char *msg)
{
    struct sbuf sb = SBUF_INIT;
    struct json_w w;
    json_init(&w, &sb);
    json_obj_begin(&w);
    json_kv_str(&w, "message", msg);
    json_obj_end(&w);
    http_reply_json(r, 200, &sb);
    sbuf_free(&sb);
}

/* ------------------------------------------------------------------------------------------
 * Identifiers and names
 */

static bool is_integer(const char *s)
{
    if (*s == '+' || *s == '-')
        s++;
    return str_is_digits(s);
}

static struct proc *lookup(struct app *app, const char *id)
{
    if (is_integer(id)) {
        char *end;
        errno = 0;
        long v = strtol(id, &end, 10);
        if (errno != 0 || *end != '\0' || v <= 0 || v > INT_MAX)
            return NULL;
        return proc_by_pid(app->procs, (pid_t)v);
    }
    return proc_by_name(app->procs, id);
}

/* Names are labels and file-name-safe: [A-Za-z0-9._-], not all digits, not "." or "..". */
static bool valid_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > NAME_MAX_LEN || is_integer(s) || strcmp(s, ".") == 0 ||
        strcmp(s, "..") == 0)
        return false;
    for (const char *c = s; *c; c++) {
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
              (*c >= '0' && *c <= '9') || *c == '.' || *c == '_' || *c == '-'))
            return false;
    }
    return true;
}

static void generate_name(char *buf, size_t len)
{
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyz0123456789";
    unsigned char rnd[8];
    if (getrandom(rnd, sizeof(rnd), GRND_NONBLOCK) != (ssize_t)sizeof(rnd)) {
        uint64_t x = mono_us() ^ (uint64_t)getpid() << 32;
        memcpy(rnd, &x, sizeof(rnd));
    }
    snprintf(buf, len, "proc-");
    for (int i = 0; i < 8; i++)
        buf[5 + i] = alphabet[rnd[i] % (sizeof(alphabet) - 1)];
    buf[13] = '\0';
}

static void not_found(struct http_req *r, const char *what, const char *id, const char *tail)
{
    http_reply_error(r, 404, "NOT_FOUND", "process%s%s%s", what, id, tail);
}

/* ------------------------------------------------------------------------------------------
 * Waiting: for ports, for completion, for a stop or kill to take effect. One object per
 * waiting request; it answers exactly once, or is dropped if the client goes away.
 */

enum wait_kind { WAIT_START, WAIT_STREAM, WAIT_STOP, WAIT_KILL };

struct waiter {
    struct app *app;
    struct http_req *r;
    struct proc *p;           /* referenced */
    enum wait_kind kind;
    bool want_completion;     /* WAIT_START: answer after the process is done */
    uint16_t ports[MAX_WAIT_PORTS];
    int nports;               /* still to see listening */
    int64_t timeout_s;        /* for the error text */
    struct proc_watch watch;
    uv_timer_t timer;
    bool finished;
};

static void start_ndjson(struct app *app, struct http_req *r, struct proc *p);

static void on_waiter_closed(uv_handle_t *h)
{
    struct waiter *wt = h->data;
    proc_unref(wt->p);
    free(wt);
}

static void waiter_release(struct waiter *wt)
{
    wt->finished = true;
    proc_watch_del(&wt->watch);
    uv_timer_stop(&wt->timer);
    uv_close((uv_handle_t *)&wt->timer, on_waiter_closed);
}

static bool ports_ready(struct waiter *wt)
{
    uint16_t have[256];
    int n = proc_tree_ports(wt->p, have, (int)ARRAY_SIZE(have));
    if (n < 0)
        return false;
    for (int i = 0; i < wt->nports;) {
        bool found = false;
        for (int j = 0; j < n && !found; j++)
            found = have[j] == wt->ports[i];
        if (found)
            wt->ports[i] = wt->ports[--wt->nports];
        else
            i++;
    }
    return wt->nports == 0;
}

/* Decides whether the waiter can answer now; answers and releases it if so. */
static void waiter_check(struct waiter *wt)
{
    struct http_req *r = wt->r;
    struct proc *p = wt->p;
    bool done = p->state == PROC_DONE;

    if (wt->finished)
        return;
    switch (wt->kind) {
    case WAIT_STOP:
    case WAIT_KILL:
        if (!done)
            return;
        waiter_release(wt);
        reply_message(r, wt->kind == WAIT_STOP ? "Process stopped successfully"
                                               : "Process killed successfully");
        return;
    case WAIT_START:
    case WAIT_STREAM:
        break;
    }
    if (wt->nports > 0 && !ports_ready(wt)) {
        if (!done)
            return;
        waiter_release(wt);
        if (p->cause == PROC_CAUSE_TIMEOUT)
            http_reply_error(r, 422, "TIMEOUT",
                             "process timed out waiting for ports after %lld seconds",
                             (long long)wt->timeout_s);
        else
            http_reply_error(r, 422, "PORTS_NOT_READY",
                             "process ended before every port in waitForPorts was listening");
        return;
    }
    if (wt->kind == WAIT_STREAM) {
        waiter_release(wt);
        start_ndjson(wt->app, r, p);
        return;
    }
    if (wt->want_completion && !done)
        return;
    waiter_release(wt);
    if (wt->want_completion && p->cause == PROC_CAUSE_TIMEOUT) {
        http_reply_error(r, 422, "TIMEOUT", "process timed out after %lld seconds",
                         (long long)wt->timeout_s);
        return;
    }
    reply_response(r, p, wt->want_completion ? LOGS_TAIL : INLINE_TAIL);
}

static void on_waiter_event(struct proc *p, enum proc_event ev, void *arg)
{
    (void)p;
    if (ev == PROC_EV_EXIT)
        waiter_check(arg);
}

static void on_waiter_timer(uv_timer_t *t)
{
    waiter_check(t->data);
}

static void on_waiter_abort(struct http_req *r, void *arg)
{
    struct waiter *wt = arg;
    (void)r;
    if (!wt->finished)
        waiter_release(wt);
}

static struct waiter *waiter_new(struct app *app, struct http_req *r, struct proc *p,
                                 enum wait_kind kind)
{
    struct waiter *wt = xcalloc(1, sizeof(*wt));
    wt->app = app;
    wt->r = r;
    wt->p = p;
    wt->kind = kind;
    proc_ref(p);
    uv_timer_init(app->loop, &wt->timer);
    wt->timer.data = wt;
    proc_watch_add(p, &wt->watch, on_waiter_event, wt);
    http_req_on_abort(r, on_waiter_abort, wt);
    return wt;
}

static void waiter_go(struct waiter *wt)
{
    if (wt->nports > 0)
        uv_timer_start(&wt->timer, on_waiter_timer, PORT_POLL_MS, PORT_POLL_MS);
    waiter_check(wt);
}

/* ------------------------------------------------------------------------------------------
 * Streams: NDJSON exec and the text logs/stream
 */

static void ndjson_rec(struct ostream *s, const struct obuf_rec *rec, struct sbuf *sb)
{
    (void)s;
    sbuf_puts(sb, rec->stream == OBUF_STDERR ? "{\"type\":\"stderr\",\"data\":\""
                                             : "{\"type\":\"stdout\",\"data\":\"");
    ostream_json_text(sb, rec, rec->len);
    if (rec->flags & OBUF_F_NL)
        sbuf_append(sb, "\\n", 2);
    sbuf_append(sb, "\"}\n", 3);
}

static void ndjson_keepalive(struct ostream *s, struct sbuf *sb)
{
    (void)s;
    sbuf_puts(sb, "{\"type\":\"keepalive\"}\n");
}

static void ndjson_end(struct ostream *s, struct sbuf *sb)
{
    struct sbuf resp = SBUF_INIT;
    struct json_w w;
    json_init(&w, &resp);
    write_response(&w, ostream_proc(s), INLINE_TAIL);
    sbuf_puts(sb, "{\"type\":\"result\",\"data\":");
    struct json_w w2;
    json_init(&w2, sb);
    json_strn(&w2, resp.buf, resp.len);
    sbuf_puts(sb, "}\n");
    sbuf_free(&resp);
}

static const struct ostream_ops ndjson_ops = {
    .content_type = "application/x-ndjson",
    .extra_headers = "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n",
    .paces = true,
    .rec = ndjson_rec,
    .end = ndjson_end,
    .keepalive = ndjson_keepalive,
};

static void start_ndjson(struct app *app, struct http_req *r, struct proc *p)
{
    ostream_start(app, r, p, &ndjson_ops, NULL, true, NDJSON_KEEPALIVE_MS);
}

static void text_rec(struct ostream *s, const struct obuf_rec *rec, struct sbuf *sb)
{
    (void)s;
    if (!(rec->flags & OBUF_F_MARK))
        sbuf_puts(sb, rec->stream == OBUF_STDERR ? "stderr:" : "stdout:");
    sbuf_append(sb, rec->data, rec->len);
    sbuf_putc(sb, '\n');
}

static void text_gap(struct ostream *s, uint64_t dropped, struct sbuf *sb)
{
    (void)s;
    sbuf_printf(sb, "[sandboxd: %llu bytes of earlier output were dropped]\n",
                (unsigned long long)dropped);
}

static void text_keepalive(struct ostream *s, struct sbuf *sb)
{
    (void)s;
    sbuf_puts(sb, "[keepalive]\n");
}

static const struct ostream_ops text_ops = {
    .content_type = "text/plain; charset=utf-8",
    .extra_headers = "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n",
    .rec = text_rec,
    .gap = text_gap,
    .keepalive = text_keepalive,
};

/* ------------------------------------------------------------------------------------------
 * POST /process
 */

struct exec_req {
    const char *command;
    const char *name;
    const char *cwd;
    const char **env_keys, **env_vals;
    size_t nenv;
    bool wait_completion;
    int64_t timeout_s;
    bool has_timeout;
    uint16_t ports[MAX_WAIT_PORTS];
    int nports;
    bool restart;
    int64_t max_restarts;
    bool keep_alive;
};

static bool get_bool(json_t *o, const char *key, bool *ret, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, key);
    if (v == NULL || json_is_null(v))
        return true;
    if (!json_is_boolean(v)) {
        snprintf(err, errlen, "invalid request body: %s must be a boolean", key);
        return false;
    }
    *ret = json_is_true(v);
    return true;
}

static bool get_int(json_t *o, const char *key, int64_t *ret, bool *present, char *err,
                    size_t errlen)
{
    json_t *v = json_object_get(o, key);
    if (v == NULL || json_is_null(v))
        return true;
    if (!json_is_integer(v)) {
        snprintf(err, errlen, "invalid request body: %s must be an integer", key);
        return false;
    }
    *ret = json_integer_value(v);
    if (present)
        *present = true;
    return true;
}

static bool get_str(json_t *o, const char *key, const char **ret, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, key);
    if (v == NULL || json_is_null(v))
        return true;
    if (!json_is_string(v)) {
        snprintf(err, errlen, "invalid request body: %s must be a string", key);
        return false;
    }
    *ret = json_string_value(v);
    return true;
}

static int parse_exec(json_t *o, struct exec_req *q, char *err, size_t errlen)
{
    json_t *v;

    memset(q, 0, sizeof(*q));
    if (!get_str(o, "command", &q->command, err, errlen) ||
        !get_str(o, "name", &q->name, err, errlen) ||
        !get_str(o, "workingDir", &q->cwd, err, errlen) ||
        !get_bool(o, "waitForCompletion", &q->wait_completion, err, errlen) ||
        !get_bool(o, "restartOnFailure", &q->restart, err, errlen) ||
        !get_bool(o, "keepAlive", &q->keep_alive, err, errlen) ||
        !get_int(o, "timeout", &q->timeout_s, &q->has_timeout, err, errlen) ||
        !get_int(o, "maxRestarts", &q->max_restarts, NULL, err, errlen))
        return -EINVAL;
    if (q->command == NULL || q->command[0] == '\0') {
        snprintf(err, errlen, "invalid request body: command is required");
        return -EINVAL;
    }
    if (q->name != NULL && !valid_name(q->name)) {
        snprintf(err, errlen,
                 "invalid name '%.*s': use 1-%d of [A-Za-z0-9._-], not only digits, "
                 "not . or ..", NAME_MAX_LEN, q->name, NAME_MAX_LEN);
        return -EINVAL;
    }
    v = json_object_get(o, "env");
    if (v != NULL && !json_is_null(v) &&
        (!json_is_object(v) || api_env_pairs(v, &q->env_keys, &q->env_vals, &q->nenv) < 0)) {
        snprintf(err, errlen, "invalid request body: env must be an object of strings");
        return -EINVAL;
    }
    v = json_object_get(o, "waitForPorts");
    if (v != NULL && !json_is_null(v)) {
        if (!json_is_array(v) || json_array_size(v) > MAX_WAIT_PORTS) {
            snprintf(err, errlen, "invalid request body: waitForPorts must be an array of at "
                                  "most %d ports", MAX_WAIT_PORTS);
            return -EINVAL;
        }
        for (size_t i = 0; i < json_array_size(v); i++) {
            json_t *e = json_array_get(v, i);
            if (!json_is_integer(e) || json_integer_value(e) < 1 ||
                json_integer_value(e) > 65535) {
                snprintf(err, errlen, "invalid request body: waitForPorts entries must be "
                                      "ports 1-65535");
                return -EINVAL;
            }
            q->ports[q->nports++] = (uint16_t)json_integer_value(e);
        }
    }
    if (q->max_restarts != 0 && !q->restart) {
        snprintf(err, errlen, "maxRestarts needs restartOnFailure: true");
        return -EINVAL;
    }
    if (q->max_restarts > INT_MAX || q->max_restarts < INT_MIN ||
        q->timeout_s > INT_MAX / 1000 || q->timeout_s < INT_MIN) {
        snprintf(err, errlen, "invalid request body: number out of range");
        return -EINVAL;
    }
    return 0;
}

/* "~" -> $HOME, "//" -> "/"; relative paths stay as given (resolved against the daemon's cwd). */
static char *normalize_dir(const char *d, char *err, size_t errlen)
{
    struct sbuf sb = SBUF_INIT;
    if (d == NULL || d[0] == '\0')
        return NULL;
    if (d[0] == '~' && (d[1] == '\0' || d[1] == '/')) {
        const char *home = getenv("HOME");
        if (home == NULL) {
            snprintf(err, errlen, "cannot expand ~: HOME is not set");
            return (char *)-1;
        }
        sbuf_puts(&sb, home);
        d++;
    }
    sbuf_puts(&sb, d);
    char *out = sbuf_steal(&sb), *w = out;
    for (const char *c = out; *c; c++) {
        if (*c == '/' && w > out && w[-1] == '/')
            continue;
        *w++ = *c;
    }
    *w = '\0';
    return out;
}

/* An exec waiting for its process's exec (proc_start_async): answered then. */
struct exec_wait {
    struct app *app;
    struct http_req *r;
    struct proc_pending *pending;
    bool stream;
    bool want_completion;
    int64_t timeout_s;
    uint16_t ports[MAX_WAIT_PORTS];
    int nports;
};

static void reply_exec_error(struct http_req *r, int rc, const char *err)
{
    if (rc == -EAGAIN) {
        api_reply_spawn_error(r, rc, err);
    } else {
        int status = rc == -EPERM ? 403 : 422;
        http_reply_error(r, status, "SPAWN_FAILED", "failed to start process: %s", err);
    }
}

static void on_exec_started(void *arg, struct proc *p, int rc, const char *err)
{
    struct exec_wait *ew = arg;
    struct http_req *r = ew->r;
    if (p == NULL) {
        reply_exec_error(r, rc, err);
    } else if (ew->stream || ew->want_completion || ew->nports > 0) {
        struct waiter *wt = waiter_new(ew->app, r, p, ew->stream ? WAIT_STREAM : WAIT_START);
        wt->want_completion = ew->want_completion;
        wt->timeout_s = ew->timeout_s;
        memcpy(wt->ports, ew->ports, sizeof(ew->ports));
        wt->nports = ew->nports;
        waiter_go(wt);
    } else {
        reply_response(r, p, INLINE_TAIL);
    }
    free(ew);
}

/* The client went away first: the process starts all the same, unanswered. */
static void on_exec_abort(struct http_req *r, void *arg)
{
    struct exec_wait *ew = arg;
    (void)r;
    proc_start_cancel(ew->pending);
    free(ew);
}

static void h_exec(struct app *app, struct http_req *r)
{
    struct exec_req q;
    struct proc_spec spec = {0};
    struct proc *old;
    char err[512], name[32];
    char *cwd = NULL, **env = NULL;
    const char *accept = http_header(r, "accept");
    bool stream = accept != NULL && strstr(accept, "text/event-stream") != NULL;
    json_t *o;
    int rc;

    if ((o = api_parse_object(r, 400)) == NULL)
        return;
    memset(&q, 0, sizeof(q));
    if (parse_exec(o, &q, err, sizeof(err)) < 0) {
        http_reply_error(r, 400, "INVALID_REQUEST", "%s", err);
        goto out;
    }
    const char *dk = getenv("BL_DISABLE_KEEPALIVE");
    if (q.keep_alive && dk != NULL && (strcmp(dk, "true") == 0 || strcmp(dk, "1") == 0)) {
        http_reply_error(r, 400, "KEEPALIVE_DISABLED", "keepAlive is not available for this "
                         "sandbox: it is not included in your current plan");
        goto out;
    }
    cwd = normalize_dir(q.cwd, err, sizeof(err));
    if (cwd == (char *)-1) {
        cwd = NULL;
        http_reply_error(r, 400, "INVALID_REQUEST", "%s", err);
        goto out;
    }
    /* A start still waiting for its exec holds its name too. */
    if (q.name != NULL &&
        (((old = proc_by_name(app->procs, q.name)) != NULL && proc_is_live(old)) ||
         proc_name_starting(app->procs, q.name))) {
        http_reply_error(r, 400, "NAME_IN_USE",
                         "process with name '%s' already exists and is running", q.name);
        goto out;
    }
    if (q.name == NULL)
        generate_name(name, sizeof(name));

    int64_t timeout_s = q.timeout_s;
    if (q.keep_alive && (!q.has_timeout || timeout_s < 0))
        timeout_s = KEEPALIVE_DEFAULT_TIMEOUT_S;

    const char *shell = getenv("SHELL");
    const char *argv[4] = {shell && *shell ? shell : "sh", "-c", q.command, NULL};
    env = proc_env_build(q.env_keys, q.env_vals, q.nenv, NULL, NULL);
    spec.command = q.command;
    spec.file = argv[0];
    spec.argv = (char *const *)argv;
    spec.env = env;
    spec.env_give = &env;
    spec.cwd = cwd;
    spec.cwd_display = cwd ? cwd : "";
    spec.stdin_mode = PROC_STDIN_CLOSED;
    spec.capture_stdout = spec.capture_stderr = true;
    spec.timeout_ms = timeout_s > 0 ? (uint64_t)timeout_s * 1000 : 0;
    spec.kill_tree_on_exit = true;
    spec.name = q.name ? q.name : name;
    spec.restart_on_failure = q.restart;
    spec.max_restarts = (int)q.max_restarts;
    spec.keep_alive = q.keep_alive;
    spec.dialect = DIALECT_BLAXEL;

    struct exec_wait *ew = xcalloc(1, sizeof(*ew));
    ew->app = app;
    ew->r = r;
    ew->stream = stream;
    ew->want_completion = q.wait_completion;
    ew->timeout_s = timeout_s;
    memcpy(ew->ports, q.ports, sizeof(q.ports));
    ew->nports = q.nports;
    http_req_on_abort(r, on_exec_abort, ew);
    rc = proc_start_async(app->procs, &spec, on_exec_started, ew, &ew->pending, err, sizeof(err));
    if (rc < 0) {
        reply_exec_error(r, rc, err);
        free(ew);
    }
out:
    free(q.env_keys);
    free(q.env_vals);
    free(cwd);
    proc_env_free(env);
    json_decref(o);
}

/* ------------------------------------------------------------------------------------------
 * The other routes
 */

/* GET /process inlines the tail of every record's output; LIST_INLINE_BUDGET bounds the
 * answer (and the memory it takes) however many records there are. Records are listed newest
 * first (Blaxel leaves the order open) and get their tails while the answer is under budget;
 * older ones carry only the "truncated" line saying how much GET /process/{id}/logs shows. */
#define LIST_INLINE_BUDGET (16 * 1024 * 1024)

static void h_list(struct app *app, struct http_req *r)
{
    struct sbuf sb = SBUF_INIT;
    struct json_w w;
    size_t n = proc_count_total(app->procs), i = 0;
    struct proc **ps = xcalloc(n + 1, sizeof(*ps));

    for (struct proc *p = proc_first(app->procs); p != NULL && i < n; p = proc_next(p))
        ps[i++] = p;
    n = i;
    json_init(&w, &sb);
    json_arr_begin(&w);
    for (i = n; i-- > 0;)
        write_response(&w, ps[i], sb.len < LIST_INLINE_BUDGET ? INLINE_TAIL : 0);
    json_arr_end(&w);
    http_reply_json(r, 200, &sb);
    sbuf_free(&sb);
    free(ps);
}

static void h_logs(struct http_req *r, struct proc *p)
{
    struct sbuf sb = SBUF_INIT;
    struct json_w w;

    json_init(&w, &sb);
    json_obj_begin(&w);
    write_outputs(&w, p, LOGS_TAIL);
    json_obj_end(&w);
    http_reply_json(r, 200, &sb);
    sbuf_free(&sb);
}

static void h_stop(struct app *app, struct http_req *r, struct proc *p, const char *id)
{
    if (!proc_is_live(p) || p->state == PROC_STOPPING) {
        not_found(r, " with Identifier ", id, " is not running");
        return;
    }
    p->keep_alive = false;
    proc_stop(p, 0);
    waiter_go(waiter_new(app, r, p, WAIT_STOP));
}

static void h_kill(struct app *app, struct http_req *r, struct proc *p, const char *id)
{
    if (!proc_is_live(p)) {
        http_reply_error(r, 404, "NOT_FOUND",
                         "failed to kill process with Identifier %s: no such process", id);
        return;
    }
    p->keep_alive = false;
    proc_kill(p);
    waiter_go(waiter_new(app, r, p, WAIT_KILL));
}

bool api_blaxel_route(struct app *app, struct http_req *r)
{
    enum http_method m = r->method == HTTP_M_HEAD ? HTTP_M_GET : r->method;
    int n = r->nseg;

    if (n < 1 || strcmp(r->seg[0], "process") != 0)
        return false;
    if (n == 2 && r->seg[1][0] == '\0')
        n = 1; /* "/process/" is "/process" (Go redirects) */
    if (n == 1) {
        if (m == HTTP_M_GET)
            h_list(app, r);
        else if (m == HTTP_M_POST)
            h_exec(app, r);
        else
            http_reply_error(r, 405, "METHOD_NOT_ALLOWED", "method not allowed");
        return true;
    }
    const char *id = r->seg[1];
    const char *sub = n >= 3 ? r->seg[2] : NULL;
    bool logs = sub != NULL && strcmp(sub, "logs") == 0;
    bool known = n == 2 || (n == 3 && (logs || strcmp(sub, "kill") == 0)) ||
                 (n == 4 && logs && strcmp(r->seg[3], "stream") == 0);
    if (!known) {
        http_reply_error(r, 404, "NOT_FOUND", "no such route: %s", r->path);
        return true;
    }
    enum http_method want = n == 2 ? (m == HTTP_M_DELETE ? HTTP_M_DELETE : HTTP_M_GET)
                            : logs ? HTTP_M_GET
                                   : HTTP_M_DELETE;
    if (m != want) {
        http_reply_error(r, 405, "METHOD_NOT_ALLOWED", "method not allowed");
        return true;
    }
    struct proc *p = lookup(app, id);
    if (p == NULL) {
        if (logs && n == 3)
            not_found(r, " with PID ", id, " not found");
        else if (n == 2 && m == HTTP_M_GET)
            not_found(r, " not found", "", "");
        else
            not_found(r, " with Identifier ", id, " not found");
        return true;
    }
    if (n == 2 && m == HTTP_M_GET)
        reply_response(r, p, INLINE_TAIL);
    else if (n == 2)
        h_stop(app, r, p, id);
    else if (strcmp(sub, "kill") == 0)
        h_kill(app, r, p, id);
    else if (n == 3)
        h_logs(r, p);
    else
        ostream_start(app, r, p, &text_ops, NULL, true, TEXT_KEEPALIVE_MS);
    return true;
}
