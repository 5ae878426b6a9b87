/* Owns the allocator hooks' per-thread state: the reentrancy flag and the batches
 * (include/mg_reentry.h).
 * Every thread that allocates enters it. */
#include "mg_reentry.h"

/* Written and read only by the owning thread (no atomics needed). */
MG_TLS mg_thread_t t_mg = {0, 0, 0, {0}};
