/*
 * Unit tests for json: the writer's separators and values, the escaper for every byte class
 * (checked against a slow reference and against jansson's strict parser), and utf8_cut.
 */
#include <jansson.h>
#include <math.h>
#include <stdint.h>

#include "json/json.h"
#include "test.h"

static char *esc(const char *s, size_t n)
{
    struct sbuf sb = SBUF_INIT;
    json_escape(&sb, s, n);
    ASSERT(sb.buf != NULL);
    ASSERT_EQ(sb.buf[sb.len], 0);
    return sbuf_steal(&sb);
}

#define ESC_IS(in, want)                      \
    do {                                      \
        char *e_ = esc((in), sizeof(in) - 1); \
        ASSERT_STREQ(e_, (want));             \
        free(e_);                             \
    } while (0)

TEST(json_escape_ascii_and_controls)
{
    ESC_IS("", "");
    ESC_IS("hello, world <a href='x'>&amp;</a>", "hello, world <a href='x'>&amp;</a>");
    ESC_IS("q\"b\\s/", "q\\\"b\\\\s/");
    ESC_IS("\n\r\t\b\f", "\\n\\r\\t\\b\\f");
    ESC_IS("\x01\x1f\x7f", "\\u0001\\u001f\\u007f");
    ESC_IS("a\0b", "a\\u0000b");
    /* SSE framing survives: the newline can never appear raw. */
    ESC_IS("x\n\ndata: evil", "x\\n\\ndata: evil");
    /* Long runs cross the 8-byte fast path with an escape at every alignment. */
    for (size_t at = 0; at < 24; at++) {
        char in[24], want[32];
        memset(in, 'a', sizeof(in));
        in[at] = '"';
        memcpy(want, in, at);
        want[at] = '\\';
        memcpy(want + at + 1, in + at, sizeof(in) - at);
        want[25] = 0;
        char *e = esc(in, sizeof(in));
        ASSERT_STREQ(e, want);
        free(e);
    }
}

TEST(json_escape_utf8)
{
    /* Valid sequences of each length pass through unchanged. */
    ESC_IS("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xed\x9f\xbf \xee\x80\x80 \xf4\x8f\xbf\xbf",
           "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xed\x9f\xbf \xee\x80\x80 \xf4\x8f\xbf\xbf");
    /* Invalid bytes: each one becomes U+FFFD. */
    ESC_IS("a\xffz", "a\xef\xbf\xbdz");
    ESC_IS("\x80", "\xef\xbf\xbd");
    ESC_IS("\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd");                 /* overlong '/' */
    ESC_IS("\xc1\xbf", "\xef\xbf\xbd\xef\xbf\xbd");                 /* overlong */
    ESC_IS("\xe0\x80\xaf", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"); /* overlong 3-byte */
    ESC_IS("\xf0\x80\x80\xaf",
           "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");     /* overlong 4-byte */
    ESC_IS("\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"); /* U+D800 surrogate */
    ESC_IS("\xed\xbf\xbf", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"); /* U+DFFF surrogate */
    ESC_IS("\xf4\x90\x80\x80",
           "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");     /* U+110000 */
    ESC_IS("\xf5\x80\x80\x80",
           "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    /* Truncated sequences: at the end, and followed by ASCII. */
    ESC_IS("\xe2\x82", "\xef\xbf\xbd\xef\xbf\xbd");
    ESC_IS("\xe2\x82z", "\xef\xbf\xbd\xef\xbf\xbdz");
    ESC_IS("\xf0\x9f\x98", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    /* Invalid byte next to a control and a valid character. */
    ESC_IS("\xfe\n\xc3\xa9", "\xef\xbf\xbd\\n\xc3\xa9");
}

/* Slow reference escaper, written from the rules rather than for speed. */
static void ref_escape(struct sbuf *sb, const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        if (c < 0x80) {
            if (c == '"' || c == '\\')
                sbuf_printf(sb, "\\%c", c);
            else if (c == '\n')
                sbuf_puts(sb, "\\n");
            else if (c == '\r')
                sbuf_puts(sb, "\\r");
            else if (c == '\t')
                sbuf_puts(sb, "\\t");
            else if (c == '\b')
                sbuf_puts(sb, "\\b");
            else if (c == '\f')
                sbuf_puts(sb, "\\f");
            else if (c < 0x20 || c == 0x7f)
                sbuf_printf(sb, "\\u%04x", c);
            else
                sbuf_putc(sb, (char)c);
            i++;
            continue;
        }
        size_t len = c >= 0xf8 ? 0 : c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 0;
        uint32_t cp = len == 4 ? c & 7 : len == 3 ? c & 15 : c & 31;
        bool ok = len > 0 && i + len <= n;
        for (size_t k = 1; ok && k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                ok = false;
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        uint32_t min = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
        if (ok && (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)))
            ok = false;
        if (ok) {
            sbuf_append(sb, s + i, len);
            i += len;
        } else {
            sbuf_puts(sb, "\xef\xbf\xbd");
            i++;
        }
    }
}

TEST(json_escape_random_matches_reference_and_jansson)
{
    srand(12345);
    unsigned char in[300];
    for (int iter = 0; iter < 20000; iter++) {
        size_t n = (size_t)(rand() % (int)sizeof(in));
        for (size_t i = 0; i < n; i++) {
            /* Bias towards UTF-8 structure so valid and near-valid sequences both occur. */
            int r = rand() % 8;
            in[i] = r < 3 ? (unsigned char)(0x20 + rand() % 95)
                  : r < 5 ? (unsigned char)(0x80 + rand() % 64)
                  : (unsigned char)(rand() % 256);
        }
        struct sbuf got = SBUF_INIT, want = SBUF_INIT;
        sbuf_putc(&got, '"');
        json_escape(&got, (const char *)in, n);
        sbuf_putc(&got, '"');
        sbuf_putc(&want, '"');
        ref_escape(&want, in, n);
        sbuf_putc(&want, '"');
        ASSERT_EQ(got.len, want.len);
        ASSERT_MEMEQ(got.buf, want.buf, got.len);
        json_error_t err;
        json_t *j = json_loadb(got.buf, got.len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &err);
        if (j == NULL)
            fprintf(stderr, "jansson: %s\n", err.text);
        ASSERT(j != NULL && json_is_string(j));
        json_decref(j);
        sbuf_free(&got);
        sbuf_free(&want);
    }
}

/* json_scan_line is memchr('\n') plus json_plain of what precedes it, for every length and
 * every position of the first special byte (the vector loops, AVX2 where the CPU has it, and
 * their tails). */
TEST(json_scan_line_matches_memchr_and_plain)
{
    srand(777);
    static const unsigned char specials[] = {'\n', '\n', '"', '\\', 0x01, 0x1f, 0x7f, 0x80, 0xc3, 0xff};
    char in[200];
    for (int iter = 0; iter < 50000; iter++) {
        size_t n = (size_t)(rand() % (int)sizeof(in));
        for (size_t i = 0; i < n; i++)
            in[i] = (char)(0x20 + rand() % 95);
        for (int k = rand() % 4; k > 0 && n > 0; k--)
            in[rand() % (int)n] = (char)specials[rand() % (int)sizeof(specials)];
        bool plain = false;
        const char *nl = json_scan_line(in, n, &plain);
        const char *want = memchr(in, '\n', n);
        ASSERT(nl == want);
        size_t before = want ? (size_t)(want - in) : n;
        ASSERT_EQ(plain, json_plain(in, before));
        /* The copying form: same answers, the line copied, nothing written past n. */
        char dst[sizeof(in) + 64];
        memset(dst, 0x5a, sizeof(dst));
        bool plain2 = !plain;
        ASSERT(json_scan_copy_line(dst, in, n, &plain2) == want);
        ASSERT_EQ(plain2, plain);
        ASSERT_MEMEQ(dst, in, before);
        for (size_t i = n; i < sizeof(dst); i++)
            ASSERT_EQ((unsigned char)dst[i], 0x5a);
    }
}

TEST(json_utf8_cut)
{
    ASSERT_EQ(utf8_cut("", 0), 0);
    ASSERT_EQ(utf8_cut("abc", 3), 3);
    ASSERT_EQ(utf8_cut("a\xe2\x82\xac", 4), 4); /* complete € */
    ASSERT_EQ(utf8_cut("a\xe2\x82\xac", 3), 1); /* E2 82 | AC */
    ASSERT_EQ(utf8_cut("a\xe2\x82\xac", 2), 1); /* E2 | 82 AC */
    ASSERT_EQ(utf8_cut("\xc3\xa9", 1), 0);
    ASSERT_EQ(utf8_cut("\xc3\xa9", 2), 2);
    ASSERT_EQ(utf8_cut("x\xf0\x9f\x98\x80", 4), 1);
    ASSERT_EQ(utf8_cut("x\xf0\x9f\x98\x80", 5), 5);
    ASSERT_EQ(utf8_cut("x\xf0", 2), 1);
    /* Tails that can never become valid are not cut: they turn into U+FFFD anyway. */
    ASSERT_EQ(utf8_cut("a\xff", 2), 2);
    ASSERT_EQ(utf8_cut("a\x80", 2), 2);
    ASSERT_EQ(utf8_cut("a\xc0", 2), 2);     /* overlong lead */
    ASSERT_EQ(utf8_cut("a\xed\xa0", 3), 3); /* surrogate prefix */
    ASSERT_EQ(utf8_cut("a\xe0\x80", 3), 3); /* overlong prefix */
    ASSERT_EQ(utf8_cut("a\xf4\x90", 3), 3); /* > U+10FFFF prefix */
    ASSERT_EQ(utf8_cut("a\xe2z", 3), 3);
    ASSERT_EQ(utf8_cut("a\x80\x80\x80\x80", 5), 5);
    /* Cutting is never by more than 3 bytes. */
    ASSERT_EQ(utf8_cut("\xf0\x9f\x98", 3), 0);
}

static const char *render(struct sbuf *sb, void (*build)(struct json_w *))
{
    struct json_w w;
    sbuf_reset(sb);
    json_init(&w, sb);
    build(&w);
    ASSERT_EQ(w.depth, 0);
    return sb->buf;
}

static void build_nested(struct json_w *w)
{
    json_obj_begin(w);
    json_kv_str(w, "line", "hi \"x\"");
    json_kv_int(w, "n", -42);
    json_kv_bool(w, "ok", true);
    json_kv_null(w, "none");
    json_key(w, "arr");
    json_arr_begin(w);
    json_int(w, 1);
    json_str(w, NULL);
    json_obj_begin(w);
    json_obj_end(w);
    json_arr_begin(w);
    json_arr_end(w);
    json_bool(w, false);
    json_null_value(w);
    json_arr_end(w);
    json_key(w, "o");
    json_obj_begin(w);
    json_kv_strn(w, "b", "a\0b", 3);
    json_obj_end(w);
    json_key(w, "raw");
    json_raw(w, "{\"x\":1}", 7);
    json_key(w, "u");
    json_uint(w, UINT64_MAX);
    json_key(w, "min");
    json_int(w, INT64_MIN);
    json_obj_end(w);
}

TEST(json_writer_nesting_and_commas)
{
    struct sbuf sb = SBUF_INIT;
    ASSERT_STREQ(render(&sb, build_nested),
                 "{\"line\":\"hi \\\"x\\\"\",\"n\":-42,\"ok\":true,\"none\":null,"
                 "\"arr\":[1,null,{},[],false,null],\"o\":{\"b\":\"a\\u0000b\"},"
                 "\"raw\":{\"x\":1},\"u\":18446744073709551615,"
                 "\"min\":-9223372036854775808}");
    json_error_t err;
    json_t *j = json_loads(sb.buf, JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &err);
    ASSERT(j != NULL);
    json_decref(j);
    sbuf_free(&sb);
}

TEST(json_writer_appends_from_current_len)
{
    struct sbuf sb = SBUF_INIT;
    sbuf_puts(&sb, "data: ");
    struct json_w w;
    json_init(&w, &sb);
    json_obj_begin(&w);
    json_kv_str(&w, "a", "b");
    json_obj_end(&w);
    ASSERT_STREQ(sb.buf, "data: {\"a\":\"b\"}");
    sbuf_free(&sb);
}

static void dbl(struct sbuf *sb, double v)
{
    struct json_w w;
    sbuf_reset(sb);
    json_init(&w, sb);
    json_double(&w, v);
}

TEST(json_double_values)
{
    struct sbuf sb = SBUF_INIT;
    dbl(&sb, 0);
    ASSERT_STREQ(sb.buf, "0");
    dbl(&sb, 3);
    ASSERT_STREQ(sb.buf, "3");
    dbl(&sb, -17);
    ASSERT_STREQ(sb.buf, "-17");
    dbl(&sb, 1700000000123.0);
    ASSERT_STREQ(sb.buf, "1700000000123");
    dbl(&sb, 0.1);
    ASSERT_STREQ(sb.buf, "0.1");
    dbl(&sb, 2.5);
    ASSERT_STREQ(sb.buf, "2.5");
    dbl(&sb, NAN);
    ASSERT_STREQ(sb.buf, "null");
    dbl(&sb, INFINITY);
    ASSERT_STREQ(sb.buf, "null");
    dbl(&sb, -INFINITY);
    ASSERT_STREQ(sb.buf, "null");
    /* Round trip for awkward values, and always valid JSON. */
    double vals[] = {1.0 / 3, 1e300, -1e-300, 5e-324, 123456789.123456789, 1e16,
                     0.30000000000000004};
    for (size_t i = 0; i < ARRAY_SIZE(vals); i++) {
        dbl(&sb, vals[i]);
        ASSERT(strtod(sb.buf, NULL) == vals[i]);
        json_t *j = json_loads(sb.buf, JSON_DECODE_ANY, NULL);
        ASSERT(j != NULL && json_is_number(j));
        json_decref(j);
    }
    sbuf_free(&sb);
}

TEST(json_escape_key)
{
    struct sbuf sb = SBUF_INIT;
    struct json_w w;
    json_init(&w, &sb);
    json_obj_begin(&w);
    json_kv_int(&w, "a\"b", 1);
    json_obj_end(&w);
    ASSERT_STREQ(sb.buf, "{\"a\\\"b\":1}");
    sbuf_free(&sb);
}

TEST_TIMEOUT(json_escape_throughput, 30)
{
    /* Not a benchmark, a guard: printable ASCII must go far faster than per-byte appends. */
    size_t n = 64 * 1024 * 1024;
    char *in = xmalloc(n);
    for (size_t i = 0; i < n; i++)
        in[i] = (char)(0x20 + (i * 7) % 95);
    for (size_t i = 0; i < n; i++)
        if (in[i] == '"' || in[i] == '\\')
            in[i] = 'x';
    struct sbuf sb = SBUF_INIT;
    uint64_t t0 = mono_us();
    for (size_t off = 0; off < n; off += 100) {
        sbuf_reset(&sb);
        json_escape(&sb, in + off, MIN((size_t)100, n - off));
    }
    uint64_t dt = mono_us() - t0;
    fprintf(stderr, "  json_escape: %.0f MB/s on 100-byte lines\n", n / (double)(dt ? dt : 1));
    ASSERT(dt < 20 * 1000 * 1000);
    sbuf_free(&sb);
    free(in);
}
