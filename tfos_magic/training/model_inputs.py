"""Does the user's model take what the feed gives? Checked before training, and used to
explain a shape error that TF raises later (a model without an `Input` layer cannot be
checked before it is called).

The feed gives one float32 matrix (`--inputs matrix`) or a dict of named tensors
(`--inputs dict`); `FeedSpec.describe()` says which, with names and shapes.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import TfosError
from ..protocol.feed_spec import MATRIX, FeedSpec
from .failures import root_exception, shorten

_LOOKS_LIKE_INPUTS = re.compile(r"input|shape|incompatible|Missing data|expected|rank|dimension", re.I)


class InputMismatch(TfosError):
    """The model's inputs and the feed disagree; the message says what each side has and the fix."""


def model_inputs(model: Any) -> list[tuple[str, tuple[int | None, ...]]] | None:
    """[(name, shape)] of a model whose inputs are known (functional, or with an Input layer)."""
    try:
        tensors = model.inputs
    except AttributeError:
        return None
    if not tensors:
        return None
    names = list(getattr(model, "input_names", None) or [getattr(t, "name", f"input_{i}") for i, t in enumerate(tensors)])
    return [(n, tuple(t.shape)) for n, t in zip(names, tensors)]


def _shape(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("batch" if i == 0 else str(d) for i, d in enumerate(shape)) + (",)" if len(shape) == 1 else ")")


def _describe_model(inputs: list[tuple[str, tuple[int | None, ...]]]) -> str:
    if len(inputs) == 1:
        return f"one input of shape {_shape(inputs[0][1])}"
    return f"{len(inputs)} named inputs: " + ", ".join(f"{n!r} {_shape(s)}" for n, s in inputs)


def _matrix_width(spec: FeedSpec) -> int | None:
    widths = [spec.width(c) for c in spec.features]
    return None if None in widths else sum(w or 0 for w in widths)


def _fix(spec: FeedSpec, inputs: list[tuple[str, tuple[int | None, ...]]] | None) -> str:
    features = [c.name for c in spec.features]
    if inputs is None:
        if spec.inputs == MATRIX:
            return ("If the model takes named inputs, pass --inputs dict and name its Input layers after the "
                    "columns; to change the matrix's width, choose the columns with --features.")
        return "If the model takes one tensor, pass --inputs matrix (the features side by side, in column order)."
    names = [n for n, _ in inputs]
    if len(inputs) > 1:
        absent = [n for n in names if n not in features]
        if absent:
            return (f"The feed has no columns named {', '.join(map(repr, absent))}: name the model's Input layers "
                    f"after the columns ({', '.join(features)}), or choose the columns with --features "
                    "(and --inputs dict).")
        return "Pass --inputs dict, so that each named input gets its own column."
    want = inputs[0][1][-1] if len(inputs[0][1]) == 2 else None
    if spec.inputs != MATRIX:
        return (f"Pass --inputs matrix to feed the features side by side as one tensor"
                + (f" (its width must be {want})." if want else ".")
                + (" Integer columns become float32 there." if any(c.dtype == "int64" for c in spec.features) else ""))
    return (f"Choose feature columns whose widths add up to {want} with --features (now {_matrix_width(spec)} "
            f"from {', '.join(features)})." if want else "Give the model an Input of shape (width,) for the matrix.")


def mismatch(spec: FeedSpec, inputs: list[tuple[str, tuple[int | None, ...]]] | None) -> str | None:
    """Why the model cannot take the feed, or None when it can (or cannot be told yet)."""
    if inputs is None:
        return None
    features = {c.name: c for c in spec.features}
    if spec.inputs == MATRIX:
        if len(inputs) > 1:
            return "the model has several named inputs"
        shape = inputs[0][1]
        width = _matrix_width(spec)
        if len(shape) != 2:
            return f"the model's input has rank {len(shape)}"
        if shape[-1] is not None and width is not None and shape[-1] != width:
            return f"the model takes {shape[-1]} values a row, the feed gives {width}"
        return None
    # Keras matches a dict to the model's inputs by name.
    if any(n not in features for n, _ in inputs):
        return "the model's input names are not all columns of the feed"
    for name, shape in inputs:
        c = features.get(name)
        if c is not None and c.is_array and len(shape) == 2 and shape[-1] not in (None, spec.width(c)):
            return f"input {name!r} takes {shape[-1]} values a row, the column gives {spec.width(c)}"
    return None


def check(model: Any, spec: FeedSpec) -> None:
    """Raise InputMismatch before training when the model's known inputs cannot take the feed."""
    inputs = model_inputs(model)
    why = mismatch(spec, inputs)
    if why:
        raise InputMismatch(f"The model's inputs do not match the feed ({why}). The model has "
                            f"{_describe_model(inputs)}. The feed gives {spec.describe()}. {_fix(spec, inputs)}")


def explain(exc: BaseException, model: Any, spec: FeedSpec) -> InputMismatch | None:
    """For an error TF raised while first calling the model: the same explanation, if it is
    about inputs or shapes. The caller raises it `from exc`, so the traceback keeps both."""
    name, text = root_exception(exc)
    if not _LOOKS_LIKE_INPUTS.search(text):
        return None
    inputs = model_inputs(model)
    has = f" The model has {_describe_model(inputs)}." if inputs else ""
    return InputMismatch(f"{name}: {shorten(' '.join(text.split()), 600)}.{has} The feed gives {spec.describe()}. "
                         f"{_fix(spec, inputs)}")
