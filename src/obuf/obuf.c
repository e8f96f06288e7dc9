/*
 * obuf: one process's captured output as an append-only log file of line records, with a
 * write-behind buffer, per-stream partial-line buffers and a retained-bytes budget.
 * It does no event-loop work and no logging; it never blocks on anything but the local file.
 * It does not know about HTTP, JSON or subscribers: readers hold plain offsets (cursors).
 *
 * Offsets are logical log positions. The file normally maps them 1:1 (file_base == 0) and
 * dropped head segments become holes (FALLOC_FL_PUNCH_HOLE). Where punching is unsupported
 * the retained tail is copied to a fresh file, which then starts at logical file_base.
 *
 * Invariant while producing: flushed_off + pending_len == end_off, and every logical byte in
 * [max(first_off, file_base), flushed_off) is in the file or in a direct write in flight
 * (jobs, read from their buffers until done) - or, for a small log kept in memory, in mem
 * (then there is no file, first_off == file_base == 0 and mem_len == flushed_off). In
 * direct mode flushed_off is a multiple of OBUF_DIRECT_ALIGN and pending is an aligned
 * chunk buffer; file_base is then always 0.
 */
#include "obuf/obuf.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef O_DIRECT
#define O_DIRECT 0
#endif

#include "json/json.h"
#include "util/util.h"

/* Test hook (internal): behave as if the filesystem could not punch holes. */
bool obuf__no_punch;

static const struct obuf_io *dio;  /* obuf_set_io */
static size_t mem_store_max, mem_total_max; /* obuf_set_mem */
static size_t mem_total;           /* bytes in every store's mem */
static bool dio_refused;           /* O_DIRECT said EINVAL here once: never again */

/* One direct write in flight. */
struct obuf_job {
    struct obuf *b;
    struct obuf_job *next;  /* the store's jobs, in offset order */
    char *buf;              /* aligned chunk buffer, owned */
    uint64_t off;           /* logical offset of buf[0] */
    size_t len;             /* a multiple of OBUF_DIRECT_ALIGN */
};

struct partial {
    char *buf;      /* OBUF_LINE_MAX bytes, allocated on first use */
    size_t len;
    bool plain;     /* buf[0..len) is json_plain */
    int64_t ts_ms;  /* capture time of the line's first byte */
};

/* Child bytes per stream (index OBUF_STDOUT/OBUF_STDERR), '\n' included. */
struct raw_count {
    uint64_t n[3];
};

struct obuf {
    char *path;
    uint64_t max_bytes;
    int wfd;              /* O_RDWR while producing; -1 before creation and after seal */
    int rfd;              /* O_RDONLY opened on demand after seal */
    bool created;         /* the file exists (we created it, so we unlink it) */
    bool sealed;
    bool no_punch;        /* fallocate said EOPNOTSUPP: use the rewrite fallback */

    uint64_t first_off;
    uint64_t end_off;
    uint64_t flushed_off; /* logical bytes below this are in the file (or dropped) */
    uint64_t file_base;   /* logical offset of file byte 0 */
    uint64_t reclaimed;   /* logical bytes below this have had their disk space released */
    uint64_t wb_off;      /* file offset up to which writeback was started */
    uint64_t uncached;    /* file offset below which cached pages were let go */
    struct obuf_reader *readers;  /* live readers: their pages stay cached */

    char *mem;            /* a small log kept in memory (obuf_set_mem): logical
                           * [0, flushed_off), no file; NULL otherwise */
    size_t mem_len;       /* == flushed_off while mem is set */
    bool mem_ok;          /* the store may keep its log in memory (set at creation) */

    char *pending;        /* pending_cap bytes: logical [flushed_off, end_off) */
    size_t pending_len;
    size_t pending_cap;   /* OBUF_PENDING_MAX, or direct_cap() in direct mode */

    bool direct;          /* direct mode (see obuf.h): pending is the chunk being filled */
    bool freed;           /* obuf_free() ran; the struct waits for its last job */
    int dfd;              /* O_WRONLY | O_DIRECT on the file, -1 */
    const struct obuf_io *io;
    struct obuf_job *jobs;
    unsigned njobs;
    uint64_t mode_off;    /* end_off when the mode last changed */
    uint64_t batch_off;   /* end_off at the last obuf_flush() */
    uint64_t sweep_off;   /* end_off at the last obuf_sweep() */

    struct partial part[3];

    /* Record boundaries usable as drop points: the first record starting in each segment
     * after first_off's, oldest first, in bounds[bhead..bhead+nbounds). */
    uint64_t *bounds;
    struct raw_count *braw;   /* parallel to bounds: child bytes logged before each bound */
    size_t bhead, nbounds, bcap;
    uint64_t next_seg;    /* a record starting at or after this opens a new segment */

    uint64_t bytes[3];
    uint64_t lines[3];
    struct raw_count logged;  /* child bytes that became records (markers excluded) */
    struct raw_count dropped; /* of those, in records before first_off */
};

/* ---- file helpers ---- */

static int pwrite_all(int fd, const void *p, size_t n, uint64_t pos)
{
    const char *c = p;
    while (n > 0) {
        ssize_t w = pwrite(fd, c, n, (off_t)pos);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        c += w;
        n -= (size_t)w;
        pos += (uint64_t)w;
    }
    return 0;
}

static int pread_all(int fd, void *p, size_t n, uint64_t pos)
{
    char *c = p;
    while (n > 0) {
        ssize_t r = pread(fd, c, n, (off_t)pos);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO; /* the log is shorter than our bookkeeping says */
        c += r;
        n -= (size_t)r;
        pos += (uint64_t)r;
    }
    return 0;
}

/* ---- small logs in memory ---- */

void obuf_set_mem(size_t per_store, size_t total)
{
    mem_store_max = per_store;
    mem_total_max = total;
}

size_t obuf_mem_total(void)
{
    return mem_total;
}

static void mem_release(struct obuf *b)
{
    if (b->mem == NULL)
        return;
    mem_total -= b->mem_len;
    free(b->mem);
    b->mem = NULL;
    b->mem_len = 0;
    b->mem_ok = false;
}

/* Keeps n flushed bytes, at logical pos, in memory if the store may: false sends them to the
 * file. Exact-size growth: a small log is reallocated once per flush (batch of reads). */
static bool mem_append(struct obuf *b, const char *p, size_t n, uint64_t pos)
{
    if (!b->mem_ok || b->created || pos != b->mem_len || b->file_base != 0 ||
        b->mem_len + n > mem_store_max || mem_total + n > mem_total_max)
        return false;
    b->mem = xrealloc(b->mem, b->mem_len + n);
    memcpy(b->mem + b->mem_len, p, n);
    b->mem_len += n;
    mem_total += n;
    return true;
}

static int ensure_wfd(struct obuf *b);
static void lose_all(struct obuf *b);

/* The log kept in memory goes to its file now (budget drops and direct writes work on the
 * file); a sealed store does not keep the file open. */
static void mem_spill(struct obuf *b)
{
    if (b->mem == NULL)
        return;
    if (ensure_wfd(b) < 0)
        lose_all(b);
    if (b->sealed && b->wfd >= 0) {
        close(b->wfd);
        b->wfd = -1;
    }
}

static int ensure_wfd(struct obuf *b)
{
    if (b->wfd >= 0)
        return 0;
    /* O_TRUNC: a leftover file from an earlier daemon run under the same name is garbage. */
    int fd = open(b->path, O_RDWR | O_CREAT | (b->created ? 0 : O_TRUNC) | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    b->wfd = fd;
    b->created = true;
    if (b->mem != NULL) { /* a log kept in memory until now moves to the file */
        int r = pwrite_all(fd, b->mem, b->mem_len, 0);
        mem_release(b);
        return r;
    }
    return 0;
}

/* ---- budget ---- */

static void bounds_push(struct obuf *b, uint64_t off)
{
    if (b->bhead + b->nbounds == b->bcap) {
        if (b->bhead > 0) {
            memmove(b->bounds, b->bounds + b->bhead, b->nbounds * sizeof(*b->bounds));
            memmove(b->braw, b->braw + b->bhead, b->nbounds * sizeof(*b->braw));
            b->bhead = 0;
        } else {
            b->bcap = b->bcap ? b->bcap * 2 : 8;
            b->bounds = xrealloc(b->bounds, b->bcap * sizeof(*b->bounds));
            b->braw = xrealloc(b->braw, b->bcap * sizeof(*b->braw));
        }
    }
    b->braw[b->bhead + b->nbounds] = b->logged;
    b->bounds[b->bhead + b->nbounds++] = off;
}

/* Copies the retained flushed bytes into a fresh file and renames it over the log. Only used
 * where holes cannot be punched, and only once the dead prefix is at least as large as what
 * is kept, so the copying costs O(1) amortised per logged byte. */
static void rewrite_file(struct obuf *b, int fd, uint64_t upto)
{
    char *tmp = xasprintf("%s.tmp", b->path);
    char *cbuf = NULL;
    int nfd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (nfd < 0)
        goto out;
    cbuf = xmalloc(OBUF_PENDING_MAX);
    for (uint64_t pos = upto; pos < b->flushed_off;) {
        size_t n = (size_t)MIN((uint64_t)OBUF_PENDING_MAX, b->flushed_off - pos);
        if (pread_all(fd, cbuf, n, pos - b->file_base) < 0 ||
            pwrite_all(nfd, cbuf, n, pos - upto) < 0)
            goto fail;
        pos += n;
    }
    if (rename(tmp, b->path) < 0)
        goto fail;
    if (b->rfd >= 0) {
        close(b->rfd);
        b->rfd = -1;
    }
    if (b->wfd >= 0) {
        close(b->wfd);
        b->wfd = nfd;
    } else {
        close(nfd);
    }
    b->file_base = upto;
    b->reclaimed = upto;
    b->wb_off = b->uncached = 0;
    goto out;
fail:
    close(nfd);
    unlink(tmp);
out:
    free(cbuf);
    free(tmp);
}

/* The log's pages do not stay in the page cache: every OBUF_WB_CHUNK, writeback of the new
 * chunk is started (sync_file_range, asynchronous), and what lies more than OBUF_CACHE_KEEP
 * behind the end, written back by then, is let go (POSIX_FADV_DONTNEED drops clean pages,
 * skips any still in flight), unless a registered live reader has not read it yet (within
 * OBUF_CACHE_LAG_MAX). A live reader reads the cached tail; a replay reads the disk.
 * Memory stays bounded by the tail whatever a process prints, and the freed pages are
 * reused by the next writes: on a VM whose fresh memory is faulted in by the host, writing
 * into new page-cache pages ran at ~270 MB/s against ~1.3 GB/s into recycled ones (dd). */
static void write_behind(struct obuf *b, uint64_t end)
{
    if (end < b->wb_off + OBUF_WB_CHUNK)
        return;
    (void)sync_file_range(b->wfd, (off_t)b->wb_off, (off_t)(end - b->wb_off),
                          SYNC_FILE_RANGE_WRITE);
    b->wb_off = end;
    if (end > OBUF_CACHE_KEEP) {
        uint64_t upto = end - OBUF_CACHE_KEEP;
        for (struct obuf_reader *r = b->readers; r != NULL; r = r->next) {
            uint64_t at = *r->cursor > b->file_base ? *r->cursor - b->file_base : 0;
            upto = MIN(upto, at);
        }
        if (end > OBUF_CACHE_LAG_MAX)
            upto = MAX(upto, end - OBUF_CACHE_LAG_MAX);
        upto &= ~(uint64_t)(OBUF_WB_CHUNK - 1);
        if (upto > b->uncached) {
            /* Started a chunk or more ago: normally done, so the wait costs nothing; with a
             * disk slower than the writer it is the throttle the kernel would apply anyway,
             * at a few MiB of dirty pages instead of gigabytes. */
            (void)sync_file_range(b->wfd, (off_t)b->uncached, (off_t)(upto - b->uncached),
                                  SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                      SYNC_FILE_RANGE_WAIT_AFTER);
            (void)posix_fadvise(b->wfd, (off_t)b->uncached, (off_t)(upto - b->uncached),
                                POSIX_FADV_DONTNEED);
            b->uncached = upto;
        }
    }
}

/* Releases the disk space of dropped bytes that are already in the file. Failure only costs
 * disk space, never correctness, so errors are ignored. */
static void reclaim(struct obuf *b)
{
    uint64_t upto = MIN(b->first_off, b->flushed_off);
    if (b->jobs != NULL)
        upto = MIN(upto, b->jobs->off); /* a punch would race the write */
    if (!b->created || upto <= b->reclaimed)
        return;
    int fd = b->wfd;
    if (fd < 0) {
        fd = open(b->path, O_RDWR | O_CLOEXEC);
        if (fd < 0)
            return;
    }
    if (!b->no_punch && !obuf__no_punch) {
        uint64_t from = MAX(b->reclaimed, b->file_base);
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(from - b->file_base),
                      (off_t)(upto - from)) == 0) {
            b->reclaimed = upto;
            goto out;
        }
        if (errno != EOPNOTSUPP && errno != ENOSYS)
            goto out;
        b->no_punch = true;
    }
    uint64_t dead = upto - b->file_base, live = b->flushed_off - upto;
    if (dead >= live && dead >= OBUF_SEGMENT && !b->direct && b->jobs == NULL)
        rewrite_file(b, fd, upto); /* (with direct writes about, at a later drop) */
out:
    if (fd != b->wfd)
        close(fd);
}

/* Moves first_off forward to the earliest drop point that leaves at most keep bytes. The
 * drop points are the first record of each segment and, as a last resort, end_off: a budget
 * smaller than a segment is still a hard limit. */
static void drop_to(struct obuf *b, uint64_t keep)
{
    if (b->end_off - b->first_off <= keep)
        return;
    mem_spill(b);
    uint64_t target = b->end_off - keep;
    while (b->nbounds > 0 && b->bounds[b->bhead] < target) {
        b->bhead++;
        b->nbounds--;
    }
    if (b->nbounds > 0) {
        b->first_off = b->bounds[b->bhead];
        b->dropped = b->braw[b->bhead];
        b->bhead++;
        b->nbounds--;
    } else {
        b->first_off = b->end_off;
        b->dropped = b->logged;
    }
    if (b->nbounds == 0)
        b->bhead = 0;
    reclaim(b);
}

/* A disk error lost logged bytes: rather than leave a hole readers could misparse, everything
 * before end_off counts as dropped. Readers see OBUF_GAP and continue at the new end. */
static void lose_all(struct obuf *b)
{
    mem_release(b);
    b->first_off = b->end_off;
    b->dropped = b->logged;
    b->nbounds = 0;
    b->bhead = 0;
    reclaim(b);
}

/* ---- writing ---- */

static int flush_pending(struct obuf *b)
{
    if (b->pending_len == 0)
        return 0;
    assert(!b->direct);
    const char *p = b->pending;
    size_t n = b->pending_len;
    uint64_t pos = b->flushed_off;
    if (b->first_off > pos) {
        /* Only with budgets smaller than the pending buffer: skip what is already dropped. */
        size_t skip = (size_t)MIN(b->first_off - pos, (uint64_t)n);
        p += skip;
        n -= skip;
        pos += skip;
    }
    int r = 0;
    bool to_file = n > 0 && !mem_append(b, p, n, pos);
    if (to_file) {
        r = ensure_wfd(b);
        if (r == 0)
            r = pwrite_all(b->wfd, p, n, pos - b->file_base);
    }
    b->flushed_off += b->pending_len;
    b->pending_len = 0;
    if (r < 0)
        lose_all(b);
    else if (to_file)
        write_behind(b, b->flushed_off - b->file_base);
    return r;
}

static void put_hdr(char *h, size_t len, int stream, uint8_t flags, int64_t ts_ms)
{
    uint32_t l = (uint32_t)len;
    memcpy(h, &l, 4);
    h[4] = (char)stream;
    h[5] = (char)flags;
    h[6] = h[7] = 0;
    memcpy(h + 8, &ts_ms, 8);
}

#define KEEP_ERR(r, e)          \
    do {                        \
        int e_ = (e);           \
        if (e_ < 0 && (r) == 0) \
            (r) = e_;           \
    } while (0)

/* A record starts at end_off: note it as a drop point if it opens a segment. */
static void note_record_start(struct obuf *b)
{
    if (b->end_off >= b->next_seg) {
        if (b->end_off > b->first_off)
            bounds_push(b, b->end_off);
        b->next_seg = (b->end_off / OBUF_SEGMENT + 1) * OBUF_SEGMENT;
    }
}

/* A record of len data bytes was appended: counters and the budget. */
static void note_record_end(struct obuf *b, int stream, uint8_t flags, size_t len)
{
    if (!(flags & OBUF_F_MARK))
        b->logged.n[stream] += len + ((flags & OBUF_F_NL) ? 1 : 0);
    if (b->max_bytes && b->end_off - b->first_off > b->max_bytes)
        drop_to(b, b->max_bytes);
}

/* ---- direct writes (see obuf.h) ---- */

static size_t direct_cap(void)
{
    size_t n = OBUF_DIRECT_CHUNK + OBUF_REC_MAX;
    return (n + OBUF_DIRECT_ALIGN - 1) & ~(size_t)(OBUF_DIRECT_ALIGN - 1);
}

/* Chunk buffers are recycled while any store is in direct mode: a fresh 1 MiB allocation is
 * 256 page faults (and, on a VM, the host's faults behind them) per chunk, which cost more
 * than the page-cache writes they replace. The spares go when the last store leaves. */
#define SPARE_MAX 4
static char *spare[SPARE_MAX];
static unsigned nspare, ndirect;

static char *chunk_alloc(void)
{
    void *p;
    if (nspare > 0)
        return spare[--nspare];
    if (posix_memalign(&p, OBUF_DIRECT_ALIGN, direct_cap()) != 0)
        abort(); /* as xmalloc does */
    return p;
}

static void chunk_free(char *p)
{
    if (p == NULL)
        return;
    if (ndirect > 0 && nspare < SPARE_MAX)
        spare[nspare++] = p;
    else
        free(p);
}

static void direct_count(int delta)
{
    ndirect = (unsigned)((int)ndirect + delta);
    while (ndirect == 0 && nspare > 0)
        free(spare[--nspare]);
}

/* Writes n bytes at logical pos through the page cache. */
static int write_buffered(struct obuf *b, const char *p, size_t n, uint64_t pos)
{
    int r = ensure_wfd(b);
    if (r == 0)
        r = pwrite_all(b->wfd, p, n, pos - b->file_base);
    if (r == 0)
        write_behind(b, pos + n - b->file_base);
    return r;
}

/* Enters direct mode right after a flush (pending is empty and released): the chunk buffer
 * starts at flushed_off rounded down to OBUF_DIRECT_ALIGN, so it first gets back the bytes
 * of that block already in the file. */
static void enter_direct(struct obuf *b)
{
    if (b->mem != NULL) { /* (not with the limits obuf_set_mem is given: they are far below) */
        mem_spill(b);
        return;
    }
    if (b->dfd < 0) {
        b->dfd = open(b->path, O_WRONLY | O_DIRECT | O_CLOEXEC);
        if (b->dfd < 0) {
            if (errno == EINVAL)
                dio_refused = true;
            return;
        }
    }
    uint64_t at = b->flushed_off & ~(uint64_t)(OBUF_DIRECT_ALIGN - 1);
    size_t head = (size_t)(b->flushed_off - at);
    char *buf = chunk_alloc();
    if (head > 0 && (ensure_wfd(b) < 0 || pread_all(b->wfd, buf, head, at) < 0)) {
        chunk_free(buf);
        return;
    }
    free(b->pending);
    b->pending = buf;
    b->pending_len = head;
    b->pending_cap = direct_cap();
    b->flushed_off = at;
    b->direct = true;
    b->mode_off = b->end_off;
    direct_count(1);
}

/* Leaves direct mode: what the chunk buffer holds goes to the file through the page cache,
 * and the buffer is released. Jobs in flight finish on their own. */
static int leave_direct(struct obuf *b)
{
    int r = 0;
    if (!b->direct)
        return 0;
    if (b->pending_len > 0)
        r = write_buffered(b, b->pending, b->pending_len, b->flushed_off);
    b->flushed_off += b->pending_len;
    b->pending_len = 0;
    chunk_free(b->pending);
    b->pending = NULL;
    b->pending_cap = OBUF_PENDING_MAX;
    b->direct = false;
    b->mode_off = b->end_off;
    direct_count(-1);
    if (r < 0)
        lose_all(b);
    return r;
}

/* The chunk buffer is full: its whole blocks go out as a direct write (or, with
 * OBUF_DIRECT_JOBS in flight already, through the page cache right here), the rest moves to
 * a fresh buffer. */
static int direct_submit(struct obuf *b)
{
    size_t n = b->pending_len & ~(size_t)(OBUF_DIRECT_ALIGN - 1);
    size_t rest = b->pending_len - n;
    char *next = chunk_alloc();
    int r = 0;
    memcpy(next, b->pending + n, rest);
    if (b->njobs < OBUF_DIRECT_JOBS && !dio_refused) {
        struct obuf_job *j = xcalloc(1, sizeof(*j));
        j->b = b;
        j->buf = b->pending;
        j->off = b->flushed_off;
        j->len = n;
        struct obuf_job **pp = &b->jobs;
        while (*pp != NULL)
            pp = &(*pp)->next;
        *pp = j;
        b->njobs++;
        b->pending = next;
        b->pending_len = rest;
        b->flushed_off += n;
        b->io->submit(b->io->ctx, j, b->dfd, j->buf, j->len, j->off - b->file_base);
        return 0;
    }
    r = write_buffered(b, b->pending, n, b->flushed_off);
    chunk_free(b->pending);
    b->pending = next;
    b->pending_len = rest;
    b->flushed_off += n;
    if (r < 0)
        lose_all(b);
    return r;
}

static void free_store(struct obuf *b)
{
    if (b->dfd >= 0)
        close(b->dfd);
    free(b);
}

void obuf_job_done(struct obuf_job *j, ssize_t result)
{
    struct obuf *b = j->b;
    struct obuf_job **pp = &b->jobs;
    while (*pp != j)
        pp = &(*pp)->next;
    *pp = j->next;
    b->njobs--;
    if (!b->freed && (result < 0 || (size_t)result < j->len)) {
        /* Redo it through the page cache; never trust O_DIRECT here again if it was refused. */
        if (result == -EINVAL)
            dio_refused = true;
        size_t done = result > 0 ? (size_t)result : 0;
        if (write_buffered(b, j->buf + done, j->len - done, j->off + done) < 0)
            lose_all(b);
        /* (a store in direct mode leaves it at its next flush; this may run inside submit) */
    }
    chunk_free(j->buf);
    free(j);
    if (b->freed && b->jobs == NULL)
        free_store(b);
}

void obuf_set_io(const struct obuf_io *io)
{
    dio = io;
}

void obuf_sweep(struct obuf *b)
{
    if (b->direct && b->end_off == b->sweep_off)
        leave_direct(b);
    b->sweep_off = b->end_off;
}

bool obuf_is_direct(const struct obuf *b)
{
    return b->direct;
}

/* Room for a record of up to len data bytes (len + OBUF_HDR_SIZE <= OBUF_PENDING_MAX) in the
 * write-behind buffer, flushing (or in direct mode submitting) it first if needed: returns
 * where its data goes. The record exists once commit() is called; until then nothing
 * changed but a possible flush. */
static char *reserve(struct obuf *b, size_t len, int *r)
{
    if (b->pending == NULL)
        b->pending = xmalloc(OBUF_PENDING_MAX);
    if (b->pending_len + OBUF_HDR_SIZE + len > b->pending_cap)
        KEEP_ERR(*r, b->direct ? direct_submit(b) : flush_pending(b));
    return b->pending + b->pending_len + OBUF_HDR_SIZE;
}

/* Appends the record whose len data bytes reserve() placed. */
static void commit(struct obuf *b, int stream, uint8_t flags, size_t len, int64_t ts_ms)
{
    note_record_start(b);
    put_hdr(b->pending + b->pending_len, len, stream, flags, ts_ms);
    b->pending_len += OBUF_HDR_SIZE + len;
    b->end_off += OBUF_HDR_SIZE + len;
    note_record_end(b, stream, flags, len);
}

/* Appends one record whose data is p1[0..n1) followed by p2[0..n2). */
static int emit(struct obuf *b, int stream, uint8_t flags, const char *p1, size_t n1,
                const char *p2, size_t n2, int64_t ts_ms)
{
    size_t len = n1 + n2;
    int r = 0;
    char *d = reserve(b, len, &r);
    if (n1)
        memcpy(d, p1, n1);
    if (n2)
        memcpy(d + n1, p2, n2);
    commit(b, stream, flags, len, ts_ms);
    return r;
}

/* Emits stream's partial line (if any) as a record without OBUF_F_NL. */
static int emit_partial(struct obuf *b, int stream)
{
    struct partial *p = &b->part[stream];
    if (p->len == 0)
        return 0;
    int r = emit(b, stream, p->plain ? OBUF_F_PLAIN : 0, p->buf, p->len, NULL, 0, p->ts_ms);
    b->lines[stream]++;
    p->len = 0;
    return r;
}

/* How much of a too-long line goes into one chunk. */
static size_t chunk_len(const char *s)
{
    size_t cut = utf8_cut(s, OBUF_LINE_MAX);
    return cut ? cut : OBUF_LINE_MAX;
}

int obuf_write(struct obuf *b, int stream, const char *data, size_t n, int64_t ts_ms)
{
    if (stream != OBUF_STDOUT && stream != OBUF_STDERR)
        return -EINVAL;
    if (b->sealed)
        return 0;
    struct partial *p = &b->part[stream];
    int r = 0;
    b->bytes[stream] += n;

    while (n > 0) {
        bool plain; /* of data[0..linelen) */
        if (p->len == 0) {
            /* The usual case, a line that starts here: its bytes go into their record in
             * the write-behind buffer while they are scanned (one pass over each byte). */
            size_t lim = MIN(n, (size_t)OBUF_LINE_MAX);
            char *d = reserve(b, lim, &r);
            const char *nl = json_scan_copy_line(d, data, lim, &plain);
            if (nl != NULL) {
                size_t k = (size_t)(nl - data);
                commit(b, stream, OBUF_F_NL | (plain ? OBUF_F_PLAIN : 0), k, ts_ms);
                b->lines[stream]++;
                data += k + 1;
                n -= k + 1;
                continue;
            }
            if (lim == n) {
                /* The rest is the start of a line: it waits for its end. */
                if (p->buf == NULL)
                    p->buf = xmalloc(OBUF_LINE_MAX);
                memcpy(p->buf, data, n);
                p->len = n;
                p->plain = plain;
                p->ts_ms = ts_ms;
                break;
            }
            /* A line longer than OBUF_LINE_MAX: chunked below. */
        }
        const char *nl = json_scan_line(data, n, &plain);
        size_t linelen = nl ? (size_t)(nl - data) : n;
        size_t used = linelen + (nl ? 1 : 0);

        if (p->len == 0) {
            /* Fast path: records straight from the caller's bytes. A chunk is cut only
             * when more than OBUF_LINE_MAX bytes of the line are known, so a line of
             * exactly OBUF_LINE_MAX bytes stays one record with its '\n'. */
            const char *q = data;
            size_t k = linelen;
            uint8_t pf = plain ? OBUF_F_PLAIN : 0;
            while (k > OBUF_LINE_MAX) {
                size_t c = chunk_len(q);
                KEEP_ERR(r, emit(b, stream, pf, q, c, NULL, 0, ts_ms));
                b->lines[stream]++;
                q += c;
                k -= c;
            }
            if (nl) {
                KEEP_ERR(r, emit(b, stream, OBUF_F_NL | pf, q, k, NULL, 0, ts_ms));
                b->lines[stream]++;
            } else if (k > 0) {
                if (p->buf == NULL)
                    p->buf = xmalloc(OBUF_LINE_MAX);
                memcpy(p->buf, q, k);
                p->len = k;
                p->plain = plain;
                p->ts_ms = ts_ms;
            }
        } else if (p->len + linelen <= OBUF_LINE_MAX) {
            if (nl) {
                uint8_t pf = p->plain && plain ? OBUF_F_PLAIN : 0;
                KEEP_ERR(r, emit(b, stream, OBUF_F_NL | pf, p->buf, p->len, data, linelen,
                                 p->ts_ms));
                b->lines[stream]++;
                p->len = 0;
            } else {
                memcpy(p->buf + p->len, data, linelen);
                p->len += linelen;
                p->plain = p->plain && plain;
            }
        } else {
            /* The partial line overflows: top it up to OBUF_LINE_MAX, emit a chunk and keep
             * the (at most 3-byte) unfinished character for the next chunk. */
            size_t take = OBUF_LINE_MAX - p->len;
            memcpy(p->buf + p->len, data, take);
            size_t c = chunk_len(p->buf);
            KEEP_ERR(r, emit(b, stream, 0, p->buf, c, NULL, 0, p->ts_ms));
            b->lines[stream]++;
            memmove(p->buf, p->buf + c, OBUF_LINE_MAX - c);
            p->len = OBUF_LINE_MAX - c;
            p->plain = false; /* not known: the formatter checks */
            p->ts_ms = ts_ms;
            used = take;
        }
        data += used;
        n -= used;
    }
    return r;
}

int obuf_eof(struct obuf *b, int stream, int64_t ts_ms)
{
    if (stream != OBUF_STDOUT && stream != OBUF_STDERR)
        return -EINVAL;
    if (b->sealed)
        return 0;
    int r = emit_partial(b, stream);
    struct partial *p = &b->part[stream];
    free(p->buf);
    p->buf = NULL;
    return r;
}

int obuf_append(struct obuf *b, int stream, uint8_t flags, const char *data, size_t len,
                int64_t ts_ms)
{
    if (stream != OBUF_STDOUT && stream != OBUF_STDERR)
        return -EINVAL;
    if (b->sealed)
        return 0;
    int r = emit_partial(b, stream);
    len = MIN(len, (size_t)OBUF_LINE_MAX);
    KEEP_ERR(r, emit(b, stream, flags, data, len, NULL, 0, ts_ms));
    if (!(flags & OBUF_F_MARK)) {
        b->lines[stream]++;
        b->bytes[stream] += len + ((flags & OBUF_F_NL) ? 1 : 0);
    }
    return r;
}

int obuf_flush(struct obuf *b)
{
    if (b->sealed)
        return 0;
    uint64_t batch = b->end_off - b->batch_off;
    int r = 0;
    b->batch_off = b->end_off;
    if (b->direct && dio_refused)
        r = leave_direct(b);
    if (!b->direct) { /* (direct: the chunk buffer fills across batches; obuf_sweep() ends it) */
        r = flush_pending(b);
        /* The producer flushes once per batch of reads, so the write-behind buffer is only
         * needed within a batch: a process that printed a line and went quiet keeps no
         * buffer, nor does a partial-line buffer outlive its line. */
        free(b->pending);
        b->pending = NULL;
        if (r == 0 && b->io != NULL && !dio_refused && batch >= OBUF_DIRECT_BATCH &&
            b->end_off - b->mode_off >= OBUF_DIRECT_MIN && b->file_base == 0 &&
            !b->no_punch && !obuf__no_punch)
            enter_direct(b);
    }
    for (int s = OBUF_STDOUT; s <= OBUF_STDERR; s++) {
        if (b->part[s].len == 0 && b->part[s].buf != NULL) {
            free(b->part[s].buf);
            b->part[s].buf = NULL;
        }
    }
    return r;
}

void obuf_seal(struct obuf *b)
{
    if (b->sealed)
        return;
    for (int s = OBUF_STDOUT; s <= OBUF_STDERR; s++) {
        emit_partial(b, s);
        free(b->part[s].buf);
        b->part[s].buf = NULL;
    }
    if (b->direct)
        leave_direct(b);
    else
        flush_pending(b);
    free(b->pending);
    b->pending = NULL;
    if (b->wfd >= 0) {
        close(b->wfd);
        b->wfd = -1;
    }
    if (b->dfd >= 0 && b->jobs == NULL) {
        close(b->dfd);
        b->dfd = -1;
    }
    b->sealed = true;
}

/* ---- reading ---- */

static int read_fd(struct obuf *b)
{
    if (b->wfd >= 0)
        return b->wfd;
    if (b->rfd < 0)
        b->rfd = open(b->path, O_RDONLY | O_CLOEXEC);
    return b->rfd >= 0 ? b->rfd : -errno;
}

void obuf_idle(struct obuf *b)
{
    if (b->rfd >= 0) {
        close(b->rfd);
        b->rfd = -1;
    }
}

static bool parse_hdr(const char *h, uint32_t *ret_len)
{
    uint32_t len;
    memcpy(&len, h, 4);
    if (len > OBUF_LINE_MAX || (h[4] != OBUF_STDOUT && h[4] != OBUF_STDERR))
        return false;
    *ret_len = len;
    return true;
}

int obuf_read(struct obuf *b, uint64_t *cursor, char *buf, size_t cap, size_t *ret_len)
{
    uint64_t cur = *cursor;
    if (cur < b->first_off) {
        *cursor = b->first_off;
        *ret_len = 0;
        return OBUF_GAP;
    }
    if (cur > b->end_off)
        return -EINVAL;
    size_t want = (size_t)MIN((uint64_t)cap, b->end_off - cur);
    if (want == 0) {
        *ret_len = 0;
        return 0;
    }

    /* From the file, the buffers of direct writes in flight, and the write-behind buffer,
     * in that order of offsets. */
    size_t got = 0;
    struct obuf_job *j = b->jobs;
    while (got < want) {
        uint64_t at = cur + got;
        size_t left = want - got, n;
        while (j != NULL && j->off + j->len <= at)
            j = j->next;
        if (at >= b->flushed_off) {
            memcpy(buf + got, b->pending + (at - b->flushed_off), left);
            n = left;
        } else if (j != NULL && at >= j->off) {
            n = (size_t)MIN((uint64_t)left, j->off + j->len - at);
            memcpy(buf + got, j->buf + (at - j->off), n);
        } else {
            uint64_t upto = j != NULL ? j->off : b->flushed_off;
            n = (size_t)MIN((uint64_t)left, upto - at);
            if (b->mem != NULL) {
                memcpy(buf + got, b->mem + at, n);
                got += n;
                continue;
            }
            int fd = read_fd(b);
            if (fd < 0)
                return fd;
            int r = pread_all(fd, buf + got, n, at - b->file_base);
            if (r < 0)
                return r;
        }
        got += n;
    }

    /* Hand out whole records only; the cut one is read again next time. */
    size_t pos = 0;
    while (pos + OBUF_HDR_SIZE <= got) {
        uint32_t len;
        if (!parse_hdr(buf + pos, &len))
            return -EIO;
        if (pos + OBUF_HDR_SIZE + len > got)
            break;
        pos += OBUF_HDR_SIZE + len;
    }
    if (pos == 0)
        return -ENOBUFS; /* cap below one record */
    *cursor = cur + pos;
    *ret_len = pos;
    return 0;
}

int obuf_read_ref(struct obuf *b, uint64_t *cursor, char *buf, size_t cap, const char **ret_data,
                  size_t *ret_len)
{
    uint64_t cur = *cursor;
    if (cur >= b->first_off && cur >= b->flushed_off && cur < b->end_off) {
        /* Everything from cur on is whole records in the write-behind buffer. */
        *ret_data = b->pending + (cur - b->flushed_off);
        *ret_len = (size_t)(b->end_off - cur);
        *cursor = b->end_off;
        return 0;
    }
    *ret_data = buf;
    return obuf_read(b, cursor, buf, cap, ret_len);
}

bool obuf_next(const char *buf, size_t len, size_t *pos, uint64_t base_off, struct obuf_rec *ret)
{
    size_t p = *pos;
    uint32_t rlen;
    if (p + OBUF_HDR_SIZE > len)
        return false;
    memcpy(&rlen, buf + p, 4);
    if (rlen > len - p - OBUF_HDR_SIZE)
        return false;
    ret->off = base_off + p;
    ret->len = rlen;
    ret->stream = (uint8_t)buf[p + 4];
    ret->flags = (uint8_t)buf[p + 5];
    memcpy(&ret->ts_ms, buf + p + 8, 8);
    ret->data = buf + p + OBUF_HDR_SIZE;
    *pos = p + OBUF_HDR_SIZE + rlen;
    return true;
}

/* ---- lifetime and stats ---- */

struct obuf *obuf_new(const char *path, uint64_t max_bytes)
{
    struct obuf *b = xcalloc(1, sizeof(*b));
    b->path = xstrdup(path);
    b->max_bytes = max_bytes;
    b->wfd = -1;
    b->rfd = -1;
    b->dfd = -1;
    b->io = dio;
    b->pending_cap = OBUF_PENDING_MAX;
    b->next_seg = OBUF_SEGMENT;
    b->mem_ok = mem_store_max > 0;
    return b;
}

void obuf_free(struct obuf *b)
{
    if (b == NULL)
        return;
    if (b->wfd >= 0)
        close(b->wfd);
    if (b->rfd >= 0)
        close(b->rfd);
    if (b->created)
        unlink(b->path);
    mem_release(b);
    for (int s = 0; s < 3; s++)
        free(b->part[s].buf);
    if (b->direct) {
        chunk_free(b->pending);
        b->direct = false;
        direct_count(-1);
    } else {
        free(b->pending);
    }
    free(b->bounds);
    free(b->braw);
    free(b->path);
    if (b->jobs != NULL) {
        /* Their buffers are being written: the last one done frees the rest. */
        b->freed = true;
        b->wfd = b->rfd = -1;
        b->pending = NULL;
        b->bounds = NULL;
        b->braw = NULL;
        b->path = NULL;
        return;
    }
    free_store(b);
}

void obuf_get_stats(const struct obuf *b, struct obuf_stats *ret)
{
    memset(ret, 0, sizeof(*ret));
    ret->first_off = b->first_off;
    ret->end_off = b->end_off;
    ret->dropped_bytes = b->first_off;
    ret->dropped_out = b->dropped.n[OBUF_STDOUT];
    ret->dropped_err = b->dropped.n[OBUF_STDERR];
    memcpy(ret->bytes, b->bytes, sizeof(ret->bytes));
    memcpy(ret->lines, b->lines, sizeof(ret->lines));
    ret->truncated = b->first_off > 0;
}

void obuf_reader_add(struct obuf *b, struct obuf_reader *r)
{
    r->next = b->readers;
    b->readers = r;
}

void obuf_reader_del(struct obuf *b, struct obuf_reader *r)
{
    for (struct obuf_reader **pp = &b->readers; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == r) {
            *pp = r->next;
            r->next = NULL;
            return;
        }
    }
}

uint64_t obuf_retained(const struct obuf *b)
{
    return b->end_off - b->first_off;
}

void obuf_trim(struct obuf *b, uint64_t keep)
{
    drop_to(b, keep);
}

uint64_t obuf_seek_back(const struct obuf *b, uint64_t off, uint64_t window)
{
    off = MIN(off, b->end_off);
    uint64_t target = off > window ? off - window : 0;
    if (target <= b->first_off)
        return b->first_off;
    /* Largest known boundary <= target; the index holds one per segment, all > first_off. */
    const uint64_t *v = b->bounds + b->bhead;
    size_t lo = 0, hi = b->nbounds;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid] <= target)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo > 0 ? v[lo - 1] : b->first_off;
}
