/* Owns the NEP 49 data-memory handler "memguard" that wraps NumPy's default handler.
 * NumPy calls it from any thread that creates or frees arrays; install runs with the GIL. */
#include <Python.h>
#include <malloc.h>
#include <string.h>

#define NPY_NO_DEPRECATED_API NPY_1_22_API_VERSION
/* PyDataMem_SetHandler and friends exist since NumPy 1.22 (NEP 49); targeting that C-API
 * version lets one build run on NumPy 1.22 through 2.x. */
#define NPY_TARGET_VERSION NPY_1_22_API_VERSION
#include <numpy/arrayobject.h>

#include <stdatomic.h>

#include "mg_acct.h"
#include "mg_reentry.h"
#include "mg_hooks.h"
#include "mg_native.h"

/* Copy of the handler we wrap (NumPy's default), taken before the default capsule is
 * pointed at s_handler. Written once by install (GIL held); read by the wrappers. Static
 * storage: arrays keep their handler for life, so this must never go away. */
static PyDataMem_Handler s_prev;
/* Written once by install (GIL held); read by anyone. */
static int s_installed = 0;
/* 1 while the NumPy route is on (include/mg_native.h): NumPy's own malloc calls are counted
 * by the native wrappers, so outside raise mode the wrappers below pass calls through.
 * Written by mg_hooks_numpy_route (GIL held); read by the wrappers (relaxed: a call that
 * sees the old value counts as before, the switch is at install and uninstall). */
static _Atomic int s_route = 0;

/* Pass a call for n bytes through: the route is on, and the request is one that
 * mg_hooks_refuse would not judge (below MG_SMALL_REQUEST, outside raise mode), so nothing
 * but the counting, which the route does, is skipped. A free is passed with n = 0.
 * Hook-safe. */
static inline int routed(size_t n)
{
    return atomic_load_explicit(&s_route, memory_order_relaxed) && n < MG_SMALL_REQUEST &&
           !mg_acct_raise();
}

/* The counting path of each wrapper, out of line so that the routed pass-through stays a
 * bare tail call (no registers saved: objdump of np_free). NumPy's default handler hands
 * out malloc'd blocks (numpy/_core/src/multiarray/alloc.c), so the malloc_usable_size rule
 * of mg_hooks_after_alloc applies; it also absorbs NumPy's free size drifting after a
 * realloc (docs/design.md, NumPy NEP 49 handler). */
static __attribute__((noinline)) void *np_malloc_counted(PyDataMemAllocator *prev, size_t n)
{
    int was = mg_reentry_enter();
    void *p;

    if (mg_hooks_refuse(was, n)) {
        mg_reentry_leave(was);
        return NULL; /* raise mode: NumPy turns this into MemoryError */
    }
    p = prev->malloc(prev->ctx, n);

    mg_hooks_after_alloc(was, MG_DOMAIN_NUMPY, p);
    mg_reentry_leave(was);
    return p;
}

static __attribute__((noinline)) void np_free_counted(PyDataMemAllocator *prev, void *ptr,
                                                      size_t size)
{
    int was = mg_reentry_enter();

    mg_hooks_before_free(was, MG_DOMAIN_NUMPY, ptr);
    prev->free(prev->ctx, ptr, size);
    mg_reentry_leave(was);
}

static void *np_malloc(void *ctx, size_t n)
{
    PyDataMemAllocator *prev = ctx;

    if (routed(n))
        return prev->malloc(prev->ctx, n);
    return np_malloc_counted(prev, n);
}

static void *np_calloc(void *ctx, size_t nelem, size_t elsize)
{
    PyDataMemAllocator *prev = ctx;

    if (routed(elsize != 0 && nelem > SIZE_MAX / elsize ? SIZE_MAX : nelem * elsize))
        return prev->calloc(prev->ctx, nelem, elsize);
    return mg_hooks_calloc(MG_DOMAIN_NUMPY, mg_hooks_refuse, prev->calloc, prev->ctx, nelem,
                           elsize);
}

static void *np_realloc(void *ctx, void *ptr, size_t n)
{
    PyDataMemAllocator *prev = ctx;

    if (routed(n))
        return prev->realloc(prev->ctx, ptr, n);
    return mg_hooks_realloc(MG_DOMAIN_NUMPY, mg_hooks_refuse, prev->realloc, prev->ctx, ptr, n);
}

static void np_free(void *ctx, void *ptr, size_t size)
{
    PyDataMemAllocator *prev = ctx;

    if (routed(0))
        prev->free(prev->ctx, ptr, size);
    else
        np_free_counted(prev, ptr, size);
}

/* NumPy calls a handler's entries through the handler struct at every call
 * (PyDataMem_UserNEW and friends, numpy/_core/src/multiarray/alloc.c), so while the route
 * is on outside raise mode (mg_hooks_numpy_refresh) malloc, realloc and free are NumPy's
 * own default_malloc, default_realloc and default_free: a NumPy array then costs no call of
 * memguard's handler, and the route's wrappers count what reaches malloc (small_arrays,
 * bench/overhead.py --callgrind: the pass-through calls were a third of memguard's
 * instructions). calloc stays memguard's: NumPy's default_calloc releases the GIL before it
 * calls calloc, where a wrapper could no longer read the cell's line for a large block.
 * Written by mg_hooks_numpy_refresh with the GIL held; read by NumPy with the GIL held (its
 * default entries assert it: _npy_alloc_cache), so the GIL orders the two. Each store is a
 * relaxed atomic one, and any mix of old and new entries is still safe: ctx stays
 * &s_prev.allocator, which NumPy's default entries ignore (refresh checks the copy's own
 * ctx is NULL, as NumPy's default handler's is), and a block is counted once at each end
 * either way (by the handler's wrappers, which nest the route's, or by the route's). */
static PyDataMem_Handler s_handler = {
    "memguard", /* name, as numpy.core.multiarray.get_handler_name() reports it */
    1,          /* version: NEP 49 handler layout 1 */
    {
        &s_prev.allocator, /* ctx: the allocator we wrap */
        np_malloc,         /* counts malloc_usable_size after success */
        np_calloc,         /* same */
        np_realloc,        /* free(old) + alloc(new) on success */
        np_free,           /* counts before the real free; passes NumPy's size on */
    },
};

/* Whether the handler's entries are NumPy's own now (s_handler). GIL held. */
static int s_passing = 0;

void mg_hooks_numpy_refresh(void)
{
    int pass = s_installed && atomic_load_explicit(&s_route, memory_order_relaxed) &&
               !mg_acct_raise() && s_prev.allocator.ctx == NULL;

    if (pass == s_passing)
        return;
    __atomic_store_n(&s_handler.allocator.malloc, pass ? s_prev.allocator.malloc : np_malloc,
                     __ATOMIC_RELAXED);
    __atomic_store_n(&s_handler.allocator.realloc,
                     pass ? s_prev.allocator.realloc : np_realloc, __ATOMIC_RELAXED);
    __atomic_store_n(&s_handler.allocator.free, pass ? s_prev.allocator.free : np_free,
                     __ATOMIC_RELAXED);
    s_passing = pass;
}

int mg_hooks_numpy_passing(void)
{
    return s_passing;
}

int mg_hooks_numpy_install(void)
{
    PyObject *current;
    PyDataMem_Handler *def;
    int other;

    if (PyArray_API == NULL && _import_array() < 0)
        return -1;
    if (PyArray_GetNDArrayCFeatureVersion() < NPY_1_22_API_VERSION) {
        PyErr_SetString(PyExc_ImportError,
                        "memguard needs NumPy >= 1.22 for its NEP 49 data-memory handler");
        return -1;
    }
    if (!s_installed) {
        def = PyCapsule_GetPointer(PyDataMem_DefaultHandler, "mem_handler");
        if (def == NULL)
            return -1;
        if (def != &s_handler) {
            memcpy(&s_prev, def, sizeof(s_prev));
            if (PyCapsule_SetPointer(PyDataMem_DefaultHandler, &s_handler) < 0)
                return -1;
        }
        s_installed = 1;
    }
    current = PyDataMem_GetHandler();
    if (current == NULL)
        return -1;
    other = PyCapsule_GetPointer(current, "mem_handler") != (void *)&s_handler;
    Py_DECREF(current);
    if (other && PyErr_Occurred())
        return -1;
    return other;
}

/* Bytes of the probe's blocks: above the sizes NumPy's default handler serves from its
 * cache (NBUCKETS, 1024 in numpy/_core/src/multiarray/alloc.c), so each call reaches
 * malloc, calloc, realloc or free. */
#define PROBE_BYTES 4096

int mg_hooks_numpy_route(int on)
{
    const PyDataMemAllocator *a = &s_prev.allocator;
    unsigned bits;
    void *p;

    atomic_store_explicit(&s_route, 0, memory_order_relaxed);
    mg_hooks_numpy_refresh(); /* the handler's own entries again, before the probe */
    if (!on || !s_installed || !mg_native_installed())
        return 0;
    t_mg.probe = MG_PROBE_ARMED;
    p = a->malloc(a->ctx, PROBE_BYTES);
    if (p != NULL) {
        void *q = a->realloc(a->ctx, p, 2 * PROBE_BYTES);

        a->free(a->ctx, q != NULL ? q : p, q != NULL ? 2 * PROBE_BYTES : PROBE_BYTES);
    }
    p = a->calloc(a->ctx, 1, PROBE_BYTES);
    if (p != NULL)
        a->free(a->ctx, p, PROBE_BYTES);
    bits = t_mg.probe;
    t_mg.probe = 0;
    if (bits != MG_PROBE_ALL)
        return 0;
    atomic_store_explicit(&s_route, 1, memory_order_relaxed);
    mg_hooks_numpy_refresh();
    return 1;
}

int mg_hooks_numpy_routed(void)
{
    return atomic_load_explicit(&s_route, memory_order_relaxed);
}
