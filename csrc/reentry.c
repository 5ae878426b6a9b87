/* Owns the per-thread reentrancy flag of the allocator hooks (include/mg_reentry.h).
 * Every thread that allocates enters it. */
#include "mg_reentry.h"

/* Written and read only by the owning thread (no atomics needed). */
MG_TLS int t_mg_in_hook = 0;
