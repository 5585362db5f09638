"""The PyTorch runner's parts without Spark: batches cut from the feed's chunks, the
zero batch, checkpoints that are complete or skipped, and the saved model's file."""

import os
import re

import numpy as np
import pytest
import torch

from tfos_magic.errors import TfosError
from tfos_magic.protocol.feed_spec import ColumnSpec, FeedSpec
from tfos_magic.protocol.torch_model import FORMAT, TorchModelNotLoadable, load, triton_kept_out
from tfos_magic.training.torch_checkpoints import TorchCheckpointer, local_dir
from tfos_magic.training.arrow_feed import rebatch
from tfos_magic.training.torch_feed import as_tensors, zero_batch


def _chunks(sizes):
    at = 0
    for n in sizes:
        yield ({"u": np.arange(at, at + n, dtype=np.int64)}, np.arange(at, at + n, dtype=np.float32))
        at += n


def test_rebatch_cuts_exact_batches_across_chunks_and_shares_memory():
    batches = list(rebatch(_chunks([5, 3, 10, 1]), 4))
    assert [len(b[1]) for b in batches] == [4, 4, 4, 4, 3]
    assert np.concatenate([b[1] for b in batches]).tolist() == list(range(19))
    chunk = next(_chunks([8]))
    first = next(rebatch(iter([chunk]), 4))
    tensors = as_tensors(first)
    tensors[1][0] = 99.0  # a view of the chunk: no copy on the way
    assert chunk[1][0] == 99.0 and tensors[0]["u"].dtype == torch.int64


def test_zero_batch_has_the_feed_shapes():
    spec = FeedSpec([ColumnSpec("v", "float32", True), ColumnSpec("u", "int64")], ColumnSpec("y", "float32"),
                    "dict", array_lengths={"v": 4})
    x, y = zero_batch(spec)
    assert x["v"].shape == (1, 4) and x["u"].dtype == torch.int64 and y.shape == (1,)
    matrix = FeedSpec([ColumnSpec("a", "float32"), ColumnSpec("v", "float32", True)], ColumnSpec("y", "float32"),
                      "matrix", array_lengths={"v": 3})
    assert zero_batch(matrix)[0].shape == (1, 4)


def test_checkpoints_restore_the_newest_complete_one(tmp_path, capsys):
    model = torch.nn.Linear(2, 1)
    with triton_kept_out():  # this process may have loaded TensorFlow (the feed's tests)
        optimizer = torch.optim.Adam(model.parameters())
    saved = []
    ckpt = TorchCheckpointer(str(tmp_path), True, notify=lambda *a: saved.append(a), max_to_keep=2,
                             model=model, optimizer=optimizer)
    ckpt.save(10)
    ckpt.save(20, epoch=1, reason="epoch")
    ckpt.save(25)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-20.pt", "ckpt-25.pt"]  # two kept
    assert [s[1:] for s in saved] == [(10, 0, "schedule"), (20, 1, "epoch"), (25, 1, "schedule")]
    (tmp_path / "ckpt-25.pt").write_bytes((tmp_path / "ckpt-25.pt").read_bytes()[:100])  # truncated
    again = TorchCheckpointer(str(tmp_path), True, model=torch.nn.Linear(2, 1), optimizer=optimizer)
    assert again.restore().endswith("ckpt-20.pt")
    assert (again.step, again.epoch, again.epoch_start) == (20, 1, 20)
    assert re.search(r"ckpt-25\.pt \(.+\) is incomplete or corrupt; resuming from .*ckpt-20\.pt$",
                     capsys.readouterr().out.strip())
    worker = TorchCheckpointer(str(tmp_path), False, model=model)
    assert worker.save(30) is None and not (tmp_path / "ckpt-30.pt").exists()  # the chief alone writes


def test_a_uri_checkpoint_dir_is_refused_naming_a_mount():
    with pytest.raises(TfosError, match="shared|mount"):
        local_dir("hdfs://namenode/ckpt")


CELL = """
import torch

class Net(torch.nn.Module):
    def __init__(self, hidden={hidden}):
        super().__init__()
        self.layer = torch.nn.Linear(3, hidden)

    def forward(self, x):
        return self.layer(x).sum(-1)

def build_model():
    model = Net()
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss()
"""


def test_the_saved_model_is_built_from_the_cell_and_refused_when_it_changed(tmp_path):
    net = torch.nn.Linear(3, 4)
    path = str(tmp_path / "model.pt")
    torch.save({"format": FORMAT, "builder": "build_model", "class": "__tfos_train__.Net",
                "state_dict": {f"layer.{k}": v for k, v in net.state_dict().items()}}, path)
    model = load(path, CELL.format(hidden=4), "j")
    x = torch.rand(5, 3)
    assert torch.allclose(model(x), net(x).sum(-1)) and not model.training
    with pytest.raises(TorchModelNotLoadable, match="does not fit the module the cell builds now"):
        load(path, CELL.format(hidden=5), "j")
    (tmp_path / "other.pt").write_bytes(b"not a model")
    with pytest.raises(TorchModelNotLoadable, match="cannot be read"):
        load(str(tmp_path / "other.pt"), CELL.format(hidden=4), "j")


@pytest.mark.e2e  # it imports TensorFlow, which the fast tier keeps out of the processes it starts
def test_a_torch_optimizer_is_built_beside_tensorflow(tmp_path):
    """Building a saved module, optimizer and all, in a process that loaded TensorFlow
    first (importing Triton there is a segmentation fault)."""
    import subprocess
    import sys

    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT, "builder": "build_model", "class": "__tfos_train__.Net",
                "state_dict": {f"layer.{k}": v for k, v in torch.nn.Linear(3, 4).state_dict().items()}}, str(path))
    code = ("import tensorflow\nfrom tfos_magic.protocol.torch_model import load\n"
            f"print(type(load({str(path)!r}, {CELL.format(hidden=4)!r}, 'j')).__name__)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}  # TensorFlow importable
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("Net"), (done.returncode, done.stderr[-2000:])


def test_the_runner_trains_one_rank_without_spark():
    """torch_gpu_check (the GPU check for a machine without Spark) on this machine's CPU:
    the runner's process group, loop, checkpoints and saved module as child.py drives them."""
    from tfos_magic.training.torch_gpu_check import run

    found = run(rows=8000, epochs=2)
    assert found["ok"] and found["backend"] == "gloo" and found["device"] == "cpu", found
    assert found["checkpoints"] == [32, 50, 64], found  # 8,000 rows in 256s: each epoch's end, and step 50
