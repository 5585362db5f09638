"""`-p KEY=VALUE`: the notebook parameters of `tfos run`, and the same names for the stored
ETL cell of `tfos submit` (a notebook's parameters are what its ETL cell reads)."""

from __future__ import annotations

import argparse
import ast
import keyword
from typing import Any

from ..errors import TfosError


def add_parameter_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("-p", "--parameter", dest="parameters", action="append", default=[], metavar="KEY=VALUE",
                        help=help + " (a Python literal, else a string); repeat for more")


def parse_parameters(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs: each value a Python literal when it parses as one (`3`, `0.1`,
    `True`, `[1, 2]`, `'text'`), else the text itself (`-p name=ratings`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier() or keyword.iskeyword(key):
            raise TfosError(f"-p {pair!r}: a parameter is KEY=VALUE with KEY a Python name that is not a keyword, "
                            "e.g. -p epochs=3.")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            out[key] = raw
    return out
