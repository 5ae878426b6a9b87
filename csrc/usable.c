/* Owns mg_usable_header: whether the hooks may read glibc's chunk header for a block's
 * usable size (include/mg_usable.h). */
#include "mg_usable.h"
#include "mg_elf.h"

#include <dlfcn.h>
#include <stdlib.h>

#if MG_USABLE_HEADER
#include <gnu/libc-version.h>
#endif

/* Written by mg_usable_init only (module init, GIL held); read relaxed by the hooks in any
 * thread (include/mg_usable.h says why any value read is safe). */
atomic_int mg_usable_header = 0;

#if MG_USABLE_HEADER
/* The load address of the object that defines the process's `name` (the definition the
 * hooks' PLT calls reach, past a non-PIE program's canonical PLT entry: mg_elf_definition),
 * or NULL. */
static void *definer(const char *name)
{
    void *alias;
    void *addr = mg_elf_definition(name, &alias);
    Dl_info info;

    if (addr == NULL || !dladdr(addr, &info))
        return NULL;
    return info.dli_fbase;
}

/* 1 when the header read of p equals malloc_usable_size(p) (p may be NULL: a failed probe
 * allocation proves nothing and is skipped). Frees p. */
static int agrees(void *p)
{
    int ok;

    if (p == NULL)
        return 1;
    ok = malloc_usable_size(p) == mg_usable_from_header(p);
    free(p);
    return ok;
}

/* glibc's figures for blocks of 1, 25 and 100 bytes (chunks of 32, 48 and 112 bytes less
 * the size field): 24, 40, 104. Other allocators give the request itself (ASan, valgrind)
 * or their size classes (jemalloc, mimalloc: 8, 32, 112): checked before any header is
 * read, as under valgrind, which redirects glibc's malloc so that dlsym still finds glibc's,
 * the read would fall outside the block. */
static int glibc_sizes(void)
{
    static const size_t want[][2] = {{1, 24}, {25, 40}, {100, 104}};

    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        void *p = malloc(want[i][0]);
        size_t got = p != NULL ? malloc_usable_size(p) : 0;

        free(p);
        if (got != want[i][1])
            return 0;
    }
    return 1;
}

static int probe(void)
{
    static const size_t sizes[] = {0,    1,     7,      8,        9,        15,
                                   16,   17,    23,     24,       25,       100,
                                   1000, 1024,  4095,   4096,     65536,    131072,
                                   1 << 20,     40 << 20};

    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        size_t n = sizes[i];
        void *aligned = NULL;
        void *grown = malloc(n / 2 + 1);
        void *moved = grown != NULL ? realloc(grown, n + 1) : NULL;

        if (moved == NULL)
            free(grown);
        if (posix_memalign(&aligned, 64, n) != 0)
            aligned = NULL;
        /* & rather than &&: each block is freed even after a disagreement */
        if (!(agrees(malloc(n)) & agrees(calloc(1, n)) & agrees(aligned) & agrees(moved)))
            return 0;
    }
    return 1;
}
#endif

int mg_usable_init(void)
{
#if MG_USABLE_HEADER
    static int decided = 0;
    void *libc;

    if (decided)
        return atomic_load_explicit(&mg_usable_header, memory_order_relaxed);
    decided = 1;
    libc = definer("gnu_get_libc_version");
    if (libc != NULL && definer("malloc") == libc && definer("free") == libc &&
        definer("calloc") == libc && definer("realloc") == libc &&
        definer("posix_memalign") == libc && definer("malloc_usable_size") == libc &&
        glibc_sizes() && probe())
        atomic_store_explicit(&mg_usable_header, 1, memory_order_relaxed);
#endif
    return atomic_load_explicit(&mg_usable_header, memory_order_relaxed);
}
