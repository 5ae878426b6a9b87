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

#include "mg_acct.h"
#include "mg_reentry.h"
#include "mg_hooks.h"

/* Copy of the handler we wrap (NumPy's default), taken before the default capsule is
 * pointed at s_handler. Written once by install (GIL held); read by the wrappers. Static
 * storage: arrays keep their handler for life, so this must never go away. */
static PyDataMem_Handler s_prev;
/* Written once by install (GIL held); read by anyone. */
static int s_installed = 0;

/* NumPy's default handler hands out malloc'd blocks (numpy/_core/src/multiarray/alloc.c),
 * so the malloc_usable_size rule of mg_hooks_after_alloc applies; it also absorbs NumPy's
 * free size drifting after a realloc (docs/design.md, NumPy NEP 49 handler). */
static void *np_malloc(void *ctx, size_t n)
{
    PyDataMemAllocator *prev = ctx;
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

static void *np_calloc(void *ctx, size_t nelem, size_t elsize)
{
    PyDataMemAllocator *prev = ctx;

    return mg_hooks_calloc(MG_DOMAIN_NUMPY, mg_hooks_refuse, prev->calloc, prev->ctx, nelem,
                           elsize);
}

static void *np_realloc(void *ctx, void *ptr, size_t n)
{
    PyDataMemAllocator *prev = ctx;

    return mg_hooks_realloc(MG_DOMAIN_NUMPY, mg_hooks_refuse, prev->realloc, prev->ctx, ptr, n);
}

static void np_free(void *ctx, void *ptr, size_t size)
{
    PyDataMemAllocator *prev = ctx;
    int was = mg_reentry_enter();

    mg_hooks_before_free(was, MG_DOMAIN_NUMPY, ptr);
    prev->free(prev->ctx, ptr, size);
    mg_reentry_leave(was);
}

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
