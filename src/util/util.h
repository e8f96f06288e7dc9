/*
 * util: allocation wrappers, clocks, a growable byte buffer, an intrusive list and logging.
 * Depends on nothing but libc. Memory exhaustion aborts (one place, like redis zmalloc).
 */
#ifndef SANDBOXD_UTIL_H
#define SANDBOXD_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#ifndef MIN /* <sys/param.h> (pulled in by uv.h) has the same ones */
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#endif
#ifndef MAX
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#endif
#define container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

/* ---- allocation: never return NULL; abort with a message on exhaustion ---- */
void *xmalloc(size_t n);
void *xcalloc(size_t nmemb, size_t n);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- clocks ---- */
int64_t now_ms(void);    /* wall clock, ms since the Unix epoch */
uint64_t mono_ms(void);  /* CLOCK_MONOTONIC in ms */
uint64_t mono_us(void);  /* CLOCK_MONOTONIC in µs */

/* ---- sbuf: growable byte buffer, always NUL-terminated after sbuf_* calls ---- */
struct sbuf {
    char *buf;
    size_t len;
    size_t cap;
};
#define SBUF_INIT {NULL, 0, 0}
void sbuf_init(struct sbuf *sb);
void sbuf_free(struct sbuf *sb);                 /* releases memory; sb is reusable after */
void sbuf_reset(struct sbuf *sb);                /* len = 0, keeps capacity */
char *sbuf_reserve(struct sbuf *sb, size_t n);   /* ensures n free bytes; returns buf+len (may move buf) */
void sbuf_append(struct sbuf *sb, const void *p, size_t n);
void sbuf_puts(struct sbuf *sb, const char *s);
void sbuf_putc(struct sbuf *sb, char c);
void sbuf_printf(struct sbuf *sb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sbuf_vprintf(struct sbuf *sb, const char *fmt, va_list ap);
char *sbuf_steal(struct sbuf *sb);               /* returns buf (caller frees), sb becomes empty */
void sbuf_put_u64(struct sbuf *sb, uint64_t v);  /* decimal, no printf on hot paths */
size_t u64_dec(char dst[20], uint64_t v);        /* v's decimal digits at dst (no NUL); count */
void sbuf_put_i64(struct sbuf *sb, int64_t v);

/* ---- intrusive doubly linked circular list (libuv QUEUE / h2o linklist) ---- */
struct list {
    struct list *prev, *next;
};
static inline void list_init(struct list *l) { l->prev = l->next = l; }
static inline bool list_empty(const struct list *l) { return l->next == l; }
static inline bool list_linked(const struct list *n) { return n->next != NULL && n->next != n; }
static inline void list_insert_tail(struct list *head, struct list *n)
{
    n->prev = head->prev;
    n->next = head;
    head->prev->next = n;
    head->prev = n;
}
static inline void list_remove(struct list *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->prev = n->next = n;
}
#define list_foreach(pos, head) for ((pos) = (head)->next; (pos) != (head); (pos) = (pos)->next)
#define list_foreach_safe(pos, tmp, head) \
    for ((pos) = (head)->next, (tmp) = (pos)->next; (pos) != (head); (pos) = (tmp), (tmp) = (pos)->next)

/* ---- logging: to stderr, one line each, "sandboxd: <level>: ..." ----
 * log_warn appends strerror(errno); log_warnx does not. fatal/fatalx exit(1).
 * Never pass secrets (tokens) to these. */
extern int log_verbose;
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_warnx(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
void fatalx(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* ---- small string helpers ---- */
/* Deep copy of a NULL-terminated string vector (NULL gives an empty one) in one allocation:
 * the pointers, then the strings. strv_free frees such a copy (accepts NULL). */
char **strv_dup(char *const *v);
void strv_free(char **v);
/* Building such a packed vector piece by piece: the first pass (v == NULL) only counts what
 * the strings and their pieces need (or the caller sets n and bytes to bounds of it);
 * strv_pack_alloc() then allocates, and the same calls made again fill it. A string is one or
 * more strv_pack_add() pieces ended by strv_pack_end(). */
struct strv_pack {
    char **v;       /* NULL while counting */
    char *cur;      /* the string being added */
    char *p;        /* where its next byte goes */
    size_t n;       /* strings ended */
    size_t bytes;   /* string bytes, NULs included */
};
void strv_pack_add(struct strv_pack *pk, const char *s, size_t len);
void strv_pack_end(struct strv_pack *pk);
void strv_pack_alloc(struct strv_pack *pk);  /* resets the counts for the filling pass */
char **strv_pack_done(struct strv_pack *pk); /* the NULL-terminated vector */
bool str_is_digits(const char *s);                        /* non-empty, all ASCII digits */
int parse_u64(const char *s, size_t n, uint64_t *ret);    /* 0 or -EINVAL / -ERANGE */
/* Percent-decodes src[0..n) into a new string; -EINVAL on a bad escape or an embedded NUL. */
int pct_decode(const char *src, size_t n, char **ret);
/* Constant-time comparison of two byte strings (length leaks, content does not). */
bool ct_equal(const void *a, size_t alen, const void *b, size_t blen);

#endif
