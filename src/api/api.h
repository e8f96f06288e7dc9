/*
 * api: the wire dialects. Each dialect file translates HTTP requests into proc core calls and
 * core state back into its own JSON shapes; none of them touches fds or libuv handles
 * directly (the output pump in ostream.c is the one shared piece that streams records).
 *
 * api.c is the entry point given to the HTTP server: it checks auth, then offers the request
 * to each dialect's router in turn.
 */
#ifndef SANDBOXD_API_H
#define SANDBOXD_API_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "http/http.h"
#include "proc/proc.h"

#define SANDBOXD_VERSION "0.1.0"

enum { DIALECT_TENSORLAKE = 1, DIALECT_BLAXEL = 2 };

struct app {
    uv_loop_t *loop;
    struct proc_table *procs;
    const char *token;       /* NULL: no auth */
    size_t token_len;
    int64_t start_ms;
    bool is_root;
};

/* The http_handler_fn given to the server; arg is the struct app. */
void api_handle(struct http_req *r, void *arg);

/* Dialect routers: return true if the path belongs to the dialect (the request is then
 * answered, now or later), false to let the next router look. */
bool api_tensorlake_route(struct app *app, struct http_req *r);
bool api_blaxel_route(struct app *app, struct http_req *r);

/* ---- helpers shared by the dialects (api.c) ---- */

/* Parses the body as a JSON object. On failure answers 400 INVALID_JSON, or shape_status
 * (Tensorlake 422, Blaxel 400) if it is valid JSON but not an object, and returns NULL. */
json_t *api_parse_object(struct http_req *r, int shape_status);

/* Maps a proc_start() error to an HTTP answer {"error": msg, "code": ...}. */
void api_reply_spawn_error(struct http_req *r, int err, const char *msg);

/* Reads an optional string-to-string object into parallel key/value arrays (borrowed from
 * the json_t). Returns 0, or -EINVAL with *ret_bad naming the offending key. */
int api_env_pairs(json_t *obj, const char ***ret_keys, const char ***ret_vals, size_t *ret_n);

/* ---- ostream: pumps a process's output records into an HTTP chunked stream ----
 *
 * The pump begins the HTTP stream itself (200, ops->content_type, ops->extra_headers, then
 * ops->begin's bytes), so the caller must not have answered r. It reads the obuf from
 * `cursor` in bounded batches, formats each record through ops, pauses while the
 * connection has HTTP_STREAM_HIGH bytes queued (a slow client costs no memory and never
 * slows the child: it catches up from the log file later), sends a keepalive every
 * keepalive_ms, and ends:
 *   follow=true:  after the process is DONE and every record was sent: ops->end, stream end;
 *   follow=false: once it reached the end offset the log had when the pump started.
 * If the client goes away, ops->abort runs (if set) and the pump frees itself.
 */
struct ostream;
struct obuf_rec;

struct ostream_ops {
    const char *content_type;
    const char *extra_headers;   /* CRLF-terminated lines, or NULL */
    /* The answer of the request that started the process (run, exec with streaming): the
     * child is paced by this reader, as by a terminal, rather than outrunning it (see
     * ostream.c). Followers never pace the child (reliability req. 13). */
    bool paces;
    /* First bytes of the body (e.g. the run stream's start event). May be NULL. */
    void (*begin)(struct ostream *s, struct sbuf *sb);
    /* Appends the formatted record to sb (or nothing to skip it). */
    void (*rec)(struct ostream *s, const struct obuf_rec *rec, struct sbuf *sb);
    /* Records before the retained window were dropped: dropped log bytes. */
    void (*gap)(struct ostream *s, uint64_t dropped, struct sbuf *sb);
    /* Final bytes (e.g. the exit event, a closing "]}"). */
    void (*end)(struct ostream *s, struct sbuf *sb);
    /* Keepalive bytes (e.g. an SSE comment). NULL: no keepalives. */
    void (*keepalive)(struct ostream *s, struct sbuf *sb);
    /* The client went away before the end. */
    void (*abort)(struct ostream *s);
};

/* Appends rec->data[0..n) as JSON string content (no quotes): copied as is when the record
 * is known to be plain (OBUF_F_PLAIN, learnt at capture), escaped otherwise. */
void ostream_json_text(struct sbuf *sb, const struct obuf_rec *rec, size_t n);

struct ostream *ostream_start(struct app *app, struct http_req *r, struct proc *p,
                              const struct ostream_ops *ops, void *ctx, bool follow,
                              uint32_t keepalive_ms);
void *ostream_ctx(struct ostream *s);
struct proc *ostream_proc(struct ostream *s);

#endif
