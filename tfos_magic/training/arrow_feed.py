"""Runs in the TF process: this worker's Arrow stream into tf.data.

The first pass reads the Arrow IPC stream from the Spark task as it arrives and
spills each batch to a local Arrow IPC file; later passes (epochs) never ask Spark
again. A worker whose training rows fit --memory-cache decodes the spill once and
feeds every later pass from memory, all rows in a new order each epoch, with no file
read and no Arrow decoding: `fit` takes such a pass as a plain in-memory tf.data
pipeline (`memory_pass`), as fast as one in a plain process. Larger partitions
memory-map the spill every pass, holding a few Arrow batches at a time. Each Arrow
batch becomes numpy arrays with no per-row Python, and `rebatch` in tf.data cuts them
to the batch size.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, BinaryIO, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..protocol.arrays import BatchArrays, RaggedArray, concatenate, map_arrays, rows_of
from ..protocol.tensors import tensor_spec, to_tensor
from ..protocol.feed_spec import MATRIX, SPLIT_COLUMN, STRING, ColumnSpec, FeedError, FeedSpec, array_lengths
from .shuffle import SPILL_BLOCK_ROWS, rng_for, shuffled


# Rows a later pass from memory hands tf.data at a time.
MEMORY_CHUNK_ROWS = 65536


def _joined(parts: list[Any]) -> Any:
    """One chunk of several, each array concatenated along the rows."""
    head = parts[0]
    if isinstance(head, (tuple, list)):
        return tuple(_joined([p[i] for p in parts]) for i in range(len(head)))
    if isinstance(head, dict):
        return {k: concatenate([p[k] for p in parts]) for k in head}
    return concatenate(parts)


def rebatch(chunks: Iterator[Any], batch_size: int) -> Iterator[Any]:
    """Chunks of any size as batches of exactly `batch_size` rows, the last one shorter:
    slices (views) within a chunk, one concatenation where a batch spans chunks. For
    PyTorch's loader, and for tf.data where a ragged column rules out its own `rebatch`."""
    pending: list[Any] = []
    have = 0
    for chunk in chunks:
        rows, at = rows_of(chunk), 0
        if pending:
            take = min(batch_size - have, rows)
            pending.append(map_arrays(chunk, lambda a, t=take: a[:t]))
            have, at = have + take, take
            if have < batch_size:
                continue
            yield _joined(pending)
            pending, have = [], 0
        while rows - at >= batch_size:
            yield map_arrays(chunk, lambda a, s=at: a[s:s + batch_size])
            at += batch_size
        if at < rows:
            pending, have = [map_arrays(chunk, lambda a, s=at: a[s:])], rows - at
    if pending:
        yield _joined(pending)


def _to_numpy(t: Any) -> Any:
    """A tensor's memory as numpy (a ragged one's values and splits)."""
    import tensorflow as tf

    if isinstance(t, tf.RaggedTensor):
        return RaggedArray(t.flat_values.numpy(), t.row_splits.numpy())
    return t.numpy()


def empty_of(spec: Any) -> Any:
    """A batch of no rows of `spec` (a TensorSpec or RaggedTensorSpec)."""
    import tensorflow as tf

    if isinstance(spec, tf.RaggedTensorSpec):
        return tf.RaggedTensor.from_row_splits(tf.zeros([0], spec.dtype), tf.zeros([1], tf.int64))
    return tf.zeros([0, *spec.shape[1:]], spec.dtype)


def preprocess_rows(fn: Any, training: bool) -> Any:
    """The cell's `preprocess(features, label)` as a tf.data map over rows: (x,) or (x, y),
    a weight passed through, and `training=` for a function that takes it (True for the
    training rows, False for validation)."""
    import inspect

    takes_training = "training" in inspect.signature(fn).parameters
    extra = {"training": training} if takes_training else {}

    def call(*element: Any) -> Any:
        if len(element) == 1:
            return fn(element[0], **extra)
        out = fn(element[0], element[1], **extra)
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError("preprocess(features, label) must return (features, label), as a tuple of two")
        return (*out, *element[2:])

    return call


class ArrowFeed:
    """Turns one worker's Arrow IPC stream into re-iterable tf.data datasets."""

    def __init__(self, source: BinaryIO, spec: FeedSpec, spill_dir: str, shuffle_rows: int = 0,
                 seed: tuple[str, int, int] = ("", 0, 0), class_weight: dict[int, float] | None = None,
                 memory_cache_bytes: int = 0, preprocess: Any = None) -> None:
        self.spec = spec
        self.preprocess = preprocess  # the cell's preprocess(features, label[, training]), per row
        self.memory_cache_bytes = memory_cache_bytes  # 0: every pass reads the spill
        self._cache: Any = None  # the training rows as numpy (x, y[, w]), once decoded
        self._tensors: Any = None  # the same rows as tensors, once a pass from memory asks
        self.cache_state = "none"  # "memory" once later passes come from memory, "spill" if too large
        self.class_weight = class_weight  # label class -> weight, on training rows only (as Keras)
        self.shuffle_rows = shuffle_rows  # 0: rows in the stream's order, every epoch
        self._seed = seed  # (job, run, worker): with the epoch, which order a pass takes
        self.epoch: int | None = None  # set by the training loop; else passes are counted
        self._passes = 0
        self._source = source
        self._reader: pa.ipc.RecordBatchStreamReader | None = None
        self._lock = threading.Lock()
        self._done = False
        self._first_pass_taken = False
        self._spill_paths = {"train": os.path.join(spill_dir, "train.arrows"),
                             "validation": os.path.join(spill_dir, "validation.arrows")}
        self._writers: dict[str, pa.ipc.RecordBatchStreamWriter] = {}
        self.rows = {"train": 0, "validation": 0}
        self._handed = 0  # rows passes through Python handed to tf.data, all passes
        self._memory_pass = (0, 0)  # (rows, rows trained) of the latest memory_pass
        self._skip_rows = 0
        self.last_pass_rows: int | None = None  # training rows the last finished pass delivered
        self._arrays = BatchArrays(spec)

    # --- reading the stream -------------------------------------------
    def _write_spill(self, split: str, batch: pa.RecordBatch) -> None:
        writer = self._writers.get(split)
        if writer is None:  # a file, not a stream: later passes read its blocks in any order
            writer = self._writers[split] = pa.ipc.new_file(self._spill_paths[split], batch.schema)
        # Shuffled, the spill is read back in blocks of SPILL_BLOCK_ROWS in a new order each
        # epoch; in order, in the stream's own (larger, so cheaper) batches.
        block = SPILL_BLOCK_ROWS if self.shuffle_rows and split == "train" else batch.num_rows or 1
        for at in range(0, batch.num_rows, block):
            writer.write_batch(batch.slice(at, block))
        self.rows[split] += batch.num_rows

    def _read_one(self) -> pa.RecordBatch | None:
        """Next train batch off the stream (spilled on the way); None at the end. Lock held."""
        if self._done:
            return None
        if self._reader is None:
            try:
                self._reader = pa.ipc.open_stream(self._source)
            except pa.ArrowInvalid:
                if self._source.read(1):  # not just an empty partition: a real error
                    raise
                self._done = True
                return None
        try:
            batch = self._reader.read_next_batch()
        except StopIteration:
            self._done = True
            for w in self._writers.values():
                w.close()
            return None
        self._check(batch)
        if self.spec.has_validation:
            is_val = pc.equal(batch.column(SPLIT_COLUMN), 1)
            val = batch.filter(is_val).drop_columns([SPLIT_COLUMN])
            batch = batch.filter(pc.invert(is_val)).drop_columns([SPLIT_COLUMN])
            if val.num_rows:
                self._write_spill("validation", val)
        if batch.num_rows:
            self._write_spill("train", batch)
        return batch

    def _check(self, batch: pa.RecordBatch) -> None:
        for c in self.spec.features + [c for c in (self.spec.label, self.spec.weight) if c]:
            col = batch.column(c.name)
            nulls = col.null_count + (col.flatten().null_count if c.is_array else 0)
            if nulls:
                role = "label" if c is self.spec.label else "weight" if c is self.spec.weight else "feature"
                fix = ("" if role != "feature" or c.is_array else " or pass --fillna TEXT to %%tf_train (any value "
                       "that is not a number fills text and binary columns)" if c.dtype == STRING
                       else " or pass --fillna NUMBER to %%tf_train")
                raise FeedError(
                    f"The {role} column {c.name!r} has null values (found {nulls} in one batch). "
                    f"Drop or fill them in the %%spark_etl cell (df.dropna / df.na.fill){fix}."
                )
        lengths = array_lengths(batch, self.spec)
        for name, n in lengths.items():
            want = self.spec.array_lengths.get(name)
            if want is not None and n != want:
                raise FeedError(f"Array column {name!r} has length {n} here but {want} elsewhere; "
                                "only fixed-length arrays can be fed.")

    def drain(self) -> None:
        """Read the rest of the stream into the spill (needed before validation or a new pass)."""
        with self._lock:
            while self._read_one() is not None:
                pass

    def _spilled(self, split: str, rng: np.random.Generator | None = None) -> Iterator[pa.RecordBatch]:
        """The spill's blocks, memory-mapped: in order, or in `rng`'s order."""
        path = self._spill_paths[split]
        if not os.path.exists(path):
            return
        with pa.memory_map(path) as source:
            reader = pa.ipc.open_file(source)
            order = range(reader.num_record_batches) if rng is None else rng.permutation(reader.num_record_batches)
            for i in order:
                yield reader.get_batch(int(i))

    def _streamed(self) -> Iterator[pa.RecordBatch]:
        while True:
            with self._lock:
                batch = self._read_one()
            if batch is None:
                return
            if batch.num_rows:
                yield batch

    @property
    def rows_delivered(self) -> int:
        """Rows handed to training, all passes: as Python hands them to tf.data, and for a
        pass from memory, which tf.data holds whole, as the training loop reports (`trained`)."""
        rows, trained = self._memory_pass
        return self._handed + min(rows, trained)

    def trained(self, rows: int) -> None:
        """The training loop's count of rows trained in this pass so far (steps x rows a step):
        the progress of a pass from memory."""
        self._memory_pass = (self._memory_pass[0], rows)

    def _pass_order(self, split: str) -> np.random.Generator | None:
        """A new pass: the generator of its order when training rows are shuffled (--shuffle),
        seeded by job, run, worker and epoch (the training loop's, else passes are counted)."""
        if split != "train":
            return None
        epoch = self.epoch if self.epoch is not None else self._passes
        self._passes += 1
        return rng_for(*self._seed, epoch) if self.shuffle_rows else None

    def batches(self, split: str = "train") -> Iterator[Any]:
        """One pass: the live stream the first time, then memory (numpy, when the training
        rows fit --memory-cache) or the local spill (Arrow batches). Training passes are
        shuffled (--shuffle): the stream through a buffer, memory all at once, the spill's
        blocks in a new order and through the buffer; seeded by job, run, worker and epoch."""
        untouched = self._reader is None and not self._done
        rng = self._pass_order(split)
        if split == "train" and untouched and not self._first_pass_taken:
            self._first_pass_taken = True
            source = self._streamed()
        elif split == "train" and self.from_memory():
            yield from self._from_memory(rng)
            return
        else:
            self.drain()
            source = self._spilled(split, rng)
        yield from (source if rng is None else shuffled(source, self.shuffle_rows, rng))

    # --- later passes from memory ---------------------------------------
    def from_memory(self) -> bool:
        """Whether later training passes read memory: decodes the spill the first time it
        fits (the stream is read to its end first)."""
        if self._cache is None and self.cache_state == "none":
            self.drain()
            path = self._spill_paths["train"]
            size = os.path.getsize(path) if os.path.exists(path) else 0
            if not size or size > self.memory_cache_bytes:
                self.cache_state = "spill"
                if size:
                    print(f"tfos: later epochs read the spill: {size / 2**20:.0f} MiB of training rows is more "
                          f"than --memory-cache {self.memory_cache_bytes / 2**20:.0f} MiB", flush=True)
                return False
            with pa.memory_map(path) as source:
                table = pa.ipc.open_file(source).read_all().combine_chunks()
            whole = table.to_batches(max_chunksize=table.num_rows)[0]
            self._cache = self._arrays.to_numpy(whole)  # copies: owned, writable memory
            self.cache_state = "memory"
            print(f"tfos: later epochs read this worker's {table.num_rows:,} training rows from memory "
                  f"({size / 2**20:.0f} MiB)", flush=True)
        return self._cache is not None

    def memory_pass(self, batch_size: int):
        """The next training pass from memory, for `fit`: `from_tensor_slices` and `batch`
        over the cached rows, the pipeline of a plain in-memory process (a Python source
        feeding tf.data, `dataset()`, reached 0.8x of it). Every row, in this epoch's order
        (a full shuffle with --shuffle, into a copy of the rows while the pass lasts), less
        `skip_next_pass`'s rows. One pass per call, its order drawn now: call it per epoch,
        after setting `epoch`. None until the stream has been read to its end (the first
        pass streams), and unless the training rows fit --memory-cache."""
        import tensorflow as tf

        if not self._done or not self.from_memory():
            return None
        if self._tensors is None:
            self._tensors = map_arrays(self._cache, to_tensor)
            self._cache = map_arrays(self._tensors, _to_numpy)  # the same memory, for dataset()
        rows = rows_of(self._cache)
        rng = self._pass_order("train")
        skip, self._skip_rows = min(self._skip_rows, rows), 0
        if rng is None:
            part = map_arrays(self._tensors, lambda t: t[skip:])
        else:
            take = rng.permutation(rows)[skip:]
            part = map_arrays(self._tensors, lambda t: tf.gather(t, take))
        done, trained = self._memory_pass
        self._handed += min(done, trained)
        self._memory_pass = (rows - skip, 0)
        self.last_pass_rows = rows - skip
        return self._for_training(self._batched(tf.data.Dataset.from_tensor_slices(part), batch_size, "train"), "train")

    def _from_memory(self, rng: np.random.Generator | None) -> Iterator[Any]:
        """The cached rows as numpy chunks: every row in `rng`'s order (a full shuffle, not a
        window), else in the spill's order. Chunks, not one element: tf.data's rebatch starts
        on the first while the next is gathered."""
        rows = rows_of(self._cache)
        order = None if rng is None else rng.permutation(rows)
        for at in range(0, rows, MEMORY_CHUNK_ROWS):
            if order is None:  # a copy: TF may write into memory it is handed (see BatchArrays.column)
                yield map_arrays(self._cache, lambda a: a[at:at + MEMORY_CHUNK_ROWS].copy())
            else:
                take = order[at:at + MEMORY_CHUNK_ROWS]
                yield map_arrays(self._cache, lambda a: a[take])

    def sample(self, rows: int) -> Any:
        """The features of this worker's first `rows` training rows (None if it had none):
        what the chief checks its saved model on (model_check.py). Reads the whole stream."""
        self.drain()
        with contextlib.closing(self._spilled("train")) as spilled:
            first = next((b for b in spilled if b.num_rows), None)
        return None if first is None else self._arrays.features(first.slice(0, rows))

    # --- to numpy and tf.data -----------------------------------------
    def to_numpy(self, batch: pa.RecordBatch) -> Any:
        """Tensors' worth of numpy arrays that own their (writable) memory, for tf.data."""
        return self._arrays.to_numpy(batch)

    def element_spec(self, split: str = "train", class_weights: bool = True) -> Any:
        """What one element of `dataset(split)` is: x, (x, y) or (x, y, weight); without
        `class_weights`, what the generator yields before tf.data adds them."""
        import tensorflow as tf

        def spec_of(c: ColumnSpec) -> Any:
            return tensor_spec(c, None if c.ragged else self.spec.array_lengths.get(c.name) if c.is_array else None)

        if self.spec.inputs == MATRIX:
            width = sum(self.spec.width(c) or 0 for c in self.spec.features)
            x: Any = tf.TensorSpec((None, width), tf.float32)
        else:
            x = {c.name: spec_of(c) for c in self.spec.features}
        if self.spec.label is None:
            return x
        y = spec_of(self.spec.label)
        if self.spec.weight is not None:
            return x, y, spec_of(self.spec.weight)
        if self.class_weight and split == "train" and class_weights:
            return x, y, tf.TensorSpec((None,), tf.float32)
        return x, y

    def _weigh_classes(self, x: Any, y: Any, weight: Any = None) -> Any:
        """Each training row's weight times its class's, as Keras' `class_weight` does: the
        class is the label (an integer, or a float 0/1), or the argmax of a one-hot label;
        a class not named weighs 1."""
        import tensorflow as tf

        top = max(self.class_weight)
        table = tf.constant([self.class_weight.get(i, 1.0) for i in range(top + 1)] + [1.0], tf.float32)
        cls = tf.argmax(y, axis=-1) if y.shape.rank == 2 and (y.shape[-1] or 1) > 1 else tf.reshape(y, [-1])
        cls = tf.cast(cls, tf.int64)
        cls = tf.where((cls < 0) | (cls > top), tf.constant(top + 1, tf.int64), cls)
        weights = tf.gather(table, cls)
        return x, y, weights if weight is None else weight * weights

    def skip_next_pass(self, rows: int) -> None:
        """Leave out the first `rows` training rows of the next pass only: a run resumed
        from a checkpoint taken mid-epoch goes on where the epoch was, instead of training
        on those rows twice (and taking more steps than an unbroken run)."""
        self._skip_rows = max(0, int(rows))

    def next_pass_rows(self) -> int | None:
        """Training rows the next pass will deliver (after skip_next_pass); None until the
        stream has been read to its end, when only the pass itself can tell."""
        if not self._done:
            return None
        return max(0, self.rows["train"] - self._skip_rows)

    def padded_dataset(self, batch_size: int):
        """The next pass (`memory_pass`, else `dataset`), then empty (zero-row) batches
        without end, for a pass of an agreed number of steps (keras_fit.agreed_steps): a
        worker whose rows run out before its peers' takes empty batches, which add nothing
        to the gradients, as TF's own end-of-data handling gives it. Declared infinite, so
        TF's distributed iterator drops its per-step agreement on the end of data. From
        memory, one pass per call; else re-iterable, a pass per iterator."""
        import tensorflow as tf

        ds = self.memory_pass(batch_size) or self.dataset(batch_size)
        empty = tf.nest.map_structure(empty_of, ds.element_spec)  # as preprocess() made it
        ds = ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat())
        return ds.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))

    def numpy_pass(self, split: str = "train") -> Iterator[Any]:
        """One pass (`batches`) as numpy chunks of any size, each (x, y[, weight]) as
        `to_numpy` makes them, less `skip_next_pass`'s rows; what every framework's
        loader cuts into batches (tf.data here, torch_feed.py for PyTorch)."""
        skip, self._skip_rows = (self._skip_rows, 0) if split == "train" else (0, self._skip_rows)
        delivered = 0
        for batch in self.batches(split):
            arrow = isinstance(batch, pa.RecordBatch)  # else numpy already (from memory)
            rows = batch.num_rows if arrow else rows_of(batch)
            if skip:  # rows an earlier attempt trained on in this epoch (skip_next_pass)
                if rows <= skip:
                    skip -= rows
                    continue
                batch = batch.slice(skip) if arrow else map_arrays(batch, lambda a, s=skip: a[s:])
                rows, skip = rows - skip, 0
            self._handed += rows
            delivered += rows
            yield self.to_numpy(batch) if arrow else batch
        if split == "train":
            self.last_pass_rows = delivered

    def dataset(self, batch_size: int, split: str = "train"):
        """A tf.data.Dataset of this worker's rows, `batch_size` rows a step, re-iterable per epoch."""
        import tensorflow as tf

        from .python_source import iterator_dataset

        signature = self.element_spec(split, class_weights=False)
        if self.preprocess is not None:  # rows, mapped one by one, batched again
            ds = iterator_dataset(lambda: self.numpy_pass(split), signature).unbatch()
            ds = self._batched(ds, batch_size, split)
        elif self.spec.has_ragged:  # tf.data's rebatch takes dense tensors only: batches cut here
            ds = iterator_dataset(lambda: rebatch(self.numpy_pass(split), batch_size), signature)
        else:
            ds = iterator_dataset(lambda: self.numpy_pass(split), signature).rebatch(batch_size)
        return self._for_training(ds, split).prefetch(tf.data.AUTOTUNE)

    def batch_spec(self, split: str = "train") -> Any:
        """What a batch the model trains on is: `element_spec`, or what preprocess() makes of it."""
        if self.preprocess is None:
            return self.element_spec(split)
        return self.dataset(1, split).element_spec

    def _batched(self, rows: Any, batch_size: int, split: str) -> Any:
        """A dataset of single rows, through preprocess() (a parallel map) and into batches
        (ragged ones, where the feed has a ragged column)."""
        import tensorflow as tf

        if self.preprocess is not None:
            rows = rows.map(preprocess_rows(self.preprocess, split == "train"), num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=self.shuffle_rows == 0)
        return rows.ragged_batch(batch_size) if self.spec.has_ragged else rows.batch(batch_size)

    def _for_training(self, ds: Any, split: str) -> Any:
        """Batches weighed by class (--class-weight), and never sharded again: each worker
        already holds only its own partition."""
        import tensorflow as tf

        if self.class_weight and split == "train" and self.spec.label is not None:
            ds = ds.map(self._weigh_classes, num_parallel_calls=tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(options)
