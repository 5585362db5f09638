"""Which Keras a model, a callback or a saved file belongs to: Keras 3 (`import keras`) or
legacy Keras 2 (`tf.keras` under TF_USE_LEGACY_KERAS=1, `import tf_keras`).

Both live in every process tfos starts: the workers train a legacy model with `fit` and a
Keras 3 model with a step loop of their own (training/keras3_loop.py), and the kernel
loads each file with the Keras that wrote it. The answers come from a class's module and
a file's own metadata, so asking imports neither Keras.
"""

from __future__ import annotations

import json
import zipfile
from typing import Any, Callable

KERAS3 = "keras"
LEGACY = "tf_keras"
ACCEPTED = ("a Keras 3 model (`import keras`: keras.Sequential, keras.Model, the functional API, a subclass) "
            "on the TensorFlow backend, or a legacy tf.keras model (`tf.keras` or `import tf_keras as keras`)")


def kind_of(obj: Any) -> str | None:
    """KERAS3 or LEGACY for an instance of either Keras' classes (a subclass defined in a
    cell counts by its Keras base), else None."""
    for cls in type(obj).__mro__:
        root = (cls.__module__ or "").split(".")[0]
        if root == LEGACY:
            return LEGACY
        if root == KERAS3 and cls.__module__.startswith("keras.src"):
            return KERAS3
    return None


def describe(obj: Any) -> str:
    """`module.Class` of `obj`, with the Keras it comes from and that Keras' version."""
    cls = type(obj)
    kind = kind_of(obj)
    version = ""
    if kind is not None:
        import importlib

        version = f" (Keras {getattr(importlib.import_module(kind), '__version__', '?')})"
    return f"{cls.__module__}.{cls.__qualname__}{version}"


def saved_kind(path: str, open_file: Callable[[str, str], Any] = open) -> str:
    """The Keras that wrote the model file at `path`, read with `open_file` (e.g.
    tf.io.gfile.GFile for a remote path): a `.keras` archive names its Keras version in
    metadata.json; HDF5 files and anything unreadable are legacy, the only Keras that
    writes them in tfos."""
    if not path.endswith(".keras"):
        return LEGACY
    try:
        with open_file(path, "rb") as handle, zipfile.ZipFile(handle) as archive:
            version = json.loads(archive.read("metadata.json")).get("keras_version", "")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return LEGACY
    return KERAS3 if str(version).split(".")[0] not in ("", "2") else LEGACY
