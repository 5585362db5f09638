"""The PyTorch runner on one machine without Spark: its GPU path where there is a GPU.

    python -m tfos_magic.training.torch_gpu_check [--rows N] [--epochs E]

Needs PyTorch and pyarrow (and nvidia-ml-py for the GPU's samples), neither Spark nor
TensorFlow: a machine with a GPU but no cluster can check what a %%torch_train worker
does on it. One rank runs the real runner (torch_runner.TorchDDP) as child.py drives it,
on rows streamed as Arrow IPC: the device a task gets (`device_for_task`, the one GPU
Spark's CUDA_VISIBLE_DEVICES leaves visible), its process group (NCCL on a GPU, Gloo on
the CPU), the build_model() loop with DDP, the feed's batches moved to the device, a
checkpoint, the saved module built again from the cell and checked against the trained
one, and the GPU sampler's NVML readings while it trains. Prints one JSON object and
exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from ..protocol.feed_spec import ColumnSpec, FeedSpec
from ..protocol.options import TrainOptions
from ..protocol.plan import TaskConfig, TaskPlan
from ..protocol.torch_model import triton_kept_out

CELL = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))

    def forward(self, x):
        return self.body(x).squeeze(-1)

def build_model():
    torch.manual_seed(0)
    model = Net()
    return model, torch.optim.Adam(model.parameters(), lr=0.01), torch.nn.MSELoss()
"""


class Recorder:
    """The channel's client as a list: what the notebook would receive."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def send(self, event: dict[str, Any]) -> bool:
        self.events.append(event)
        return True


def stream(rows: int) -> io.BytesIO:
    """A worker's Arrow IPC stream: 4 float features and a label y = 2*x0 - 3*x1 + x2 - x3."""
    rng = np.random.default_rng(0)
    x = rng.random((rows, 4), dtype=np.float32)
    y = (2 * x[:, 0] - 3 * x[:, 1] + x[:, 2] - x[:, 3]).astype(np.float32)
    table = pa.table({**{f"x{i}": x[:, i] for i in range(4)}, "y": y})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=10_000):
            writer.write_batch(batch)
    sink.seek(0)
    return sink


def run(rows: int = 20_000, epochs: int = 3) -> dict[str, Any]:
    """Train one rank as a Spark task's process would; what it saw."""
    import torch

    from .arrow_feed import ArrowFeed
    from .gpu_sampler import GpuSampler, default_source
    from .torch_runner import TorchDDP

    work = tempfile.mkdtemp(prefix="tfos-torch-check-")
    spec = FeedSpec([ColumnSpec(f"x{i}", "float32") for i in range(4)], ColumnSpec("y", "float32"), "matrix")
    options = TrainOptions(framework="torch", epochs=epochs, batch_size=256, checkpoint_every_steps=50, shuffle=0)
    plan = TaskPlan(job="torch-check", run=1, channel_address="", host="127.0.0.1", train_source=CELL, feed=spec,
                    options=options, checkpoint_dir=f"{work}/checkpoints")
    config = TaskConfig(plan, "worker", 0, 1, "127.0.0.1", work)
    channel = Recorder()
    runner = TorchDDP()
    connection = runner.connect(config, channel)
    feed = ArrowFeed(stream(rows), spec, work, memory_cache_bytes=512 << 20)
    ctx = runner.context(connection, job=plan.job, feed=feed, worker_index=0, num_workers=1,
                         checkpoint_dir=plan.checkpoint_dir, options=options, channel=channel)
    samples: list[dict[str, Any]] = []
    sampler = GpuSampler(samples.append, default_source()).start()
    namespace: dict[str, Any] = {"__name__": "__tfos_train__"}
    exec(compile(CELL, "<check cell>", "exec"), namespace)
    started = time.monotonic()
    try:  # (Triton kept out: a test's process may have loaded TensorFlow, which a training process never has)
        with triton_kept_out():
            runner.prepare_checkpoints(ctx.checkpoint_dir, restart=True)
            model = runner.train(namespace, ctx, restart=True)
            seconds = time.monotonic() - started
            runner.save(model, ctx, CELL)
    finally:
        sampler.close()
    history = [e["metrics"] for e in channel.events if e["kind"] == "epoch"]
    found = {
        "device": str(ctx.device), "backend": connection.backend,
        "cuda_visible_devices": __import__("os").environ.get("CUDA_VISIBLE_DEVICES"),
        "parameters_on": str(next(model.parameters()).device), "epochs": len(history),
        "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"], "seconds": round(seconds, 2),
        "rows_per_s": history[-1]["rows_per_s"],
        "checkpoints": [e["step"] for e in channel.events if e["kind"] == "checkpoint"],
        "model_saved": any(e["kind"] == "model" for e in channel.events),
        "gpu_samples": len([s for s in samples if s.get("devices")]),
        "gpu_peak_util": max((d.get("utilization") or 0 for s in samples for d in s.get("devices", [])), default=None),
        "frameworks": [m for m in ("tensorflow", "torch") if m in sys.modules],
    }
    # (`frameworks` is this process's: the command loads no TensorFlow, a test's process may have.)
    found["ok"] = bool(found["epochs"] == epochs and found["loss_last"] < 0.2 * found["loss_first"]
                       and found["model_saved"] and found["parameters_on"].split(":")[0] == ctx.device.type
                       and (ctx.device.type != "cuda" or (found["backend"] == "nccl" and found["gpu_samples"] > 0)))
    torch.distributed.destroy_process_group()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    found = run(args.rows, args.epochs)
    found["ok"] = found["ok"] and "tensorflow" not in found["frameworks"]
    print(json.dumps(found), flush=True)
    return 0 if found["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
