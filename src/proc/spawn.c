/*
 * spawn: starts one run of a record, like glibc's posix_spawn: clone(CLONE_VM) on a private
 * stack, so the daemon's memory is never copied and its size never matters.
 *
 * Everything that can be checked is checked in the parent first (executable lookup on the
 * child's PATH, cwd, user), so the common errors get precise messages. What can only fail in
 * the child (chdir races, setuid, exec) is reported through a struct in the shared memory,
 * final once the child has exec'd or exited: at once with CLONE_VFORK (proc__spawn, which
 * suspends the parent until then), or when the exec-status pipe says EOF (proc__spawn_async,
 * which does not). A failed child is reaped here; no record is created.
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
#include <sys/mman.h>
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
    if (in->env != NULL && in->env_give != NULL && *in->env_give == (char **)in->env) {
        out->env = *in->env_give;   /* one sized allocation, as strv_dup() would make it */
        *in->env_give = NULL;
    } else {
        out->env = strv_dup(in->env != NULL ? in->env : environ);
    }
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

/* The child's system calls: the result, or -errno. In an asynchronous spawn the daemon runs on
 * while the child makes them, in the same memory and with the same thread pointer, so a libc
 * wrapper's errno write would land in the daemon's errno: on x86-64 they are made directly
 * (and only there are spawns asynchronous, see proc__spawn_async_ok). */
#if defined(__x86_64__)
#define CHILD_RAW_SYSCALLS 1
__attribute__((no_sanitize("address", "undefined"), always_inline)) static inline long
child_sys(long n, long a1, long a2, long a3, long a4)
{
    long ret;
    register long r10 __asm__("r10") = a4;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10)
                     : "rcx", "r11", "memory");
    return ret;
}
#else
CHILD_FN static long child_sys(long n, long a1, long a2, long a3, long a4)
{
    long r = syscall(n, a1, a2, a3, a4);
    return r < 0 ? -errno : r;
}
#endif
#define CSYS(n, a1, a2, a3) child_sys((n), (long)(a1), (long)(a2), (long)(a3), 0)
#define CSYS4(n, a1, a2, a3, a4) child_sys((n), (long)(a1), (long)(a2), (long)(a3), (long)(a4))

CHILD_FN __attribute__((noreturn)) static void child_fail(struct child_args *a, int stage,
                                                          long rc)
{
    a->err = rc < 0 ? (int)-rc : EIO;
    a->stage = stage;
    for (;;)
        CSYS(SYS_exit, 127, 0, 0);
}

CHILD_FN static int child_main(void *arg)
{
    struct child_args *a = arg;
    /* A zeroed kernel struct sigaction is {SIG_DFL, no flags, empty mask} on every layout. */
    static const unsigned long act[8];
    static const unsigned long mask[2];
    long rc;

    for (const unsigned char *sig = a->reset_sigs; *sig != 0; sig++)
        CSYS4(SYS_rt_sigaction, *sig, act, 0, NSIG / 8);
    CSYS4(SYS_rt_sigprocmask, SIG_SETMASK, mask, 0, NSIG / 8);

    if ((rc = CSYS(SYS_setsid, 0, 0, 0)) < 0)
        child_fail(a, CHILD_SETSID, rc);
    for (int i = 0; i < 2; i++)
        if (a->cg_fd[i] >= 0 && (rc = CSYS(SYS_write, a->cg_fd[i], "0", 1)) != 1)
            child_fail(a, CHILD_CGROUP, rc);

    /* The kernel's OOM killer should prefer the workload over the daemon. */
    long fd = CSYS4(SYS_openat, AT_FDCWD, "/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC, 0);
    if (fd >= 0) {
        CSYS(SYS_write, fd, CHILD_OOM_SCORE_ADJ, sizeof(CHILD_OOM_SCORE_ADJ) - 1);
        CSYS(SYS_close, fd, 0, 0);
    }

    for (int i = 0; i < 3; i++)
        if ((rc = CSYS(SYS_dup3, a->fd[i], i, 0)) < 0)
            child_fail(a, CHILD_DUP, rc);
    /* Everything of the daemon's is O_CLOEXEC already; this also catches fds opened
     * without it by libraries. Only marked here: execve closes them after it has released the
     * daemon (vfork), whereas closing them now kept the daemon waiting 4 µs with 20 fds open
     * and 21-62 µs with 230-640 (pooled cgroup dirs keep 5 each). Kernels before 5.11 lack the
     * flag: close them now. ENOSYS on older ones is fine for the reason above. */
    if (CSYS(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) < 0)
        CSYS(SYS_close_range, 3U, ~0U, 0U);

    if (a->set_user) {
        if ((rc = CSYS(SYS_setgroups, a->ngroups, a->groups, 0)) < 0)
            child_fail(a, CHILD_GROUPS, rc);
        if ((rc = CSYS(SYS_setresgid, a->gid, a->gid, a->gid)) < 0)
            child_fail(a, CHILD_GID, rc);
        if ((rc = CSYS(SYS_setresuid, a->uid, a->uid, a->uid)) < 0)
            child_fail(a, CHILD_UID, rc);
    }
    /* After the id switch, so the user's own permissions apply to the directory. */
    if (a->cwd != NULL && (rc = CSYS(SYS_chdir, a->cwd, 0, 0)) < 0)
        child_fail(a, CHILD_CHDIR, rc);
    rc = CSYS(SYS_execve, a->path, a->argv, a->envp);
    child_fail(a, CHILD_EXEC, rc);
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

/* clone3 of the child on stack[0..size): CLONE_VFORK when sync. 0 with the pid, or -errno
 * (-EAGAIN... from the kernel; -ENOSYS when clone3 cannot be used at all). */
static long spawn_clone3(struct child_args *a, int cg_dirfd, void *stack, size_t size, bool sync)
{
#ifdef HAVE_CLONE3_ASM
    if (clone3_broken)
        return -ENOSYS;
    struct clone3_args ca = {
        .flags = CLONE_VM | (sync ? CLONE_VFORK : 0) |
                 (cg_dirfd >= 0 ? 0x200000000ULL /* CLONE_INTO_CGROUP */ : 0),
        .exit_signal = SIGCHLD,
        .stack = (uint64_t)(uintptr_t)stack,
        .stack_size = size,
        .cgroup = cg_dirfd >= 0 ? (uint64_t)cg_dirfd : 0,
    };
    int saved = a->cg_fd[0];
    if (cg_dirfd >= 0)
        a->cg_fd[0] = -1; /* already in its cgroup2 dir */
    long pid = proc__clone3_call(&ca, child_main, a);
    if (pid >= 0)
        return pid;
    a->cg_fd[0] = saved;
    if (cg_dirfd >= 0 && (pid == -EBUSY || pid == -EACCES)) /* the dir: join by writing */
        return spawn_clone3(a, -1, stack, size, sync);
    if (pid == -ENOSYS || pid == -E2BIG || pid == -EINVAL || pid == -EOPNOTSUPP) {
        clone3_broken = true;
        return -ENOSYS;
    }
    return pid;
#else
    (void)a, (void)cg_dirfd, (void)stack, (void)size, (void)sync;
    return -ENOSYS;
#endif
}

static pid_t spawn_clone(struct proc_table *t, struct child_args *a, int cg_dirfd)
{
    long pid = spawn_clone3(a, cg_dirfd, t->stack, PROC_STACK_SIZE, true);
    if (pid != -ENOSYS) {
        if (pid < 0)
            errno = (int)-pid;
        return pid < 0 ? -1 : (pid_t)pid;
    }
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
 * proc__spawn (synchronous) and proc__spawn_async
 */

/* One spawn: what the child is given, and the parent's ends. */
struct proc_spawn_job {
    struct child_args a;
    char path[PATH_MAX];
    int in[2], out[2], errp[2];
    int cg_fd[2];
    int cg_dirfd;
    bool memjoin;
    struct proc_cg *cg;
    pid_t pid;
    int status_fd;   /* async: read end of the exec-status pipe, -1 otherwise */
    void *stack;     /* async: this spawn's stack (PROC_ASYNC_STACK_SIZE), from the table */
};

static void job_close_all(struct proc_table *t, struct proc_spawn_job *j)
{
    close_fd(&j->in[0]);
    close_fd(&j->in[1]);
    close_fd(&j->out[0]);
    close_fd(&j->out[1]);
    close_fd(&j->errp[0]);
    close_fd(&j->errp[1]);
    if (j->cg != NULL) {
        proc__cg_procs_done(j->cg, j->cg_fd);
        if (j->cg_dirfd >= 0 && !j->cg->hot)
            close(j->cg_dirfd);
        j->cg_dirfd = -1;
        proc__cg_release(t, j->cg, false);
        j->cg = NULL;
    }
}

/* Everything up to the clone: lookup, checks, pipes, cgroup, the child's arguments. */
static int job_prepare(struct proc_table *t, const struct proc_run_spec *s,
                       struct proc_spawn_job *j, char *err, size_t errlen)
{
    struct proc_cg *cg = NULL;
    int rc;

    j->in[0] = j->in[1] = j->out[0] = j->out[1] = j->errp[0] = j->errp[1] = -1;
    j->cg_fd[0] = j->cg_fd[1] = j->cg_dirfd = -1;
    j->status_fd = -1;
    j->memjoin = false;
    j->cg = NULL;
    j->pid = 0;
    j->stack = NULL;
    if ((rc = resolve_file(s, j->path, sizeof(j->path), err, errlen)) < 0)
        return rc;
    if ((rc = check_cwd(s, err, errlen)) < 0)
        return rc;

    if ((s->stdin_mode == PROC_STDIN_PIPE && (rc = make_pipe(j->in)) < 0) ||
        (s->capture_stdout && (rc = make_pipe(j->out)) < 0) ||
        (s->capture_stderr && (rc = make_pipe(j->errp)) < 0)) {
        snprintf(err, errlen, "cannot create pipes: %s", strerror(-rc));
        job_close_all(t, j);
        return rc;
    }

    cg = proc__cg_acquire(t, s->memory_limit);
    if (cg != NULL && proc__cg_procs_fds(cg, j->cg_fd) < 0) {
        /* Without its cgroup the run still works, tracked by its process group. */
        proc__cg_release(t, cg, false);
        cg = NULL;
    }
    j->cg = cg;
    if (cg != NULL && cg->v2 != NULL)
        j->cg_dirfd = cg->hot ? cg->fd_dir : open(cg->v2, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (j->cg_dirfd >= 0 && cg->mem != cg->v2 && j->cg_fd[1] >= 0 && s->memory_limit == 0)
        j->memjoin = true;

    struct child_args *a = &j->a;
    memset(a, 0, sizeof(*a));
    a->path = j->path;
    a->argv = s->argv;
    a->envp = s->env;
    a->cwd = s->cwd;
    a->fd[0] = j->in[0] >= 0 ? j->in[0] : t->devnull;
    a->fd[1] = j->out[1] >= 0 ? j->out[1] : t->devnull;
    a->fd[2] = j->errp[1] >= 0 ? j->errp[1] : t->devnull;
    a->cg_fd[0] = j->cg_fd[0];
    a->cg_fd[1] = j->memjoin ? -1 : j->cg_fd[1]; /* else a threadpool job joins it */
    if (a->cg_fd[1] >= 0)
        cg->mem_clean = false;
    a->set_user = s->set_user;
    a->uid = s->uid;
    a->gid = s->gid;
    a->groups = s->groups;
    a->ngroups = (size_t)s->ngroups;
    if (reset_sigs[0] == 0)
        find_reset_sigs();
    a->reset_sigs = reset_sigs;
    return 0;
}

/* Right after the clone: the child has its own copies of the fds it needs. */
static void job_after_clone(struct proc_spawn_job *j)
{
    close_fd(&j->in[0]);
    close_fd(&j->out[1]);
    close_fd(&j->errp[1]);
    if (j->cg != NULL) {
        if (j->cg_dirfd >= 0 && !j->cg->hot)
            close(j->cg_dirfd);
        j->cg_dirfd = -1;
        proc__cg_procs_done(j->cg, j->cg_fd);
        j->cg_fd[0] = j->cg_fd[1] = -1;
    }
}

static int job_clone_failed(struct proc_table *t, struct proc_spawn_job *j, int e, char *err,
                            size_t errlen)
{
    job_close_all(t, j);
    /* Not the request's fault (a missing file here is a cgroup removed under us): only
     * resource exhaustion keeps its errno, the rest is the daemon's failure. */
    snprintf(err, errlen, "cannot spawn: %s", strerror(e));
    return e == EAGAIN || e == ENOMEM ? -e : -EIO;
}

/* The child has exec'd or exited (its status is final): the outcome. status >= 0: the loop
 * reaped it already with that wait status. */
static int job_finish(struct proc_table *t, const struct proc_run_spec *s,
                      struct proc_spawn_job *j, bool reaped, struct proc_child *ret, char *err,
                      size_t errlen)
{
    if (j->a.stage != CHILD_OK) {
        int st;
        /* The child has exited or is exiting: this does not block for long. Reaping it here,
         * not in the SIGCHLD handler, keeps failed starts invisible. */
        while (!reaped && waitpid(j->pid, &st, 0) < 0 && errno == EINTR)
            ;
        child_error(&j->a, s, err, errlen);
        job_close_all(t, j);
        return j->a.err > 0 ? -j->a.err : -EIO;
    }
    ret->memjoin = j->memjoin; /* the core decides when (proc__memjoin_start) */
    ret->pid = j->pid;
    ret->fd_stdin = j->in[1];
    ret->fd_stdout = j->out[0];
    ret->fd_stderr = j->errp[0];
    ret->cg = j->cg;
    return 0;
}

int proc__spawn(struct proc_table *t, const struct proc_run_spec *s, struct proc_child *ret,
                char *err, size_t errlen)
{
    struct proc_spawn_job j;
    sigset_t all, old;
    int rc;

    if ((rc = job_prepare(t, s, &j, err, errlen)) < 0)
        return rc;
    /* All signals blocked across clone: the child shares our memory and must not run a
     * daemon handler (libuv's writes into its signal pipe) before it has reset them. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    j.pid = spawn_clone(t, &j.a, j.cg_dirfd);
    int clone_errno = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    job_after_clone(&j);
    if (j.pid < 0)
        return job_clone_failed(t, &j, clone_errno, err, errlen);
    /* CLONE_VFORK: the child has exec'd or exited, j.a is final. */
    return job_finish(t, s, &j, false, ret, err, errlen);
}

/* Asynchronous spawns: clone3 without CLONE_VFORK, so the loop goes on while the child sets
 * itself up and execs, instead of sleeping in the vfork wait (0.15-1 ms per spawn here, the
 * loop's largest single wait under load). The child still runs in our memory until execve,
 * on its own stack, reading the job (kept until then); it makes its system calls without
 * libc (child_sys), so nothing of the daemon's changes under the loop. When it has exec'd or
 * exited, the exec-status pipe's write end (O_CLOEXEC, the child's only copy) closes: the loop
 * sees EOF, and j->a says whether exec happened. x86-64 with clone3 only; elsewhere spawns
 * stay synchronous. */
bool proc__spawn_async_ok(const struct proc_table *t)
{
    (void)t;
#if defined(HAVE_CLONE3_ASM) && defined(CHILD_RAW_SYSCALLS)
    return !clone3_broken;
#else
    return false;
#endif
}

void *proc__stack_new(size_t size)
{
    long page = sysconf(_SC_PAGESIZE);
    void *stk = mmap(NULL, size + (size_t)page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stk == MAP_FAILED)
        return NULL;
    mprotect(stk, (size_t)page, PROT_NONE); /* guard page below the stack */
    return (char *)stk + page;
}

void proc__stack_free(void *stack, size_t size)
{
    long page = sysconf(_SC_PAGESIZE);
    if (stack != NULL)
        munmap((char *)stack - page, size + (size_t)page);
}

static void *stack_get(struct proc_table *t)
{
    return t->nstacks > 0 ? t->stacks[--t->nstacks] : proc__stack_new(PROC_ASYNC_STACK_SIZE);
}

/* At most PROC_ASYNC_MAX spawns are in flight, so the pool always has room. */
static void stack_put(struct proc_table *t, void *stack)
{
    t->stacks[t->nstacks++] = stack;
}

/* Jobs are pooled like the stacks: a job is over 4 KiB (its path buffer), and glibc's malloc
 * consolidates all its small free chunks before every request of that size (measured:
 * malloc_consolidate 1.5 % of the daemon's CPU at 8 connections). job_prepare() sets every
 * field, so a job needs no zeroing. */
static struct proc_spawn_job *job_get(struct proc_table *t)
{
    return t->njobs > 0 ? t->jobs[--t->njobs] : xmalloc(sizeof(struct proc_spawn_job));
}

static void job_put(struct proc_table *t, struct proc_spawn_job *j)
{
    t->jobs[t->njobs++] = j;
}

void proc__spawn_pools_free(struct proc_table *t)
{
    while (t->nstacks > 0)
        proc__stack_free(t->stacks[--t->nstacks], PROC_ASYNC_STACK_SIZE);
    while (t->njobs > 0)
        free(t->jobs[--t->njobs]);
}

int proc__spawn_async(struct proc_table *t, const struct proc_run_spec *s,
                      struct proc_spawn_job **ret, char *err, size_t errlen)
{
    struct proc_spawn_job *j = job_get(t);
    int st[2] = {-1, -1};
    sigset_t all, old;
    int rc;

    if ((rc = job_prepare(t, s, j, err, errlen)) < 0) {
        job_put(t, j);
        return rc;
    }
    int e = 0;
    if ((j->stack = stack_get(t)) == NULL)
        e = ENOMEM;
    else if ((rc = make_pipe(st)) < 0)
        e = -rc;
    if (e != 0) {
        if (j->stack != NULL)
            stack_put(t, j->stack);
        rc = job_clone_failed(t, j, e, err, errlen);
        job_put(t, j);
        return rc;
    }
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    long pid = spawn_clone3(&j->a, j->cg_dirfd, j->stack, PROC_ASYNC_STACK_SIZE, false);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(st[1]); /* the child holds the only other copy, until exec or exit */
    job_after_clone(j);
    if (pid < 0) {
        close(st[0]);
        stack_put(t, j->stack);
        rc = job_clone_failed(t, j, (int)-pid, err, errlen);
        job_put(t, j);
        return rc;
    }
    j->pid = (pid_t)pid;
    j->status_fd = st[0];
    *ret = j;
    return 0;
}

pid_t proc__spawn_job_pid(const struct proc_spawn_job *j)
{
    return j->pid;
}

int proc__spawn_job_fd(const struct proc_spawn_job *j)
{
    return j->status_fd;
}

int proc__spawn_job_end(struct proc_table *t, const struct proc_run_spec *s,
                        struct proc_spawn_job *j, bool reaped, struct proc_child *ret, char *err,
                        size_t errlen)
{
    close_fd(&j->status_fd);
    stack_put(t, j->stack); /* the child has left it: exec'd or exited */
    int rc = job_finish(t, s, j, reaped, ret, err, errlen);
    job_put(t, j);
    return rc;
}
