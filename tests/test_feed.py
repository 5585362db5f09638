"""The executor-side Arrow feed into tf.data, with real pyarrow and TensorFlow."""

import io

import numpy as np
import pyarrow as pa
import pytest

from tfos_magic.feed.arrow_feed import ArrowFeed, FeedError
from tfos_magic.feed.columns import SPLIT_COLUMN, ColumnSpec, FeedSpec


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
