/*
 * ports: which ports a process tree listens on (TCP LISTEN, or bound unconnected UDP), on a
 * non-loopback address. Blaxel's waitForPorts polls this.
 *
 * The tree is the run's cgroup (every process in it), or, without cgroups, the leader's
 * descendants by ppid plus the members of its process group. Their socket inodes (from
 * /proc/<pid>/fd) are matched against /proc/<pid>/net/{tcp,tcp6,udp,udp6} of the tree's
 * network namespace. Blocking reads of procfs; cheap enough for a 200 ms poll.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "proc/proc_internal.h"

struct ids {
    uint64_t *v;
    size_t n, cap;
};

static void ids_add(struct ids *s, uint64_t x)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 64;
        s->v = xrealloc(s->v, s->cap * sizeof(*s->v));
    }
    s->v[s->n++] = x;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static bool ids_has(const struct ids *s, uint64_t x)
{
    return s->n > 0 && bsearch(&x, s->v, s->n, sizeof(*s->v), cmp_u64) != NULL;
}

/* Every live pid with its ppid and pgrp, from /proc/<pid>/stat. */
struct pinfo {
    pid_t pid, ppid, pgrp;
};

static size_t scan_procs(struct pinfo **ret)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    struct pinfo *v = NULL;
    size_t n = 0, cap = 0;
    char path[300], buf[512];
    if (d == NULL)
        return 0;
    while ((e = readdir(d)) != NULL) {
        if (!isdigit((unsigned char)e->d_name[0]))
            continue;
        if ((size_t)snprintf(path, sizeof(path), "/proc/%s/stat", e->d_name) >= sizeof(path))
            continue;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t len = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (len <= 0)
            continue;
        buf[len] = '\0';
        char *rp = strrchr(buf, ')'); /* comm may contain spaces and parens */
        char state;
        int ppid, pgrp;
        if (rp == NULL || sscanf(rp + 1, " %c %d %d", &state, &ppid, &pgrp) != 3 ||
            state == 'Z')
            continue;
        if (n == cap)
            v = xrealloc(v, (cap = cap ? cap * 2 : 256) * sizeof(*v));
        v[n++] = (struct pinfo){(pid_t)atol(e->d_name), (pid_t)ppid, (pid_t)pgrp};
    }
    closedir(d);
    *ret = v;
    return n;
}

/* The leader's descendants and its process group (no cgroup). */
static int tree_by_proc(const struct proc *p, pid_t **ret)
{
    struct pinfo *all = NULL;
    size_t n = scan_procs(&all);
    bool *in = xcalloc(n + 1, sizeof(*in));
    bool grew = true;
    for (size_t i = 0; i < n; i++)
        in[i] = (all[i].pid == p->pid && proc_is_running(p)) || all[i].pgrp == p->pid;
    while (grew) {
        grew = false;
        for (size_t i = 0; i < n; i++) {
            if (in[i])
                continue;
            for (size_t j = 0; j < n; j++) {
                if (in[j] && all[j].pid == all[i].ppid) {
                    in[i] = grew = true;
                    break;
                }
            }
        }
    }
    pid_t *pids = xmalloc((n + 1) * sizeof(*pids));
    int m = 0;
    for (size_t i = 0; i < n; i++)
        if (in[i])
            pids[m++] = all[i].pid;
    free(in);
    free(all);
    *ret = pids;
    return m;
}

static void socket_inodes(pid_t pid, struct ids *out)
{
    char path[64], link[64];
    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    struct dirent *e;
    if (d == NULL)
        return;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        ssize_t n = readlinkat(dirfd(d), e->d_name, link, sizeof(link) - 1);
        if (n <= 8)
            continue;
        link[n] = '\0';
        if (strncmp(link, "socket:[", 8) == 0)
            ids_add(out, strtoull(link + 8, NULL, 10));
    }
    closedir(d);
}

static uint32_t hex32(const char *s)
{
    char b[9];
    memcpy(b, s, 8);
    b[8] = '\0';
    return (uint32_t)strtoul(b, NULL, 16);
}

/* The kernel prints each 32-bit word of the address in host order: copying the words back
 * gives the address bytes in network order. */
static bool is_loopback(const char *hex, size_t len)
{
    uint8_t a[16];
    for (size_t i = 0; i < len / 8 && i < 4; i++) {
        uint32_t w = hex32(hex + i * 8);
        memcpy(a + i * 4, &w, 4);
    }
    if (len == 8)
        return a[0] == 127;
    static const uint8_t zero[10];
    if (memcmp(a, zero, 10) != 0)
        return false;
    if (a[10] == 0 && a[11] == 0 && a[12] == 0 && a[13] == 0 && a[14] == 0 && a[15] == 1)
        return true;                                 /* ::1 */
    return a[10] == 0xff && a[11] == 0xff && a[12] == 127; /* ::ffff:127.x */
}

static void scan_net(const char *path, bool tcp, const struct ids *inodes, struct ids *ports)
{
    FILE *f = fopen(path, "re");
    char *line = NULL;
    size_t cap = 0;
    if (f == NULL)
        return;
    if (getline(&line, &cap, f) <= 0) { /* header */
        free(line);
        fclose(f);
        return;
    }
    while (getline(&line, &cap, f) > 0) {
        char local[64];
        unsigned st;
        unsigned long long inode;
        /* sl local rem st tx:rx tr:when retrnsmt uid timeout inode */
        if (sscanf(line, " %*s %63s %*s %x %*s %*s %*s %*u %*u %llu", local, &st, &inode) != 3)
            continue;
        if (tcp ? st != 0x0A : st != 0x07)
            continue;
        char *colon = strchr(local, ':');
        if (colon == NULL || !ids_has(inodes, inode))
            continue;
        size_t alen = (size_t)(colon - local);
        if ((alen != 8 && alen != 32) || is_loopback(local, alen))
            continue;
        unsigned long port = strtoul(colon + 1, NULL, 16);
        if (port > 0 && port <= 65535)
            ids_add(ports, port);
    }
    free(line);
    fclose(f);
}

int proc_tree_ports(struct proc *p, uint16_t *ports, int max)
{
    pid_t *pids = NULL;
    int n = 0;
    if (p->priv->cg != NULL)
        n = proc__cg_pids(p->priv->cg, &pids);
    else if (!p->priv->run_cg || proc_is_running(p))
        n = tree_by_proc(p, &pids); /* (a run whose cgroup is gone has no tree left) */
    if (n <= 0) {
        free(pids);
        return n == -ENOENT ? 0 : n;
    }

    struct ids inodes = {0}, found = {0};
    for (int i = 0; i < n; i++)
        socket_inodes(pids[i], &inodes);
    if (inodes.n > 0) {
        static const char *const files[4] = {"tcp", "tcp6", "udp", "udp6"};
        char path[64];
        qsort(inodes.v, inodes.n, sizeof(*inodes.v), cmp_u64);
        for (int i = 0; i < 4; i++) {
            /* The tree's network namespace, which need not be ours. */
            snprintf(path, sizeof(path), "/proc/%d/net/%s", (int)pids[0], files[i]);
            if (access(path, R_OK) < 0)
                snprintf(path, sizeof(path), "/proc/net/%s", files[i]);
            scan_net(path, i < 2, &inodes, &found);
        }
    }
    int count = 0;
    if (found.n > 0) {
        qsort(found.v, found.n, sizeof(*found.v), cmp_u64);
        for (size_t i = 0; i < found.n && count < max; i++)
            if (i == 0 || found.v[i] != found.v[i - 1])
                ports[count++] = (uint16_t)found.v[i];
    }
    free(inodes.v);
    free(found.v);
    free(pids);
    return count;
}
