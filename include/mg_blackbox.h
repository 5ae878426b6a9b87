/* The black box (csrc/blackbox.c): a small fixed-layout file per kernel, memory-mapped
 * MAP_SHARED, that the monitor thread keeps current (state, timeline, alerts as it sends
 * them) and Python fills at cell start (source) and on alerts (their full message), with
 * plain stores into the mapping: no system call per allocation, nothing needing the GIL. It survives SIGKILL (the page cache holds it);
 * a clean shutdown removes it. Read back by jupyter_ext/memguard/blackbox.py.
 *
 * Torn writes: every region has a sequence counter, odd while its writer is inside
 * (a seqlock); the state is double-buffered so a kill in the middle of an update leaves
 * the other copy whole; timeline samples carry a stamp written last. Little-endian,
 * naturally aligned, no implicit padding (checked by _Static_assert). */
#ifndef MEMGUARD_MG_BLACKBOX_H
#define MEMGUARD_MG_BLACKBOX_H

#include <stdatomic.h>
#include <stdint.h>

#include "memguard.h"
#include "mg_monitor.h"

#define MG_BB_MAGIC "MGBLKBOX"   /* 8 bytes, no terminator */
#define MG_BB_LAYOUT 2u          /* bump on any change below; readers reject newer ones */
#define MG_BB_SOURCE_MAX 16384u  /* bytes of the running cell's source kept */
#define MG_BB_PARENT_MAX 1024u   /* bytes of the running cell's parent header (JSON) kept */
#define MG_BB_CELLS 64u          /* (epoch, execution count) pairs of recent cells */
#define MG_BB_SITES 16u          /* top live sites in each state copy */
#define MG_BB_ALERTS 32u         /* last alerts kept (a ring) */
#define MG_BB_MESSAGE 200u       /* bytes of each alert's message kept */
#define MG_BB_SAMPLES 2048u      /* timeline ring: 2048 x 100 ms = 3.4 minutes */
#define MG_BB_SAMPLE_MS 100u     /* timeline period, milliseconds */

/* mg_bb_alert_t.kind: the index into jupyter_ext/memguard/blackbox.py's KINDS, which names
 * them; the Python alert kind each wire record (mg_kind_t) becomes. */
typedef enum mg_bb_kind {
    MG_BB_KIND_BUDGET = 0,       /* MG_KIND_BUDGET, _BUDGET_GROW, _BUDGET_RSS; a budget refusal */
    MG_BB_KIND_LIMIT = 1,        /* MG_KIND_LIMIT, _LIMIT_REQUEST; a limit refusal */
    MG_BB_KIND_SPARSE = 2,       /* sparse_to_dense (Python only) */
    MG_BB_KIND_ACCUMULATION = 3, /* MG_KIND_ACCUMULATION, _ACCUMULATION_GROW */
    MG_BB_KIND_CRASH_REPORT = 4, /* crash_report (Python only) */
} mg_bb_kind_t;

typedef struct mg_bb_header {
    char magic[8];          /* MG_BB_MAGIC */
    uint32_t layout;        /* MG_BB_LAYOUT */
    uint32_t header_bytes;  /* sizeof(mg_bb_header_t) */
    uint64_t file_bytes;    /* sizeof(mg_bb_file_t) */
    int64_t pid;            /* the kernel's process id */
    double started;         /* CLOCK_REALTIME seconds when the box was opened */
    uint32_t sample_ms;     /* MG_BB_SAMPLE_MS */
    uint32_t n_samples;     /* MG_BB_SAMPLES */
    uint32_t n_sites;       /* MG_BB_SITES */
    uint32_t n_alerts;      /* MG_BB_ALERTS */
    uint32_t source_max;    /* MG_BB_SOURCE_MAX */
    uint32_t n_cells;       /* MG_BB_CELLS */
    char connection[200];   /* the kernel's connection file name (basename), NUL-padded */
} mg_bb_header_t;

typedef struct mg_bb_cellmap {
    int64_t epoch;          /* memguard's cell counter */
    int64_t count;          /* IPython's execution count, -1 if none */
} mg_bb_cellmap_t;

/* The running cell, written by Python at cell start (GIL held). */
typedef struct mg_bb_cell {
    _Atomic uint64_t seq;   /* odd while written */
    int64_t epoch;
    int64_t count;          /* execution count, -1 if none */
    double started;         /* CLOCK_REALTIME seconds */
    uint32_t source_len;    /* bytes used in source (<= MG_BB_SOURCE_MAX) */
    uint32_t cells_next;    /* next slot of the cells ring (total written) */
    uint32_t parent_len;    /* bytes used in parent (<= MG_BB_PARENT_MAX), 0 = none */
    uint32_t pad;
    mg_bb_cellmap_t cells[MG_BB_CELLS];
    /* The execute_request header the cell answers (UTF-8 JSON, as the kernel received it):
     * the launcher parents its alerts and the death notice with it, since the kernel's own
     * IOPub messages naming the cell may wait for the GIL (docs/design.md, "Launcher"). */
    char parent[MG_BB_PARENT_MAX];
    char source[MG_BB_SOURCE_MAX]; /* UTF-8, maybe cut at the end */
} mg_bb_cell_t;

typedef struct mg_bb_site {
    int64_t epoch;
    int32_t line;           /* -1 if unknown */
    int32_t pad;
    int64_t bytes;          /* live bytes */
    int64_t count;          /* live blocks */
} mg_bb_site_t;

/* The monitor's view, every MG_BB_SAMPLE_MS; two copies written alternately. */
typedef struct mg_bb_state {
    _Atomic uint64_t seq;   /* odd while written; the larger even seq is the newer copy */
    double t;               /* CLOCK_REALTIME seconds */
    int64_t epoch;          /* the running cell */
    int32_t line;           /* the last line an attributed allocation came from, -1 */
    int32_t n_sites;        /* used entries of sites */
    int64_t tracked;        /* bytes since install */
    int64_t cell_start;     /* tracked at cell start */
    int64_t cell_peak;      /* tracked peak in the cell */
    int64_t rss;            /* bytes */
    int64_t rss_cell_start;
    int64_t rss_cell_peak;
    int64_t rss_peak;       /* highest RSS sample since the box opened */
    int64_t budget;         /* bytes, 0 = none */
    int64_t limit;          /* bytes, 0 = none */
    int64_t limit_used;     /* the limit's measure, bytes */
    int32_t limit_measure;  /* mg_measure_t */
    int32_t raise;          /* 1 in raise mode */
    mg_bb_site_t sites[MG_BB_SITES];
} mg_bb_state_t;

typedef struct mg_bb_alert {
    int64_t epoch;
    int64_t count;          /* execution count, -1 if none */
    int32_t kind;           /* index into the Python side's kind names (mg_bb_kind) */
    int32_t line;           /* -1 if unknown */
    int64_t bytes;
    double t;               /* CLOCK_REALTIME seconds */
    char message[MG_BB_MESSAGE]; /* UTF-8, NUL-padded, maybe cut */
} mg_bb_alert_t;

/* Alerts, written by the monitor thread (each record it sends) and by Python (the relay
 * thread, GIL held, with the full message), one writer at a time. */
typedef struct mg_bb_alerts {
    _Atomic uint64_t seq;   /* odd while written */
    uint64_t total;         /* alerts written so far; the ring holds the last MG_BB_ALERTS */
    mg_bb_alert_t ring[MG_BB_ALERTS];
} mg_bb_alerts_t;

typedef struct mg_bb_sample {
    _Atomic uint64_t stamp; /* index + 1 of the sample, written last (release) */
    double t;               /* CLOCK_REALTIME seconds */
    int64_t rss;            /* bytes */
    int64_t tracked;        /* bytes since install */
    int64_t epoch;          /* the running cell */
} mg_bb_sample_t;

typedef struct mg_bb_file {
    mg_bb_header_t header;
    mg_bb_cell_t cell;
    mg_bb_state_t state[2];
    mg_bb_alerts_t alerts;
    _Atomic uint64_t samples_total; /* samples written so far */
    uint64_t pad;
    mg_bb_sample_t samples[MG_BB_SAMPLES];
} mg_bb_file_t;

/* Create (truncate) the black box at path for connection file name `connection` and map
 * it. Returns 0, or -1 with errno (EALREADY if one is open, or from open/ftruncate/mmap).
 * GIL held. */
int mg_blackbox_open(const char *path, const char *connection);

/* Unmap the box; with remove != 0 also unlink it (a clean shutdown). Returns 0 (also when
 * none is open). Safe while the monitor thread runs: a tick or alert write in progress
 * finishes before the unmap (close waits for it, microseconds), and later ones find no
 * box. GIL held. */
int mg_blackbox_close(int remove);

/* Non-zero while a box is open. */
int mg_blackbox_is_open(void);

/* Record the running cell: epoch, execution count (-1 none), source (cut to
 * MG_BB_SOURCE_MAX bytes) and the JSON parent header of its execute_request (parent_len 0:
 * none; longer than MG_BB_PARENT_MAX: none, since a cut JSON document is useless). GIL
 * held. No effect without an open box. */
void mg_blackbox_set_cell(int64_t epoch, int64_t count, const char *source, size_t len,
                          const char *parent, size_t parent_len);

/* Append an alert (kind: mg_bb_kind_t), or update the entry of the same alert if the ring
 * still holds it: same epoch and kind, and the same line for accumulation and
 * sparse_to_dense (the Python side's keys). An update keeps the entry's time and takes the
 * new bytes and message, and the line and count when known (line > 0, count >= 0). GIL
 * held (Python's relay thread). No effect without an open box. */
void mg_blackbox_add_alert(int64_t epoch, int64_t count, int kind, int line, int64_t bytes,
                           const char *message, size_t len);

/* The monitor thread, for each record it sends: the same as mg_blackbox_add_alert with the
 * kind, line, bytes and a short message made from the record, and the execution count of
 * the record's cell when it is the running one (-1 otherwise). So the box holds the alert
 * even if the kernel dies before Python sees the record (e.g. C code holding the GIL).
 * Records of no alert kind are ignored. No effect without an open box. */
void mg_blackbox_monitor_alert(const mg_wire_t *w);

/* Write the state and one timeline sample (the monitor thread, every MG_BB_SAMPLE_MS). */
void mg_blackbox_tick(void);

/* Offsets and sizes of the layout, for the Python reader's self-check: fills names[i] and
 * values[i] for up to max entries, returns how many. */
int mg_blackbox_layout(const char **names, int64_t *values, int max);

/* In a forked child: forget the mapping (never write the parent's box). */
void mg_blackbox_atfork_child(void);

#endif /* MEMGUARD_MG_BLACKBOX_H */
