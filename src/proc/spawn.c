/*
 * spawn: starts one run of a record, like glibc's posix_spawn: clone(CLONE_VM|CLONE_VFORK)
 * on a private stack, so the daemon's memory is never copied and its size never matters.
 *
 * Everything that can be checked is checked in the parent first (executable lookup on the
 * child's PATH, cwd, user), so the common errors get precise messages. What can only fail in
 * the child (chdir races, setuid, exec) is reported through a struct in the shared memory:
 * CLONE_VFORK suspends the parent until the child has exec'd or exited, so when clone()
 * returns the struct is final. A failed child is reaped right here; no record is created.
 *
 * This file does not know records or states: it turns a proc_run_spec into a pid and fds.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "proc/proc_internal.h"

#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

#define CHILD_OOM_SCORE_ADJ "500"

/* ------------------------------------------------------------------------------------------
 * Spec copy
 */

/* Supplementary groups of the target user, computed in the parent (initgroups() cannot run
 * in the child: it reads /etc/group through NSS, which allocates). */
static int user_groups(const char *user, gid_t gid, gid_t **ret, int *ret_n)
{
    int n = 32;
    gid_t *g = NULL;
    if (user == NULL) {
        g = xmalloc(sizeof(*g));
        g[0] = gid;
        *ret = g;
        *ret_n = 1;
        return 0;
    }
    for (int tries = 0; tries < 8; tries++) {
        g = xrealloc(g, (size_t)n * sizeof(*g));
        int m = n;
        if (getgrouplist(user, gid, g, &m) >= 0) {
            *ret = g;
            *ret_n = m;
            return 0;
        }
        n = m > n ? m : n * 2;
    }
    free(g);
    return -ENOMEM;
}

int proc__spec_copy(const struct proc_spec *in, struct proc_run_spec *out, char *err,
                    size_t errlen)
{
    extern char **environ;
    memset(out, 0, sizeof(*out));
    const char *file = in->file != NULL ? in->file : in->command;
    if (file == NULL || file[0] == '\0' || in->argv == NULL || in->argv[0] == NULL) {
        snprintf(err, errlen, "no command given");
        return -EINVAL;
    }
    if (in->set_user && geteuid() != 0 && (in->uid != geteuid() || in->gid != getegid())) {
        snprintf(err, errlen, "switching to uid %u gid %u needs the daemon to run as root",
                 (unsigned)in->uid, (unsigned)in->gid);
        return -EPERM;
    }
    out->file = xstrdup(file);
    out->argv = strv_dup(in->argv);
    out->env = strv_dup(in->env != NULL ? in->env : environ);
    out->cwd = in->cwd != NULL && in->cwd[0] != '\0' ? xstrdup(in->cwd) : NULL;
    /* Not root and already that user: nothing to switch. */
    out->set_user = in->set_user && geteuid() == 0;
    out->uid = in->uid;
    out->gid = in->gid;
    if (out->set_user) {
        int rc = user_groups(in->user_name, in->gid, &out->groups, &out->ngroups);
        if (rc < 0) {
            snprintf(err, errlen, "cannot read the groups of user %s", in->user_name);
            proc__spec_free(out);
            return rc;
        }
    }
    out->stdin_mode = in->stdin_mode;
    out->capture_stdout = in->capture_stdout;
    out->capture_stderr = in->capture_stderr;
    out->kill_tree_on_exit = in->kill_tree_on_exit;
    out->memory_limit = in->memory_limit;
    out->backoff_initial_ms = in->backoff_initial_ms ? in->backoff_initial_ms : 1000;
    out->backoff_max_ms = in->backoff_max_ms ? in->backoff_max_ms : 30000;
    if (out->backoff_max_ms < out->backoff_initial_ms)
        out->backoff_max_ms = out->backoff_initial_ms;
    return 0;
}

void proc__spec_free(struct proc_run_spec *s)
{
    free(s->file);
    strv_free(s->argv);
    strv_free(s->env);
    free(s->cwd);
    free(s->groups);
    memset(s, 0, sizeof(*s));
}

/* ------------------------------------------------------------------------------------------
 * Checks in the parent
 */

static bool in_groups(gid_t g, const struct proc_run_spec *s)
{
    for (int i = 0; i < s->ngroups; i++)
        if (s->groups[i] == g)
            return true;
    return false;
}

/* Would the run's user be allowed to execute this regular file? */
static bool can_exec(const char *path, const struct stat *st, const struct proc_run_spec *s)
{
    if (!s->set_user)
        return faccessat(AT_FDCWD, path, X_OK, AT_EACCESS) == 0;
    if (s->uid == 0)
        return (st->st_mode & 0111) != 0;
    if (st->st_uid == s->uid)
        return (st->st_mode & S_IXUSR) != 0;
    if (st->st_gid == s->gid || in_groups(st->st_gid, s))
        return (st->st_mode & S_IXGRP) != 0;
    return (st->st_mode & S_IXOTH) != 0;
}

/* dir + "/" + name into buf; a relative result is taken relative to the child's cwd. */
static int join_path(char *buf, size_t cap, const char *cwd, const char *dir, size_t dirlen,
                     const char *name)
{
    int n;
    if (dirlen == 0)
        n = snprintf(buf, cap, "%s/%s", cwd ? cwd : ".", name);
    else if (dir[0] != '/' && cwd != NULL)
        n = snprintf(buf, cap, "%s/%.*s/%s", cwd, (int)dirlen, dir, name);
    else
        n = snprintf(buf, cap, "%.*s/%s", (int)dirlen, dir, name);
    return n < 0 || (size_t)n >= cap ? -ENAMETOOLONG : 0;
}

/* 0: executable; -ENOENT: not there (or not a regular file); -EACCES: not executable. */
static int check_candidate(const char *path, const struct proc_run_spec *s)
{
    struct stat st;
    if (stat(path, &st) < 0)
        return errno == EACCES ? -EACCES : -ENOENT;
    if (!S_ISREG(st.st_mode))
        return S_ISDIR(st.st_mode) ? -EACCES : -ENOENT;
    return can_exec(path, &st, s) ? 0 : -EACCES;
}

static const char *env_get(char *const *env, const char *key)
{
    size_t kl = strlen(key);
    for (size_t i = 0; env[i] != NULL; i++)
        if (strncmp(env[i], key, kl) == 0 && env[i][kl] == '=')
            return env[i] + kl + 1;
    return NULL;
}

/* execvp's lookup, on the PATH of the child's environment, done in the parent (a failed
 * exec in the child cannot tell which PATH entries it tried). */
static int resolve_file(const struct proc_run_spec *s, char *buf, size_t cap, char *err,
                        size_t errlen)
{
    const char *file = s->file;
    int rc;
    if (strchr(file, '/') != NULL) {
        /* Nothing to look up: execve itself says ENOENT/EACCES (child_error words them like
         * the lookup below), relative to the child's cwd after its chdir. */
        if (strlen(file) >= cap)
            rc = -ENAMETOOLONG;
        else {
            memcpy(buf, file, strlen(file) + 1);
            rc = 0;
        }
    } else {
        const char *path = env_get(s->env, "PATH");
        if (path == NULL)
            path = "/usr/local/bin:/usr/bin:/bin";
        bool denied = false;
        rc = -ENOENT;
        for (const char *p = path;; p++) {
            const char *e = strchrnul(p, ':');
            if (join_path(buf, cap, s->cwd, p, (size_t)(e - p), file) == 0) {
                int r = check_candidate(buf, s);
                if (r == 0) {
                    rc = 0;
                    break;
                }
                denied |= r == -EACCES;
            }
            if (*e == '\0')
                break;
            p = e;
        }
        if (rc < 0 && denied)
            rc = -EACCES;
    }
    if (rc == -ENOENT)
        snprintf(err, errlen, "command not found: %s", file);
    else if (rc == -EACCES)
        snprintf(err, errlen, "permission denied: %s", file);
    else if (rc < 0)
        snprintf(err, errlen, "cannot execute %s: %s", file, strerror(-rc));
    return rc;
}

static int check_cwd(const struct proc_run_spec *s, char *err, size_t errlen)
{
    struct stat st;
    if (s->cwd == NULL)
        return 0;
    if (stat(s->cwd, &st) < 0) {
        int e = errno;
        if (e == ENOENT)
            snprintf(err, errlen, "working directory does not exist: %s", s->cwd);
        else if (e == ENOTDIR)
            snprintf(err, errlen, "working directory is not a directory: %s", s->cwd);
        else
            snprintf(err, errlen, "working directory %s: %s", s->cwd, strerror(e));
        return -e;
    }
    if (!S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "working directory is not a directory: %s", s->cwd);
        return -ENOTDIR;
    }
    return 0;
}

int proc__fd_above_stdio(int fd)
{
    if (fd < 0 || fd > 2)
        return fd;
    int nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    int e = errno;
    close(fd);
    return nfd < 0 ? -e : nfd;
}

/* pipe2(O_CLOEXEC) with both ends above 2, so the child's dup2 onto 0-2 never collides. */
static int make_pipe(int fds[2])
{
    if (pipe2(fds, O_CLOEXEC) < 0) {
        fds[0] = fds[1] = -1;
        return -errno;
    }
    int r0 = proc__fd_above_stdio(fds[0]);
    int r1 = proc__fd_above_stdio(fds[1]);
    if (r0 < 0 || r1 < 0) {
        if (r0 >= 0)
            close(r0);
        if (r1 >= 0)
            close(r1);
        fds[0] = fds[1] = -1;
        return r0 < 0 ? r0 : r1;
    }
    fds[0] = r0;
    fds[1] = r1;
    return 0;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* ------------------------------------------------------------------------------------------
 * The child
 *
 * Runs on the private stack in the daemon's address space until execve. It may only make
 * raw system calls: no malloc, no stdio, no libc wrapper that takes locks or (like setuid)
 * signals other threads, and nothing ASan intercepts. Every handler is reset to SIG_DFL
 * before the mask (blocked by the parent) is cleared, so no daemon handler can run here.
 *
 * Which dispositions to reset is read once (reset_sigs): the caught ones (a handler must not
 * run in the child, sharing our memory) and the ignored ones (SIG_IGN survives execve; a
 * child gets clean defaults). That is a handful, not 62 sigaction calls per spawn. The
 * daemon installs its handlers (libuv: SIGCHLD, SIGTERM, SIGINT) before it serves; glibc's
 * two internal signals are always included, as they get handlers when a thread starts.
 */

static unsigned char reset_sigs[NSIG];

static void find_reset_sigs(void)
{
    size_t n = 0;
    for (int sig = 1; sig < NSIG && n + 1 < sizeof(reset_sigs); sig++) {
        struct sigaction sa;
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        bool internal = sig >= 32 && sig < SIGRTMIN; /* glibc's SIGCANCEL, SIGSETXID */
        if (internal || (sigaction(sig, NULL, &sa) == 0 && sa.sa_handler != SIG_DFL))
            reset_sigs[n++] = (unsigned char)sig;
    }
    reset_sigs[n] = 0;
}

enum child_stage {
    CHILD_OK = 0,
    CHILD_SETSID,
    CHILD_CGROUP,
    CHILD_DUP,
    CHILD_GROUPS,
    CHILD_GID,
    CHILD_UID,
    CHILD_CHDIR,
    CHILD_EXEC,
};

struct child_args {
    const char *path;
    char *const *argv;
    char *const *envp;
    const char *cwd;
    int fd[3];                /* become 0, 1, 2; all >= 3 */
    int cg_fd[2];             /* cgroup.procs files to join, -1: none */
    bool set_user;
    uid_t uid;
    gid_t gid;
    const gid_t *groups;
    size_t ngroups;
    const unsigned char *reset_sigs; /* dispositions to set to SIG_DFL, 0-terminated */
    volatile int stage;       /* written by the child on failure */
    volatile int err;
};

#define CHILD_FN __attribute__((no_sanitize("address", "undefined"), noinline))

CHILD_FN __attribute__((noreturn)) static void child_fail(struct child_args *a, int stage)
{
    a->err = errno;
    a->stage = stage;
    for (;;)
        syscall(SYS_exit, 127);
}

CHILD_FN static int child_main(void *arg)
{
    struct child_args *a = arg;
    /* A zeroed kernel struct sigaction is {SIG_DFL, no flags, empty mask} on every layout. */
    static const unsigned long act[8];
    static const unsigned long mask[2];

    for (const unsigned char *sig = a->reset_sigs; *sig != 0; sig++)
        syscall(SYS_rt_sigaction, (int)*sig, act, NULL, NSIG / 8);
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, mask, NULL, NSIG / 8);

    if (syscall(SYS_setsid) < 0)
        child_fail(a, CHILD_SETSID);
    for (int i = 0; i < 2; i++)
        if (a->cg_fd[i] >= 0 && syscall(SYS_write, a->cg_fd[i], "0", 1) != 1)
            child_fail(a, CHILD_CGROUP);

    /* The kernel's OOM killer should prefer the workload over the daemon. */
    long fd = syscall(SYS_openat, AT_FDCWD, "/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        syscall(SYS_write, fd, CHILD_OOM_SCORE_ADJ, sizeof(CHILD_OOM_SCORE_ADJ) - 1);
        syscall(SYS_close, fd);
    }

    for (int i = 0; i < 3; i++)
        if (syscall(SYS_dup3, a->fd[i], i, 0) < 0)
            child_fail(a, CHILD_DUP);
    /* Everything of the daemon's is O_CLOEXEC already; this also catches fds opened
     * without it by libraries. Only marked here: execve closes them after it has released the
     * daemon (vfork), whereas closing them now kept the daemon waiting 4 µs with 20 fds open
     * and 21-62 µs with 230-640 (pooled cgroup dirs keep 5 each). Kernels before 5.11 lack the
     * flag: close them now. ENOSYS on older ones is fine for the reason above. */
    if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        syscall(SYS_close_range, 3U, ~0U, 0U);

    if (a->set_user) {
        if (syscall(SYS_setgroups, a->ngroups, a->groups) < 0)
            child_fail(a, CHILD_GROUPS);
        if (syscall(SYS_setresgid, a->gid, a->gid, a->gid) < 0)
            child_fail(a, CHILD_GID);
        if (syscall(SYS_setresuid, a->uid, a->uid, a->uid) < 0)
            child_fail(a, CHILD_UID);
    }
    /* After the id switch, so the user's own permissions apply to the directory. */
    if (a->cwd != NULL && syscall(SYS_chdir, a->cwd) < 0)
        child_fail(a, CHILD_CHDIR);
    syscall(SYS_execve, a->path, a->argv, a->envp);
    child_fail(a, CHILD_EXEC);
}

/* ---- clone3(CLONE_INTO_CGROUP) ----
 * Joining a cgroup by writing to cgroup.procs is a migration: it takes the global
 * cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period (measured here:
 * 23 ms per spawn). clone3 with CLONE_INTO_CGROUP creates the child inside its cgroup2 dir
 * instead, with no migration. The child of a CLONE_VM clone3 starts on the new stack at the
 * instruction after the syscall, so it cannot return into C: a few lines of assembly call the
 * child function and exit. x86-64 only; elsewhere (or on old kernels) spawn falls back to
 * clone() plus the write.
 */
struct clone3_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
        set_tid_size, cgroup;
};

#if defined(__x86_64__) && defined(SYS_clone3)
#define HAVE_CLONE3_ASM 1
/* long proc__clone3_call(struct clone3_args *ca, int (*fn)(void *), void *arg):
 * returns the child's pid or -errno in the parent; the child runs exit(fn(arg)). */
long proc__clone3_call(struct clone3_args *ca, int (*fn)(void *), void *arg);
__asm__(".text\n"
        ".globl proc__clone3_call\n"
        ".hidden proc__clone3_call\n"
        ".type proc__clone3_call,@function\n"
        "proc__clone3_call:\n"
        "    mov %rsi, %r8\n"          /* fn: r8/r9 survive syscall, in both tasks */
        "    mov %rdx, %r9\n"          /* arg */
        "    mov $88, %esi\n"          /* sizeof(struct clone3_args) */
        "    mov $435, %eax\n"         /* SYS_clone3 */
        "    syscall\n"
        "    test %rax, %rax\n"
        "    jnz 1f\n"
        "    xor %ebp, %ebp\n"         /* child: rsp is the top of the new stack */
        "    mov %r9, %rdi\n"
        "    call *%r8\n"
        "    mov %eax, %edi\n"
        "    mov $60, %eax\n"          /* SYS_exit */
        "    syscall\n"
        "    hlt\n"
        "1:  ret\n"
        ".size proc__clone3_call, .-proc__clone3_call\n");
#endif

/* Set once clone3 said ENOSYS/E2BIG/EINVAL: do not try again. */
static bool clone3_broken;

static pid_t spawn_clone(struct proc_table *t, struct child_args *a, int cg_dirfd)
{
#ifdef HAVE_CLONE3_ASM
    if (cg_dirfd >= 0 && !clone3_broken) {
        struct clone3_args ca = {
            .flags = CLONE_VM | CLONE_VFORK | 0x200000000ULL /* CLONE_INTO_CGROUP */,
            .exit_signal = SIGCHLD,
            .stack = (uint64_t)(uintptr_t)t->stack,
            .stack_size = PROC_STACK_SIZE,
            .cgroup = (uint64_t)cg_dirfd,
        };
        int saved = a->cg_fd[0];
        a->cg_fd[0] = -1; /* already in its cgroup2 dir */
        long pid = proc__clone3_call(&ca, child_main, a);
        if (pid >= 0)
            return (pid_t)pid;
        a->cg_fd[0] = saved;
        if (pid == -ENOSYS || pid == -E2BIG || pid == -EINVAL || pid == -EOPNOTSUPP)
            clone3_broken = true;
        else if (pid != -EBUSY && pid != -EACCES) {
            errno = (int)-pid;
            return -1;
        }
    }
#else
    (void)cg_dirfd;
#endif
    return clone(child_main, (char *)t->stack + PROC_STACK_SIZE, CLONE_VM | CLONE_VFORK | SIGCHLD,
                 a);
}

/* ---- joining the v1 memory cgroup off the spawn path ----
 * On hybrid hierarchies the memory controller is v1, where only a migration (a write to
 * cgroup.procs, costing an RCU grace period: 10-25 ms measured here) can place a process.
 * Done in the child it would stall the spawn; so unless a memory limit must hold from the
 * first instruction, the child execs at once and, if it still runs PROC_MEMJOIN_DELAY_MS
 * later (proc.c), a libuv threadpool job moves it: short commands never pay for it. What the
 * leader forks before the move stays in the daemon's memory cgroup (still in its own cgroup2
 * dir, so tree kills are unaffected); only OOM attribution of those early forks is lost.
 */
struct memjoin {
    uv_work_t req;
    int fd;      /* our own dup of the dir's cgroup.procs */
    pid_t pid;
};

static void memjoin_work(uv_work_t *w)
{
    struct memjoin *m = container_of(w, struct memjoin, req);
    char buf[24];
    int n = snprintf(buf, sizeof(buf), "%d", (int)m->pid);
    /* ESRCH: it has ended already, nothing to attribute. */
    if (write(m->fd, buf, (size_t)n) < 0)
        return;
}

static void memjoin_done(uv_work_t *w, int status)
{
    struct memjoin *m = container_of(w, struct memjoin, req);
    (void)status;
    close(m->fd);
    free(m);
}

void proc__memjoin_start(struct proc_table *t, struct proc_cg *cg, pid_t pid)
{
    int fds[2], fd = -1;
    cg->mem_clean = false;
    if (proc__cg_procs_fds(cg, fds) < 0)
        return;
    if (fds[1] >= 0)
        fd = fcntl(fds[1], F_DUPFD_CLOEXEC, 3); /* the job's own: the dir may be released */
    proc__cg_procs_done(cg, fds);
    if (fd < 0)
        return;
    struct memjoin *m = xcalloc(1, sizeof(*m));
    m->fd = fd;
    m->pid = pid;
    if (uv_queue_work(t->loop, &m->req, memjoin_work, memjoin_done) < 0) {
        close(fd);
        free(m);
    }
}

static void child_error(const struct child_args *a, const struct proc_run_spec *s, char *err,
                        size_t errlen)
{
    int e = a->err;
    switch (a->stage) {
    case CHILD_EXEC:
        if (e == ENOENT)
            snprintf(err, errlen, "command not found: %s", s->file);
        else if (e == EACCES)
            snprintf(err, errlen, "permission denied: %s", s->file);
        else
            snprintf(err, errlen, "cannot execute %s: %s", s->file, strerror(e));
        break;
    case CHILD_CHDIR:
        if (e == ENOENT)
            snprintf(err, errlen, "working directory does not exist: %s", s->cwd);
        else if (e == ENOTDIR)
            snprintf(err, errlen, "working directory is not a directory: %s", s->cwd);
        else if (e == EACCES)
            snprintf(err, errlen, "permission denied: working directory %s", s->cwd);
        else
            snprintf(err, errlen, "working directory %s: %s", s->cwd, strerror(e));
        break;
    case CHILD_GROUPS:
    case CHILD_GID:
    case CHILD_UID:
        snprintf(err, errlen, "cannot switch to uid %u gid %u: %s", (unsigned)s->uid,
                 (unsigned)s->gid, strerror(e));
        break;
    case CHILD_CGROUP:
        snprintf(err, errlen, "cannot join the process cgroup: %s", strerror(e));
        break;
    default:
        snprintf(err, errlen, "spawn failed (%s): %s",
                 a->stage == CHILD_SETSID ? "setsid" : "dup2", strerror(e));
        break;
    }
}

/* ------------------------------------------------------------------------------------------
 * proc__spawn
 */

int proc__spawn(struct proc_table *t, const struct proc_run_spec *s, struct proc_child *ret,
                char *err, size_t errlen)
{
    char path[PATH_MAX];
    int in[2] = {-1, -1}, out[2] = {-1, -1}, errp[2] = {-1, -1};
    int cg_fd[2] = {-1, -1}, cg_dirfd = -1;
    bool memjoin = false;
    struct proc_cg *cg = NULL;
    struct child_args a;
    sigset_t all, old;
    pid_t pid;
    int rc;

    if ((rc = resolve_file(s, path, sizeof(path), err, errlen)) < 0)
        return rc;
    if ((rc = check_cwd(s, err, errlen)) < 0)
        return rc;

    if ((s->stdin_mode == PROC_STDIN_PIPE && (rc = make_pipe(in)) < 0) ||
        (s->capture_stdout && (rc = make_pipe(out)) < 0) ||
        (s->capture_stderr && (rc = make_pipe(errp)) < 0)) {
        snprintf(err, errlen, "cannot create pipes: %s", strerror(-rc));
        goto fail;
    }

    cg = proc__cg_acquire(t, s->memory_limit);
    if (cg != NULL && proc__cg_procs_fds(cg, cg_fd) < 0) {
        /* Without its cgroup the run still works, tracked by its process group. */
        proc__cg_release(t, cg, false);
        cg = NULL;
    }

    if (cg != NULL && cg->v2 != NULL)
        cg_dirfd = cg->hot ? cg->fd_dir : open(cg->v2, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (cg_dirfd >= 0 && cg->mem != cg->v2 && cg_fd[1] >= 0 && s->memory_limit == 0)
        memjoin = true;

    memset(&a, 0, sizeof(a));
    a.path = path;
    a.argv = s->argv;
    a.envp = s->env;
    a.cwd = s->cwd;
    a.fd[0] = in[0] >= 0 ? in[0] : t->devnull;
    a.fd[1] = out[1] >= 0 ? out[1] : t->devnull;
    a.fd[2] = errp[1] >= 0 ? errp[1] : t->devnull;
    a.cg_fd[0] = cg_fd[0];
    a.cg_fd[1] = memjoin ? -1 : cg_fd[1]; /* else a threadpool job joins it */
    if (a.cg_fd[1] >= 0)
        cg->mem_clean = false;
    a.set_user = s->set_user;
    a.uid = s->uid;
    a.gid = s->gid;
    a.groups = s->groups;
    a.ngroups = (size_t)s->ngroups;
    if (reset_sigs[0] == 0)
        find_reset_sigs();
    a.reset_sigs = reset_sigs;

    /* All signals blocked across clone: the child shares our memory and must not run a
     * daemon handler (libuv's writes into its signal pipe) before it has reset them. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = spawn_clone(t, &a, cg_dirfd);
    int clone_errno = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (cg_dirfd >= 0 && !cg->hot)
        close(cg_dirfd);

    close_fd(&in[0]);
    close_fd(&out[1]);
    close_fd(&errp[1]);
    if (cg != NULL)
        proc__cg_procs_done(cg, cg_fd);

    if (pid < 0) {
        /* Not the request's fault (a missing file here is a cgroup removed under us): only
         * resource exhaustion keeps its errno, the rest is the daemon's failure. */
        rc = clone_errno == EAGAIN || clone_errno == ENOMEM ? -clone_errno : -EIO;
        snprintf(err, errlen, "cannot spawn: %s", strerror(clone_errno));
        goto fail;
    }
    if (a.stage != CHILD_OK) {
        int st;
        /* The child has exited already (vfork semantics): this does not block. Reaping it
         * here, not in the SIGCHLD handler, keeps failed starts invisible. */
        while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
            ;
        child_error(&a, s, err, errlen);
        rc = a.err > 0 ? -a.err : -EIO;
        goto fail;
    }

    ret->memjoin = memjoin; /* the core decides when (proc__memjoin_start) */
    ret->pid = pid;
    ret->fd_stdin = in[1];
    ret->fd_stdout = out[0];
    ret->fd_stderr = errp[0];
    ret->cg = cg;
    return 0;

fail:
    close_fd(&in[0]);
    close_fd(&in[1]);
    close_fd(&out[0]);
    close_fd(&out[1]);
    close_fd(&errp[0]);
    close_fd(&errp[1]);
    if (cg != NULL) {
        proc__cg_procs_done(cg, cg_fd);
        proc__cg_release(t, cg, false);
    }
    return rc;
}
