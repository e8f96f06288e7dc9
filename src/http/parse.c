/*
 * Request parsing: llhttp callbacks assemble one struct http_req at a time into per-connection
 * buffers. No libuv here: the connection code feeds bytes and reacts to the events returned
 * by http__parser_feed(), so tests can drive this file with plain strings.
 *
 * Everything the request points at lives in p->hbuf (target, header names and values, a copy
 * of the path) and p->body. hbuf can move while it grows, so the callbacks record offsets and
 * the pointers are fixed once, when the header section is complete; nothing is appended to
 * hbuf after that (trailers of a chunked body are counted against the limit, then dropped).
 *
 * llhttp is paused at the end of the header section (so the caller can answer "Expect:
 * 100-continue" and switch timers) and at the end of each request, so pipelined requests
 * wait in the caller's buffer until the current one has been answered.
 */
#include <assert.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "http/http.h"
#include "server/server.h"

static struct http_parser *parser_of(llhttp_t *ll)
{
    return container_of(ll, struct http_parser, ll);
}

static int fail(struct http_parser *p, int status, const char *code, const char *msg)
{
    p->err_status = status;
    p->err_code = code;
    p->err_msg = msg;
    return HPE_USER;
}

static int fail_431(struct http_parser *p)
{
    return fail(p, 431, "HEADERS_TOO_LARGE", "request header section too large");
}

static int fail_413(struct http_parser *p)
{
    return fail(p, 413, "PAYLOAD_TOO_LARGE", "request body too large");
}

/* Appends header-section bytes; the stored size can never exceed the raw size, so checking it
 * here bounds memory even when one read carries far more than the limit. */
static int store(struct http_parser *p, const char *at, size_t n)
{
    if (p->hbuf.len + n >= HTTP_MAX_HEADER_BYTES)
        return fail_431(p);
    sbuf_append(&p->hbuf, at, n);
    return 0;
}

static int store_nul(struct http_parser *p)
{
    return store(p, "", 1);
}

static int count_trailer(struct http_parser *p, size_t n)
{
    p->trailer_bytes += n;
    return p->trailer_bytes > HTTP_MAX_HEADER_BYTES ? fail_431(p) : 0;
}

/* ---- llhttp callbacks ---- */

static int on_message_begin(llhttp_t *ll)
{
    parser_of(ll)->in_message = true;
    return 0;
}

static int on_url(llhttp_t *ll, const char *at, size_t n)
{
    return store(parser_of(ll), at, n);
}

static int on_url_complete(llhttp_t *ll)
{
    return store_nul(parser_of(ll));
}

static int on_header_field(llhttp_t *ll, const char *at, size_t n)
{
    struct http_parser *p = parser_of(ll);
    if (p->headers_done)
        return count_trailer(p, n);
    if (!p->in_field) {
        if (p->req.nheaders == HTTP_MAX_HEADERS)
            return fail(p, 431, "HEADERS_TOO_LARGE", "too many request headers");
        p->name_off[p->req.nheaders] = (uint32_t)p->hbuf.len;
        p->in_field = true;
    }
    return store(p, at, n);
}

static int on_header_field_complete(llhttp_t *ll)
{
    struct http_parser *p = parser_of(ll);
    if (p->headers_done)
        return 0;
    int rc = store_nul(p);
    p->value_off[p->req.nheaders] = (uint32_t)p->hbuf.len;
    p->in_field = false;
    return rc;
}

static int on_header_value(llhttp_t *ll, const char *at, size_t n)
{
    struct http_parser *p = parser_of(ll);
    if (p->headers_done)
        return count_trailer(p, n);
    return store(p, at, n);
}

static int on_header_value_complete(llhttp_t *ll)
{
    struct http_parser *p = parser_of(ll);
    if (p->headers_done)
        return 0;
    uint32_t *start = &p->value_off[p->req.nheaders];
    while (*start < p->hbuf.len && (p->hbuf.buf[*start] == ' ' || p->hbuf.buf[*start] == '\t'))
        (*start)++;
    while (p->hbuf.len > *start &&
           (p->hbuf.buf[p->hbuf.len - 1] == ' ' || p->hbuf.buf[p->hbuf.len - 1] == '\t'))
        p->hbuf.len--;
    int rc = store_nul(p);
    if (rc == 0)
        p->req.nheaders++;
    return rc;
}

static enum http_method method_of(uint8_t m)
{
    switch (m) {
    case HTTP_GET: return HTTP_M_GET;
    case HTTP_HEAD: return HTTP_M_HEAD;
    case HTTP_POST: return HTTP_M_POST;
    case HTTP_PUT: return HTTP_M_PUT;
    case HTTP_DELETE: return HTTP_M_DELETE;
    case HTTP_OPTIONS: return HTTP_M_OPTIONS;
    case HTTP_PATCH: return HTTP_M_PATCH;
    default: return HTTP_M_OTHER;
    }
}

/* Finds the path inside a request target: origin-form "/p?q", absolute-form
 * "http://host/p?q", or "*". Sets *ret_len to the path length (up to '?'). */
static const char *path_of(const char *target, size_t *ret_len)
{
    const char *s = target;
    if (*s != '/' && *s != '*') {
        const char *scheme = strstr(s, "://");
        if (scheme != NULL) {
            s = scheme + 3;
            s += strcspn(s, "/?");
        }
    }
    *ret_len = strcspn(s, "?");
    return s;
}

static int on_headers_complete(llhttp_t *ll)
{
    struct http_parser *p = parser_of(ll);
    struct http_req *r = &p->req;

    if (p->in_field)
        return fail(p, 400, "BAD_REQUEST", "malformed header");
    r->method = method_of(ll->method);
    r->method_str = llhttp_method_name((llhttp_method_t)ll->method);
    p->http10 = ll->http_major == 1 && ll->http_minor == 0;

    /* The path copy goes to the end of hbuf before any pointer is taken. */
    size_t target_len = strlen(p->hbuf.buf);
    size_t path_len;
    const char *path = path_of(p->hbuf.buf, &path_len);
    size_t path_at = (size_t)(path - p->hbuf.buf);
    size_t query_at = path_at + path_len < target_len ? path_at + path_len + 1 : 0;
    size_t copy_at = p->hbuf.len;
    /* Grow first: appending hbuf to itself must not read from a buffer realloc freed. */
    sbuf_reserve(&p->hbuf, path_len + 2);
    if (path_len == 0)
        sbuf_append(&p->hbuf, "/", 1);
    else
        sbuf_append(&p->hbuf, p->hbuf.buf + path_at, path_len);
    sbuf_append(&p->hbuf, "", 1);
    p->headers_done = true;

    char *b = p->hbuf.buf;
    r->target = b;
    r->path = b + copy_at;
    r->query = query_at ? b + query_at : "";
    for (int i = 0; i < r->nheaders; i++) {
        r->headers[i].name = b + p->name_off[i];
        r->headers[i].value = b + p->value_off[i];
    }
    http__split_path(r, r->path);

    bool body_follows = (ll->flags & F_CHUNKED) || ll->content_length > 0;
    if ((ll->flags & F_CONTENT_LENGTH) && !(ll->flags & F_CHUNKED)) {
        if (ll->content_length > p->max_body)
            return fail_413(p);
        /* Pre-size for small bodies only: headers alone must not pin max_body of memory. */
        sbuf_reserve(&p->body, (size_t)MIN(ll->content_length, 64 * 1024));
    }
    const char *expect = http_header(r, "expect");
    if (expect != NULL && strcasecmp(expect, "100-continue") == 0 && !p->http10 && body_follows)
        p->expect_continue = true;
    return HPE_PAUSED;
}

static int on_body(llhttp_t *ll, const char *at, size_t n)
{
    struct http_parser *p = parser_of(ll);
    if (n > p->max_body - p->body.len)
        return fail_413(p);
    sbuf_append(&p->body, at, n);
    return 0;
}

static int on_message_complete(llhttp_t *ll)
{
    struct http_parser *p = parser_of(ll);
    struct http_req *r = &p->req;
    r->body = p->body.buf != NULL ? p->body.buf : "";
    r->body_len = p->body.len;
    /* An upgrade (or CONNECT) would switch protocols after this message; we never do, so the
     * connection cannot carry another request. */
    r->keep_alive = llhttp_should_keep_alive(ll) && !ll->upgrade;
    p->done = true;
    return HPE_PAUSED;
}

static const llhttp_settings_t settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_url_complete = on_url_complete,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- parser API ---- */

static void req_clear(struct http_req *r)
{
    for (int i = 0; i < r->nseg && i < HTTP_MAX_SEGS; i++)
        free(r->seg[i]);
    struct http_conn *conn = r->conn;
    uint64_t id = r->conn_id;
    memset(r, 0, sizeof(*r));
    r->conn = conn;
    r->conn_id = id;
    r->method_str = "";
    r->target = r->path = r->query = r->body = "";
}

void http__parser_init(struct http_parser *p, size_t max_body)
{
    memset(p, 0, sizeof(*p));
    llhttp_init(&p->ll, HTTP_REQUEST, &settings);
    p->max_body = max_body;
    req_clear(&p->req);
}

void http__parser_free(struct http_parser *p)
{
    req_clear(&p->req);
    sbuf_free(&p->hbuf);
    sbuf_free(&p->body);
}

void http__parser_next(struct http_parser *p)
{
    req_clear(&p->req);
    /* Keep a small header buffer for the next request; anything bigger goes back. */
    if (p->hbuf.cap > 2048)
        sbuf_free(&p->hbuf);
    else
        sbuf_reset(&p->hbuf);
    sbuf_free(&p->body);
    p->hdr_bytes = p->trailer_bytes = 0;
    p->in_message = p->headers_done = p->in_field = p->expect_continue = p->done = false;
    if (llhttp_get_errno(&p->ll) == HPE_PAUSED)
        llhttp_resume(&p->ll);
}

enum http_parse_ev http__parser_feed(struct http_parser *p, const char *data, size_t len,
                                     size_t *ret_used)
{
    assert(!p->done);
    if (llhttp_get_errno(&p->ll) == HPE_PAUSED)
        llhttp_resume(&p->ll);

    bool in_headers = !p->headers_done;
    llhttp_errno_t e = llhttp_execute(&p->ll, data, len);
    size_t used = len;
    if (e == HPE_PAUSED)
        used = (size_t)(llhttp_get_error_pos(&p->ll) - data);
    *ret_used = used;

    if (e != HPE_OK && e != HPE_PAUSED) {
        if (p->err_status == 0)
            fail(p, 400, "BAD_REQUEST", "malformed HTTP request");
        return HTTP_P_ERROR;
    }
    /* Raw size of the header section, blank lines before the request line included. */
    if (in_headers) {
        p->hdr_bytes += used;
        if (p->hdr_bytes > HTTP_MAX_HEADER_BYTES) {
            fail_431(p);
            return HTTP_P_ERROR;
        }
    }
    if (p->done)
        return HTTP_P_REQUEST;
    if (e == HPE_PAUSED)
        return HTTP_P_HEADERS;
    return HTTP_P_MORE;
}

void http__split_path(struct http_req *r, const char *path)
{
    const char *s = path;
    int n = 0;

    if (*s == '/')
        s++;
    while (*s != '\0') {
        size_t len = strcspn(s, "/");
        if (n == HTTP_MAX_SEGS || pct_decode(s, len, &r->seg[n]) < 0)
            goto fail;
        n++;
        if (s[len] == '\0')
            break;
        s += len + 1;   /* a trailing '/' ends the loop: no empty last segment */
    }
    r->nseg = n;
    return;
fail:
    while (n > 0)
        free(r->seg[--n]);
    memset(r->seg, 0, sizeof(r->seg));
    r->nseg = -1;
}

const char *http_header(const struct http_req *r, const char *name)
{
    for (int i = 0; i < r->nheaders; i++)
        if (strcasecmp(r->headers[i].name, name) == 0)
            return r->headers[i].value;
    return NULL;
}
