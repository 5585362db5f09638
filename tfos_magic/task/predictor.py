"""Runs in a Spark task's Python worker: a trained model's predictions, batch by batch.

`Job.predict` maps this over the DataFrame with `mapInArrow`, so rows go from Spark to
the model and back as Arrow batches, on the executors, and nothing is collected to the
driver. The model is loaded once per Python worker (Spark reuses its workers across
tasks), not once per task or batch.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from ..protocol.arrays import BatchArrays
from ..protocol.feed_spec import FeedSpec
from ..protocol.model_file import ModelRef, load_model

INPUT_PREFIX = "__tfos_in_"  # the prepared (cast) feature columns, next to the row's own columns


# path -> (the saved model's version, the model): one model per path, the latest asked for.
_MODELS: dict[str, tuple[str, Any]] = {}
_LOCK = threading.Lock()


def _model(ref: ModelRef) -> Any:
    """The model `ref` names, loaded once per Python worker and version, so a worker Spark
    reuses never serves an older save."""
    with _LOCK:
        cached = _MODELS.get(ref.path)
        if cached is None or cached[0] != ref.version:
            _MODELS.pop(ref.path, None)  # the old model's memory goes before the new one loads
            os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            _MODELS[ref.path] = (ref.version, load_model(ref.path, ref.source, ref.job, compile=False,
                                                         trusted=ref.trusted))
        return _MODELS[ref.path][1]


def _predict(model: Any, x: Any) -> Any:
    """A Keras model's predict_on_batch, or a PyTorch module called without gradients."""
    if hasattr(model, "predict_on_batch"):
        from ..protocol.tensors import to_tf

        return model.predict_on_batch(to_tf(x))  # a ragged column as a tf.RaggedTensor
    from ..protocol.torch_model import predict_on_batch

    return predict_on_batch(model, x)


def predict_fn(ref: ModelRef, spec: dict[str, Any], keep: list[str], output_col: str,
               outputs: int) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function for `mapInArrow`: each batch keeps the columns `keep` and gains
    `output_col` (a float, or an array of `outputs` floats)."""
    feed = FeedSpec.from_dict(spec)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        model = _model(ref)
        arrays = BatchArrays(feed)
        for batch in batches:
            if not batch.num_rows:
                continue
            inputs = pa.RecordBatch.from_arrays(
                [batch.column(INPUT_PREFIX + c.name) for c in feed.features], names=[c.name for c in feed.features])
            pred = np.asarray(_predict(model, arrays.features(inputs)), dtype=np.float32)
            pred = pred.reshape(batch.num_rows, -1)
            if pred.shape[1] != outputs:
                raise ValueError(f"The model gave {pred.shape[1]} values per row where {outputs} were expected.")
            column = (pa.array(pred[:, 0]) if outputs == 1 else
                      pa.FixedSizeListArray.from_arrays(pa.array(pred.reshape(-1)), outputs).cast(
                          pa.list_(pa.float32())))
            yield pa.RecordBatch.from_arrays([batch.column(k) for k in keep] + [column], names=keep + [output_col])

    return run
