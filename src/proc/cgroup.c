/*
 * cgroup: one cgroup per run, so a tree can be killed whole (cgroup.kill, no escape through
 * setsid or double fork) and an OOM kill can be told from any other SIGKILL.
 *
 * Layouts, detected once at startup from /proc/self/mountinfo and /proc/self/cgroup:
 *   hybrid   controller-less cgroup2 (membership, cgroup.kill, cgroup.events) next to a v1
 *            memory hierarchy (memory.oom_control). Dirs: <mount><own path>/sandboxd-<pid>/cN
 *            in both, so memory limits nest under the daemon's own memory cgroup.
 *   v2       one cgroup2 dir per run; memory.events when the memory controller could be
 *            enabled for our subtree (else kill-only).
 *   v1       v1 memory only: trees are killed by listing cgroup.procs.
 *   none     process groups; OOM is never reported.
 *
 * Creating a memory cgroup costs the kernel ~0.1-0.4 ms and removing one ~0.05 ms, far more
 * than the rest of a spawn, so empty clean dirs are pooled and reused. A dir is reused only
 * if nothing is left in it, no OOM kill was counted there and no limit was set on it.
 * Released dirs that still hold processes linger on a list retried by a timer (never a
 * spin) until empty, then are pooled or removed.
 *
 * Not here: deciding when to kill (proc.c), per-run accounting beyond the OOM counter.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "proc/proc_internal.h"

#define POOL_MAX 40     /* spare dirs kept (with 16, 32 concurrent runs made every third spawn
                         * mkdir and rmdir its pair) */
#define HOT_MAX 128     /* dirs that keep 5 fds open each */
#define POOL_PREFILL 2
#define RETRY_MIN_MS 10
#define RETRY_MAX_MS 1000

int proc__cg_disable;

/* ------------------------------------------------------------------------------------------
 * Small file helpers
 */

static int read_path(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    size_t len = 0;
    while (len + 1 < cap) {
        ssize_t n = read(fd, buf + len, cap - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    return (int)len;
}

static int read_in(const char *dir, const char *file, char *buf, size_t cap)
{
    char path[PATH_MAX];
    if ((size_t)snprintf(path, sizeof(path), "%s/%s", dir, file) >= sizeof(path))
        return -ENAMETOOLONG;
    return read_path(path, buf, cap);
}

static int write_in(const char *dir, const char *file, const char *val)
{
    char path[PATH_MAX];
    if ((size_t)snprintf(path, sizeof(path), "%s/%s", dir, file) >= sizeof(path))
        return -ENAMETOOLONG;
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    size_t len = strlen(val);
    ssize_t n = write(fd, val, len);
    int rc = n == (ssize_t)len ? 0 : n < 0 ? -errno : -EIO;
    close(fd);
    return rc;
}

/* Value of "key N" in a flat keyed file (memory.events, cgroup.events, oom_control). */
static bool keyed_value(const char *text, const char *key, uint64_t *ret)
{
    size_t kl = strlen(key);
    for (const char *l = text; l != NULL && *l != '\0';) {
        if (strncmp(l, key, kl) == 0 && l[kl] == ' ') {
            *ret = strtoull(l + kl + 1, NULL, 10);
            return true;
        }
        l = strchr(l, '\n');
        if (l != NULL)
            l++;
    }
    return false;
}

static bool has_word(const char *list, const char *word, const char *seps)
{
    size_t wl = strlen(word);
    for (const char *p = list; *p != '\0';) {
        size_t n = strcspn(p, seps);
        if (n == wl && strncmp(p, word, wl) == 0)
            return true;
        p += n;
        if (*p != '\0')
            p++;
    }
    return false;
}

/* Removes a cgroup dir and any sub-cgroups a workload created inside it. */
static int rmdir_tree(const char *path, int depth)
{
    if (rmdir(path) == 0 || errno == ENOENT)
        return 0;
    if (errno != EBUSY || depth > 8)
        return -errno;
    DIR *d = opendir(path);
    if (d == NULL)
        return -EBUSY;
    struct dirent *e;
    char sub[PATH_MAX];
    while ((e = readdir(d)) != NULL) {
        if (e->d_type != DT_DIR || e->d_name[0] == '.')
            continue;
        if ((size_t)snprintf(sub, sizeof(sub), "%s/%s", path, e->d_name) < sizeof(sub))
            rmdir_tree(sub, depth + 1);
    }
    closedir(d);
    return rmdir(path) == 0 || errno == ENOENT ? 0 : -errno;
}

/* ------------------------------------------------------------------------------------------
 * Detection
 */

static void unescape_mount(char *s)
{
    char *w = s;
    for (char *r = s; *r != '\0'; r++) {
        if (r[0] == '\\' && r[1] >= '0' && r[1] <= '3' && r[2] >= '0' && r[2] <= '7' &&
            r[3] >= '0' && r[3] <= '7') {
            *w++ = (char)((r[1] - '0') * 64 + (r[2] - '0') * 8 + (r[3] - '0'));
            r += 3;
        } else {
            *w++ = *r;
        }
    }
    *w = '\0';
}

/* First cgroup2 mount and first v1 mount carrying "memory": mount point and root. */
static void find_mounts(char **v2dir, char **v2root, char **memdir, char **memroot)
{
    FILE *f = fopen("/proc/self/mountinfo", "re");
    char *line = NULL;
    size_t cap = 0;
    if (f == NULL)
        return;
    while (getline(&line, &cap, f) > 0) {
        char *sep = strstr(line, " - ");
        if (sep == NULL)
            continue;
        *sep = '\0';
        char *fields[6] = {0};
        char *save = NULL, *tok = strtok_r(line, " ", &save);
        for (int i = 0; tok != NULL && i < 6; i++, tok = strtok_r(NULL, " ", &save))
            fields[i] = tok;
        char *save2 = NULL;
        char *fstype = strtok_r(sep + 3, " ", &save2);
        strtok_r(NULL, " ", &save2); /* source */
        char *super = strtok_r(NULL, " \n", &save2);
        if (fields[4] == NULL || fstype == NULL)
            continue;
        unescape_mount(fields[3]);
        unescape_mount(fields[4]);
        if (strcmp(fstype, "cgroup2") == 0 && *v2dir == NULL) {
            *v2dir = xstrdup(fields[4]);
            *v2root = xstrdup(fields[3]);
        } else if (strcmp(fstype, "cgroup") == 0 && *memdir == NULL && super != NULL &&
                   has_word(super, "memory", ",")) {
            *memdir = xstrdup(fields[4]);
            *memroot = xstrdup(fields[3]);
        }
    }
    free(line);
    fclose(f);
}

/* Our own paths from /proc/self/cgroup ("0::/x" and "N:...memory...:/y"). */
static void own_paths(char **v2path, char **mempath)
{
    FILE *f = fopen("/proc/self/cgroup", "re");
    char *line = NULL;
    size_t cap = 0;
    if (f == NULL)
        return;
    while (getline(&line, &cap, f) > 0) {
        line[strcspn(line, "\n")] = '\0';
        char *c1 = strchr(line, ':');
        char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (c2 == NULL)
            continue;
        *c1 = *c2 = '\0';
        if (strcmp(line, "0") == 0 && c1 + 1 == c2 && *v2path == NULL)
            *v2path = xstrdup(c2 + 1);
        else if (*mempath == NULL && has_word(c1 + 1, "memory", ","))
            *mempath = xstrdup(c2 + 1);
    }
    free(line);
    fclose(f);
}

/* <mount> + (own path relative to the mount's root). NULL if the path is outside it. */
static char *own_dir(const char *mnt, const char *root, const char *path)
{
    size_t rl = strlen(root);
    if (strcmp(root, "/") != 0) {
        if (strncmp(path, root, rl) != 0 || (path[rl] != '\0' && path[rl] != '/'))
            return NULL;
        path += rl;
    }
    while (*path == '/')
        path++;
    return *path ? xasprintf("%s/%s", mnt, path) : xstrdup(mnt);
}

/* Each daemon holds an flock on its sandboxd-<pid> dirs for as long as it lives (released
 * by the kernel when it dies). The pid alone cannot tell a crashed daemon's dir: a daemon in
 * another PID namespace (a container's PID 1, say) sharing this cgroup parent has a pid that
 * kill() here does not see, and removing its idle pooled dirs made every later spawn of it
 * fail (clone3 into a removed cgroup: ENOENT). -1 if dir cannot be opened or locked. */
static int lock_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Removes what crashed daemons left in parent: sandboxd-<pid> dirs whose pid is gone and
 * that no live daemon holds locked (see lock_dir). */
static void clean_stale(const char *parent, pid_t self)
{
    DIR *d = opendir(parent);
    struct dirent *e;
    char path[PATH_MAX];
    if (d == NULL)
        return;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "sandboxd-", 9) != 0 || !str_is_digits(e->d_name + 9))
            continue;
        pid_t pid = (pid_t)atol(e->d_name + 9);
        if (pid == self || kill(pid, 0) == 0 || errno != ESRCH)
            continue;
        if ((size_t)snprintf(path, sizeof(path), "%s/%s", parent, e->d_name) >= sizeof(path))
            continue;
        int fd = lock_dir(path);
        if (fd < 0)
            continue; /* held: its daemon lives, in another PID namespace */
        rmdir_tree(path, 0);
        close(fd);
    }
    closedir(d);
}

/* Our sandboxd-<pid> dir under own, created and locked (*lock_fd). NULL if it cannot be made,
 * or if another live daemon (same pid number, another PID namespace) holds it. */
static char *make_base(const char *own, pid_t self, int *lock_fd)
{
    clean_stale(own, self);
    char *base = xasprintf("%s/sandboxd-%d", own, (int)self);
    if (mkdir(base, 0755) < 0 && errno != EEXIST) {
        free(base);
        return NULL;
    }
    if ((*lock_fd = lock_dir(base)) < 0) {
        log_warn("cgroups: %s is held by another daemon; not using it", base);
        free(base);
        return NULL;
    }
    return base;
}

/* Pure cgroup2: make the memory controller available to our run dirs. The "no internal
 * processes" rule forbids enabling it in a non-root cgroup that holds processes, so when the
 * daemon is alone in its cgroup it first moves itself into a leaf (base/daemon). */
static bool enable_v2_memory(struct proc_cgroups *cg, const char *own)
{
    char buf[512];
    if (read_in(own, "cgroup.controllers", buf, sizeof(buf)) < 0 ||
        !has_word(buf, "memory", " \n"))
        return false;
    if (read_in(own, "cgroup.subtree_control", buf, sizeof(buf)) < 0)
        return false;
    if (!has_word(buf, "memory", " \n")) {
        int rc = write_in(own, "cgroup.subtree_control", "+memory");
        if (rc == -EBUSY) {
            char *leaf = xasprintf("%s/daemon", cg->v2_base);
            if (mkdir(leaf, 0755) == 0 || errno == EEXIST) {
                if (write_in(leaf, "cgroup.procs", "0") == 0) {
                    rc = write_in(own, "cgroup.subtree_control", "+memory");
                    if (rc == 0)
                        cg->moved_self = true;
                    else
                        write_in(own, "cgroup.procs", "0");
                }
                if (!cg->moved_self)
                    rmdir(leaf);
            }
            free(leaf);
        }
        if (rc < 0)
            return false;
    }
    return write_in(cg->v2_base, "cgroup.subtree_control", "+memory") == 0;
}

static struct proc_cg *cg_create(struct proc_table *t);

int proc__cg_init(struct proc_table *t)
{
    struct proc_cgroups *cg = &t->cg;
    char *v2mnt = NULL, *v2root = NULL, *memmnt = NULL, *memroot = NULL;
    char *v2path = NULL, *mempath = NULL;

    list_init(&cg->pool);
    list_init(&cg->linger);
    cg->v2_lock = cg->mem_lock = -1;
    cg->retry_ms = RETRY_MIN_MS;
    uv_timer_init(t->loop, &cg->timer);
    cg->timer.data = t;
    uv_unref((uv_handle_t *)&cg->timer);
    t->handles++;

    if (!t->cfg.use_cgroups) {
        log_info("process trees: process groups (cgroups disabled); OOM kills not detected");
        return 0;
    }
    find_mounts(&v2mnt, &v2root, &memmnt, &memroot);
    own_paths(&v2path, &mempath);

    if (v2mnt != NULL && v2path != NULL && !(proc__cg_disable & 1)) {
        char *own = own_dir(v2mnt, v2root, v2path);
        if (own != NULL && (cg->v2_base = make_base(own, t->self_pid, &cg->v2_lock)) != NULL) {
            cg->own_v2 = own;
            own = NULL;
            char probe[PATH_MAX];
            snprintf(probe, sizeof(probe), "%s/cgroup.kill", cg->v2_base);
            cg->has_kill = access(probe, F_OK) == 0;
            if (!(proc__cg_disable & 2))
                cg->mem_is_v2 = enable_v2_memory(cg, cg->own_v2);
        }
        free(own);
    }
    if (!cg->mem_is_v2 && memmnt != NULL && mempath != NULL && !(proc__cg_disable & 2)) {
        char *own = own_dir(memmnt, memroot, mempath);
        if (own != NULL)
            cg->mem_base = make_base(own, t->self_pid, &cg->mem_lock);
        free(own);
    }

    if (cg->v2_base != NULL)
        cg->mode = cg->mem_base != NULL ? PROC_CG_HYBRID : PROC_CG_V2;
    else if (cg->mem_base != NULL)
        cg->mode = PROC_CG_V1;

    switch (cg->mode) {
    case PROC_CG_HYBRID:
        log_info("process trees: cgroup2 %s (%s) + v1 memory %s (OOM detection on)",
                 cg->v2_base, cg->has_kill ? "cgroup.kill" : "no cgroup.kill", cg->mem_base);
        break;
    case PROC_CG_V2:
        log_info("process trees: cgroup2 %s (%s), OOM detection %s", cg->v2_base,
                 cg->has_kill ? "cgroup.kill" : "no cgroup.kill",
                 cg->mem_is_v2 ? "on (memory.events)" : "off (no memory controller)");
        break;
    case PROC_CG_V1:
        log_info("process trees: v1 memory cgroup %s (OOM detection on), no cgroup2",
                 cg->mem_base);
        break;
    case PROC_CG_NONE:
        log_info("process trees: process groups (no usable cgroups); OOM kills not detected");
        break;
    }

    for (int i = 0; i < POOL_PREFILL && cg->mode != PROC_CG_NONE; i++) {
        struct proc_cg *c = cg_create(t);
        if (c == NULL)
            break;
        list_insert_tail(&cg->pool, &c->link);
        cg->npool++;
    }

    free(v2mnt);
    free(v2root);
    free(memmnt);
    free(memroot);
    free(v2path);
    free(mempath);
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * Run dirs
 */

static void close_fds(struct proc_table *t, struct proc_cg *c)
{
    int *fds[5] = {&c->fd_procs[0], &c->fd_procs[1], &c->fd_events, &c->fd_oom, &c->fd_dir};
    for (int i = 0; i < 5; i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
    if (c->hot)
        t->cg.nhot--;
    c->hot = false;
}

static int open_in(const char *dir, const char *file, int flags)
{
    char path[PATH_MAX];
    if (dir == NULL || (size_t)snprintf(path, sizeof(path), "%s/%s", dir, file) >= sizeof(path))
        return -1;
    return open(path, flags | O_CLOEXEC);
}

/* Keeps the files touched on every run open, while few dirs do so. */
static void open_fds(struct proc_table *t, struct proc_cg *c)
{
    if (t->cg.nhot >= HOT_MAX)
        return;
    c->fd_procs[0] = open_in(c->v2, "cgroup.procs", O_WRONLY);
    c->fd_procs[1] = c->mem != c->v2 ? open_in(c->mem, "cgroup.procs", O_WRONLY) : -1;
    c->fd_events = open_in(c->v2, "cgroup.events", O_RDONLY);
    c->fd_oom = open_in(c->mem, t->cg.mem_is_v2 ? "memory.events" : "memory.oom_control",
                        O_RDONLY);
    c->fd_dir = c->v2 != NULL ? open(c->v2, O_PATH | O_DIRECTORY | O_CLOEXEC) : -1;
    c->hot = true;
    t->cg.nhot++;
    if ((c->v2 != NULL && (c->fd_procs[0] < 0 || c->fd_events < 0 || c->fd_dir < 0)) ||
        (c->mem != NULL && c->mem != c->v2 && c->fd_procs[1] < 0) ||
        (c->mem != NULL && c->fd_oom < 0))
        close_fds(t, c); /* all or nothing: paths are used instead */
}

static void cg_free(struct proc_table *t, struct proc_cg *c)
{
    close_fds(t, c);
    if (c->owner != NULL && c->owner->priv->cg == c)
        c->owner->priv->cg = NULL;
    if (c->mem != c->v2)
        free(c->mem);
    free(c->v2);
    free(c);
}

static struct proc_cg *cg_create(struct proc_table *t)
{
    struct proc_cgroups *g = &t->cg;
    struct proc_cg *c = xcalloc(1, sizeof(*c));
    list_init(&c->link);
    c->fd_procs[0] = c->fd_procs[1] = c->fd_events = c->fd_oom = c->fd_dir = -1;
    uint64_t n = ++g->seq;
    if (g->v2_base != NULL) {
        c->v2 = xasprintf("%s/c%llu", g->v2_base, (unsigned long long)n);
        if (mkdir(c->v2, 0755) < 0 && errno != EEXIST)
            goto fail;
        if (g->mem_is_v2)
            c->mem = c->v2;
    }
    if (g->mem_base != NULL) {
        c->mem = xasprintf("%s/c%llu", g->mem_base, (unsigned long long)n);
        if (mkdir(c->mem, 0755) < 0 && errno != EEXIST)
            goto fail;
        c->mem_clean = c->mem != c->v2;
    }
    open_fds(t, c);
    return c;
fail:
    if (c->v2 != NULL)
        rmdir(c->v2);
    if (c->mem != NULL && c->mem != c->v2)
        rmdir(c->mem);
    cg_free(t, c);
    return NULL;
}

static void set_limit(const struct proc_table *t, struct proc_cg *c, uint64_t limit)
{
    char val[32];
    if (c->mem == NULL)
        return;
    snprintf(val, sizeof(val), "%llu", (unsigned long long)limit);
    c->limited = true;
    if (t->cg.mem_is_v2) {
        write_in(c->mem, "memory.max", val);
        write_in(c->mem, "memory.swap.max", "0");
    } else {
        write_in(c->mem, "memory.limit_in_bytes", val);
        write_in(c->mem, "memory.memsw.limit_in_bytes", val);
    }
}

struct proc_cg *proc__cg_acquire(struct proc_table *t, uint64_t memory_limit)
{
    struct proc_cgroups *g = &t->cg;
    struct proc_cg *c;
    if (g->mode == PROC_CG_NONE)
        return NULL;
    if (memory_limit == 0 && !list_empty(&g->pool)) {
        c = container_of(g->pool.next, struct proc_cg, link);
        list_remove(&c->link);
        g->npool--;
    } else if ((c = cg_create(t)) == NULL) {
        return NULL;
    }
    if (memory_limit > 0)
        set_limit(t, c, memory_limit);
    return c;
}

int proc__cg_procs_fds(const struct proc_cg *c, int ret_fds[2])
{
    const char *dirs[2] = {c->v2, c->mem != c->v2 ? c->mem : NULL};
    ret_fds[0] = ret_fds[1] = -1;
    if (c->hot) {
        ret_fds[0] = c->fd_procs[0];
        ret_fds[1] = c->fd_procs[1];
        return 0;
    }
    for (int i = 0; i < 2; i++) {
        if (dirs[i] == NULL)
            continue;
        if ((ret_fds[i] = open_in(dirs[i], "cgroup.procs", O_WRONLY)) < 0) {
            int rc = -errno;
            if (ret_fds[0] >= 0)
                close(ret_fds[0]);
            ret_fds[0] = -1;
            return rc;
        }
    }
    return 0;
}

void proc__cg_procs_done(const struct proc_cg *c, int fds[2])
{
    for (int i = 0; i < 2; i++) {
        if (!c->hot && fds[i] >= 0)
            close(fds[i]);
        fds[i] = -1;
    }
}

/* Reads a control file through the kept fd (pread at 0 regenerates it) or by path. */
static int read_ctl(int fd, const char *dir, const char *file, char *buf, size_t cap)
{
    if (fd < 0)
        return read_in(dir, file, buf, cap);
    ssize_t n = pread(fd, buf, cap - 1, 0);
    if (n < 0)
        return -errno;
    buf[n] = '\0';
    return (int)n;
}

static bool populated(const struct proc_cg *c)
{
    char buf[256];
    uint64_t v = 0;
    if (c->v2 != NULL)
        return read_ctl(c->fd_events, c->v2, "cgroup.events", buf, sizeof(buf)) > 0 &&
               keyed_value(buf, "populated", &v) && v != 0;
    if (c->mem != NULL)
        return read_in(c->mem, "cgroup.procs", buf, sizeof(buf)) > 0;
    return false;
}

int proc__cg_pids(const struct proc_cg *c, pid_t **ret)
{
    const char *dir = c->v2 != NULL ? c->v2 : c->mem;
    char path[PATH_MAX];
    struct sbuf sb = SBUF_INIT;
    if (dir == NULL)
        return -ENOENT;
    snprintf(path, sizeof(path), "%s/cgroup.procs", dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    for (;;) {
        char *w = sbuf_reserve(&sb, 4096);
        ssize_t n = read(fd, w, 4096);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        sb.len += (size_t)n;
    }
    close(fd);
    *sbuf_reserve(&sb, 1) = '\0';
    size_t cap = 16, n = 0;
    pid_t *pids = xmalloc(cap * sizeof(*pids));
    for (char *p = sb.buf; p != NULL && *p != '\0';) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p)
            break;
        if (v > 0) {
            if (n == cap)
                pids = xrealloc(pids, (cap *= 2) * sizeof(*pids));
            pids[n++] = (pid_t)v;
        }
        p = end;
        while (*p == '\n')
            p++;
    }
    sbuf_free(&sb);
    *ret = pids;
    return (int)n;
}

int proc__cg_kill(const struct proc_table *t, struct proc_cg *c, int sig)
{
    pid_t *pids;
    if (sig == SIGKILL && c->v2 != NULL && t->cg.has_kill &&
        write_in(c->v2, "cgroup.kill", "1") == 0) {
        c->killed = true;
        return 0;
    }
    /* Without cgroup.kill a fork can race the listing; two passes make that unlikely and
     * the process group kill in proc.c covers the usual shapes of tree. */
    for (int pass = 0; pass < (sig == SIGKILL ? 2 : 1); pass++) {
        int n = proc__cg_pids(c, &pids);
        if (n < 0)
            return n;
        for (int i = 0; i < n; i++)
            kill(pids[i], sig);
        free(pids);
        if (n == 0)
            break;
    }
    return 0;
}

bool proc__cg_oom(const struct proc_table *t, const struct proc_cg *c)
{
    char buf[512];
    uint64_t v = 0;
    if (c == NULL || c->mem == NULL)
        return false;
    const char *file = t->cg.mem_is_v2 ? "memory.events" : "memory.oom_control";
    return read_ctl(c->fd_oom, c->mem, file, buf, sizeof(buf)) > 0 &&
           keyed_value(buf, "oom_kill", &v) && v > 0;
}

static void detach(struct proc_cg *c)
{
    if (c->owner != NULL && c->owner->priv->cg == c)
        c->owner->priv->cg = NULL;
    c->owner = NULL;
}

/* Pools or removes a dir known to be empty. False if it turned out busy. */
static bool remove_empty(struct proc_table *t, struct proc_cg *c)
{
    struct proc_cgroups *g = &t->cg;
    if (!c->limited && !c->killed && g->npool < POOL_MAX && !t->shutting_down && !t->freeing &&
        (c->mem_clean || !proc__cg_oom(t, c))) {
        detach(c);
        c->mem_clean = c->mem != NULL && c->mem != c->v2;
        list_insert_tail(&g->pool, &c->link);
        g->npool++;
        return true;
    }
    close_fds(t, c); /* open files do not keep a cgroup busy, but no need for them now */
    if (c->v2 != NULL) {
        if (rmdir_tree(c->v2, 0) < 0)
            return false;
        if (c->mem == c->v2)
            c->mem = NULL;
        free(c->v2);
        c->v2 = NULL;
    }
    if (c->mem != NULL) {
        if (rmdir_tree(c->mem, 0) < 0)
            return false;
        free(c->mem);
        c->mem = NULL;
    }
    detach(c);
    cg_free(t, c);
    return true;
}

/* Pools or removes an empty dir. False while something still lives in it. */
static bool try_remove(struct proc_table *t, struct proc_cg *c)
{
    return !populated(c) && remove_empty(t, c);
}

static void on_retry(uv_timer_t *h);

static void linger_add(struct proc_table *t, struct proc_cg *c)
{
    struct proc_cgroups *g = &t->cg;
    list_insert_tail(&g->linger, &c->link);
    g->nlinger++;
    if (!uv_is_active((uv_handle_t *)&g->timer) || g->retry_ms > RETRY_MIN_MS) {
        g->retry_ms = RETRY_MIN_MS;
        uv_timer_start(&g->timer, on_retry, g->retry_ms, 0);
    }
}

static void on_retry(uv_timer_t *h)
{
    struct proc_table *t = h->data;
    struct proc_cgroups *g = &t->cg;
    struct list keep, *pos, *tmp;
    list_init(&keep);
    list_foreach_safe(pos, tmp, &g->linger)
    {
        struct proc_cg *c = container_of(pos, struct proc_cg, link);
        list_remove(&c->link);
        g->nlinger--;
        if (!try_remove(t, c)) {
            list_insert_tail(&keep, &c->link);
            g->nlinger++;
        }
    }
    while (!list_empty(&keep)) {
        pos = keep.next;
        list_remove(pos);
        list_insert_tail(&g->linger, pos);
    }
    if (g->nlinger > 0) {
        g->retry_ms = MIN(g->retry_ms * 2, RETRY_MAX_MS);
        uv_timer_start(&g->timer, on_retry, g->retry_ms, 0);
    }
    proc__check_shutdown(t);
}

void proc__cg_release(struct proc_table *t, struct proc_cg *c, bool kill_leftovers)
{
    bool busy = populated(c);
    if (busy && kill_leftovers)
        proc__cg_kill(t, c, SIGKILL);
    if (busy || !remove_empty(t, c))
        linger_add(t, c);
}

void proc__cg_signal_lingering(struct proc_table *t, int sig)
{
    struct proc_cgroups *g = &t->cg;
    struct list *pos;
    list_foreach(pos, &g->linger)
    {
        proc__cg_kill(t, container_of(pos, struct proc_cg, link), sig);
    }
    if (sig == SIGKILL && g->nlinger > 0) {
        /* they are about to be empty: look again soon, not after the backed-off delay */
        g->retry_ms = RETRY_MIN_MS;
        uv_timer_start(&g->timer, on_retry, g->retry_ms, 0);
    }
}

void proc__cg_forget_owner(struct proc_table *t, struct proc *p)
{
    struct list *pos;
    list_foreach(pos, &t->cg.linger)
    {
        struct proc_cg *c = container_of(pos, struct proc_cg, link);
        if (c->owner == p)
            c->owner = NULL;
    }
    p->priv->cg = NULL;
}

/* ------------------------------------------------------------------------------------------
 * Teardown
 */

void proc__cg_fini(struct proc_table *t)
{
    struct proc_cgroups *g = &t->cg;
    while (!list_empty(&g->pool)) {
        struct proc_cg *c = container_of(g->pool.next, struct proc_cg, link);
        list_remove(&c->link);
        g->npool--;
        if (c->v2 != NULL)
            rmdir_tree(c->v2, 0);
        if (c->mem != NULL && c->mem != c->v2)
            rmdir_tree(c->mem, 0);
        cg_free(t, c);
    }
    struct list *pos, *tmp;
    list_foreach_safe(pos, tmp, &g->linger)
    {
        struct proc_cg *c = container_of(pos, struct proc_cg, link);
        list_remove(&c->link);
        g->nlinger--;
        if (!try_remove(t, c)) {
            list_insert_tail(&g->linger, &c->link); /* still busy: keep for later */
            g->nlinger++;
            break;
        }
    }
    if (g->nlinger > 0)
        return;
    if (g->moved_self && g->own_v2 != NULL) {
        /* Undo the leaf move so our dirs can go: controllers off, back into our cgroup. */
        char *leaf = xasprintf("%s/daemon", g->v2_base);
        write_in(g->v2_base, "cgroup.subtree_control", "-memory");
        write_in(g->own_v2, "cgroup.subtree_control", "-memory");
        if (write_in(g->own_v2, "cgroup.procs", "0") == 0) {
            rmdir(leaf);
            g->moved_self = false;
        }
        free(leaf);
    }
    if (g->v2_base != NULL && !g->moved_self && rmdir(g->v2_base) == 0) {
        free(g->v2_base);
        g->v2_base = NULL;
    }
    if (g->mem_base != NULL && rmdir(g->mem_base) == 0) {
        free(g->mem_base);
        g->mem_base = NULL;
    }
}

static void on_timer_close(uv_handle_t *h)
{
    proc__table_handle_closed(h->data);
}

void proc__cg_close(struct proc_table *t)
{
    struct proc_cgroups *g = &t->cg;
    proc__cg_fini(t);
    while (!list_empty(&g->linger)) {
        struct proc_cg *c = container_of(g->linger.next, struct proc_cg, link);
        list_remove(&c->link);
        g->nlinger--;
        detach(c);
        cg_free(t, c);
    }
    uv_close((uv_handle_t *)&g->timer, on_timer_close);
    free(g->own_v2);
    free(g->v2_base);
    free(g->mem_base);
    g->own_v2 = g->v2_base = g->mem_base = NULL;
    if (g->v2_lock >= 0)
        close(g->v2_lock);
    if (g->mem_lock >= 0)
        close(g->mem_lock);
    g->v2_lock = g->mem_lock = -1;
    g->mode = PROC_CG_NONE;
}
