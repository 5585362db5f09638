"""Which Keras a model, a callback or a saved file belongs to (protocol/keras_kinds.py):
pure logic on class modules and archive metadata, no Keras imported."""

import json
import zipfile

from tfos_magic.protocol.keras_kinds import KERAS3, LEGACY, kind_of, saved_kind


def _class(module: str, base: type = object) -> type:
    return type("Model", (base,), {"__module__": module})


def test_a_class_counts_by_its_own_module_or_its_keras_base():
    keras3 = _class("keras.src.models.sequential")
    legacy = _class("tf_keras.src.engine.sequential")
    assert kind_of(keras3()) == KERAS3 and kind_of(legacy()) == LEGACY
    # A subclass defined in a cell (module __tfos_train__) counts by its Keras base.
    assert kind_of(_class("__tfos_train__", keras3)()) == KERAS3
    assert kind_of(_class("__tfos_train__", legacy)()) == LEGACY
    assert kind_of(object()) is None and kind_of(_class("keras_something.models")()) is None


def _archive(path, metadata):
    with zipfile.ZipFile(path, "w") as z:
        if metadata is not None:
            z.writestr("metadata.json", json.dumps(metadata))
        z.writestr("config.json", "{}")
    return str(path)


def test_a_saved_file_names_its_keras(tmp_path):
    assert saved_kind(_archive(tmp_path / "a.keras", {"keras_version": "3.15.1"})) == KERAS3
    assert saved_kind(_archive(tmp_path / "b.keras", {"keras_version": "2.21.0"})) == LEGACY
    assert saved_kind(_archive(tmp_path / "c.keras", None)) == LEGACY  # no metadata: as tfos always wrote them
    (tmp_path / "d.keras").write_bytes(b"not a zip")
    assert saved_kind(str(tmp_path / "d.keras")) == LEGACY
    assert saved_kind(str(tmp_path / "model.h5")) == LEGACY and saved_kind(str(tmp_path / "missing.keras")) == LEGACY
