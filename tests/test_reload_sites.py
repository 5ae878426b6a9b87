"""Reloading memguard starts from a clean slate: a block allocated while it was loaded and
freed while it was unloaded (no hook saw the free) leaves no phantom line behind, neither in
the site table (what `%memguard status` and the alerts read) nor in the black box."""

import re
import time

from conftest import Kernel

MB = 10**6
UNITS = {"bytes": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}

SITES = ("import memguard._core as _c\n"
         "print(max([r[2] for r in _c.sites(0, 1024)], default=0))")


def _tracked_in_status(text):
    """The tracked bytes `%memguard status` shows (its "tracked" row)."""
    m = re.search(r"tracked\s+(-?[\d.]+) (bytes|KB|MB|GB|TB) since load", text)
    assert m, text
    return float(m.group(1)) * UNITS[m.group(2)]


def test_reload_forgets_a_block_freed_while_unloaded(tmp_path):
    k = Kernel(env={"MEMGUARD_DIR": str(tmp_path)})
    try:
        k.execute("%load_ext memguard")
        k.execute("import numpy as np\nbig = np.ones(40_000_000)  # 320 MB on line 2")
        assert int(k.execute(SITES).stdout) >= 320 * MB  # the line holds it while loaded
        k.execute("%unload_ext memguard")
        k.execute("del big")  # no hook sees this free
        k.execute("%load_ext memguard")
        assert int(k.execute(SITES).stdout) < 320 * MB
        ex = k.execute("%memguard status")
        (msg,) = [m for _, m in ex.messages if m["msg_type"] == "display_data"]
        assert _tracked_in_status(msg["content"]["data"]["text/plain"]) < 320 * MB
        # The black box: wait for a state the monitor wrote after this cell began.
        code = ("from memguard._state import STATE\nfrom memguard import blackbox\n"
                "import time\nt0 = time.time()\nbox = blackbox.read(STATE.blackbox_path)\n"
                "while box.state is None or box.state['t'] < t0:\n"
                "    assert time.time() < t0 + 10, 'no black-box state after 10 s'\n"
                "    time.sleep(0.02)\n"
                "    box = blackbox.read(STATE.blackbox_path)\n"
                "print(max([s['bytes'] for s in box.sites], default=0))")
        deadline = time.monotonic() + 30
        ex = k.execute(code)
        assert time.monotonic() < deadline
        assert int(ex.stdout) < 320 * MB
    finally:
        k.shutdown()
