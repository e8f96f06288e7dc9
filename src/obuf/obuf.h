/*
 * obuf: one process's captured output, kept whole on disk with bounded daemon memory.
 * No libuv; plain syscalls on one file, so unit tests feed it byte strings.
 *
 * Bytes read from the child's stdout/stderr pipes go in through obuf_write(); obuf splits
 * them into line records on '\n' (a line longer than OBUF_LINE_MAX is emitted in chunks
 * cut at a UTF-8 character boundary; the final partial line is emitted at obuf_eof()).
 * Records of both streams go, in capture order, into one append-only log file:
 *
 *     record = header { u32 len; u8 stream; u8 flags; u16 zero; i64 ts_ms } + len data bytes
 *
 * The data never contains the '\n' that ended the line (flag OBUF_F_NL says one was there),
 * so the raw stream is exactly the concatenation of data (+ "\n" where OBUF_F_NL).
 * A record's offset is its logical byte position in the log (starting at 0). Offsets are
 * stable forever; cursors are offsets.
 *
 * Memory: a store holds no heap beyond the struct until output arrives; then a write-behind
 * buffer (at most OBUF_PENDING_MAX) and two partial-line buffers (at most OBUF_LINE_MAX each),
 * and a small log kept in memory instead of a file (within the limits of obuf_set_mem).
 * Readers copy records out of the file (pread, page cache) or the pending buffer into their
 * own bounded buffer, so a slow reader costs no daemon memory and never slows the writer.
 *
 * Budget: when the retained log exceeds max_bytes, whole leading segments are dropped
 * (fallocate PUNCH_HOLE, or the file is rewritten where that is unsupported). Dropping is
 * never silent: first_off moves forward, dropped_bytes counts it, and a reader whose cursor
 * falls before first_off gets OBUF_GAP once.
 *
 * Stats: bytes[] counts exactly what the child wrote (obuf_write input, taken even when the
 * disk later fails); lines[] counts records. Markers (OBUF_F_MARK) count in neither.
 * A disk write error loses bytes that were not yet in the file; to keep offsets meaningful,
 * everything before end_off is then treated as dropped (first_off = end_off).
 * Budget granularity: drop points are the first record of each segment, and end_off as a last
 * resort, so retained bytes never exceed max_bytes after a write.
 *
 * The file is created lazily on the first flush (or never, for a small log kept in memory:
 * obuf_set_mem) and unlinked by obuf_free(). After
 * obuf_seal() (process finished), the write fd and the buffers are released; reads still work
 * (the file is reopened read-only on demand and closed again by obuf_idle()).
 */
#ifndef SANDBOXD_OBUF_H
#define SANDBOXD_OBUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define OBUF_STDOUT 1
#define OBUF_STDERR 2

#define OBUF_F_NL 0x01     /* the line ended with '\n' (not part of data) */
#define OBUF_F_MARK 0x02   /* a daemon-made marker (restart/stop notices), not child output */
#define OBUF_F_PLAIN 0x04  /* data needs no JSON escaping (json_plain); unset: not known */

#define OBUF_HDR_SIZE 16
#define OBUF_LINE_MAX (64 * 1024)                 /* longest record data */
#define OBUF_REC_MAX (OBUF_HDR_SIZE + OBUF_LINE_MAX)
#define OBUF_PENDING_MAX (256 * 1024)  /* holds a batch of reads (PROC_FLUSH_BATCH), and any record */
_Static_assert(OBUF_PENDING_MAX >= OBUF_REC_MAX, "a record fits the write-behind buffer");
#define OBUF_SEGMENT (1024 * 1024)                /* granularity of head dropping */
#define OBUF_WB_CHUNK (8u << 20)     /* writeback is started per this many logged bytes */
#define OBUF_CACHE_KEEP (16u << 20)  /* the log's tail left in the page cache */
#define OBUF_CACHE_LAG_MAX (128u << 20) /* ... and at most this much behind a slow live reader */

#define OBUF_GAP 1   /* obuf_read: cursor was before the retained window (see there) */

/* ---- Direct writes ----
 * A store whose output comes fast (OBUF_DIRECT_MIN logged, then a batch of OBUF_DIRECT_BATCH or
 * more) writes its log in chunks of about OBUF_DIRECT_CHUNK with O_DIRECT, off the loop,
 * through the executor set with obuf_set_io(): the page cache is bypassed, so each byte costs
 * the loop no page-cache copy, allocation or writeback (measured here: 256 MiB in 0.01 s of
 * CPU against 0.05 s buffered). The chunk being filled, and those in flight (at most
 * OBUF_DIRECT_JOBS), stay in memory and are read from there; a store that goes quiet (no
 * output between two obuf_sweep() calls) writes what it holds the usual way and lets its buffers go.
 * Where O_DIRECT is refused, or with no executor, everything stays buffered. */
#define OBUF_DIRECT_ALIGN 4096u
#define OBUF_DIRECT_CHUNK (512u * 1024)
#define OBUF_DIRECT_JOBS 2
#define OBUF_DIRECT_MIN (4u << 20)
#define OBUF_DIRECT_BATCH (64u * 1024)   /* a batch this big enters direct mode */

struct obuf;
struct obuf_job;
struct obuf_io {
    /* Writes len bytes of buf at file offset off on fd (a blocking pwrite, in some other
     * thread), then, back on the caller's loop, calls obuf_job_done(job, result). buf stays
     * valid until then. */
    void (*submit)(void *ctx, struct obuf_job *job, int fd, const void *buf, size_t len,
                   uint64_t off);
    void *ctx;
};

/* Sets the executor for direct writes of stores created from now on (NULL: none). The
 * struct must outlive every store and job. */
void obuf_set_io(const struct obuf_io *io);

/* A direct write finished: result is pwrite's (bytes written, or -errno). A failed or short
 * write is redone through the page cache (and a store whose O_DIRECT writes fail with EINVAL
 * stops using them); only a failure of that too loses data (as any disk error does). May
 * free a store that obuf_free() left waiting for its jobs. */
void obuf_job_done(struct obuf_job *job, ssize_t result);

/* ---- Small logs in memory ----
 * A store whose whole log stays within per_store bytes keeps it on the heap and never creates
 * its file, while all such stores together hold at most total bytes; past either limit the
 * log moves to its file (created then) and carries on there. Why: most commands print little,
 * and a file per process is dear: creating one on ext4 without a journal scans past every
 * inode freed in the last minutes (find_inode_bit, recently_deleted), measured here at
 * 0.86 ms of the daemon's CPU per `echo` run once thousands of logs had come and gone.
 * 0 (the default): every log is a file. Applies to stores from then on. */
#define OBUF_MEM_STORE (16u * 1024)
#define OBUF_MEM_TOTAL (2u << 20)
void obuf_set_mem(size_t per_store, size_t total);
size_t obuf_mem_total(void);   /* bytes of logs held in memory now (tests, stats) */

/* Called every few hundred ms: a store in direct mode that got no output since the last call
 * writes what it holds and releases its chunk buffer. */
void obuf_sweep(struct obuf *b);
bool obuf_is_direct(const struct obuf *b);

struct obuf;

/* A live reader (a follow stream): while registered, the log's pages from its cursor on stay
 * in the page cache (up to OBUF_CACHE_LAG_MAX behind the end), so a reader that lags behind
 * a fast writer reads memory, not the disk. The reader owns the struct and its cursor. */
struct obuf_reader {
    const uint64_t *cursor;
    struct obuf_reader *next;
};

struct obuf_rec {
    uint64_t off;      /* offset of this record */
    int64_t ts_ms;
    uint8_t stream;    /* OBUF_STDOUT or OBUF_STDERR */
    uint8_t flags;
    uint32_t len;
    const char *data;  /* borrowed from the buffer passed to obuf_next() */
};

struct obuf_stats {
    uint64_t first_off;       /* oldest retained record */
    uint64_t end_off;         /* offset the next record will get */
    uint64_t dropped_bytes;   /* log bytes dropped by the budget (first_off - 0) */
    uint64_t dropped_out;     /* child stdout bytes (incl. '\n') in the dropped records */
    uint64_t dropped_err;     /* child stderr bytes in the dropped records */
    uint64_t bytes[3];        /* raw child bytes per stream (index OBUF_STDOUT/ERR), incl. '\n' */
    uint64_t lines[3];        /* records per stream (a chunked long line counts per chunk) */
    bool truncated;           /* dropped_bytes > 0 */
};

/* Creates a store whose log file will be `path` (not created yet). max_bytes is the retained
 * budget (0 = unlimited). Never fails. */
struct obuf *obuf_new(const char *path, uint64_t max_bytes);

/* Unlinks the file and frees everything (what direct writes still in flight need is freed
 * when the last of them is done). Accepts NULL. */
void obuf_free(struct obuf *b);

/* Feeds n raw bytes of `stream` read at ts_ms. Returns 0 or a negative errno (disk error:
 * the bytes are counted as dropped and the store stays usable). */
int obuf_write(struct obuf *b, int stream, const char *data, size_t n, int64_t ts_ms);

/* The stream hit EOF: emits its partial line, if any, as a record without OBUF_F_NL. */
int obuf_eof(struct obuf *b, int stream, int64_t ts_ms);

/* Appends one whole record (used for markers). Flushes `stream`'s partial line first so order
 * is kept. len is clamped to OBUF_LINE_MAX. */
int obuf_append(struct obuf *b, int stream, uint8_t flags, const char *data, size_t len,
                int64_t ts_ms);

/* Writes the pending buffer to the file. Call once per batch of obuf_write()s. */
int obuf_flush(struct obuf *b);

/* The producer is done: flushes partial lines and pending data, closes the write fd, frees
 * the buffers. Further writes are ignored. */
void obuf_seal(struct obuf *b);

/* Closes a read-only fd opened on demand after seal (call when no reader is active). */
void obuf_idle(struct obuf *b);

/* Copies whole records starting at *cursor into buf (cap >= OBUF_REC_MAX), advancing *cursor.
 * Returns 0 with *ret_len = bytes copied (0: nothing new yet), OBUF_GAP if *cursor was
 * before first_off (then *cursor = first_off, *ret_len = 0; the caller reports the gap of
 * first_off - old cursor bytes), or a negative errno. *cursor must be a record boundary
 * (0, a value returned here, or obuf_stats.end_off). */
int obuf_read(struct obuf *b, uint64_t *cursor, char *buf, size_t cap, size_t *ret_len);

/* obuf_read that lends rather than copies when it can: if the records from *cursor on are
 * all still in the write-behind buffer (a reader that keeps up, called before obuf_flush),
 * *ret_data points there, valid until the next call that writes, flushes or seals the store,
 * and buf is not touched; otherwise *ret_data = buf, filled as by obuf_read(). */
int obuf_read_ref(struct obuf *b, uint64_t *cursor, char *buf, size_t cap, const char **ret_data,
                  size_t *ret_len);

/* Iterates the records in buf[0..len) filled by obuf_read(); start with *pos = 0.
 * base_off is the cursor value before that obuf_read() call (to fill rec.off). */
bool obuf_next(const char *buf, size_t len, size_t *pos, uint64_t base_off, struct obuf_rec *ret);

void obuf_get_stats(const struct obuf *b, struct obuf_stats *ret);

/* Bytes of log currently retained on disk (end_off - first_off). */
uint64_t obuf_retained(const struct obuf *b);

/* Drops leading segments until at most keep bytes are retained (global budget enforcement). */
void obuf_trim(struct obuf *b, uint64_t keep);

/* A record boundary at or before max(first_off, off - window): where to start reading to see
 * (at least) the last `window` bytes of log before off. Cheap: uses the segment index. */
uint64_t obuf_seek_back(const struct obuf *b, uint64_t off, uint64_t window);

void obuf_reader_add(struct obuf *b, struct obuf_reader *r);
void obuf_reader_del(struct obuf *b, struct obuf_reader *r);   /* no-op if not added */

#endif
