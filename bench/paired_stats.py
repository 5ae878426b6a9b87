"""The statistics of paired benchmark runs, shared by ``bench/overhead.py --paired`` and
``bench/dask_overhead.py``: the 95 % interval of the median of neighbouring pairs' ratios,
and the verdict of that interval against a target."""


def median_ci(groups, resamples=2000):
    """The 95 % interval ``[low, high]`` of the median of the ratios in ``groups`` (one list
    of pair ratios per pair of processes: runners or Dask drivers), by a two-level
    percentile bootstrap: resample the pairs of processes, then the pairs of rounds within
    each (numpy, fixed seed). Pairs of one pair of processes share its memory layout (and,
    for Dask, its clusters' placement of chunks), so resampling the pairs alone gave
    intervals that two runs of the same build missed each other by (Dask reduction
    0.978-1.012 and 1.013-1.045, 2026-12-03). ``[median, median]`` for fewer than two
    ratios."""
    import numpy as np

    groups = [np.asarray(g, dtype=float) for g in groups if len(g)]
    flat = np.concatenate(groups) if groups else np.asarray([1.0])
    if len(flat) < 2:
        return [float(flat[0]), float(flat[0])]
    rng = np.random.default_rng(0)
    medians = []
    for _ in range(resamples):
        picked = rng.integers(0, len(groups), len(groups))
        medians.append(np.median(np.concatenate(
            [rng.choice(groups[k], len(groups[k])) for k in picked])))
    low, high = np.percentile(medians, [2.5, 97.5])
    return [float(low), float(high)]


def verdict(ci, target):
    """``met`` when the whole interval ``ci`` is at or below ``target``, ``above`` when it is
    all above, ``not resolved`` when it holds the target."""
    low, high = ci
    return "met" if high <= target else "above" if low > target else "not resolved"
