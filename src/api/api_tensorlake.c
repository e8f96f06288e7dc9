/*
 * Tensorlake's sandbox process API (/api/v1/...), translated onto the process core.
 * Shapes follow ../shared/spec/tensorlake-sandbox-api.md; choices the spec leaves open are
 * in docs/decisions.md. This file parses requests, calls proc_*, and writes JSON/SSE; it
 * never touches fds or handles.
 */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api/api.h"
#include "json/json.h"
#include "obuf/obuf.h"

#define KEEPALIVE_MS 15000

/* ------------------------------------------------------------------------------------------
 * ProcessInfo
 */

static const char *status_name(const struct proc *p)
{
    if (p->state != PROC_DONE && p->state != PROC_BACKOFF)
        return "running";
    switch (p->outcome) {
    case PROC_OUT_SIGNALED:
        return "signaled";
    case PROC_OUT_OOM:
        return "oom_killed";
    default:
        return "exited";
    }
}

/* The exit fields shared by ProcessInfo, the run's final event and the follow eof event. */
static void write_exit_fields(struct json_w *w, const struct proc *p)
{
    bool ended = p->state == PROC_DONE || p->state == PROC_BACKOFF;

    json_key(w, "exit_code");
    if (ended && p->outcome == PROC_OUT_EXITED)
        json_int(w, p->exit_code);
    else if (ended && p->outcome == PROC_OUT_UNKNOWN)
        json_int(w, -1);
    else
        json_null_value(w);
    json_key(w, "signal");
    if (ended && (p->outcome == PROC_OUT_SIGNALED || p->outcome == PROC_OUT_OOM))
        json_int(w, p->term_signal);
    else
        json_null_value(w);
    json_kv_bool(w, "oom_killed", ended && p->outcome == PROC_OUT_OOM);
    if (ended && p->cause == PROC_CAUSE_TIMEOUT)
        json_kv_bool(w, "timed_out", true);
}

static void write_info(struct json_w *w, const struct proc *p)
{
    json_obj_begin(w);
    json_kv_int(w, "handle", (int64_t)p->handle);
    json_kv_int(w, "pid", p->pid);
    json_kv_str(w, "status", status_name(p));
    write_exit_fields(w, p);
    json_kv_bool(w, "stdin_writable", p->stdin_open && proc_is_running(p));
    json_kv_str(w, "command", p->command);
    json_key(w, "args");
    json_arr_begin(w);
    for (char **a = p->args; *a != NULL; a++)
        json_str(w, *a);
    json_arr_end(w);
    json_kv_int(w, "started_at", p->started_ms);
    json_key(w, "ended_at");
    if (p->state == PROC_DONE || p->state == PROC_BACKOFF)
        json_int(w, p->ended_ms);
    else
        json_null_value(w);
    if (p->name != NULL)
        json_kv_str(w, "name", p->name);
    json_obj_end(w);
}

static void reply_info(struct http_req *r, int status, const struct proc *p)
{
    struct sbuf sb = SBUF_INIT;
    struct json_w w;
    json_init(&w, &sb);
    write_info(&w, p);
    http_reply_json(r, status, &sb);
    sbuf_free(&sb);
}

/* ------------------------------------------------------------------------------------------
 * Start / run request parsing
 */

struct start_req {
    const char *command;
    const char **argv;       /* command, args..., NULL (strings borrowed from the JSON) */
    const char **env_keys;
    const char **env_vals;
    size_t nenv;
    const char *cwd;
    const char *user;        /* user name or uid, NULL: the daemon's own */
    const char *group;       /* gid or group, NULL: the user's */
    char *user_buf;          /* backing store for user/group when split from "u:g" */
    enum proc_stdin stdin_mode;
    bool cap_out, cap_err;
    double timeout_s;
};

static void start_req_free(struct start_req *q)
{
    free(q->argv);
    free(q->env_keys);
    free(q->env_vals);
    free(q->user_buf);
}

static const char *opt_string(json_t *o, const char *key, bool *bad)
{
    json_t *v = json_object_get(o, key);
    if (v == NULL || json_is_null(v))
        return NULL;
    if (!json_is_string(v)) {
        *bad = true;
        return NULL;
    }
    return json_string_value(v);
}

static int parse_user(json_t *v, struct start_req *q, char *err, size_t errlen)
{
    static char num[2][32];

    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        const char *c = s;
        while (*c == ' ' || *c == '\t')
            c++;
        if (*c == '\0') {
            snprintf(err, errlen, "user must not be empty");
            return -EINVAL;
        }
        q->user_buf = xstrdup(c);
        char *colon = strchr(q->user_buf, ':');
        if (colon != NULL) {
            *colon = '\0';
            q->group = colon + 1;
            if (*q->group == '\0' || *q->user_buf == '\0') {
                snprintf(err, errlen, "user must be \"user\", \"uid\" or \"uid:gid\"");
                return -EINVAL;
            }
        }
        q->user = q->user_buf;
        return 0;
    }
    if (!json_is_object(v)) {
        snprintf(err, errlen, "user must be a string or an object");
        return -EINVAL;
    }
    json_t *name = json_object_get(v, "name"), *uid = json_object_get(v, "uid");
    json_t *gid = json_object_get(v, "gid");
    if (name != NULL && json_is_null(name))
        name = NULL;
    if (uid != NULL && json_is_null(uid))
        uid = NULL;
    if (gid != NULL && json_is_null(gid))
        gid = NULL;
    if ((name == NULL) == (uid == NULL)) {
        snprintf(err, errlen, "user object needs exactly one of \"name\" and \"uid\"");
        return -EINVAL;
    }
    if (name != NULL) {
        if (!json_is_string(name) || json_string_length(name) == 0) {
            snprintf(err, errlen, "user.name must be a non-empty string");
            return -EINVAL;
        }
        q->user = json_string_value(name);
    } else {
        if (!json_is_integer(uid) || json_integer_value(uid) < 0 ||
            json_integer_value(uid) > 0x7fffffff) {
            snprintf(err, errlen, "user.uid must be a non-negative integer");
            return -EINVAL;
        }
        snprintf(num[0], sizeof(num[0]), "%lld", (long long)json_integer_value(uid));
        q->user = num[0];
    }
    if (gid != NULL) {
        if (!json_is_integer(gid) || json_integer_value(gid) < 0 ||
            json_integer_value(gid) > 0x7fffffff) {
            snprintf(err, errlen, "user.gid must be a non-negative integer");
            return -EINVAL;
        }
        snprintf(num[1], sizeof(num[1]), "%lld", (long long)json_integer_value(gid));
        q->group = num[1];
    }
    return 0;
}

static int parse_start(json_t *o, struct start_req *q, bool run, char *err, size_t errlen)
{
    bool bad = false;
    json_t *v;

    memset(q, 0, sizeof(*q));
    q->cap_out = q->cap_err = true;
    q->command = opt_string(o, "command", &bad);
    if (bad || q->command == NULL || q->command[0] == '\0') {
        snprintf(err, errlen, "\"command\" is required and must be a non-empty string");
        return -EINVAL;
    }

    v = json_object_get(o, "args");
    size_t nargs = 0;
    if (v != NULL && !json_is_null(v)) {
        if (!json_is_array(v)) {
            snprintf(err, errlen, "\"args\" must be an array of strings");
            return -EINVAL;
        }
        nargs = json_array_size(v);
    }
    q->argv = xcalloc(nargs + 2, sizeof(*q->argv));
    q->argv[0] = q->command;
    for (size_t i = 0; i < nargs; i++) {
        json_t *a = json_array_get(v, i);
        if (!json_is_string(a)) {
            snprintf(err, errlen, "\"args\" must be an array of strings");
            return -EINVAL;
        }
        q->argv[i + 1] = json_string_value(a);
    }

    v = json_object_get(o, "env");
    if (v != NULL && !json_is_null(v)) {
        if (!json_is_object(v) || api_env_pairs(v, &q->env_keys, &q->env_vals, &q->nenv) < 0) {
            snprintf(err, errlen, "\"env\" must be an object of string values");
            return -EINVAL;
        }
    }

    q->cwd = opt_string(o, "working_dir", &bad);
    if (bad || (q->cwd != NULL && q->cwd[0] == '\0')) {
        snprintf(err, errlen, "\"working_dir\" must be a non-empty string");
        return -EINVAL;
    }

    v = json_object_get(o, "user");
    if (v != NULL && !json_is_null(v) && parse_user(v, q, err, errlen) < 0)
        return -EINVAL;

    if (!run) {
        const char *m = opt_string(o, "stdin_mode", &bad);
        if (bad || (m != NULL && strcmp(m, "closed") != 0 && strcmp(m, "pipe") != 0)) {
            snprintf(err, errlen, "\"stdin_mode\" must be \"closed\" or \"pipe\"");
            return -EINVAL;
        }
        q->stdin_mode = m != NULL && strcmp(m, "pipe") == 0 ? PROC_STDIN_PIPE : PROC_STDIN_CLOSED;
        static const char *const keys[2] = {"stdout_mode", "stderr_mode"};
        for (int i = 0; i < 2; i++) {
            m = opt_string(o, keys[i], &bad);
            if (bad || (m != NULL && strcmp(m, "capture") != 0 && strcmp(m, "discard") != 0)) {
                snprintf(err, errlen, "\"%s\" must be \"capture\" or \"discard\"", keys[i]);
                return -EINVAL;
            }
            bool cap = m == NULL || strcmp(m, "capture") == 0;
            if (i == 0)
                q->cap_out = cap;
            else
                q->cap_err = cap;
        }
    }

    v = json_object_get(o, "timeout");
    if (v != NULL && !json_is_null(v)) {
        if (!json_is_number(v) || !isfinite(json_number_value(v)) || json_number_value(v) < 0 ||
            json_number_value(v) > 1e9) {
            snprintf(err, errlen, "\"timeout\" must be a non-negative number of seconds");
            return -EINVAL;
        }
        q->timeout_s = json_number_value(v);
    }
    return 0;
}

static void stream_started(struct app *app, struct http_req *r, struct proc *p);

/* A start waiting for its exec (proc_start_async): the request is answered then. */
struct start_wait {
    struct app *app;
    struct http_req *r;      /* NULL: the client went away meanwhile */
    bool run;
};

static void on_started(void *arg, struct proc *p, int rc, const char *err)
{
    struct start_wait *sw = arg;
    struct http_req *r = sw->r;
    struct app *app = sw->app;
    bool run = sw->run;
    free(sw);
    if (r == NULL) {
        /* A run is request-scoped (its tree dies with its client), a start is not. */
        if (p != NULL && run && proc_is_live(p))
            proc_kill(p);
    } else if (p == NULL) {
        api_reply_spawn_error(r, rc, err);
    } else if (run) {
        stream_started(app, r, p);
    } else {
        reply_info(r, 201, p);
    }
}

static void on_start_abort(struct http_req *r, void *arg)
{
    struct start_wait *sw = arg;
    (void)r;
    sw->r = NULL; /* on_started still runs, and frees it */
}

/* Parses the body and starts the process; the request is answered with run's stream or
 * start's record once the process runs, or with the error. */
static void start_from_request(struct app *app, struct http_req *r, bool run)
{
    struct start_req q;
    struct proc_user user = {0};
    struct proc_spec spec = {0};
    char **env = NULL;
    char err[512];
    json_t *o;
    int rc;

    if ((o = api_parse_object(r, 422)) == NULL)
        return;
    if (parse_start(o, &q, run, err, sizeof(err)) < 0) {
        http_reply_error(r, 422, "INVALID_REQUEST", "%s", err);
        goto out;
    }
    if (q.user != NULL) {
        rc = proc_user_lookup(q.user, q.group, &user);
        if (rc < 0) {
            http_reply_error(r, 400, "USER_NOT_FOUND", "unknown user: %s%s%s", q.user,
                             q.group ? ":" : "", q.group ? q.group : "");
            goto out;
        }
        spec.set_user = user.uid != getuid() || user.gid != getgid();
        if (spec.set_user && !app->is_root) {
            http_reply_error(r, 403, "PERMISSION_DENIED",
                             "switching to user %s needs the daemon to run as root", q.user);
            goto out;
        }
        spec.uid = user.uid;
        spec.gid = user.gid;
        spec.user_name = user.name;
    }
    env = proc_env_build(q.env_keys, q.env_vals, q.nenv, spec.set_user ? user.name : NULL,
                         spec.set_user ? user.home : NULL);

    spec.command = q.command;
    spec.file = q.command;
    spec.argv = (char *const *)q.argv;
    spec.args = (char *const *)q.argv + 1;
    spec.env = env;
    spec.env_give = &env;
    spec.cwd = q.cwd;
    spec.cwd_display = q.cwd;
    spec.stdin_mode = run ? PROC_STDIN_CLOSED : q.stdin_mode;
    spec.capture_stdout = run || q.cap_out;
    spec.capture_stderr = run || q.cap_err;
    spec.timeout_ms = (uint64_t)(q.timeout_s * 1000.0 + 0.5); /* checked: 0 <= s <= 1e9 */
    if (q.timeout_s > 0 && spec.timeout_ms == 0)
        spec.timeout_ms = 1;
    spec.kill_tree_on_exit = true;
    spec.dialect = DIALECT_TENSORLAKE;

    struct start_wait *sw = xcalloc(1, sizeof(*sw));
    sw->app = app;
    sw->r = r;
    sw->run = run;
    http_req_on_abort(r, on_start_abort, sw);
    rc = proc_start_async(app->procs, &spec, on_started, sw, NULL, err, sizeof(err));
    if (rc < 0) {
        api_reply_spawn_error(r, rc, err);
        free(sw);
    }
out:
    proc_env_free(env);
    proc_user_free(&user);
    start_req_free(&q);
    json_decref(o);
}

/* ------------------------------------------------------------------------------------------
 * Output formatting: SSE events and the JSON line arrays
 */

/* The line as clients see it: without the '\r' of a "\r\n" ending. */
static size_t line_len(const struct obuf_rec *rec)
{
    size_t n = rec->len;
    if ((rec->flags & OBUF_F_NL) && n > 0 && rec->data[n - 1] == '\r')
        n--;
    return n;
}

static const char *stream_name(int stream)
{
    return stream == OBUF_STDERR ? "stderr" : "stdout";
}

/* data: {"line":"...","timestamp":T,"stream":"stdout"}\n\n
 * The hot path of every stream: a plain line is one reservation and five copies, and the
 * timestamp text is reused while it does not change (lines of a burst share their ms). */
static void sse_line(struct sbuf *sb, const struct obuf_rec *rec)
{
    static const char pre[] = "data: {\"line\":\"";
    static const char mid[] = "\",\"timestamp\":";
    static const char post_out[] = ",\"stream\":\"stdout\"}\n\n";
    static const char post_err[] = ",\"stream\":\"stderr\"}\n\n";
    static int64_t cached_ts = INT64_MIN;
    static struct sbuf ts_txt = SBUF_INIT;

    int64_t ts = rec->ts_ms;
    if (ts != cached_ts) {
        sbuf_reset(&ts_txt);
        sbuf_put_i64(&ts_txt, ts);
        cached_ts = ts;
    }
    const char *data = rec->data;
    size_t n = line_len(rec);
    const char *post = rec->stream == OBUF_STDERR ? post_err : post_out;
    if ((rec->flags & OBUF_F_PLAIN) || json_plain(data, n)) {
        size_t need = sizeof(pre) - 1 + n + sizeof(mid) - 1 + ts_txt.len + sizeof(post_out) - 1;
        char *d = sbuf_reserve(sb, need + 1);
        memcpy(d, pre, sizeof(pre) - 1);
        d += sizeof(pre) - 1;
        memcpy(d, data, n);
        d += n;
        memcpy(d, mid, sizeof(mid) - 1);
        d += sizeof(mid) - 1;
        memcpy(d, ts_txt.buf, ts_txt.len);
        d += ts_txt.len;
        memcpy(d, post, sizeof(post_out) - 1);
        sb->len += need;
        sb->buf[sb->len] = '\0';
        return;
    }
    sbuf_append(sb, pre, sizeof(pre) - 1);
    json_escape(sb, data, n);
    sbuf_append(sb, mid, sizeof(mid) - 1);
    sbuf_append(sb, ts_txt.buf, ts_txt.len);
    sbuf_append(sb, post, sizeof(post_out) - 1);
}

/* Which records a stream shows: OBUF_STDOUT, OBUF_STDERR, or 0 for both. */
struct out_ctx {
    int stream;
    bool first;             /* JSON array: no comma yet */
    uint64_t count;
};

static bool wanted(const struct out_ctx *c, const struct obuf_rec *rec)
{
    return c->stream == 0 || c->stream == rec->stream;
}

static void sse_rec(struct ostream *s, const struct obuf_rec *rec, struct sbuf *sb)
{
    struct out_ctx *c = ostream_ctx(s);
    if (wanted(c, rec))
        sse_line(sb, rec);
}

/* Child bytes of the stream(s) c shows that the budget dropped. */
static uint64_t dropped_for(const struct out_ctx *c, const struct obuf_stats *st)
{
    if (c->stream == OBUF_STDOUT)
        return st->dropped_out;
    if (c->stream == OBUF_STDERR)
        return st->dropped_err;
    return st->dropped_out + st->dropped_err;
}

static void sse_gap(struct ostream *s, uint64_t log_bytes, struct sbuf *sb)
{
    struct out_ctx *c = ostream_ctx(s);
    struct obuf_stats st;
    (void)log_bytes;
    obuf_get_stats(ostream_proc(s)->out, &st);
    uint64_t dropped = dropped_for(c, &st);
    sbuf_append(sb, "data: {\"line\":\"[sandboxd: ", 26);
    sbuf_put_u64(sb, dropped);
    sbuf_puts(sb, " bytes of earlier output were dropped]\",\"timestamp\":");
    sbuf_put_i64(sb, now_ms());
    sbuf_printf(sb, ",\"stream\":\"%s\",\"truncated\":true,\"dropped_bytes\":",
                stream_name(c->stream == OBUF_STDERR ? OBUF_STDERR : OBUF_STDOUT));
    sbuf_put_u64(sb, dropped);
    sbuf_puts(sb, "}\n\n");
}

static void sse_keepalive(struct ostream *s, struct sbuf *sb)
{
    (void)s;
    sbuf_puts(sb, ": keepalive\n\n");
}

static void exit_event(struct sbuf *sb, const struct proc *p)
{
    struct json_w w;
    json_init(&w, sb);
    json_obj_begin(&w);
    write_exit_fields(&w, p);
    json_obj_end(&w);
}

static void follow_end(struct ostream *s, struct sbuf *sb)
{
    sbuf_puts(sb, "event: eof\ndata: ");
    exit_event(sb, ostream_proc(s));
    sbuf_puts(sb, "\n\n");
}

static void run_begin(struct ostream *s, struct sbuf *sb)
{
    struct proc *p = ostream_proc(s);
    sbuf_puts(sb, "data: {\"handle\":");
    sbuf_put_u64(sb, p->handle);
    sbuf_puts(sb, ",\"pid\":");
    sbuf_put_i64(sb, p->pid);
    sbuf_puts(sb, ",\"started_at\":");
    sbuf_put_i64(sb, p->started_ms);
    sbuf_puts(sb, "}\n\n");
}

static void run_end(struct ostream *s, struct sbuf *sb)
{
    sbuf_puts(sb, "data: ");
    exit_event(sb, ostream_proc(s));
    sbuf_puts(sb, "\n\n");
}

static void out_ctx_free(struct ostream *s)
{
    free(ostream_ctx(s));
}

/* The run is request-scoped: a client that goes away takes its process tree with it. */
static void run_abort(struct ostream *s)
{
    struct proc *p = ostream_proc(s);
    if (proc_is_live(p))
        proc_kill(p);
    out_ctx_free(s);
}

static void run_end_free(struct ostream *s, struct sbuf *sb)
{
    run_end(s, sb);
    out_ctx_free(s);
}

static void follow_end_free(struct ostream *s, struct sbuf *sb)
{
    follow_end(s, sb);
    out_ctx_free(s);
}

#define SSE_HEADERS "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n"

static const struct ostream_ops run_ops = {
    .content_type = "text/event-stream",
    .extra_headers = SSE_HEADERS,
    .paces = true,
    .begin = run_begin,
    .rec = sse_rec,
    .gap = sse_gap,
    .end = run_end_free,
    .keepalive = sse_keepalive,
    .abort = run_abort,
};

static const struct ostream_ops follow_ops = {
    .content_type = "text/event-stream",
    .extra_headers = SSE_HEADERS,
    .rec = sse_rec,
    .gap = sse_gap,
    .end = follow_end_free,
    .keepalive = sse_keepalive,
    .abort = out_ctx_free,
};

/* GET .../stdout|stderr|output: {"pid":N,"lines":[...],"line_count":N,...}, streamed so a
 * large log never sits in memory. */
static void lines_begin(struct ostream *s, struct sbuf *sb)
{
    sbuf_puts(sb, "{\"pid\":");
    sbuf_put_i64(sb, ostream_proc(s)->pid);
    sbuf_puts(sb, ",\"lines\":[");
}

static void lines_rec(struct ostream *s, const struct obuf_rec *rec, struct sbuf *sb)
{
    struct out_ctx *c = ostream_ctx(s);
    if (!wanted(c, rec))
        return;
    if (!c->first)
        sbuf_putc(sb, ',');
    c->first = false;
    c->count++;
    sbuf_putc(sb, '"');
    ostream_json_text(sb, rec, line_len(rec));
    sbuf_putc(sb, '"');
}

static void lines_end(struct ostream *s, struct sbuf *sb)
{
    struct out_ctx *c = ostream_ctx(s);
    struct obuf_stats st;
    obuf_get_stats(ostream_proc(s)->out, &st);
    sbuf_puts(sb, "],\"line_count\":");
    sbuf_put_u64(sb, c->count);
    sbuf_printf(sb, ",\"truncated\":%s,\"dropped_bytes\":", st.truncated ? "true" : "false");
    sbuf_put_u64(sb, dropped_for(c, &st));
    sbuf_putc(sb, '}');
    out_ctx_free(s);
}

static const struct ostream_ops lines_ops = {
    .content_type = "application/json",
    .begin = lines_begin,
    .rec = lines_rec,
    .end = lines_end,
    .abort = out_ctx_free,
};

static void stream_output(struct app *app, struct http_req *r, struct proc *p,
                          const struct ostream_ops *ops, int stream, bool follow)
{
    struct out_ctx *c = xcalloc(1, sizeof(*c));
    c->stream = stream;
    c->first = true;
    ostream_start(app, r, p, ops, c, follow, KEEPALIVE_MS);
}

/* ------------------------------------------------------------------------------------------
 * Handlers
 */

static void h_health(struct app *app, struct http_req *r)
{
    static const char body[] = "{\"healthy\":true}";
    (void)app;
    http_reply(r, 200, "application/json", NULL, body, sizeof(body) - 1);
}

static void h_info(struct app *app, struct http_req *r)
{
    struct sbuf sb = SBUF_INIT;
    struct json_w w;
    json_init(&w, &sb);
    json_obj_begin(&w);
    json_kv_str(&w, "version", SANDBOXD_VERSION);
    json_kv_int(&w, "uptime_secs", (now_ms() - app->start_ms) / 1000);
    json_kv_int(&w, "running_processes", proc_count_running(app->procs));
    json_kv_int(&w, "total_processes", proc_count_total(app->procs));
    json_obj_end(&w);
    http_reply_json(r, 200, &sb);
    sbuf_free(&sb);
}

static void h_list(struct app *app, struct http_req *r)
{
    struct sbuf sb = SBUF_INIT;
    struct json_w w;
    json_init(&w, &sb);
    json_obj_begin(&w);
    json_key(&w, "processes");
    json_arr_begin(&w);
    for (struct proc *p = proc_first(app->procs); p != NULL; p = proc_next(p))
        write_info(&w, p);
    json_arr_end(&w);
    json_obj_end(&w);
    http_reply_json(r, 200, &sb);
    sbuf_free(&sb);
}

static void stream_started(struct app *app, struct http_req *r, struct proc *p)
{
    stream_output(app, r, p, &run_ops, 0, true);
}

static void h_start(struct app *app, struct http_req *r)
{
    start_from_request(app, r, false);
}

static void h_run(struct app *app, struct http_req *r)
{
    start_from_request(app, r, true);
}

static void h_signal(struct app *app, struct http_req *r, struct proc *p)
{
    json_t *o = api_parse_object(r, 422), *v;
    (void)app;
    if (o == NULL)
        return;
    v = json_object_get(o, "signal");
    if (v == NULL || !json_is_integer(v)) {
        http_reply_error(r, 422, "INVALID_REQUEST", "\"signal\" must be an integer");
    } else if (json_integer_value(v) < 1 || json_integer_value(v) > SIGRTMAX) {
        http_reply_error(r, 400, "INVALID_SIGNAL", "invalid signal %lld",
                         (long long)json_integer_value(v));
    } else {
        int rc = proc_signal(p, (int)json_integer_value(v));
        if (rc == -ESRCH)
            http_reply_error(r, 400, "NOT_RUNNING", "process %d is not running", p->pid);
        else if (rc < 0)
            http_reply_error(r, 400, "INVALID_SIGNAL", "cannot send signal %lld: %s",
                             (long long)json_integer_value(v), strerror(-rc));
        else
            http_reply(r, 200, "application/json", NULL, "{\"success\":true}", 16);
    }
    json_decref(o);
}

static void h_kill(struct http_req *r, struct proc *p)
{
    if (proc_is_live(p))
        proc_kill(p);
    http_reply_empty(r, 204);
}

static void h_stdin(struct http_req *r, struct proc *p)
{
    int rc = proc_stdin_write(p, r->body, r->body_len);
    if (rc == -ENOBUFS)
        http_reply_error(r, 409, "STDIN_BUFFER_FULL",
                         "more than 1 MiB of stdin is waiting to be read by process %d", p->pid);
    else if (rc < 0)
        http_reply_error(r, 400, "STDIN_NOT_WRITABLE", "stdin of process %d is not writable",
                         p->pid);
    else
        http_reply_empty(r, 204);
}

static void h_stdin_close(struct http_req *r, struct proc *p)
{
    int rc = proc_stdin_close(p);
    if (rc < 0)
        http_reply_error(r, 400, "STDIN_NOT_PIPE",
                         "process %d was not started with stdin_mode \"pipe\"", p->pid);
    else
        http_reply_empty(r, 204);
}

/* {p}: all digits is a pid, anything else a process name. */
static struct proc *lookup(struct app *app, const char *id)
{
    if (str_is_digits(id)) {
        uint64_t v;
        if (parse_u64(id, strlen(id), &v) < 0 || v > 0x7fffffff)
            return NULL;
        return proc_by_pid(app->procs, (pid_t)v);
    }
    return proc_by_name(app->procs, id);
}

static void method_not_allowed(struct http_req *r)
{
    http_reply_error(r, 405, "METHOD_NOT_ALLOWED", "method %s not allowed on %s", r->method_str,
                     r->path);
}

static int stream_of(const char *s)
{
    if (strcmp(s, "stdout") == 0)
        return OBUF_STDOUT;
    if (strcmp(s, "stderr") == 0)
        return OBUF_STDERR;
    if (strcmp(s, "output") == 0)
        return 0;
    return -1;
}

/* Routes /api/v1/processes/{p}[/...]; seg points at "{p}", n segments from there. */
static void route_process(struct app *app, struct http_req *r, char **seg, int n)
{
    enum http_method m = r->method == HTTP_M_HEAD ? HTTP_M_GET : r->method;
    struct proc *p = lookup(app, seg[0]);
    int stream = n >= 2 ? stream_of(seg[1]) : -1;

    /* Decide the route (and the method) before the lookup so 404/405 are consistent. */
    bool known = n == 1 || (n == 2 && (strcmp(seg[1], "signal") == 0 ||
                                       strcmp(seg[1], "stdin") == 0 || stream >= 0)) ||
                 (n == 3 && strcmp(seg[1], "stdin") == 0 && strcmp(seg[2], "close") == 0) ||
                 (n == 3 && stream >= 0 && strcmp(seg[2], "follow") == 0);
    if (!known) {
        http_reply_error(r, 404, "NOT_FOUND", "no such route: %s", r->path);
        return;
    }
    enum http_method want = n == 1 ? (m == HTTP_M_DELETE ? HTTP_M_DELETE : HTTP_M_GET)
                            : stream >= 0 ? HTTP_M_GET
                                          : HTTP_M_POST;
    if (m != want) {
        method_not_allowed(r);
        return;
    }
    if (p == NULL) {
        http_reply_error(r, 404, "NOT_FOUND", "Process %s not found", seg[0]);
        return;
    }
    if (n == 1) {
        if (m == HTTP_M_DELETE)
            h_kill(r, p);
        else
            reply_info(r, 200, p);
    } else if (strcmp(seg[1], "signal") == 0) {
        h_signal(app, r, p);
    } else if (strcmp(seg[1], "stdin") == 0) {
        if (n == 2)
            h_stdin(r, p);
        else
            h_stdin_close(r, p);
    } else if (n == 2) {
        stream_output(app, r, p, &lines_ops, stream, false);
    } else {
        stream_output(app, r, p, &follow_ops, stream, true);
    }
}

bool api_tensorlake_route(struct app *app, struct http_req *r)
{
    enum http_method m = r->method == HTTP_M_HEAD ? HTTP_M_GET : r->method;

    if (r->nseg < 3 || strcmp(r->seg[0], "api") != 0 || strcmp(r->seg[1], "v1") != 0)
        return false;
    const char *what = r->seg[2];
    int n = r->nseg - 3;
    char **rest = r->seg + 3;

    if (strcmp(what, "health") == 0 && n == 0) {
        if (m == HTTP_M_GET)
            h_health(app, r);
        else
            method_not_allowed(r);
    } else if (strcmp(what, "info") == 0 && n == 0) {
        if (m == HTTP_M_GET)
            h_info(app, r);
        else
            method_not_allowed(r);
    } else if (strcmp(what, "processes") == 0 && n == 0) {
        if (m == HTTP_M_GET)
            h_list(app, r);
        else if (m == HTTP_M_POST)
            h_start(app, r);
        else
            method_not_allowed(r);
    } else if (strcmp(what, "processes") == 0 && n == 1 && strcmp(rest[0], "run") == 0 &&
               m == HTTP_M_POST) {
        h_run(app, r);
    } else if (strcmp(what, "processes") == 0 && n >= 1) {
        route_process(app, r, rest, n);
    } else {
        http_reply_error(r, 404, "NOT_FOUND", "no such route: %s", r->path);
    }
    return true;
}
