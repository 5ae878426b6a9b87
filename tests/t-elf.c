/* Tests of csrc/elf_patch.c: GOT slots of loaded objects are pointed at wrappers and put
 * back; objects loaded later (dlopen) are patched on the next pass; patching while other
 * threads call through the slots; unpatch/patch cycles; dlclose between passes. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "mg_elf.h"
#include "tap.h"

static _Atomic long s_mallocs = 0;
static _Atomic long s_frees = 0;
static void *(*real_malloc)(size_t);
static void (*real_free)(void *);

static void *w_malloc(size_t n)
{
    atomic_fetch_add(&s_mallocs, 1);
    return real_malloc(n);
}

static void w_free(void *p)
{
    atomic_fetch_add(&s_frees, 1);
    real_free(p);
}

static mg_elf_hook_t s_hooks[2] = {
    {"malloc", NULL, {(void *)w_malloc, NULL}, NULL},
    {"free", NULL, {(void *)w_free, NULL}, NULL},
};

/* Sanitizer runtimes define malloc themselves: never patched (as csrc/hooks_native.c). */
static int classify(const char *path)
{
    return (strstr(path, "san") != NULL || strstr(path, "vgpreload") != NULL) ? -1 : 0;
}

/* malloc and free through this program's own PLT/GOT, kept from being optimized away. */
static __attribute__((noinline)) void one_alloc(void)
{
    void *volatile p = malloc(64);

    free(p);
}

/* The same through another object's GOT: zlib's deflateInit allocates with malloc. */
typedef int (*deflate_init_fn)(z_streamp, int, const char *, int);
typedef int (*deflate_end_fn)(z_streamp);

static int zlib_roundtrip(void *h)
{
    deflate_init_fn init = (deflate_init_fn)dlsym(h, "deflateInit_");
    deflate_end_fn end = (deflate_end_fn)dlsym(h, "deflateEnd");
    z_stream z;

    if (init == NULL || end == NULL)
        return -1;
    memset(&z, 0, sizeof(z));
    if (init(&z, 6, ZLIB_VERSION, (int)sizeof(z)) != Z_OK)
        return -1;
    return end(&z) == Z_OK ? 0 : -1;
}

static void setup(void)
{
    real_malloc = (void *(*)(size_t))dlsym(RTLD_DEFAULT, "malloc");
    real_free = (void (*)(void *))dlsym(RTLD_DEFAULT, "free");
    s_hooks[0].real = (void *)real_malloc;
    s_hooks[1].real = (void *)real_free;
}

static void *s_zlib; /* libz, opened by main before the tests that use it */

static void t_patch_and_restore(void)
{
    long before;
    mg_elf_stats_t st;

    mg_elf_reset();
    check_int(mg_elf_patch(s_hooks, 2, classify, NULL), >, 0);
    before = atomic_load(&s_mallocs);
    check_int(zlib_roundtrip(s_zlib), ==, 0);
    check_int(atomic_load(&s_mallocs), >, before);
    check_int(atomic_load(&s_frees), >, 0);
    mg_elf_stats(&st);
    check_int(st.patched, >=, 2);
    check_int(st.failed, ==, 0);
    check_int(mg_elf_patch(s_hooks, 2, classify, NULL), ==, 0); /* nothing new: no-op */
    check_int(mg_elf_unpatch(), >=, 2);
    before = atomic_load(&s_mallocs);
    check_int(zlib_roundtrip(s_zlib), ==, 0);
    one_alloc();
    check_int(atomic_load(&s_mallocs), ==, before);
    mg_elf_stats(&st);
    check_int(st.patched, ==, 0);
}

static void t_self_is_never_patched(void)
{
    long before;

    mg_elf_reset();
    (void)mg_elf_patch(s_hooks, 2, classify, dlsym(s_zlib, "deflateEnd"));
    before = atomic_load(&s_mallocs);
    check_int(zlib_roundtrip(s_zlib), ==, 0);
    check_int(atomic_load(&s_mallocs), ==, before);
    (void)mg_elf_unpatch();
}

static void t_object_loaded_later_is_patched(void)
{
    void *h;
    long before;

    mg_elf_reset();
    (void)mg_elf_patch(s_hooks, 2, classify, (const void *)one_alloc);
    h = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL);
    check(h != NULL);
    if (h == NULL)
        return;
    before = atomic_load(&s_mallocs);
    check_int(zlib_roundtrip(h), ==, 0);
    /* Not patched yet, unless the program itself linked zlib (it does not). */
    check_int(atomic_load(&s_mallocs), ==, before);
    check_int(mg_elf_patch(s_hooks, 2, classify, (const void *)one_alloc), >, 0);
    before = atomic_load(&s_mallocs);
    check_int(zlib_roundtrip(h), ==, 0);
    check_int(atomic_load(&s_mallocs), >, before);
    /* dlclose while patched, then unpatch: the unloaded object's slots are forgotten. */
    dlclose(h);
    check_int(mg_elf_unpatch(), >=, 0);
    h = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL);
    check(h != NULL);
    if (h == NULL)
        return;
    before = atomic_load(&s_mallocs);
    check_int(zlib_roundtrip(h), ==, 0);
    check_int(atomic_load(&s_mallocs), ==, before);
    dlclose(h);
}

static _Atomic int s_stop = 0;

static void *caller_thread(void *arg)
{
    (void)arg;
    while (!atomic_load(&s_stop)) {
        one_alloc();
        (void)zlib_roundtrip(s_zlib);
    }
    return NULL;
}

static void t_patch_while_threads_call(void)
{
    pthread_t th[3];
    long before;

    mg_elf_reset();
    atomic_store(&s_stop, 0);
    for (int i = 0; i < 3; i++)
        pthread_create(&th[i], NULL, caller_thread, NULL);
    for (int round = 0; round < 10; round++) {
        check_int(mg_elf_patch(s_hooks, 2, classify, NULL), >, 0);
        before = atomic_load(&s_mallocs);
        check_int(zlib_roundtrip(s_zlib), ==, 0);
        check_int(atomic_load(&s_mallocs), >, before);
        check_int(mg_elf_unpatch(), >, 0);
    }
    atomic_store(&s_stop, 1);
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    before = atomic_load(&s_mallocs);
    check_int(zlib_roundtrip(s_zlib), ==, 0);
    check_int(atomic_load(&s_mallocs), ==, before);
}

/* A slot bound to another definition than the one the hook calls through is never
 * patched, and its object is named (what %memguard status shows as "not patched"). */
static void *other_malloc(size_t n)
{
    return real_malloc(n);
}

static void t_slot_bound_elsewhere_is_named_not_patched(void)
{
    mg_elf_hook_t wrong[1] = {{"malloc", (void *)other_malloc, {(void *)w_malloc, NULL}, NULL}};
    const char *names[MG_ELF_MAX_FAILED];
    int n, named = 0, patched;
    long before;

    mg_elf_reset();
    /* Lazily bound slots (a stub inside their object) may still be patched elsewhere. */
    patched = mg_elf_patch(wrong, 1, classify, (const void *)one_alloc);
    check_int(patched, >=, 0);
    n = mg_elf_failed(names, MG_ELF_MAX_FAILED);
    for (int i = 0; i < n; i++)
        named |= strstr(names[i], "libz.so") != NULL;
    check_int(named, ==, 1);
    before = atomic_load(&s_mallocs);
    check_int(zlib_roundtrip(s_zlib), ==, 0);
    check_int(atomic_load(&s_mallocs), ==, before);
    check_int(mg_elf_unpatch(), ==, patched);
    mg_elf_reset();
}

/* A slot holding the hook's alias (what a program that is not position-independent hands
 * out for the definition: include/mg_elf.h) is patched like one holding the definition,
 * and put back to the alias. Here the alias is malloc's definition and the "definition"
 * another function, so every bound slot holds the alias. */
static void t_slot_holding_the_alias_is_patched_and_put_back(void)
{
    mg_elf_hook_t aliased[1] = {
        {"malloc", (void *)other_malloc, {(void *)w_malloc, NULL}, (void *)real_malloc}};
    const char *names[MG_ELF_MAX_FAILED];
    long before;
    int patched;

    mg_elf_reset();
    check_int(zlib_roundtrip(s_zlib), ==, 0); /* libz's slot is bound now, not lazy */
    patched = mg_elf_patch(aliased, 1, classify, (const void *)one_alloc);
    check_int(patched, >=, 1);
    check_int(mg_elf_failed(names, MG_ELF_MAX_FAILED), ==, 0);
    before = atomic_load(&s_mallocs);
    check_int(zlib_roundtrip(s_zlib), ==, 0);
    check_int(atomic_load(&s_mallocs), >, before);
    check_int(mg_elf_unpatch(), ==, patched);
    before = atomic_load(&s_mallocs);
    check_int(zlib_roundtrip(s_zlib), ==, 0);
    check_int(atomic_load(&s_mallocs), ==, before);
    mg_elf_reset();
}

static void t_bad_hook_list(void)
{
    check_int(mg_elf_patch(s_hooks, 0, classify, NULL), ==, -1);
    check_int(mg_elf_patch(NULL, 2, classify, NULL), ==, -1);
}

int main(void)
{
    void *probe = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL);

    if (probe == NULL)
        test_skip_all("libz.so.1 cannot be opened");
    dlclose(probe);
    setup();
    plan(7);
    /* First, while libz is not loaded: it is the object loaded later. */
    TEST(t_object_loaded_later_is_patched(), "an object loaded later is patched on the next pass; dlclose then unpatch is safe");
    s_zlib = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL);
    TEST(t_patch_and_restore(), "an object's malloc/free slots call the wrappers, and are put back");
    TEST(t_self_is_never_patched(), "the object holding `self` is skipped");
    TEST(t_patch_while_threads_call(), "10 patch/unpatch cycles while 3 threads call malloc/free through the slots");
    TEST(t_slot_bound_elsewhere_is_named_not_patched(), "a slot bound to another definition is not patched and its object is named");
    TEST(t_slot_holding_the_alias_is_patched_and_put_back(), "a slot holding the alias (a non-PIE program's canonical PLT entry) is patched and put back");
    TEST(t_bad_hook_list(), "an empty hook list is refused");
    dlclose(s_zlib);
    return test_done();
}
