"""Checks on the train cell's source, done in the driver before anything starts."""

import pytest

from tfos_magic.errors import TfosError
from tfos_magic.protocol.cells import check_train_source, run_cell


def test_entry_points():
    assert check_train_source("def build_model():\n    pass\n", "j") == "build_model"
    assert check_train_source("import x\n\ndef train(ctx):\n    pass\n", "j") == "train"


def test_neither_entry_point_names_both():
    with pytest.raises(TfosError, match=r"neither build_model\(\) nor train\(ctx\)"):
        check_train_source("import tensorflow as tf\nx = 1\n", "j")


def test_syntax_error_reports_the_cell_line():
    src = "import tensorflow as tf\n\ndef build_model(:\n    pass\n"
    with pytest.raises(TfosError, match=r"line 4") as err:
        check_train_source(src, "j")
    assert "def build_model(:" in str(err.value)


def test_run_cell_returns_last_expression_and_keeps_line_numbers():
    ns = {}
    assert run_cell("a = 2\na * 21", "j", ns, kind="spark_etl") == 42
    with pytest.raises(ZeroDivisionError) as err:
        run_cell("x = 1\ny = x / 0\n", "j", {}, kind="spark_etl")
    frames = [f for f in err.traceback if "%%spark_etl j" in str(f.path)]
    assert frames and frames[-1].lineno + 1 == 3  # pytest counts from 0; the %% line is line 1
