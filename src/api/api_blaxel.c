/*
 * Blaxel sandbox-api's /process endpoints (issue 4). Not served yet: the router claims no
 * path, so /process... answers 404 from api_handle.
 */
#include "api/api.h"

bool api_blaxel_route(struct app *app, struct http_req *r)
{
    (void)app;
    (void)r;
    return false;
}
