"""Arrays as a TensorFlow model takes them: a text or binary column as tf.string, a
ragged one (`arrays.RaggedArray`) as a tf.RaggedTensor. For every process that runs a TF
model: the TF process, the prediction task, the kernel's export and the chief's check.
TensorFlow is imported when a function runs, never on import, so the training task that
imports the shared formats never loads it.
"""

from __future__ import annotations

from typing import Any

from .arrays import RaggedArray, map_arrays
from .feed_spec import STRING, ColumnSpec


def tensor_spec(c: ColumnSpec, width: int | None) -> Any:
    """What one column gives the model, batched: (batch,), (batch, width), or ragged rows."""
    import tensorflow as tf

    dtype = tf.string if c.dtype == STRING else tf.as_dtype(c.dtype)
    if c.ragged:
        return tf.RaggedTensorSpec((None, None), dtype, ragged_rank=1, row_splits_dtype=tf.int64)
    return tf.TensorSpec((None, width) if c.is_array else (None,), dtype, name=c.name)


def to_tensor(a: Any) -> Any:
    """One array as a tensor: a RaggedArray as a tf.RaggedTensor."""
    import tensorflow as tf

    if isinstance(a, RaggedArray):
        return tf.RaggedTensor.from_row_splits(a.values, a.splits, validate=False)
    return tf.constant(a)


def to_tf(element: Any) -> Any:
    """An element's arrays as tensors, for a model's call."""
    return map_arrays(element, to_tensor)
