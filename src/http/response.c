/*
 * Response writer: plain replies, JSON errors and chunked streams, formatted straight into
 * the connection's fill buffer (c->out). server/conn.c owns when those bytes hit the socket:
 * one uv_write in flight per connection, everything queued meanwhile goes out in the next.
 *
 * A streamed chunk is "<hex>\r\n<data>\r\n" built in place: http_stream_reserve() leaves room
 * for the size line in front of the caller's bytes and http_stream_commit() writes it once the
 * size is known. The size is written with as many hex digits as the reserved size needed, so
 * a short commit has leading zeros ("00a5"), which the chunk-size grammar (1*HEXDIG) allows;
 * this keeps the data where the caller formatted it (no memmove on the hot path).
 *
 * After a connection closes, a request whose handler registered no abort callback is an
 * orphan: the calls below still accept it and drop the bytes, and the final answer frees it.
 */
#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "http/http.h"
#include "json/json.h"
#include "server/server.h"

#define STREAM_CORK_MS 10            /* a streamed head waits this long for company */
#define STREAM_WRITE_NOW (16 * 1024) /* queued stream bytes written without waiting */

const char *http_status_text(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Payload Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Entity";
    case 425: return "Too Early";
    case 426: return "Upgrade Required";
    case 428: return "Precondition Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    case 507: return "Insufficient Storage";
    default: break;
    }
    switch (status / 100) {
    case 1: return "Informational";
    case 2: return "Success";
    case 3: return "Redirection";
    case 4: return "Client Error";
    default: return "Server Error";
    }
}

/* 1xx, 204 and 304 answers never carry a body; 1xx and 204 not even Content-Length
 * (RFC 9110 8.6). */
static bool status_has_body(int status)
{
    return status >= 200 && status != 204 && status != 304;
}

/* length: the Content-Length to announce; -1 for chunked, -2 for none (close-delimited or
 * bodyless status). */
static void put_head(struct sbuf *sb, int status, const char *content_type,
                     const char *extra_headers, long long length, bool keep_alive)
{
    /* Every answer has a head: pieces, not printf (~1,800 instructions less per answer). */
    sbuf_puts(sb, "HTTP/1.1 ");
    sbuf_put_u64(sb, (uint64_t)status);
    sbuf_puts(sb, " ");
    sbuf_puts(sb, http_status_text(status));
    sbuf_puts(sb, "\r\n");
    if (content_type != NULL) {
        sbuf_puts(sb, "Content-Type: ");
        sbuf_puts(sb, content_type);
        sbuf_puts(sb, "\r\n");
    }
    if (length >= 0) {
        sbuf_puts(sb, "Content-Length: ");
        sbuf_put_u64(sb, (uint64_t)length);
        sbuf_puts(sb, "\r\n");
    } else if (length == -1)
        sbuf_puts(sb, "Transfer-Encoding: chunked\r\n");
    sbuf_puts(sb, keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n");
    sbuf_puts(sb, "Access-Control-Allow-Origin: *\r\n");
    if (extra_headers != NULL)
        sbuf_puts(sb, extra_headers);
    sbuf_puts(sb, "\r\n");
}

void http__format_reply(struct http_conn *c, int status, const char *content_type,
                        const char *extra_headers, const char *body, size_t len,
                        bool keep_alive)
{
    bool has_body = status_has_body(status);
    long long length = has_body || status == 304 ? (long long)len : -2;
    if (!has_body)
        len = 0;
    if (content_type == NULL && len > 0)
        content_type = "application/octet-stream";
    put_head(&c->out, status, content_type, extra_headers, length, keep_alive);
    if (len > 0 && !c->head)
        sbuf_append(&c->out, body, len);
}

void http__format_error_body(struct sbuf *sb, const char *code, const char *msg)
{
    sbuf_puts(sb, "{\"error\":\"");
    json_escape(sb, msg, strlen(msg));
    sbuf_puts(sb, "\"");
    if (code != NULL) {
        sbuf_puts(sb, ",\"code\":\"");
        json_escape(sb, code, strlen(code));
        sbuf_puts(sb, "\"");
    }
    sbuf_puts(sb, "}");
}

/* A dead connection (closed, abort callback already run) ignores everything; an orphan
 * still takes answers so that its last one can free it. */
static bool conn_dead(const struct http_conn *c)
{
    return c->closing && !c->orphan;
}

/* ---- plain responses ---- */

void http_reply(struct http_req *r, int status, const char *content_type,
                const char *extra_headers, const char *body, size_t len)
{
    struct http_conn *c = r->conn;
    if (conn_dead(c))
        return;
    assert(c->rstate == HTTP_RS_PENDING);
    if (!c->orphan) {
        c->resp_keep_alive = r->keep_alive;
        http__format_reply(c, status, content_type, extra_headers, body, len, r->keep_alive);
    }
    srv__conn_answered(c);
}

void http_reply_json(struct http_req *r, int status, const struct sbuf *json)
{
    http_reply(r, status, "application/json", NULL, json->buf, json->len);
}

void http_reply_error(struct http_req *r, int status, const char *code, const char *fmt, ...)
{
    struct sbuf msg = SBUF_INIT, body = SBUF_INIT;
    va_list ap;

    va_start(ap, fmt);
    sbuf_vprintf(&msg, fmt, ap);
    va_end(ap);
    http__format_error_body(&body, code, msg.buf != NULL ? msg.buf : "");
    http_reply(r, status, "application/json", NULL, body.buf, body.len);
    sbuf_free(&msg);
    sbuf_free(&body);
}

void http_reply_empty(struct http_req *r, int status)
{
    http_reply(r, status, NULL, NULL, NULL, 0);
}

/* ---- streamed responses ---- */

void http_req_on_abort(struct http_req *r, void (*cb)(struct http_req *r, void *arg), void *arg)
{
    struct http_conn *c = r->conn;
    c->abort_cb = cb;
    c->abort_arg = arg;
}

void http_stream_begin(struct http_req *r, int status, const char *content_type,
                       const char *extra_headers, const struct http_stream_ops *ops, void *arg)
{
    struct http_conn *c = r->conn;
    if (conn_dead(c))
        return;
    assert(c->rstate == HTTP_RS_PENDING);
    c->rstate = HTTP_RS_STREAM;
    c->ops = ops;
    c->ops_arg = arg;
    c->above_high = false;
    if (c->orphan)
        return;
    /* HTTP/1.0 has no chunked coding: the body then ends when the connection closes. */
    if (!c->chunked)
        r->keep_alive = false;
    c->resp_keep_alive = r->keep_alive;
    put_head(&c->out, status, content_type, extra_headers, c->chunked ? -1 : -2, r->keep_alive);
    /* Not written now: the head waits for the first chunk, or the end, up to STREAM_CORK_MS,
     * so a command that ends at once is answered in one write (one wakeup of the client). */
    srv__conn_kick(c, STREAM_CORK_MS);
}

/* Small chunks leave at the start of the next loop turn with whatever else this turn
 * queued (an exit event and the end of the body, say); big ones at once. */
static void stream_flush(struct http_conn *c)
{
    if (c->writing)
        return; /* on_write sends what queued up meanwhile */
    if (c->out.len >= STREAM_WRITE_NOW)
        srv__conn_flush(c);
    else
        srv__conn_kick(c, 0);
}

static unsigned hex_width(size_t n)
{
    unsigned w = 1;
    while (n >>= 4)
        w++;
    return w;
}

char *http_stream_reserve(struct http_req *r, size_t n)
{
    struct http_conn *c = r->conn;
    assert(c->rstate == HTTP_RS_STREAM || conn_dead(c));
    assert(!c->reserved);
    unsigned hw = c->chunked ? hex_width(n) : 0;
    size_t frame = c->chunked ? hw + 4 : 0;   /* size line CRLF + trailing CRLF */
    char *p = sbuf_reserve(&c->out, n + frame);
    c->reserved = true;
    c->resv_n = n;
    c->resv_hw = (uint8_t)hw;
    return c->chunked ? p + hw + 2 : p;
}

static void commit(struct http_req *r, size_t used, bool flush)
{
    static const char hexdig[] = "0123456789abcdef";
    struct http_conn *c = r->conn;
    assert(c->reserved && used <= c->resv_n);
    c->reserved = false;
    /* An empty chunk would end the body: commit nothing instead. */
    if (used == 0 || c->head || c->closing)
        return;
    char *p = c->out.buf + c->out.len;
    if (c->chunked) {
        unsigned hw = c->resv_hw;
        size_t v = used;
        for (unsigned i = hw; i > 0; i--, v >>= 4)
            p[i - 1] = hexdig[v & 15];
        p[hw] = '\r';
        p[hw + 1] = '\n';
        p[hw + 2 + used] = '\r';
        p[hw + 3 + used] = '\n';
        c->out.len += hw + 4 + used;
    } else {
        c->out.len += used;
    }
    c->out.buf[c->out.len] = '\0';
    if (http_stream_queued(r) >= HTTP_STREAM_HIGH)
        c->above_high = true;
    if (flush)
        stream_flush(c);
}

void http_stream_commit(struct http_req *r, size_t used)
{
    commit(r, used, true);
}

#define CHUNK_HDR "00000000\r\n" /* fixed width, so the body can be formatted before its size */

struct sbuf *http_stream_chunk_begin(struct http_req *r)
{
    struct http_conn *c = r->conn;
    assert(c->rstate == HTTP_RS_STREAM || conn_dead(c));
    assert(!c->reserved);
    c->reserved = true;
    c->chunk_at = c->out.len;
    if (c->chunked)
        sbuf_append(&c->out, CHUNK_HDR, sizeof(CHUNK_HDR) - 1);
    return &c->out;
}

void http_stream_chunk_end(struct http_req *r)
{
    static const char hexdig[] = "0123456789abcdef";
    struct http_conn *c = r->conn;
    size_t hdr = c->chunked ? sizeof(CHUNK_HDR) - 1 : 0;
    assert(c->reserved && c->out.len >= c->chunk_at + hdr);
    c->reserved = false;
    size_t used = c->out.len - c->chunk_at - hdr;
    if (used == 0 || c->head || c->closing || used > 0xffffffffu) {
        c->out.len = c->chunk_at; /* an empty chunk would end the body */
        if (c->out.buf != NULL)
            c->out.buf[c->out.len] = '\0';
        return;
    }
    if (c->chunked) {
        char *p = c->out.buf + c->chunk_at;
        size_t v = used;
        for (int i = 7; i >= 0; i--, v >>= 4)
            p[i] = hexdig[v & 15];
        sbuf_append(&c->out, "\r\n", 2);
    }
    if (http_stream_queued(r) >= HTTP_STREAM_HIGH)
        c->above_high = true;
    stream_flush(c);
}

static void write_chunk(struct http_req *r, const char *data, size_t n, bool flush)
{
    if (n == 0)
        return;
    memcpy(http_stream_reserve(r, n), data, n);
    commit(r, n, flush);
}

void http_stream_write(struct http_req *r, const char *data, size_t n)
{
    write_chunk(r, data, n, true);
}

void http_stream_write_held(struct http_req *r, const char *data, size_t n)
{
    write_chunk(r, data, n, false);
}

size_t http_stream_queued(const struct http_req *r)
{
    const struct http_conn *c = r->conn;
    if (c->closing)
        return 0;
    return c->out.len + (c->writing ? c->wr.len : 0);
}

void http_stream_end(struct http_req *r)
{
    struct http_conn *c = r->conn;
    if (conn_dead(c))
        return;
    assert(c->rstate == HTTP_RS_STREAM);
    if (c->chunked && !c->head && !c->orphan)
        sbuf_puts(&c->out, "0\r\n\r\n");
    srv__conn_answered(c);
}
