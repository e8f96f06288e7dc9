/*
 * Listener: binds the socket, accepts connections and hands them to conn.c, and tears
 * everything down on http_server_stop().
 *
 * Accepting is done here rather than by uv_listen() so that it can be paused: at max_conns
 * (resumed when a connection closes) and for a moment after EMFILE/ENFILE/ENOBUFS/ENOMEM
 * (httpd server_accept backs off the same way), instead of spinning on a listening socket
 * that stays readable. Pending clients wait in the kernel backlog meanwhile.
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "server/server.h"

/* In .bss, not in the calloc'ed struct: only the pages reads ever reach become resident (an
 * idle daemon's RSS). One loop thread: every server may share it. */
static char read_buf[SRV_READ_BUF];

#define ACCEPT_BATCH 64           /* accepts per wakeup, then back to the loop */
#define BACKOFF_MS 100
#define LISTEN_BACKLOG 511

static void poll_start(struct http_server *s);
static void poll_stop(struct http_server *s);

static void on_backoff(uv_timer_t *t)
{
    struct http_server *s = t->data;
    s->backing_off = false;
    poll_start(s);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    struct http_server *s = h->data;

    if (status < 0) {
        log_warnx("listener: poll: %s", uv_strerror(status));
        return;
    }
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        if (s->nconns >= s->cfg.max_conns) {
            poll_stop(s);   /* resumed by srv__conn_gone() */
            return;
        }
        int fd = accept4(s->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            switch (errno) {
            case EINTR:
            case ECONNABORTED:
            case EPROTO:
                continue;
            case EAGAIN:
                return;
            case EMFILE:
            case ENFILE:
            case ENOBUFS:
            case ENOMEM:
                if (!s->fd_short)   /* once per shortage, not every retry */
                    log_warn("accept (pausing, retrying every %d ms)", BACKOFF_MS);
                s->fd_short = true;
                poll_stop(s);
                s->backing_off = true;
                uv_timer_start(&s->backoff, on_backoff, BACKOFF_MS, 0);
                return;
            default:
                log_warn("accept");
                return;
            }
        }
        if (s->fd_short)
            log_info("accept: descriptors available again");
        s->fd_short = false;
        srv__conn_new(s, fd);
    }
}

static void poll_start(struct http_server *s)
{
    if (s->polling || s->stopping || s->backing_off || s->nconns >= s->cfg.max_conns)
        return;
    if (uv_poll_start(&s->poll, UV_READABLE, on_poll) == 0)
        s->polling = true;
}

static void poll_stop(struct http_server *s)
{
    if (!s->polling)
        return;
    uv_poll_stop(&s->poll);
    s->polling = false;
}

void srv__conn_gone(struct http_server *s)
{
    poll_start(s);
}

void srv__handle_closed(struct http_server *s)
{
    if (--s->nhandles > 0 || !s->stopping)
        return;
    void (*cb)(void *) = s->done_cb;
    void *arg = s->done_arg;
    free(s);
    if (cb != NULL)
        cb(arg);
}

static void on_listener_closed(uv_handle_t *h)
{
    struct http_server *s = h->data;
    if (h == (uv_handle_t *)&s->poll && s->fd >= 0) {
        close(s->fd);
        s->fd = -1;
    }
    srv__handle_closed(s);
}

/* Parses "127.0.0.1", "::1", "[::1]" or "localhost" into ss. */
static int parse_addr(const char *host, int port, struct sockaddr_storage *ss)
{
    char buf[64];
    size_t n = strlen(host);

    if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
        if (n - 2 >= sizeof(buf))
            return UV_EINVAL;
        memcpy(buf, host + 1, n - 2);
        buf[n - 2] = '\0';
        host = buf;
    }
    if (strcmp(host, "localhost") == 0)
        host = "127.0.0.1";
    memset(ss, 0, sizeof(*ss));
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)ss) == 0)
        return 0;
    if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss) == 0)
        return 0;
    return UV_EINVAL;
}

static int listen_socket(const struct sockaddr_storage *ss, int *ret_fd, int *ret_port)
{
    socklen_t len = ss->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                              : sizeof(struct sockaddr_in);
    struct sockaddr_storage bound;
    socklen_t blen = sizeof(bound);
    int one = 1, rc;

    int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(fd, (const struct sockaddr *)ss, len) < 0 || listen(fd, LISTEN_BACKLOG) < 0 ||
        getsockname(fd, (struct sockaddr *)&bound, &blen) < 0) {
        rc = -errno;
        close(fd);
        return rc;
    }
    *ret_fd = fd;
    *ret_port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                  : ((struct sockaddr_in *)&bound)->sin_port);
    return 0;
}

int http_server_start(uv_loop_t *loop, const struct http_config *cfg, struct http_server **ret,
                      int *ret_port)
{
    struct sockaddr_storage ss;
    int fd = -1, port = 0, rc;

    if (cfg->handler == NULL || cfg->port < 0 || cfg->port > 65535)
        return UV_EINVAL;
    rc = parse_addr(cfg->host != NULL ? cfg->host : "127.0.0.1", cfg->port, &ss);
    if (rc < 0)
        return rc;
    rc = listen_socket(&ss, &fd, &port);
    if (rc < 0)
        return rc;

    struct http_server *s = xcalloc(1, sizeof(*s));
    s->rbuf = read_buf;
    s->loop = loop;
    s->cfg = *cfg;
    s->cfg.host = NULL;
    if (s->cfg.max_body == 0)
        s->cfg.max_body = 1024 * 1024;
    if (s->cfg.header_timeout_ms == 0)
        s->cfg.header_timeout_ms = 10000;
    if (s->cfg.idle_timeout_ms == 0)
        s->cfg.idle_timeout_ms = 60000;
    if (s->cfg.write_timeout_ms == 0)
        s->cfg.write_timeout_ms = 30000;
    if (s->cfg.max_conns == 0)
        s->cfg.max_conns = 1024;
    s->fd = fd;
    list_init(&s->conns);

    rc = uv_poll_init_socket(loop, &s->poll, fd);
    if (rc < 0) {
        close(fd);
        free(s);
        return rc;
    }
    uv_timer_init(loop, &s->backoff);
    s->poll.data = s->backoff.data = s;
    s->nhandles = 2;
    poll_start(s);
    *ret = s;
    if (ret_port != NULL)
        *ret_port = port;
    return 0;
}

void http_server_stop(struct http_server *s, void (*done_cb)(void *arg), void *arg)
{
    if (s->stopping)
        return;
    s->stopping = true;
    s->done_cb = done_cb;
    s->done_arg = arg;
    poll_stop(s);
    uv_close((uv_handle_t *)&s->poll, on_listener_closed);
    uv_close((uv_handle_t *)&s->backoff, on_listener_closed);
    /* srv__conn_close() unlinks the conn, and an abort callback may close others: always
     * take the list head again. */
    while (!list_empty(&s->conns))
        srv__conn_close(container_of(s->conns.next, struct http_conn, link));
}
