/* The monitor thread and its libzmq PUSH socket (csrc/monitor.c): drains the event ring,
 * applies the RSS budget and limit rules, follows the alerted cell's peak, writes each
 * alert record into the black box and sends it to the Python relay that publishes it on
 * IOPub, and ticks the black box. Started and stopped with the GIL held; the thread itself
 * never takes the GIL and never calls Python. */
#ifndef MEMGUARD_MG_MONITOR_H
#define MEMGUARD_MG_MONITOR_H

#include <stdint.h>

#include "memguard.h"

#define MG_WIRE_VERSION 2u

/* A record sent is re-sent as MG_KIND_BUDGET_GROW (or an accumulation site's as
 * MG_KIND_ACCUMULATION_GROW) when the figure at issue has grown by this fraction since the
 * last record for it, so the alert can be updated in place rather than repeated. */
#define MG_GROW_STEP 0.10

/* One message on the wire: 64 bytes, little-endian (x86-64 and aarch64 Linux), no
 * padding. Python decodes it with MG_WIRE_FORMAT (exported as memguard._core.WIRE_FORMAT). */
typedef struct mg_wire {
    uint32_t version; /* MG_WIRE_VERSION */
    uint32_t kind;    /* mg_kind_t */
    int64_t epoch;    /* the cell's epoch (memguard's own counter of cells) */
    int32_t line;     /* 1-based line in the cell's source, or -1 if unknown */
    uint32_t count;   /* accumulation: live blocks at the site; otherwise 0 */
    int64_t bytes;    /* budget: size of the allocation that crossed; accumulation: the
                       * site's live bytes; budget_rss: untracked growth (RSS growth minus
                       * tracked growth); bytes */
    int64_t usage;    /* the cell's usage (tracked - start; budget_rss: RSS growth) when the
                       * record was made, bytes */
    int64_t peak;     /* the cell's peak usage so far, bytes */
    int64_t budget;   /* the cell's budget, bytes (0 = none) */
    double t;         /* CLOCK_MONOTONIC seconds when the hook saw the event (the monitor's
                       * own rules: when it made the record) */
} mg_wire_t;
#define MG_WIRE_FORMAT "<IIqiIqqqqd"

/* The monitor's period in a kernel, ms (a Dask worker's is longer: WORKER_MONITOR_MS in
 * jupyter_ext/memguard/dask.py). Each wake of the thread costs a busy process more than the
 * thread's own CPU time: on two cores, where a cell's native code runs threads on both, a
 * wake preempts one of them and the others wait for it at their next barrier. torch_cpu
 * (bench/overhead.py --paired, a 2000 x 2000 float32 matmul and elementwise ops, OpenMP on
 * both cores, six pairs of runners) ran 1.042x plain (95 % interval 1.020-1.062) with a
 * 2 ms period and 0.994x (0.974-1.022) with 10 ms (2026-12-04). A ring event waits at most
 * one period to be sent, which stays far inside the alert latency target (p99 <= 50 ms,
 * docs/design.md "Alert latency"). */
#define MG_MONITOR_PERIOD_MS 10
/* The monitor samples the measures every MG_RSS_SAMPLE_MS, or at every poll when its period
 * is longer (every poll at a kernel's 10 ms period and at a Dask worker's 20 ms): often
 * enough to follow growth, rare enough to cost nothing measurable (a pread of statm, and
 * one of the cgroup file when a cgroup limit is set; about 14 us). A fixed count of polls
 * made a worker, whose polls were made 4 times longer to wake it less, sample 4 times less
 * often too (every 100 ms): a short task's native memory was then measured after its
 * function returned, and its budget alert lost its line. */
#define MG_RSS_SAMPLE_MS 10
/* Native mappings (csrc/hooks_native.c, mg_native_settle_at) are measured at an RSS sample
 * only when RSS moved by more than MG_SETTLE_RSS_STEP or a mapping came or went since they
 * were last measured (by this thread or at a cell's end), or MG_SETTLE_MAX_MS passed: their
 * resident pages cannot grow by more than RSS grew, unless other memory shrank by as much
 * at the same time, which the bound covers. And no measure starts sooner than
 * MG_SETTLE_COST_RATIO times the last one's duration after it, so it takes at most about
 * 1 % of a core however large the mappings are (a 1 GiB arena takes about 0.3 ms; smaller
 * ones are measured at every RSS sample). Measuring libarrow's 1 GiB mimalloc arena at
 * every sample kept an idle kernel's monitor thread at 4.8 % of a core, and a Dask worker's
 * at 3 % of the worker's CPU during a group-by (2026-12-03). */
#define MG_SETTLE_MAX_MS 1000u
#define MG_SETTLE_COST_RATIO 100
/* Bytes RSS must move, either way, since the last measure for the monitor to measure
 * again: the native count then lags the mappings' resident pages by at most about this
 * much, until a cell's or task's end (which measures on any move) or MG_SETTLE_MAX_MS. A
 * Dask worker's RSS in a dataframe group-by (P2P shuffle, pyarrow) moved between two 20 ms
 * samples in 81-86 % of them, by 4 MiB or more in 15-19 % (2026-12-04): measuring on any
 * move, the monitor measured libarrow's 1 GiB arena 38-40 times a second, at the cost
 * bound, 0.84-0.89 % of the workers' CPU time; with this step, 3-6 times a second,
 * 0.07-0.14 % (monitor_stats' settles and settle_cpu_ns over 20 rounds). */
#define MG_SETTLE_RSS_STEP ((int64_t)4 << 20)
/* After the first MG_KIND_LIMIT record of a cell, another is sent each time the measure has
 * grown by this fraction of the limit (so the alert is updated in place, not repeated). */
#define MG_LIMIT_STEP 0.02

/* Connect a PUSH socket to endpoint (e.g. "inproc://memguard-relay-1" or "ipc:///tmp/x/r")
 * in the libzmq context ctx (pyzmq's Context.underlying, so that inproc:// reaches a pyzmq
 * socket of the same context; the caller keeps it alive until mg_monitor_stop returns), or
 * in a context of its own when ctx is NULL,
 * and start the monitor thread, which polls every period_ms milliseconds (1-1000): it
 * forwards ring events, sends growth updates, samples RSS and applies the RSS budget rule
 * (a cell whose RSS grew by more than its budget before its tracked usage did gets an
 * MG_KIND_BUDGET_RSS record: memory from native code the hooks cannot see) and the limit
 * rule (MG_KIND_LIMIT when the limit's measure passes its alert fraction; count = the
 * mg_measure_t, bytes = usage = the measure).
 * Returns 0; -1 with errno = EALREADY if running, EINVAL for a bad period, ENOSYS before
 * mg_zmq_load, or the errno libzmq or pthread_create set. GIL held (or no Python at all, in
 * the C tests). */
int mg_monitor_start(const char *endpoint, int period_ms, void *ctx);

/* Stop and join the monitor thread, then close the socket and terminate its context
 * if it was its own (linger 0, so this never blocks on an absent peer). Returns 0 (also when not running).
 * Not from a hook. */
int mg_monitor_stop(void);

/* Non-zero while the monitor thread runs. Any thread. */
int mg_monitor_running(void);

/* Ring events not yet forwarded by the monitor thread (pushed minus sent-or-dropped), so
 * a caller can wait until what a cell produced is on the wire. Counts from the last
 * mg_ring_reset, which the module does once. Any thread. */
uint64_t mg_monitor_pending(void);

/* Polls the monitor thread has made since it started (each: forward the ring, apply the
 * rules, then sleep one period). Any thread. */
uint64_t mg_monitor_polls(void);

/* Records sent, and records dropped because the peer was absent or slow (EAGAIN). */
uint64_t mg_monitor_sent(void);
uint64_t mg_monitor_dropped(void);

/* Measures of the native mappings the monitor thread made (monitor_settle), and the CPU
 * time they took (ns, CLOCK_THREAD_CPUTIME_ID), since the process began: what the rule of
 * MG_SETTLE_RSS_STEP and MG_SETTLE_COST_RATIO costs (bench/dask_overhead.py --per-task).
 * Any thread. */
uint64_t mg_monitor_settles(void);
uint64_t mg_monitor_settle_cpu_ns(void);

/* Register the pthread_atfork child handler: a forked child disables counting and forgets
 * (leaks) the parent's monitor state, since its thread does not exist in the child and its
 * zmq context must not be touched there. Idempotent. Returns 0 or an errno value. */
int mg_monitor_atfork_register(void);

/* --- The launcher's socket (a second PUSH) ------------------------------------------------
 * Under memguard's kernel launcher (jupyter_ext/memguard/launcher.py, which owns IOPub) the
 * monitor also sends every record to the launcher, which publishes it without waiting for
 * this process's GIL (docs/design.md, "Alert latency"). Set the endpoint (e.g.
 * "ipc:///tmp/memguard-launch-x/records", from MEMGUARD_LAUNCHER_ENDPOINT) before
 * mg_monitor_start; NULL or "" clears it. The socket is created by mg_monitor_start in the
 * same context and closed by mg_monitor_stop; each record goes to the relay first, then
 * here, ZMQ_DONTWAIT (a missing launcher only counts drops). Returns 0; -1 with errno =
 * EALREADY while the monitor runs, ENAMETOOLONG for an endpoint of 256 bytes or more. GIL
 * held. */
int mg_monitor_set_launcher(const char *endpoint);

/* Records sent to the launcher, and dropped there (absent or slow peer). Any thread. */
uint64_t mg_monitor_launcher_sent(void);
uint64_t mg_monitor_launcher_dropped(void);

#endif /* MEMGUARD_MG_MONITOR_H */
