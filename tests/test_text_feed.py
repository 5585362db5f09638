"""Text, binary and variable-length array columns in the feed, with real pyarrow, Spark
(schemas only) and tf.data: what reaches the model, row for row, and the refusals that
name the column and the fix."""

import numpy as np
import pyarrow as pa
import pytest
from pyspark.sql import types as T

from tfos_magic.driver.columns import prepare
from tfos_magic.errors import TfosError
from tfos_magic.protocol.arrays import BatchArrays, RaggedArray
from tfos_magic.protocol.feed_spec import PADDED, RAGGED, SPLIT_COLUMN, STRING, ColumnSpec, FeedError, FeedSpec
from tfos_magic.protocol.options import TrainOptions, options_from
from test_feed import _stream

from tfos_magic.training.arrow_feed import ArrowFeed, rebatch

RNG = np.random.default_rng(7)


def _sequences(rows: int, start: int = 0) -> list[list[int]]:
    """Rows of 0 to 9 ids, each row's ids starting at its own number (so rows can be told apart)."""
    return [list(range(start + i, start + i + int(n))) for i, n in enumerate(RNG.integers(0, 10, rows))]


def _batch(rows: int, start: int, split: bool = False) -> pa.RecordBatch:
    seqs = _sequences(rows, start)
    cols = {
        "text": pa.array([f"row {start + i} " + "word " * (i % 7) for i in range(rows)]),
        "blob": pa.array([bytes([i % 256, 0, 255]) * (i % 4) for i in range(rows)], pa.binary()),
        "ids": pa.array(seqs, pa.list_(pa.int64())),
        "y": pa.array(np.arange(start, start + rows, dtype=np.float32)),
    }
    if split:
        cols[SPLIT_COLUMN] = pa.array((np.arange(rows) % 4 == 0).astype(np.int8))
    return pa.RecordBatch.from_pydict(cols)


def _spec(lengths: str = RAGGED, **kw) -> FeedSpec:
    return FeedSpec([ColumnSpec("text", STRING), ColumnSpec("blob", STRING), ColumnSpec("ids", "int64", True, lengths)],
                    ColumnSpec("y", "float32"), "dict", **kw)


def test_a_ragged_array_slices_gathers_joins_and_pads_as_its_rows_would():
    rows = _sequences(50)
    ragged = RaggedArray.from_arrow(pa.array(rows, pa.list_(pa.int64())).slice(5, 40), np.int64)
    want = rows[5:45]
    assert len(ragged) == 40
    assert [list(ragged[i:i + 1].values) for i in range(40)] == want
    take = RNG.permutation(40)[:25]
    gathered = ragged[take]
    assert [gathered.values[a:b].tolist() for a, b in zip(gathered.splits, gathered.splits[1:])] == [want[i] for i in take]
    joined = RaggedArray.concatenate([ragged[:10], ragged[10:10], ragged[10:]])
    assert np.array_equal(joined.values, ragged.values) and np.array_equal(joined.splits, ragged.splits)
    padded = ragged.padded(4)
    assert padded.tolist() == [(r + [0] * 4)[:4] for r in want]


def test_text_binary_and_ragged_columns_reach_tf_data_row_for_row(tmp_path):
    import tensorflow as tf

    batches = [_batch(300, 0), _batch(250, 300)]
    feed = ArrowFeed(_stream(batches), _spec(), str(tmp_path))
    ds = feed.dataset(64)
    seen = list(ds)
    x, y = seen[0]
    assert x["text"].dtype == tf.string and x["blob"].dtype == tf.string and isinstance(x["ids"], tf.RaggedTensor)
    assert [len(b[1]) for b in seen] == [64] * 8 + [38]
    table = pa.Table.from_batches(batches)
    texts = [t.decode() for b in seen for t in b[0]["text"].numpy()]
    assert texts == table.column("text").to_pylist()
    assert [v for b in seen for v in b[0]["blob"].numpy()] == table.column("blob").to_pylist()
    assert [r for b in seen for r in b[0]["ids"].to_list()] == table.column("ids").to_pylist()
    # Later passes: from memory, as fit takes them (whole rows in a new order), then the spill.
    again = list(feed.memory_pass(64) if feed.from_memory() else feed.dataset(64))
    assert sorted(r for b in again for r in b[0]["ids"].to_list()) == sorted(table.column("ids").to_pylist())


def test_the_memory_pass_and_the_spill_give_the_same_ragged_rows_shuffled(tmp_path):
    batches = [_batch(500, 0)]
    for cache in (2**30, 0):
        (tmp_path / str(cache)).mkdir()
        feed = ArrowFeed(_stream(batches), _spec(), str(tmp_path / str(cache)), shuffle_rows=128,
                         memory_cache_bytes=cache)
        first = [r for b in feed.dataset(50) for r in b[0]["ids"].to_list()]
        ds = feed.memory_pass(50) or feed.dataset(50)
        assert feed.cache_state == ("memory" if cache else "spill")
        second = [r for b in ds for r in b[0]["ids"].to_list()]
        want = sorted(pa.Table.from_batches(batches).column("ids").to_pylist())
        assert sorted(first) == want and sorted(second) == want and first != second


def test_padded_arrays_have_the_stated_width(tmp_path):
    batch = _batch(100, 0)
    feed = ArrowFeed(_stream([batch]), _spec(PADDED, array_lengths={"ids": 5}), str(tmp_path))
    x, _ = next(iter(feed.dataset(100)))
    rows = batch.column("ids").to_pylist()
    assert x["ids"].shape == (100, 5) and x["ids"].numpy().tolist() == [(r + [0] * 5)[:5] for r in rows]


def test_an_agreed_pass_pads_with_empty_ragged_and_text_batches(tmp_path):
    feed = ArrowFeed(_stream([_batch(70, 0)]), _spec(), str(tmp_path))
    batches = list(feed.padded_dataset(32).take(5))
    assert [len(y) for _, y in batches] == [32, 32, 6, 0, 0]
    assert batches[-1][0]["ids"].shape[0] == 0 and batches[-1][0]["text"].shape == (0,)


def test_preprocess_runs_per_row_and_knows_training_from_validation(tmp_path):
    import tensorflow as tf

    calls = []

    def preprocess(features, label, training):
        calls.append(training)  # traced once per dataset
        words = tf.strings.split(features["text"])
        return {"words": tf.size(words), "ids": features["ids"]}, label + (1000.0 if training else 0.0)

    feed = ArrowFeed(_stream([_batch(200, 0, split=True)]), _spec(has_validation=True), str(tmp_path),
                     preprocess=preprocess)
    train = list(feed.dataset(32))
    val = list(feed.dataset(32, split="validation"))
    assert sorted(set(calls)) == [False, True]
    assert all(float(y.numpy().min()) >= 1000 for _, y in train) and all(float(y.numpy().max()) < 1000 for _, y in val)
    assert sum(len(y) for _, y in train) == 150 and sum(len(y) for _, y in val) == 50
    assert train[0][0]["words"].dtype == tf.int32 and isinstance(train[0][0]["ids"], tf.RaggedTensor)
    assert set(feed.batch_spec()[0]) == {"words", "ids"}


def test_nulls_in_a_text_column_name_it_and_the_fillna_that_fills_it(tmp_path):
    batch = pa.RecordBatch.from_pydict({"text": pa.array(["a", None]), "blob": pa.array([b"", b""]),
                                        "ids": pa.array([[1], [2]]), "y": pa.array([1.0, 2.0], pa.float32())})
    with pytest.raises(FeedError, match=r"feature column 'text' has null values.*--fillna TEXT"):
        list(ArrowFeed(_stream([batch]), _spec(), str(tmp_path)).batches())


def test_rows_of_different_lengths_name_both_fixes(tmp_path):
    with pytest.raises(FeedError, match=r"'ids' has rows of different lengths \(0 to 9\): pass --pad ids=9.*--ragged ids"):
        list(ArrowFeed(_stream([_batch(100, 0)]), _spec(lengths="fixed"), str(tmp_path)).batches())


def test_rebatch_cuts_ragged_chunks_into_exact_batches():
    chunks = [BatchArrays(_spec()).to_numpy(_batch(n, s)) for n, s in ((30, 0), (5, 30), (41, 35))]
    out = list(rebatch(iter(chunks), 16))
    assert [len(b[1]) for b in out] == [16, 16, 16, 16, 12] == [len(b[0]["ids"]) for b in out]
    rows = [r.tolist() for b in out for r in np.split(b[0]["ids"].values, b[0]["ids"].splits[1:-1])]
    assert rows == [r.tolist() for c in chunks for r in np.split(c[0]["ids"].values, c[0]["ids"].splits[1:-1])]


def _frame(spark, **types):
    return spark.createDataFrame([], T.StructType([T.StructField(n, t) for n, t in types.items()]))


def test_text_and_binary_columns_become_string_inputs_of_a_dict(spark):
    _, spec = prepare(_frame(spark, review=T.StringType(), png=T.BinaryType(), y=T.LongType()), label="y",
                      features=None, require_label=True)
    assert spec.inputs == "dict" and [(c.name, c.dtype) for c in spec.features] == [("review", STRING), ("png", STRING)]
    with pytest.raises(TfosError, match=r"--inputs matrix makes one float32 matrix, and the column 'review'.*--inputs dict"):
        prepare(_frame(spark, review=T.StringType(), y=T.LongType()), label="y", features=None, inputs="matrix",
                require_label=True)
    with pytest.raises(TfosError, match=r"label column 'y' is text.*StringIndexer"):
        prepare(_frame(spark, review=T.StringType(), y=T.StringType()), label="y", features=None, require_label=True)


def test_an_image_source_s_struct_gets_the_columns_to_select(spark):
    image = T.StructType([T.StructField(n, t) for n, t in (
        ("origin", T.StringType()), ("height", T.IntegerType()), ("width", T.IntegerType()),
        ("nChannels", T.IntegerType()), ("mode", T.IntegerType()), ("data", T.BinaryType()))])
    with pytest.raises(TfosError) as err:
        prepare(_frame(spark, image=image, y=T.LongType()), label="y", features=None, require_label=True)
    text = str(err.value)
    assert "feature column 'image'" in text and "F.col('image.data')" in text and "binaryFile" in text


def test_ragged_and_padded_columns_are_checked_against_the_frame(spark):
    frame = _frame(spark, ids=T.ArrayType(T.IntegerType()), a=T.DoubleType(), y=T.DoubleType())
    _, spec = prepare(frame, label="y", features=None, require_label=True, ragged=["ids"])
    assert spec.inputs == "dict" and spec.features[0].ragged
    _, spec = prepare(frame, label="y", features=None, require_label=True, pad={"ids": 12})
    assert spec.features[0].lengths == PADDED and spec.array_lengths == {"ids": 12}
    with pytest.raises(TfosError, match=r"--ragged ids has none: pass --pad ids=N"):
        prepare(frame, label="y", features=None, inputs="matrix", require_label=True, ragged=["ids"])
    with pytest.raises(TfosError, match=r"--pad names 'a', of type double: only array columns"):
        prepare(frame, label="y", features=None, require_label=True, pad={"a": 3})
    with pytest.raises(TfosError, match=r"--ragged names 'z', which is not a feature column"):
        prepare(frame, label="y", features=None, require_label=True, ragged=["z"])


def test_fillna_fills_text_with_text_and_numbers_with_numbers(spark):
    df = spark.createDataFrame([("a", None, 1.0), (None, 2.0, 0.0)], "t string, x double, y double")
    for value, want in (("none", [(b"a", None), (b"none", 2.0)]), (0.5, [(b"a", 0.5), (None, 2.0)])):
        frame, _ = prepare(df, label="y", features=None, require_label=True, fillna=value)
        assert [(r.t and bytes(r.t), r.x) for r in frame.collect()] == want, value


def test_options_parse_pad_lengths_and_a_text_fillna():
    opts = options_from({"pad": TrainOptions.__dataclass_fields__["pad"].metadata["type"]("tokens=64, events=20"),
                         "fillna": TrainOptions.__dataclass_fields__["fillna"].metadata["type"]("unknown")})
    assert opts.pad == {"tokens": 64, "events": 20} and opts.fillna == "unknown"
    with pytest.raises(Exception, match="COLUMN=LENGTH"):
        TrainOptions.__dataclass_fields__["pad"].metadata["type"]("tokens")


def test_an_exported_ragged_input_is_its_values_and_row_splits_in_the_signature(tmp_path):
    """A SavedModel signature takes dense tensors only: without names of our own, TensorFlow
    flattens a ragged input into anonymous `inputs`, `inputs_1` arguments."""
    import tensorflow as tf

    from tfos_magic.job.export import export_saved_model

    ids = tf.keras.Input(shape=(None,), dtype=tf.int64, ragged=True, name="ids")
    text = tf.keras.Input(shape=(), dtype=tf.string, name="text")
    pooled = tf.keras.layers.GlobalAveragePooling1D()(tf.keras.layers.Embedding(50, 4)(ids).to_tensor())
    hashed = tf.keras.layers.Embedding(8, 4)(tf.keras.layers.Hashing(8)(text))
    model = tf.keras.Model([ids, text], tf.keras.layers.Dense(1)(tf.keras.layers.Concatenate()([pooled, hashed])))
    spec = FeedSpec([ColumnSpec("ids", "int64", True, RAGGED), ColumnSpec("text", STRING)], None, "dict")
    path = export_saved_model(model, spec, str(tmp_path / "served"))

    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    assert sorted(serve.structured_input_signature[1]) == ["ids_row_splits", "ids_values", "text"]
    rows = tf.ragged.constant([[1, 2, 3], [], [4]], dtype=tf.int64)
    words = tf.constant([b"a", b"b", b"c"])
    out = serve(ids_values=rows.values, ids_row_splits=rows.row_splits, text=words)["prediction"]
    expected = model({"ids": rows, "text": words})
    # atol: an output near zero differs in its last float32 bits between the two graphs
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.serve({"ids": rows, "text": words})["prediction"].numpy(), expected.numpy(),
                               rtol=1e-5, atol=1e-6)
