/* Owns the resolution of libzmq's calls from the copy loaded in the process
 * (include/mg_zmq.h). */
#include <dlfcn.h>
#include <stdatomic.h>
#include <string.h>

#include "mg_zmq.h"

mg_zmq_api_t mg_zmq;

/* Written (release) once every pointer of mg_zmq is set; read (acquire) by anyone. */
static _Atomic int s_loaded = 0;

static void *zmq_sym(void *handle, const char *name, int *missing)
{
    void *p = dlsym(handle, name);

    if (p == NULL)
        *missing = 1;
    return p;
}

int mg_zmq_load(const char *path, const char **why)
{
    void *h = RTLD_DEFAULT;
    mg_zmq_api_t api;
    int missing = 0;
    int major = 0, minor = 0, patch = 0;

    if (atomic_load_explicit(&s_loaded, memory_order_acquire))
        return 0;
    if (path != NULL) {
        /* Already loaded (pyzmq's extension): take that copy, do not map another. The
         * handle is kept for the life of the process: the calls must stay mapped. */
        h = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
        if (h == NULL)
            h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (h == NULL) {
            *why = "libzmq: the library could not be opened";
            return -1;
        }
    }
    memset(&api, 0, sizeof(api));
    *(void **)&api.ctx_new = zmq_sym(h, "zmq_ctx_new", &missing);
    *(void **)&api.ctx_term = zmq_sym(h, "zmq_ctx_term", &missing);
    *(void **)&api.socket = zmq_sym(h, "zmq_socket", &missing);
    *(void **)&api.close = zmq_sym(h, "zmq_close", &missing);
    *(void **)&api.setsockopt = zmq_sym(h, "zmq_setsockopt", &missing);
    *(void **)&api.connect = zmq_sym(h, "zmq_connect", &missing);
    *(void **)&api.send = zmq_sym(h, "zmq_send", &missing);
    *(void **)&api.errno_ = zmq_sym(h, "zmq_errno", &missing);
    *(void **)&api.version = zmq_sym(h, "zmq_version", &missing);
    if (missing) {
        *why = "libzmq: zmq_* symbols not found (is pyzmq's libzmq loaded?)";
        return -1;
    }
    api.version(&major, &minor, &patch);
    if (major < 4) {
        *why = "libzmq 4 or newer is required";
        return -1;
    }
    mg_zmq = api;
    atomic_store_explicit(&s_loaded, 1, memory_order_release);
    return 0;
}

int mg_zmq_loaded(void)
{
    return atomic_load_explicit(&s_loaded, memory_order_acquire);
}
