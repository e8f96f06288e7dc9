/*
 * Unit tests for obuf: line splitting, chunking, ordering, reading (file + pending), budget
 * dropping and hole punching, sealing, stats, disk errors and memory bounds.
 * Each test works in its own temporary directory.
 */
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "json/json.h"
#include "obuf/obuf.h"
#include "test.h"
#include "util/util.h"

#ifdef __SANITIZE_ADDRESS__
/* From <sanitizer/allocator_interface.h>, which is not always installed. */
size_t __sanitizer_get_current_allocated_bytes(void);
#endif

extern bool obuf__no_punch;

/* ---- helpers ---- */

static char tmpdir[64];

static char *mkpath(const char *name)
{
    if (tmpdir[0] == 0) {
        strcpy(tmpdir, "/tmp/obuf_test.XXXXXX");
        ASSERT(mkdtemp(tmpdir) != NULL);
    }
    return xasprintf("%s/%s", tmpdir, name);
}

static void cleanup(void)
{
    ASSERT(rmdir(tmpdir) == 0); /* also proves obuf_free removed its files */
}

struct rec {
    uint64_t off;
    int64_t ts;
    int stream;
    int flags;
    char *data;
    size_t len;
};

struct recs {
    struct rec *v;
    size_t n, cap;
};

static void recs_free(struct recs *r)
{
    for (size_t i = 0; i < r->n; i++)
        free(r->v[i].data);
    free(r->v);
    memset(r, 0, sizeof(*r));
}

/* Parses one obuf_read() result into r. */
static void take(struct recs *r, const char *buf, size_t len, uint64_t base)
{
    size_t pos = 0;
    struct obuf_rec rec;
    while (obuf_next(buf, len, &pos, base, &rec)) {
        if (r->n == r->cap) {
            r->cap = r->cap ? r->cap * 2 : 64;
            r->v = xrealloc(r->v, r->cap * sizeof(*r->v));
        }
        ASSERT(rec.len <= OBUF_LINE_MAX);
        ASSERT(rec.stream == OBUF_STDOUT || rec.stream == OBUF_STDERR);
        char *d = xmalloc(rec.len + 1);
        memcpy(d, rec.data, rec.len);
        d[rec.len] = 0;
        /* OBUF_F_PLAIN is a hint that must never be wrong; tests compare the other flags. */
        if (rec.flags & OBUF_F_PLAIN)
            ASSERT(json_plain(rec.data, rec.len));
        int flags = rec.flags & ~OBUF_F_PLAIN;
        r->v[r->n++] = (struct rec){rec.off, rec.ts_ms, rec.stream, flags, d, rec.len};
    }
    ASSERT_EQ(pos, len); /* obuf_read hands out whole records only */
}

/* Reads everything from *cursor to the current end with buffers of `cap` bytes. */
static void read_all(struct obuf *b, uint64_t *cursor, size_t cap, struct recs *r)
{
    char *buf = xmalloc(cap);
    for (;;) {
        uint64_t base = *cursor;
        size_t len = 99;
        int rc = obuf_read(b, cursor, buf, cap, &len);
        ASSERT_EQ(rc, 0);
        if (len == 0)
            break;
        ASSERT(len <= cap);
        ASSERT_EQ(*cursor, base + len);
        take(r, buf, len, base);
    }
    free(buf);
}

/* The raw byte stream of one stream, rebuilt from records (markers excluded). */
static void raw_of(const struct recs *r, int stream, struct sbuf *out)
{
    for (size_t i = 0; i < r->n; i++) {
        if (r->v[i].stream != stream || (r->v[i].flags & OBUF_F_MARK))
            continue;
        sbuf_append(out, r->v[i].data, r->v[i].len);
        if (r->v[i].flags & OBUF_F_NL)
            sbuf_putc(out, '\n');
    }
}

static void expect_rec(const struct recs *r, size_t i, int stream, int flags, const char *data)
{
    ASSERT(i < r->n);
    ASSERT_EQ(r->v[i].stream, stream);
    ASSERT_EQ(r->v[i].flags, flags);
    ASSERT_EQ(r->v[i].len, strlen(data));
    ASSERT_MEMEQ(r->v[i].data, data, r->v[i].len);
}

static size_t heap_in_use(void)
{
#ifdef __SANITIZE_ADDRESS__
    return __sanitizer_get_current_allocated_bytes();
#else
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
#endif
}

/* ---- tests ---- */

TEST(obuf_lazy_file_and_free_unlinks)
{
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    struct stat st;
    ASSERT(stat(path, &st) < 0 && errno == ENOENT); /* nothing until output arrives */
    ASSERT_EQ(obuf_flush(b), 0);
    ASSERT(stat(path, &st) < 0 && errno == ENOENT);
    ASSERT_EQ(obuf_write(b, OBUF_STDOUT, "hi\n", 3, 1), 0);
    ASSERT_EQ(obuf_flush(b), 0);
    ASSERT(stat(path, &st) == 0);
    ASSERT_EQ(st.st_size, OBUF_HDR_SIZE + 2);
    ASSERT_EQ(st.st_mode & 0777, 0600);
    obuf_free(b);
    ASSERT(stat(path, &st) < 0 && errno == ENOENT);
    obuf_free(NULL);
    /* A store that never got output frees without touching the filesystem. */
    obuf_free(obuf_new(path, 0));
    free(path);
    cleanup();
}

/* Small logs stay in memory (obuf_set_mem): no file, read back from memory, moved to the
 * file once the store or all stores together go past their limit, or a budget drops. */
TEST(obuf_small_logs_in_memory)
{
    const size_t rec = OBUF_HDR_SIZE + 2; /* "hi" */
    struct stat st;
    struct recs r = {0};
    uint64_t cur = 0;
    obuf_set_mem(5 * rec, 8 * rec);

    char *pa = mkpath("a"), *pb = mkpath("b"), *pc = mkpath("c"), *pd = mkpath("d");
    struct obuf *a = obuf_new(pa, 0);
    ASSERT_EQ(obuf_write(a, OBUF_STDOUT, "hi\n", 3, 1), 0);
    ASSERT_EQ(obuf_flush(a), 0);
    ASSERT_EQ(obuf_write(a, OBUF_STDERR, "hi\nhi\n", 6, 2), 0);
    ASSERT_EQ(obuf_flush(a), 0);
    ASSERT(stat(pa, &st) < 0 && errno == ENOENT);
    ASSERT_EQ(obuf_mem_total(), 3 * rec);
    read_all(a, &cur, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, 3);
    expect_rec(&r, 0, OBUF_STDOUT, OBUF_F_NL, "hi");
    expect_rec(&r, 2, OBUF_STDERR, OBUF_F_NL, "hi");
    recs_free(&r);

    /* a reaches its own limit: its log moves to the file, in order, and carries on there */
    ASSERT_EQ(obuf_write(a, OBUF_STDOUT, "hi\nhi\nhi\n", 9, 3), 0);
    ASSERT_EQ(obuf_flush(a), 0);
    ASSERT(stat(pa, &st) == 0);
    ASSERT_EQ((size_t)st.st_size, 6 * rec);
    ASSERT_EQ(obuf_mem_total(), 0);
    cur = 0;
    read_all(a, &cur, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, 6);
    expect_rec(&r, 1, OBUF_STDERR, OBUF_F_NL, "hi");
    expect_rec(&r, 5, OBUF_STDOUT, OBUF_F_NL, "hi");
    ASSERT_EQ(r.v[5].ts, 3);
    recs_free(&r);

    /* b takes 5 of the 8 shared; c's flush of 4 more does not fit: c gets a file, b keeps
     * its memory, sealed or not */
    struct obuf *b = obuf_new(pb, 0), *c = obuf_new(pc, 0);
    ASSERT_EQ(obuf_write(b, OBUF_STDOUT, "hi\nhi\nhi\nhi\nhi\n", 15, 4), 0);
    ASSERT_EQ(obuf_flush(b), 0);
    ASSERT_EQ(obuf_write(c, OBUF_STDOUT, "hi\nhi\nhi\nhi\n", 12, 5), 0);
    ASSERT_EQ(obuf_flush(c), 0);
    ASSERT(stat(pb, &st) < 0 && stat(pc, &st) == 0);
    ASSERT_EQ(obuf_mem_total(), 5 * rec);
    obuf_seal(b);
    cur = 0;
    read_all(b, &cur, 2 * rec + 1, &r); /* reads cut between records */
    ASSERT_EQ(r.n, 5);
    expect_rec(&r, 4, OBUF_STDOUT, OBUF_F_NL, "hi");
    recs_free(&r);
    obuf_free(b);
    ASSERT_EQ(obuf_mem_total(), 0);

    /* a budget that drops moves the log to the file first; readers see the gap */
    struct obuf *d = obuf_new(pd, 2 * rec);
    ASSERT_EQ(obuf_write(d, OBUF_STDOUT, "hi\n", 3, 6), 0);
    ASSERT_EQ(obuf_flush(d), 0);
    ASSERT_EQ(obuf_mem_total(), rec);
    ASSERT_EQ(obuf_write(d, OBUF_STDOUT, "hi\nhi\n", 6, 7), 0);
    ASSERT_EQ(obuf_flush(d), 0);
    ASSERT_EQ(obuf_mem_total(), 0);
    ASSERT(stat(pd, &st) == 0);
    char buf[OBUF_REC_MAX];
    size_t len;
    cur = 0;
    ASSERT_EQ(obuf_read(d, &cur, buf, sizeof(buf), &len), OBUF_GAP);
    read_all(d, &cur, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, 0); /* (below a segment the budget drops to the end) */
    ASSERT_EQ(obuf_write(d, OBUF_STDOUT, "hi\n", 3, 8), 0);
    ASSERT_EQ(obuf_flush(d), 0);
    read_all(d, &cur, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, 1);
    ASSERT_EQ(r.v[0].ts, 8);
    recs_free(&r);

    obuf_free(a);
    obuf_free(c);
    obuf_free(d);
    obuf_set_mem(0, 0);
    free(pa);
    free(pb);
    free(pc);
    free(pd);
    cleanup(); /* every file unlinked */
}

/* A log kept in memory that cannot get its file (the directory is gone) counts as dropped. */
TEST(obuf_small_log_spill_failure)
{
    const size_t rec = OBUF_HDR_SIZE + 2;
    obuf_set_mem(2 * rec, 8 * rec);
    char *dir = mkpath("sub");
    char *path = xasprintf("%s/log", dir); /* directory does not exist */
    struct obuf *b = obuf_new(path, 0);
    ASSERT_EQ(obuf_write(b, OBUF_STDOUT, "hi\nhi\n", 6, 1), 0);
    ASSERT_EQ(obuf_flush(b), 0); /* in memory: no file needed */
    ASSERT_EQ(obuf_write(b, OBUF_STDOUT, "hi\n", 3, 2), 0);
    ASSERT_EQ(obuf_flush(b), -ENOENT);
    ASSERT_EQ(obuf_mem_total(), 0);
    struct obuf_stats st;
    obuf_get_stats(b, &st);
    ASSERT_EQ(st.first_off, st.end_off);
    ASSERT_EQ(st.dropped_bytes, 3 * rec);
    ASSERT_EQ(st.bytes[OBUF_STDOUT], 9);
    obuf_free(b);
    obuf_set_mem(0, 0);
    free(path);
    free(dir);
    cleanup();
}

TEST(obuf_lines_split_across_writes)
{
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    obuf_write(b, OBUF_STDOUT, "ab", 2, 10);
    obuf_write(b, OBUF_STDOUT, "c\nde", 4, 11);
    obuf_write(b, OBUF_STDOUT, "f\n\n", 3, 12);
    obuf_write(b, OBUF_STDOUT, "x\r\ny\r", 5, 13);
    obuf_eof(b, OBUF_STDOUT, 14);
    struct recs r = {0};
    uint64_t cur = 0;
    read_all(b, &cur, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, 5);
    expect_rec(&r, 0, OBUF_STDOUT, OBUF_F_NL, "abc");
    expect_rec(&r, 1, OBUF_STDOUT, OBUF_F_NL, "def");
    expect_rec(&r, 2, OBUF_STDOUT, OBUF_F_NL, "");
    expect_rec(&r, 3, OBUF_STDOUT, OBUF_F_NL, "x\r"); /* CR kept: dialects strip it */
    expect_rec(&r, 4, OBUF_STDOUT, 0, "y\r");         /* partial line at EOF, no NL */
    /* A line carries the capture time of its first byte. */
    ASSERT_EQ(r.v[0].ts, 10);
    ASSERT_EQ(r.v[1].ts, 11);
    ASSERT_EQ(r.v[2].ts, 12);
    ASSERT_EQ(r.v[3].ts, 13);
    ASSERT_EQ(r.v[4].ts, 13);
    /* Offsets are consecutive record positions. */
    ASSERT_EQ(r.v[0].off, 0);
    ASSERT_EQ(r.v[1].off, OBUF_HDR_SIZE + 3);
    ASSERT_EQ(r.v[4].off, cur - OBUF_HDR_SIZE - 2);

    struct sbuf raw = SBUF_INIT;
    raw_of(&r, OBUF_STDOUT, &raw);
    ASSERT_EQ(raw.len, 14);
    ASSERT_MEMEQ(raw.buf, "abc\ndef\n\nx\r\ny\r", 14);

    struct obuf_stats st;
    obuf_get_stats(b, &st);
    ASSERT_EQ(st.bytes[OBUF_STDOUT], 14);
    ASSERT_EQ(st.bytes[OBUF_STDERR], 0);
    ASSERT_EQ(st.lines[OBUF_STDOUT], 5);
    ASSERT_EQ(st.end_off, cur);
    ASSERT_EQ(st.first_off, 0);
    ASSERT(!st.truncated);
    /* EOF with nothing pending emits nothing. */
    obuf_eof(b, OBUF_STDOUT, 15);
    obuf_eof(b, OBUF_STDERR, 15);
    obuf_get_stats(b, &st);
    ASSERT_EQ(st.end_off, cur);
    sbuf_free(&raw);
    recs_free(&r);
    obuf_free(b);
    free(path);
    cleanup();
}

TEST(obuf_split_multibyte_one_record)
{
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    obuf_write(b, OBUF_STDOUT, "price \xe2\x82", 8, 1);
    obuf_flush(b);
    obuf_write(b, OBUF_STDOUT, "\xac\n", 2, 2);
    struct recs r = {0};
    uint64_t cur = 0;
    read_all(b, &cur, 1 << 20, &r);
    ASSERT_EQ(r.n, 1);
    expect_rec(&r, 0, OBUF_STDOUT, OBUF_F_NL, "price \xe2\x82\xac");
    struct sbuf sb = SBUF_INIT;
    json_escape(&sb, r.v[0].data, r.v[0].len);
    ASSERT_STREQ(sb.buf, "price \xe2\x82\xac");
    sbuf_free(&sb);
    recs_free(&r);
    obuf_free(b);
    free(path);
    cleanup();
}

TEST(obuf_interleaved_streams_keep_order)
{
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    char line[64];
    for (int i = 0; i < 5000; i++) {
        int s = (i % 3 == 0) ? OBUF_STDERR : OBUF_STDOUT;
        int n = snprintf(line, sizeof(line), "%s %d\n", s == OBUF_STDERR ? "err" : "out", i);
        ASSERT_EQ(obuf_write(b, s, line, (size_t)n, i), 0);
        if (i % 97 == 0)
            obuf_flush(b);
    }
    /* A partial stdout line does not hold back a complete stderr line. */
    obuf_write(b, OBUF_STDOUT, "part", 4, 6000);
    obuf_write(b, OBUF_STDERR, "whole\n", 6, 6001);
    obuf_write(b, OBUF_STDOUT, "ial\n", 4, 6002);
    struct recs r = {0};
    uint64_t cur = 0;
    read_all(b, &cur, 100000, &r);
    ASSERT_EQ(r.n, 5002);
    for (int i = 0; i < 5000; i++) {
        int s = (i % 3 == 0) ? OBUF_STDERR : OBUF_STDOUT;
        snprintf(line, sizeof(line), "%s %d", s == OBUF_STDERR ? "err" : "out", i);
        expect_rec(&r, (size_t)i, s, OBUF_F_NL, line);
        ASSERT_EQ(r.v[i].ts, i);
    }
    expect_rec(&r, 5000, OBUF_STDERR, OBUF_F_NL, "whole");
    expect_rec(&r, 5001, OBUF_STDOUT, OBUF_F_NL, "partial");
    recs_free(&r);
    obuf_free(b);
    free(path);
    cleanup();
}

/* Feeds `raw` in pseudo-random write sizes and checks the records rebuild it exactly, with
 * every record within OBUF_LINE_MAX and long lines cut at character boundaries. */
static void check_chunking(const char *raw, size_t n, unsigned seed)
{
    char *path = mkpath("chunk");
    struct obuf *b = obuf_new(path, 0);
    srand(seed);
    for (size_t off = 0; off < n;) {
        size_t k = (size_t)(1 + rand() % 70000); /* not inside MIN(): evaluated twice */
        k = MIN(k, n - off);
        ASSERT_EQ(obuf_write(b, OBUF_STDOUT, raw + off, k, 1), 0);
        off += k;
        if (rand() % 4 == 0)
            ASSERT_EQ(obuf_flush(b), 0);
    }
    obuf_eof(b, OBUF_STDOUT, 2);
    struct recs r = {0};
    uint64_t cur = 0;
    read_all(b, &cur, OBUF_REC_MAX, &r);
    struct sbuf rebuilt = SBUF_INIT;
    raw_of(&r, OBUF_STDOUT, &rebuilt);
    ASSERT_EQ(rebuilt.len, n);
    ASSERT_MEMEQ(rebuilt.buf, raw, n);
    for (size_t i = 0; i < r.n; i++) {
        ASSERT(r.v[i].len <= OBUF_LINE_MAX);
        if (!(r.v[i].flags & OBUF_F_NL) && i + 1 < r.n) {
            /* A chunk: exactly full, or shortened only to keep a character whole. */
            ASSERT(r.v[i].len >= OBUF_LINE_MAX - 3);
            ASSERT_EQ(utf8_cut(r.v[i].data, r.v[i].len), r.v[i].len);
        }
    }
    struct obuf_stats st;
    obuf_get_stats(b, &st);
    ASSERT_EQ(st.bytes[OBUF_STDOUT], n);
    ASSERT_EQ(st.lines[OBUF_STDOUT], r.n);
    sbuf_free(&rebuilt);
    recs_free(&r);
    obuf_free(b);
    free(path);
}

TEST(obuf_long_line_chunks)
{
    /* 200 KiB of ASCII then '\n': chunks of exactly 64 KiB and a final NL record. */
    size_t n = 200 * 1024 + 1;
    char *raw = xmalloc(n);
    for (size_t i = 0; i < n - 1; i++)
        raw[i] = (char)('a' + i % 26);
    raw[n - 1] = '\n';
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    ASSERT_EQ(obuf_write(b, OBUF_STDOUT, raw, n, 5), 0);
    struct recs r = {0};
    uint64_t cur = 0;
    read_all(b, &cur, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, 4);
    for (int i = 0; i < 3; i++) {
        ASSERT_EQ(r.v[i].len, OBUF_LINE_MAX);
        ASSERT_EQ(r.v[i].flags, 0);
    }
    ASSERT_EQ(r.v[3].len, 200 * 1024 - 3 * OBUF_LINE_MAX);
    ASSERT_EQ(r.v[3].flags, OBUF_F_NL);
    recs_free(&r);
    obuf_free(b);
    free(path);

    /* Same bytes fed in random pieces. */
    check_chunking(raw, n, 1);
    free(raw);
    cleanup();
}

TEST(obuf_long_line_chunks_utf8)
{
    /* 3- and 4-byte characters so that 64 KiB boundaries land mid-character. */
    size_t n = 0, cap = 1024 * 1024;
    char *raw = xmalloc(cap);
    for (int line = 0; line < 3; line++) {
        size_t want = (size_t)(150 + line * 70) * 1024;
        size_t start = n;
        while (n - start < want) {
            const char *ch = (n % 7 == 0) ? "\xf0\x9f\x98\x80" : "\xe2\x82\xac";
            memcpy(raw + n, ch, strlen(ch));
            n += strlen(ch);
        }
        raw[n++] = '\n';
    }
    /* A line of exactly OBUF_LINE_MAX bytes stays one record with its newline. */
    memset(raw + n, 'z', OBUF_LINE_MAX);
    n += OBUF_LINE_MAX;
    raw[n++] = '\n';
    ASSERT(n <= cap);
    for (unsigned seed = 1; seed <= 5; seed++)
        check_chunking(raw, n, seed);

    char *path = mkpath("exact");
    struct obuf *b = obuf_new(path, 0);
    obuf_write(b, OBUF_STDOUT, raw + n - OBUF_LINE_MAX - 1, OBUF_LINE_MAX + 1, 1);
    struct recs r = {0};
    uint64_t cur = 0;
    read_all(b, &cur, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, 1);
    ASSERT_EQ(r.v[0].len, OBUF_LINE_MAX);
    ASSERT_EQ(r.v[0].flags, OBUF_F_NL);
    recs_free(&r);
    obuf_free(b);
    free(path);
    free(raw);
    cleanup();
}

TEST(obuf_invalid_utf8_long_line_cut_full)
{
    /* Bytes that never form characters: chunks are cut at the full length. */
    size_t n = 3 * OBUF_LINE_MAX + 10;
    char *raw = xmalloc(n);
    memset(raw, 0xe2, n);
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    obuf_write(b, OBUF_STDERR, raw, n, 1);
    obuf_eof(b, OBUF_STDERR, 2);
    struct recs r = {0};
    uint64_t cur = 0;
    read_all(b, &cur, OBUF_REC_MAX * 2, &r);
    ASSERT_EQ(r.n, 4);
    ASSERT_EQ(r.v[0].len + r.v[1].len + r.v[2].len + r.v[3].len, n);
    for (size_t i = 0; i < 4; i++)
        ASSERT_EQ(r.v[i].stream, OBUF_STDERR);
    recs_free(&r);
    obuf_free(b);
    free(path);
    free(raw);
    cleanup();
}

TEST(obuf_read_caps_and_cursor)
{
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    char line[200], xs[151];
    memset(xs, 'x', 150);
    xs[150] = 0;
    struct sbuf want = SBUF_INIT;
    for (int i = 0; i < 20000; i++) {
        int n = snprintf(line, sizeof(line), "line %d %.*s\n", i, i % 150, xs);
        obuf_write(b, OBUF_STDOUT, line, (size_t)n, i);
        sbuf_append(&want, line, (size_t)n);
    }
    /* One huge record in the middle (direct write path) and more lines after it. */
    char *big = xmalloc(OBUF_LINE_MAX + 1);
    memset(big, 'B', OBUF_LINE_MAX);
    big[OBUF_LINE_MAX] = '\n';
    obuf_write(b, OBUF_STDOUT, big, OBUF_LINE_MAX + 1, 1);
    sbuf_append(&want, big, OBUF_LINE_MAX + 1);
    obuf_write(b, OBUF_STDOUT, "tail\n", 5, 2);
    sbuf_append(&want, "tail\n", 5);

    size_t caps[] = {OBUF_REC_MAX, OBUF_REC_MAX + 1, 100000, 1 << 20, 64 << 20};
    for (size_t c = 0; c < ARRAY_SIZE(caps); c++) {
        struct recs r = {0};
        uint64_t cur = 0;
        read_all(b, &cur, caps[c], &r);
        ASSERT_EQ(r.n, 20002);
        struct sbuf raw = SBUF_INIT;
        raw_of(&r, OBUF_STDOUT, &raw);
        ASSERT_EQ(raw.len, want.len);
        ASSERT_MEMEQ(raw.buf, want.buf, raw.len);
        struct obuf_stats st;
        obuf_get_stats(b, &st);
        ASSERT_EQ(cur, st.end_off);
        /* Continuing from any record offset yields the rest. */
        struct recs r2 = {0};
        uint64_t cur2 = r.v[12345].off;
        read_all(b, &cur2, caps[c], &r2);
        ASSERT_EQ(r2.n, r.n - 12345);
        ASSERT_EQ(r2.v[0].off, r.v[12345].off);
        ASSERT_MEMEQ(r2.v[0].data, r.v[12345].data, r.v[12345].len);
        recs_free(&r2);
        sbuf_free(&raw);
        recs_free(&r);
    }
    /* Reading at the end: nothing new, not an error. */
    char buf[OBUF_REC_MAX];
    struct obuf_stats st;
    obuf_get_stats(b, &st);
    uint64_t cur = st.end_off;
    size_t len = 7;
    ASSERT_EQ(obuf_read(b, &cur, buf, sizeof(buf), &len), 0);
    ASSERT_EQ(len, 0);
    ASSERT_EQ(cur, st.end_off);
    cur = st.end_off + 1;
    ASSERT(obuf_read(b, &cur, buf, sizeof(buf), &len) < 0);
    /* A buffer smaller than the next record is refused, not spun on. */
    cur = 0;
    ASSERT_EQ(obuf_read(b, &cur, buf, 10, &len), -ENOBUFS);
    ASSERT_EQ(cur, 0);
    free(big);
    sbuf_free(&want);
    obuf_free(b);
    free(path);
    cleanup();
}

TEST(obuf_read_while_appending)
{
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    struct recs r = {0};
    uint64_t cur = 0;
    struct sbuf want = SBUF_INIT;
    char line[64];
    srand(7);
    for (int i = 0; i < 30000; i++) {
        int n = snprintf(line, sizeof(line), "%d:%0*d\n", i, rand() % 40, 0);
        obuf_write(b, OBUF_STDOUT, line, (size_t)n, i);
        sbuf_append(&want, line, (size_t)n);
        /* Readers catch up at random moments: sometimes only the pending buffer holds
         * the new bytes, sometimes part is flushed and part pending. */
        if (rand() % 50 == 0)
            read_all(b, &cur, (rand() % 2) ? OBUF_REC_MAX : 300000, &r);
        if (rand() % 300 == 0)
            obuf_flush(b);
    }
    read_all(b, &cur, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, 30000);
    struct sbuf raw = SBUF_INIT;
    raw_of(&r, OBUF_STDOUT, &raw);
    ASSERT_EQ(raw.len, want.len);
    ASSERT_MEMEQ(raw.buf, want.buf, raw.len);
    for (size_t i = 0; i < r.n; i++)
        ASSERT_EQ(r.v[i].ts, (int64_t)i);
    sbuf_free(&raw);
    sbuf_free(&want);
    recs_free(&r);
    obuf_free(b);
    free(path);
    cleanup();
}

/* Past OBUF_WB_CHUNK and OBUF_CACHE_KEEP the log's older pages are written back and dropped
 * from the page cache: a reader far behind (here: from offset 0, after 40 MiB) and one that
 * keeps up both read every byte, in order, from the disk or the cached tail. Long (64 KiB)
 * and short lines are mixed. */
TEST(obuf_big_log_reads_back_after_cache_drop)
{
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    static char big[OBUF_LINE_MAX];
    char line[100];
    uint64_t live = 0, nrec = 0, nlive = 0, total = 0;
    struct recs r = {0};
    for (int i = 0; total < 40u * 1024 * 1024; i++) {
        if (i % 2 == 0) {
            memset(big, 'a' + i % 26, sizeof(big) - 1);
            big[sizeof(big) - 1] = '\n';
            ASSERT_EQ(obuf_write(b, OBUF_STDOUT, big, sizeof(big), i), 0);
            total += sizeof(big);
            nrec++;
        } else {
            for (int k = 0; k < 100; k++) {
                int n = snprintf(line, sizeof(line), "%d.%d\n", i, k);
                ASSERT_EQ(obuf_write(b, OBUF_STDERR, line, (size_t)n, i), 0);
                total += (size_t)n;
                nrec++;
            }
        }
        ASSERT_EQ(obuf_flush(b), 0);
        if (i % 64 == 0) { /* a reader that keeps up */
            read_all(b, &live, OBUF_REC_MAX, &r);
            nlive += r.n;
            ASSERT_EQ(nlive, nrec);
            recs_free(&r);
        }
    }
    uint64_t cur = 0; /* a reader from the start */
    read_all(b, &cur, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, (size_t)nrec);
    uint64_t got = 0, nbig = 0;
    for (size_t i = 0; i < r.n; i++) {
        got += r.v[i].len + ((r.v[i].flags & OBUF_F_NL) ? 1 : 0);
        if (r.v[i].stream == OBUF_STDOUT) { /* written at i = 2 * nbig */
            char want = (char)('a' + (2 * nbig++) % 26);
            ASSERT(r.v[i].len == sizeof(big) - 1 || r.v[i].len == sizeof(big));
            ASSERT(r.v[i].data[0] == want && r.v[i].data[r.v[i].len / 2] == want);
        }
    }
    ASSERT_EQ(got, total);
    recs_free(&r);
    obuf_free(b);
    free(path);
    cleanup();
}

/* ---- direct writes ---- */

/* A test executor for obuf's direct writes: jobs run at once, or wait in a queue until
 * run_jobs(); fail_with makes them report that error instead of writing. */
struct tjob {
    struct obuf_job *job;
    int fd;
    const void *buf;
    size_t len;
    uint64_t off;
};
static struct tjob tq[64];
static int ntq, jobs_seen;
static bool t_immediate = true;
static int t_fail_with;

static void t_run(struct tjob *t)
{
    ssize_t r = t_fail_with ? -t_fail_with : pwrite(t->fd, t->buf, t->len, (off_t)t->off);
    obuf_job_done(t->job, r);
}

static void t_submit(void *ctx, struct obuf_job *job, int fd, const void *buf, size_t len,
                     uint64_t off)
{
    (void)ctx;
    ASSERT(((uintptr_t)buf % OBUF_DIRECT_ALIGN) == 0 && len % OBUF_DIRECT_ALIGN == 0 &&
           off % OBUF_DIRECT_ALIGN == 0);
    jobs_seen++;
    struct tjob t = {job, fd, buf, len, off};
    if (t_immediate) {
        t_run(&t);
        return;
    }
    ASSERT(ntq < (int)(sizeof(tq) / sizeof(tq[0])));
    tq[ntq++] = t;
}

/* Completes the queued jobs, newest first when reverse (out of order, as threads may). */
static void run_jobs(bool reverse)
{
    while (ntq > 0) {
        struct tjob t;
        if (reverse) {
            t = tq[--ntq];
        } else {
            t = tq[0];
            memmove(tq, tq + 1, (size_t)--ntq * sizeof(tq[0]));
        }
        t_run(&t);
    }
}

static const struct obuf_io t_io = {.submit = t_submit};

/* Can the test dir take O_DIRECT writes? (Not on tmpfs, say.) */
static bool direct_possible(void)
{
    char *p = mkpath("probe");
    int fd = open(p, O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0600);
    bool ok = fd >= 0;
    if (fd >= 0)
        close(fd);
    unlink(p);
    free(p);
    return ok;
}

/* Feeds `total` bytes of known lines (64 KiB ones on stdout, short ones on stderr) the way
 * the process core does (a flush per batch), with a reader keeping up every `every`
 * batches; returns whether the store was ever in direct mode. *nrec gets the record count. */
static bool feed_known(struct obuf *b, uint64_t total, int every, uint64_t *live,
                       uint64_t *ret_nrec)
{
    static char big[OBUF_LINE_MAX];
    char line[100];
    uint64_t nrec = 0, nlive = 0, fed = 0;
    bool was_direct = false;
    struct recs r = {0};
    for (int i = 0; fed < total; i++) {
        if (i % 2 == 0) {
            memset(big, 'a' + i % 26, sizeof(big) - 1);
            big[sizeof(big) - 1] = '\n';
            ASSERT_EQ(obuf_write(b, OBUF_STDOUT, big, sizeof(big), i), 0);
            fed += sizeof(big);
            nrec++;
        } else {
            for (int k = 0; k < 100; k++) {
                int n = snprintf(line, sizeof(line), "%d.%d\n", i, k);
                ASSERT_EQ(obuf_write(b, OBUF_STDERR, line, (size_t)n, i), 0);
                fed += (size_t)n;
                nrec++;
            }
        }
        ASSERT_EQ(obuf_flush(b), 0);
        was_direct |= obuf_is_direct(b);
        if (every > 0 && i % every == 0) {
            read_all(b, live, OBUF_REC_MAX, &r);
            nlive += r.n;
            ASSERT_EQ(nlive, nrec);
            recs_free(&r);
        }
    }
    *ret_nrec = nrec;
    return was_direct;
}

/* Every record feed_known() wrote, in order, read from offset 0. */
static void check_known(struct obuf *b, uint64_t nrec)
{
    struct recs r = {0};
    uint64_t cur = 0, nbig = 0, nsmall = 0;
    read_all(b, &cur, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, (size_t)nrec);
    for (size_t i = 0; i < r.n; i++) {
        if (r.v[i].stream == OBUF_STDOUT) { /* batch 2 * nbig */
            char want = (char)('a' + (2 * nbig++) % 26);
            ASSERT_EQ(r.v[i].len, OBUF_LINE_MAX - 1);
            for (size_t k = 0; k < r.v[i].len; k += 4093)
                ASSERT_EQ(r.v[i].data[k], want);
        } else { /* batch 2 * (nsmall / 100) + 1, line nsmall % 100 */
            char want[32];
            snprintf(want, sizeof(want), "%d.%d", (int)(2 * (nsmall / 100) + 1),
                     (int)(nsmall % 100));
            nsmall++;
            ASSERT_EQ(r.v[i].len, strlen(want));
            ASSERT_MEMEQ(r.v[i].data, want, r.v[i].len);
        }
    }
    recs_free(&r);
}

/* A fast store goes direct, and every byte reads back, live and from the start, before and
 * after sealing; the spare chunk buffers are gone once no store is direct. */
TEST(obuf_direct_writes_read_back)
{
    bool can = direct_possible();
    obuf_set_io(&t_io);
    char *path = mkpath("log");
    size_t h0 = heap_in_use();
    struct obuf *b = obuf_new(path, 0);
    uint64_t live = 0, nrec;
    bool was = feed_known(b, 24u << 20, 3, &live, &nrec);
    ASSERT_EQ(was, can);
    if (can)
        ASSERT(jobs_seen >= 10);
    check_known(b, nrec);
    obuf_seal(b);
    ASSERT(!obuf_is_direct(b));
    check_known(b, nrec);
    obuf_free(b);
    ASSERT(heap_in_use() <= h0 + 4096);
    obuf_set_io(NULL);
    free(path);
    cleanup();
}

/* Jobs still in flight (completed late, out of order, or when more than OBUF_DIRECT_JOBS would
 * be: written through the page cache instead) are read from their buffers; a quiet store
 * leaves direct mode at the second sweep. */
TEST(obuf_direct_jobs_in_flight)
{
    if (!direct_possible()) {
        fprintf(stderr, "  (no O_DIRECT in %s: the buffered path is what runs)\n", tmpdir);
    }
    obuf_set_io(&t_io);
    t_immediate = false;
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    uint64_t live = 0, nrec;
    feed_known(b, 12u << 20, 2, &live, &nrec);
    if (obuf_is_direct(b)) {
        ASSERT_EQ(ntq, OBUF_DIRECT_JOBS); /* never more in flight */
        check_known(b, nrec);             /* from the file and the jobs' buffers */
        run_jobs(true);
        check_known(b, nrec);
        obuf_sweep(b);
        ASSERT(obuf_is_direct(b)); /* output since the last sweep (none before) */
        obuf_sweep(b);
        ASSERT(!obuf_is_direct(b));
    }
    check_known(b, nrec);
    obuf_free(b);
    obuf_set_io(NULL);
    free(path);
    cleanup();
}

/* A failed direct write is redone through the page cache: no byte is lost. EINVAL (O_DIRECT
 * refused) also ends direct writes, for this store and every later one. */
TEST(obuf_direct_failures_fall_back)
{
    bool can = direct_possible();
    obuf_set_io(&t_io);
    char *path = mkpath("a"), *path2 = mkpath("b"), *path3 = mkpath("c");
    uint64_t live = 0, nrec;
    struct obuf_stats st;

    t_fail_with = EIO;
    struct obuf *b = obuf_new(path, 0);
    feed_known(b, 8u << 20, 4, &live, &nrec);
    ASSERT_EQ(jobs_seen > 0, can);
    check_known(b, nrec);
    obuf_get_stats(b, &st);
    ASSERT_EQ(st.dropped_bytes, 0);
    obuf_free(b);

    t_fail_with = EINVAL;
    int before = jobs_seen;
    live = 0;
    b = obuf_new(path2, 0);
    feed_known(b, 8u << 20, 4, &live, &nrec);
    ASSERT_EQ(jobs_seen == before + 1, can); /* the one refused */
    ASSERT(!obuf_is_direct(b));
    check_known(b, nrec);
    obuf_free(b);

    t_fail_with = 0;
    before = jobs_seen;
    live = 0;
    b = obuf_new(path3, 0);
    feed_known(b, 8u << 20, 0, &live, &nrec);
    ASSERT_EQ(jobs_seen, before); /* refused once: never tried again */
    check_known(b, nrec);
    obuf_free(b);

    obuf_set_io(NULL);
    free(path);
    free(path2);
    free(path3);
    cleanup();
}

/* obuf_free with jobs in flight: the store waits for them, then is gone (ASan checks). */
TEST(obuf_direct_free_with_jobs_in_flight)
{
    obuf_set_io(&t_io);
    t_immediate = false;
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    uint64_t live = 0, nrec;
    feed_known(b, 10u << 20, 0, &live, &nrec);
    obuf_free(b);
    run_jobs(false);
    obuf_set_io(NULL);
    free(path);
    cleanup();
}

/* Pages of the file's first len bytes that are in the page cache. */
static size_t cached_pages(const char *path, size_t len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ASSERT(fd >= 0);
    void *m = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    ASSERT(m != MAP_FAILED);
    size_t pg = (size_t)sysconf(_SC_PAGESIZE), n = len / pg, in = 0;
    unsigned char *vec = xmalloc(n);
    ASSERT_EQ(mincore(m, len, vec), 0);
    for (size_t i = 0; i < n; i++)
        in += vec[i] & 1;
    free(vec);
    munmap(m, len);
    close(fd);
    return in;
}

/* 40 MiB logged: without a live reader the head of the log leaves the page cache; with a
 * registered reader still at its start it stays (the reader would otherwise read the disk),
 * and it goes at the next chunk once the reader has moved on. */
TEST(obuf_live_reader_keeps_its_pages_cached)
{
    static char blk[OBUF_LINE_MAX];
    const size_t head = 4u << 20;
    struct statfs fs;
    memset(blk, 'r', sizeof(blk) - 1);
    blk[sizeof(blk) - 1] = '\n';
    for (int with_reader = 0; with_reader < 2; with_reader++) {
        char *path = mkpath(with_reader ? "kept" : "dropped");
        struct obuf *b = obuf_new(path, 0);
        uint64_t cursor = 0;
        struct obuf_reader rd = {.cursor = &cursor};
        if (with_reader)
            obuf_reader_add(b, &rd);
        for (size_t total = 0; total < 40u << 20; total += sizeof(blk)) {
            ASSERT_EQ(obuf_write(b, OBUF_STDOUT, blk, sizeof(blk), 0), 0);
            ASSERT_EQ(obuf_flush(b), 0);
        }
        size_t pages = head / (size_t)sysconf(_SC_PAGESIZE);
        size_t in = cached_pages(path, head);
        if (with_reader) {
            /* Not all: the kernel's own reclaim may take a few (this VM runs kdamond; one run
             * in ~15 saw 994 of 1024). The store dropping them would leave under half. */
            ASSERT(in >= pages - pages / 8);
            /* The reader moves past everything: the next chunk lets the head go. */
            struct obuf_stats st;
            obuf_get_stats(b, &st);
            cursor = st.end_off;
            for (size_t total = 0; total < OBUF_WB_CHUNK + sizeof(blk); total += sizeof(blk)) {
                ASSERT_EQ(obuf_write(b, OBUF_STDOUT, blk, sizeof(blk), 0), 0);
                ASSERT_EQ(obuf_flush(b), 0);
            }
            ASSERT_EQ(statfs(path, &fs), 0);
            if (fs.f_type != 0x01021994) /* not tmpfs, where nothing is ever dropped */
                ASSERT(cached_pages(path, head) < pages / 2);
            obuf_reader_del(b, &rd);
            obuf_reader_del(b, &rd); /* twice is a no-op */
        } else {
            ASSERT_EQ(statfs(path, &fs), 0);
            if (fs.f_type != 0x01021994)
                ASSERT(in < pages / 2);
        }
        obuf_free(b);
        free(path);
    }
    cleanup();
}

/* Writes `total` bytes of numbered 100-byte lines; records each record's start offset. */
static void write_lines(struct obuf *b, size_t total, uint64_t **ret_offs, size_t *ret_n)
{
    char blk[64 * 1024];
    size_t nlines = 0, cap = total / 100 + 16;
    uint64_t *offs = xmalloc(cap * sizeof(*offs));
    uint64_t off = 0;
    size_t done = 0;
    while (done < total) {
        size_t k = 0;
        while (k + 100 <= sizeof(blk) && done + k < total) {
            snprintf(blk + k, 101, "%09zu%090d", nlines, 0);
            blk[k + 99] = '\n';
            offs[nlines++] = off;
            off += OBUF_HDR_SIZE + 99;
            k += 100;
        }
        ASSERT_EQ(obuf_write(b, OBUF_STDOUT, blk, k, (int64_t)nlines), 0);
        ASSERT_EQ(obuf_flush(b), 0);
        done += k;
    }
    *ret_offs = offs;
    *ret_n = nlines;
}

static bool is_boundary(const uint64_t *offs, size_t n, uint64_t off, size_t *ret_idx)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (offs[mid] < off)
            lo = mid + 1;
        else
            hi = mid;
    }
    *ret_idx = lo;
    return lo < n && offs[lo] == off;
}

static void check_budget(bool no_punch)
{
    obuf__no_punch = no_punch;
    char *path = mkpath("log");
    uint64_t max = 3 * OBUF_SEGMENT;
    struct obuf *b = obuf_new(path, max);
    /* A reader that starts early and then stalls. */
    uint64_t slow = 0;
    char *buf = xmalloc(OBUF_REC_MAX);
    size_t len;
    obuf_write(b, OBUF_STDOUT, "first\n", 6, 0);
    ASSERT_EQ(obuf_read(b, &slow, buf, OBUF_REC_MAX, &len), 0);
    ASSERT_EQ(len, OBUF_HDR_SIZE + 5);

    uint64_t *offs;
    size_t n;
    write_lines(b, 20 * OBUF_SEGMENT, &offs, &n);
    for (size_t i = 0; i < n; i++)
        offs[i] += OBUF_HDR_SIZE + 5; /* after "first" */

    struct obuf_stats st;
    obuf_get_stats(b, &st);
    ASSERT(st.truncated);
    ASSERT_EQ(st.dropped_bytes, st.first_off);
    ASSERT(st.end_off - st.first_off <= max);
    ASSERT(st.end_off - st.first_off > max - OBUF_SEGMENT - OBUF_REC_MAX);
    ASSERT_EQ(obuf_retained(b), st.end_off - st.first_off);
    ASSERT_EQ(st.bytes[OBUF_STDOUT], 100 * n + 6); /* stats count everything */
    ASSERT_EQ(st.lines[OBUF_STDOUT], n + 1);
    size_t idx;
    ASSERT(is_boundary(offs, n, st.first_off, &idx));
    /* first_off is the first record that starts in its segment. */
    ASSERT(offs[idx] / OBUF_SEGMENT != offs[idx - 1] / OBUF_SEGMENT);

    /* Disk space of the dropped head is released. */
    struct stat sst;
    ASSERT(stat(path, &sst) == 0);
    /* The rewrite fallback lets the dead prefix grow to the retained size before copying. */
    uint64_t disk_max = no_punch ? 2 * max + 2 * OBUF_SEGMENT : max + 2 * OBUF_SEGMENT;
    ASSERT((uint64_t)sst.st_blocks * 512 <= disk_max);
    if (no_punch) {
        char *tmp = xasprintf("%s.tmp", path);
        ASSERT(access(tmp, F_OK) < 0);
        free(tmp);
    }

    /* The stalled reader gets OBUF_GAP once, then continues at first_off. */
    uint64_t before = slow;
    ASSERT_EQ(obuf_read(b, &slow, buf, OBUF_REC_MAX, &len), OBUF_GAP);
    ASSERT_EQ(len, 0);
    ASSERT_EQ(slow, st.first_off);
    ASSERT(slow - before > 0);
    struct recs r = {0};
    read_all(b, &slow, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, n - idx);
    for (size_t i = 0; i < r.n; i++) {
        ASSERT_EQ(r.v[i].off, offs[idx + i]);
        char want[32];
        snprintf(want, sizeof(want), "%09zu", idx + i);
        ASSERT_MEMEQ(r.v[i].data, want, 9);
        ASSERT_EQ(r.v[i].len, 99);
    }
    /* A new reader at 0 also gets exactly one gap. */
    uint64_t fresh = 0;
    ASSERT_EQ(obuf_read(b, &fresh, buf, OBUF_REC_MAX, &len), OBUF_GAP);
    ASSERT_EQ(obuf_read(b, &fresh, buf, OBUF_REC_MAX, &len), 0);
    ASSERT(len > 0);

    /* seek_back: a record boundary at most (but near) window bytes before off. */
    for (uint64_t w = 0; w <= max + OBUF_SEGMENT; w += 100003) {
        uint64_t sb = obuf_seek_back(b, st.end_off, w);
        size_t si;
        ASSERT(sb >= st.first_off);
        ASSERT(sb == st.first_off || sb + w <= st.end_off);
        ASSERT(is_boundary(offs, n, sb, &si) || sb == st.end_off);
        /* Never more than a segment (plus one record) further back than needed. */
        ASSERT(sb == st.first_off || sb + w + OBUF_SEGMENT + OBUF_REC_MAX > st.end_off);
    }
    ASSERT_EQ(obuf_seek_back(b, st.end_off, UINT64_MAX), st.first_off);
    ASSERT_EQ(obuf_seek_back(b, st.first_off + 10, 5), st.first_off);

    /* Sealed stores read back the same after reopening the file. */
    obuf_seal(b);
    struct recs r2 = {0};
    uint64_t c2 = st.first_off;
    read_all(b, &c2, 1 << 20, &r2);
    ASSERT_EQ(r2.n, r.n);
    ASSERT_MEMEQ(r2.v[r2.n - 1].data, r.v[r.n - 1].data, 99);
    obuf_idle(b);

    /* Global trimming after seal. Drop points are segment starts, so keeping two segments
     * always leaves a record boundary to start from (and more than nothing). */
    obuf_trim(b, 2 * OBUF_SEGMENT);
    obuf_get_stats(b, &st);
    ASSERT(st.end_off - st.first_off <= 2 * OBUF_SEGMENT);
    ASSERT(st.end_off - st.first_off > 0);
    ASSERT(is_boundary(offs, n, st.first_off, &idx));
    struct recs r3 = {0};
    uint64_t c3 = 0;
    ASSERT_EQ(obuf_read(b, &c3, buf, OBUF_REC_MAX, &len), OBUF_GAP);
    read_all(b, &c3, 1 << 20, &r3);
    ASSERT_EQ(r3.n, n - idx);
    ASSERT_EQ(r3.v[0].off, st.first_off);
    obuf_trim(b, 0);
    obuf_get_stats(b, &st);
    ASSERT_EQ(st.first_off, st.end_off);
    ASSERT_EQ(obuf_retained(b), 0);
    obuf_idle(b);

    recs_free(&r);
    recs_free(&r2);
    recs_free(&r3);
    free(offs);
    free(buf);
    obuf_free(b);
    free(path);
}

TEST_TIMEOUT(obuf_budget_drops_segments, 30)
{
    check_budget(false);
    cleanup();
}

TEST_TIMEOUT(obuf_budget_rewrite_fallback, 30)
{
    check_budget(true);
    cleanup();
}

TEST(obuf_budget_smaller_than_segment)
{
    /* A tiny budget is still a hard limit; the log stays readable throughout. */
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 10000);
    char line[128];
    for (int i = 0; i < 5000; i++) {
        int n = snprintf(line, sizeof(line), "%d %070d\n", i, 0);
        obuf_write(b, i % 2 ? OBUF_STDERR : OBUF_STDOUT, line, (size_t)n, i);
        ASSERT(obuf_retained(b) <= 10000);
        if (i % 10 == 0)
            obuf_flush(b);
    }
    struct obuf_stats st;
    obuf_get_stats(b, &st);
    uint64_t cur = 0;
    char *buf = xmalloc(OBUF_REC_MAX);
    size_t len;
    ASSERT_EQ(obuf_read(b, &cur, buf, OBUF_REC_MAX, &len), OBUF_GAP);
    struct recs r = {0};
    read_all(b, &cur, OBUF_REC_MAX, &r);
    ASSERT(r.n > 0);
    char want[16];
    snprintf(want, sizeof(want), "4999 ");
    ASSERT_MEMEQ(r.v[r.n - 1].data, want, 5);
    recs_free(&r);
    free(buf);
    obuf_free(b);
    free(path);
    cleanup();
}

TEST(obuf_markers_and_stats)
{
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    obuf_write(b, OBUF_STDOUT, "hello\nwor", 9, 1);
    obuf_write(b, OBUF_STDERR, "oops\n", 5, 2);
    /* The marker flushes stdout's partial line first, so order is kept. */
    ASSERT_EQ(obuf_append(b, OBUF_STDOUT, OBUF_F_MARK | OBUF_F_NL, "[restarted]", 11, 3), 0);
    obuf_write(b, OBUF_STDOUT, "ld\n", 3, 4);
    struct recs r = {0};
    uint64_t cur = 0;
    read_all(b, &cur, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, 5);
    expect_rec(&r, 0, OBUF_STDOUT, OBUF_F_NL, "hello");
    expect_rec(&r, 1, OBUF_STDERR, OBUF_F_NL, "oops");
    expect_rec(&r, 2, OBUF_STDOUT, 0, "wor");
    expect_rec(&r, 3, OBUF_STDOUT, OBUF_F_MARK | OBUF_F_NL, "[restarted]");
    expect_rec(&r, 4, OBUF_STDOUT, OBUF_F_NL, "ld");
    struct obuf_stats st;
    obuf_get_stats(b, &st);
    ASSERT_EQ(st.bytes[OBUF_STDOUT], 12); /* exactly what the child wrote */
    ASSERT_EQ(st.bytes[OBUF_STDERR], 5);
    ASSERT_EQ(st.lines[OBUF_STDOUT], 3); /* markers are not lines */
    ASSERT_EQ(st.lines[OBUF_STDERR], 1);
    ASSERT_EQ(st.end_off, cur);
    ASSERT_EQ(st.dropped_bytes, 0);

    /* Oversized markers are clamped. */
    char *big = xmalloc(OBUF_LINE_MAX + 100);
    memset(big, 'm', OBUF_LINE_MAX + 100);
    obuf_append(b, OBUF_STDERR, OBUF_F_MARK, big, OBUF_LINE_MAX + 100, 5);
    recs_free(&r);
    read_all(b, &cur, OBUF_REC_MAX, &r);
    ASSERT_EQ(r.n, 1);
    ASSERT_EQ(r.v[0].len, OBUF_LINE_MAX);
    ASSERT_EQ(obuf_write(b, 0, "x", 1, 1), -EINVAL);
    ASSERT_EQ(obuf_write(b, 3, "x", 1, 1), -EINVAL);
    free(big);
    recs_free(&r);
    obuf_free(b);
    free(path);
    cleanup();
}

TEST(obuf_seal_then_read)
{
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 0);
    obuf_write(b, OBUF_STDOUT, "a\nb", 3, 1);
    obuf_write(b, OBUF_STDERR, "c", 1, 2);
    uint64_t cur = 0;
    struct recs r = {0};
    read_all(b, &cur, OBUF_REC_MAX, &r); /* from pending only */
    ASSERT_EQ(r.n, 1);
    obuf_seal(b);
    obuf_seal(b); /* idempotent */
    /* Writes after seal are ignored. */
    ASSERT_EQ(obuf_write(b, OBUF_STDOUT, "late\n", 5, 9), 0);
    ASSERT_EQ(obuf_append(b, OBUF_STDOUT, OBUF_F_MARK, "m", 1, 9), 0);
    ASSERT_EQ(obuf_eof(b, OBUF_STDOUT, 9), 0);
    ASSERT_EQ(obuf_flush(b), 0);
    read_all(b, &cur, OBUF_REC_MAX, &r); /* the file is reopened read-only */
    ASSERT_EQ(r.n, 3);
    expect_rec(&r, 0, OBUF_STDOUT, OBUF_F_NL, "a");
    expect_rec(&r, 1, OBUF_STDOUT, 0, "b");
    expect_rec(&r, 2, OBUF_STDERR, 0, "c");
    ASSERT_EQ(r.v[1].ts, 1);
    ASSERT_EQ(r.v[2].ts, 2);
    obuf_idle(b);
    obuf_idle(b);
    struct recs r2 = {0};
    uint64_t c2 = 0;
    read_all(b, &c2, 1 << 20, &r2); /* reopens again after idle */
    ASSERT_EQ(r2.n, 3);
    struct obuf_stats st;
    obuf_get_stats(b, &st);
    ASSERT_EQ(st.bytes[OBUF_STDOUT], 3);
    ASSERT_EQ(st.bytes[OBUF_STDERR], 1);
    ASSERT_EQ(st.lines[OBUF_STDOUT], 2);
    ASSERT_EQ(st.lines[OBUF_STDERR], 1);
    recs_free(&r);
    recs_free(&r2);
    obuf_free(b);
    free(path);

    /* A sealed store that never had output reads as empty. */
    path = mkpath("empty");
    b = obuf_new(path, 0);
    obuf_seal(b);
    char buf[OBUF_REC_MAX];
    size_t len = 5;
    cur = 0;
    ASSERT_EQ(obuf_read(b, &cur, buf, sizeof(buf), &len), 0);
    ASSERT_EQ(len, 0);
    obuf_free(b);
    free(path);
    cleanup();
}

TEST(obuf_disk_error_counts_as_dropped)
{
    char *dir = mkpath("sub");
    char *path = xasprintf("%s/log", dir); /* directory does not exist yet */
    struct obuf *b = obuf_new(path, 0);
    ASSERT_EQ(obuf_write(b, OBUF_STDOUT, "lost 1\nlost 2\n", 14, 1), 0);
    uint64_t reader = 0;
    ASSERT_EQ(obuf_flush(b), -ENOENT);
    struct obuf_stats st;
    obuf_get_stats(b, &st);
    ASSERT_EQ(st.first_off, st.end_off);
    ASSERT_EQ(st.dropped_bytes, 2 * OBUF_HDR_SIZE + 12);
    ASSERT(st.truncated);
    ASSERT_EQ(st.bytes[OBUF_STDOUT], 14);

    /* The store stays usable once the disk recovers. */
    ASSERT(mkdir(dir, 0700) == 0);
    ASSERT_EQ(obuf_write(b, OBUF_STDOUT, "kept\n", 5, 2), 0);
    ASSERT_EQ(obuf_flush(b), 0);
    char buf[OBUF_REC_MAX];
    size_t len;
    ASSERT_EQ(obuf_read(b, &reader, buf, sizeof(buf), &len), OBUF_GAP);
    ASSERT_EQ(reader, st.first_off);
    struct recs r = {0};
    read_all(b, &reader, sizeof(buf), &r);
    ASSERT_EQ(r.n, 1);
    expect_rec(&r, 0, OBUF_STDOUT, OBUF_F_NL, "kept");
    recs_free(&r);
    obuf_free(b);
    ASSERT(rmdir(dir) == 0);
    free(path);
    free(dir);
    cleanup();
}

TEST_TIMEOUT(obuf_no_newline_stays_bounded, 60)
{
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 8 * OBUF_SEGMENT);
    char *blk = xmalloc(64 * 1024);
    for (size_t i = 0; i < 64 * 1024; i++)
        blk[i] = (char)('a' + i % 26);
    /* Warm up so the store's buffers exist before measuring. */
    obuf_write(b, OBUF_STDOUT, blk, 64 * 1024, 0);
    obuf_write(b, OBUF_STDOUT, blk, 64 * 1024, 0);
    obuf_flush(b);
    size_t heap0 = heap_in_use();
    size_t total = 64u << 20;
    for (size_t done = 128 * 1024; done < total; done += 64 * 1024) {
        obuf_write(b, OBUF_STDOUT, blk, MIN((size_t)64 * 1024, total - done), 1);
        obuf_flush(b);
        ASSERT(heap_in_use() <= heap0 + 64 * 1024);
    }
    obuf_eof(b, OBUF_STDOUT, 2);
    struct obuf_stats st;
    obuf_get_stats(b, &st);
    ASSERT_EQ(st.bytes[OBUF_STDOUT], total);
    ASSERT_EQ(st.lines[OBUF_STDOUT], (total + OBUF_LINE_MAX - 1) / OBUF_LINE_MAX);
    ASSERT(obuf_retained(b) <= 8 * OBUF_SEGMENT);
    struct stat sst;
    ASSERT(stat(path, &sst) == 0);
    ASSERT((uint64_t)sst.st_blocks * 512 <= 10 * OBUF_SEGMENT);
    free(blk);
    obuf_free(b);
    free(path);
    cleanup();
}

/* Plain lines are flagged at capture, whole or assembled from pieces, so the formatters skip
 * the escape scan; a line with anything to escape is not flagged. */
TEST(obuf_plain_flag)
{
    char *path = mkpath("plain");
    struct obuf *b = obuf_new(path, 0);
    const char *in = "plain line\nsay \"hi\"\ntab\there\npart one, ";
    obuf_write(b, OBUF_STDOUT, in, strlen(in), 1);
    obuf_write(b, OBUF_STDOUT, "part two\n", 9, 2);
    obuf_write(b, OBUF_STDOUT, "caf\xc3\xa9\nend", 9, 3);
    obuf_write(b, OBUF_STDERR, "mixed ", 6, 4);
    obuf_write(b, OBUF_STDERR, "\x01\n", 2, 5);
    obuf_seal(b);
    static const struct { const char *data; bool plain; } want[] = {
        {"plain line", true}, {"say \"hi\"", false}, {"tab\there", false},
        {"part one, part two", true}, {"caf\xc3\xa9", false}, {"mixed \x01", false},
        {"end", true},
    };
    char buf[OBUF_REC_MAX];
    uint64_t cur = 0;
    size_t n = 0, pos = 0, i = 0;
    ASSERT_EQ(obuf_read(b, &cur, buf, sizeof(buf), &n), 0);
    struct obuf_rec rec;
    while (obuf_next(buf, n, &pos, 0, &rec)) {
        ASSERT(i < sizeof(want) / sizeof(want[0]));
        ASSERT_EQ(rec.len, strlen(want[i].data));
        ASSERT_MEMEQ(rec.data, want[i].data, rec.len);
        ASSERT_EQ(!!(rec.flags & OBUF_F_PLAIN), want[i].plain);
        i++;
    }
    ASSERT_EQ(i, sizeof(want) / sizeof(want[0]));
    obuf_free(b);
    free(path);
    cleanup();
}

/* obuf_read_ref lends the write-behind buffer to a reader that keeps up (no copy), and
 * otherwise copies exactly what obuf_read would. */
TEST(obuf_read_ref_lends_pending)
{
    char *path = mkpath("lend");
    struct obuf *b = obuf_new(path, 0);
    char *buf = xmalloc(OBUF_REC_MAX);
    const char *data;
    uint64_t cur = 0, copy_cur = 0;
    size_t n;
    for (int round = 0; round < 50; round++) {
        char line[64];
        int len = snprintf(line, sizeof(line), "line %d\n", round);
        obuf_write(b, OBUF_STDOUT, line, (size_t)len, round);
        uint64_t base = cur;
        ASSERT_EQ(obuf_read_ref(b, &cur, buf, OBUF_REC_MAX, &data, &n), 0);
        ASSERT(data != buf); /* lent: the record is still in the write-behind buffer */
        struct obuf_rec rec;
        size_t pos = 0;
        ASSERT(obuf_next(data, n, &pos, base, &rec));
        ASSERT_EQ(rec.len, (size_t)len - 1);
        ASSERT_MEMEQ(rec.data, line, rec.len);
        ASSERT_EQ(pos, n);
        if (round % 3 == 0)
            ASSERT_EQ(obuf_flush(b), 0);
    }
    ASSERT_EQ(obuf_flush(b), 0);
    /* A reader behind the buffer gets copies, identical to obuf_read's. */
    ASSERT_EQ(obuf_read_ref(b, &copy_cur, buf, OBUF_REC_MAX, &data, &n), 0);
    ASSERT(data == buf);
    ASSERT_EQ(copy_cur, cur);
    uint64_t again = 0;
    char *buf2 = xmalloc(OBUF_REC_MAX);
    size_t n2;
    ASSERT_EQ(obuf_read(b, &again, buf2, OBUF_REC_MAX, &n2), 0);
    ASSERT_EQ(n2, n);
    ASSERT_MEMEQ(buf2, buf, n);
    /* At the end: nothing, not a lend of zero bytes past the buffer. */
    ASSERT_EQ(obuf_read_ref(b, &cur, buf, OBUF_REC_MAX, &data, &n), 0);
    ASSERT_EQ(n, 0);
    free(buf2);
    free(buf);
    obuf_free(b);
    free(path);
    cleanup();
}

TEST(obuf_idle_store_is_small)
{
    size_t h0 = heap_in_use();
    struct obuf *s[100];
    for (int i = 0; i < 100; i++) {
        char name[32];
        snprintf(name, sizeof(name), "s%d", i);
        char *p = mkpath(name);
        s[i] = obuf_new(p, 0);
        free(p);
    }
    size_t per = (heap_in_use() - h0) / 100;
    ASSERT(per < 512);
    /* Sealing releases the write-side buffers. */
    obuf_write(s[0], OBUF_STDOUT, "x\ny", 3, 1);
    size_t h1 = heap_in_use();
    obuf_seal(s[0]);
    ASSERT(heap_in_use() + 100 * 1024 <= h1); /* pending + partial line buffers gone */
    for (int i = 0; i < 100; i++)
        obuf_free(s[i]);
    cleanup();
}

TEST_TIMEOUT(obuf_write_throughput, 60)
{
    char *path = mkpath("log");
    struct obuf *b = obuf_new(path, 32 * OBUF_SEGMENT);
    char blk[64 * 1024];
    for (size_t i = 0; i < sizeof(blk); i++)
        blk[i] = (i % 100 == 99) ? '\n' : (char)('a' + i % 26);
    size_t total = 512u << 20;
    uint64_t t0 = mono_us();
    for (size_t done = 0; done < total; done += sizeof(blk)) {
        ASSERT_EQ(obuf_write(b, OBUF_STDOUT, blk, sizeof(blk), 1), 0);
        ASSERT_EQ(obuf_flush(b), 0);
    }
    uint64_t dt = mono_us() - t0;
    fprintf(stderr, "  obuf_write: %.0f MB/s of 100-byte lines\n", total / (double)(dt ? dt : 1));
    struct obuf_stats st;
    obuf_get_stats(b, &st);
    ASSERT_EQ(st.bytes[OBUF_STDOUT], total);
    obuf_free(b);
    free(path);
    cleanup();
}
