"""The user surface: `%%spark_etl`, `%%tf_train` and `%tfos_jobs`.

Thin on purpose: parse the line, keep the job's DataFrame, store the spec, and hand
the job to the launcher.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .errors import TfosError
from .job import Job, JobSpec, JobStore, TrainOptions
from .job.store import check_name
from .protocol.cells import check_train_source, run_cell
from .session import get_spark

_DEFAULTS = TrainOptions()
STOP_WAIT_S = 15.0
log = logging.getLogger(__name__)


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@magics_class
class TfosMagics(Magics):
    def __init__(self, shell: Any, store: JobStore | None = None) -> None:
        super().__init__(shell)
        self.store = store or JobStore()
        self.frames: dict[str, Any] = {}  # job name -> DataFrame, for this kernel's life
        self.live: dict[str, Any] = {}  # job name -> observers of its background run
        self.threads: dict[str, threading.Thread] = {}

    # ------------------------------------------------------------------
    @magic_arguments()
    @argument("job", help="job name (letters, digits, '_', '-', '.')")
    @argument("--df", metavar="NAME", help="take the DataFrame from this variable, not the last expression")
    @cell_magic
    def spark_etl(self, line: str, cell: str) -> None:
        """Build the job's Spark DataFrame; `spark` is the notebook's SparkSession."""
        args = parse_argstring(self.spark_etl, line)
        name = check_name(args.job)
        from pyspark.sql import DataFrame

        ns = self.shell.user_ns
        spark = get_spark(ns)
        value = run_cell(cell, name, ns, kind="spark_etl")
        if args.df:
            if args.df not in ns:
                raise TfosError(f"--df {args.df}: the cell defined no variable {args.df!r}.")
            value = ns[args.df]
        if not isinstance(value, DataFrame):
            got = "nothing" if value is None else f"a {type(value).__name__}"
            raise TfosError(
                f"The %%spark_etl cell of job {name!r} must produce a Spark DataFrame, but it produced "
                f"{got}. End the cell with the DataFrame as its last line, or pass --df VARIABLE."
            )
        spec = self.store.load_spec(name) if self.store.exists(name) else JobSpec(name)
        spec.etl_source, spec.etl_df_var = cell, args.df
        self.store.save_spec(spec)
        self.frames[name] = value
        print(f"tfos job {name!r}: DataFrame registered ({value.rdd.getNumPartitions()} partitions, "
              f"Spark {spark.version})")
        print(value.schema.treeString().rstrip())

    # ------------------------------------------------------------------
    @magic_arguments()
    @argument("job")
    @argument("--workers", type=int, default=_DEFAULTS.workers, help="TF workers = Spark barrier tasks")
    @argument("--epochs", type=int, default=_DEFAULTS.epochs, help="train until this many epochs in total")
    @argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="rows per step on each worker")
    @argument("--label", help="label column (needed by build_model)")
    @argument("--features", help="comma-separated feature columns (default: all but the label)")
    @argument("--inputs", default="auto", choices=["auto", "matrix", "dict"],
              help="features as one float32 matrix, or a dict of named tensors (auto: matrix if all scalar floats)")
    @argument("--validation-df", metavar="NAME", help="variable holding a validation DataFrame")
    @argument("--checkpoint-dir", help="any tf.io.gfile path (default: the job's directory)")
    @argument("--checkpoint-every-steps", type=int, default=0, help="also checkpoint every N global steps")
    @argument("--restart", action="store_true", help="ignore and delete earlier checkpoints")
    @argument("--fillna", type=float, help="replace nulls in scalar feature columns with this value")
    @argument("--strategy", default="allreduce", choices=["allreduce", "ps"],
              help="allreduce (MultiWorkerMirroredStrategy) or ps (variables on parameter servers)")
    @argument("--ps", type=int, help="parameter-server tasks with --strategy ps (default 1)")
    @argument("--gpus-per-worker", type=int, default=0, help="GPUs each worker task asks Spark for")
    @argument("--zookeeper", metavar="HOST:PORT[/CHROOT]",
              help="service registry for --strategy ps (default: TFOS_ZOOKEEPER, else embedded in the notebook)")
    @argument("--zk-auth", metavar="USER:PASSWORD", help="ZooKeeper digest auth; the job's znodes get a digest ACL")
    @argument("--max-restarts", type=int, default=_DEFAULTS.max_restarts,
              help="restarts from the latest checkpoint after a task dies")
    @argument("--start-timeout", type=float, default=_DEFAULTS.start_timeout,
              help="seconds for all TF workers to start once their Spark stage runs")
    @argument("--background", action="store_true",
              help="return at once; the job runs on in this kernel (see %%tfos_status, %%tfos_stop)")
    @cell_magic
    def tf_train(self, line: str, cell: str) -> None:
        """Train on the job's DataFrame with build_model() (Keras fit) or train(ctx); blocks until done."""
        args = parse_argstring(self.tf_train, line)
        name = check_name(args.job)
        thread = self.threads.get(name)
        if thread is not None and thread.is_alive():
            raise TfosError(f"Job {name!r} is already running in this kernel, in the background. Stop it with "
                            f"%tfos_stop {name}, or give the new run another job name.")
        if not self.store.exists(name) or name not in self.frames:
            raise TfosError(
                f"Job {name!r} has no DataFrame in this kernel. Run a `%%spark_etl {name}` cell first "
                "(it registers the DataFrame the job trains on)."
            )
        for flag, value in (("--workers", args.workers), ("--epochs", args.epochs), ("--batch-size", args.batch_size)):
            if value < 1:
                raise TfosError(f"{flag} must be at least 1, not {value}.")
        check_train_source(cell, name)
        validation = self._validation_frame(args.validation_df)
        spec = self.store.load_spec(name)
        spec.train_source = cell
        spec.options = TrainOptions(
            workers=args.workers, epochs=args.epochs, batch_size=args.batch_size, label=args.label,
            features=_csv(args.features), validation_df=args.validation_df,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every_steps=args.checkpoint_every_steps,
            restart=args.restart, fillna=args.fillna, inputs=args.inputs, strategy=args.strategy,
            ps=(1 if args.ps is None else args.ps) if args.strategy == "ps" else 0,
            gpus_per_worker=args.gpus_per_worker, zookeeper=args.zookeeper,
            zk_auth=args.zk_auth or os.environ.get("TFOS_ZK_AUTH"), max_restarts=args.max_restarts,
            start_timeout=args.start_timeout,
        )
        self.store.save_spec(spec)
        from .driver.launcher import launch, refuse_if_running
        from .ui.views import observers_for

        spark = get_spark(self.shell.user_ns)
        observers = observers_for(self.shell, spec, spark, validation is not None, background=args.background)
        if not args.background:
            launch(spark, spec, self.frames[name], self.store, validation, observers=observers)
            return
        refuse_if_running(self.store, name)
        for view in observers.observers:  # shown here, in this cell, before the thread starts
            show = getattr(view, "show", None)
            if callable(show):
                show()
        self.live[name] = observers
        thread = threading.Thread(target=self._background, name=f"tfos-{name}", daemon=True,
                                  args=(spark, spec, self.frames[name], validation, observers))
        thread.start()
        self.threads[name] = thread
        if not any(hasattr(v, "show") for v in observers.observers):
            print(f"tfos job {name!r} runs in the background: %tfos_status {name} shows it, %tfos_stop {name} "
                  "stops it.")

    def _background(self, spark: Any, spec: JobSpec, frame: Any, validation: Any, observers: Any) -> None:
        """A background run: its end (success, failure, stop) is in the store and the dashboard."""
        from .driver.launcher import launch

        try:
            launch(spark, spec, frame, self.store, validation, observers=observers)
        except Exception:  # noqa: BLE001 - already recorded in state.json and shown by the dashboard
            log.info("tfos: background job %s ended with an error", spec.name, exc_info=True)
        finally:
            self.live.pop(spec.name, None)

    # ------------------------------------------------------------------
    @line_magic
    def tfos_status(self, line: str = "") -> None:
        """Show a job's dashboard: its history from metrics.jsonl, then live if it runs here."""
        name = check_name(line.strip())
        from .ui.views import replay

        view = replay(self.store, name, self.shell)
        live = self.live.get(name)
        state = self.store.read_state(name) or {}
        if live is not None:
            live.observers.append(view)  # from now on it follows the run
        elif state.get("state") == "running":
            print(f"tfos job {name!r} is running in another kernel ({state.get('driver_host')}, pid "
                  f"{state.get('driver_pid')}): this is its history so far.")
        else:
            view.on_end(state)

    @line_magic
    def tfos_stop(self, line: str = "") -> None:
        """Stop a running job: its Spark jobs are cancelled and its TF processes end."""
        from .driver.launcher import request_stop

        name = check_name(line.strip())
        state = self.store.read_state(name) or {}
        here = request_stop(self.store, name)
        if not here and state.get("state") != "running":
            self.store.clear_stop_request(name)
            raise TfosError(f"Job {name!r} is not running (state: {state.get('state', 'registered')}).")
        thread = self.threads.get(name)
        if here and thread is not None:
            thread.join(STOP_WAIT_S)
        after = (self.store.read_state(name) or {}).get("state")
        print(f"tfos job {name!r}: " + ("stopped" if after == "stopped" else
                                        "stop requested; the kernel that runs it ends it within seconds"))

    def _validation_frame(self, var: str | None):
        if var is None:
            return None
        from pyspark.sql import DataFrame

        value = self.shell.user_ns.get(var, self.frames.get(var))
        if not isinstance(value, DataFrame):
            raise TfosError(f"--validation-df {var}: no Spark DataFrame named {var!r} in the notebook "
                            "(or registered job of that name).")
        return value

    # ------------------------------------------------------------------
    @line_magic
    def tfos_jobs(self, line: str = "") -> None:
        """List the jobs in the store with their state and last metrics."""
        names = self.store.names()
        if not names:
            print(f"No tfos jobs in {self.store.jobs_dir}.")
            return
        print(f"{'job':24} {'state':10} {'epochs':>6}  last metrics")
        for n in names:
            job = Job(n, self.store)
            hist = job.history
            last = ", ".join(f"{k}={v:.4g}" for k, v in hist[-1].items()
                             if k != "epoch" and isinstance(v, (int, float))) if hist else ""
            print(f"{n:24} {job.state:10} {len(hist):>6}  {last}")
