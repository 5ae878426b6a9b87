/* The usable size of a malloc'd block, as the allocator hooks measure every block on both
 * ends (csrc/usable.c). Entered from any thread, with or without the GIL.
 *
 * malloc_usable_size(3) is a call through the PLT into glibc, 12-13 instructions plus the
 * call for a small block: for sqlite's row-sized blocks, counted at both ends, a quarter of
 * what the native hooks add (bench/overhead.py --callgrind, sqlite_insert). When glibc's
 * malloc is the process's allocator, mg_usable_size reads the same chunk header glibc's
 * malloc_usable_size reads (glibc malloc/malloc.c, `musable` and `memsize`: the chunk's
 * size field, one word before the block, with its three flag bits masked; a block in a
 * heap chunk may also use the first word of the next chunk, SIZE_SZ bytes, an mmapped one
 * may not) and returns what glibc returns for a live block. Whether it may is decided once,
 * by mg_usable_init; otherwise, and on any other C library or allocator (musl, jemalloc
 * preloaded, a sanitizer's or valgrind's malloc, glibc's malloc-debug library), it calls
 * malloc_usable_size. */
#ifndef MEMGUARD_MG_USABLE_H
#define MEMGUARD_MG_USABLE_H

#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>

#include "memguard.h"

/* Compiled where glibc's chunk layout is the one described above with no memory tagging:
 * x86-64 glibc. Elsewhere mg_usable_size is malloc_usable_size. */
#if defined(__GLIBC__) && defined(__x86_64__)
#define MG_USABLE_HEADER 1
#else
#define MG_USABLE_HEADER 0
#endif

/* 1 when mg_usable_init found glibc's malloc below the hooks and the header read agreed
 * with malloc_usable_size on its probe blocks; 0 before and otherwise. Written by
 * mg_usable_init (module init, GIL held, before any hook is installed); read by the hooks
 * in any thread, relaxed: both ways give the same figure for a live block of glibc's
 * malloc, so a thread that read the old value counts alike. */
extern atomic_int mg_usable_header;

/* Decide mg_usable_header: glibc's malloc family and `malloc_usable_size` are the ones the
 * process uses (each resolves, as the hooks' PLT does, to the object that defines
 * gnu_get_libc_version; past a non-PIE program's canonical PLT entry to the definition
 * behind it, mg_elf_definition), malloc_usable_size gives glibc's figures for blocks of 1,
 * 25 and 100 bytes (so no header is read below another allocator), and the header read
 * equals malloc_usable_size for blocks of 0 B to 40 MiB from malloc, calloc, realloc and
 * posix_memalign (40 MiB is past glibc's largest dynamic mmap threshold, 32 MiB on 64-bit,
 * so an mmapped chunk is among them). Returns mg_usable_header. Called once at module
 * init (GIL held); idempotent; not hook-safe (it allocates). */
int mg_usable_init(void);

/* 1 when the process's malloc family is glibc's (mg_usable_header). The native hooks also
 * rely on it to call the real function without their reentrancy guard held: glibc's malloc,
 * calloc, realloc and free reach their helpers (mmap, munmap, mremap, sbrk, madvise) by
 * internal calls, never through a GOT memguard patches, so no hook can run inside them.
 * Hook-safe. */
MG_HOOKSAFE static inline int mg_usable_glibc(void)
{
#if MG_USABLE_HEADER
    return __builtin_expect(atomic_load_explicit(&mg_usable_header, memory_order_relaxed), 1);
#else
    return 0;
#endif
}

/* The usable bytes of p, a live block of glibc's malloc, read from its chunk header: only
 * where mg_usable_glibc() is 1. Hook-safe. */
MG_HOOKSAFE static inline size_t mg_usable_from_header(const void *p)
{
    size_t head = ((const size_t *)p)[-1];

    /* chunksize - CHUNK_HDR_SZ + SIZE_SZ in a heap chunk; - CHUNK_HDR_SZ when IS_MMAPPED
     * (bit 1, worth 2; shifted left twice it is the SIZE_SZ of 8). */
    return (head & ~(size_t)7) - sizeof(size_t) - ((head & 2) << 2);
}

/* The usable bytes of p, a live block of the process's malloc (not NULL). Hook-safe. */
MG_HOOKSAFE static inline size_t mg_usable_size(void *p)
{
    if (mg_usable_glibc())
        return mg_usable_from_header(p);
    return malloc_usable_size(p);
}

#endif /* MEMGUARD_MG_USABLE_H */
