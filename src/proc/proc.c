/*
 * proc: the table of records, reaping, and the state machine of every record. All state
 * transitions happen in this file, through set_state(); spawn.c, cgroup.c and ports.c only
 * do what they are told.
 *
 * State machine (see proc.h for the picture). Rows are states, columns events:
 *
 *   state     | leader reaped    | pipes EOF         | state_timer         | stop/kill/timeout
 *   ----------+------------------+-------------------+---------------------+-------------------
 *   RUNNING   | -> DRAINING(1)   | (noted)           | -                   | stop: TERM tree,
 *             |                  |                   |                     | arm kill_timer
 *             |                  |                   |                     | -> STOPPING;
 *             |                  |                   |                     | kill/timeout: KILL
 *   STOPPING  | -> DRAINING(1)   | (noted)           | -                   | kill: KILL tree
 *   DRAINING  | -                | phase 1: end it   | phase 1: end it     | kill: KILL tree,
 *             |                  | phase 2: finish   | phase 2: finish     | -> phase 2
 *   BACKOFF   | -                | -                 | respawn -> RUNNING  | -> DONE at once
 *             |                  |                   | (or DONE on error)  |
 *   DONE      | -                | -                 | -                   | -ESRCH
 *
 * Ending phase 1 (both pipes at EOF, or drain_grace_ms after the leader's exit): when the
 * tree is to die (kill_tree_on_exit, or the daemon already stopped/killed it) what is left
 * of it gets SIGKILL and phase 2 waits at most PROC_KILL_DRAIN_MS for the pipes; otherwise
 * the pipes are read dry and closed. "finish" then restarts (BACKOFF) or ends (DONE).
 * kill_timer (stop's escalation) runs independently of the state and may outlive DONE, so a
 * TERM-ignoring grandchild still gets its KILL on time.
 *
 * Reaping: SIGCHLD is blocked and read from a signalfd polled by the loop; its callback
 * waitpid(-1)s everything. A child that exits between clone() and its insertion into the pid
 * map cannot be lost: the map is filled synchronously right after clone(), and waitpid only
 * ever runs from the loop. Why not uv_signal_t: libuv's handler costs four system calls per
 * signal (its lock pipe, its signal pipe, sigreturn) and the loop a fifth to read it; a
 * signalfd is one read.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "proc/proc_internal.h"

#define DEFAULT_DRAIN_GRACE_MS 2000
#define DEFAULT_STOP_GRACE_MS 5000
#define DEFAULT_MAX_PROCS 1024
#define DEFAULT_MAX_RECORDS 10000
#define SHUTDOWN_EXTRA_MS 3000   /* after the KILL stage, give up waiting */

struct proc_rec {
    struct proc pub;
    struct proc_priv priv;
};

struct stdin_req {
    uv_write_t req;
    struct proc_pipe *pp;
    size_t len;
    char data[];
};

/* Lent to libuv by on_alloc and consumed synchronously by on_read (single-threaded). */
static char read_buf[64 * 1024];

static void finish_run(struct proc *p, bool kill_leftovers);
static void end_drain_phase1(struct proc *p);
static void to_done(struct proc *p);
static void flush_output(struct proc *p);
static void kill_tree(struct proc *p, int sig);

/* ------------------------------------------------------------------------------------------
 * Handles and memory
 */

static void free_table(struct proc_table *t)
{
    free(t->out_dir);
    free(t->log_prefix);
    free((char *)t->cfg.state_dir);
    free(t);
}

void proc__table_handle_closed(struct proc_table *t)
{
    t->handles--;
    if (t->freeing && t->handles == 0)
        free_table(t);
}

static void free_record(struct proc *p)
{
    struct proc_rec *r = container_of(p, struct proc_rec, pub);
    proc__spec_free(&p->priv->spec);
    free(p->name);
    free(p->command);
    strv_free(p->args);
    free(p->cwd_display);
    free(r);
}

static void handle_closed(struct proc *p)
{
    struct proc_table *t = p->table;
    if (--p->priv->handles == 0 && p->priv->freeing)
        free_record(p);
    proc__table_handle_closed(t);
}

static void on_timer_close(uv_handle_t *h)
{
    handle_closed(h->data);
}

static void on_pipe_close(uv_handle_t *h)
{
    struct proc_pipe *pp = container_of((uv_pipe_t *)h, struct proc_pipe, h);
    struct proc *p = pp->p;
    free(pp);
    handle_closed(p);
}

static void close_timer(struct proc *p, uv_timer_t *tm)
{
    uv_timer_stop(tm);
    uv_close((uv_handle_t *)tm, on_timer_close);
}

/* ------------------------------------------------------------------------------------------
 * Pid map (leaders not yet reaped)
 */

static struct list *pid_bucket(struct proc_table *t, pid_t pid)
{
    return &t->pid_map[(unsigned)pid % PROC_PID_BUCKETS];
}

static void pidmap_add(struct proc *p)
{
    list_insert_tail(pid_bucket(p->table, p->pid), &p->priv->pid_link);
}

static void pidmap_del(struct proc *p)
{
    list_remove(&p->priv->pid_link);
}

static struct proc *pidmap_find(struct proc_table *t, pid_t pid)
{
    struct list *head = pid_bucket(t, pid), *pos;
    list_foreach(pos, head)
    {
        struct proc_priv *pv = container_of(pos, struct proc_priv, pid_link);
        if (pv->self->pid == pid)
            return pv->self;
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------
 * Watchers
 */

void proc_watch_add(struct proc *p, struct proc_watch *w, proc_event_cb *cb, void *arg)
{
    w->cb = cb;
    w->arg = arg;
    list_insert_tail(&p->watchers, &w->link);
}

void proc_watch_del(struct proc_watch *w)
{
    if (w->link.next != NULL)
        list_remove(&w->link);
}

/* Calls every watcher. A cursor node (cb == NULL) sits after the watcher being called, so
 * the callback may delete itself or any other watcher; nested notifies skip foreign
 * cursors. The ref keeps the record alive across the callbacks. */
static void notify(struct proc *p, enum proc_event ev)
{
    struct proc_watch cursor = {.cb = NULL};
    struct list *n = p->watchers.next;
    proc_ref(p);
    while (n != &p->watchers) {
        struct proc_watch *w = container_of(n, struct proc_watch, link);
        if (w->cb == NULL) {
            n = n->next;
            continue;
        }
        cursor.link.prev = n;
        cursor.link.next = n->next;
        n->next->prev = &cursor.link;
        n->next = &cursor.link;
        w->cb(p, ev, w->arg);
        n = cursor.link.next;
        list_remove(&cursor.link);
    }
    proc_unref(p);
}

/* ------------------------------------------------------------------------------------------
 * Output budget and eviction
 */

static void account_one(struct proc *p)
{
    struct proc_table *t = p->table;
    uint64_t now = obuf_retained(p->out);
    t->total_retained = t->total_retained - p->priv->retained + now;
    p->priv->retained = now;
}

/* Global budget: trim the largest logs until the total fits again. */
static void enforce_budget(struct proc_table *t)
{
    uint64_t max = t->cfg.max_total_output_bytes;
    for (int i = 0; max > 0 && t->total_retained > max && i < 64; i++) {
        struct proc *big = NULL;
        struct list *pos;
        list_foreach(pos, &t->procs)
        {
            struct proc *q = container_of(pos, struct proc, link);
            if (big == NULL || q->priv->retained > big->priv->retained)
                big = q;
        }
        if (big == NULL || big->priv->retained == 0)
            return;
        uint64_t excess = t->total_retained - max;
        uint64_t before = big->priv->retained;
        obuf_trim(big->out, before > excess ? before - excess : 0);
        account_one(big);
        if (big->priv->retained >= before)
            return; /* nothing droppable (less than a segment) */
    }
}

static void account(struct proc *p)
{
    account_one(p);
    enforce_budget(p->table);
}

static void evict(struct proc *p)
{
    struct proc_table *t = p->table;
    struct proc_priv *pv = p->priv;
    list_remove(&p->link);
    t->n_total--;
    if (p->state == PROC_DONE)
        t->n_done--;
    while (!list_empty(&p->watchers))
        list_remove(p->watchers.next);
    list_remove(&pv->dirty_link);
    pidmap_del(p);
    if (pv->kill_timer_open) {
        if (uv_is_active((uv_handle_t *)&pv->kill_timer))
            kill_tree(p, SIGKILL); /* the stop's escalation is due anyway */
        pv->kill_timer_open = false;
        close_timer(p, &pv->kill_timer);
    }
    if (pv->timers_open) {
        pv->timers_open = false;
        close_timer(p, &pv->timeout_timer);
        close_timer(p, &pv->state_timer);
    }
    proc__cg_forget_owner(t, p);
    t->total_retained -= pv->retained;
    pv->retained = 0;
    obuf_free(p->out);
    p->out = NULL;
    pv->freeing = true;
    if (pv->handles == 0)
        free_record(p);
}

/* Drops the oldest unreferenced ended records beyond max_records. */
static void evict_excess(struct proc_table *t)
{
    struct list *pos, *tmp;
    if (t->shutting_down || t->n_done <= t->cfg.max_records)
        return;
    list_foreach_safe(pos, tmp, &t->procs)
    {
        struct proc *p = container_of(pos, struct proc, link);
        if (t->n_done <= t->cfg.max_records)
            break;
        if (p->state == PROC_DONE && p->refs == 0)
            evict(p);
    }
}

void proc_ref(struct proc *p)
{
    p->refs++;
}

void proc_unref(struct proc *p)
{
    if (--p->refs == 0 && p->state == PROC_DONE)
        evict_excess(p->table);
}

/* ------------------------------------------------------------------------------------------
 * Output pipes
 */

/* Direct writes of the output logs (obuf.h) run on libuv's threadpool: a blocking O_DIRECT
 * pwrite of a 1 MiB chunk per job, completed back on the loop. */
struct dio_req {
    uv_fs_t fs;
    struct obuf_job *job;
};

static void on_dio_done(uv_fs_t *fs)
{
    struct dio_req *d = container_of(fs, struct dio_req, fs);
    ssize_t res = fs->result;
    uv_fs_req_cleanup(fs);
    obuf_job_done(d->job, res);
    free(d);
}

static void dio_submit(void *ctx, struct obuf_job *job, int fd, const void *buf, size_t len,
                       uint64_t off)
{
    struct dio_req *d = xmalloc(sizeof(*d));
    uv_buf_t b = uv_buf_init((char *)buf, (unsigned int)len);
    d->job = job;
    int rc = uv_fs_write(ctx, &d->fs, fd, &b, 1, (int64_t)off, on_dio_done);
    if (rc < 0) {
        free(d);
        obuf_job_done(job, rc);
    }
}

static struct obuf_io dio_io = {.submit = dio_submit};

/* Runs while some log is in direct mode: quiet ones let their chunk buffers go. */
static void on_sweep(uv_timer_t *h)
{
    struct proc_table *t = h->data;
    struct list *pos;
    bool any = false;
    list_foreach(pos, &t->procs)
    {
        struct proc *p = container_of(pos, struct proc, link);
        if (p->state != PROC_DONE && p->out != NULL) {
            obuf_sweep(p->out);
            any |= obuf_is_direct(p->out);
        }
    }
    if (!any)
        uv_timer_stop(h);
}

/* End of a loop iteration that read output: flush every record that got some (one write to
 * its log, one PROC_EV_OUTPUT); the next iteration opens new read budgets (turn_spent). */
static void on_check(uv_check_t *h)
{
    struct proc_table *t = h->data;
    while (!list_empty(&t->dirty)) {
        struct proc_priv *pv = container_of(t->dirty.next, struct proc_priv, dirty_link);
        flush_output(pv->self);
    }
    t->turn++;
    uv_check_stop(h);
}

static void mark_dirty(struct proc *p)
{
    struct proc_table *t = p->table;
    if (p->priv->dirty)
        return;
    p->priv->dirty = true;
    list_insert_tail(&t->dirty, &p->priv->dirty_link);
    if (!uv_is_active((uv_handle_t *)&t->flush_check))
        uv_check_start(&t->flush_check, on_check);
}

/* One flush and one PROC_EV_OUTPUT per batch of reads (per loop iteration), or sooner: see
 * on_read. */
static void flush_output(struct proc *p)
{
    struct proc_priv *pv = p->priv;
    if (!pv->dirty)
        return;
    pv->dirty = false;
    pv->flushed_once = true;
    pv->unflushed = 0;
    list_remove(&pv->dirty_link);
    /* Watchers first: a reader that keeps up copies the batch from the write-behind buffer
     * instead of reading it back from the file once it is written. */
    account(p);
    notify(p, PROC_EV_OUTPUT);
    obuf_flush(p->out);
    if (obuf_is_direct(p->out) && !uv_is_active((uv_handle_t *)&p->table->sweep))
        uv_timer_start(&p->table->sweep, on_sweep, PROC_SWEEP_MS, PROC_SWEEP_MS);
}

static bool captures_closed(const struct proc *p)
{
    return p->priv->pipes[1] == NULL && p->priv->pipes[2] == NULL;
}

/* A force-closed pipe is first read dry without blocking (bounded), so nothing already
 * written by the tree is lost. */
static void drain_sync(struct proc *p, struct proc_pipe *pp)
{
    uv_os_fd_t fd;
    size_t total = 0;
    if (uv_fileno((uv_handle_t *)&pp->h, &fd) < 0)
        return;
    while (total < PROC_DRAIN_READ_MAX) {
        ssize_t n = read(fd, read_buf, sizeof(read_buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        obuf_write(p->out, pp->stream, read_buf, (size_t)n, now_ms());
        total += (size_t)n;
    }
}

static void close_capture(struct proc *p, int idx, bool read_rest)
{
    struct proc_pipe *pp = p->priv->pipes[idx];
    if (pp == NULL)
        return;
    if (read_rest)
        drain_sync(p, pp);
    obuf_eof(p->out, pp->stream, now_ms());
    p->priv->pipes[idx] = NULL;
    pp->closing = true;
    uv_read_stop((uv_stream_t *)&pp->h);
    uv_close((uv_handle_t *)&pp->h, on_pipe_close);
    mark_dirty(p);
}

static void on_leader_exit(struct proc *p, int status);

static void on_pipes_eof(struct proc *p)
{
    if (p->state != PROC_DRAINING) {
        /* The leader still runs, or has exited and SIGCHLD is on its way: a process closes
         * its pipes in exit() a few microseconds before it becomes a zombie, so this wakeup
         * usually finds it reapable. Reaping it here saves the answer a second wakeup (the
         * signal's); on_sigchld then finds nothing. Otherwise EOF is only noted. */
        int st;
        if (list_linked(&p->priv->pid_link) && waitpid(p->pid, &st, WNOHANG) == p->pid)
            on_leader_exit(p, st);
        return;
    }
    if (p->priv->drain_phase == 1)
        end_drain_phase1(p);
    else
        finish_run(p, true);
}

/* Fairness: a record reads at most PROC_TURN_BUDGET of output per loop iteration; then
 * on_alloc lends no buffer (libuv stops reading that pipe until the next iteration, and the
 * level-triggered poll reports it again at once). libuv alone reads up to 32 buffers (2 MiB)
 * per wakeup, and a fast writer is always ready again: its followers' socket writes, other
 * records' pipes and new requests would only get a turn between such bursts. Measured: a
 * follower of a 1 GB/s writer fell up to 150 MiB behind, out of the cached tail of the log
 * (the daemon's CPU per byte doubled); with the budget it keeps up. */
static bool turn_spent(struct proc *p)
{
    struct proc_priv *pv = p->priv;
    struct proc_table *t = p->table;
    if (pv->turn_seen != t->turn) {
        pv->turn_seen = t->turn;
        pv->turn_bytes = 0;
    }
    return pv->turn_bytes >= PROC_TURN_BUDGET;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct proc_pipe *pp = container_of((uv_pipe_t *)h, struct proc_pipe, h);
    buf->base = read_buf;
    buf->len = turn_spent(pp->p) ? 0 : sizeof(read_buf); /* 0: UV_ENOBUFS, see turn_spent */
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct proc_pipe *pp = container_of((uv_pipe_t *)s, struct proc_pipe, h);
    struct proc *p = pp->p;
    if (nread > 0) {
        /* A read that filled the buffer: a fast writer. Room for its bursts, so it keeps
         * running while the loop formats what it read, with fewer wakeups. Not done at spawn:
         * most commands never need it, and it is two syscalls. Failure (a lower
         * pipe-max-size, the per-user pipe budget) just keeps the 64 KiB default. */
        if (!pp->grown && (size_t)nread == sizeof(read_buf)) {
            uv_os_fd_t fd;
            pp->grown = true;
            if (uv_fileno((uv_handle_t *)s, &fd) == 0)
                (void)fcntl(fd, F_SETPIPE_SZ, PROC_CAPTURE_PIPE_SIZE);
        }
        obuf_write(p->out, pp->stream, buf->base, (size_t)nread, now_ms());
        mark_dirty(p);
        /* libuv reads up to 32 buffers per wakeup: a fast writer would make watchers wait
         * for megabytes. The first output goes out at once (time to first byte), and later
         * batches every PROC_FLUSH_BATCH bytes, so the socket writes overlap the reads. */
        p->priv->unflushed += (size_t)nread;
        if (!p->priv->flushed_once || p->priv->unflushed >= PROC_FLUSH_BATCH)
            flush_output(p);
        p->priv->turn_bytes += (size_t)nread;
        return;
    }
    if (nread == 0 || nread == UV_ENOBUFS)
        return;
    /* EOF, or a read error that ends the stream the same way. */
    close_capture(p, pp->stream, false);
    if (captures_closed(p))
        on_pipes_eof(p);
}

/* Reads the capture pipes, or not, as the holds and the state ask (see proc_hold). Only a
 * RUNNING leader is held: once it exits or is being stopped, the pipes are read dry (a
 * restarted run is RUNNING again, and held again while a hold is taken). */
static void apply_holds(struct proc *p)
{
    bool pause = p->priv->holds > 0 && p->state == PROC_RUNNING;
    for (int i = 1; i <= 2; i++) {
        struct proc_pipe *pp = p->priv->pipes[i];
        if (pp == NULL || pp->closing || pp->paused == pause)
            continue;
        pp->paused = pause;
        if (pause)
            uv_read_stop((uv_stream_t *)&pp->h);
        else if (uv_read_start((uv_stream_t *)&pp->h, on_alloc, on_read) < 0)
            close_capture(p, i, true);
    }
}

void proc_hold(struct proc *p)
{
    p->priv->holds++;
    apply_holds(p);
}

void proc_unhold(struct proc *p)
{
    if (p->priv->holds > 0)
        p->priv->holds--;
    apply_holds(p);
}

static struct proc_pipe *open_pipe(struct proc *p, int stream, int fd)
{
    struct proc_pipe *pp = xcalloc(1, sizeof(*pp));
    pp->p = p;
    pp->stream = stream;
    uv_pipe_init(p->table->loop, &pp->h, 0);
    p->priv->handles++;
    p->table->handles++;
    int rc = uv_pipe_open(&pp->h, fd);
    if (rc < 0)
        close(fd);
    else if (stream != 0)
        rc = uv_read_start((uv_stream_t *)&pp->h, on_alloc, on_read);
    if (rc < 0) {
        char msg[128];
        uv_close((uv_handle_t *)&pp->h, on_pipe_close);
        snprintf(msg, sizeof(msg), "[sandboxd: cannot capture %s: %s]",
                 stream == 0 ? "stdin" : stream == OBUF_STDOUT ? "stdout" : "stderr",
                 uv_strerror(rc));
        proc_mark(p, stream == 0 ? OBUF_STDERR : stream, msg);
        return NULL;
    }
    return pp;
}

/* ------------------------------------------------------------------------------------------
 * stdin
 */

static void close_stdin(struct proc *p)
{
    struct proc_priv *pv = p->priv;
    struct proc_pipe *pp = pv->pipes[0];
    bool had = p->stdin_open || pp != NULL;
    p->stdin_open = false;
    pv->stdin_close_pending = false;
    pv->stdin_queued = 0;
    if (pp != NULL) {
        pv->pipes[0] = NULL;
        pp->closing = true;
        uv_close((uv_handle_t *)&pp->h, on_pipe_close);
    }
    if (had)
        notify(p, PROC_EV_STDIN);
}

static void on_stdin_write(uv_write_t *req, int status)
{
    struct stdin_req *r = container_of(req, struct stdin_req, req);
    struct proc_pipe *pp = r->pp;
    size_t len = r->len;
    free(r);
    if (pp->closing)
        return; /* cancelled by close_stdin(); the queue was reset there */
    struct proc *p = pp->p;
    p->priv->stdin_queued -= len;
    if (status < 0)
        close_stdin(p);
    else if (p->priv->stdin_queued == 0 && p->priv->stdin_close_pending)
        close_stdin(p);
    else if (p->priv->stdin_queued == 0)
        notify(p, PROC_EV_STDIN);
}

int proc_stdin_write(struct proc *p, const char *data, size_t n)
{
    struct proc_priv *pv = p->priv;
    struct proc_pipe *pp = pv->pipes[0];
    if (!p->stdin_open || pp == NULL || pv->stdin_close_pending)
        return -EPIPE;
    if (n == 0)
        return 0;
    if (n > PROC_STDIN_MAX || pv->stdin_queued + n > PROC_STDIN_MAX)
        return -ENOBUFS;
    if (pv->stdin_queued == 0) {
        uv_buf_t b = uv_buf_init((char *)data, (unsigned)n);
        int r = uv_try_write((uv_stream_t *)&pp->h, &b, 1);
        if (r == (int)n)
            return 0;
        if (r > 0) {
            data += r;
            n -= (size_t)r;
        } else if (r != UV_EAGAIN) {
            close_stdin(p);
            return -EPIPE;
        }
    }
    struct stdin_req *req = xmalloc(sizeof(*req) + n);
    req->pp = pp;
    req->len = n;
    memcpy(req->data, data, n);
    uv_buf_t b = uv_buf_init(req->data, (unsigned)n);
    if (uv_write(&req->req, (uv_stream_t *)&pp->h, &b, 1, on_stdin_write) < 0) {
        free(req);
        close_stdin(p);
        return -EPIPE;
    }
    pv->stdin_queued += n;
    return 0;
}

int proc_stdin_close(struct proc *p)
{
    struct proc_priv *pv = p->priv;
    if (!p->stdin_pipe)
        return -EINVAL;
    if (pv->pipes[0] == NULL || pv->stdin_close_pending)
        return 0;
    if (pv->stdin_queued == 0) {
        close_stdin(p);
    } else {
        pv->stdin_close_pending = true;
        p->stdin_open = false;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Killing
 */

/* Signals the whole tree: its cgroup when it has one, else its process group. The group id
 * is only certain to be ours while the leader is unreaped; after that (no cgroup) a reused
 * id would need the whole pid space to wrap within the drain grace. */
static void kill_tree(struct proc *p, int sig)
{
    struct proc_priv *pv = p->priv;
    if (pv->cg != NULL) {
        if (proc__cg_kill(p->table, pv->cg, sig) < 0)
            kill(-p->pid, sig);
    } else if (!pv->run_cg || proc_is_running(p)) {
        /* (A run whose cgroup is already gone has nothing left to kill.) */
        kill(-p->pid, sig);
    }
    if (sig == SIGKILL && proc_is_running(p))
        pv->sent_kill = true;
}

/* ------------------------------------------------------------------------------------------
 * State machine
 */

static void set_state(struct proc *p, enum proc_state s)
{
    p->state = s;
    apply_holds(p);
}

static void on_drain_timer(uv_timer_t *h)
{
    struct proc *p = h->data;
    if (p->priv->drain_phase == 1)
        end_drain_phase1(p);
    else
        finish_run(p, true);
}

static void on_timeout(uv_timer_t *h)
{
    struct proc *p = h->data;
    if (!proc_is_running(p))
        return;
    p->priv->no_restart = true;
    if (p->cause == PROC_CAUSE_NONE)
        p->cause = PROC_CAUSE_TIMEOUT;
    uv_timer_stop(&p->priv->kill_timer);
    kill_tree(p, SIGKILL);
}

static void on_kill_timer(uv_timer_t *h)
{
    struct proc *p = h->data;
    struct proc_priv *pv = p->priv;
    kill_tree(p, SIGKILL);
    if (p->state == PROC_DRAINING && pv->drain_phase == 1) {
        pv->drain_phase = 2;
        uv_timer_start(&pv->state_timer, on_drain_timer, PROC_KILL_DRAIN_MS, 0);
    } else if (p->state == PROC_DONE && pv->kill_timer_open) {
        pv->kill_timer_open = false;
        close_timer(p, &pv->kill_timer);
    }
}

/* The run is live again with child c (first run or a restart). */
/* The run is still going PROC_MEMJOIN_DELAY_MS after its start: join its memory cgroup. */
static void on_memjoin_timer(uv_timer_t *h)
{
    struct proc *p = h->data;
    struct proc_priv *pv = p->priv;
    bool pending = pv->memjoin;
    pv->memjoin = false;
    if (pending && proc_is_running(p) && pv->cg != NULL)
        proc__memjoin_start(p->table, pv->cg, p->pid);
}

/* The leader is gone (or the record goes): a pending join has nothing left to move. */
static void memjoin_cancel(struct proc *p)
{
    struct proc_priv *pv = p->priv;
    if (!pv->memjoin)
        return;
    pv->memjoin = false;
    uv_timer_stop(&pv->state_timer); /* only the join uses it while the leader runs */
}

static void run_started(struct proc *p, const struct proc_child *c)
{
    struct proc_priv *pv = p->priv;
    if (pv->cg != NULL && pv->cg->owner == p)
        pv->cg->owner = NULL; /* the last run's dir lingers on its own */
    pv->cg = c->cg;
    pv->run_cg = c->cg != NULL;
    if (c->cg != NULL)
        c->cg->owner = p;
    p->pid = c->pid;
    if (p->first_pid == 0)
        p->first_pid = c->pid;
    pidmap_add(p);
    p->started_ms = now_ms();
    p->ended_ms = 0;
    p->outcome = PROC_OUT_NONE;
    p->exit_code = 0;
    p->term_signal = 0;
    p->core_dumped = false;
    pv->sent_kill = false;
    pv->flushed_once = false;
    pv->drain_phase = 0;
    pv->stdin_queued = 0;
    pv->stdin_close_pending = false;
    set_state(p, PROC_RUNNING);
    if (c->fd_stdin >= 0) {
        pv->pipes[0] = open_pipe(p, 0, c->fd_stdin);
        p->stdin_open = pv->pipes[0] != NULL;
    }
    if (c->fd_stdout >= 0)
        pv->pipes[1] = open_pipe(p, OBUF_STDOUT, c->fd_stdout);
    if (c->fd_stderr >= 0)
        pv->pipes[2] = open_pipe(p, OBUF_STDERR, c->fd_stderr);
    apply_holds(p);
    if (c->memjoin) {
        pv->memjoin = true;
        uv_timer_start(&pv->state_timer, on_memjoin_timer, PROC_MEMJOIN_DELAY_MS, 0);
    }
    if (p->timeout_ms > 0) {
        /* The loop's cached time may be well behind (a long iteration): count from now. */
        uv_update_time(p->table->loop);
        uv_timer_start(&pv->timeout_timer, on_timeout, p->timeout_ms, 0);
    }
}

static void on_leader_exit(struct proc *p, int status)
{
    struct proc_priv *pv = p->priv;
    memjoin_cancel(p);
    pidmap_del(p);
    p->ended_ms = now_ms();
    if (WIFEXITED(status)) {
        p->outcome = PROC_OUT_EXITED;
        p->exit_code = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        /* A SIGKILL the daemon did not send, with an OOM kill counted in the run's memory
         * cgroup, is the OOM killer's. */
        if (sig == SIGKILL && !pv->sent_kill && proc__cg_oom(p->table, pv->cg)) {
            p->outcome = PROC_OUT_OOM;
        } else {
            p->outcome = PROC_OUT_SIGNALED;
            p->core_dumped = WCOREDUMP(status);
        }
        p->term_signal = sig;
    } else {
        p->outcome = PROC_OUT_UNKNOWN;
    }
    uv_timer_stop(&pv->timeout_timer);
    set_state(p, PROC_DRAINING);
    pv->drain_phase = 1;
    close_stdin(p);
    if (p->state != PROC_DRAINING || pv->drain_phase != 1)
        return; /* a watcher acted (kill) */
    if (captures_closed(p)) {
        end_drain_phase1(p);
    } else if (pv->sent_kill) {
        pv->drain_phase = 2; /* the whole tree is dying already */
        uv_timer_start(&pv->state_timer, on_drain_timer, PROC_KILL_DRAIN_MS, 0);
    } else {
        uv_timer_start(&pv->state_timer, on_drain_timer, p->table->cfg.drain_grace_ms, 0);
    }
}

static void end_drain_phase1(struct proc *p)
{
    struct proc_priv *pv = p->priv;
    bool kill_rest = pv->spec.kill_tree_on_exit || p->cause != PROC_CAUSE_NONE;
    /* A stop's grace belongs to the whole tree: its kill_timer delivers the KILL (and moves
     * to phase 2), even after DONE. */
    bool stop_pending = uv_is_active((uv_handle_t *)&pv->kill_timer);
    if (captures_closed(p)) {
        finish_run(p, kill_rest && !stop_pending);
    } else if (stop_pending) {
        return;
    } else if (kill_rest) {
        kill_tree(p, SIGKILL);
        pv->drain_phase = 2;
        uv_timer_start(&pv->state_timer, on_drain_timer, PROC_KILL_DRAIN_MS, 0);
    } else {
        finish_run(p, false);
    }
}

static bool run_failed(const struct proc *p)
{
    return p->outcome != PROC_OUT_EXITED || p->exit_code != 0;
}

static bool should_restart(const struct proc *p)
{
    return p->restart_on_failure && !p->priv->no_restart && !p->table->shutting_down &&
           p->cause == PROC_CAUSE_NONE && run_failed(p) &&
           (p->max_restarts < 0 || p->restart_count < p->max_restarts);
}

static void on_backoff_timer(uv_timer_t *h)
{
    struct proc *p = h->data;
    struct proc_child c;
    char err[256], msg[320];
    if (proc__spawn(p->table, &p->priv->spec, &c, err, sizeof(err)) < 0) {
        snprintf(msg, sizeof(msg), "[Failed to restart process: %s]", err);
        proc_mark(p, OBUF_STDOUT, msg);
        to_done(p);
        return;
    }
    run_started(p, &c);
    notify(p, PROC_EV_RESTART);
}

static void to_backoff(struct proc *p)
{
    struct proc_priv *pv = p->priv;
    char max[16], msg[160];
    if (p->max_restarts < 0)
        snprintf(max, sizeof(max), "unlimited");
    else
        snprintf(max, sizeof(max), "%d", p->max_restarts);
    /* Go's ExitCode(): -1 when a signal ended the run. */
    snprintf(msg, sizeof(msg), "[Process failed with exit code %d. Attempting restart %d/%s...]",
             p->outcome == PROC_OUT_EXITED ? p->exit_code : -1, p->restart_count + 1, max);
    proc_mark(p, OBUF_STDOUT, msg);
    p->restart_count++;
    uint32_t delay = pv->backoff_ms;
    if (p->ended_ms - p->started_ms >= PROC_HEALTHY_RUN_MS)
        delay = pv->spec.backoff_initial_ms; /* it ran well for a while: start over */
    pv->backoff_ms = delay >= pv->spec.backoff_max_ms / 2 ? pv->spec.backoff_max_ms : delay * 2;
    set_state(p, PROC_BACKOFF);
    uv_timer_start(&pv->state_timer, on_backoff_timer, delay, 0);
}

static void to_done(struct proc *p)
{
    struct proc_table *t = p->table;
    struct proc_priv *pv = p->priv;
    set_state(p, PROC_DONE);
    p->stdin_open = false;
    flush_output(p);
    obuf_seal(p->out);
    account(p);
    if (pv->timers_open) {
        pv->timers_open = false;
        close_timer(p, &pv->timeout_timer);
        close_timer(p, &pv->state_timer);
    }
    if (pv->kill_timer_open && !uv_is_active((uv_handle_t *)&pv->kill_timer)) {
        pv->kill_timer_open = false;
        close_timer(p, &pv->kill_timer);
    }
    proc__spec_free(&pv->spec); /* no run will follow; ended records stay small */
    t->n_live--;
    t->n_done++;
    if (t->n_live == 0)
        uv_unref((uv_handle_t *)&t->sigchld);
    notify(p, PROC_EV_EXIT);
    evict_excess(t);
    proc__check_shutdown(t);
}

/* The run is over (leader reaped, pipes done): restart or end. */
static void finish_run(struct proc *p, bool kill_leftovers)
{
    struct proc_priv *pv = p->priv;
    uv_timer_stop(&pv->state_timer);
    close_capture(p, 1, true);
    close_capture(p, 2, true);
    flush_output(p);
    if (pv->cg != NULL)
        proc__cg_release(p->table, pv->cg, kill_leftovers); /* pv->cg stays while it lingers */
    else if (kill_leftovers)
        kill(-p->pid, SIGKILL);
    if (should_restart(p))
        to_backoff(p);
    else
        to_done(p);
}

static void stop_run(struct proc *p, uint32_t grace_ms, enum proc_cause cause)
{
    struct proc_priv *pv = p->priv;
    pv->no_restart = true;
    if (p->state == PROC_RUNNING) {
        p->cause = cause;
        set_state(p, PROC_STOPPING);
    }
    kill_tree(p, SIGTERM);
    kill_tree(p, SIGCONT); /* a stopped process could not act on the TERM */
    if (!uv_is_active((uv_handle_t *)&pv->kill_timer)) {
        uv_update_time(p->table->loop);
        uv_timer_start(&pv->kill_timer, on_kill_timer, grace_ms, 0);
    }
}

/* ------------------------------------------------------------------------------------------
 * Public actions
 */

int proc_signal(struct proc *p, int sig)
{
    if (sig < 1 || sig > 64)
        return -EINVAL;
    if (!proc_is_running(p))
        return -ESRCH;
    return kill(p->pid, sig) < 0 ? -errno : 0;
}

int proc_kill(struct proc *p)
{
    struct proc_priv *pv = p->priv;
    switch (p->state) {
    case PROC_DONE:
        return -ESRCH;
    case PROC_BACKOFF:
        pv->no_restart = true;
        p->cause = PROC_CAUSE_KILLED;
        uv_timer_stop(&pv->state_timer);
        to_done(p);
        return 0;
    case PROC_RUNNING:
    case PROC_STOPPING:
        pv->no_restart = true;
        if (p->cause == PROC_CAUSE_NONE || p->cause == PROC_CAUSE_STOPPED)
            p->cause = PROC_CAUSE_KILLED;
        uv_timer_stop(&pv->kill_timer);
        kill_tree(p, SIGKILL);
        return 0;
    case PROC_DRAINING:
        pv->no_restart = true;
        uv_timer_stop(&pv->kill_timer);
        kill_tree(p, SIGKILL);
        if (pv->drain_phase == 1) {
            pv->drain_phase = 2;
            uv_timer_start(&pv->state_timer, on_drain_timer, PROC_KILL_DRAIN_MS, 0);
        }
        return 0;
    }
    return -ESRCH;
}

int proc_stop(struct proc *p, uint32_t grace_ms)
{
    if (grace_ms == 0)
        grace_ms = p->table->cfg.stop_grace_ms;
    switch (p->state) {
    case PROC_DONE:
        return -ESRCH;
    case PROC_BACKOFF:
        p->priv->no_restart = true;
        p->cause = PROC_CAUSE_STOPPED;
        uv_timer_stop(&p->priv->state_timer);
        to_done(p);
        return 0;
    case PROC_STOPPING:
        return 0;
    case PROC_RUNNING:
    case PROC_DRAINING:
        stop_run(p, grace_ms, PROC_CAUSE_STOPPED);
        return 0;
    }
    return -ESRCH;
}

void proc_mark(struct proc *p, int stream, const char *text)
{
    obuf_append(p->out, stream, OBUF_F_MARK | OBUF_F_NL, text, strlen(text), now_ms());
    mark_dirty(p);
    flush_output(p);
}

bool proc_is_running(const struct proc *p)
{
    return p->state == PROC_RUNNING || p->state == PROC_STOPPING;
}

bool proc_is_live(const struct proc *p)
{
    return p->state != PROC_DONE;
}

/* ------------------------------------------------------------------------------------------
 * Reaping
 */

static void pending_reaped(struct proc_table *t, pid_t pid, int status);

static void on_sigchld(uv_poll_t *h, int status, int events)
{
    struct proc_table *t = h->data;
    struct signalfd_siginfo si[8];
    /* Read first: a child that exits after this read raises SIGCHLD again. */
    while (read(t->sigfd, si, sizeof(si)) < 0 && errno == EINTR)
        ;
    for (;;) {
        int st;
        pid_t pid = waitpid(-1, &st, WNOHANG);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid <= 0)
            break;
        struct proc *p = pidmap_find(t, pid);
        if (p != NULL)
            on_leader_exit(p, st);
        else
            pending_reaped(t, pid, st); /* or an orphan of some tree, now reaped */
    }
}

/* ------------------------------------------------------------------------------------------
 * Table
 */

/* A record for spec, not yet in the table (free_record() undoes it). NULL: *rc and err say
 * why. */
static struct proc *rec_new(struct proc_table *t, const struct proc_spec *spec, char *err,
                            size_t errlen, int *rc)
{
    if (t->shutting_down || t->freeing) {
        snprintf(err, errlen, "the daemon is shutting down");
        *rc = -ECANCELED;
        return NULL;
    }
    if (t->n_live + t->n_pending >= t->cfg.max_procs) {
        snprintf(err, errlen, "too many processes (%u running)", t->n_live + t->n_pending);
        *rc = -EAGAIN;
        return NULL;
    }

    struct proc_rec *r = xcalloc(1, sizeof(*r));
    struct proc *p = &r->pub;
    struct proc_priv *pv = &r->priv;
    p->priv = pv;
    pv->self = p;
    p->table = t;
    if ((*rc = proc__spec_copy(spec, &pv->spec, err, errlen)) < 0) {
        free(r);
        return NULL;
    }
    list_init(&p->watchers);
    list_init(&pv->pid_link);
    list_init(&pv->dirty_link);
    p->name = spec->name != NULL ? xstrdup(spec->name) : NULL;
    p->command = xstrdup(spec->command != NULL ? spec->command : pv->spec.file);
    p->args = strv_dup(spec->args);
    p->cwd_display = xstrdup(spec->cwd_display != NULL ? spec->cwd_display : "");
    p->dialect = spec->dialect;
    p->keep_alive = spec->keep_alive;
    p->restart_on_failure = spec->restart_on_failure;
    p->max_restarts = spec->max_restarts;
    p->timeout_ms = spec->timeout_ms;
    p->stdin_pipe = spec->stdin_mode == PROC_STDIN_PIPE;
    pv->backoff_ms = pv->spec.backoff_initial_ms;
    return p;
}

/* The first run of p has started: the record joins the table. */
static void rec_publish(struct proc_table *t, struct proc *p, const struct proc_child *c)
{
    struct proc_priv *pv = p->priv;
    char path[PATH_MAX];

    p->handle = ++t->next_handle;
    p->created_ms = now_ms();
    if (t->log_prefix_len + 20 + sizeof(".log") <= sizeof(path)) { /* no printf per start */
        size_t n = t->log_prefix_len;
        memcpy(path, t->log_prefix, n);
        n += u64_dec(path + n, p->handle);
        memcpy(path + n, ".log", sizeof(".log"));
    } else {
        snprintf(path, sizeof(path), "%s%llu.log", t->log_prefix, (unsigned long long)p->handle);
    }
    p->out = obuf_new(path, t->cfg.max_output_bytes);

    uv_timer_init(t->loop, &pv->timeout_timer);
    uv_timer_init(t->loop, &pv->state_timer);
    uv_timer_init(t->loop, &pv->kill_timer);
    pv->timeout_timer.data = pv->state_timer.data = pv->kill_timer.data = p;
    pv->timers_open = pv->kill_timer_open = true;
    pv->handles += 3;
    t->handles += 3;

    list_insert_tail(&t->procs, &p->link);
    t->n_total++;
    if (t->n_live++ == 0)
        uv_ref((uv_handle_t *)&t->sigchld);
    run_started(p, c);
}

int proc_start(struct proc_table *t, const struct proc_spec *spec, struct proc **ret,
               char *err, size_t errlen)
{
    char errbuf[256];
    struct proc_child c;
    int rc;
    if (err == NULL || errlen == 0) {
        err = errbuf;
        errlen = sizeof(errbuf);
    }
    err[0] = '\0';
    struct proc *p = rec_new(t, spec, err, errlen, &rc);
    if (p == NULL)
        return rc;
    if ((rc = proc__spawn(t, &p->priv->spec, &c, err, errlen)) < 0) {
        free_record(p);
        return rc;
    }
    rec_publish(t, p, &c);
    *ret = p;
    return 0;
}

/* ---- asynchronous starts ----
 * A spawn whose child has not exec'd yet has no record in the table: it is invisible (no
 * handle, not listed, not found by pid or name) until exec succeeded, and a failed exec
 * leaves nothing, exactly as with the synchronous start. Its exit, should the loop reap it
 * before it sees the exec-status EOF, is kept here and delivered after the record exists.
 */
bool proc__async_always;

struct proc_pending {
    struct list link;             /* t->pending */
    struct proc_table *t;
    struct proc *p;               /* the record, published on success */
    struct proc_spawn_job *job;
    pid_t pid;
    bool reaped;                  /* on_sigchld reaped pid already: status */
    int status;
    proc_started_cb *cb;          /* NULL: cancelled */
    void *arg;
};

/* The child has exec'd or exited. Frees pd. */
static void pending_end(struct proc_pending *pd)
{
    struct proc_table *t = pd->t;
    struct proc *p = pd->p;
    struct proc_child c;
    char err[256];

    list_remove(&pd->link);
    t->n_pending--;
    /* Removed before the close: a later spawn's child, until its own exec, holds a copy of
     * this fd, and epoll forgets a registration only when no copy is left. */
    epoll_ctl(t->spawn_ep, EPOLL_CTL_DEL, proc__spawn_job_fd(pd->job), NULL);
    int rc = proc__spawn_job_end(t, &p->priv->spec, pd->job, pd->reaped, &c, err, sizeof(err));
    if (rc == 0 && (t->shutting_down || t->freeing)) {
        /* Shutdown has stopped every run already; this one is too late to begin. */
        int fds[3] = {c.fd_stdin, c.fd_stdout, c.fd_stderr};
        for (int i = 0; i < 3; i++)
            if (fds[i] >= 0)
                close(fds[i]);
        if (!pd->reaped) /* else its pid may be another's already */
            kill(-c.pid, SIGKILL);
        if (c.cg != NULL)
            proc__cg_release(t, c.cg, true);
        snprintf(err, sizeof(err), "the daemon is shutting down");
        rc = -ECANCELED;
    }
    if (rc < 0) {
        free_record(p);
        if (pd->cb != NULL)
            pd->cb(pd->arg, NULL, rc, err);
        free(pd);
        proc__check_shutdown(t);
        return;
    }
    rec_publish(t, p, &c);
    if (pd->cb != NULL)
        pd->cb(pd->arg, p, 0, NULL);
    if (pd->reaped && p->state == PROC_RUNNING && p->pid == pd->pid)
        on_leader_exit(p, pd->status);
    free(pd);
}

/* Some exec-status pipes are at EOF (the only event they have: the child never writes). */
static void on_spawn_ready(uv_poll_t *h, int status, int events)
{
    struct proc_table *t = h->data;
    struct epoll_event ev[16];
    int n;
    (void)status, (void)events;
    do {
        while ((n = epoll_wait(t->spawn_ep, ev, 16, 0)) < 0 && errno == EINTR)
            ;
        for (int i = 0; i < n; i++)
            pending_end(ev[i].data.ptr);
    } while (n == 16);
}

/* on_sigchld: a pid with no record may be a pending spawn's (else it was an orphan of some
 * tree, which we reap as their subreaper). */
static void pending_reaped(struct proc_table *t, pid_t pid, int status)
{
    struct list *pos;
    list_foreach(pos, &t->pending)
    {
        struct proc_pending *pd = container_of(pos, struct proc_pending, link);
        if (pd->pid == pid && !pd->reaped) {
            pd->reaped = true;
            pd->status = status;
            return;
        }
    }
}

int proc_start_async(struct proc_table *t, const struct proc_spec *spec, proc_started_cb *cb,
                     void *arg, struct proc_pending **pending, char *err, size_t errlen)
{
    struct proc_spawn_job *job;
    struct proc_child c;
    int rc;

    err[0] = '\0';
    if (pending != NULL)
        *pending = NULL;
    struct proc *p = rec_new(t, spec, err, errlen, &rc);
    if (p == NULL)
        return rc;
    /* Asynchronous only while other work may be waiting for the loop: with nothing else
     * live, the vfork wait costs no one anything, and the pipe and poll would cost the start
     * ~20 µs of CPU and latency (measured on sequential runs). */
    bool busy = t->n_live > 0 || t->n_pending > 0 || proc__async_always;
    if (!busy || t->spawn_ep < 0 || !proc__spawn_async_ok(t) || t->n_pending >= PROC_ASYNC_MAX) {
        if ((rc = proc__spawn(t, &p->priv->spec, &c, err, errlen)) < 0) {
            free_record(p);
            return rc;
        }
        rec_publish(t, p, &c);
        cb(arg, p, 0, NULL);
        return 0;
    }
    if ((rc = proc__spawn_async(t, &p->priv->spec, &job, err, errlen)) < 0) {
        free_record(p);
        return rc;
    }
    struct proc_pending *pd = xcalloc(1, sizeof(*pd));
    pd->t = t;
    pd->p = p;
    pd->job = job;
    pd->pid = proc__spawn_job_pid(job);
    pd->cb = cb;
    pd->arg = arg;
    list_insert_tail(&t->pending, &pd->link);
    t->n_pending++;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = pd};
    if (epoll_ctl(t->spawn_ep, EPOLL_CTL_ADD, proc__spawn_job_fd(job), &ev) < 0) {
        /* Cannot watch it: wait here instead (the child is about to exec or exit). */
        struct pollfd pf = {.fd = proc__spawn_job_fd(job), .events = POLLIN};
        while (poll(&pf, 1, -1) < 0 && errno == EINTR)
            ;
        pending_end(pd);
        return 0;
    }
    if (pending != NULL)
        *pending = pd;
    return 0;
}

void proc_start_cancel(struct proc_pending *pd)
{
    if (pd != NULL)
        pd->cb = NULL;
}

bool proc_name_starting(struct proc_table *t, const char *name)
{
    struct list *pos;
    list_foreach(pos, &t->pending)
    {
        struct proc_pending *pd = container_of(pos, struct proc_pending, link);
        if (pd->p->name != NULL && strcmp(pd->p->name, name) == 0)
            return true;
    }
    return false;
}

struct proc *proc_by_handle(struct proc_table *t, uint64_t handle)
{
    for (struct list *pos = t->procs.prev; pos != &t->procs; pos = pos->prev) {
        struct proc *p = container_of(pos, struct proc, link);
        if (p->handle == handle)
            return p;
        if (p->handle < handle)
            break;
    }
    return NULL;
}

struct proc *proc_by_pid(struct proc_table *t, pid_t pid)
{
    struct proc *ended = NULL;
    if (pid <= 0)
        return NULL;
    for (struct list *pos = t->procs.prev; pos != &t->procs; pos = pos->prev) {
        struct proc *p = container_of(pos, struct proc, link);
        if (p->pid != pid && p->first_pid != pid)
            continue;
        if (proc_is_live(p))
            return p;
        if (ended == NULL)
            ended = p;
    }
    return ended;
}

struct proc *proc_by_name(struct proc_table *t, const char *name)
{
    for (struct list *pos = t->procs.prev; pos != &t->procs; pos = pos->prev) {
        struct proc *p = container_of(pos, struct proc, link);
        if (p->name != NULL && strcmp(p->name, name) == 0)
            return p;
    }
    return NULL;
}

struct proc *proc_first(struct proc_table *t)
{
    return list_empty(&t->procs) ? NULL : container_of(t->procs.next, struct proc, link);
}

struct proc *proc_next(struct proc *p)
{
    struct list *n = p->link.next;
    return n == &p->table->procs ? NULL : container_of(n, struct proc, link);
}

unsigned proc_count_running(struct proc_table *t)
{
    return t->n_live;
}

unsigned proc_count_total(struct proc_table *t)
{
    return t->n_total;
}

/* Removes logs left by earlier daemons (ours can't exist yet); keeps those of live ones. */
static void clean_out_dir(struct proc_table *t)
{
    DIR *d = opendir(t->out_dir);
    struct dirent *e;
    if (d == NULL)
        return;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' && (e->d_name[1] == '\0' || strcmp(e->d_name, "..") == 0))
            continue;
        long pid = atol(e->d_name);
        if (pid > 0 && pid != t->self_pid && strchr(e->d_name, '-') != NULL &&
            (kill((pid_t)pid, 0) == 0 || errno == EPERM))
            continue;
        unlinkat(dirfd(d), e->d_name, 0);
    }
    closedir(d);
}

static int make_dir(const char *path)
{
    struct stat st;
    if (mkdir(path, 0700) == 0)
        return 0;
    if (errno != EEXIST)
        return -errno;
    if (stat(path, &st) < 0)
        return -errno;
    return S_ISDIR(st.st_mode) ? 0 : -ENOTDIR;
}

int proc_table_new(uv_loop_t *loop, const struct proc_config *cfg, struct proc_table **ret)
{
    struct proc_table *t = xcalloc(1, sizeof(*t));
    int rc;

    t->loop = loop;
    t->cfg = *cfg;
    t->cfg.state_dir = xstrdup(cfg->state_dir != NULL ? cfg->state_dir : ".");
    if (t->cfg.drain_grace_ms == 0)
        t->cfg.drain_grace_ms = DEFAULT_DRAIN_GRACE_MS;
    if (t->cfg.stop_grace_ms == 0)
        t->cfg.stop_grace_ms = DEFAULT_STOP_GRACE_MS;
    if (t->cfg.max_procs == 0)
        t->cfg.max_procs = DEFAULT_MAX_PROCS;
    if (t->cfg.max_records == 0)
        t->cfg.max_records = DEFAULT_MAX_RECORDS;
    t->self_pid = getpid();
    t->devnull = -1;
    t->sigfd = -1;
    t->spawn_ep = -1;
    list_init(&t->procs);
    list_init(&t->pending);
    list_init(&t->dirty);
    for (int i = 0; i < PROC_PID_BUCKETS; i++)
        list_init(&t->pid_map[i]);

    t->out_dir = xasprintf("%s/out", t->cfg.state_dir);
    t->log_prefix = xasprintf("%s/%d-", t->out_dir, (int)t->self_pid);
    t->log_prefix_len = strlen(t->log_prefix);
    if ((rc = make_dir(t->cfg.state_dir)) < 0 || (rc = make_dir(t->out_dir)) < 0)
        goto fail;
    clean_out_dir(t);
    if ((t->devnull = open("/dev/null", O_RDWR | O_CLOEXEC)) < 0 ||
        (t->devnull = proc__fd_above_stdio(t->devnull)) < 0) {
        rc = t->devnull < 0 ? -errno : t->devnull;
        t->devnull = -1;
        goto fail;
    }
    if ((t->stack = proc__stack_new(PROC_STACK_SIZE)) == NULL) {
        rc = -errno;
        goto fail;
    }

    /* Orphans of our trees must come to us, not to init, so they are reaped and killable. */
    if (getpid() != 1)
        prctl(PR_SET_CHILD_SUBREAPER, 1);
    /* A child closing its stdin must not kill the daemon with SIGPIPE. */
    struct sigaction sa;
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
        signal(SIGPIPE, SIG_IGN);

    /* SIGCHLD stays pending for the signalfd: blocked here, before any thread exists (the
     * threadpool's inherit the mask), and at its default action (an inherited SIG_IGN would
     * make the kernel reap our children itself). The child clears its mask before exec. */
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    signal(SIGCHLD, SIG_DFL);
    pthread_sigmask(SIG_BLOCK, &chld, NULL);
    t->sigfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
    if (t->sigfd < 0) {
        rc = -errno;
        goto fail;
    }
    t->sigfd = proc__fd_above_stdio(t->sigfd);
    if (t->sigfd < 0 || (rc = uv_poll_init(loop, &t->sigchld, t->sigfd)) < 0) {
        rc = t->sigfd < 0 ? t->sigfd : rc;
        if (t->sigfd >= 0)
            close(t->sigfd);
        t->sigfd = -1;
        goto fail;
    }
    t->sigchld.data = t;
    t->handles++;
    uv_poll_start(&t->sigchld, UV_READABLE, on_sigchld);
    uv_unref((uv_handle_t *)&t->sigchld);
    /* Asynchronous starts: their exec-status pipes sit in an epoll set of their own, which
     * the loop polls as one fd (a uv_poll per spawn costs 6 more syscalls). Without it, every
     * start is synchronous. */
    t->spawn_ep = epoll_create1(EPOLL_CLOEXEC);
    if (t->spawn_ep >= 0 && (t->spawn_ep = proc__fd_above_stdio(t->spawn_ep)) >= 0 &&
        uv_poll_init(loop, &t->spawn_poll, t->spawn_ep) == 0) {
        t->spawn_poll.data = t;
        t->handles++;
        uv_poll_start(&t->spawn_poll, UV_READABLE, on_spawn_ready);
        uv_unref((uv_handle_t *)&t->spawn_poll);
    } else if (t->spawn_ep >= 0) {
        close(t->spawn_ep);
        t->spawn_ep = -1;
    }
    uv_check_init(loop, &t->flush_check);
    t->flush_check.data = t;
    t->handles++;
    uv_timer_init(loop, &t->sweep);
    t->sweep.data = t;
    t->handles++;
    uv_unref((uv_handle_t *)&t->sweep);
    dio_io.ctx = loop;
    obuf_set_io(&dio_io);
    obuf_set_mem(OBUF_MEM_STORE, OBUF_MEM_TOTAL);
    uv_timer_init(loop, &t->timer);
    t->timer.data = t;
    uv_unref((uv_handle_t *)&t->timer);
    t->handles++;
    proc__cg_init(t);
    *ret = t;
    return 0;

fail:
    if (t->devnull >= 0)
        close(t->devnull);
    proc__stack_free(t->stack, PROC_STACK_SIZE);
    free_table(t);
    return rc;
}

/* ------------------------------------------------------------------------------------------
 * Shutdown and free
 */

static void on_done_timer(uv_timer_t *h)
{
    struct proc_table *t = h->data;
    void (*cb)(void *) = t->done_cb;
    uv_unref((uv_handle_t *)&t->timer);
    t->done_cb = NULL;
    if (cb != NULL)
        cb(t->done_arg);
}

void proc__check_shutdown(struct proc_table *t)
{
    if (!t->shutting_down || t->done_called || t->freeing)
        return;
    if (!t->shutdown_expired && (t->n_live > 0 || t->n_pending > 0 || t->cg.nlinger > 0))
        return;
    if (t->n_live > 0 || t->cg.nlinger > 0)
        log_warnx("proc: shutdown: %u processes and %u cgroups still busy; giving up",
                  t->n_live, t->cg.nlinger);
    t->done_called = true;
    proc__cg_fini(t);
    uv_ref((uv_handle_t *)&t->timer);
    uv_timer_start(&t->timer, on_done_timer, 0, 0);
}

static void on_shutdown_timer(uv_timer_t *h)
{
    struct proc_table *t = h->data;
    struct list *pos;
    if (!t->shutdown_killed) {
        t->shutdown_killed = true;
        list_foreach(pos, &t->procs)
        {
            struct proc *p = container_of(pos, struct proc, link);
            if (p->state == PROC_RUNNING || p->state == PROC_STOPPING ||
                p->state == PROC_DRAINING)
                kill_tree(p, SIGKILL);
        }
        proc__cg_signal_lingering(t, SIGKILL);
        uv_timer_start(&t->timer, on_shutdown_timer, SHUTDOWN_EXTRA_MS, 0);
    } else {
        t->shutdown_expired = true;
    }
    proc__check_shutdown(t);
}

void proc_table_shutdown(struct proc_table *t, void (*done_cb)(void *arg), void *arg)
{
    struct list *pos, *tmp;
    if (t->shutting_down)
        return;
    t->shutting_down = true;
    t->done_cb = done_cb;
    t->done_arg = arg;
    /* No eviction happens while shutting down, so the list is stable here. */
    list_foreach_safe(pos, tmp, &t->procs)
    {
        struct proc *p = container_of(pos, struct proc, link);
        switch (p->state) {
        case PROC_RUNNING:
            stop_run(p, t->cfg.stop_grace_ms, PROC_CAUSE_SHUTDOWN);
            break;
        case PROC_STOPPING:
        case PROC_DRAINING:
            p->priv->no_restart = true;
            break;
        case PROC_BACKOFF:
            p->priv->no_restart = true;
            p->cause = PROC_CAUSE_SHUTDOWN;
            uv_timer_stop(&p->priv->state_timer);
            to_done(p);
            break;
        case PROC_DONE:
            break;
        }
    }
    proc__cg_signal_lingering(t, SIGTERM);
    uv_ref((uv_handle_t *)&t->timer);
    uv_timer_start(&t->timer, on_shutdown_timer, t->cfg.stop_grace_ms, 0);
    proc__check_shutdown(t);
}

static void on_table_handle_close(uv_handle_t *h)
{
    proc__table_handle_closed(h->data);
}

void proc_table_free(struct proc_table *t)
{
    if (t == NULL)
        return;
    t->freeing = true;
    while (!list_empty(&t->procs)) {
        struct proc *p = container_of(t->procs.next, struct proc, link);
        struct proc_priv *pv = p->priv;
        if (proc_is_live(p)) {
            /* Not shut down first: end it hard, without waiting. */
            kill_tree(p, SIGKILL);
            pidmap_del(p);
            close_stdin(p);
            close_capture(p, 1, false);
            close_capture(p, 2, false);
            if (pv->cg != NULL)
                proc__cg_release(t, pv->cg, true);
            obuf_seal(p->out);
            set_state(p, PROC_DONE);
            t->n_live--;
            t->n_done++;
        }
        evict(p);
    }
    while (!list_empty(&t->pending)) {
        /* Not shut down first (or it gave up): end the child hard and wait for it. */
        struct proc_pending *pd = container_of(t->pending.next, struct proc_pending, link);
        int st;
        pd->cb = NULL;
        if (!pd->reaped)
            kill(pd->pid, SIGKILL);
        while (!pd->reaped && waitpid(pd->pid, &st, 0) < 0 && errno == EINTR)
            ;
        pd->reaped = true;
        pending_end(pd); /* frees the record: t->freeing */
    }
    proc__spawn_pools_free(t);
    if (t->spawn_ep >= 0) {
        uv_close((uv_handle_t *)&t->spawn_poll, on_table_handle_close);
        close(t->spawn_ep); /* libuv is done with it: uv_close stopped the poll */
        t->spawn_ep = -1;
    }
    proc__cg_close(t);
    uv_close((uv_handle_t *)&t->sigchld, on_table_handle_close);
    close(t->sigfd); /* libuv is done with it: uv_close stopped the poll */
    t->sigfd = -1;
    uv_close((uv_handle_t *)&t->flush_check, on_table_handle_close);
    uv_close((uv_handle_t *)&t->sweep, on_table_handle_close);
    obuf_set_io(NULL);
    obuf_set_mem(0, 0);
    uv_close((uv_handle_t *)&t->timer, on_table_handle_close);
    if (t->devnull >= 0)
        close(t->devnull);
    t->devnull = -1;
    proc__stack_free(t->stack, PROC_STACK_SIZE);
    t->stack = NULL;
}
