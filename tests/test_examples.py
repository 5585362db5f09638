"""Every example notebook, run headless with `tfos run` on the `tfos` kernel, as CI and
users run them (quickstart.ipynb runs in test_cli.py, whose tests read the job it trains).
Each notebook asserts its own results (the factorization machine beats the global mean
on held-out ratings; predictions equal the loaded model's; the stopped job resumes from
its checkpoint), so a failing cell fails its test, with the cell and its error."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from test_cli import ROOT, outputs_text, tfos

pytestmark = pytest.mark.e2e
EXAMPLES = ROOT / "example-notebooks"


@pytest.fixture
def example_env(tmp_path, tfos_kernel) -> dict[str, str]:
    """A store of its own; the notebook's own Spark session (no TFOS_SPARK_MASTER): the
    parameter-server example makes a local one with the 3 slots its tasks need."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TFOS_HOME=str(tmp_path / "home"), PYTHONPATH=path)
    env.pop("TFOS_SPARK_MASTER", None)
    env.pop("MOVIELENS_DIR", None)  # the synthetic data, whatever this machine holds
    return env


def _run(name: str, env: dict[str, str], tmp_path: Path, *params: str) -> str:
    out = tmp_path / f"{name}.out.ipynb"
    args = [a for p in params for a in ("-p", p)]
    proc = tfos("run", str(EXAMPLES / f"{name}.ipynb"), *args, "-o", str(out), "--progress", "lines", env=env,
                timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return outputs_text(out)


def _rmse(text: str) -> tuple[float, float]:
    found = re.search(r"held-out RMSE: factorization machine ([\d.]+), global mean ([\d.]+)", text)
    assert found, text[-3000:]
    return float(found[1]), float(found[2])


def test_movielens_factorization_machine(example_env, tmp_path):
    text = _run("movielens_fm", example_env, tmp_path, "epochs=4")  # 6 by default; see its README for those
    fm, mean = _rmse(text)
    assert fm < 0.85 * mean, (fm, mean)
    assert "200 predictions match" in text, text[-3000:]


def test_movielens_on_a_parameter_server(example_env, tmp_path):
    fm, mean = _rmse(_run("parameter_server", example_env, tmp_path, "epochs=3"))
    assert fm < mean, (fm, mean)


def test_stop_then_resume(example_env, tmp_path):
    text = _run("resume", example_env, tmp_path)
    assert "stopped at step" in text and "succeeded resumed from step" in text, text[-3000:]


def test_movielens_in_pytorch(example_env, tmp_path):
    """The same factorization machine in PyTorch (%%torch_train): it beats the global mean
    on held-out ratings, and job.predict equals the module load_model() builds again."""
    text = _run("movielens_torch", example_env, tmp_path, "epochs=4")
    fm, mean = _rmse(text)
    assert fm < 0.85 * mean, (fm, mean)
    assert "200 predictions match (FactorizationMachine)" in text, text[-3000:]


def test_digits_from_png_files(example_env, tmp_path):
    """Real images (scikit-learn's digits) as PNG files read by Spark's binaryFile source;
    a CNN decodes the bytes in a layer and reaches 0.85 held-out accuracy through job.predict."""
    text = _run("digits_png", example_env, tmp_path, "epochs=8")  # 12 by default
    found = re.search(r"held-out accuracy: ([\d.]+) on (\d+) images", text)
    assert found and float(found[1]) >= 0.85 and int(found[2]) > 250, text[-3000:]
