/*
 * http: the HTTP/1.1 server the API dialects sit on. server/ owns the listener and the
 * connection lifecycle (libuv TCP, timeouts, limits); http/ owns request parsing (llhttp),
 * the response writer and chunked streaming. This header is the contract api/ uses.
 *
 * One request at a time per connection (pipelined requests wait their turn). A request is
 * handed to the handler once its body is complete; the handler must eventually answer with
 * exactly one of http_reply*() or http_stream_begin() ... http_stream_end(), possibly later
 * (asynchronously). If the client goes away before that, the request is aborted: the
 * handler's abort callback (http_req_on_abort) runs and the request must not be used after.
 *
 * Limits (answers the client sees): header section > HTTP_MAX_HEADER_BYTES or more than
 * HTTP_MAX_HEADERS headers: 431 and close; headers not complete within header_timeout_ms:
 * connection closed; body > max_body: 413 and close; malformed HTTP: 400 and close.
 * Idle keep-alive connections close after idle_timeout_ms. Sockets get TCP_NODELAY.
 */
#ifndef SANDBOXD_HTTP_H
#define SANDBOXD_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "util/util.h"

#define HTTP_MAX_HEADERS 64
#define HTTP_MAX_HEADER_BYTES (16 * 1024)
#define HTTP_MAX_SEGS 8
#define HTTP_STREAM_HIGH (256 * 1024)   /* producers pause when this much is queued */

enum http_method { HTTP_M_OTHER = 0, HTTP_M_GET, HTTP_M_HEAD, HTTP_M_POST, HTTP_M_PUT,
                   HTTP_M_DELETE, HTTP_M_OPTIONS, HTTP_M_PATCH };

struct http_header {
    const char *name;    /* as received, NUL-terminated */
    const char *value;   /* NUL-terminated, surrounding whitespace trimmed */
};

struct http_req {
    enum http_method method;
    const char *method_str;
    const char *target;          /* raw request target, NUL-terminated */
    const char *path;            /* raw path (before '?'), NUL-terminated */
    const char *query;           /* after '?', or "" */
    /* path split on '/', each segment percent-decoded; "/a/b%2Fc" -> {"a","b/c"} */
    char *seg[HTTP_MAX_SEGS];
    int nseg;                    /* -1: more than HTTP_MAX_SEGS segments or a bad escape */
    struct http_header headers[HTTP_MAX_HEADERS];
    int nheaders;
    const char *body;            /* NUL-terminated for convenience; body_len excludes it */
    size_t body_len;
    bool keep_alive;
    uint64_t conn_id;            /* for logs */
    void *user;                  /* free for the handler's use */
    /* private */
    struct http_conn *conn;
};

/* Case-insensitive header lookup; NULL if absent. */
const char *http_header(const struct http_req *r, const char *name);

typedef void http_handler_fn(struct http_req *r, void *arg);

struct http_config {
    const char *host;            /* "127.0.0.1", "0.0.0.0", "::1" ... */
    int port;                    /* 0: pick a free port */
    size_t max_body;             /* bytes (default 1 MiB) */
    uint32_t header_timeout_ms;  /* default 10000 */
    uint32_t idle_timeout_ms;    /* default 60000 */
    uint32_t write_timeout_ms;   /* a write that makes no progress this long drops the conn (30000) */
    uint32_t max_conns;          /* default 1024; beyond: accept paused */
    http_handler_fn *handler;
    void *handler_arg;
};

struct http_server;

/* Binds and listens. ret_port receives the bound port. Errors are negative errno (UV_E*). */
int http_server_start(uv_loop_t *loop, const struct http_config *cfg, struct http_server **ret,
                      int *ret_port);
/* Stops accepting; open connections are closed (streams aborted); calls done_cb when all
 * handles are closed, then the server is freed. */
void http_server_stop(struct http_server *s, void (*done_cb)(void *arg), void *arg);

/* ---- plain responses ----
 * Each sends the whole response and completes the request. Content-Length is always set.
 * extra_headers: NULL or CRLF-terminated lines ("Cache-Control: no-cache\r\n"). */
void http_reply(struct http_req *r, int status, const char *content_type,
                const char *extra_headers, const char *body, size_t len);
void http_reply_json(struct http_req *r, int status, const struct sbuf *json);
/* {"error": <msg>, "code": <code>}; code may be NULL (omitted). */
void http_reply_error(struct http_req *r, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void http_reply_empty(struct http_req *r, int status);  /* e.g. 204 */

/* ---- streamed responses (chunked) ---- */
struct http_stream_ops {
    /* Queued bytes fell below HTTP_STREAM_HIGH/4 after having been above it: produce more. */
    void (*on_drain)(struct http_req *r, void *arg);
};
/* Registers a callback run if the request is aborted (client gone, write deadline, server
 * stop) before it completed. After it runs, r is invalid. */
void http_req_on_abort(struct http_req *r, void (*cb)(struct http_req *r, void *arg), void *arg);

/* Sends the status line and headers with Transfer-Encoding: chunked (not sent yet: queued
 * and coalesced with the first chunk, or the end, for up to a few ms). */
void http_stream_begin(struct http_req *r, int status, const char *content_type,
                       const char *extra_headers, const struct http_stream_ops *ops, void *arg);
/* Queues one chunk (copied). Never blocks; check http_stream_queued() to apply backpressure. */
void http_stream_write(struct http_req *r, const char *data, size_t n);
/* The same for a chunk that belongs with the head (a stream's opening event): it waits with
 * the head instead of being written at the next loop turn. */
void http_stream_write_held(struct http_req *r, const char *data, size_t n);
/* Gives the caller a place to format directly into the send buffer: returns a pointer to at
 * least n writable bytes; commit with http_stream_commit(r, used). */
char *http_stream_reserve(struct http_req *r, size_t n);
void http_stream_commit(struct http_req *r, size_t used);
/* Formats one chunk in place: returns the connection's send buffer, to which the caller
 * appends the chunk's bytes (sbuf_* calls, json_escape...), then http_stream_chunk_end().
 * Saves the copy http_stream_write makes; nothing else may be written to r in between. */
struct sbuf *http_stream_chunk_begin(struct http_req *r);
void http_stream_chunk_end(struct http_req *r);
size_t http_stream_queued(const struct http_req *r);
/* Ends the chunked body; the request completes once it is written. */
void http_stream_end(struct http_req *r);

/* HTTP reason phrase for a status code. */
const char *http_status_text(int status);

#endif
