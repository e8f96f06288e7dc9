/*
 * json: a streaming JSON writer that appends to an sbuf. No libuv. Reading JSON is jansson's
 * job (api/ calls it directly); this module only writes.
 *
 * Strings are emitted as valid UTF-8 whatever the input: each byte that is not part of a
 * well-formed UTF-8 sequence becomes U+FFFD, control characters are escaped, and '<', '>'
 * and '&' are left alone. So captured output can never break JSON or SSE framing
 * (a "\n\ndata:" inside a line is just an escaped string).
 *
 * Commas and colons are inserted automatically: call json_key() before each value inside an
 * object. Nesting depth is limited to JSON_MAX_DEPTH (asserted).
 */
#ifndef SANDBOXD_JSON_H
#define SANDBOXD_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/util.h"

#define JSON_MAX_DEPTH 32

struct json_w {
    struct sbuf *sb;
    int depth;
    uint32_t first;    /* bit d set: nothing written yet at depth d */
    bool after_key;    /* a key was written, the value comes next (no comma) */
};

void json_init(struct json_w *w, struct sbuf *sb);  /* appends to sb from its current len */
void json_obj_begin(struct json_w *w);
void json_obj_end(struct json_w *w);
void json_arr_begin(struct json_w *w);
void json_arr_end(struct json_w *w);
void json_key(struct json_w *w, const char *key);   /* key must be plain ASCII (not escaped) */
void json_str(struct json_w *w, const char *s);     /* NULL writes null */
void json_strn(struct json_w *w, const char *s, size_t n);
void json_int(struct json_w *w, int64_t v);
void json_uint(struct json_w *w, uint64_t v);
void json_double(struct json_w *w, double v);       /* non-finite writes null */
void json_bool(struct json_w *w, bool v);
void json_null_value(struct json_w *w);   /* not json_null: jansson exports that name */
/* Appends already-serialized JSON text as one value (caller guarantees validity). */
void json_raw(struct json_w *w, const char *s, size_t n);

/* Convenience: key + value. */
void json_kv_str(struct json_w *w, const char *key, const char *s);
void json_kv_strn(struct json_w *w, const char *key, const char *s, size_t n);
void json_kv_int(struct json_w *w, const char *key, int64_t v);
void json_kv_bool(struct json_w *w, const char *key, bool v);
void json_kv_null(struct json_w *w, const char *key);

/* Appends the escaped form of s[0..n) to sb, without quotes (same rules as json_strn). */
void json_escape(struct sbuf *sb, const char *s, size_t n);

/* True if s[0..n) is printable ASCII needing no escape (then it can be copied verbatim). */
bool json_plain(const char *s, size_t n);

/* memchr(s, '\n', n) that also tells, in *ret_plain, whether the bytes before the newline
 * (all n bytes if there is none) are json_plain. One pass over each byte in the usual case
 * of a plain line, so output capture learns for free that a line needs no escaping. */
const char *json_scan_line(const char *s, size_t n, bool *ret_plain);
/* json_scan_line that also copies the line: dst (room for n bytes) receives at least the
 * bytes before the newline (all n if there is none), possibly some after it, never more. */
const char *json_scan_copy_line(char *dst, const char *s, size_t n, bool *ret_plain);

/* Length of the longest prefix of s[0..n) that does not end inside a UTF-8 sequence that
 * could still be completed by more bytes; used to cut long lines at a character boundary. */
size_t utf8_cut(const char *s, size_t n);

#endif
