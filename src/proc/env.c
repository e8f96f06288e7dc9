/*
 * env: building a child's environment, resolving users, naming states. Plain libc, no
 * libuv, no records.
 */
#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "proc/proc_internal.h"

extern char **environ;

static bool key_is(const char *entry, const char *key)
{
    size_t kl = strlen(key);
    return strncmp(entry, key, kl) == 0 && entry[kl] == '=';
}

/* entry's key (its first klen bytes) is one of keys[0..n) */
static bool in_keys(const char *entry, size_t klen, const char *const *keys, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strlen(keys[i]) == klen && memcmp(entry, keys[i], klen) == 0)
            return true;
    return false;
}

static bool key_given(const char *key, const char *const *keys, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(keys[i], key) == 0)
            return true;
    return false;
}

static void put_var(struct strv_pack *pk, const char *key, const char *val)
{
    strv_pack_add(pk, key, strlen(key));
    strv_pack_add(pk, "=", 1);
    strv_pack_add(pk, val, strlen(val));
    strv_pack_end(pk);
}

/* The daemon's environ, measured once: every run's environment starts from it, and it does not
 * change while the daemon runs. It is checked at each build, pointer by pointer (setenv()
 * and unsetenv() replace or move pointers; they never rewrite the strings), and measured
 * again when it changed. */
enum { ENV_ID_HOME = 1, ENV_ID_USER };
struct env_var {
    const char *s;
    size_t len;     /* strlen(s) */
    size_t klen;    /* the key's length (bytes before '=') */
    int id;         /* ENV_ID_HOME, ENV_ID_USER (USER or LOGNAME), or 0 */
};
static struct {
    char **seen;            /* environ when measured */
    const char **ptrs;      /* its nptrs entries then */
    size_t nptrs;
    struct env_var *vars;   /* the entries a workload may get */
    size_t nvars;
    size_t bytes;           /* theirs, NULs included */
} base;

static bool base_current(void)
{
    if (environ != base.seen || base.ptrs == NULL)
        return false;
    for (size_t i = 0; i < base.nptrs; i++)
        if (environ[i] != base.ptrs[i])
            return false;
    return environ == NULL || environ[base.nptrs] == NULL;
}

static void base_measure(void)
{
    size_t n = 0;
    while (environ != NULL && environ[n] != NULL)
        n++;
    free(base.ptrs);
    free(base.vars);
    base.seen = environ;
    base.nptrs = n;
    base.ptrs = xcalloc(n + 1, sizeof(*base.ptrs));
    base.vars = xcalloc(n + 1, sizeof(*base.vars));
    base.nvars = base.bytes = 0;
    for (size_t i = 0; i < n; i++) {
        const char *e = environ[i];
        base.ptrs[i] = e;
        /* The daemon's own secret never reaches a workload, whoever forgot to unset it. */
        if (strchr(e, '=') == NULL || key_is(e, "SANDBOXD_TOKEN"))
            continue;
        struct env_var *v = &base.vars[base.nvars++];
        v->s = e;
        v->len = strlen(e);
        v->klen = strcspn(e, "=");
        base.bytes += v->len + 1;
        v->id = key_is(e, "HOME") ? ENV_ID_HOME
                : key_is(e, "USER") || key_is(e, "LOGNAME") ? ENV_ID_USER : 0;
    }
}

static void env_fill(struct strv_pack *pk, const char *const *keys, const char *const *vals,
                     size_t n, const char *user, const char *home)
{
    bool set_ids = home != NULL;

    for (size_t i = 0; i < base.nvars; i++) {
        const struct env_var *v = &base.vars[i];
        if (n > 0 && in_keys(v->s, v->klen, keys, n))
            continue;
        if (set_ids && (v->id == ENV_ID_HOME || (user != NULL && v->id == ENV_ID_USER)))
            continue;
        strv_pack_add(pk, v->s, v->len);
        strv_pack_end(pk);
    }
    for (size_t i = 0; i < n; i++) {
        bool later = false;
        for (size_t j = i + 1; j < n && !later; j++)
            later = strcmp(keys[i], keys[j]) == 0;
        if (!later) /* the last of duplicate keys wins */
            put_var(pk, keys[i], vals[i]);
    }
    if (set_ids) {
        if (!key_given("HOME", keys, n))
            put_var(pk, "HOME", home);
        if (user != NULL && !key_given("USER", keys, n))
            put_var(pk, "USER", user);
        if (user != NULL && !key_given("LOGNAME", keys, n))
            put_var(pk, "LOGNAME", user);
    }
}

/* One allocation (a packed vector, see strv_pack), not one per variable: a run's environment
 * is built, copied into its record and freed on every start. It is sized for everything that
 * may go in (what the request replaces is counted too), so it is filled in one pass. */
char **proc_env_build(const char *const *keys, const char *const *vals, size_t n,
                      const char *user, const char *home)
{
    struct strv_pack pk = {0};
    if (!base_current())
        base_measure();
    pk.n = base.nvars + n + 3;
    pk.bytes = base.bytes;
    for (size_t i = 0; i < n; i++)
        pk.bytes += strlen(keys[i]) + strlen(vals[i]) + 2;
    if (home != NULL)
        pk.bytes += strlen(home) + sizeof("HOME=");
    if (home != NULL && user != NULL)
        pk.bytes += 2 * strlen(user) + sizeof("USER=") + sizeof("LOGNAME=");
    strv_pack_alloc(&pk);
    env_fill(&pk, keys, vals, n, user, home);
    return strv_pack_done(&pk);
}

void proc_env_free(char **env)
{
    strv_free(env);
}

static int parse_id(const char *s, unsigned *ret)
{
    uint64_t v;
    if (!str_is_digits(s) || parse_u64(s, strlen(s), &v) < 0 || v >= (uint64_t)UINT32_MAX)
        return -EINVAL;
    *ret = (unsigned)v;
    return 0;
}

/* getpw*_r with a growing buffer. Returns 0 (found), -ENOENT or another -errno. */
static int lookup_pw(const char *name, uid_t uid, struct passwd *pw, char **buf)
{
    size_t cap = 1024;
    for (;;) {
        struct passwd *res = NULL;
        *buf = xrealloc(*buf, cap);
        int rc = name != NULL ? getpwnam_r(name, pw, *buf, cap, &res)
                              : getpwuid_r(uid, pw, *buf, cap, &res);
        if (rc == ERANGE && cap < (1u << 20)) {
            cap *= 2;
            continue;
        }
        if (rc != 0)
            return rc == ENOENT || rc == ESRCH ? -ENOENT : -rc;
        return res != NULL ? 0 : -ENOENT;
    }
}

static int getgr(const char *name, gid_t *ret)
{
    size_t cap = 1024;
    char *buf = NULL;
    for (;;) {
        struct group gr, *res = NULL;
        buf = xrealloc(buf, cap);
        int rc = getgrnam_r(name, &gr, buf, cap, &res);
        if (rc == ERANGE && cap < (1u << 20)) {
            cap *= 2;
            continue;
        }
        if (rc == 0 && res != NULL)
            *ret = gr.gr_gid;
        free(buf);
        return rc == 0 && res != NULL ? 0 : -ENOENT;
    }
}

int proc_user_lookup(const char *name_or_uid, const char *gid_str, struct proc_user *ret)
{
    struct passwd pw;
    char *buf = NULL;
    struct proc_user u = {0};
    unsigned id;
    int rc;

    if (name_or_uid == NULL || name_or_uid[0] == '\0')
        return -EINVAL;
    if (str_is_digits(name_or_uid)) {
        if ((rc = parse_id(name_or_uid, &id)) < 0)
            return rc;
        u.uid = (uid_t)id;
        u.gid = (gid_t)id;
        rc = lookup_pw(NULL, u.uid, &pw, &buf);
    } else {
        rc = lookup_pw(name_or_uid, 0, &pw, &buf);
        if (rc < 0) {
            free(buf);
            return rc;
        }
    }
    if (rc == 0) {
        u.uid = pw.pw_uid;
        u.gid = pw.pw_gid;
        u.name = xstrdup(pw.pw_name);
        u.home = xstrdup(pw.pw_dir);
    }
    free(buf);
    if (gid_str != NULL && gid_str[0] != '\0') {
        if (str_is_digits(gid_str)) {
            rc = parse_id(gid_str, &id);
            if (rc == 0)
                u.gid = (gid_t)id;
        } else {
            rc = getgr(gid_str, &u.gid);
        }
        if (rc < 0) {
            proc_user_free(&u);
            return rc;
        }
    }
    *ret = u;
    return 0;
}

void proc_user_free(struct proc_user *u)
{
    if (u == NULL)
        return;
    free(u->name);
    free(u->home);
    u->name = u->home = NULL;
}

const char *proc_state_name(enum proc_state s)
{
    switch (s) {
    case PROC_RUNNING:
        return "running";
    case PROC_STOPPING:
        return "stopping";
    case PROC_DRAINING:
        return "draining";
    case PROC_BACKOFF:
        return "backoff";
    case PROC_DONE:
        return "done";
    }
    return "unknown";
}
