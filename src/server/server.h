/*
 * server: the private contract between http/ (request parser, response writer) and server/
 * (listener, connection lifecycle, timers). api/ never includes this file; it uses http.h.
 *
 * Ownership: a struct http_server owns its listener and every struct http_conn on its list.
 * A conn owns its parser (and so the request handed to the handler), its input buffer and its
 * two send buffers. A conn is freed only after both of its handles reported close_cb, and,
 * if it was closed while a handler still held a request without an abort callback, only
 * once that handler answered (the conn is then an "orphan": no socket, answers discarded).
 *
 * The parser half (struct http_parser, http__parser_*) is loop-free: it turns bytes into one
 * struct http_req at a time and is unit-tested by feeding it strings.
 */
#ifndef SANDBOXD_SERVER_H
#define SANDBOXD_SERVER_H

#include <llhttp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "http/http.h"
#include "util/util.h"

/* ---- request parser (http/parse.c) ---- */

enum http_parse_ev {
    HTTP_P_MORE,     /* all input consumed, request not complete yet */
    HTTP_P_HEADERS,  /* header section complete (req fields valid, body not yet) */
    HTTP_P_REQUEST,  /* request complete: req is ready; call http__parser_next() when done */
    HTTP_P_ERROR,    /* bad input: answer err_status (400, 413 or 431) and close */
};

struct http_parser {
    llhttp_t ll;
    struct http_req req;
    struct sbuf hbuf;            /* target, header names and values, decoded path, NUL-separated */
    struct sbuf body;
    uint32_t name_off[HTTP_MAX_HEADERS];
    uint32_t value_off[HTTP_MAX_HEADERS];
    size_t max_body;
    size_t hdr_bytes;            /* raw bytes of the current header section so far */
    size_t trailer_bytes;
    int err_status;              /* set with HTTP_P_ERROR */
    const char *err_code;        /* "BAD_REQUEST", "PAYLOAD_TOO_LARGE", ... */
    const char *err_msg;
    bool in_message;             /* first byte of a request seen */
    bool headers_done;
    bool in_field;               /* inside a header name */
    bool expect_continue;        /* "Expect: 100-continue" with a body to come */
    bool http10;                 /* HTTP/1.0 request: no chunked responses */
    bool done;                   /* HTTP_P_REQUEST returned, http__parser_next() not called */
};

void http__parser_init(struct http_parser *p, size_t max_body);
void http__parser_free(struct http_parser *p);
/* Parses data[0..len); *ret_used gets the bytes consumed (less than len after HTTP_P_HEADERS
 * or HTTP_P_REQUEST: feed the rest next). Must not be called between HTTP_P_REQUEST and
 * http__parser_next(). After HTTP_P_ERROR the parser is dead: close the connection. */
enum http_parse_ev http__parser_feed(struct http_parser *p, const char *data, size_t len,
                                     size_t *ret_used);
/* Releases the current request's storage (big buffers are freed, not kept) and readies the
 * parser for the next request on the connection. */
void http__parser_next(struct http_parser *p);
/* Splits path into p->req.seg / nseg (percent-decoded); exposed for tests. */
void http__split_path(struct http_req *r, const char *path);

/* ---- connection (server/conn.c) ---- */

enum http_rstate {
    HTTP_RS_NONE,      /* no request with the handler: reading / parsing */
    HTTP_RS_PENDING,   /* handler holds the request, no answer yet */
    HTTP_RS_STREAM,    /* streamed response begun, not ended */
    HTTP_RS_ANSWERED,  /* answer fully queued; completes when the send buffers are empty */
};

/* What the conn's single timer is doing. */
enum http_tmode {
    HTTP_T_NONE,
    HTTP_T_HEADER,   /* header section must be complete by hdr_deadline */
    HTTP_T_BODY,     /* body bytes must keep coming (idle_timeout_ms between reads) */
    HTTP_T_IDLE,     /* keep-alive wait for the next request */
    HTTP_T_WRITE,    /* queued bytes must make progress within write_timeout_ms */
    HTTP_T_SHRINK,   /* quiet stream: release the send buffers */
    HTTP_T_LINGER,   /* lingering close: wait for the peer's EOF */
    HTTP_T_KICK,     /* zero timeout: flush / complete outside the caller's stack */
    HTTP_T_CLOSE,    /* zero timeout: deferred close */
};

struct http_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wreq;
    uv_shutdown_t sreq;
    struct http_server *srv;     /* NULL once an orphan's handles are closed */
    struct list link;            /* in srv->conns while open */
    uint64_t id;
    struct http_parser p;
    struct sbuf in;              /* unparsed input kept across reads (pipelining) */
    size_t in_pos;
    struct sbuf out;             /* being filled */
    struct sbuf wr;              /* being written (one uv_write in flight at most) */
    uint64_t hdr_deadline;       /* uv_now() by which the header section must be complete */
    uint64_t last_progress;      /* uv_now() of the last write progress */
    uint64_t kick_at;            /* uv_now() at which a pending HTTP_T_KICK flushes */
    size_t last_wq;              /* write queue size seen at the last write-timer check */
    void (*abort_cb)(struct http_req *r, void *arg);
    void *abort_arg;
    const struct http_stream_ops *ops;
    void *ops_arg;
    size_t resv_n;               /* open http_stream_reserve(): bytes promised */
    uint8_t resv_hw;             /* hex digits reserved for its chunk header */
    size_t chunk_at;             /* open http_stream_chunk_begin(): offset of its header */
    uint8_t rstate;              /* enum http_rstate */
    uint8_t tmode;               /* enum http_tmode */
    uint8_t nopen;               /* handles not yet closed */
    bool writing;                /* a write is in flight; c->wr empty: the socket took it at
                                    once, the kick completes it */
    bool reading;
    bool closing;
    bool orphan;
    bool lingering;              /* answer sent, write side shut down, draining input */
    bool discard;                /* input is no longer parsed (after a parse error) */
    bool peer_eof;               /* the client shut its write side */
    bool hdr_armed;              /* hdr_deadline set for the request being read */
    bool dying;                  /* close scheduled (HTTP_T_CLOSE) */
    bool resp_keep_alive;        /* the answer said "Connection: keep-alive" */
    bool head;                   /* HEAD: the body is not sent */
    bool chunked;                /* streamed answer framed as chunks (false for HTTP/1.0) */
    bool above_high;             /* queued bytes went over HTTP_STREAM_HIGH */
    bool reserved;
};

#define SRV_READ_BUF (64 * 1024)

struct http_server {
    uv_loop_t *loop;
    struct http_config cfg;      /* defaults filled in; host not kept */
    uv_poll_t poll;              /* readability of the listening socket */
    uv_timer_t backoff;          /* accept back-off after EMFILE and friends */
    int fd;                      /* listening socket */
    struct list conns;
    uint32_t nconns;
    uint32_t nhandles;           /* open handles, ours and our conns' */
    uint64_t next_id;
    bool stopping;
    bool polling;
    bool backing_off;
    bool fd_short;               /* accept failed for lack of descriptors/memory */
    void (*done_cb)(void *arg);
    void *done_arg;
    char *rbuf;                  /* SRV_READ_BUF bytes shared by every conn (and server): reads
                                    are consumed synchronously */
};

/* server.c, for conn.c */
void srv__conn_gone(struct http_server *s);     /* a conn left s->conns: accept may resume */
void srv__handle_closed(struct http_server *s); /* one of the counted handles closed */

/* conn.c, for server.c */
void srv__conn_new(struct http_server *s, int fd);  /* takes fd; closes it on failure */
void srv__conn_close(struct http_conn *c);           /* aborts a pending request */

/* Starts a uv_write of the queued bytes unless one is in flight. */
void srv__conn_flush(struct http_conn *c);
/* The handler finished its answer (plain reply or stream end): completes the request once
 * the bytes are written. For an orphan, frees the conn. */
void srv__conn_answered(struct http_conn *c);
/* Flushes ms from now (0: at the start of the next loop turn), so bytes queued until then
 * share one write; an earlier pending kick is kept. */
void srv__conn_kick(struct http_conn *c, uint64_t ms);

/* ---- response writer (http/response.c) ---- */

/* Appends a complete plain response to c->out (status line, headers, body unless head). */
void http__format_reply(struct http_conn *c, int status, const char *content_type,
                        const char *extra_headers, const char *body, size_t len,
                        bool keep_alive);
/* Appends the JSON error body {"error": msg, "code": code} to sb. */
void http__format_error_body(struct sbuf *sb, const char *code, const char *msg);

#endif
