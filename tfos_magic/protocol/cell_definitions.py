"""The train cell's classes and functions, outside the TF process that trained with them.

A saved Keras model names each custom layer, subclassed model, loss and metric by its
module and name. The TF process runs the cell as the module `__tfos_train__`, so a model
file can only be loaded where that module exists with the same definitions: in the
kernel (`Job.load_model`, `Job.export`), in a Spark task (`Job.predict`), and in the
chief's own check that the file it saved loads. Each builds the module again from the
job's stored cell source.

Only definitions run: imports, functions, classes and assignments at the top level, each
on its own (one that fails, say a read of a file only the workers have, is skipped and
remembered). Calls standing alone, loops and `with` blocks are left out, so nothing
trains or starts; and the module is private, so the user's namespace does not change.
"""

from __future__ import annotations

import ast
import contextlib
import linecache
import sys
import types
from typing import Any, Iterator

from .cells import cell_filename, parse

MODULE = "__tfos_train__"  # the name the TF process runs the cell under (training/child.py)

_DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                ast.Assign, ast.AnnAssign, ast.AugAssign)


def _defines_only(node: ast.stmt) -> bool:
    """A definition, or an `if`/`try` made of definitions only (a guarded import)."""
    if isinstance(node, _DEFINITIONS):
        return True
    if isinstance(node, (ast.If, ast.Try)):
        bodies = [node.body, node.orelse] + ([node.finalbody] + [h.body for h in node.handlers]
                                             if isinstance(node, ast.Try) else [])
        return all(_defines_only(n) or isinstance(n, ast.Pass) for body in bodies for n in body)
    return False


class CellDefinitions:
    """The module `__tfos_train__` built from a cell's definitions, and what failed to run."""

    def __init__(self, source: str, job: str) -> None:
        filename = cell_filename(job)
        tree = parse(source, job)
        text = "\n" + source  # as cells.parse numbers it: the magic line is line 1
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        self.module = types.ModuleType(MODULE)
        self.module.__file__ = filename
        self.skipped: list[str] = []  # "line N: error" of definitions that raised
        for node in tree.body:
            if not _defines_only(node):
                continue
            code = compile(ast.Module(body=[node], type_ignores=[]), filename, "exec")
            try:
                exec(code, self.module.__dict__)
            except Exception as exc:  # noqa: BLE001 - a skipped definition is named if the load fails
                self.skipped.append(f"line {node.lineno}: {type(exc).__name__}: {exc}")

    def custom_objects(self) -> dict[str, Any]:
        """The cell's own classes and functions by name, for Keras' deserialization (an
        HDF5 file names custom objects without their module)."""
        return {name: value for name, value in vars(self.module).items()
                if callable(value) and getattr(value, "__module__", None) == MODULE}

    @contextlib.contextmanager
    def installed(self) -> Iterator["CellDefinitions"]:
        """`__tfos_train__` importable while a model loads, then as it was before: another
        job's cell may define the same names differently."""
        before = sys.modules.get(MODULE)
        sys.modules[MODULE] = self.module
        try:
            yield self
        finally:
            if before is None:
                sys.modules.pop(MODULE, None)
            else:
                sys.modules[MODULE] = before
