"""`Job.export`: the trained model as a SavedModel that serves without Python classes.

Keras' own SavedModel export re-traces every layer, and fails on models Keras saves
and loads well (a subclassed model never called on data, weights made without a name).
The export here is a plain `tf.Module` holding the model's variables and one traced
`serving_default` function whose inputs are the feed's columns as training gave them:
`tf.saved_model.load(path).signatures["serving_default"]` runs it in a process that has
neither the train cell nor Keras' custom objects.
"""

from __future__ import annotations

from typing import Any

from ..protocol.tensors import tensor_spec
from ..protocol.feed_spec import MATRIX, FeedSpec

MATRIX_INPUT = "features"  # the one input of a --inputs matrix model


def input_signature(spec: FeedSpec) -> dict[str, Any]:
    """name -> tf.TensorSpec of what the model took in training (protocol/arrays.py): a
    text or binary column's is tf.string, one string a row."""
    import tensorflow as tf

    if spec.inputs == MATRIX:
        widths = [spec.width(c) for c in spec.features]
        width = None if None in widths else sum(w or 0 for w in widths)
        return {MATRIX_INPUT: tf.TensorSpec([None, width], tf.float32, name=MATRIX_INPUT)}
    return {c.name: tensor_spec(c, spec.width(c)) for c in spec.features}


def serving_signature(spec: FeedSpec) -> dict[str, Any]:
    """The signature's inputs: input_signature's, with each ragged column as two dense
    tensors, `<name>_values` and `<name>_row_splits` (int64, one more than the rows).
    A signature takes dense tensors only (TF Serving's requests carry nothing else); given
    a ragged spec, TensorFlow flattens it into anonymous `inputs`, `inputs_1` arguments."""
    import tensorflow as tf

    signature: dict[str, Any] = {}
    for name, s in input_signature(spec).items():
        if isinstance(s, tf.RaggedTensorSpec):
            signature[f"{name}_values"] = tf.TensorSpec((None,), s.dtype, name=f"{name}_values")
            signature[f"{name}_row_splits"] = tf.TensorSpec((None,), tf.int64, name=f"{name}_row_splits")
        else:
            signature[name] = s
    return signature


def _ragged_inputs(ragged: list[str], flat: dict[str, Any]) -> dict[str, Any]:
    """serving_signature's inputs as the model takes them: each ragged column rebuilt."""
    import tensorflow as tf

    inputs = dict(flat)
    for name in ragged:
        inputs[name] = tf.RaggedTensor.from_row_splits(inputs.pop(f"{name}_values"), inputs.pop(f"{name}_row_splits"))
    return inputs


def _named_outputs(value: Any) -> dict[str, Any]:
    """A signature returns a dict: `prediction` for one output, the model's own names for a
    dict, `output_<i>` for a list."""
    import tensorflow as tf

    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, tuple)):
        return {f"output_{i}": v for i, v in enumerate(tf.nest.flatten(value))}
    return {"prediction": value}


def export_saved_model(model: Any, spec: FeedSpec, path: str) -> str:
    """Write `model` to `path` (any tf.io.gfile path) with one `serving_default` signature."""
    import tensorflow as tf

    signature = input_signature(spec)
    matrix = spec.inputs == MATRIX

    def serve(inputs: dict[str, Any]) -> dict[str, Any]:
        return _named_outputs(model(inputs[MATRIX_INPUT] if matrix else inputs, training=False))

    module = tf.Module()
    module.weights = list(model.variables)  # tracked here: the traced function reads them
    # Lookup tables (a TextVectorization's vocabulary, a StringLookup's) are resources the
    # function reads too; a SavedModel keeps only the ones something tracks.
    module.resources = [t for t in tf.train.TrackableView(model).descendants()
                        if isinstance(t, tf.saved_model.experimental.TrackableResource)]
    module.serve = tf.function(serve)  # in Python, loaded.serve takes ragged columns as tf.RaggedTensors
    default = module.serve.get_concrete_function(signature)
    ragged = [name for name, s in signature.items() if isinstance(s, tf.RaggedTensorSpec)]
    if ragged:
        module.serve_flat = tf.function(lambda inputs: module.serve(_ragged_inputs(ragged, inputs)))
        default = module.serve_flat.get_concrete_function(serving_signature(spec))
    tf.saved_model.save(module, path, signatures={"serving_default": default})
    return path
