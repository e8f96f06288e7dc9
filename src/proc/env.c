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

static bool in_keys(const char *entry, const char *const *keys, size_t n)
{
    size_t el = strcspn(entry, "=");
    for (size_t i = 0; i < n; i++)
        if (strlen(keys[i]) == el && strncmp(entry, keys[i], el) == 0)
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

char **proc_env_build(const char *const *keys, const char *const *vals, size_t n,
                      const char *user, const char *home)
{
    size_t nenv = 0, len = 0;
    while (environ != NULL && environ[nenv] != NULL)
        nenv++;
    char **env = xcalloc(nenv + n + 4, sizeof(*env));
    bool set_ids = home != NULL;

    for (size_t i = 0; i < nenv; i++) {
        const char *e = environ[i];
        /* The daemon's own secret never reaches a workload, whoever forgot to unset it. */
        if (strchr(e, '=') == NULL || in_keys(e, keys, n) || key_is(e, "SANDBOXD_TOKEN"))
            continue;
        if (set_ids && (key_is(e, "HOME") || (user != NULL && (key_is(e, "USER") ||
                                                                 key_is(e, "LOGNAME")))))
            continue;
        env[len++] = xstrdup(e);
    }
    for (size_t i = 0; i < n; i++) {
        bool later = false;
        for (size_t j = i + 1; j < n && !later; j++)
            later = strcmp(keys[i], keys[j]) == 0;
        if (!later) /* the last of duplicate keys wins */
            env[len++] = xasprintf("%s=%s", keys[i], vals[i]);
    }
    if (set_ids) {
        if (!key_given("HOME", keys, n))
            env[len++] = xasprintf("HOME=%s", home);
        if (user != NULL && !key_given("USER", keys, n))
            env[len++] = xasprintf("USER=%s", user);
        if (user != NULL && !key_given("LOGNAME", keys, n))
            env[len++] = xasprintf("LOGNAME=%s", user);
    }
    env[len] = NULL;
    return env;
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
