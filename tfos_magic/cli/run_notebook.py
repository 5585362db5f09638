"""`tfos run`: execute a notebook headless on the `tfos` kernel, with papermill.

Papermill does the work: it injects the parameters after the cell tagged `parameters`,
runs the cells with nbclient, and saves the notebook as each cell ends, so even a failed
run leaves a readable record. This module adds what a batch run of tfos notebooks needs:
a clear error for a missing notebook or kernel, progress of the jobs the notebook trains
(followed through the job store, since they run in the kernel), a Ctrl-C that stops a
training cell the way the notebook's stop button does, and, on failure, the failing
cell's number and error instead of a traceback dump.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TfosError
from ..job import JobStore
from . import INTERRUPTED
from .progress import ProgressObserver, StoreFollower

KERNEL_START_S = 120  # the tfos kernel imports the extension; a loaded machine is slow
INJECTED_TAG, ERROR_TAG = "injected-parameters", "papermill-error-cell-tag"  # the cells papermill adds


@dataclass
class RunRequest:
    notebook: Path
    output: Path | None = None
    html: Path | None = None
    parameters: dict[str, Any] | None = None
    kernel: str = "tfos"
    timeout: float | None = None  # per cell, as papermill's --execution-timeout
    bar: bool | None = None  # a tqdm bar for the jobs' progress; None: when stderr is a terminal


def default_output(notebook: Path) -> Path:
    """NAME.out.ipynb beside NAME.ipynb: the input is never overwritten, and a re-run
    replaces the last run's record."""
    return notebook.with_name(notebook.stem + ".out.ipynb")


def kernel_language(name: str) -> str:
    """The kernel spec's language (papermill needs one when the notebook names none), or a
    clear error when no kernel of that name is installed."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        return manager.get_kernel_spec(name).language
    except NoSuchKernel:
        found = ", ".join(sorted(manager.find_kernel_specs())) or "none"
        raise TfosError(
            f"No Jupyter kernel named {name!r} (installed: {found}). `pip install tfos-magic` installs the "
            "`tfos` kernel spec (check with `jupyter kernelspec list`); or pass --kernel NAME.") from None


def run(request: RunRequest) -> int:
    """Execute the notebook; returns the exit status (0, 1 for a failed cell, 130 on Ctrl-C)."""
    import papermill
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync
    from nbclient.exceptions import DeadKernelError

    notebook = request.notebook
    if not notebook.is_file():
        raise TfosError(f"No notebook at {notebook}.")
    language = kernel_language(request.kernel)
    output = request.output or default_output(notebook)
    logging.getLogger("papermill").setLevel(logging.WARNING)  # its notes, not its per-cell chatter
    print(f"tfos run: {notebook} on kernel {request.kernel!r} -> {output}", flush=True)

    # Our own kernel manager, so that Ctrl-C can interrupt the kernel (papermill's would
    # only be shut down, killing a training job before its workers checkpoint).
    log_path = kernel_log(output)
    log = open(log_path, "wb")
    km = _kernel_manager(AsyncKernelManager, request.kernel, log)
    interrupt = _Interrupt(km)
    follower = StoreFollower(JobStore(), time.time(), lambda spec: ProgressObserver.for_spec(spec, request.bar),
                             driver_pid=lambda: getattr(km.provisioner, "pid", None))
    failure = None
    previous = signal.signal(signal.SIGINT, interrupt.handle)
    follower.start()
    try:
        papermill.execute_notebook(
            str(notebook), str(output), parameters=request.parameters or {}, kernel_name=request.kernel,
            language=language, cwd=str(notebook.parent.resolve()), progress_bar=False, start_timeout=KERNEL_START_S,
            execution_timeout=request.timeout, km=km, interrupt_on_timeout=True, on_cell_execute=interrupt.check)
    except papermill.PapermillExecutionError as exc:
        failure = exc
    except _Stopped:
        print(f"tfos run: interrupted between cells; the executed part is in {output}", file=sys.stderr)
        return INTERRUPTED
    except DeadKernelError:
        raise TfosError(f"The {request.kernel!r} kernel died while running {notebook} (out of memory?); the "
                        f"cells it finished are in {output}.") from None
    finally:
        signal.signal(signal.SIGINT, previous)
        follower.close()
        if km.has_kernel:
            run_sync(km.shutdown_kernel)()  # before an HTML export, and even after a second Ctrl-C
        log.close()
    if request.html is not None:
        _export_html(output, request.html)
    if failure is None:
        print(f"tfos run: done: {output}" + (f", {request.html}" if request.html else "")
              + f" (the kernel's log: {log_path})", flush=True)
        return 0
    where = _cell_number(output, failure.cell_index)
    if interrupt.requested:
        print(f"tfos run: interrupted in cell {where}; the executed part is in {output}", file=sys.stderr)
        return INTERRUPTED
    if failure.ename == "KeyboardInterrupt" and request.timeout:
        print(f"tfos run: cell {where} ran past --timeout {request.timeout:g}s and was interrupted; "
              f"the executed part is in {output}", file=sys.stderr)
        return 1
    print(f"tfos run: cell {where} failed: {failure.ename}: {failure.evalue}\n"
          f"  the executed notebook, with the full traceback: {output}\n"
          f"  the kernel's log (Spark, TensorFlow): {log_path}; its last lines:\n{_tail(log_path)}", file=sys.stderr)
    return 1


LOG_TAIL_LINES = 20


def kernel_log(output: Path) -> Path:
    """NAME.out.log beside NAME.out.ipynb: what the kernel's process and its children
    (Spark's JVM, TensorFlow's native logging, the TF processes of local Spark) write."""
    return output.with_suffix(".log")


def _kernel_manager(base: Any, kernel: str, log: Any) -> Any:
    """A kernel manager whose kernel writes its stdout and stderr to `log`: a batch run
    shows its progress and the notebook's errors, not the JVM's and TensorFlow's logs."""

    class KernelWithLog(base):
        async def start_kernel(self, **kw: Any) -> None:
            kw.setdefault("stdout", log)
            kw.setdefault("stderr", log)
            await super().start_kernel(**kw)

    return KernelWithLog(kernel_name=kernel)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"  (unreadable: {exc.strerror})"
    return "\n".join(f"  {line}" for line in text[-lines:]) or "  (empty)"


class _Stopped(Exception):
    """The run was interrupted while no cell ran: the next cell is not started."""


class _Interrupt:
    """SIGINT while the notebook runs: the first one interrupts the kernel (a training cell
    checkpoints and stops, and the run ends with 130) and lets no further cell start (an
    idle kernel ignores an interrupt); a second one gives up at once."""

    def __init__(self, km: Any) -> None:
        self.km, self.requested = km, False

    def check(self, **cell: Any) -> None:
        """nbclient's hook before each cell is sent to the kernel."""
        if self.requested:
            raise _Stopped

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ntfos run: interrupting the kernel (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
        # The handler runs inside papermill's event loop; the kernel's interrupt is a signal to
        # its process group, so a loop of its own in a short thread can send it.
        threading.Thread(target=lambda: asyncio.run(self.km.interrupt_kernel()), daemon=True).start()


def _cell_number(output: Path, index: int) -> str:
    """The failing cell as the user counts cells in the input notebook (1-based), from its
    index among the cells papermill ran (which include the injected parameters)."""
    import nbformat

    try:
        cells = [c for c in nbformat.read(output, as_version=4).cells
                 if ERROR_TAG not in c.metadata.get("tags", [])]
    except (OSError, ValueError):
        return str(index + 1)
    mine = [c for c in cells[:index + 1] if INJECTED_TAG not in c.metadata.get("tags", [])]
    count = cells[index].get("execution_count") if index < len(cells) else None
    return f"{len(mine)}" + (f" (In [{count}])" if count else "")


def _export_html(notebook: Path, html: Path) -> None:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(notebook))
    html.write_text(body, encoding="utf-8")
