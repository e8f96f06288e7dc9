/*
 * json: streaming JSON writer into an sbuf, plus the UTF-8 sanitising string escaper.
 * It is not a parser (jansson reads requests) and it does not validate structure beyond
 * asserting the nesting depth: callers build well-formed documents by construction.
 *
 * json_escape is on the output hot path (every captured line goes through it), so it copies
 * runs of bytes that need no escaping with one memcpy, checks eight ASCII bytes at a time,
 * and validates multibyte UTF-8 inline instead of breaking the run.
 */
#include "json/json.h"

#include <assert.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- UTF-8 ---- */

/* Length of the well-formed UTF-8 sequence at s[0..n) (Unicode table 3-7: no overlongs, no
 * surrogates, nothing above U+10FFFF), or 0 if s does not start one. s[0] >= 0x80. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    if (c >= 0xC2 && c <= 0xDF)
        return n >= 2 && (s[1] & 0xC0) == 0x80 ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        if (n < 3 || (s[2] & 0xC0) != 0x80)
            return 0;
        unsigned char lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
        return s[1] >= lo && s[1] <= hi ? 3 : 0;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (n < 4 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
            return 0;
        unsigned char lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
        return s[1] >= lo && s[1] <= hi ? 4 : 0;
    }
    return 0;
}

/* Sequence length announced by lead byte c, or 0 if c can never start a valid sequence. */
static size_t utf8_lead_len(unsigned char c)
{
    if (c >= 0xC2 && c <= 0xDF)
        return 2;
    if (c >= 0xE0 && c <= 0xEF)
        return 3;
    if (c >= 0xF0 && c <= 0xF4)
        return 4;
    return 0;
}

size_t utf8_cut(const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    /* Only the last three bytes can belong to an unfinished sequence: find its lead byte. */
    for (size_t k = 1; k <= 3 && k <= n; k++) {
        unsigned char c = s[n - k];
        if ((c & 0xC0) == 0x80)
            continue;
        size_t need = utf8_lead_len(c);
        if (need <= k)
            return n; /* ASCII, invalid lead, or a sequence that is already complete */
        /* The tail is unfinished; cut only if it could still become valid, otherwise the
         * escaper will turn those bytes into U+FFFD anyway and cutting gains nothing. */
        if (k >= 2) {
            unsigned char lo = 0x80, hi = 0xBF;
            if (c == 0xE0)
                lo = 0xA0;
            else if (c == 0xED)
                hi = 0x9F;
            else if (c == 0xF0)
                lo = 0x90;
            else if (c == 0xF4)
                hi = 0x8F;
            if (s[n - k + 1] < lo || s[n - k + 1] > hi)
                return n;
        }
        return n - k;
    }
    return n;
}

/* ---- escaping ---- */

/* 0: copy as is; 1: escape; 2: start of a possible multibyte sequence. */
static const unsigned char esc_class[256] = {
    ['\0'] = 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    ['"'] = 1, ['\\'] = 1, [0x7F] = 1,
    [0x80] = 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
};

#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* True if none of the 8 bytes at p needs attention: all in 0x20..0x7E, none '"' or '\\'.
 * The haszero/hasless bit tricks are exact for deciding presence (not position). */
static inline bool plain8(const unsigned char *p)
{
    uint64_t x;
    memcpy(&x, p, 8);
    uint64_t bad = x & HIGHS;                                    /* >= 0x80 */
    bad |= (x - ONES * 0x20) & ~x & HIGHS;                       /* < 0x20 */
    uint64_t q = x ^ (ONES * '"'), bs = x ^ (ONES * '\\'), del = x ^ (ONES * 0x7F);
    bad |= (q - ONES) & ~q & HIGHS;
    bad |= (bs - ONES) & ~bs & HIGHS;
    bad |= (del - ONES) & ~del & HIGHS;
    return bad == 0;
}

/* ---- scanning for bytes that need attention ----
 * first_special: the index of the first byte of s[0..n) that is not plain (< 0x20, '"',
 * '\\', >= 0x7F), or n; with dst != NULL, copies at least the bytes before it to dst, and
 * possibly more, never beyond n. Vector versions: SSE2 (every x86-64), AVX2 when the CPU has
 * it (chosen once); the signed compare with 0x20 catches >= 0x80 with the control bytes. */
typedef size_t first_special_fn(char *dst, const unsigned char *s, size_t n);

static size_t first_special_tail(char *dst, const unsigned char *s, size_t i, size_t n)
{
    for (; i < n; i++) {
        if (esc_class[s[i]] != 0)
            return i;
        if (dst != NULL)
            dst[i] = (char)s[i];
    }
    return n;
}

#ifdef __SSE2__
#include <immintrin.h>

static size_t first_special_sse2(char *dst, const unsigned char *s, size_t n)
{
    const __m128i lo = _mm_set1_epi8(0x20), q = _mm_set1_epi8('"'), bs = _mm_set1_epi8('\\'),
                  del = _mm_set1_epi8(0x7F);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)(s + i));
        if (dst != NULL)
            _mm_storeu_si128((__m128i *)(void *)(dst + i), v);
        __m128i bad = _mm_or_si128(_mm_cmplt_epi8(v, lo), _mm_cmpeq_epi8(v, q));
        bad = _mm_or_si128(bad, _mm_or_si128(_mm_cmpeq_epi8(v, bs), _mm_cmpeq_epi8(v, del)));
        unsigned m = (unsigned)_mm_movemask_epi8(bad);
        if (m != 0)
            return i + (size_t)__builtin_ctz(m);
    }
    return first_special_tail(dst, s, i, n);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define HAVE_AVX2_SCAN 1
__attribute__((target("avx2"))) static size_t first_special_avx2(char *dst,
                                                                  const unsigned char *s,
                                                                  size_t n)
{
    const __m256i lo = _mm256_set1_epi8(0x20), q = _mm256_set1_epi8('"'),
                  bs = _mm256_set1_epi8('\\'), del = _mm256_set1_epi8(0x7F);
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(const void *)(s + i));
        if (dst != NULL)
            _mm256_storeu_si256((__m256i *)(void *)(dst + i), v);
        __m256i bad = _mm256_or_si256(_mm256_cmpgt_epi8(lo, v), _mm256_cmpeq_epi8(v, q));
        bad = _mm256_or_si256(bad,
                              _mm256_or_si256(_mm256_cmpeq_epi8(v, bs), _mm256_cmpeq_epi8(v, del)));
        unsigned m = (unsigned)_mm256_movemask_epi8(bad);
        if (m != 0)
            return i + (size_t)__builtin_ctz(m);
    }
    return i + first_special_sse2(dst != NULL ? dst + i : NULL, s + i, n - i);
}
#endif

static size_t first_special_pick(char *dst, const unsigned char *s, size_t n);
static first_special_fn *first_special = first_special_pick;

static size_t first_special_pick(char *dst, const unsigned char *s, size_t n)
{
    first_special = first_special_sse2;
#ifdef HAVE_AVX2_SCAN
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        first_special = first_special_avx2;
#endif
    return first_special(dst, s, n);
}
#else
static size_t first_special(char *dst, const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i + 8 <= n && plain8(s + i)) {
        if (dst != NULL)
            memcpy(dst + i, s + i, 8);
        i += 8;
    }
    return first_special_tail(dst, s, i, n);
}
#endif

bool json_plain(const char *str, size_t n)
{
    return first_special(NULL, (const unsigned char *)str, n) == n;
}

const char *json_scan_copy_line(char *dst, const char *str, size_t n, bool *ret_plain)
{
    size_t i = first_special(dst, (const unsigned char *)str, n);
    if (i == n) {
        *ret_plain = true;
        return NULL;
    }
    if (str[i] == '\n') {
        *ret_plain = true;
        return str + i;
    }
    *ret_plain = false;
    const char *nl = memchr(str + i, '\n', n - i);
    if (dst != NULL)
        memcpy(dst + i, str + i, (size_t)((nl != NULL ? nl : str + n) - (str + i)));
    return nl;
}

const char *json_scan_line(const char *str, size_t n, bool *ret_plain)
{
    return json_scan_copy_line(NULL, str, n, ret_plain);
}

void json_escape(struct sbuf *sb, const char *str, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, run = 0; /* s[run..i) is pending verbatim output */

    while (i < n) {
        while (i + 8 <= n && plain8(s + i))
            i += 8;
        if (i >= n)
            break;
        unsigned char c = s[i];
        unsigned char cls = esc_class[c];
        if (cls == 0) {
            i++;
            continue;
        }
        if (cls == 2) {
            size_t len = utf8_seq(s + i, n - i);
            if (len) {
                i += len;
                continue;
            }
        }
        if (i > run)
            sbuf_append(sb, s + run, i - run);
        char e[6];
        size_t elen = 2;
        e[0] = '\\';
        switch (c) {
        case '"': e[1] = '"'; break;
        case '\\': e[1] = '\\'; break;
        case '\n': e[1] = 'n'; break;
        case '\r': e[1] = 'r'; break;
        case '\t': e[1] = 't'; break;
        case '\b': e[1] = 'b'; break;
        case '\f': e[1] = 'f'; break;
        default:
            if (c < 0x80) {
                memcpy(e, "\\u00", 4);
                e[4] = hex[c >> 4];
                e[5] = hex[c & 15];
                elen = 6;
            } else {
                memcpy(e, "\xEF\xBF\xBD", 3); /* U+FFFD for one invalid byte */
                elen = 3;
            }
        }
        sbuf_append(sb, e, elen);
        i++;
        run = i;
    }
    if (n > run)
        sbuf_append(sb, s + run, n - run);
    else if (sb->buf == NULL)
        sbuf_reserve(sb, 0); /* keep "always NUL-terminated" even for empty input */
}

/* ---- writer ---- */

void json_init(struct json_w *w, struct sbuf *sb)
{
    w->sb = sb;
    w->depth = 0;
    w->first = 1;
    w->after_key = false;
}

/* Separator before a value or a key: a comma unless this is the first item at this depth
 * or the value directly follows its key. */
static void before_item(struct json_w *w)
{
    if (w->after_key) {
        w->after_key = false;
        return;
    }
    uint32_t bit = 1u << w->depth;
    if (w->first & bit)
        w->first &= ~bit;
    else if (w->depth > 0)
        sbuf_putc(w->sb, ',');
}

static void open_container(struct json_w *w, char c)
{
    before_item(w);
    sbuf_putc(w->sb, c);
    assert(w->depth + 1 < JSON_MAX_DEPTH);
    w->depth++;
    w->first |= 1u << w->depth;
}

static void close_container(struct json_w *w, char c)
{
    assert(w->depth > 0 && !w->after_key);
    w->first &= ~(1u << w->depth);
    w->depth--;
    sbuf_putc(w->sb, c);
}

void json_obj_begin(struct json_w *w) { open_container(w, '{'); }
void json_obj_end(struct json_w *w) { close_container(w, '}'); }
void json_arr_begin(struct json_w *w) { open_container(w, '['); }
void json_arr_end(struct json_w *w) { close_container(w, ']'); }

void json_key(struct json_w *w, const char *key)
{
    assert(!w->after_key);
    before_item(w);
    sbuf_putc(w->sb, '"');
    /* Keys are literals in practice, but escaping keeps a mistake from breaking framing. */
    json_escape(w->sb, key, strlen(key));
    sbuf_append(w->sb, "\":", 2);
    w->after_key = true;
}

void json_strn(struct json_w *w, const char *s, size_t n)
{
    before_item(w);
    /* One reservation for the common case (no escapes) so the copy below does not regrow. */
    sbuf_reserve(w->sb, n + 2);
    sbuf_putc(w->sb, '"');
    json_escape(w->sb, s, n);
    sbuf_putc(w->sb, '"');
}

void json_str(struct json_w *w, const char *s)
{
    if (s == NULL)
        json_null_value(w);
    else
        json_strn(w, s, strlen(s));
}

static void put_u64(struct sbuf *sb, uint64_t v, bool neg)
{
    if (neg)
        sbuf_putc(sb, '-');
    sbuf_put_u64(sb, v);
}

void json_int(struct json_w *w, int64_t v)
{
    before_item(w);
    /* Negate in unsigned arithmetic so INT64_MIN does not overflow. */
    put_u64(w->sb, v < 0 ? 0 - (uint64_t)v : (uint64_t)v, v < 0);
}

void json_uint(struct json_w *w, uint64_t v)
{
    before_item(w);
    put_u64(w->sb, v, false);
}

void json_double(struct json_w *w, double v)
{
    if (!isfinite(v)) {
        json_null_value(w);
        return;
    }
    before_item(w);
    /* Integers print without exponent; the range check keeps the cast defined. Done without
     * libm (trunc) so the daemon does not need -lm. */
    if (v > -1e15 && v < 1e15 && v == (double)(int64_t)v) {
        int64_t iv = (int64_t)v;
        put_u64(w->sb, iv < 0 ? 0 - (uint64_t)iv : (uint64_t)iv, signbit(v) != 0);
        return;
    }
    /* Shortest of %.15g..%.17g that reads back to the same double. */
    char tmp[32];
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(tmp, sizeof(tmp), "%.*g", prec, v);
        if (prec == 17 || strtod(tmp, NULL) == v)
            break;
    }
    sbuf_puts(w->sb, tmp);
}

void json_bool(struct json_w *w, bool v)
{
    before_item(w);
    if (v)
        sbuf_append(w->sb, "true", 4);
    else
        sbuf_append(w->sb, "false", 5);
}

void json_null_value(struct json_w *w)
{
    before_item(w);
    sbuf_append(w->sb, "null", 4);
}

void json_raw(struct json_w *w, const char *s, size_t n)
{
    before_item(w);
    sbuf_append(w->sb, s, n);
}

void json_kv_str(struct json_w *w, const char *key, const char *s)
{
    json_key(w, key);
    json_str(w, s);
}

void json_kv_strn(struct json_w *w, const char *key, const char *s, size_t n)
{
    json_key(w, key);
    json_strn(w, s, n);
}

void json_kv_int(struct json_w *w, const char *key, int64_t v)
{
    json_key(w, key);
    json_int(w, v);
}

void json_kv_bool(struct json_w *w, const char *key, bool v)
{
    json_key(w, key);
    json_bool(w, v);
}

void json_kv_null(struct json_w *w, const char *key)
{
    json_key(w, key);
    json_null_value(w);
}
