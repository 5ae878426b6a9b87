"""memguard as a user installs it: one libzmq per kernel process (pyzmq's), none linked by
memguard._core, and the monitor's records reaching the relay over inproc://.

Runs in `make test` (the developer venv) and in `make test-matrix` (each CPython 3.10-3.13,
memguard installed from its wheel)."""

import subprocess

import memguard._core as core


def test_core_links_no_libzmq():
    out = subprocess.run(["ldd", core.__file__], capture_output=True, text=True, check=True)
    assert "libzmq" not in out.stdout, out.stdout


def test_kernel_maps_one_libzmq_and_alerts_travel_inproc(kernel):
    # Every libzmq file mapped in the kernel: the one pyzmq loaded (its wheel's bundled
    # copy, or the system's on a distribution's pyzmq), and no second copy for memguard.
    ex = kernel.execute(
        "maps = {l.split()[-1] for l in open('/proc/self/maps') if 'libzmq' in l}\n"
        "print(len(maps), sorted(maps))\n")
    assert ex.stdout.startswith("1 "), ex.stdout
    # The relay's endpoint is in-process: no ipc socket file, no private directory.
    ex = kernel.execute("from memguard._state import STATE\nprint(STATE.relay.endpoint)")
    assert ex.stdout.strip().startswith("inproc://memguard-relay-"), ex.stdout
    # A record from the C monitor arrives through it: a budget alert under this cell.
    kernel.execute("%memguard budget 50MB")
    ex = kernel.execute("import numpy as np\nx = np.ones(20_000_000)\n")
    alerts = ex.alerts_of("budget")
    assert alerts, [a[2]["kind"] for a in ex.alerts]
    assert alerts[-1][2]["line"] == 2
