/*
 * util: allocation wrappers, clocks, sbuf, logging and small string helpers.
 * It depends on nothing but libc and holds no global state beyond log_verbose. It is not a
 * general string library: only what the daemon's modules actually need lives here.
 */
#include "util/util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- allocation ---- */

static void oom(size_t n)
{
    /* No allocation on this path: fprintf to unbuffered stderr does not malloc. */
    fprintf(stderr, "sandboxd: fatal: out of memory allocating %zu bytes\n", n);
    abort();
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        oom(n);
    return p;
}

void *xcalloc(size_t nmemb, size_t n)
{
    void *p = calloc(nmemb ? nmemb : 1, n ? n : 1);
    if (p == NULL)
        oom(nmemb * n);
    return p;
}

void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        oom(n);
    return q;
}

char *xstrdup(const char *s)
{
    return xstrndup(s, strlen(s));
}

char *xstrndup(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *p = xmalloc(len + 1);
    memcpy(p, s, len);
    p[len] = '\0';
    return p;
}

char *xasprintf(const char *fmt, ...)
{
    struct sbuf sb = SBUF_INIT;
    va_list ap;
    va_start(ap, fmt);
    sbuf_vprintf(&sb, fmt, ap);
    va_end(ap);
    if (sb.buf == NULL)
        sbuf_reserve(&sb, 0);
    return sbuf_steal(&sb);
}

/* ---- clocks ---- */

int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t mono_ms(void)
{
    return mono_us() / 1000u;
}

/* ---- sbuf ---- */

void sbuf_init(struct sbuf *sb)
{
    sb->buf = NULL;
    sb->len = 0;
    sb->cap = 0;
}

void sbuf_free(struct sbuf *sb)
{
    free(sb->buf);
    sbuf_init(sb);
}

void sbuf_reset(struct sbuf *sb)
{
    sb->len = 0;
    if (sb->buf != NULL)
        sb->buf[0] = '\0';
}

/* Keeps cap > len + n so the NUL terminator always fits without another check. */
char *sbuf_reserve(struct sbuf *sb, size_t n)
{
    if (n >= SIZE_MAX / 2 - sb->len)
        oom(n);
    size_t need = sb->len + n + 1;
    if (need > sb->cap) {
        size_t cap = sb->cap ? sb->cap : 64;
        while (cap < need)
            cap *= 2;
        sb->buf = xrealloc(sb->buf, cap);
        sb->cap = cap;
        sb->buf[sb->len] = '\0';
    }
    return sb->buf + sb->len;
}

void sbuf_append(struct sbuf *sb, const void *p, size_t n)
{
    char *dst = sbuf_reserve(sb, n);
    if (n)
        memcpy(dst, p, n);
    sb->len += n;
    sb->buf[sb->len] = '\0';
}

void sbuf_puts(struct sbuf *sb, const char *s)
{
    sbuf_append(sb, s, strlen(s));
}

void sbuf_putc(struct sbuf *sb, char c)
{
    sbuf_reserve(sb, 1);
    sb->buf[sb->len++] = c;
    sb->buf[sb->len] = '\0';
}

void sbuf_vprintf(struct sbuf *sb, const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    char *dst = sbuf_reserve(sb, 64);
    size_t avail = sb->cap - sb->len;
    int n = vsnprintf(dst, avail, fmt, ap);
    if (n < 0) {
        sb->buf[sb->len] = '\0';
        va_end(ap2);
        return;
    }
    if ((size_t)n >= avail) {
        dst = sbuf_reserve(sb, (size_t)n);
        vsnprintf(dst, (size_t)n + 1, fmt, ap2);
    }
    va_end(ap2);
    sb->len += (size_t)n;
}

void sbuf_printf(struct sbuf *sb, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    sbuf_vprintf(sb, fmt, ap);
    va_end(ap);
}

char *sbuf_steal(struct sbuf *sb)
{
    char *p = sb->buf;
    sbuf_init(sb);
    return p;
}

/* ---- small string helpers ---- */

bool str_is_digits(const char *s)
{
    if (s == NULL || *s == '\0')
        return false;
    for (; *s; s++)
        if (*s < '0' || *s > '9')
            return false;
    return true;
}

int parse_u64(const char *s, size_t n, uint64_t *ret)
{
    uint64_t v = 0;
    if (n == 0)
        return -EINVAL;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -EINVAL;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -ERANGE;
        v = v * 10 + d;
    }
    *ret = v;
    return 0;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int pct_decode(const char *src, size_t n, char **ret)
{
    char *out = xmalloc(n + 1);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        char c = src[i];
        if (c == '%') {
            if (n - i < 3) {
                free(out);
                return -EINVAL;
            }
            int hi = hexval(src[i + 1]);
            int lo = hexval(src[i + 2]);
            if (hi < 0 || lo < 0) {
                free(out);
                return -EINVAL;
            }
            c = (char)(hi << 4 | lo);
            i += 2;
        }
        if (c == '\0') {
            free(out);
            return -EINVAL;
        }
        out[o++] = c;
    }
    out[o] = '\0';
    *ret = out;
    return 0;
}

bool ct_equal(const void *a, size_t alen, const void *b, size_t blen)
{
    if (alen != blen)
        return false;
    const volatile unsigned char *pa = a, *pb = b;
    unsigned char diff = 0;
    for (size_t i = 0; i < alen; i++)
        diff |= pa[i] ^ pb[i];
    return diff == 0;
}

void strv_pack_add(struct strv_pack *pk, const char *s, size_t len)
{
    if (pk->v != NULL) {
        memcpy(pk->p, s, len);
        pk->p += len;
    }
    pk->bytes += len;
}

void strv_pack_end(struct strv_pack *pk)
{
    if (pk->v != NULL) {
        *pk->p++ = '\0';
        pk->v[pk->n] = pk->cur;
        pk->cur = pk->p;
    }
    pk->bytes++;
    pk->n++;
}

void strv_pack_alloc(struct strv_pack *pk)
{
    size_t ptrs = (pk->n + 1) * sizeof(char *);
    pk->v = xmalloc(ptrs + pk->bytes);
    pk->cur = pk->p = (char *)pk->v + ptrs;
    pk->n = pk->bytes = 0;
}

char **strv_pack_done(struct strv_pack *pk)
{
    pk->v[pk->n] = NULL;
    return pk->v;
}

char **strv_dup(char *const *v)
{
    struct strv_pack pk = {0};
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1)
            strv_pack_alloc(&pk);
        for (size_t i = 0; v != NULL && v[i] != NULL; i++) {
            strv_pack_add(&pk, v[i], strlen(v[i]));
            strv_pack_end(&pk);
        }
    }
    return strv_pack_done(&pk);
}

void strv_free(char **v)
{
    free(v);
}

size_t u64_dec(char dst[20], uint64_t v)
{
    char tmp[20];
    size_t i = sizeof(tmp);
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    memcpy(dst, tmp + i, sizeof(tmp) - i);
    return sizeof(tmp) - i;
}

void sbuf_put_u64(struct sbuf *sb, uint64_t v)
{
    char tmp[20];
    sbuf_append(sb, tmp, u64_dec(tmp, v));
}

void sbuf_put_i64(struct sbuf *sb, int64_t v)
{
    if (v < 0) {
        sbuf_putc(sb, '-');
        sbuf_put_u64(sb, 0 - (uint64_t)v); /* unsigned negation: INT64_MIN is fine */
    } else {
        sbuf_put_u64(sb, (uint64_t)v);
    }
}
