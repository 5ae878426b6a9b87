/* libFuzzer target for the /proc and cgroupfs parsers of csrc/measures.c (the only C code that
 * reads bytes memguard did not write). Build and run: make fuzz. Checks, besides the
 * sanitizers: results are non-negative and the digit count stays inside the input. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "mg_measures.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int64_t a;
    int64_t b;
    size_t used;

    if (mg_measures_parse_number((const char *)data, size, &used, &a) == 0 &&
        (a < 0 || used == 0 || used > size))
        abort();
    if (mg_measures_parse_stat((const char *)data, size, "total_inactive_file", &a) == 0 && a < 0)
        abort();
    if (mg_measures_parse_statm((const char *)data, size, &a, &b) == 0 && (a < 0 || b < 0))
        abort();
    return 0;
}
