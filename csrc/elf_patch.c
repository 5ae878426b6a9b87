/* Owns the GOT/PLT patching of loaded shared objects (include/mg_elf.h): the table of
 * patched slots and their original values, the set of objects already scanned and the list
 * of objects that could not be patched. Called with the GIL (install/uninstall) and from the
 * dlopen wrapper in any thread; everything here runs under s_lock. The approach is Memray's
 * (bloomberg/memray src/memray/_memray/elf_shenanigans.cpp): dl_iterate_phdr, each object's
 * PT_DYNAMIC, the JMPREL and RELA tables, symbol names through DT_SYMTAB/DT_STRTAB. */
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <link.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mg_elf.h"

#if defined(__x86_64__)
#define MG_R_JUMP_SLOT R_X86_64_JUMP_SLOT
#define MG_R_GLOB_DAT R_X86_64_GLOB_DAT
#elif defined(__aarch64__)
#define MG_R_JUMP_SLOT R_AARCH64_JUMP_SLOT
#define MG_R_GLOB_DAT R_AARCH64_GLOB_DAT
#else
#error "memguard's native hooks support x86-64 and aarch64 (64-bit ELF, RELA)"
#endif

typedef struct slot_rec {
    uintptr_t *slot;        /* the GOT slot */
    uintptr_t original;     /* its value before we patched it */
    uintptr_t replacement;  /* the wrapper we stored */
    uintptr_t obj_lo;       /* the object's lowest mapped address then */
    int hook;               /* index into the hook list */
} slot_rec_t;

#define MAX_SEEN 4096

/* All of the below: written and read under s_lock only. */
static pthread_mutex_t s_lock = PTHREAD_MUTEX_INITIALIZER;
static slot_rec_t s_slots[MG_ELF_MAX_SLOTS];
static int s_nslots = 0;
static const mg_elf_hook_t *s_hooks = NULL; /* the list of the last mg_elf_patch */
static int s_nhooks = 0;
/* Objects scanned (their dlpi_phdr), and the loader's counters at the last pass: no new
 * object and none removed means nothing to scan. */
static const void *s_seen[MAX_SEEN];
static int s_nseen = 0;
static unsigned long long s_adds = 0;
static unsigned long long s_subs = 0;
static int s_have_counts = 0;
static char s_failed[MG_ELF_MAX_FAILED][MG_ELF_NAME_MAX];
static int s_nfailed = 0;
static int s_objects = 0;
static int s_table_full = 0;

typedef struct pass {
    const mg_elf_hook_t *hooks;
    int nhooks;
    mg_elf_classify_fn classify;
    uintptr_t self;
    int patched;     /* slots patched by this pass */
    int restore;     /* 1: mg_elf_unpatch's pass */
    char *done;      /* restore pass: table entries settled */
} pass_t;

typedef struct object {
    const char *name;
    uintptr_t base;
    uintptr_t lo, hi;
    uintptr_t relro_lo, relro_hi;
    const ElfW(Dyn) *dyn;
} object_t;

static void note_failed(const char *name)
{
    if (name == NULL || name[0] == '\0')
        name = "(main program)";
    for (int i = 0; i < s_nfailed; i++)
        if (strncmp(s_failed[i], name, MG_ELF_NAME_MAX - 1) == 0)
            return;
    if (s_nfailed < MG_ELF_MAX_FAILED) {
        strncpy(s_failed[s_nfailed], name, MG_ELF_NAME_MAX - 1);
        s_failed[s_nfailed][MG_ELF_NAME_MAX - 1] = '\0';
        s_nfailed++;
    }
}

static int seen(const void *key)
{
    for (int i = 0; i < s_nseen; i++)
        if (s_seen[i] == key)
            return 1;
    return 0;
}

static void mark_seen(const void *key)
{
    if (s_nseen < MAX_SEEN)
        s_seen[s_nseen++] = key;
}

/* glibc rewrites the dynamic section's pointers to run-time addresses; musl leaves them as
 * offsets from the load base (Memray does the same test). */
static uintptr_t dyn_addr(const object_t *o, ElfW(Addr) v)
{
    return (o->base != 0 && v < o->base) ? o->base + v : v;
}

static int find_hook(const pass_t *p, const char *name)
{
    for (int h = 0; h < p->nhooks; h++)
        if (p->hooks[h].name[0] == name[0] && strcmp(p->hooks[h].name, name) == 0)
            return h;
    return -1;
}

static int is_wrapper(const mg_elf_hook_t *hk, uintptr_t v)
{
    for (int k = 0; k < MG_ELF_VARIANTS; k++)
        if (hk->wrapper[k] != NULL && (uintptr_t)hk->wrapper[k] == v)
            return 1;
    return 0;
}

/* One aligned atomic store (GOT slots are pointer-aligned), so a thread calling through
 * the slot meanwhile jumps to either the old or the new function. RELRO pages are made
 * writable around the store. Returns 0, or -1 when the page could not be made writable. */
static int write_slot(const object_t *o, uintptr_t *slot, uintptr_t value)
{
    uintptr_t a = (uintptr_t)slot;
    int relro = a >= o->relro_lo && a < o->relro_hi;
    long pagesz = sysconf(_SC_PAGESIZE);
    void *page = (void *)(a & ~((uintptr_t)pagesz - 1));

    if (relro && mprotect(page, (size_t)pagesz, PROT_READ | PROT_WRITE) != 0)
        return -1;
    __atomic_store_n(slot, value, __ATOMIC_RELEASE);
    if (relro)
        (void)mprotect(page, (size_t)pagesz, PROT_READ);
    return 0;
}

static void patch_entry(pass_t *p, const object_t *o, int variant, uintptr_t *slot, int h)
{
    const mg_elf_hook_t *hk = &p->hooks[h];
    uintptr_t cur = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    uintptr_t w = (uintptr_t)(hk->wrapper[variant] ? hk->wrapper[variant] : hk->wrapper[0]);

    if (hk->real == NULL || w == 0 || is_wrapper(hk, cur))
        return; /* this libc lacks the symbol, no wrapper for this variant, or patched */
    /* Bound to the definition we call through, or not bound yet (a lazy PLT stub inside the
     * object, which would bind to that same definition). Anything else is another
     * definition of the symbol (an allocator linked into the process some other way):
     * calling ours instead would mix allocators, so the object is named, not patched. */
    if (cur != (uintptr_t)hk->real && !(hk->alias != NULL && cur == (uintptr_t)hk->alias) &&
        !(cur >= o->lo && cur < o->hi)) {
        note_failed(o->name);
        return;
    }
    if (s_nslots >= MG_ELF_MAX_SLOTS) {
        s_table_full++;
        return;
    }
    if (write_slot(o, slot, w) != 0) {
        note_failed(o->name);
        return;
    }
    s_slots[s_nslots].slot = slot;
    s_slots[s_nslots].original = cur;
    s_slots[s_nslots].replacement = w;
    s_slots[s_nslots].obj_lo = o->lo;
    s_slots[s_nslots].hook = h;
    s_nslots++;
    p->patched++;
}

static void scan_table(pass_t *p, const object_t *o, int variant, uintptr_t table, size_t size,
                       size_t ent, const ElfW(Sym) *symtab, const char *strtab, size_t strsz)
{
    if (table == 0 || size == 0 || ent == 0)
        return;
    for (size_t off = 0; off + ent <= size; off += ent) {
        const ElfW(Rela) *r = (const ElfW(Rela) *)(table + off);
        unsigned type = (unsigned)ELF64_R_TYPE(r->r_info);
        size_t symi = (size_t)ELF64_R_SYM(r->r_info);
        const ElfW(Sym) *sym;
        int h;

        if ((type != MG_R_JUMP_SLOT && type != MG_R_GLOB_DAT) || symi == 0)
            continue;
        sym = &symtab[symi];
        if (sym->st_shndx != SHN_UNDEF || sym->st_name >= strsz)
            continue; /* the object defines it itself */
        h = find_hook(p, strtab + sym->st_name);
        if (h >= 0)
            patch_entry(p, o, variant, (uintptr_t *)(o->base + r->r_offset), h);
    }
}

static void restore_object(pass_t *p, const object_t *o)
{
    for (int i = 0; i < s_nslots; i++) {
        slot_rec_t *e = &s_slots[i];
        uintptr_t a = (uintptr_t)e->slot;
        uintptr_t back;

        if (p->done[i] || e->obj_lo != o->lo || a < o->lo || a >= o->hi)
            continue;
        p->done[i] = 1;
        if (__atomic_load_n(e->slot, __ATOMIC_ACQUIRE) != e->replacement)
            continue; /* someone else rewrote it since: leave theirs */
        back = e->original;
        if (back != (uintptr_t)s_hooks[e->hook].real &&
            !(s_hooks[e->hook].alias != NULL && back == (uintptr_t)s_hooks[e->hook].alias) &&
            !(back >= o->lo && back < o->hi))
            back = (uintptr_t)s_hooks[e->hook].real;
        if (write_slot(o, e->slot, back) == 0)
            p->patched++;
    }
}

static int is_loader_or_libc(const char *name)
{
    const char *base = strrchr(name, '/');

    base = base ? base + 1 : name;
    return strncmp(base, "libc.so", 7) == 0 || strncmp(base, "ld-linux", 8) == 0 ||
           strncmp(base, "ld-musl", 7) == 0 || strncmp(base, "libc.musl", 9) == 0 ||
           strncmp(base, "linux-vdso", 10) == 0 || strncmp(base, "linux-gate", 10) == 0 ||
           strncmp(base, "ld64.so", 7) == 0;
}

static int on_object(struct dl_phdr_info *info, size_t size, void *arg)
{
    pass_t *p = arg;
    object_t o;
    uintptr_t symtab = 0, strtab = 0, jmprel = 0, rela = 0;
    size_t strsz = 0, pltrelsz = 0, relasz = 0, relaent = sizeof(ElfW(Rela));
    long pltrel = DT_RELA;
    int variant = 0;

    (void)size;
    memset(&o, 0, sizeof(o));
    o.name = info->dlpi_name ? info->dlpi_name : "";
    o.base = (uintptr_t)info->dlpi_addr;
    o.lo = UINTPTR_MAX;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        uintptr_t start = o.base + ph->p_vaddr;

        if (ph->p_type == PT_LOAD) {
            if (start < o.lo)
                o.lo = start;
            if (start + ph->p_memsz > o.hi)
                o.hi = start + ph->p_memsz;
        } else if (ph->p_type == PT_DYNAMIC) {
            o.dyn = (const ElfW(Dyn) *)start;
        } else if (ph->p_type == PT_GNU_RELRO) {
            o.relro_lo = start;
            o.relro_hi = start + ph->p_memsz;
        }
    }
    if (o.dyn == NULL || o.lo >= o.hi)
        return 0;
    if (p->restore) {
        restore_object(p, &o);
        return 0;
    }
    if (seen(info->dlpi_phdr))
        return 0;
    mark_seen(info->dlpi_phdr);
    if ((p->self >= o.lo && p->self < o.hi) || is_loader_or_libc(o.name))
        return 0;
    variant = p->classify ? p->classify(o.name) : 0;
    if (variant < 0 || variant >= MG_ELF_VARIANTS)
        return 0;
    s_objects++;
    for (const ElfW(Dyn) *d = o.dyn; d->d_tag != DT_NULL; d++) {
        switch (d->d_tag) {
        case DT_SYMTAB: symtab = dyn_addr(&o, d->d_un.d_ptr); break;
        case DT_STRTAB: strtab = dyn_addr(&o, d->d_un.d_ptr); break;
        case DT_STRSZ: strsz = d->d_un.d_val; break;
        case DT_JMPREL: jmprel = dyn_addr(&o, d->d_un.d_ptr); break;
        case DT_PLTRELSZ: pltrelsz = d->d_un.d_val; break;
        case DT_PLTREL: pltrel = (long)d->d_un.d_val; break;
        case DT_RELA: rela = dyn_addr(&o, d->d_un.d_ptr); break;
        case DT_RELASZ: relasz = d->d_un.d_val; break;
        case DT_RELAENT: relaent = d->d_un.d_val; break;
        default: break;
        }
    }
    if (symtab == 0 || strtab == 0)
        return 0;
    if (pltrel == DT_RELA) /* 64-bit ELF on x86-64/aarch64 uses RELA only */
        scan_table(p, &o, variant, jmprel, pltrelsz, sizeof(ElfW(Rela)),
                   (const ElfW(Sym) *)symtab, (const char *)strtab, strsz);
    scan_table(p, &o, variant, rela, relasz, relaent, (const ElfW(Sym) *)symtab,
               (const char *)strtab, strsz);
    return 0;
}

/* The loader's add/remove counters, read from the first object of a pass. */
static int counts_cb(struct dl_phdr_info *info, size_t size, void *arg)
{
    unsigned long long *c = arg;

    if (size < offsetof(struct dl_phdr_info, dlpi_subs) + sizeof(info->dlpi_subs))
        return -1;
    c[0] = info->dlpi_adds;
    c[1] = info->dlpi_subs;
    return 1;
}

int mg_elf_patch(const mg_elf_hook_t *hooks, int nhooks, mg_elf_classify_fn classify,
                 const void *self)
{
    pass_t p;
    unsigned long long c[2] = {0, 0};
    int have;

    if (hooks == NULL || nhooks <= 0 || nhooks > MG_ELF_MAX_HOOKS) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&s_lock);
    have = dl_iterate_phdr(counts_cb, c) == 1;
    if (s_hooks != hooks || s_nhooks != nhooks) {
        s_nseen = 0; /* another hook list: every object is new to it */
        s_hooks = hooks;
        s_nhooks = nhooks;
    } else if (have && s_have_counts && c[0] == s_adds && c[1] == s_subs) {
        pthread_mutex_unlock(&s_lock);
        return 0; /* nothing loaded or unloaded since the last pass */
    }
    if (have && s_have_counts && c[1] != s_subs)
        s_nseen = 0; /* an object went away: its address may be reused by a new one */
    memset(&p, 0, sizeof(p));
    p.hooks = hooks;
    p.nhooks = nhooks;
    p.classify = classify;
    p.self = (uintptr_t)self;
    s_objects = 0;
    (void)dl_iterate_phdr(on_object, &p);
    s_adds = c[0];
    s_subs = c[1];
    s_have_counts = have;
    pthread_mutex_unlock(&s_lock);
    return p.patched;
}

int mg_elf_unpatch(void)
{
    pass_t p;
    static char done[MG_ELF_MAX_SLOTS]; /* under s_lock */

    pthread_mutex_lock(&s_lock);
    memset(&p, 0, sizeof(p));
    if (s_hooks != NULL && s_nslots > 0) {
        memset(done, 0, (size_t)s_nslots);
        p.restore = 1;
        p.done = done;
        (void)dl_iterate_phdr(on_object, &p);
    }
    s_nslots = 0;
    s_nseen = 0;
    s_have_counts = 0;
    pthread_mutex_unlock(&s_lock);
    return p.patched;
}

void mg_elf_stats(mg_elf_stats_t *out)
{
    pthread_mutex_lock(&s_lock);
    out->objects = s_objects;
    out->patched = s_nslots;
    out->failed = s_nfailed;
    out->table_full = s_table_full;
    pthread_mutex_unlock(&s_lock);
}

int mg_elf_failed(const char **out, int max)
{
    int n;

    pthread_mutex_lock(&s_lock);
    n = s_nfailed < max ? s_nfailed : max;
    for (int i = 0; i < n; i++)
        out[i] = s_failed[i];
    pthread_mutex_unlock(&s_lock);
    return n;
}

void mg_elf_reset(void)
{
    pthread_mutex_lock(&s_lock);
    s_nfailed = 0;
    s_nseen = 0;
    s_have_counts = 0;
    s_table_full = 0;
    s_objects = 0;
    pthread_mutex_unlock(&s_lock);
}

/* The definition of `name` that calls bind to, and in *alias the canonical PLT entry that
 * stands for it when the program is not position-independent (include/mg_elf.h), else NULL.
 * dlsym(RTLD_DEFAULT) gives that entry there: an undefined symbol of the program with a
 * value. The definition is then the first one in the objects after the program, in load
 * order (as the dynamic linker searches; an LD_PRELOAD allocator comes first). Calling the
 * entry instead would loop once the program's own slot is patched. */
void *mg_elf_definition(const char *name, void **alias)
{
    void *d = dlsym(RTLD_DEFAULT, name);
    const ElfW(Sym) *sym = NULL;
    struct link_map *lm = NULL;
    Dl_info info;

    *alias = NULL;
    if (d == NULL || !dladdr1(d, &info, (void **)&sym, RTLD_DL_SYMENT) || sym == NULL ||
        sym->st_shndx != SHN_UNDEF || !dladdr1(d, &info, (void **)&lm, RTLD_DL_LINKMAP) ||
        lm == NULL)
        return d;
    for (struct link_map *m = lm->l_next; m != NULL; m = m->l_next) {
        struct link_map *owner = NULL;
        void *h = m->l_name[0] ? dlopen(m->l_name, RTLD_LAZY | RTLD_NOLOAD) : NULL;
        void *a = h ? dlsym(h, name) : NULL;

        if (h != NULL)
            dlclose(h);
        if (a != NULL && dladdr1(a, &info, (void **)&owner, RTLD_DL_LINKMAP) && owner == m) {
            *alias = d;
            return a;
        }
    }
    return d;
}
