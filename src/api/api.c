/*
 * api.c: the request entry point (auth, CORS preflight, dialect dispatch) and the small
 * helpers both dialects share. Policy about what each route does lives in the dialect files.
 */
#include <errno.h>
#include <string.h>

#include "api/api.h"

static bool is_health(const struct http_req *r)
{
    return (r->nseg == 3 && strcmp(r->seg[0], "api") == 0 && strcmp(r->seg[1], "v1") == 0 &&
            strcmp(r->seg[2], "health") == 0) ||
           (r->nseg == 1 && strcmp(r->seg[0], "health") == 0);
}

/* Accepts "Authorization: Bearer <token>" (Tensorlake, Blaxel with headers) and
 * "X-Blaxel-Preview-Token: <token>" (Blaxel sessions). Compared in constant time. */
static bool authorized(const struct app *app, const struct http_req *r)
{
    const char *h = http_header(r, "authorization");
    if (h != NULL && strncasecmp(h, "bearer ", 7) == 0) {
        h += 7;
        while (*h == ' ')
            h++;
        if (ct_equal(h, strlen(h), app->token, app->token_len))
            return true;
    }
    h = http_header(r, "x-blaxel-preview-token");
    if (h != NULL && ct_equal(h, strlen(h), app->token, app->token_len))
        return true;
    return false;
}

void api_handle(struct http_req *r, void *arg)
{
    struct app *app = arg;

    log_debug("conn %llu: %s %s", (unsigned long long)r->conn_id, r->method_str, r->path);
    if (r->method == HTTP_M_OPTIONS) {
        http_reply(r, 204, NULL,
                   "Access-Control-Allow-Methods: GET, POST, PUT, DELETE, OPTIONS\r\n"
                   "Access-Control-Allow-Headers: *\r\n",
                   "", 0);
        return;
    }
    if (r->nseg < 0) {
        http_reply_error(r, 400, "BAD_PATH", "malformed request path");
        return;
    }
    if (app->token != NULL && !is_health(r) && !authorized(app, r)) {
        http_reply_error(r, 401, "UNAUTHORIZED", "missing or invalid bearer token");
        return;
    }
    if (api_tensorlake_route(app, r))
        return;
    if (api_blaxel_route(app, r))
        return;
    http_reply_error(r, 404, "NOT_FOUND", "no such route: %s", r->path);
}

json_t *api_parse_object(struct http_req *r, int shape_status)
{
    json_error_t jerr;
    json_t *root = json_loadb(r->body != NULL ? r->body : "", r->body_len, JSON_DECODE_ANY, &jerr);
    if (root == NULL) {
        http_reply_error(r, 400, "INVALID_JSON", "invalid JSON body: %s", jerr.text);
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        http_reply_error(r, shape_status, "INVALID_REQUEST", "the body must be a JSON object");
        return NULL;
    }
    return root;
}

void api_reply_spawn_error(struct http_req *r, int err, const char *msg)
{
    int status = 500;
    const char *code = "SPAWN_FAILED";

    switch (err) {
    case -ENOENT:
        status = 400;
        code = strstr(msg, "working directory") != NULL ? "WORKING_DIR_NOT_FOUND" : "COMMAND_NOT_FOUND";
        break;
    case -ENOTDIR:
        status = 400;
        code = "WORKING_DIR_NOT_FOUND";
        break;
    case -EACCES:
        status = 400;
        code = "PERMISSION_DENIED";
        break;
    case -EPERM:
        status = 403;
        code = "PERMISSION_DENIED";
        break;
    case -EAGAIN:
        status = 429;
        code = "TOO_MANY_PROCESSES";
        break;
    case -ENOEXEC:
        status = 400; /* the file is executable by its mode, but not a program */
        code = "EXEC_FORMAT_ERROR";
        break;
    default:
        break;
    }
    http_reply_error(r, status, code, "%s", msg);
}

int api_env_pairs(json_t *obj, const char ***ret_keys, const char ***ret_vals, size_t *ret_n)
{
    size_t n = json_object_size(obj), i = 0;
    const char **keys = xcalloc(n + 1, sizeof(*keys));
    const char **vals = xcalloc(n + 1, sizeof(*vals));
    const char *k;
    json_t *v;

    json_object_foreach(obj, k, v) {
        if (!json_is_string(v) || k[0] == '\0' || strchr(k, '=') != NULL) {
            free(keys);
            free(vals);
            return -EINVAL;
        }
        keys[i] = k;
        vals[i] = json_string_value(v);
        i++;
    }
    *ret_keys = keys;
    *ret_vals = vals;
    *ret_n = i;
    return 0;
}
