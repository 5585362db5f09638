"""The chief's check, right after it saves the model, that the file is the model it trained.

The kernel, a Spark task and a new kernel load the file without the TF process's
namespace, from the job's stored cell (protocol/model_file.py). The chief loads it the
same way and compares its predictions with the trained model's on a few of its own rows,
so a model that cannot be used fails its job now, with the reason and the fix, instead
of "succeeding" and failing later in `load_model` or `predict`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from ..protocol.model_file import ModelNotLoadable, load_model, why_not_loadable
from ..protocol.tensors import to_tf

SAMPLE_ROWS = 16
TOLERANCE = 1e-4


def saved(path: str, save: Any) -> None:
    """`save()` the model, naming the reason when Keras cannot (a custom layer without a
    get_config whose __init__ takes more than plain values, a subclassed model in HDF5)."""
    try:
        save()
    except (NotImplementedError, TypeError, ValueError) as exc:
        raise ModelNotLoadable(why_not_loadable(path, exc, None).replace("cannot be loaded back", "cannot be saved")
                               + " The checkpoints are kept.") from exc


def _as_arrays(value: Any) -> list[np.ndarray]:
    return [np.asarray(v, dtype=np.float64) for v in tf.nest.flatten(value)]


def _predict(model: Any, rows: Any, graph_mode: bool) -> list[np.ndarray]:
    """The model's outputs for `rows`, with no collective: under MultiWorkerMirroredStrategy
    `predict` gathers across workers, which would wait for peers that are not predicting.
    In ps mode (TF1 graphs) the model is called on constants and run in Keras' session: a
    model built by its first call during training took the dataset's iterator as its
    input, so `predict` would refuse any other data."""
    outputs = model(to_tf(rows), training=False)
    if graph_mode:
        return _as_arrays(tf.compat.v1.keras.backend.get_session().run(outputs))
    return _as_arrays(outputs)


@contextlib.contextmanager
def _fresh_graph(graph_mode: bool) -> Iterator[None]:
    """ps mode runs TF1 graphs with Keras' session on the cluster: the loaded copy gets a
    graph and session of its own, and Keras' session is put back after."""
    if not graph_mode:
        yield
        return
    backend = tf.compat.v1.keras.backend
    session = backend.get_session()
    try:
        with tf.Graph().as_default():
            yield
    finally:
        backend.set_session(session)


def check_loads(model: Any, path: str, rows: Any, source: str | None, job: str, graph_mode: bool = False) -> int | None:
    """Load the file at `path` as the kernel will and compare it with `model` on `rows`
    (None: no rows to compare on, only the load is checked). Returns the values per row
    of a one-output model, for `Job.predict`, or None for several outputs."""
    with _fresh_graph(graph_mode):
        loaded = load_model(path, source, job, compile=True)
        if rows is None:
            return None
        got = _predict(loaded, rows, graph_mode)
    want = _predict(model, rows, graph_mode)
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        raise ModelNotLoadable(
            f"The model saved at {path} loads as a different model: its outputs have shapes "
            f"{[g.shape for g in got]} where the trained model's have {[w.shape for w in want]}. Give each custom "
            "layer and model a get_config() that returns every argument of its __init__.")
    worst = max(float(np.max(np.abs(g - w) / (1.0 + np.abs(w)))) for g, w in zip(got, want))
    if worst > TOLERANCE:
        raise ModelNotLoadable(
            f"The model saved at {path} loads, but predicts differently from the trained model (relative "
            f"difference up to {worst:.3g} on {len(want[0])} rows): it is not the same model. Most often a custom "
            "layer's get_config() leaves out an argument of its __init__, so the loaded layer is built with the "
            "default; or a layer makes weights outside build() that the file does not hold. Return every "
            "argument from get_config(), and make weights with add_weight in build(). The checkpoints are kept.")
    return int(want[0].reshape(len(want[0]), -1).shape[1]) if len(want) == 1 else None
