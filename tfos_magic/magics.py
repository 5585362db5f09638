"""The user surface: `%%spark_etl`, `%%tf_train`, `%%torch_train`, `%tfos_resume`, `%tfos_status`,
`%tfos_stop` and `%tfos_jobs`.

Thin on purpose: parse the line and call the job API (api.py). The `%%tf_train` and
`%tfos_resume` parsers are generated from the option declarations (protocol/options.py).
"""

from __future__ import annotations

import os
import time
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser

from . import api
from .driver.spark_backend import backend_for, schema_text
from .errors import TfosError
from .job import Job, JobStore, RunOrigin
from .job.store import check_name
from .protocol.options import add_arguments, options_from


def _parser(prog: str, description: str, train: bool) -> MagicArgumentParser:
    parser = MagicArgumentParser(prog=prog, description=description, add_help=False)
    parser.add_argument("job", help="job name (letters, digits, '_', '-', '.')")
    add_arguments(parser)
    if train:
        parser.add_argument("--rerun-etl", action="store_true",
                            help="re-run the job's stored %%spark_etl cell when this kernel holds no DataFrame")
    parser.add_argument("--background", action="store_true",
                        help="return at once; the job runs on in this kernel (see %%tfos_status, %%tfos_stop)")
    return parser


TRAIN = _parser("%%tf_train", "Train on the job's DataFrame with build_model() (Keras fit) or train(ctx).", True)
TORCH = _parser("%%torch_train", "Train on the job's DataFrame with PyTorch DistributedDataParallel: build_model() "
                "returning (model, optimizer, loss_fn), trained by tfos' loop, or train(ctx) with ctx.dataloader().",
                True)
RESUME = _parser("%tfos_resume", "Continue a stored job from its latest checkpoint, with its stored cells and "
                 "options (an option given here replaces the stored one, e.g. --epochs 10); the DataFrame is "
                 "rebuilt from the stored %%spark_etl cell unless this kernel holds it.", False)
ETL = MagicArgumentParser(prog="%%spark_etl", add_help=False,
                          description="Build the job's Spark DataFrame; `spark` is the notebook's SparkSession.")
ETL.add_argument("job", help="job name (letters, digits, '_', '-', '.')")
ETL.add_argument("--df", metavar="NAME", help="take the DataFrame from this variable, not the last expression")


def _views(shell: Any) -> api.ViewFactory:
    from .ui.views import observers_for

    return lambda spec, spark, has_validation, background: observers_for(
        shell, spec, spark, has_validation, background=background)


def run_origin(shell: Any) -> RunOrigin:
    """The notebook and cell running now, as the front end told the kernel: the server
    gives a kernel its notebook's path in JPY_SESSION_NAME, and JupyterLab sends the cell's
    id in the execute request's metadata. Either may be missing (a terminal IPython, an
    older front end, a kernel started outside a server); then it is None."""
    cell_id = None
    try:
        parent = shell.kernel.get_parent()
        cell_id = (parent.get("metadata") or {}).get("cellId")
    except Exception:  # noqa: BLE001 - no kernel, or one that keeps no parent: no cell id
        pass
    return RunOrigin(notebook_path=os.environ.get("JPY_SESSION_NAME") or None,
                     cell_id=cell_id if isinstance(cell_id, str) and cell_id else None)


@magics_class
class TfosMagics(Magics):
    def __init__(self, shell: Any, store: JobStore | None = None) -> None:
        super().__init__(shell)
        self.store = store or JobStore()

    @cell_magic
    def spark_etl(self, line: str, cell: str) -> None:
        args = ETL.parse_argstring(line)
        value = api.run_etl(args.job, cell, self.shell.user_ns, args.df, self.store)
        # Read from the plan: `value.rdd` would run every shuffle of an adaptive query here.
        shown = backend_for(value.sparkSession).partitions_text(value)
        print(f"tfos job {args.job!r}: DataFrame registered ({shown}, Spark {value.sparkSession.version})")
        print(schema_text(value).rstrip())

    spark_etl.__doc__ = ETL.format_help()

    @cell_magic
    def tf_train(self, line: str, cell: str) -> None:
        self._train(TRAIN.parse_argstring(line), cell, "tensorflow")

    tf_train.__doc__ = TRAIN.format_help()

    @cell_magic
    def torch_train(self, line: str, cell: str) -> None:
        self._train(TORCH.parse_argstring(line), cell, "torch")

    torch_train.__doc__ = TORCH.format_help()

    def _train(self, args: Any, cell: str, framework: str) -> None:
        if args.framework not in (None, framework):
            right = "%%torch_train" if args.framework == "torch" else "%%tf_train"
            raise TfosError(f"--framework {args.framework} in a {'%%tf_train' if framework == 'tensorflow' else '%%torch_train'} "
                            f"cell: use a {right} cell for it.")
        args.framework = framework
        api.train(args.job, cell, options_from(args), namespace=self.shell.user_ns, views=_views(self.shell),
                  background=args.background, rerun_etl=args.rerun_etl, store=self.store,
                  origin=run_origin(self.shell))
        self._say_background(args.job, args.background)

    @line_magic
    def tfos_resume(self, line: str = "") -> None:
        args = RESUME.parse_argstring(line)
        api.resume(args.job, namespace=self.shell.user_ns, views=_views(self.shell), background=args.background,
                   store=self.store, overrides=args, origin=run_origin(self.shell))
        self._say_background(args.job, args.background)

    tfos_resume.__doc__ = RESUME.format_help()

    def _say_background(self, name: str, background: bool) -> None:
        live = api.live_observers(name)
        if background and live is not None and not any(hasattr(v, "show") for v in live.observers):
            print(f"tfos job {name!r} runs in the background: %tfos_status {name} shows it, %tfos_stop {name} "
                  "stops it.")

    # ------------------------------------------------------------------
    @line_magic
    def tfos_status(self, line: str = "") -> None:
        """Show a job's dashboard: its history from metrics.jsonl, then live if it runs here."""
        name = check_name(line.strip())
        from .ui.views import replay

        view = replay(self.store, name, self.shell)
        live = api.live_observers(name)
        state = api.status(name, self.store)
        if live is not None:
            live.observers.append(view)  # from now on it follows the run
        elif state.get("state") == "running":
            print(f"tfos job {name!r} is running in another kernel ({state.get('driver_host')}, pid "
                  f"{state.get('driver_pid')}): this is its history so far.")
        else:
            view.on_end(state)

    @line_magic
    def tfos_stop(self, line: str = "") -> None:
        """Stop a running job: the workers checkpoint, its Spark jobs are cancelled and its TF processes end."""
        name = check_name(line.strip())
        after = api.stop(name, self.store)
        print(f"tfos job {name!r}: " + ("stopped" if after == "stopped" else
                                        "stop requested; the kernel that runs it ends it within seconds"))

    # ------------------------------------------------------------------
    @line_magic
    def tfos_jobs(self, line: str = "") -> None:
        """List the jobs in the store with their state and last metrics."""
        names = self.store.names()
        if not names:
            print(f"No tfos jobs in {self.store.jobs_dir}.")
            return
        print(f"{'job':24} {'state':11} {'epochs':>6}  last metrics")
        for n in names:
            hist = Job(n, self.store).history
            last = ", ".join(f"{k}={v:.4g}" for k, v in hist[-1].items()
                             if k != "epoch" and isinstance(v, (int, float))) if hist else ""
            state = self.store.read_state(n) or {}  # read once: reconciled (interrupted) as Job.state is
            if state.get("state") == "interrupted":  # its kernel died: say when, and how to go on
                at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.get("interrupted_at") or 0))
                note = f"kernel lost, last heartbeat {at}; %tfos_resume {n} continues it"
                last = note + (f"; {last}" if last else "")
            print(f"{n:24} {state.get('state', 'registered'):11} {len(hist):>6}  {last}")
