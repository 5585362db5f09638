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
    # What numpy_function returns for each spec: a tensor's array, or a ragged one's values
    # and row splits (a RaggedArray: protocol/arrays.py), rebuilt as a tf.RaggedTensor after.
    parts = [[s.dtype, tf.int64] if isinstance(s, tf.RaggedTensorSpec) else [s.dtype] for s in specs]
    out_dtypes = [d for p in parts for d in p]
    numpy_dtypes = [d.as_numpy_dtype for d in out_dtypes]
    ended = [np.bool_(True)]
    for s in specs:
        ended += ([np.zeros([0], s.dtype.as_numpy_dtype), np.zeros([1], np.int64)] if isinstance(s, tf.RaggedTensorSpec)
                  else [np.zeros([0, *s.shape[1:]], s.dtype.as_numpy_dtype)])
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
        arrays = []
        for a in tf.nest.flatten(element):
            arrays += [a.values, a.splits] if hasattr(a, "splits") else [a]
        return [np.bool_(False), *(np.asarray(a, d) for a, d in zip(arrays, numpy_dtypes))]

    def values(_done: tf.Tensor, *arrays: tf.Tensor) -> Any:
        out, at = [], 0
        for s, p in zip(specs, parts):
            if isinstance(s, tf.RaggedTensorSpec):
                out.append(tf.RaggedTensor.from_row_splits(tf.ensure_shape(arrays[at], [None]),
                                                           tf.ensure_shape(arrays[at + 1], [None]), validate=False))
            else:
                out.append(tf.ensure_shape(arrays[at], s.shape))
            at += len(p)
        return tf.nest.pack_sequence_as(signature, out)

    def one_pass(key: tf.Tensor) -> tf.data.Dataset:
        return (tf.data.Dataset.from_tensors(key).repeat()
                .map(lambda k: tf.numpy_function(next_, [k], [tf.bool, *out_dtypes], stateful=True))
                .take_while(lambda done, *_: tf.logical_not(done))
                .map(values))

    return (tf.data.Dataset.from_tensors(np.int64(0))
            .map(lambda z: tf.ensure_shape(tf.numpy_function(open_, [z], tf.int64, stateful=True), []))
            .flat_map(one_pass))
