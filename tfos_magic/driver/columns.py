"""Pick and check the label and feature columns before anything runs.

Only the schema is read, so this costs no Spark job. Feature columns become float32
(or int64 for integer columns fed as a dict, e.g. ids for embeddings); fixed-length
array columns and ML vectors are allowed. Nulls are checked where the data is, on
the executors, as it streams.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, functions as F, types as T

from ..errors import TfosError
from ..protocol.feed_spec import DICT, MATRIX, SPLIT_COLUMN, ColumnSpec, FeedSpec

_INTEGRAL = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
_FRACTIONAL = (T.FloatType, T.DoubleType, T.DecimalType)


def _is_vector(dt: T.DataType) -> bool:
    return type(dt).__name__ == "VectorUDT"


def _column_spec(name: str, dt: T.DataType, role: str) -> ColumnSpec:
    if isinstance(dt, T.BooleanType) or isinstance(dt, _INTEGRAL):
        return ColumnSpec(name, "int64")
    if isinstance(dt, _FRACTIONAL):
        return ColumnSpec(name, "float32")
    if _is_vector(dt):
        return ColumnSpec(name, "float32", is_array=True)
    if isinstance(dt, T.ArrayType) and isinstance(dt.elementType, _INTEGRAL + (T.BooleanType,)):
        return ColumnSpec(name, "int64", is_array=True)
    if isinstance(dt, T.ArrayType) and isinstance(dt.elementType, _FRACTIONAL):
        return ColumnSpec(name, "float32", is_array=True)
    hint = {
        T.StringType: "index it first, e.g. pyspark.ml.feature.StringIndexer, or hash it to an integer id",
        T.MapType: "turn the map into separate numeric columns",
        T.StructType: "select its numeric fields as columns, e.g. df.select('col.*')",
    }.get(type(dt), "cast it to a numeric type or drop it from --features")
    raise TfosError(
        f"The {role} column {name!r} has type {dt.simpleString()}, which cannot be fed to "
        f"TensorFlow. Only numeric columns, fixed-length numeric arrays and ML vectors are "
        f"supported: {hint} in the %%spark_etl cell."
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
    most models. A dict as soon as an integer column is among them: ids for embeddings
    must stay int64 and apart."""
    return MATRIX if all(c.dtype == "float32" for c in features) else DICT


def cast_column(spec: ColumnSpec, dt: T.DataType):
    """The column as the feed takes it (float32 or int64; a vector as a float array)."""
    col = F.col(f"`{spec.name}`")
    if _is_vector(dt):
        from pyspark.ml.functions import vector_to_array

        return vector_to_array(col, "float32").alias(spec.name)
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
    fillna: float | None = None,
    require_label: bool,
    validation: DataFrame | None = None,
    weight: str | None = None,
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
    feature_specs = [_column_spec(n, fields[n], "feature") for n in names]
    label_spec = _column_spec(label, fields[label], "label") if label else None
    mode = auto_inputs(feature_specs) if inputs == "auto" else inputs
    if mode not in (MATRIX, DICT):
        raise TfosError(f"--inputs must be auto, matrix or dict, not {inputs!r}.")
    if mode == MATRIX:
        for c in feature_specs:
            c.dtype = "float32"
    spec = FeedSpec(feature_specs, label_spec, mode, has_validation=validation is not None, weight=weight_spec)

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
        out = frame.select(*cols)
        if fillna is not None:
            out = out.na.fill(fillna, subset=[c.name for c in feature_specs if not c.is_array])
        return out

    if validation is None:
        return select(df, None), spec
    return select(df, 0).unionByName(select(validation, 1)), spec
