/* GOT/PLT patching of loaded shared objects (csrc/elf_patch.c): find the relocation entries
 * (DT_JMPREL, DT_RELA) that bind a symbol of a given list, and point their GOT slots at
 * replacement functions; put the original values back later. No Python: the C tests link
 * it (tests/t-elf.c). docs/design.md, "Native memory". */
#ifndef MEMGUARD_MG_ELF_H
#define MEMGUARD_MG_ELF_H

#include <stddef.h>
#include <stdint.h>

/* Replacement variants per symbol, chosen per object by the caller's classify function
 * (csrc/hooks_native.c: 0 counts, 1 counts and may refuse, 2 counts as NumPy data). */
#define MG_ELF_VARIANTS 3
/* Symbols one patch set may name. */
#define MG_ELF_MAX_HOOKS 24
/* GOT slots the table can remember (patched and not yet restored). */
#define MG_ELF_MAX_SLOTS 16384
/* Objects named as not patchable (kept for status). */
#define MG_ELF_MAX_FAILED 16
#define MG_ELF_NAME_MAX 160

typedef struct mg_elf_hook {
    const char *name;                 /* the imported symbol, e.g. "malloc" */
    void *real;                       /* its definition in the global scope (dlsym) */
    void *wrapper[MG_ELF_VARIANTS];   /* what a slot of variant v gets; NULL: variant 0's,
                                       * and none (the slot is left alone) if that is NULL */
    void *alias;                      /* another address of the same definition, or NULL:
                                       * the canonical PLT entry of a program that is not
                                       * position-independent (below) */
} mg_elf_hook_t;
/* A program linked as ET_EXEC (not PIE) that takes a function's address gets a canonical
 * PLT entry for it: dlsym(RTLD_DEFAULT) and every GLOB_DAT slot give that entry, while
 * JUMP_SLOT slots hold the definition (Debian's /usr/bin/python3.11, measured 2026-12-02:
 * dlsym gave 0x41f610 for malloc, libc's is elsewhere). A slot holding either is patched,
 * and put back to what it held. */

/* The definition of `name` that calls bind to (what the dynamic linker finds), and in
 * *alias the canonical PLT entry that stands for it when the program is not
 * position-independent (above), else NULL. NULL when nothing defines it. Any thread; not
 * hook-safe (dlopen with RTLD_NOLOAD). */
void *mg_elf_definition(const char *name, void **alias);

/* Which variant an object's slots get: -1 skips the object (never patched), else 0 ..
 * MG_ELF_VARIANTS-1. path is dl_iterate_phdr's dlpi_name ("" for the main program). */
typedef int (*mg_elf_classify_fn)(const char *path);

typedef struct mg_elf_stats {
    int objects;        /* objects scanned in the last pass (skipped ones excluded) */
    int patched;        /* GOT slots holding a replacement now (table entries) */
    int failed;         /* objects not (fully) patchable so far, see mg_elf_failed */
    int table_full;     /* slots not patched because the table was full */
} mg_elf_stats_t;

/* Patch every loaded object not yet patched (or every one, when objects were unloaded since
 * the last pass): each GOT slot bound to a hook's symbol whose value is that symbol's
 * definition, or the object's own lazy-binding stub, gets the hook's wrapper for the
 * object's variant, with one aligned atomic store (RELRO pages are made writable for the
 * store and read-only again). Slots already holding a wrapper are left alone. self is any
 * address inside the calling object, which is never patched. Serialized by an internal
 * mutex; callable from any thread (the dlopen wrapper calls it). Returns the number of
 * slots patched by this call, -1 (errno EINVAL) for a bad hook list. */
int mg_elf_patch(const mg_elf_hook_t *hooks, int nhooks, mg_elf_classify_fn classify,
                 const void *self);

/* Put back every slot of a still-loaded object that holds one of the wrappers: its recorded
 * original when that is the real definition or inside the object itself, else the real
 * definition. Slots of objects unloaded since (dlclose) are forgotten, not touched. Returns
 * the number of slots restored. Any thread; same mutex. */
int mg_elf_unpatch(void);

void mg_elf_stats(mg_elf_stats_t *out);

/* Names of the objects memguard could not patch (a RELRO page it could not make writable,
 * a slot bound to another definition of the symbol), up to max; returns how many. Each
 * out[i] points to static storage valid until the next mg_elf_reset. */
int mg_elf_failed(const char **out, int max);

/* Forget the failure list and the scanned-object memory (tests; after mg_elf_unpatch). */
void mg_elf_reset(void);

#endif /* MEMGUARD_MG_ELF_H */
