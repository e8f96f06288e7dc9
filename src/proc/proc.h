/*
 * proc: the process core every API dialect shares. Spawns, supervises, reaps, kills and
 * records processes; feeds their output into an obuf; tells watchers what happened.
 * Knows nothing of HTTP or JSON.
 *
 * One table (struct proc_table) holds every record, running or ended, addressed by handle
 * (1, 2, 3...), by OS pid (current run's or the first run's) and by name (newest wins).
 *
 * Spawning: clone(CLONE_VM) like posix_spawn (no fork of the daemon's memory); API starts do
 * not wait in the loop for the exec while other work is live (proc_start_async), restarts
 * and starts into an idle daemon do (CLONE_VFORK).
 * The child gets: its own session (setsid), default signal dispositions and an empty mask,
 * only fds 0-2 open, the requested cwd, uid/gid/groups, and membership of the process's own
 * cgroups (v2 for tree-kill through cgroup.kill, memory v1 or v2 for OOM detection) before
 * exec, so nothing it forks can escape them. Errors in the child (chdir, setuid, exec) are
 * reported back before any record exists: proc_start() fails, or proc_start_async()'s
 * callback gets the error.
 *
 * Reaping: the core owns SIGCHLD. The daemon is a child subreaper (or PID 1); every exited
 * child is waitpid()ed: statuses of our processes are routed to their records, orphans are
 * simply reaped. libuv's uv_spawn is never used, so libuv reaps nothing.
 *
 * Lifecycle of one run (state machine, transitions only in proc.c):
 *
 *   RUNNING --leader exits--> DRAINING --both pipes EOF, or grace--> (restart?) BACKOFF
 *      |                         |                                       |  --timer--> RUNNING
 *      +--stop()--> STOPPING ----+  (TERM sent to tree, KILL after grace)|
 *                                +-------------------------------------> DONE
 *
 * In DRAINING the leader's status is known; the core waits up to drain_grace_ms for both
 * pipes to hit EOF (a grandchild may hold them), then kills whatever is left of the tree
 * (when kill_tree_on_exit), reads what remains and finishes. PROC_EV_EXIT fires exactly once
 * per record, after every byte of output is in the obuf: watchers that read the obuf to its
 * end after PROC_EV_EXIT have seen everything.
 */
#ifndef SANDBOXD_PROC_H
#define SANDBOXD_PROC_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "obuf/obuf.h"
#include "util/util.h"

enum proc_stdin { PROC_STDIN_CLOSED = 0, PROC_STDIN_PIPE = 1 };

enum proc_state {
    PROC_RUNNING = 0,
    PROC_STOPPING,   /* stop requested: TERM sent, KILL timer armed */
    PROC_DRAINING,   /* leader reaped, waiting for pipe EOF (bounded) */
    PROC_BACKOFF,    /* failed, restart timer armed */
    PROC_DONE,       /* final; outcome fields are valid */
};

/* How the last run ended (valid once the leader was reaped). */
enum proc_outcome {
    PROC_OUT_NONE = 0,   /* still running */
    PROC_OUT_EXITED,     /* exit_code valid */
    PROC_OUT_SIGNALED,   /* term_signal valid */
    PROC_OUT_OOM,        /* OOM-killed (term_signal = 9) */
    PROC_OUT_UNKNOWN,    /* status could not be determined; never reported as 0 */
};

/* Why it ended, beyond the raw status. */
enum proc_cause {
    PROC_CAUSE_NONE = 0,   /* natural exit */
    PROC_CAUSE_TIMEOUT,    /* the daemon's timeout killed it */
    PROC_CAUSE_KILLED,     /* API kill (SIGKILL to the tree) */
    PROC_CAUSE_STOPPED,    /* API stop (TERM, then KILL after grace) */
    PROC_CAUSE_SHUTDOWN,   /* daemon shutting down */
};

enum proc_event {
    PROC_EV_OUTPUT = 1,  /* new records are in the obuf (coalesced: at most once per read batch) */
    PROC_EV_RESTART,     /* a new run started after a failure (pid changed) */
    PROC_EV_EXIT,        /* final: state is DONE, obuf sealed and complete */
    PROC_EV_STDIN,       /* stdin closed or its queue drained */
};

struct proc;
typedef void proc_event_cb(struct proc *p, enum proc_event ev, void *arg);

/* A watcher is embedded in the caller's object; add/del are O(1) and safe to call from inside
 * a callback (including deleting itself or another watcher). */
struct proc_watch {
    struct list link;
    proc_event_cb *cb;
    void *arg;
};

/* Everything proc_start() needs. The core deep-copies it; the caller keeps ownership, except
 * of an environment it hands over through env_give. */
struct proc_spec {
    const char *command;        /* as requested (display); also the file if file is NULL */
    const char *file;           /* executable to run; no '/' => looked up on env's PATH */
    char *const *argv;          /* full argv incl. argv[0], NULL-terminated */
    char *const *args;          /* display args (request's args, without argv[0]), NULL-term.; may be NULL */
    char *const *env;           /* complete environment, NULL-terminated (see proc_env_build) */
    char ***env_give;           /* optional: where the caller holds env, a vector of
                                 * proc_env_build(); a record that keeps env takes it from
                                 * there (sets *env_give to NULL) instead of copying it. The
                                 * caller frees what is left, as it would have. */
    const char *cwd;            /* NULL: the daemon's cwd */
    bool set_user;              /* switch to uid/gid/groups below (needs root) */
    uid_t uid;
    gid_t gid;
    const char *user_name;      /* for initgroups(); NULL: groups = {gid} */
    enum proc_stdin stdin_mode;
    bool capture_stdout;        /* false: /dev/null */
    bool capture_stderr;
    uint64_t timeout_ms;        /* 0: none. Expiry kills the whole tree (cause TIMEOUT) */
    bool kill_tree_on_exit;     /* kill leftovers of the tree when the leader has exited */
    /* supervision (Blaxel dialect) */
    const char *name;           /* NULL: none */
    bool restart_on_failure;
    int max_restarts;           /* < 0: unlimited */
    uint32_t backoff_initial_ms;/* 0: default 1000 */
    uint32_t backoff_max_ms;    /* 0: default 30000 */
    bool keep_alive;            /* reported only */
    int dialect;                /* which API created it (opaque to the core) */
    const char *cwd_display;    /* as requested, for display; NULL: "" */
    uint64_t memory_limit;      /* bytes; 0: none. Set on the run's memory cgroup (v1
                                 * memory.limit_in_bytes or v2 memory.max, swap off); ignored
                                 * without a memory cgroup */
};

/* A record. Fields above the "private" line are read-only for api/. */
struct proc {
    uint64_t handle;
    pid_t pid;                  /* current (or last) run's OS pid */
    pid_t first_pid;            /* first run's pid (Blaxel's stable pid) */
    char *name;                 /* may be NULL */
    char *command;
    char **args;                /* NULL-terminated, never NULL */
    char *cwd_display;
    int dialect;
    enum proc_state state;
    enum proc_outcome outcome;
    enum proc_cause cause;
    int exit_code;              /* PROC_OUT_EXITED */
    int term_signal;            /* PROC_OUT_SIGNALED / PROC_OUT_OOM */
    bool core_dumped;
    int64_t created_ms;         /* first start, ms since epoch */
    int64_t started_ms;         /* start of the current/last run */
    int64_t ended_ms;           /* end of the last run; 0 while running */
    bool stdin_pipe;            /* stdin_mode was pipe */
    bool stdin_open;            /* pipe and not yet closed and the process runs */
    bool keep_alive;
    bool restart_on_failure;
    int max_restarts;
    int restart_count;
    uint64_t timeout_ms;
    struct obuf *out;           /* never NULL */

    /* ---- private to proc/ ---- */
    struct proc_table *table;
    struct list link;           /* table order (oldest first) */
    struct list watchers;
    int refs;
    struct proc_priv *priv;     /* handles, pipes, timers, cgroup paths, copied spec */
};

struct proc_config {
    const char *state_dir;          /* output logs live in state_dir/out */
    uint64_t max_output_bytes;      /* per-process retained log budget (0 = unlimited) */
    uint64_t max_total_output_bytes;/* all processes together (0 = unlimited) */
    uint32_t drain_grace_ms;        /* after leader exit, wait this long for pipe EOF (2000) */
    uint32_t stop_grace_ms;         /* stop: TERM, then KILL after this (5000) */
    uint32_t max_procs;             /* running at once; beyond: -EAGAIN (1024) */
    uint32_t max_records;           /* ended records kept; oldest unreferenced evicted (10000) */
    bool use_cgroups;               /* try to create per-process cgroups */
};

struct proc_table;

/* Sets up the table: state dir (cleared of stale logs), SIGCHLD handling, subreaper status,
 * cgroup roots (if usable; otherwise process groups are used for tree kills). */
int proc_table_new(uv_loop_t *loop, const struct proc_config *cfg, struct proc_table **ret);

/* Graceful shutdown: TERM every running tree, KILL after stop_grace_ms, reap, then call
 * done_cb once nothing of ours is left alive. Removes the daemon's cgroups. */
void proc_table_shutdown(struct proc_table *t, void (*done_cb)(void *arg), void *arg);

/* Frees the table and every record (after shutdown completed). Handles are closed here; their
 * memory goes in the close callbacks, so run the loop once more before uv_loop_close(). */
void proc_table_free(struct proc_table *t);

/* Starts a process. On failure returns a negative errno and writes a human-readable reason
 * (e.g. "command not found: foo", "working directory does not exist: /x") into err; no record
 * exists then. Errors: -ENOENT (command or cwd missing), -EACCES, -ENOTDIR, -EPERM (user
 * switch without root), -EAGAIN (too many processes), -EMFILE, ... */
int proc_start(struct proc_table *t, const struct proc_spec *spec, struct proc **ret,
               char *err, size_t errlen);

/* Starts a process without waiting for its exec while anything else is live (a process, a
 * start in flight): the loop goes on while the child sets itself up. Fails at once like
 * proc_start() (negative errno, err filled, cb never called); else returns 0 and cb runs
 * exactly once: cb(arg, p, 0, NULL) when the process runs (its record then exists), or
 * cb(arg, NULL, rc, err) with proc_start()'s errors (no record). cb may run before
 * proc_start_async() returns. *pending (may be NULL) identifies a start still in flight
 * (NULL once cb ran): proc_start_cancel() then stops cb from running (the process, if exec
 * succeeds, runs and is recorded as usual). Until cb, nothing of the start is visible: no
 * handle, not listed, not found by pid or name (see proc_name_starting). */
struct proc_pending;
typedef void proc_started_cb(void *arg, struct proc *p, int rc, const char *err);
int proc_start_async(struct proc_table *t, const struct proc_spec *spec, proc_started_cb *cb,
                     void *arg, struct proc_pending **pending, char *err, size_t errlen);
void proc_start_cancel(struct proc_pending *pd);
/* A start in flight will carry this name. */
bool proc_name_starting(struct proc_table *t, const char *name);

struct proc *proc_by_handle(struct proc_table *t, uint64_t handle);
struct proc *proc_by_pid(struct proc_table *t, pid_t pid);       /* current or first pid */
struct proc *proc_by_name(struct proc_table *t, const char *name);/* newest with that name */
/* Iteration in creation order: for (p = proc_first(t); p; p = proc_next(p)) */
struct proc *proc_first(struct proc_table *t);
struct proc *proc_next(struct proc *p);
unsigned proc_count_running(struct proc_table *t);
unsigned proc_count_total(struct proc_table *t);

/* A record is not freed (evicted) while referenced. */
void proc_ref(struct proc *p);
void proc_unref(struct proc *p);

void proc_watch_add(struct proc *p, struct proc_watch *w, proc_event_cb *cb, void *arg);
void proc_watch_del(struct proc_watch *w);   /* no-op if not added */

/* True while the leader of the current run has not been reaped (RUNNING or STOPPING). */
bool proc_is_running(const struct proc *p);
/* True for RUNNING, STOPPING, DRAINING, BACKOFF: the record can still change. */
bool proc_is_live(const struct proc *p);

/* Sends sig to the leader only. -ESRCH if it is not running, -EINVAL for a bad signal. */
int proc_signal(struct proc *p, int sig);
/* SIGKILL to the whole tree (cgroup.kill, else the process group); cause KILLED; cancels any
 * pending restart. -ESRCH if nothing is live. */
int proc_kill(struct proc *p);
/* TERM to the whole tree, KILL after grace_ms (0: config default); cause STOPPED; cancels
 * restarts. Immediate if in BACKOFF. -ESRCH if nothing is live. */
int proc_stop(struct proc *p, uint32_t grace_ms);

/* Queues bytes for the child's stdin (copied; never blocks). -EPIPE if stdin is not writable
 * (closed mode, closed, or the process ended), -ENOBUFS if more than 1 MiB is queued. */
int proc_stdin_write(struct proc *p, const char *data, size_t n);
/* Closes stdin after the queued bytes are written. -EINVAL if stdin_mode was closed.
 * Closing twice is 0. */
int proc_stdin_close(struct proc *p);

/* Back-pressure from a live reader. While any hold is taken and the leader runs, the capture
 * pipes are not read: the child blocks in write(2) as on a slow terminal, and the log stops
 * growing past the reader. Only a RUNNING leader is held: once it exits or is being stopped,
 * the pipes are read dry regardless, so the drain of a finished tree is never held.
 * Every proc_hold must be paired with one proc_unhold. */
void proc_hold(struct proc *p);
void proc_unhold(struct proc *p);

/* Appends a daemon-made marker line to the output (OBUF_F_MARK) and notifies watchers. */
void proc_mark(struct proc *p, int stream, const char *text);

/* Ports (TCP listening or UDP bound, on a non-loopback address) held by any process of p's
 * tree. Fills ports (up to max), returns count or negative errno. */
int proc_tree_ports(struct proc *p, uint16_t *ports, int max);

/* Builds a NULL-terminated environment: the daemon's environ (without SANDBOXD_TOKEN) with
 * keys[i]=vals[i] set over it (n pairs; the last of duplicate keys wins), plus
 * HOME/USER/LOGNAME of pw_name/pw_dir when home != NULL and not given.
 * Returns a heap vector (free with proc_env_free). */
char **proc_env_build(const char *const *keys, const char *const *vals, size_t n,
                      const char *user, const char *home);
void proc_env_free(char **env);

/* Resolves a user for spec.set_user. name_or_uid: a user name or a decimal uid; gid_str may
 * be NULL (primary group of the user, or = uid if none). Fills uid/gid and, when the user
 * exists in the passwd db, its name and home (heap strings, caller frees). -ENOENT if the
 * name is unknown. */
struct proc_user {
    uid_t uid;
    gid_t gid;
    char *name;   /* NULL if not in passwd */
    char *home;   /* NULL if not in passwd */
};
int proc_user_lookup(const char *name_or_uid, const char *gid_str, struct proc_user *ret);
void proc_user_free(struct proc_user *u);

/* Human-readable names for status reporting. */
const char *proc_state_name(enum proc_state s);

#endif
