"""Runs in the notebook's kernel: plan a job's predictions over a Spark DataFrame.

The driver only builds the query: the features are cast as they were for training
(`columns.cast_column`, with the job's recorded feed), and `task/predictor.py` runs
the model on the executors through `mapInArrow`. No row reaches the driver.
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import DataFrame, types as T

from ..errors import TfosError
from ..protocol.feed_spec import FeedSpec
from ..protocol.model_file import ModelRef
from ..task.predictor import INPUT_PREFIX, predict_fn
from .columns import cast_column, fill_nulls, prepare
from .executor_env import ship_package
from .spark_backend import backend_for


def trained_feed(state: dict[str, Any], options: Any, df: DataFrame) -> FeedSpec:
    """The feed the job trained with (recorded at launch), without its label."""
    if state.get("feed"):
        spec = FeedSpec.from_dict(state["feed"])
    else:  # a job trained before the feed was recorded: derive it as training did
        names = options.features or [c for c in df.columns if c != options.label]
        _, spec = prepare(df, label=None, features=names, inputs=options.inputs, fillna=options.fillna,
                          require_label=False, ragged=options.ragged, pad=options.pad)
    return spec.inputs_only()


def predict(df: DataFrame, model: ModelRef, spec: FeedSpec, output_col: str, outputs: int,
            fillna: float | str | None = None) -> DataFrame:
    """`df` with one more column, `output_col`: the prediction for each row of the saved
    model `model` names."""
    fields = {f.name: f.dataType for f in df.schema.fields}
    missing = [c.name for c in spec.features if c.name not in fields]
    if missing:
        raise TfosError(f"The DataFrame lacks the feature columns {', '.join(missing)} the job trained on "
                        f"(columns: {', '.join(fields)}). Build it as the %%spark_etl cell built the training data.")
    if output_col in fields:
        raise TfosError(f"The DataFrame already has a column {output_col!r}; pass another output_col.")
    inputs = [cast_column(c, fields[c.name]).alias(INPUT_PREFIX + c.name) for c in spec.features]
    wide = df.select("*", *inputs)
    wide = fill_nulls(wide, spec.features, fillna, prefix=INPUT_PREFIX)
    value: T.DataType = T.FloatType() if outputs == 1 else T.ArrayType(T.FloatType(), containsNull=False)
    schema = T.StructType(df.schema.fields + [T.StructField(output_col, value, nullable=False)])
    ship_package(backend_for(df.sparkSession))  # a session that trained nothing yet has no copy
    return wide.mapInArrow(predict_fn(model, spec.to_dict(), list(df.columns), output_col, outputs),
                           schema)
