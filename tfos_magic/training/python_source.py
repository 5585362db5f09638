"""Runs in the TF process: a re-iterable tf.data source over a Python iterator.

`tf.data.Dataset.from_generator` would do, but one of its pipelines, once run, slows every
later `fit` in its process about twofold, even `fit`s over in-memory `from_tensor_slices`
datasets (measured with TF 2.21: docs/performance.md, "Later epochs"). The feed's first
epoch is such a pipeline, so every later epoch paid for it. The same Python iterator
behind `numpy_function` (TF's plain `py_func`) costs nothing after its pass: this module
builds that. Each tf.data iterator over the dataset (one per epoch) opens a new pass.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf


def iterator_dataset(open_pass: Callable[[], Iterator[Any]], signature: Any) -> tf.data.Dataset:
    """Elements of `open_pass()`, a new call per tf.data iterator; each element a structure
    of numpy arrays matching `signature` (TensorSpecs, first dimension unknown), e.g. a chunk
    of rows for `rebatch`. An exception in the iterator ends the pass with it, as the
    iterator's error. Only the newest pass stays open: a pass left unfinished (a `fit`
    whose steps ended first) is closed when the next one opens."""
    specs = tf.nest.flatten(signature)
    dtypes = [s.dtype.as_numpy_dtype for s in specs]
    ended = [np.bool_(True), *(np.zeros([0, *s.shape[1:]], d) for s, d in zip(specs, dtypes))]
    passes: dict[int, Iterator[Any]] = {}
    keys = itertools.count()

    def open_(_: Any) -> np.int64:
        for old in passes.values():
            getattr(old, "close", lambda: None)()
        passes.clear()
        key = next(keys)
        passes[key] = iter(open_pass())
        return np.int64(key)

    def next_(key: Any) -> list[np.ndarray]:
        source = passes.get(int(key))
        element = None if source is None else next(source, None)
        if element is None:
            passes.pop(int(key), None)
            return ended
        return [np.bool_(False), *(np.asarray(a, d) for a, d in zip(tf.nest.flatten(element), dtypes))]

    def values(_done: tf.Tensor, *arrays: tf.Tensor) -> Any:
        return tf.nest.pack_sequence_as(signature, [tf.ensure_shape(a, s.shape) for a, s in zip(arrays, specs)])

    def one_pass(key: tf.Tensor) -> tf.data.Dataset:
        return (tf.data.Dataset.from_tensors(key).repeat()
                .map(lambda k: tf.numpy_function(next_, [k], [tf.bool, *(s.dtype for s in specs)], stateful=True))
                .take_while(lambda done, *_: tf.logical_not(done))
                .map(values))

    return (tf.data.Dataset.from_tensors(np.int64(0))
            .map(lambda z: tf.ensure_shape(tf.numpy_function(open_, [z], tf.int64, stateful=True), []))
            .flat_map(one_pass))
