"""The workloads of bench/overhead.py, as notebook cells: each has a ``setup`` cell (imports
and input data, not timed) and one or more ``body`` cells (timed, run one after the other
with ``InteractiveShell.run_cell``). ``N`` and ``R`` (problem size and repeat count) are set
by the setup cell from the scale: ``full`` (``make bench-overhead``, about 0.5-1.5 s of body
per run here), ``quick`` (``make bench-quick``) and ``callgrind`` (small enough to run under
valgrind). The ``notebook`` workload is notebooks/sparse_to_dense.ipynb itself: its code
cells, less ``%load_ext memguard``, are the body at every scale.
"""

import json
import os
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "sparse_to_dense.ipynb")

# name -> (group, {scale: (N, R)}, setup, body). The bodies use only N, R and names bound in
# their setup; the setup's imports are done before timing so no body pays for an import.
WORKLOADS = {
    # Small Python objects: instances with __dict__, dicts, lists and tuples built in bulk,
    # indexed in a dict, then dropped (pymalloc blocks, arena churn, list/dict resizes).
    "objects": ("python", {"full": (100_000, 3), "quick": (50_000, 2), "callgrind": (20_000, 1)},
                """
class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
""", """
for _r in range(R):
    rows = []
    for i in range(N):
        rows.append({"id": i, "p": Point(i, -i), "tags": [i, i + 1, i + 2], "t": (i, str(i))})
    index = {row["id"]: row for row in rows}
    del rows, index
"""),
    # The benchmarks game's binary-trees (pyperformance bm_... style): short-lived trees of
    # every depth plus one long-lived tree; tuples only, pure pymalloc churn.
    "binary_trees": ("python", {"full": (14, 1), "quick": (13, 1), "callgrind": (10, 1)}, """
def make_tree(d):
    return (make_tree(d - 1), make_tree(d - 1)) if d else (None, None)

def check_tree(t):
    left, right = t
    return 1 if left is None else 1 + check_tree(left) + check_tree(right)
""", """
long_lived = make_tree(N)
total = 0
for d in range(4, N + 1, 2):
    for _i in range(2 ** (N - d + 4)):
        total += check_tree(make_tree(d))
total += check_tree(long_lived)
del long_lived
"""),
    # json.dumps/json.loads of a 1.3 MB document of nested dicts, lists and strings.
    "json_roundtrip": ("python", {"full": (5_000, 12), "quick": (5_000, 5), "callgrind": (1_000, 1)},
                       """
import json
doc = {"items": [{"id": i, "name": f"item-{i}", "price": i * 0.25, "tags": ["a", "b", str(i)],
                  "attrs": {"w": i % 7, "h": i % 11, "ok": i % 2 == 0}} for i in range(N)]}
""", """
for _r in range(R):
    text = json.dumps(doc)
    back = json.loads(text)
    assert len(back["items"]) == N
del text, back
"""),
    # Strings: f-strings, join, in-place += growth (realloc of one large str), split and
    # replace (many new small strs), encode/decode.
    "strings": ("python", {"full": (200_000, 3), "quick": (100_000, 2), "callgrind": (20_000, 1)},
                "", """
for _r in range(R):
    parts = [f"{i}:{i * i:x};" for i in range(N)]
    joined = "".join(parts)
    grown = ""
    for i in range(N // 4):
        grown += f"<{i}>"
    words = joined.split(";")
    swapped = joined.replace(":", "=").upper()
    raw = swapped.encode("utf-8").decode("utf-8")
    assert len(words) == N + 1 and len(raw) == len(joined)
del parts, joined, grown, words, swapped, raw
"""),
    # pandas: a 1M-row frame with string (object) keys; groupby agg, transform, value_counts.
    "pandas_groupby": ("python", {"full": (1_000_000, 2), "quick": (500_000, 1), "callgrind": (50_000, 1)},
                       """
import numpy as np
import pandas as pd
_rng = np.random.default_rng(0)
df = pd.DataFrame({"key": np.array([f"k{i}" for i in range(1000)], dtype=object)[_rng.integers(0, 1000, N)],
                   "k2": _rng.integers(0, 20, N), "a": _rng.integers(0, 100, N),
                   "b": _rng.random(N)})
""", """
for _r in range(R):
    agg = df.groupby("key").agg(a_sum=("a", "sum"), b_mean=("b", "mean"), n=("b", "size"))
    tr = df.groupby(["key", "k2"])["b"].transform("mean")
    vc = df["key"].value_counts()
    top = df.groupby("k2").apply(lambda g: g.nlargest(3, "b"), include_groups=False)
del agg, tr, vc, top
"""),
    # Many small arrays: each iteration creates a handful of 16-64 element arrays (NumPy's
    # small-allocation cache and the NEP 49 handler on every one).
    "small_arrays": ("numpy", {"full": (100_000, 1), "quick": (50_000, 1), "callgrind": (5_000, 1)},
                     """
import numpy as np
""", """
s = 0.0
for i in range(N):
    a = np.arange(16.0)
    b = a * 2.0 + i
    c = np.concatenate([a, b])
    s += float(c.sum())
del a, b, c
"""),
    # A few large arrays: 16 MB each (above the attribution threshold, so each one is
    # charged to its line), written, combined and sorted. Below glibc's 32 MiB mmap ceiling,
    # so after the first round they reuse heap pages: fresh 200 MB mmaps would time the
    # kernel's page-fault and huge-page compaction path instead, which here varied 3x from
    # one process to the next whatever the tool.
    "large_arrays": ("numpy", {"full": (2_000_000, 60), "quick": (2_000_000, 30), "callgrind": (500_000, 1)},
                     """
import numpy as np
""", """
for _r in range(R):
    a = np.ones(N)
    b = a * 2.0
    c = np.sqrt(b) + a
    d = np.sort(c[::7])
    del a, b, c, d
"""),
    # ufunc chains on 1M float64 (8 MB temporaries, above the attribution threshold) and on
    # 10k float64 (80 KB, below it).
    "ufunc_chains": ("numpy", {"full": (1_000_000, 20), "quick": (1_000_000, 10), "callgrind": (100_000, 2)},
                     """
import numpy as np
x = np.random.default_rng(0).random(N)
small = x[:10_000].copy()
""", """
for _r in range(R):
    y = np.exp(-x) * np.sin(x) + np.sqrt(x) / (1.0 + x ** 2)
    z = np.where(y > 0.5, np.log1p(y), y * y).cumsum()
for _r in range(R * 100):
    w = np.tanh(small) * 3.0 - small
del y, z, w
"""),
    # scipy.sparse construction: random COO, COO->CSR->CSC, CSR from (data, (rows, cols)),
    # vstack and kron.
    "sparse_construct": ("numpy", {"full": (20_000, 3), "quick": (20_000, 2), "callgrind": (2_000, 1)},
                         """
import numpy as np
import scipy.sparse as sp
_rng = np.random.default_rng(0)
""", """
for _r in range(R):
    coo = sp.random(N, N, density=0.002, format="coo", random_state=_rng)
    csr = coo.tocsr()
    csc = csr.tocsc()
    rows = _rng.integers(0, N, 400_000)
    cols = _rng.integers(0, N, 400_000)
    built = sp.csr_matrix((np.ones(400_000), (rows, cols)), shape=(N, N))
    stacked = sp.vstack([csr, built]).tocsr()
    k = sp.kron(sp.identity(4, format="csr"), csr[: N // 4, : N // 4], format="csr")
del coo, csr, csc, rows, cols, built, stacked, k
"""),
    # scipy.sparse products: CSR @ CSR, CSR.T @ CSR, CSR @ dense vector and block, multiply.
    "sparse_products": ("numpy", {"full": (20_000, 3), "quick": (20_000, 2), "callgrind": (2_000, 1)},
                        """
import numpy as np
import scipy.sparse as sp
A = sp.random(N, N, density=0.0005, format="csr", random_state=np.random.default_rng(1))
v = np.random.default_rng(2).random(N)
B = np.random.default_rng(3).random((N, 16))
""", """
for _r in range(R):
    AA = A @ A
    AtA = A.T @ A
    for _i in range(100):
        y = A @ v
    AB = A @ B
    H = A.multiply(A) + A
del AA, AtA, y, AB, H
"""),
}

# Native memory (docs/design.md, "Native memory"): libraries that allocate outside Python's
# allocators, through memguard's GOT-patched native hooks. Group "native": reported, not
# part of the python/numpy geomeans. Only listed when pyarrow, polars and torch import
# (requirements/ci.txt pins them; a bench venv without them runs what it has).
NATIVE_WORKLOADS = {
    # An Arrow compute chain: arithmetic, a filter and a sort on int64/float64 columns.
    "arrow_compute": ("native", {"full": (4_000_000, 3), "quick": (2_000_000, 2),
                                 "callgrind": (100_000, 1)}, """
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
x = pa.array(np.arange(N, dtype=np.int64))
y = pa.array(np.random.default_rng(0).random(N))
""", """
for _r in range(R):
    z = pc.add(pc.multiply(x, 3), 1)
    w = pc.multiply(y, pc.cast(z, pa.float64()))
    kept = pc.filter(w, pc.greater(y, 0.5))
    order = pc.sort_indices(kept)
del z, w, kept, order
"""),
    # A polars group-by: 64 groups, sum/mean/count over two columns.
    "polars_groupby": ("native", {"full": (4_000_000, 3), "quick": (2_000_000, 2),
                                  "callgrind": (100_000, 1)}, """
import polars as pl
df = pl.DataFrame({"k": pl.int_range(0, N, eager=True) % 64,
                   "a": pl.int_range(0, N, eager=True) * 2,
                   "b": pl.int_range(0, N, eager=True).cast(pl.Float64)})
""", """
for _r in range(R):
    out = df.group_by("k").agg(pl.col("a").sum(), pl.col("b").mean(), pl.len())
del out
"""),
    # torch CPU ops: allocation-heavy elementwise chains and a matmul.
    "torch_cpu": ("native", {"full": (2_000, 20), "quick": (1_000, 20), "callgrind": (200, 2)},
                  """
import torch
torch.manual_seed(0)
a = torch.rand(N, N)
""", """
for _r in range(R):
    b = (a * 2 + 1).relu()
    c = b @ a
    d = torch.cat([c, b]).sum(dim=0)
del b, c, d
"""),
    # A sqlite bulk insert into an in-memory table (page cache through malloc).
    "sqlite_insert": ("native", {"full": (200_000, 3), "quick": (100_000, 2),
                                 "callgrind": (5_000, 1)}, """
import sqlite3
rows = [(i, f"name-{i}", i * 0.5) for i in range(N)]
""", """
for _r in range(R):
    con = sqlite3.connect(":memory:")
    con.execute("create table t(id integer primary key, name text, v real)")
    con.executemany("insert into t values (?, ?, ?)", rows)
    con.commit()
    con.close()
del con
"""),
}


def _native_available():
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("pyarrow", "polars", "torch"))


if _native_available():
    WORKLOADS.update(NATIVE_WORKLOADS)

NOTEBOOK_SETUP = """
import time
import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
"""


def notebook_cells(path=NOTEBOOK):
    """The notebook's code cells as strings, without ``%load_ext memguard`` (every
    configuration's set-up decides whether memguard is loaded)."""
    with open(path) as fh:
        nb = json.load(fh)
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        if src.strip() == "%load_ext memguard":
            continue
        cells.append(src)
    return cells


def names():
    return list(WORKLOADS) + ["notebook"]


def group(name):
    return "numpy" if name == "notebook" else WORKLOADS[name][0]


def cells(name, scale):
    """``(setup, [body cells])`` for workload ``name`` at ``scale``."""
    if name == "notebook":
        return NOTEBOOK_SETUP, notebook_cells()
    _group, sizes, setup, body = WORKLOADS[name]
    n, r = sizes[scale]
    setup = f"N = {n}\nR = {r}\n" + textwrap.dedent(setup)
    return setup, [textwrap.dedent(body)]
