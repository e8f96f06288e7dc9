/*
 * log: one line per message on stderr, "sandboxd: <level>: ...".
 * Deliberately no levels beyond these, no files, no syslog: the supervisor captures stderr.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/util.h"

int log_verbose;

/* Formats into one buffer and writes it with a single fputs so concurrent writers (children
 * sharing stderr) do not interleave within a line. */
static void vlog(const char *level, int err, const char *fmt, va_list ap)
{
    char msg[1024];
    /* Truncation is fine for a log line; lengths are re-measured rather than trusted. */
    snprintf(msg, sizeof(msg), "sandboxd: %s: ", level);
    size_t len = strlen(msg);
    vsnprintf(msg + len, sizeof(msg) - len, fmt, ap);
    len = strnlen(msg, sizeof(msg) - 1);
    if (err >= 0 && len < sizeof(msg) - 1)
        snprintf(msg + len, sizeof(msg) - len, ": %s", strerror(err));
    len = strnlen(msg, sizeof(msg) - 1);
    if (len < sizeof(msg) - 1) {
        msg[len++] = '\n';
        msg[len] = '\0';
    } else {
        msg[sizeof(msg) - 2] = '\n';
    }
    fputs(msg, stderr);
    fflush(stderr);
}

void log_info(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog("info", -1, fmt, ap);
    va_end(ap);
}

void log_debug(const char *fmt, ...)
{
    if (!log_verbose)
        return;
    va_list ap;
    va_start(ap, fmt);
    vlog("debug", -1, fmt, ap);
    va_end(ap);
}

void log_warn(const char *fmt, ...)
{
    int err = errno;
    va_list ap;
    va_start(ap, fmt);
    vlog("warning", err, fmt, ap);
    va_end(ap);
    errno = err;
}

void log_warnx(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog("warning", -1, fmt, ap);
    va_end(ap);
}

void fatal(const char *fmt, ...)
{
    int err = errno;
    va_list ap;
    va_start(ap, fmt);
    vlog("fatal", err, fmt, ap);
    va_end(ap);
    exit(1);
}

void fatalx(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog("fatal", -1, fmt, ap);
    va_end(ap);
    exit(1);
}
