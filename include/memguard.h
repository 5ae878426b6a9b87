/* memguard public C API: version, return-code conventions and the MG_HOOKSAFE marker.
 * Included by every unit; safe to include from any thread. */
#ifndef MEMGUARD_MEMGUARD_H
#define MEMGUARD_MEMGUARD_H

#include <stdint.h>

/* The package version, passed by setup.py from memguard.__version__ (the one place it is
 * written); the C tests, built without it, say "dev". */
#ifndef MG_VERSION
#define MG_VERSION "dev"
#endif

/* Marks, in headers, the functions an allocator hook may call: no Py* API, no lock, no
 * malloc, no stdio, no zmq. Reviewers reject any other call made from hooks_*.c
 * (docs/design.md, Hook safety). It expands to nothing. */
#define MG_HOOKSAFE

/* Marks the out-of-line part of a hook (a rare path: a block of at least the attribution
 * threshold, a full batch, raise mode's judgement), so that the inline common path keeps
 * few registers live and saves few on entry (objdump of np_malloc: six pushes when the
 * compiler inlined the raise-mode path into it). */
#define MG_SLOWPATH __attribute__((noinline, cold))

/* Thread-local storage read on every allocation (the hooks' reentrancy flag and batches),
 * in the initial-exec model: one %fs-relative access instead of a call through a TLS
 * descriptor, which was a tenth of the NumPy hook's instructions (bench/overhead.py
 * --callgrind, small_arrays). A module loaded by dlopen, as this one is, takes such
 * variables from the static TLS surplus glibc keeps for it (glibc.rtld.optional_static_tls,
 * 512 bytes by default since glibc 2.32; memguard uses 64: the hooks' block t_mg in
 * include/mg_reentry.h, a probe flag and the batches' generation). */
#define MG_TLS _Thread_local __attribute__((tls_model("initial-exec")))

/* Return codes of the engine functions (mg_ring_*, mg_acct_*, mg_monitor_*): 0 on success,
 * -1 on failure with errno set; each header documents the errno values it uses. Engine
 * functions never touch Python; csrc/module.c converts -1 with PyErr_SetFromErrno. */
#define MG_OK 0
#define MG_ERR (-1)

/* Allocator domains memguard counts. */
typedef enum mg_domain {
    MG_DOMAIN_RAW = 0,   /* PyMem RAW domain (malloc-backed; pymalloc's > 512 B blocks) */
    MG_DOMAIN_ARENA = 1, /* pymalloc arenas (1 MiB in CPython 3.11; 256 KiB before 3.10) */
    MG_DOMAIN_NUMPY = 2, /* NumPy array data: the NEP 49 handler "memguard", or NumPy's own
                          * malloc calls (mg_native.h, the NumPy route) */
    MG_DOMAIN_NATIVE = 3, /* native code's malloc family and anonymous mmap (hooks_native.c) */
    MG_DOMAIN_COUNT = 4
} mg_domain_t;

/* Kinds of events and wire records; the numbers are part of the wire format (mg_monitor.h). */
typedef enum mg_kind {
    MG_KIND_BUDGET = 1,      /* the cell's usage crossed its budget */
    MG_KIND_BUDGET_GROW = 2, /* an alerted cell's peak grew by >= MG_GROW_STEP since last record */
    MG_KIND_ACCUMULATION = 3,      /* a site met the accumulation rule (mg_sites.h) */
    MG_KIND_ACCUMULATION_GROW = 4, /* an alerted site grew by >= MG_GROW_STEP since its last */
    MG_KIND_BUDGET_RSS = 5,        /* the cell's RSS growth crossed its budget first (mg_measures.h) */
    MG_KIND_REFUSED = 6,           /* raise mode: an allocation was refused (count = reason) */
    MG_KIND_LIMIT = 7,             /* the limit's measure passed its alert fraction (monitor) */
    MG_KIND_LIMIT_REQUEST = 8,     /* one allocation asked for more than is left under the limit */
} mg_kind_t;

/* Why raise mode refused an allocation (MG_KIND_REFUSED's count, mg_acct_refusal). */
typedef enum mg_refusal {
    MG_REFUSE_NONE = 0,
    MG_REFUSE_BUDGET = 1, /* the cell's usage plus the request exceeds its budget */
    MG_REFUSE_LIMIT = 2,  /* the limit's measure plus the request exceeds the limit */
} mg_refusal_t;

#endif /* MEMGUARD_MEMGUARD_H */
