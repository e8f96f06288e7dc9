/*
 * Private to src/proc: the record's private part, the table, and the calls between the files
 * of the process core:
 *
 *   proc.c    table, pid map, reaping, the state machine (every transition), stdin, watchers
 *   spawn.c   executable lookup and clone(CLONE_VM) + exec of one run, sync (CLONE_VFORK)
 *             or async (exec-status pipe)
 *   cgroup.c  per-run cgroups: detection, a pool of reusable dirs, tree kill, OOM counters
 *   ports.c   listening ports of a process tree
 *   env.c     environment and user helpers, state names
 *
 * Nothing here is for api/.
 */
#ifndef SANDBOXD_PROC_INTERNAL_H
#define SANDBOXD_PROC_INTERNAL_H

#include <signal.h>

#include "proc/proc.h"

#define PROC_PID_BUCKETS 256
#define PROC_STDIN_MAX (1024 * 1024)   /* bytes queued for a child's stdin */
#define PROC_KILL_DRAIN_MS 500         /* pipe EOF wait after the final tree kill */
#define PROC_MEMJOIN_DELAY_MS 20       /* a run alive this long joins its v1 memory cgroup */
#define PROC_STACK_SIZE (256 * 1024)   /* the vfork child's stack (reused by every sync spawn) */
#define PROC_ASYNC_STACK_SIZE (64 * 1024) /* an asynchronous spawn's child stack */
#define PROC_ASYNC_MAX 64              /* spawns in flight at once; beyond, spawns are sync */
#define PROC_DRAIN_READ_MAX (4u << 20) /* bytes read synchronously when a pipe is force-closed */
#define PROC_CAPTURE_PIPE_SIZE (1024u * 1024) /* a capture pipe once a read filled the buffer */
#define PROC_FLUSH_BATCH (128u * 1024) /* unflushed bytes that trigger a flush inside a read burst */
#define PROC_TURN_BUDGET (256u * 1024) /* capture bytes one record reads per loop iteration */
#define PROC_HEALTHY_RUN_MS 10000      /* a run this long resets the restart back-off */
#define PROC_SWEEP_MS 500              /* how often quiet logs let their direct-write buffers go */

/* ---- cgroups (cgroup.c) ---- */

enum proc_cg_mode {
    PROC_CG_NONE = 0, /* process groups only; OOM undetectable */
    PROC_CG_HYBRID,   /* controller-less cgroup2 for membership/kill + v1 memory for OOM */
    PROC_CG_V2,       /* pure cgroup2 (memory controller when it could be enabled) */
    PROC_CG_V1,       /* v1 memory only (no cgroup2): kill by listing cgroup.procs */
};

/* One run's cgroup dir(s). Owned by the record while its run is live, then by the table's
 * linger list until empty, then pooled for reuse or removed. */
struct proc_cg {
    struct list link;   /* pool or linger list */
    char *v2;           /* cgroup2 dir, NULL if none */
    char *mem;          /* memory dir: a v1 dir, or == v2 in pure v2; NULL if none */
    struct proc *owner; /* record whose tree lives (or lived) here; NULL when pooled */
    bool limited;       /* a memory limit was written: never reused */
    bool killed;        /* cgroup.kill was written: never reused, because a child cloned
                         * into it with CLONE_INTO_CGROUP afterwards is SIGKILLed by the
                         * kernel (its kill sequence check; seen on 6.18) */
    bool hot;           /* holds the fds below (kernfs opens cost more than the reads) */
    bool mem_clean;     /* hybrid: no process has joined the v1 memory dir since its OOM
                         * count was last read as 0 (or it was made), so pooling it again
                         * needs no read: most runs end before their 20 ms memory join */
    int fd_procs[2];    /* cgroup.procs of v2 and of the v1 memory dir (O_WRONLY), or -1 */
    int fd_events;      /* v2 cgroup.events, or -1 */
    int fd_oom;         /* memory.oom_control (v1) / memory.events (v2), or -1 */
    int fd_dir;         /* the cgroup2 dir itself (O_PATH), for clone3's CLONE_INTO_CGROUP */
};

struct proc_cgroups {
    enum proc_cg_mode mode;
    char *own_v2;         /* the daemon's own cgroup2 dir (pure v2 leaf handling) */
    char *v2_base;        /* <v2 mount><own path>/sandboxd-<pid>, NULL if unused */
    char *mem_base;       /* <memory mount><own path>/sandboxd-<pid> (v1), NULL if unused */
    int v2_lock, mem_lock; /* open, flock()ed v2_base / mem_base: "this daemon lives" */
    bool mem_is_v2;       /* the v2 dirs carry the memory controller */
    bool moved_self;      /* pure v2: the daemon moved itself into v2_base/daemon */
    bool has_kill;        /* cgroup.kill exists */
    unsigned nhot;        /* dirs holding their fds (bounded) */
    struct list pool;     /* empty, clean dirs ready for reuse */
    unsigned npool;
    struct list linger;   /* released dirs still populated (or busy) */
    unsigned nlinger;
    uv_timer_t timer;     /* retries the linger list */
    uint32_t retry_ms;
    uint64_t seq;         /* dir names c<seq> */
};

/* Test hook: bits that make detection ignore cgroup2 (1) or the memory controller (2). */
extern int proc__cg_disable;
/* Test hook: proc_start_async() is asynchronous even when nothing else is live. */
extern bool proc__async_always;

int proc__cg_init(struct proc_table *t);
/* Removes pooled dirs and, when nothing is left inside, the daemon's own dirs. */
void proc__cg_fini(struct proc_table *t);
/* Closes the retry timer (counted in the table's handles) and frees all bookkeeping. */
void proc__cg_close(struct proc_table *t);
/* A dir pair for a new run (from the pool when possible). NULL: no cgroups for this run. */
struct proc_cg *proc__cg_acquire(struct proc_table *t, uint64_t memory_limit);
/* The cgroup.procs fds the child writes "0" into (ret_fds[i] = -1 when unused); give them
 * back with proc__cg_procs_done() (which closes them unless the dir keeps them open). */
int proc__cg_procs_fds(const struct proc_cg *cg, int ret_fds[2]);
void proc__cg_procs_done(const struct proc_cg *cg, int fds[2]);
/* The run is over: kill leftovers if asked (and any remain), then pool or remove the dirs
 * once empty (retrying on a timer). cg->owner keeps pointing at the record until then. */
void proc__cg_release(struct proc_table *t, struct proc_cg *cg, bool kill_leftovers);
/* Sends sig to every process in cg (SIGKILL through cgroup.kill when available). */
int proc__cg_kill(const struct proc_table *t, struct proc_cg *cg, int sig);
/* The memory cgroup recorded an OOM kill. */
bool proc__cg_oom(const struct proc_table *t, const struct proc_cg *cg);
/* Pids in cg (heap array in *ret). Returns the count or a negative errno. */
int proc__cg_pids(const struct proc_cg *cg, pid_t **ret);
/* Signals every lingering dir's processes (daemon shutdown). */
void proc__cg_signal_lingering(struct proc_table *t, int sig);
/* A record goes away: its lingering dirs no longer point at it. */
void proc__cg_forget_owner(struct proc_table *t, struct proc *p);

/* ---- spawn (spawn.c) ---- */

/* The deep copy of a proc_spec a record keeps for its runs. */
struct proc_run_spec {
    char *file;              /* as requested (lookup happens per run) */
    char **argv;
    char **env;
    char *cwd;               /* NULL: the daemon's cwd */
    bool set_user;           /* switch ids in the child (root only) */
    uid_t uid;
    gid_t gid;
    gid_t *groups;           /* supplementary groups for set_user */
    int ngroups;
    enum proc_stdin stdin_mode;
    bool capture_stdout;
    bool capture_stderr;
    bool kill_tree_on_exit;
    uint64_t memory_limit;
    uint32_t backoff_initial_ms;
    uint32_t backoff_max_ms;
};

/* What one successful spawn produced: parent ends of the pipes (-1 when not piped). */
struct proc_child {
    pid_t pid;
    int fd_stdin;
    int fd_stdout;
    int fd_stderr;
    struct proc_cg *cg;      /* NULL: tree is the process group */
    bool memjoin;            /* the v1 memory cgroup is to be joined later (proc__memjoin_start) */
};

int proc__spec_copy(const struct proc_spec *in, struct proc_run_spec *out, char *err,
                    size_t errlen);
void proc__spec_free(struct proc_run_spec *s);
/* Moves pid into cg's v1 memory cgroup off the loop (a threadpool job with its own fd). */
void proc__memjoin_start(struct proc_table *t, struct proc_cg *cg, pid_t pid);
/* Starts one run. On failure nothing is left behind (the failed child is reaped). */
int proc__spawn(struct proc_table *t, const struct proc_run_spec *s, struct proc_child *ret,
                char *err, size_t errlen);
/* Asynchronous spawns (see spawn.c): proc__spawn_async() returns 0 with a job once the child
 * is cloned (s must stay unchanged until the job ends), or fails like proc__spawn. When the
 * job's fd is readable and read() says EOF, the child has exec'd or exited:
 * proc__spawn_job_end() then gives the outcome as proc__spawn would (reaped: the loop has
 * reaped the pid already) and frees the job. Possible only where proc__spawn_async_ok(). */
struct proc_spawn_job;
bool proc__spawn_async_ok(const struct proc_table *t);
int proc__spawn_async(struct proc_table *t, const struct proc_run_spec *s,
                      struct proc_spawn_job **ret, char *err, size_t errlen);
pid_t proc__spawn_job_pid(const struct proc_spawn_job *j);
int proc__spawn_job_fd(const struct proc_spawn_job *j);
int proc__spawn_job_end(struct proc_table *t, const struct proc_run_spec *s,
                        struct proc_spawn_job *j, bool reaped, struct proc_child *ret, char *err,
                        size_t errlen);
/* A child stack of size bytes above a guard page (NULL and errno on failure), and its unmap
 * (NULL: nothing). */
void *proc__stack_new(size_t size);
void proc__stack_free(void *stack, size_t size);
/* Frees the pooled asynchronous-spawn stacks and jobs. */
void proc__spawn_pools_free(struct proc_table *t);
/* An fd at or above 3 (dup'ing with CLOEXEC when lower). Returns the fd or -errno. */
int proc__fd_above_stdio(int fd);

/* ---- records and the table (proc.c) ---- */

/* One pipe of one run; heap, freed by its close_cb. */
struct proc_pipe {
    uv_pipe_t h;
    struct proc *p;
    int stream;              /* 0 for stdin, OBUF_STDOUT, OBUF_STDERR */
    bool closing;
    bool grown;              /* capture pipe enlarged to PROC_CAPTURE_PIPE_SIZE */
    bool paused;             /* reading stopped by proc_hold */
};

struct proc_priv {
    struct proc *self;
    struct proc_run_spec spec;
    struct list pid_link;     /* pid map while the leader is unreaped */
    struct list dirty_link;   /* table's dirty list: output written, not flushed yet */
    struct proc_pipe *pipes[3];/* [0] stdin, [1] stdout, [2] stderr; NULL: none or closed */
    uv_timer_t timeout_timer; /* spec timeout (per run) */
    uv_timer_t kill_timer;    /* stop: KILL after grace */
    uv_timer_t state_timer;   /* DRAINING phases, BACKOFF */
    bool timers_open;         /* timeout/state timers not yet closed */
    bool kill_timer_open;
    int handles;              /* open handles of this record (timers + pipes) */
    bool memjoin;             /* RUNNING: pending v1 memory join (state_timer armed) */
    int drain_phase;          /* DRAINING: 1 waiting for EOF, 2 after the final kill */
    bool no_restart;          /* stop/kill/shutdown asked: never restart */
    bool sent_kill;           /* the daemon SIGKILLed this run's tree */
    bool dirty;
    bool flushed_once;        /* some output of this run has been flushed to watchers */
    int holds;                /* proc_hold count: capture reading paused while > 0 and RUNNING */
    size_t unflushed;         /* bytes read since the last flush */
    size_t turn_bytes;        /* capture bytes read in loop iteration turn_seen */
    uint64_t turn_seen;
    bool freeing;             /* evicted: free the memory when handles == 0 */
    uint32_t backoff_ms;      /* next restart delay */
    size_t stdin_queued;
    bool stdin_close_pending;
    struct proc_cg *cg;       /* current run's cgroup (or the lingering last one), or NULL */
    bool run_cg;              /* the current/last run got a cgroup */
    uint64_t retained;        /* obuf_retained() as counted in the table total */
};

struct proc_table {
    uv_loop_t *loop;
    struct proc_config cfg;   /* state_dir copied */
    char *out_dir;
    char *log_prefix;         /* "<out_dir>/<self_pid>-": a log is this, its handle, ".log" */
    size_t log_prefix_len;
    pid_t self_pid;
    uint64_t next_handle;
    struct list procs;        /* every record, oldest first */
    unsigned n_total;
    unsigned n_live;          /* not DONE */
    unsigned n_done;
    struct list pid_map[PROC_PID_BUCKETS];
    uv_poll_t sigchld;        /* on sigfd */
    int sigfd;                /* signalfd of SIGCHLD (blocked in the daemon), or -1 */
    uv_check_t flush_check;   /* coalesces output notifications per loop iteration */
    struct list dirty;
    uint64_t turn;            /* loop iterations that read output (flush_check runs) */
    uv_timer_t timer;         /* shutdown escalation / deferred done_cb */
    uv_timer_t sweep;         /* obuf_sweep() of live records' logs, while any is live */
    int devnull;
    void *stack;              /* clone child stack, PROC_STACK_SIZE + guard page */
    void *stacks[PROC_ASYNC_MAX]; /* free asynchronous-spawn stacks */
    unsigned nstacks;
    struct proc_spawn_job *jobs[PROC_ASYNC_MAX]; /* free asynchronous-spawn jobs */
    unsigned njobs;
    struct list pending;      /* proc_start_async() spawns not yet exec'd (struct proc_pending) */
    unsigned n_pending;
    int spawn_ep;             /* epoll set of their exec-status pipes, or -1: no async starts */
    uv_poll_t spawn_poll;     /* on spawn_ep */
    uint64_t total_retained;
    struct proc_cgroups cg;
    int handles;              /* every open handle (table's and records') */
    bool shutting_down;
    bool shutdown_killed;     /* the KILL stage of shutdown ran */
    bool shutdown_expired;    /* gave up waiting for lingering dirs */
    bool done_called;
    void (*done_cb)(void *arg);
    void *done_arg;
    bool freeing;
};

/* A table-owned handle was closed (counts toward freeing the table). */
void proc__table_handle_closed(struct proc_table *t);
/* Shutdown may be complete (called when lingering dirs disappear). */
void proc__check_shutdown(struct proc_table *t);

#endif
