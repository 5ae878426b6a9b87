/* libzmq reached through the copy already loaded in the process (csrc/zmqlib.c), so
 * memguard._core links no libzmq of its own: in a kernel that copy is pyzmq's (its wheels
 * bundle one), the monitor's socket can share pyzmq's context, and `inproc://` works
 * between the C monitor and the Python relay. The C unit tests link a real libzmq and
 * resolve it the same way.
 *
 * Only the calls and constants memguard uses are declared. The constants are libzmq's
 * stable ABI values (zmq.h of libzmq 4.x, unchanged since 3.2). */
#ifndef MEMGUARD_MG_ZMQ_H
#define MEMGUARD_MG_ZMQ_H

#include <stddef.h>

#define MG_ZMQ_PUSH 8
#define MG_ZMQ_LINGER 17
#define MG_ZMQ_SNDHWM 23
#define MG_ZMQ_DONTWAIT 1

typedef struct mg_zmq_api {
    void *(*ctx_new)(void);
    int (*ctx_term)(void *ctx);
    void *(*socket)(void *ctx, int type);
    int (*close)(void *sock);
    int (*setsockopt)(void *sock, int option, const void *value, size_t len);
    int (*connect)(void *sock, const char *endpoint);
    int (*send)(void *sock, const void *buf, size_t len, int flags);
    int (*errno_)(void);
    void (*version)(int *major, int *minor, int *patch);
} mg_zmq_api_t;

/* The resolved calls. Written by mg_zmq_load (GIL held, or the C tests' main thread)
 * before any socket exists; read by the monitor thread, which mg_monitor_start creates
 * after that write (pthread_create orders it). All NULL until mg_zmq_load succeeds. */
extern mg_zmq_api_t mg_zmq;

/* Resolve libzmq's calls. path names a shared object already loaded in the process (for
 * pyzmq, its backend extension: dlsym searches it and the libzmq it depends on), or a
 * library to load (e.g. "libzmq.so.5"); NULL searches the objects loaded globally (a
 * program linked with -lzmq). Requires libzmq 4 or newer. Idempotent once it succeeded.
 * Returns 0, or -1 with *why set to a static message (never freed). GIL held. */
int mg_zmq_load(const char *path, const char **why);

/* Non-zero once mg_zmq_load has succeeded. Any thread. */
int mg_zmq_loaded(void);

#endif /* MEMGUARD_MG_ZMQ_H */
