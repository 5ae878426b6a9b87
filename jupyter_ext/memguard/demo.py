"""Run a notebook in a fresh kernel and print memguard alerts as they arrive.

This is the runner behind ``make demo``::

    python -m memguard.demo NOTEBOOK OUTDIR [--timeout SECONDS]

NOTEBOOK is executed with nbclient in a new ``python3`` kernel, from the notebook's own
folder. Each IOPub ``display_data`` or ``update_display_data`` message that carries
``application/vnd.memguard.alert+json`` is printed as one line while its cell is still
running, for example::

    [memguard] cell 3 line 6 sparse_to_dense: <message>

The executed notebook is then written to ``OUTDIR/<name>.ipynb``, and an HTML rendering to
``OUTDIR/<name>.html``. Finally the runner prints the number of alerts of each kind.

Exit status: 0 if every cell ran, 1 if a cell raised, timed out or the kernel died (the
partly executed notebook is still written), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbconvert import HTMLExporter
from traitlets import Callable

ALERT_MIME = "application/vnd.memguard.alert+json"
ALERT_MSG_TYPES = ("display_data", "update_display_data")


class AlertWatchingClient(NotebookClient):
    """A NotebookClient that passes each memguard alert to ``on_alert`` as it arrives.

    nbclient 0.11 has no per-message hook (the ``on_cell_*`` hooks fire once per cell), so
    this overrides ``process_message``. That method sees every IOPub message parented to the
    running cell, including ``update_display_data``, which never reaches ``output()``.
    """

    on_alert = Callable(
        default_value=None,
        allow_none=True,
        help="Called as on_alert(alert: dict, updated: bool, cell_index: int) for each alert.",
    )

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        if self.on_alert is not None and msg["msg_type"] in ALERT_MSG_TYPES:
            data = msg["content"].get("data") or {}
            if ALERT_MIME in data:
                self.on_alert(
                    _decode_alert(data[ALERT_MIME]),
                    msg["msg_type"] == "update_display_data",
                    cell_index,
                )
        return super().process_message(msg, cell, cell_index)


def _decode_alert(payload: Any) -> dict[str, Any]:
    """Return the alert as a dict. JSON MIME data normally arrives parsed; accept a string too."""
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return {"kind": "unparsed", "message": payload}
    if not isinstance(payload, dict):
        return {"kind": "unparsed", "message": repr(payload)}
    return payload


def format_alert(alert: dict[str, Any], updated: bool) -> str:
    """Return one line: ``[memguard] cell 3 line 6 sparse_to_dense: <message>``.

    A null ``cell`` or ``line`` is shown as ``?``, and updates in place say ``(updated)``.
    """
    cell = alert.get("cell")
    line = alert.get("line")
    kind = alert.get("kind", "unknown")
    message = " ".join(str(alert.get("message", "")).split())
    where = f"cell {'?' if cell is None else cell} line {'?' if line is None else line}"
    status = " (updated)" if updated else ""
    return f"[memguard] {where} {kind}{status}: {message}"


class AlertLog:
    """Print each alert when it arrives and count new alerts and updates per kind."""

    def __init__(self) -> None:
        self.new: collections.Counter[str] = collections.Counter()
        self.updates: collections.Counter[str] = collections.Counter()

    def __call__(self, alert: dict[str, Any], updated: bool, cell_index: int) -> None:
        kind = str(alert.get("kind", "unknown"))
        (self.updates if updated else self.new)[kind] += 1
        print(format_alert(alert, updated), flush=True)

    def summary(self) -> str:
        """Return e.g. ``memguard alerts: 1 sparse_to_dense (+2 updates)``."""
        kinds = sorted(set(self.new) | set(self.updates))
        if not kinds:
            return "memguard alerts: none"
        parts = []
        for kind in kinds:
            part = f"{self.new[kind]} {kind}"
            if self.updates[kind]:
                n = self.updates[kind]
                part += f" (+{n} update{'s' if n != 1 else ''})"
            parts.append(part)
        return "memguard alerts: " + ", ".join(parts)


class CellProgress:
    """Print one line per executed code cell, so a long run shows where it is."""

    def __init__(self, n_code_cells: int) -> None:
        self.n_code_cells = n_code_cells
        self.n_started = 0  # code cells sent to the kernel so far, the current one included
        self.started = 0.0
        self.cell_index: int | None = None  # index in the notebook of the current code cell

    def start(self, cell: Any, cell_index: int) -> None:
        self.n_started += 1
        self.cell_index = cell_index
        self.started = time.perf_counter()

    def where(self) -> str:
        """Return e.g. `` in code cell 2/3 (notebook cell index 4)``, or ``""``."""
        if self.cell_index is None:
            return ""
        return (
            f" in code cell {self.n_started}/{self.n_code_cells}"
            f" (notebook cell index {self.cell_index})"
        )

    def executed(self, cell: Any, cell_index: int, execute_reply: dict[str, Any]) -> None:
        status = execute_reply["content"].get("status", "?") if execute_reply else "?"
        seconds = time.perf_counter() - self.started
        print(
            f"[demo] code cell {self.n_started}/{self.n_code_cells} (In [{cell.execution_count}]) "
            f"{status} in {seconds:.2f} s",
            flush=True,
        )


def _describe_failure(exc: BaseException, where: str) -> str:
    if isinstance(exc, CellExecutionError):
        return f"the notebook raised {exc.ename}{where}: {exc.evalue}"
    if isinstance(exc, CellTimeoutError):
        # nbclient's message goes on to quote the cell; its first line is enough here.
        return f"a cell timed out{where}: {str(exc).splitlines()[0]}"
    if isinstance(exc, DeadKernelError):
        return f"the kernel died{where} (was it out of memory?)"
    return f"execution failed{where}: {type(exc).__name__}: {exc}"


def write_outputs(nb: nbformat.NotebookNode, outdir: Path, name: str) -> tuple[Path, Path]:
    """Write ``outdir/<name>.ipynb`` and ``outdir/<name>.html``; return their paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    ipynb_path = outdir / f"{name}.ipynb"
    html_path = outdir / f"{name}.html"
    nbformat.write(nb, str(ipynb_path))
    body, _ = HTMLExporter().from_notebook_node(nb)
    html_path.write_text(body, encoding="utf-8")
    return ipynb_path, html_path


def run(notebook: Path, outdir: Path, timeout: int) -> int:
    """Execute ``notebook``, write the results under ``outdir``; return the exit status."""
    nb = nbformat.read(str(notebook), as_version=4)
    alerts = AlertLog()
    progress = CellProgress(sum(1 for c in nb.cells if c.cell_type == "code"))
    client = AlertWatchingClient(
        nb,
        kernel_name="python3",
        timeout=timeout,
        resources={"metadata": {"path": str(notebook.parent)}},
        on_alert=alerts,
        on_cell_execute=progress.start,
        on_cell_executed=progress.executed,
    )

    print(f"[demo] running {notebook} (timeout {timeout} s per cell)", flush=True)
    failure: str | None = None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError, RuntimeError) as exc:
        # RuntimeError also covers a kernel that failed to start.
        failure = _describe_failure(exc, progress.where())

    ipynb_path, html_path = write_outputs(nb, outdir, notebook.stem)
    print(f"[demo] executed notebook: {ipynb_path}")
    print(f"[demo] HTML:              {html_path}")
    print(f"[demo] {alerts.summary()}", flush=True)
    if failure is not None:
        print(f"[demo] error: {failure}", file=sys.stderr)
        print(f"[demo] see the outputs in {ipynb_path}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memguard.demo",
        description=(
            "Execute NOTEBOOK in a fresh python3 kernel, print memguard alerts as they arrive, "
            "and write the executed notebook and its HTML rendering to OUTDIR."
        ),
    )
    parser.add_argument("notebook", type=Path, metavar="NOTEBOOK", help="the .ipynb to run")
    parser.add_argument("outdir", type=Path, metavar="OUTDIR", help="where to write results")
    parser.add_argument(
        "--timeout",
        type=int,
        default=600,
        metavar="SECONDS",
        help="per-cell timeout in seconds (default: 600)",
    )
    args = parser.parse_args(argv)
    if not args.notebook.is_file():
        parser.error(f"no such notebook: {args.notebook}")
    if args.timeout <= 0:
        parser.error("--timeout must be a positive number of seconds")
    return run(args.notebook.resolve(), args.outdir, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
