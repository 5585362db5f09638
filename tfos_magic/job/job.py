"""The read side of a job: what `tfos_magic.get_job(name)` returns.

Everything is derived from the store on each access, so a Job is valid in another
process or after a kernel restart.
"""

from __future__ import annotations

from typing import Any

from ..errors import TfosError
from ..protocol.feed_spec import FeedSpec
from ..protocol.logs import native_stderr_held
from ..protocol.model_file import ModelRef, load_model, trust_problem
from ..protocol.paths import MODEL_FILE, join_uri
from .digest import JobDigest
from .spec import JobSpec
from .store import JobStore


def tensorboard_line(log_dir: str) -> str:
    """The line that shows a job's TensorBoard logs in a notebook (after `%load_ext tensorboard`)."""
    import shlex

    return f"%tensorboard --logdir {shlex.quote(log_dir)}"


class Job:
    def __init__(self, name: str, store: JobStore | None = None) -> None:
        self.store = store or JobStore()
        self.name = name
        self.spec: JobSpec = self.store.load_spec(name)

    def __repr__(self) -> str:
        return f"<Job {self.name!r} state={self.state!r} epochs={len(self.history)}>"

    @property
    def dir(self) -> str:
        return str(self.store.job_dir(self.name))

    @property
    def _state(self) -> dict[str, Any]:
        return self.store.read_state(self.name) or {}

    @property
    def state(self) -> str:
        return self._state.get("state", "registered")

    @property
    def error(self) -> str | None:
        return self._state.get("error")

    @property
    def error_details(self) -> str | None:
        """The full traceback and log tail of the task whose error failed the job, or None:
        read from the job's own errors/ only, whatever path state.json names."""
        return self.store.read_error_details(self.name, self._state.get("error_file"))

    @property
    def checkpoint_dir(self) -> str:
        return self._state.get("checkpoint_dir") or self.spec.options.checkpoint_dir or \
            self.store.default_checkpoint_dir(self.name)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per epoch from the chief worker; a resumed run overrides epochs it redid."""
        return JobDigest.of(self.store.events(self.name)).history

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(self.store.events(self.name))

    def events_from(self, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """The events from byte `offset` of metrics.jsonl on, and the offset to pass next
        time: to follow a running job without reading its history again."""
        read = self.store.read_events(self.name, offset)
        return read.events, read.offset

    @property
    def latest_checkpoint(self) -> str | None:
        return JobDigest.of(self.store.events(self.name)).latest_checkpoint

    def overview(self) -> dict[str, Any]:
        """Where the job stands, from one read of state.json and of metrics.jsonl: the state
        (`interrupted` when its kernel died), the chief's last step and loss, the finished
        epochs, the latest checkpoint and the last epoch's metrics. For listings of many
        jobs (`tfos jobs`, `tfos status`) that should not read each file several times."""
        state, digest = self._state, JobDigest.of(self.store.events(self.name))
        history = digest.history
        return {
            "job": self.name, "state": state.get("state", "registered"), "run": state.get("run", 0),
            "step": digest.step, "loss": digest.loss, "epoch": history[-1]["epoch"] if history else 0,
            "epochs": self.spec.options.epochs, "updated": state.get("updated"),
            "interrupted_at": state.get("interrupted_at"), "error": state.get("error"),
            "error_file": state.get("error_file"), "latest_checkpoint": digest.latest_checkpoint,
            "last_metrics": history[-1] if history else None,
        }

    @property
    def model_path(self) -> str:
        saved = [e["path"] for e in self.store.events(self.name) if e.get("kind") == "model"]
        return saved[-1] if saved else join_uri(self.checkpoint_dir, MODEL_FILE)

    def load_model(self, compile: bool = True):
        """Load the trained model in the kernel with the Keras that trained it (a Keras 3
        `keras.Model`, or a legacy tf.keras model; a %%torch_train job's torch.nn.Module,
        in eval mode on the CPU), with the train cell's classes and
        functions: they come from the job's stored cell,
        so this works in a new kernel too, and the notebook's own variables are untouched."""
        path = self.model_path
        if self.spec.options.framework == "torch":  # the module, built from the cell, without TensorFlow
            return load_model(self._saved_model()["path"], self.spec.train_source, self.name)
        with native_stderr_held():
            import tensorflow as tf

        if not tf.io.gfile.exists(path):
            raise TfosError(
                f"Job {self.name!r} has no saved model at {path} (state: {self.state}). "
                "A model is saved when a build_model() job finishes, or when train(ctx) "
                "returns its Keras model."
            )
        return load_model(path, self.spec.train_source, self.name, compile=compile)

    def _saved_model(self) -> dict[str, Any]:
        saved = [e for e in self.store.events(self.name) if e.get("kind") == "model"]
        if not saved:
            raise TfosError(f"Job {self.name!r} has no trained model to use (state: {self.state}). A model is saved "
                            "when a build_model() job finishes, or when train(ctx) returns its Keras model.")
        return saved[-1]

    def predict(self, df: Any, output_col: str = "prediction") -> Any:
        """`df` with a column `output_col`: the trained model's prediction for each row.

        It runs on the executors (`mapInArrow`, the model loaded once per Python worker),
        with the features encoded as in training, and collects nothing to the driver: the
        result is a lazy Spark DataFrame, to write or join like any other.
        """
        from ..driver.predict import predict, trained_feed

        model = self._saved_model()
        outputs = model.get("outputs", 1)
        if outputs is None:
            raise TfosError(f"Job {self.name!r}'s model has several outputs; Job.predict supports one. Use "
                            "Job.load_model() and predict with it.")
        spec = trained_feed(self._state, self.spec.options, df)
        # Which save of the model it is: each run (and attempt) that saves one sends its own event.
        version = f"{model.get('run')}:{model.get('attempt')}:{model.get('time')}"
        # The executors may run as another user: they are told whether the kernel trusts the file.
        trusted = trust_problem(model["path"]) is None
        return predict(df, ModelRef(model["path"], version, self.spec.train_source, self.name, trusted), spec,
                       output_col, int(outputs), self.spec.options.fillna)

    @property
    def tensorboard_dir(self) -> str | None:
        """Where the chief of the job's latest run wrote TensorBoard's event files, if it did."""
        dirs = [e["tensorboard"] for e in self.store.events(self.name) if e.get("kind") == "training"
                and e.get("tensorboard")]
        return dirs[-1] if dirs else None

    def tensorboard(self) -> Any:
        """Start TensorBoard on the job's logs, shown inline in the notebook (TensorBoard's
        own `notebook.start`, as `%tensorboard` does): loss and metrics every 50 steps and
        every epoch, written by the chief."""
        log_dir = self.tensorboard_dir
        if log_dir is None:
            raise TfosError(f"Job {self.name!r} wrote no TensorBoard logs: they are written by build_model() jobs "
                            "when the tensorboard package is installed in the executors' Python.")
        from tensorboard import notebook

        return notebook.start(tensorboard_line(log_dir).split(" ", 1)[1])

    def input_example(self, rows: int = 2) -> Any:
        """Zeros shaped as the model took its inputs in training: one matrix, or a dict of
        columns (for a signature: the feed the job recorded says how columns were encoded)."""
        import numpy as np

        from .export import MATRIX_INPUT, input_signature

        feed = self._state.get("feed")
        if not feed:
            raise TfosError(f"Job {self.name!r} has no recorded feed; run it again with this version of tfos-magic.")
        spec = FeedSpec.from_dict(feed).inputs_only()
        arrays = {name: np.full([rows] + [d or 1 for d in s.shape[1:]], b"" if s.dtype.name == "string" else 0,
                                s.dtype.as_numpy_dtype) for name, s in input_signature(spec).items()}
        return arrays[MATRIX_INPUT] if MATRIX_INPUT in arrays and len(arrays) == 1 and spec.inputs == "matrix" \
            else arrays

    def export(self, path: str) -> str:
        """Write the trained model as a TensorFlow SavedModel at `path` (any tf.io.gfile
        path: local, HDFS, GCS or S3), for TF Serving or `tf.saved_model.load`: its
        `serving_default` signature takes the feature columns as training fed them (one
        `features` matrix, or one input per column with --inputs dict) and returns
        `prediction`; serving it needs neither the train cell nor Keras (job/export.py)."""
        from .export import export_saved_model

        if self.spec.options.framework == "torch":
            raise TfosError(f"Job {self.name!r} trained a PyTorch module; export writes TensorFlow SavedModels. Take "
                            "the module from Job.load_model() and export it with torch.export or torch.onnx.")
        feed = self._state.get("feed")
        if not feed:
            raise TfosError(f"Job {self.name!r} has no recorded feed to export a serving signature for; run it "
                            "again with this version of tfos-magic.")
        return export_saved_model(self.load_model(compile=False), FeedSpec.from_dict(feed).inputs_only(), path)
