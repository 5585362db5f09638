"""PyTorch's runner: DistributedDataParallel over the job's Spark barrier tasks.

The Spark tasks agree the workers' addresses (task/feeder.py); rank 0's address is the
rendezvous, and its process listens on the port its task reserved: a socket bound with
SO_REUSEPORT beside the task's reservation, handed to torch's TCPStore
(`master_listen_fd`), so no other process can take the port meanwhile. Gloo on CPUs,
NCCL on GPUs, on the device Spark assigned (CUDA_VISIBLE_DEVICES).

A build_model() cell returns (module, optimizer, loss_fn) and this loop trains it.
Partitions differ in size, and DDP all-reduces gradients at every backward, so every
worker must take every step: each step begins with one small all-reduce of "has a
batch", and the epoch ends when no worker has one; a worker whose rows ran out
meanwhile steps on a batch of zeros with a zero loss, adding nothing to the gradients
(as TF's end-of-data handling does). The step count is then the same on every worker,
so checkpoints, the agreed stop and a resume mid-epoch fall on exact global steps.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from ..errors import TfosError
from ..protocol.model_file import ModelNotLoadable
from ..protocol.paths import TORCH_MODEL_FILE, local_path
from ..protocol.plan import TaskConfig
from ..protocol import torch_model
from . import torch_checkpoints
from ..protocol.arrays import map_arrays, rows_of
from .job_context import IntervalMean, Throttle, check_finite
from .peers import me
from .torch_context import TorchContext
from .torch_feed import as_tensors, zero_batch

SAMPLE_ROWS = 16
TOLERANCE = 1e-4
SIOCGIFADDR = 0x8915


@dataclass
class Connection:
    """This process's place in the process group."""

    device: torch.device
    backend: str
    listener: socket.socket | None = None  # rank 0's rendezvous socket, open for the process's life
    store: Any = None


def device_for_task() -> torch.device:
    """The GPU Spark gave this task (the only one visible), else one by local rank when the
    task sees several, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % count if count > 1 else 0)


def interface_of(address: str) -> str | None:
    """The network interface that holds the IPv4 `address`: Gloo connects its peers over one
    interface, and would otherwise pick the one the host's name resolves to (127.0.1.1 on
    Debian, unreachable from other hosts)."""
    try:
        ip = socket.gethostbyname(address)
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == ip:
                return name
    return None


def _listener(host: str, port: int) -> socket.socket:
    """Rank 0's rendezvous socket, bound beside its task's reservation (ReservedPort)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((host, port))
    listener.listen(128)
    return listener


def _check_built(built: Any) -> tuple[Any, Any, Callable[..., Any]]:
    shape = "build_model() must return (model, optimizer, loss_fn): a torch.nn.Module, a torch.optim optimizer " \
            "over its parameters, and a loss function such as torch.nn.MSELoss()"
    if not isinstance(built, (tuple, list)) or len(built) != 3:
        raise TfosError(f"{shape}; it returned {type(built).__name__}.")
    model, optimizer, loss_fn = built
    if not isinstance(model, torch.nn.Module):
        raise TfosError(f"{shape}; its first value is a {type(model).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TfosError(f"{shape}; its second value is a {type(optimizer).__name__}.")
    if not callable(loss_fn):
        raise TfosError(f"{shape}; its third value, a {type(loss_fn).__name__}, is not callable.")
    if not any(p.requires_grad for p in model.parameters()):
        raise TfosError("The model has no trainable parameters, so training would change nothing. Check that "
                        "build_model() returns the module it built, with layers that have weights.")
    return model, optimizer, loss_fn


def _to(batch: Any, device: torch.device) -> Any:
    """A batch on `device`; (x, y) as a tuple (the DataLoader hands a list)."""
    return map_arrays(batch, lambda t: t.to(device, non_blocking=True))


class TorchDDP:
    """The runner (runners.py) of a %%torch_train job."""

    def join(self, config: TaskConfig, channel: Any, cleanup: list[Any]) -> bool:
        return False

    def check_checkpoint_dir(self, directory: str, marker: str | None, who: str) -> None:
        torch_checkpoints.local_dir(directory)  # a URI is refused here; a local marker was seen by the task

    def connect(self, config: TaskConfig, channel: Any) -> Connection:
        opts = config.plan.options
        device = device_for_task()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Collectives wait for slow peers up to the stall timeout; a dead peer's closed
        # connection fails them at once, and the notebook halts the attempt.
        timeout = datetime.timedelta(seconds=max(opts.start_timeout, opts.stall_timeout))
        world, rank = config.num_workers, config.index
        connection = Connection(device, backend)
        if world == 1:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
            return connection
        interface = interface_of(config.bind_host)
        if interface:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
        master, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        start = datetime.timedelta(seconds=opts.start_timeout)
        try:
            if rank == 0:
                connection.listener = _listener(master, port)
                connection.store = dist.TCPStore(master, port, world, True, timeout=start, wait_for_workers=False,
                                                 master_listen_fd=connection.listener.fileno(), use_libuv=False)
            else:
                connection.store = dist.TCPStore(master, port, world, False, timeout=start)
            dist.init_process_group(backend, store=connection.store, rank=rank, world_size=world, timeout=timeout)
        except (RuntimeError, OSError) as exc:  # DistStoreError, DistNetworkError are RuntimeErrors
            raise TfosError(f"{me(config)} could not join the other {world - 1} worker(s) at {master}:{port} within "
                            f"{opts.start_timeout:.0f} s (--start-timeout): {str(exc).splitlines()[0]}") from None
        return connection

    def context(self, connection: Any, **common: Any) -> TorchContext:
        return TorchContext(connection=connection, **common)

    def prepare_checkpoints(self, directory: str, restart: bool) -> None:
        path = torch_checkpoints.local_dir(directory)
        torch_checkpoints.ensure_writable(path)
        if restart:
            torch_checkpoints.clear(path)

    def train(self, namespace: dict[str, Any], ctx: TorchContext, restart: bool) -> Any:
        if "build_model" in namespace:
            self.builder = "build_model"
            return fit(namespace["build_model"], ctx, restart)
        self.builder = "class"
        model = namespace["train"](ctx)
        ctx.feed.drain()
        return model

    def save(self, model: Any, ctx: TorchContext, source: str) -> None:
        module = getattr(model, "module", model)  # a DDP wrapper's module
        if not isinstance(module, torch.nn.Module):
            return  # train(ctx) returned something else: nothing to save
        ctx.failpoint.hit("final_save")
        if not ctx.is_chief:
            return
        path = ctx.checkpoint_path(TORCH_MODEL_FILE)
        saved = {"format": torch_model.FORMAT, "builder": self.builder, **torch_model.describe(module),
                 "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}
        torch_checkpoints.save_atomically(saved, local_path(path) or path)
        outputs = check_loads(module, path, ctx.feed.sample(SAMPLE_ROWS), source, ctx.job, ctx.device)
        ctx.send("model", path=path, outputs=outputs)


def check_loads(module: Any, path: str, rows: Any, source: str, job: str, device: torch.device) -> int | None:
    """Build the saved model as the kernel will and compare it with the trained one on a few
    of this worker's rows: a model that cannot be used fails its job now. Returns the
    values per row, for Job.predict."""
    loaded = torch_model.load(path, source, job)
    if rows is None:
        return None
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            want = module(_to(as_tensors(rows), device)).detach().cpu().numpy().astype(np.float64)
    finally:
        module.train(was_training)
    got = np.asarray(torch_model.predict_on_batch(loaded, rows), dtype=np.float64)
    if got.shape != want.shape or float(np.max(np.abs(got - want) / (1.0 + np.abs(want)), initial=0.0)) > TOLERANCE:
        raise ModelNotLoadable(
            f"The model saved at {path} loads, but predicts differently from the trained model: the module the "
            "cell builds again is not the one that trained (its outputs have shape "
            f"{got.shape} where the trained module's have {want.shape}). Build the module the same way every time, "
            "with its parameters registered (nn.Parameter, submodules as attributes).")
    return int(want.reshape(len(want), -1).shape[1])


def agree_any(flag: bool, device: torch.device) -> bool:
    """Whether any worker's flag is set: one all-reduce of a single number."""
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def job_mean(total: float, count: float, device: torch.device) -> float | None:
    """sum(total) / sum(count) over the workers."""
    value = torch.tensor([total, count], dtype=torch.float64, device=device)
    dist.all_reduce(value)
    return float(value[0] / value[1]) if value[1] > 0 else None


def evaluate(module: Any, loader: Any, loss_fn: Callable[..., Any], ctx: TorchContext) -> float | None:
    """The loss over every worker's validation rows, each batch weighed by its rows. The
    module itself runs, not its DDP wrapper: no collective until the sum."""
    total, rows = 0.0, 0
    module.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                ctx.failpoint.hit("validation")
                x, y = _to(batch, ctx.device)
                n = rows_of(batch)
                total += float(loss_fn(module(x), y)) * n
                rows += n
    finally:
        module.train()
    return job_mean(total, rows, ctx.device)


def fit(build_model: Callable[[], Any], ctx: TorchContext, restart: bool) -> Any:
    """Train build_model()'s (module, optimizer, loss_fn) for --epochs; returns the module."""
    if ctx.feed.spec.label is None:
        raise TfosError("build_model() needs a label: pass --label COL (or write train(ctx) for a loop of your own).")
    model, optimizer, loss_fn = _check_built(ctx.build(build_model))
    model.to(ctx.device)
    ckpt = ctx.checkpoint(model=model, optimizer=optimizer)
    restored = None if restart else ckpt.restore()
    ddp = ctx.wrap(model)
    step, initial_epoch = ckpt.step, ckpt.epoch
    done_in_epoch = step - ckpt.epoch_start if restored and 0 <= ckpt.epoch_start <= step else 0
    if done_in_epoch:
        ctx.feed.skip_next_pass(done_in_epoch * ctx.batch_size)  # go on where the epoch was
    ctx.send("training", initial_step=step, initial_epoch=initial_epoch, restored_from=restored,
             skipped_steps=done_in_epoch)
    zeros = _to(zero_batch(ctx.feed.spec), ctx.device)
    every = ctx.options.checkpoint_every_steps
    throttle = Throttle(1.0)
    val = ctx.validation_dataloader()
    for epoch in range(initial_epoch, ctx.epochs):
        if not (epoch == initial_epoch and done_in_epoch):
            ckpt.epoch_start = step
        ctx.feed.epoch = epoch  # which shuffled order this pass takes
        rows0, t0 = ctx.feed.rows_delivered, time.monotonic()
        epoch_loss, interval = [0.0, 0], IntervalMean()
        batches = iter(ctx.dataloader())
        ddp.train()
        while True:
            batch = next(batches, None)
            if not agree_any(batch is not None, ctx.device):
                break
            optimizer.zero_grad(set_to_none=True)
            if batch is not None:
                x, y = _to(batch, ctx.device)
                loss = loss_fn(ddp(x), y)
                loss.backward()
                value = float(loss.detach())
                epoch_loss[0] += value
                epoch_loss[1] += 1
                interval.add(value)
            else:  # this worker's rows ran out: a step that adds nothing, so its peers' all-reduce pairs up
                ddp(zeros[0])
                sum((p * 0.0).sum() for p in ddp.parameters() if p.requires_grad).backward()
            optimizer.step()
            step += 1
            if epoch == 0:
                ctx.failpoint.hit("streaming")
            if ctx.should_stop(step):
                ctx.stop_here(ckpt, step)
            if every and step % every == 0:
                ckpt.save(step)
            if throttle() and interval.steps:
                mean = interval.take()
                check_finite(mean, step, ctx.worker_index, ctx.checkpoint_dir)
                rate = (ctx.feed.rows_delivered - rows0) / max(time.monotonic() - t0, 1e-9)
                ctx.report(step=step, loss=mean, rows_per_s=rate)
        tail = interval.take()  # the epoch's last steps, as its last point of the curve
        if tail is not None:
            ctx.report(step=step, loss=tail)
        metrics: dict[str, Any] = {"loss": job_mean(epoch_loss[0], epoch_loss[1], ctx.device)}
        check_finite(metrics["loss"], step, ctx.worker_index, ctx.checkpoint_dir)
        metrics["rows_per_s"] = (ctx.feed.rows_delivered - rows0) / max(time.monotonic() - t0, 1e-9)
        if val is not None:
            metrics["val_loss"] = evaluate(model, val, loss_fn, ctx)
        if metrics["loss"] is None:  # every row was trained on before a restart
            del metrics["loss"]
        ctx.report(step=step, epoch=epoch + 1, **metrics)
        ckpt.save(step, epoch=epoch + 1, reason="epoch")
    ctx.feed.drain()  # e.g. already trained to --epochs: let the Spark task finish its partition
    return model



