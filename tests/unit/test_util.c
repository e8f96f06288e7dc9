/*
 * Unit tests for util: sbuf growth and termination, string helpers, clocks, xalloc, logging.
 */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include "test.h"
#include "util/util.h"

TEST(util_sbuf_growth_and_nul)
{
    struct sbuf sb = SBUF_INIT;
    /* Growth across many reallocations keeps content and the NUL terminator. */
    for (int i = 0; i < 10000; i++) {
        sbuf_putc(&sb, (char)('a' + i % 26));
        ASSERT(sb.cap > sb.len);
        ASSERT_EQ(sb.buf[sb.len], 0);
    }
    ASSERT_EQ(sb.len, 10000);
    for (int i = 0; i < 10000; i++)
        ASSERT_EQ(sb.buf[i], 'a' + i % 26);

    sbuf_reset(&sb);
    ASSERT_EQ(sb.len, 0);
    ASSERT_STREQ(sb.buf, "");
    size_t cap = sb.cap;
    sbuf_puts(&sb, "hello");
    ASSERT_EQ(sb.cap, cap); /* reset keeps capacity */
    ASSERT_STREQ(sb.buf, "hello");

    /* Binary data with embedded NULs. */
    sbuf_append(&sb, "\0x\0", 3);
    ASSERT_EQ(sb.len, 8);
    ASSERT_MEMEQ(sb.buf, "hello\0x\0", 9);
    sbuf_free(&sb);
    ASSERT(sb.buf == NULL && sb.len == 0 && sb.cap == 0);
    sbuf_puts(&sb, "again"); /* reusable after free */
    ASSERT_STREQ(sb.buf, "again");
    sbuf_free(&sb);
}

TEST(util_sbuf_reserve)
{
    struct sbuf sb = SBUF_INIT;
    char *p = sbuf_reserve(&sb, 1000);
    ASSERT(p == sb.buf);
    ASSERT(sb.cap >= 1001);
    memcpy(p, "abc", 3);
    sb.len += 3;
    p = sbuf_reserve(&sb, 5);
    ASSERT(p == sb.buf + 3);
    sb.buf[sb.len] = 0;
    ASSERT_STREQ(sb.buf, "abc");
    sbuf_free(&sb);
}

TEST(util_sbuf_printf)
{
    struct sbuf sb = SBUF_INIT;
    sbuf_printf(&sb, "%d-%s", 42, "x");
    ASSERT_STREQ(sb.buf, "42-x");
    /* Longer than the first guess, so the vprintf retry path runs. */
    char big[5000];
    memset(big, 'z', sizeof(big) - 1);
    big[sizeof(big) - 1] = 0;
    sbuf_printf(&sb, "[%s]", big);
    ASSERT_EQ(sb.len, 4 + 2 + 4999);
    ASSERT_EQ(sb.buf[4], '[');
    ASSERT_EQ(sb.buf[sb.len - 1], ']');
    ASSERT_EQ(sb.buf[sb.len], 0);
    sbuf_printf(&sb, "%s", "");
    ASSERT_EQ(sb.len, 4 + 2 + 4999);

    char *s = sbuf_steal(&sb);
    ASSERT(sb.buf == NULL && sb.len == 0);
    ASSERT_EQ(strlen(s), 4 + 2 + 4999);
    free(s);

    char *a = xasprintf("%s=%u", "k", 7u);
    ASSERT_STREQ(a, "k=7");
    free(a);
    a = xasprintf("%s", "");
    ASSERT_STREQ(a, "");
    free(a);
}

/* Decimal digits without printf: both ends of the range, and into an sbuf. */
TEST(util_u64_dec)
{
    char d[20];
    ASSERT_EQ(u64_dec(d, 0), 1);
    ASSERT_EQ(d[0], '0');
    ASSERT_EQ(u64_dec(d, 1234567890), 10);
    ASSERT(memcmp(d, "1234567890", 10) == 0);
    ASSERT_EQ(u64_dec(d, UINT64_MAX), 20);
    ASSERT(memcmp(d, "18446744073709551615", 20) == 0);

    struct sbuf sb = SBUF_INIT;
    sbuf_puts(&sb, "x");
    sbuf_put_u64(&sb, 42);
    sbuf_put_i64(&sb, -7);
    sbuf_put_u64(&sb, UINT64_MAX);
    ASSERT_STREQ(sb.buf, "x42-718446744073709551615");
    sbuf_free(&sb);
}

TEST(util_xalloc)
{
    char *p = xstrndup("abcdef", 3);
    ASSERT_STREQ(p, "abc");
    free(p);
    p = xstrndup("ab", 10);
    ASSERT_STREQ(p, "ab");
    free(p);
    p = xstrdup("");
    ASSERT_STREQ(p, "");
    free(p);
    int *z = xcalloc(100, sizeof(int));
    for (int i = 0; i < 100; i++)
        ASSERT_EQ(z[i], 0);
    z = xrealloc(z, 1000 * sizeof(int));
    ASSERT_EQ(z[99], 0);
    free(z);
    free(xmalloc(0)); /* never NULL, even for 0 */
}

TEST(util_parse_u64)
{
    uint64_t v = 99;
    ASSERT_EQ(parse_u64("0", 1, &v), 0);
    ASSERT_EQ(v, 0);
    ASSERT_EQ(parse_u64("12345xyz", 5, &v), 0);
    ASSERT_EQ(v, 12345);
    ASSERT_EQ(parse_u64("18446744073709551615", 20, &v), 0);
    ASSERT(v == UINT64_MAX);
    v = 7;
    ASSERT_EQ(parse_u64("18446744073709551616", 20, &v), -ERANGE);
    ASSERT_EQ(parse_u64("99999999999999999999", 20, &v), -ERANGE);
    ASSERT_EQ(v, 7); /* untouched on failure */
    ASSERT_EQ(parse_u64("", 0, &v), -EINVAL);
    ASSERT_EQ(parse_u64("-1", 2, &v), -EINVAL);
    ASSERT_EQ(parse_u64("+1", 2, &v), -EINVAL);
    ASSERT_EQ(parse_u64(" 1", 2, &v), -EINVAL);
    ASSERT_EQ(parse_u64("1 ", 2, &v), -EINVAL);
    ASSERT_EQ(parse_u64("0x10", 4, &v), -EINVAL);
    ASSERT_EQ(v, 7);

    ASSERT(str_is_digits("0123"));
    ASSERT(!str_is_digits(""));
    ASSERT(!str_is_digits("12a"));
    ASSERT(!str_is_digits("-1"));
}

TEST(util_pct_decode)
{
    char *s = NULL;
    ASSERT_EQ(pct_decode("a%20b%2Fc%2fd+", 14, &s), 0);
    ASSERT_STREQ(s, "a b/c/d+"); /* '+' is not a space in paths */
    free(s);
    ASSERT_EQ(pct_decode("", 0, &s), 0);
    ASSERT_STREQ(s, "");
    free(s);
    ASSERT_EQ(pct_decode("%e2%82%ac", 9, &s), 0);
    ASSERT_STREQ(s, "\xe2\x82\xac");
    free(s);
    /* Only n bytes are decoded. */
    ASSERT_EQ(pct_decode("ab%41zz", 5, &s), 0);
    ASSERT_STREQ(s, "abA");
    free(s);

    s = (char *)"untouched";
    ASSERT_EQ(pct_decode("%", 1, &s), -EINVAL);
    ASSERT_EQ(pct_decode("a%4", 3, &s), -EINVAL);
    ASSERT_EQ(pct_decode("%4142", 2, &s), -EINVAL); /* escape cut by n */
    ASSERT_EQ(pct_decode("%zz", 3, &s), -EINVAL);
    ASSERT_EQ(pct_decode("%g0", 3, &s), -EINVAL);
    ASSERT_EQ(pct_decode("%00", 3, &s), -EINVAL);
    ASSERT_EQ(pct_decode("a\0b", 3, &s), -EINVAL);
    ASSERT_STREQ(s, "untouched");
}

TEST(util_strv_dup_packed)
{
    char *src[] = {"one", "", "three=3", NULL};
    char **v = strv_dup(src);
    ASSERT(v[0] != src[0]);
    ASSERT_STREQ(v[0], "one");
    ASSERT_STREQ(v[1], "");
    ASSERT_STREQ(v[2], "three=3");
    ASSERT(v[3] == NULL);
    /* One allocation: the strings follow the pointers, in order. */
    ASSERT((char *)v[0] == (char *)(v + 4));
    ASSERT(v[1] == v[0] + 4 && v[2] == v[1] + 1);
    strv_free(v);

    char **e = strv_dup(NULL);
    ASSERT(e[0] == NULL);
    strv_free(e);
    strv_free(NULL);

    /* Pieces: a string made of several adds, counted then filled. */
    struct strv_pack pk = {0};
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1)
            strv_pack_alloc(&pk);
        strv_pack_add(&pk, "KEY", 3);
        strv_pack_add(&pk, "=", 1);
        strv_pack_add(&pk, "value", 5);
        strv_pack_end(&pk);
        strv_pack_end(&pk); /* an empty one */
    }
    char **kv = strv_pack_done(&pk);
    ASSERT_STREQ(kv[0], "KEY=value");
    ASSERT_STREQ(kv[1], "");
    ASSERT(kv[2] == NULL);
    strv_free(kv);
}

TEST(util_ct_equal)
{
    ASSERT(ct_equal("secret", 6, "secret", 6));
    ASSERT(!ct_equal("secret", 6, "secreT", 6));
    ASSERT(!ct_equal("Secret", 6, "secret", 6));
    ASSERT(!ct_equal("secret", 6, "secret2", 7));
    ASSERT(!ct_equal("secret", 6, "secre", 5));
    ASSERT(ct_equal("", 0, "", 0));
    ASSERT(ct_equal("a\0b", 3, "a\0b", 3));
    ASSERT(!ct_equal("a\0b", 3, "a\0c", 3));
}

TEST(util_clocks)
{
    int64_t wall = now_ms();
    ASSERT(wall > 1600000000000LL); /* after 2020 */
    uint64_t m1 = mono_ms(), u1 = mono_us();
    usleep(20000);
    uint64_t m2 = mono_ms(), u2 = mono_us();
    ASSERT(m2 >= m1 + 15);
    ASSERT(u2 >= u1 + 15000);
    ASSERT(u2 / 1000 >= m2 - 1 && u2 / 1000 <= m2 + 1);
}

TEST(util_list)
{
    struct item {
        int v;
        struct list link;
    } it[3] = {{1, {0}}, {2, {0}}, {3, {0}}};
    struct list head, *pos, *tmp;
    list_init(&head);
    ASSERT(list_empty(&head));
    for (int i = 0; i < 3; i++) {
        list_init(&it[i].link);
        ASSERT(!list_linked(&it[i].link));
        list_insert_tail(&head, &it[i].link);
        ASSERT(list_linked(&it[i].link));
    }
    int sum = 0, order = 0;
    list_foreach(pos, &head) {
        struct item *x = container_of(pos, struct item, link);
        order = order * 10 + x->v;
        sum += x->v;
    }
    ASSERT_EQ(order, 123);
    ASSERT_EQ(sum, 6);
    list_foreach_safe(pos, tmp, &head) {
        if (container_of(pos, struct item, link)->v == 2)
            list_remove(pos);
    }
    ASSERT(!list_linked(&it[1].link));
    order = 0;
    list_foreach(pos, &head) order = order * 10 + container_of(pos, struct item, link)->v;
    ASSERT_EQ(order, 13);
}

/* Captures stderr into a pipe around fn. */
static void capture_stderr(void (*fn)(void), char *out, size_t cap)
{
    int p[2];
    ASSERT(pipe(p) == 0);
    fflush(stderr);
    int saved = dup(2);
    dup2(p[1], 2);
    close(p[1]);
    fn();
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    ssize_t n = read(p[0], out, cap - 1);
    close(p[0]);
    out[n > 0 ? n : 0] = 0;
}

static void log_some(void)
{
    log_verbose = 0;
    log_info("hello %d", 1);
    log_debug("hidden");
    log_verbose = 1;
    log_debug("shown");
    errno = ENOENT;
    log_warn("open %s", "x");
    log_warnx("plain");
}

TEST(util_log_format)
{
    char out[1024];
    capture_stderr(log_some, out, sizeof(out));
    char want[512];
    snprintf(want, sizeof(want),
             "sandboxd: info: hello 1\n"
             "sandboxd: debug: shown\n"
             "sandboxd: warning: open x: %s\n"
             "sandboxd: warning: plain\n",
             strerror(ENOENT));
    ASSERT_STREQ(out, want);
}

static void log_long(void)
{
    char big[4000];
    memset(big, 'q', sizeof(big) - 1);
    big[sizeof(big) - 1] = 0;
    log_info("%s", big);
}

TEST(util_log_truncates_long_line)
{
    char out[8192];
    capture_stderr(log_long, out, sizeof(out));
    size_t n = strlen(out);
    ASSERT(n > 100 && n < 2000);
    ASSERT_EQ(out[n - 1], '\n');
    ASSERT(strchr(out, '\n') == out + n - 1);
}
