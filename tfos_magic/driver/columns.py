"""Pick and check the label and feature columns before anything runs.

Only the schema is read, so this costs no Spark job. Feature columns become float32
(or int64 for integer columns fed as a dict, e.g. ids for embeddings); array columns and
ML vectors are allowed, of a fixed length or, with --ragged or --pad, of any; text and
binary columns become tf.string inputs (a dict). Nulls are checked where the data is,
on the executors, as it streams.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, functions as F, types as T

from ..errors import TfosError
from ..protocol.feed_spec import DICT, FIXED, MATRIX, PADDED, RAGGED, SPLIT_COLUMN, STRING, ColumnSpec, FeedSpec

_INTEGRAL = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
_FRACTIONAL = (T.FloatType, T.DoubleType, T.DecimalType)
_TEXT = (T.StringType, T.BinaryType, T.CharType, T.VarcharType)
_IMAGE_FIELDS = {"data", "height", "width", "nChannels"}  # spark.read.format("image")


def _struct_hint(name: str, dt: T.StructType) -> str:
    """How a struct becomes inputs: an image source's struct, or any other."""
    fields = set(dt.fieldNames())
    if _IMAGE_FIELDS <= fields:
        return (f"it is what spark.read.format('image') gives. Select its pixels, "
                f"df.select(F.col('{name}.data').alias('pixels'), ...): a binary column (one tf.string a "
                f"row) of height x width x nChannels bytes in BGR order, for tf.io.decode_raw in the model. "
                f"For the encoded files (PNG, JPEG) instead, read them with spark.read.format('binaryFile') "
                f"and feed its 'content' column to tf.io.decode_image")
    return f"select its fields as columns, e.g. df.select('{name}.*')"


def _is_vector(dt: T.DataType) -> bool:
    return type(dt).__name__ == "VectorUDT"


def _column_spec(name: str, dt: T.DataType, role: str, lengths: str = FIXED) -> ColumnSpec:
    if isinstance(dt, T.BooleanType) or isinstance(dt, _INTEGRAL):
        return ColumnSpec(name, "int64")
    if isinstance(dt, _FRACTIONAL):
        return ColumnSpec(name, "float32")
    if isinstance(dt, _TEXT):
        return ColumnSpec(name, STRING)
    if _is_vector(dt):
        return ColumnSpec(name, "float32", is_array=True, lengths=lengths)
    if isinstance(dt, T.ArrayType) and isinstance(dt.elementType, _INTEGRAL + (T.BooleanType,)):
        return ColumnSpec(name, "int64", is_array=True, lengths=lengths)
    if isinstance(dt, T.ArrayType) and isinstance(dt.elementType, _FRACTIONAL):
        return ColumnSpec(name, "float32", is_array=True, lengths=lengths)
    hint = {
        T.MapType: "turn the map into separate numeric columns",
        T.ArrayType: "arrays of numbers only: an array of text is a string to split in the model "
                     "(concat_ws in the %%spark_etl cell, then tf.strings.split or TextVectorization)",
    }.get(type(dt), "cast it to a numeric type or drop it from --features")
    if isinstance(dt, T.StructType):
        hint = _struct_hint(name, dt)
    raise TfosError(
        f"The {role} column {name!r} has type {dt.simpleString()}, which cannot be fed to "
        f"TensorFlow as it is. Numbers, numeric arrays, ML vectors, text and binary columns can: {hint} "
        "in the %%spark_etl cell."
    )


def _weight_spec(name: str, fields: dict[str, T.DataType], label: str | None) -> ColumnSpec:
    """--sample-weight: one numeric column, fed as float32 beside the label."""
    if label is None:
        raise TfosError("--sample-weight weighs each row's loss, so it needs a label: pass --label COLUMN too.")
    if name not in fields:
        raise TfosError(f"The --sample-weight column {name!r} is not in the job's DataFrame (columns: "
                        f"{', '.join(fields)}). Add it in the %%spark_etl cell.")
    if not isinstance(fields[name], _INTEGRAL + _FRACTIONAL):
        raise TfosError(f"The --sample-weight column {name!r} has type {fields[name].simpleString()}; it must be a "
                        "number per row (cast it in the %%spark_etl cell).")
    return ColumnSpec(name, "float32")


def auto_inputs(features: list[ColumnSpec]) -> str:
    """One matrix when every feature is floating point (scalars, fixed-length float arrays and
    ML vectors, concatenated in column order): the shape of VectorAssembler output and of
    most models. A dict as soon as an integer, text, binary or ragged column is among them:
    ids for embeddings must stay int64 and apart, strings are no numbers, and a ragged row
    has no width."""
    return MATRIX if all(c.dtype == "float32" and not c.ragged for c in features) else DICT


def _lengths_of(names: list[str], fields: dict[str, T.DataType], ragged: list[str], pad: dict[str, int]) -> dict[str, str]:
    """--ragged and --pad: which array columns' rows may differ in length, checked."""
    both = sorted(set(ragged) & set(pad))
    if both:
        raise TfosError(f"--ragged and --pad both name {', '.join(both)}: a column is either ragged or padded.")
    for option, cols in (("--ragged", ragged), ("--pad", list(pad))):
        for n in cols:
            if n not in names:
                raise TfosError(f"{option} names {n!r}, which is not a feature column (features: {', '.join(names)}).")
            if not (isinstance(fields[n], T.ArrayType) or _is_vector(fields[n])):
                raise TfosError(f"{option} names {n!r}, of type {fields[n].simpleString()}: only array columns "
                                "have rows of different lengths.")
    for n, width in pad.items():
        if width < 1:
            raise TfosError(f"--pad {n}={width}: the length must be at least 1.")
    return {**{n: RAGGED for n in ragged}, **{n: PADDED for n in pad}}


def fill_nulls(frame: DataFrame, columns: list[ColumnSpec], value: float | str | None, prefix: str = "") -> DataFrame:
    """--fillna: a number fills the numeric scalar columns, text the text and binary ones
    (as its UTF-8 bytes: they stream as binary)."""
    if value is None:
        return frame
    if isinstance(value, str):
        names = [prefix + c.name for c in columns if c.dtype == STRING]
        fill = F.lit(value.encode()).cast(T.BinaryType())
        return frame.withColumns({n: F.coalesce(F.col(f"`{n}`"), fill) for n in names}) if names else frame
    names = [prefix + c.name for c in columns if not c.is_array and c.dtype != STRING]
    return frame.na.fill(value, subset=names) if names else frame


def _check_matrix(features: list[ColumnSpec]) -> None:
    """--inputs matrix puts every feature side by side as float32: numbers of a known width only."""
    for c in features:
        if c.dtype == STRING:
            raise TfosError(f"--inputs matrix makes one float32 matrix, and the column {c.name!r} is text or "
                            "binary: use --inputs dict (or auto), which feeds it as a tf.string input named "
                            f"{c.name!r}, or leave it out with --features.")
        if c.ragged:
            raise TfosError(f"--inputs matrix needs a width for every column, and --ragged {c.name} has none: pass "
                            f"--pad {c.name}=N to pad its rows to N values, or use --inputs dict for a ragged "
                            "input of its own.")


def cast_column(spec: ColumnSpec, dt: T.DataType):
    """The column as the feed takes it (float32 or int64; a vector as a float array)."""
    col = F.col(f"`{spec.name}`")
    if _is_vector(dt):
        from pyspark.ml.functions import vector_to_array

        return vector_to_array(col, "float32").alias(spec.name)
    if spec.dtype == STRING:  # bytes on the wire, text as UTF-8: what a tf.string holds
        return col.cast(T.BinaryType()).alias(spec.name)
    target: T.DataType = T.FloatType() if spec.dtype == "float32" else T.LongType()
    if spec.is_array:
        target = T.ArrayType(target)
    return col.cast(target).alias(spec.name)


def prepare(
    df: DataFrame,
    *,
    label: str | None,
    features: list[str] | None,
    inputs: str = "auto",
    fillna: float | str | None = None,
    require_label: bool,
    validation: DataFrame | None = None,
    weight: str | None = None,
    ragged: list[str] | None = None,
    pad: dict[str, int] | None = None,
) -> tuple[DataFrame, FeedSpec]:
    """Select, check and cast the columns; return the frame to stream and its FeedSpec."""
    fields = {f.name: f.dataType for f in df.schema.fields}
    if label is not None and label not in fields:
        raise TfosError(
            f"The label column {label!r} is not in the job's DataFrame (columns: "
            f"{', '.join(fields)}). Pass the right name with --label, or add it in the %%spark_etl cell."
        )
    if label is None and require_label:
        raise TfosError(
            "build_model() training needs a label column: pass --label COLUMN to %%tf_train "
            f"(columns: {', '.join(fields)})."
        )
    weight_spec = _weight_spec(weight, fields, label) if weight else None
    names = features or [n for n in fields if n not in (label, weight)]
    missing = [n for n in names if n not in fields]
    if missing:
        raise TfosError(
            f"--features names columns that are not in the DataFrame: {', '.join(missing)} "
            f"(columns: {', '.join(fields)})."
        )
    if not names:
        raise TfosError("The DataFrame has no feature columns besides the label; add some in the %%spark_etl cell.")
    lengths = _lengths_of(names, fields, ragged or [], pad or {})
    feature_specs = [_column_spec(n, fields[n], "feature", lengths.get(n, FIXED)) for n in names]
    label_spec = _column_spec(label, fields[label], "label") if label else None
    if label_spec is not None and label_spec.dtype == STRING:
        raise TfosError(f"The label column {label!r} is text or binary: a loss needs numbers. Index it in the "
                        "%%spark_etl cell (pyspark.ml.feature.StringIndexer gives class ids 0..n-1).")
    mode = auto_inputs(feature_specs) if inputs == "auto" else inputs
    if mode not in (MATRIX, DICT):
        raise TfosError(f"--inputs must be auto, matrix or dict, not {inputs!r}.")
    if mode == MATRIX:
        _check_matrix(feature_specs)
        for c in feature_specs:
            c.dtype = "float32"
    spec = FeedSpec(feature_specs, label_spec, mode, has_validation=validation is not None, weight=weight_spec,
                    array_lengths=dict(pad or {}))

    def select(frame: DataFrame, split: int | None) -> DataFrame:
        frame_fields = {f.name: f.dataType for f in frame.schema.fields}
        absent = [c for c in spec.columns if c not in frame_fields]
        if absent:
            raise TfosError(
                f"The validation DataFrame lacks the columns {', '.join(absent)}; it needs the "
                "same feature and label columns as the training DataFrame."
            )
        cols = [cast_column(c, frame_fields[c.name]) for c in feature_specs]
        cols += [cast_column(c, frame_fields[c.name]) for c in (label_spec, weight_spec) if c]
        if split is not None:
            cols.append(F.lit(split).cast(T.ByteType()).alias(SPLIT_COLUMN))
        return fill_nulls(frame.select(*cols), feature_specs, fillna)

    if validation is None:
        return select(df, None), spec
    return select(df, 0).unionByName(select(validation, 1)), spec
