"""The README's sample cells run as written, in order, in a real IPython shell with the
extension (on the tests' local[2] session and a store of their own)."""

import re
from pathlib import Path

import pytest
from conftest import run

README = Path(__file__).parents[1] / "README.md"


@pytest.mark.e2e
@pytest.mark.spark35
def test_the_readme_sample_cells_run_as_written(shell):
    cells = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(cells) >= 4, "the sample: load, ETL, train, read the result"
    for cell in cells[:4]:
        _, err = run(shell, cell)
        assert err is None, f"{cell}\n{err!r}"
    job = shell.user_ns["job"]
    assert job.state == "succeeded" and len(job.history) == 3, job.history
    assert shell.user_ns["scored"].columns[-1] == "prediction"


@pytest.mark.e2e
def test_the_readme_pytorch_cell_runs_as_written(shell):
    cells = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    torch_cell = next(c for c in cells if c.startswith("%%torch_train"))
    for cell in cells[:2] + [torch_cell]:
        _, err = run(shell, cell)
        assert err is None, f"{cell}\n{err!r}"
    import tfos_magic

    job = tfos_magic.get_job("ratings")
    assert job.state == "succeeded" and job.spec.options.framework == "torch", job.error
    assert len(job.history) == 3 and job.history[-1]["loss"] < job.history[0]["loss"], job.history
