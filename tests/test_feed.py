"""The executor-side Arrow feed into tf.data, with real pyarrow and TensorFlow."""

import io

import numpy as np
import pyarrow as pa
import pytest

from tfos_magic.protocol.feed_spec import SPLIT_COLUMN, ColumnSpec, FeedError, FeedSpec
from tfos_magic.training.arrow_feed import ArrowFeed


def _stream(batches):
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, batches[0].schema) as w:
        for b in batches:
            w.write_batch(b)
    sink.seek(0)
    return sink


def _batches(n_batches=5, rows=1000, split=False):
    out = []
    for i in range(n_batches):
        start = i * rows
        cols = {
            "a": pa.array(np.arange(start, start + rows, dtype=np.float32)),
            "b": pa.array(np.ones(rows, dtype=np.float32)),
            "y": pa.array(np.arange(start, start + rows, dtype=np.float32) * 2),
        }
        if split:
            cols[SPLIT_COLUMN] = pa.array((np.arange(rows) % 5 == 0).astype(np.int8))
        out.append(pa.RecordBatch.from_pydict(cols))
    return out


def _spec(**kw):
    return FeedSpec([ColumnSpec("a", "float32"), ColumnSpec("b", "float32")], ColumnSpec("y", "float32"), "matrix", **kw)


def _rows(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys), [len(y) for y in ys]


def test_rebatches_streams_then_replays_from_spill(tmp_path):
    feed = ArrowFeed(_stream(_batches()), _spec(), str(tmp_path))
    ds = feed.dataset(128)
    x1, y1, sizes = _rows(ds)
    assert sizes[:-1] == [128] * (len(sizes) - 1) and sum(sizes) == 5000
    assert x1.shape == (5000, 2) and np.array_equal(x1[:, 0] * 2, y1)
    assert (tmp_path / "train.arrows").exists()
    feed._source = None  # a second pass must not touch the stream again
    x2, y2, _ = _rows(ds)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)


def test_validation_rows_are_split_off(tmp_path):
    spec = _spec(has_validation=True)
    feed = ArrowFeed(_stream(_batches(split=True)), spec, str(tmp_path))
    _, y_train, _ = _rows(feed.dataset(100))
    _, y_val, _ = _rows(feed.dataset(100, split="validation"))
    assert len(y_train) == 4000 and len(y_val) == 1000
    assert set((y_val / 2).astype(int) % 5) == {0}


def test_validation_first_drains_the_stream(tmp_path):
    feed = ArrowFeed(_stream(_batches(split=True)), _spec(has_validation=True), str(tmp_path))
    assert len(_rows(feed.dataset(100, split="validation"))[1]) == 1000
    assert len(_rows(feed.dataset(100))[1]) == 4000


def test_dict_inputs_and_fixed_arrays(tmp_path):
    ids = pa.array(np.arange(10, dtype=np.int64))
    vec = pa.array([[float(i), float(i) + 1, float(i) + 2] for i in range(10)], pa.list_(pa.float32()))
    batch = pa.RecordBatch.from_pydict({"id": ids, "vec": vec, "y": pa.array(np.zeros(10, np.float32))})
    spec = FeedSpec([ColumnSpec("id", "int64"), ColumnSpec("vec", "float32", True)],
                    ColumnSpec("y", "float32"), "dict", array_lengths={"vec": 3})
    x, y = next(iter(ArrowFeed(_stream([batch]), spec, str(tmp_path)).dataset(4)))
    assert x["id"].dtype.name == "int64" and x["vec"].shape == (4, 3)
    assert x["vec"].numpy()[1].tolist() == [1.0, 2.0, 3.0]


def test_nulls_name_the_column(tmp_path):
    batch = pa.RecordBatch.from_pydict({"a": pa.array([1.0, None], pa.float32()), "b": pa.array([1.0, 2.0], pa.float32()),
                                        "y": pa.array([1.0, 2.0], pa.float32())})
    feed = ArrowFeed(_stream([batch]), _spec(), str(tmp_path))
    with pytest.raises(FeedError, match=r"feature column 'a' has null values.*--fillna"):
        list(feed.batches())


def test_ragged_arrays_are_refused(tmp_path):
    vec = pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32()))
    batch = pa.RecordBatch.from_pydict({"vec": vec, "y": pa.array([1.0, 2.0], pa.float32())})
    spec = FeedSpec([ColumnSpec("vec", "float32", True)], ColumnSpec("y", "float32"), "dict", array_lengths={"vec": 2})
    with pytest.raises(FeedError, match="different lengths"):
        list(ArrowFeed(_stream([batch]), spec, str(tmp_path)).batches())


def test_empty_partition_gives_an_empty_dataset(tmp_path):
    feed = ArrowFeed(io.BytesIO(b""), _spec(), str(tmp_path))
    assert list(feed.dataset(8)) == []


def test_arrays_handed_to_tf_own_writable_memory(tmp_path):
    """TF may write into a numpy array's memory in place; Arrow's (and the spill's) is read-only."""
    vec = pa.array([[float(i), 1.0] for i in range(10)], pa.list_(pa.float32()))
    batch = pa.RecordBatch.from_pydict({"a": pa.array(np.arange(10, dtype=np.float32)), "vec": vec,
                                        "y": pa.array(np.ones(10, np.float32))})
    for inputs in ("matrix", "dict"):
        spec = FeedSpec([ColumnSpec("a", "float32"), ColumnSpec("vec", "float32", True)], ColumnSpec("y", "float32"),
                        inputs, array_lengths={"vec": 2})
        x, y = ArrowFeed(_stream([batch]), spec, str(tmp_path / inputs)).to_numpy(batch)
        for arr in (list(x.values()) if isinstance(x, dict) else [x]) + [y]:
            assert arr.flags.writeable and arr.flags.owndata, (inputs, arr.flags)
        if inputs == "matrix":
            assert x.shape == (10, 3) and x[3].tolist() == [3.0, 3.0, 1.0]


# Keras fit with validation data over the feed, each combination in one fresh process:
# a native crash there (SIGSEGV) must fail this test, not the test run.
_FIT_COMBINATIONS = r"""
import io, os, sys, tempfile
import numpy as np, pyarrow as pa
import tensorflow as tf
from tfos_magic.protocol.feed_spec import SPLIT_COLUMN, ColumnSpec, FeedSpec
from tfos_magic.training.arrow_feed import ArrowFeed

def stream(split):
    rng = np.random.default_rng(0)
    sink = io.BytesIO()
    batches = []
    for i in range(6):
        a, b = rng.random(3000, dtype=np.float32), rng.random(3000, dtype=np.float32)
        cols = {"a": a, "b": b, "y": (2 * a - b).astype(np.float32)}
        if split:
            cols[SPLIT_COLUMN] = (np.arange(3000) % 10 == 0).astype(np.int8)
        batches.append(pa.RecordBatch.from_pydict(cols))
    with pa.ipc.new_stream(sink, batches[0].schema) as w:
        for batch in batches:
            w.write_batch(batch)
    sink.seek(0)
    return sink

for inputs in ("matrix", "dict"):
    for validation in (False, True):
        for epochs in (1, 3):
            spec = FeedSpec([ColumnSpec("a", "float32"), ColumnSpec("b", "float32")], ColumnSpec("y", "float32"),
                            inputs, has_validation=validation)
            feed = ArrowFeed(stream(validation), spec, tempfile.mkdtemp())
            if inputs == "matrix":
                model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
            else:
                a, b = tf.keras.Input((), name="a"), tf.keras.Input((), name="b")
                model = tf.keras.Model({"a": a, "b": b}, tf.keras.layers.Dense(1)(tf.stack([a, b], -1)))
            model.compile(tf.keras.optimizers.Adam(0.05), "mse")
            val = feed.dataset(128, split="validation") if validation else None
            hist = model.fit(feed.dataset(128), epochs=epochs, validation_data=val, verbose=0).history
            assert hist["loss"][-1] < 0.5 and hist.get("val_loss", [0])[-1] < 0.5, (inputs, validation, epochs, hist)
            print("ok", inputs, validation, epochs, round(hist["loss"][-1], 4), flush=True)
"""


@pytest.mark.e2e
def test_fit_with_validation_over_the_spill_does_not_crash(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "fit.py"
    script.write_text(_FIT_COMBINATIONS)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("ok ") == 8, proc.stdout


def test_gpu_env_is_the_tasks_assignment():
    """CUDA_VISIBLE_DEVICES for the TF process (the standalone test runs it for real)."""
    from pyspark.resource import ResourceInformation

    from tfos_magic.task.feeder import gpu_env

    assert gpu_env({"gpu": ResourceInformation("gpu", ["3", "1"])}) == {"CUDA_VISIBLE_DEVICES": "3,1"}
    assert gpu_env({}) == {}, "no assignment: the environment is left alone"
    assert gpu_env({"gpu": ResourceInformation("gpu", [])}) == {}


def _dir(parent, name: str) -> str:
    folder = parent / name
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def _order(feed, batch_size=250):
    x, y, _ = _rows(feed.dataset(batch_size))
    return x[:, 0]


def test_shuffling_mixes_every_epoch_differently_and_loses_no_row(tmp_path):
    """5,000 rows in order: a 1,000-row buffer mixes the stream, and each later epoch reads
    the spill's blocks in a new order; every row comes exactly once a pass."""
    feed = ArrowFeed(_stream(_batches()), _spec(), str(tmp_path), shuffle_rows=1000, seed=("job", 1, 0))
    passes = [_order(feed) for _ in range(3)]
    for order in passes:
        np.testing.assert_array_equal(np.sort(order), np.arange(5000, dtype=np.float32))
        assert not np.array_equal(order, np.arange(5000)), "the rows came in their stream order"
    # The stream is mixed within the buffer; the spill's blocks across the whole pass: the
    # first fifth of a later epoch holds rows from the last fifths.
    assert passes[0][:500].max() > 500
    assert all(order[:1000].max() > 3000 for order in passes[1:])
    assert not np.array_equal(passes[1], passes[2]), "each epoch takes a new order"
    # The same job, run, worker and epoch give the same order (a resumed run skips the right rows).
    again = ArrowFeed(_stream(_batches()), _spec(), _dir(tmp_path, "again"), shuffle_rows=1000, seed=("job", 1, 0))
    np.testing.assert_array_equal(_order(again), passes[0])
    other = ArrowFeed(_stream(_batches()), _spec(), _dir(tmp_path, "other"), shuffle_rows=1000, seed=("job", 1, 1))
    assert not np.array_equal(_order(other), passes[0]), "each worker has its own order"


def test_shuffle_zero_keeps_the_order_and_the_epoch_picks_the_order(tmp_path):
    plain = ArrowFeed(_stream(_batches()), _spec(), _dir(tmp_path, "plain"))
    for _ in range(2):
        np.testing.assert_array_equal(_order(plain), np.arange(5000, dtype=np.float32))
    # The training loop names the epoch: the same epoch, the same order, on any pass.
    assert np.array_equal(_order_at(tmp_path / "a", epoch=3), _order_at(tmp_path / "b", epoch=3))
    assert not np.array_equal(_order_at(tmp_path / "c", epoch=3), _order_at(tmp_path / "d", epoch=4))


def _order_at(folder, epoch):
    """Epoch `epoch`'s order read from the spill (the stream already read to its end)."""
    feed = ArrowFeed(_stream(_batches()), _spec(), _dir(folder, ""), shuffle_rows=1000, seed=("j", 1, 0))
    feed.drain()
    feed.epoch = epoch
    return _order(feed)


def test_class_weights_and_a_weight_column_reach_fit_as_sample_weights(tmp_path):
    batch = pa.RecordBatch.from_pydict({"a": pa.array(np.arange(6, dtype=np.float32)),
                                        "y": pa.array(np.array([0, 1, 0, 1, 2, 1], np.int64)),
                                        "w": pa.array(np.array([1, 1, 2, 2, 1, 1], np.float32))})
    spec = FeedSpec([ColumnSpec("a", "float32")], ColumnSpec("y", "int64"), "matrix")
    feed = ArrowFeed(_stream([batch]), spec, _dir(tmp_path, "cw"), class_weight={0: 1.0, 1: 5.0})
    _, y, w = next(iter(feed.dataset(6)))
    np.testing.assert_allclose(w.numpy(), [1, 5, 1, 5, 1, 5])  # class 2 is not named: weight 1
    spec.weight = ColumnSpec("w", "float32")
    feed = ArrowFeed(_stream([batch]), spec, _dir(tmp_path, "both"), class_weight={0: 1.0, 1: 5.0})
    _, y, w = next(iter(feed.dataset(6)))
    np.testing.assert_allclose(w.numpy(), [1, 5, 2, 10, 1, 5])
    # Validation rows keep their own weights only, as Keras' class_weight leaves them.
    assert len(feed.element_spec("validation")) == 3 and len(feed.element_spec()) == 3


def test_a_resumed_pass_skips_the_rows_trained_before_in_the_same_shuffled_order(tmp_path):
    """A run resumed mid-epoch leaves out the rows its earlier attempt took: with the same
    seed the order is the same, so exactly those rows."""
    whole = _order(ArrowFeed(_stream(_batches()), _spec(), _dir(tmp_path, "whole"), shuffle_rows=1000,
                             seed=("j", 1, 0)))
    resumed = ArrowFeed(_stream(_batches()), _spec(), _dir(tmp_path, "resumed"), shuffle_rows=1000, seed=("j", 1, 0))
    resumed.skip_next_pass(1500)
    assert resumed.next_pass_rows() is None  # not known while the stream is unread
    np.testing.assert_array_equal(_order(resumed), whole[1500:])
    assert resumed.next_pass_rows() == 5000, "the skip holds for one pass only"


def test_later_epochs_that_fit_read_memory_every_row_in_a_new_order(tmp_path):
    """--memory-cache: the first pass streams; the later ones come from memory, each a full
    permutation (rows of the first fifth from anywhere, not only nearby blocks), the same
    one for the same seed and epoch, and a resumed pass skips exactly the rows before."""
    def feed(name, **kw):
        return ArrowFeed(_stream(_batches()), _spec(), _dir(tmp_path, name), shuffle_rows=1000,
                         seed=("job", 1, 0), memory_cache_bytes=2**20, **kw)

    cached = feed("cached")
    passes = [_order(cached) for _ in range(3)]
    assert cached.cache_state == "memory"
    for order in passes:
        np.testing.assert_array_equal(np.sort(order), np.arange(5000, dtype=np.float32))
    assert not np.array_equal(passes[1], passes[2]), "each epoch takes a new order"
    # A full permutation: where the rows of a 250-row step came from spreads over the pass.
    assert all(np.ptp(order[:250]) > 4000 for order in passes[1:])
    # Rows and labels stay paired.
    x, y, _ = _rows(cached.dataset(250))
    np.testing.assert_array_equal(x[:, 0] * 2, y)
    again = feed("again")
    _order(again)
    np.testing.assert_array_equal(_order(again), passes[1])
    resumed = feed("resumed")
    _order(resumed)
    resumed.epoch = 1  # the epoch of passes[1], resumed 1,700 rows in
    resumed.skip_next_pass(1700)
    np.testing.assert_array_equal(_order(resumed), passes[1][1700:])
    # In order without shuffling, and the same rows as the spill gives.
    plain = ArrowFeed(_stream(_batches()), _spec(), _dir(tmp_path, "plain"), memory_cache_bytes=2**20)
    for _ in range(3):
        np.testing.assert_array_equal(_order(plain), np.arange(5000, dtype=np.float32))
    assert plain.cache_state == "memory"


def test_rows_over_the_memory_cache_keep_reading_the_spill(tmp_path, capfd):
    small = ArrowFeed(_stream(_batches()), _spec(), _dir(tmp_path, "small"), shuffle_rows=1000,
                      seed=("job", 1, 0), memory_cache_bytes=10_000)  # 5,000 rows x 12 bytes do not fit
    for _ in range(2):
        assert sorted(_order(small)) == list(range(5000))
    assert small.cache_state == "spill" and small._cache is None
    assert "more than --memory-cache" in capfd.readouterr().out
    off = ArrowFeed(_stream(_batches()), _spec(), _dir(tmp_path, "off"))
    _order(off), _order(off)
    assert off.cache_state == "spill"


def test_a_pass_from_memory_for_fit_is_the_same_rows_as_the_python_pass(tmp_path):
    """`memory_pass` (a plain in-memory tf.data pipeline, for fit) gives the rows the Python
    path gives for the same epoch, skips a resumed pass's rows, and counts its progress by
    what the training loop reports, since tf.data holds the whole pass at once."""
    def feed(name):
        return ArrowFeed(_stream(_batches()), _spec(), _dir(tmp_path, name), shuffle_rows=1000,
                         seed=("job", 1, 0), memory_cache_bytes=2**20)

    python, memory = feed("python"), feed("memory")
    assert memory.memory_pass(128) is None, "not before the stream is read and cached"
    _order(python), _order(memory)
    assert memory.rows_delivered == 5000
    python.epoch = memory.epoch = 1
    x, y, sizes = _rows(memory.memory_pass(128))
    np.testing.assert_array_equal(x[:, 0], _order(python))
    np.testing.assert_array_equal(x[:, 0] * 2, y)
    assert sizes[:-1] == [128] * (len(sizes) - 1) and memory.last_pass_rows == 5000
    assert memory.rows_delivered == 5000, "handed to tf.data whole: counted as trained"
    memory.trained(1024)
    assert memory.rows_delivered == 6024
    memory.trained(6000)  # padding steps past the end count no rows
    assert memory.rows_delivered == 10000
    memory.epoch = python.epoch = 2
    memory.skip_next_pass(1700)
    x, _, _ = _rows(memory.memory_pass(128))
    np.testing.assert_array_equal(x[:, 0], _order(python)[1700:])
    assert memory.last_pass_rows == 3300 and memory.rows_delivered == 10000
    # The Python path still reads the same memory afterwards.
    memory.epoch = 3
    python.epoch = 3
    np.testing.assert_array_equal(_order(memory), _order(python))
    plain = ArrowFeed(_stream(_batches()), _spec(), _dir(tmp_path, "plain"), memory_cache_bytes=2**20)
    _order(plain)
    x, _, _ = _rows(plain.memory_pass(1000))
    np.testing.assert_array_equal(x[:, 0], np.arange(5000, dtype=np.float32))


def test_a_python_source_opens_a_pass_per_iterator_and_reports_its_errors():
    """The tf.data source over a Python iterator (no from_generator): each iterator a new
    pass, an unfinished pass closed when the next opens, an error raised in the pass
    surfacing from the iterator with its message."""
    import tensorflow as tf

    from tfos_magic.training.python_source import iterator_dataset

    opened, closed = [], []

    def chunks():
        opened.append(len(opened))
        try:
            for at in range(0, 10, 4):
                yield np.arange(at, min(at + 4, 10), dtype=np.float32), np.zeros(min(4, 10 - at), np.int64)
        finally:
            closed.append(len(closed))

    signature = (tf.TensorSpec((None,), tf.float32), tf.TensorSpec((None,), tf.int64))
    ds = iterator_dataset(chunks, signature)
    assert [len(x) for x, _ in ds] == [4, 4, 2]
    assert np.concatenate([x.numpy() for x, _ in ds]).tolist() == list(range(10))
    next(iter(ds))  # a pass left unfinished...
    assert [len(x) for x, _ in ds] == [4, 4, 2]  # ...is closed when the next opens
    assert len(opened) == 4 and len(closed) == 4
    assert ds.element_spec[0].shape.as_list() == [None]

    def broken():
        yield np.zeros(3, np.float32), np.zeros(3, np.int64)
        raise FeedError("The feature column 'a' has null values")

    with pytest.raises(tf.errors.OpError, match="null values"):
        list(iterator_dataset(broken, signature))


def test_the_loss_curve_s_interval_mean_covers_each_step_once():
    """ps mode's and PyTorch's loops: each report takes the steps since the last, and the
    epoch's end takes its tail; nothing is left over, nothing is counted twice."""
    from tfos_magic.training.job_context import IntervalMean

    interval = IntervalMean()
    assert interval.take() is None
    for loss in (1.0, 2.0, 3.0):
        interval.add(loss)
    assert interval.take() == 2.0 and interval.steps == 0
    interval.add(0.5)
    assert interval.take() == 0.5 and interval.take() is None
