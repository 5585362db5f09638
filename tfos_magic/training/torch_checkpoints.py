"""A PyTorch job's checkpoints: the chief's `torch.save` of the model's and optimizer's
state, with the global step and the epoch, in the job's checkpoint dir.

DistributedDataParallel keeps every worker's replica identical, so the chief alone
saves, with no collective. A checkpoint is written to a temporary name and renamed into
place, so a crash mid-save leaves no file under a checkpoint's name; restores still
load each candidate whole, newest first, and skip one that does not load (a truncated
copy on a network mount) for the one before it, saying so. Loading never runs pickled
code (`weights_only=True`): tensors, numbers and plain containers only.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Callable

import torch

from ..errors import TfosError
from ..protocol.paths import CHECKPOINT_PREFIX, TORCH_MODEL_FILE, local_path

Notify = Callable[[str, int, int, str], None]  # path, step, epoch, reason
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)\.pt$")


def local_dir(directory: str) -> str:
    """The checkpoint dir as a filesystem path: PyTorch jobs checkpoint to a local path or
    a shared mount (NFS), which every executor and the kernel see under one path."""
    path = local_path(directory)
    if path is None:
        raise TfosError(f"The checkpoint dir {directory!r} is a URI; a %%torch_train job saves with torch.save to a "
                        "path: pass --checkpoint-dir on a mount that the kernel and every executor share (NFS), "
                        "or set TFOS_CHECKPOINT_ROOT to one.")
    return path


def checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of this job's checkpoints, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), os.path.join(directory, n)) for n in names if (m := _NAME.match(n))]
    return sorted(found)


def clear(directory: str) -> None:
    """--restart: remove the checkpoints and the saved model, leaving anything else alone."""
    for _, path in checkpoints(directory):
        os.remove(path)
    model = os.path.join(directory, TORCH_MODEL_FILE)
    if os.path.exists(model):
        os.remove(model)


def ensure_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".tfos-write-test"):
            pass
    except OSError as exc:
        raise TfosError(f"The checkpoint dir {directory!r} is not writable from the workers ({exc.strerror}). "
                        "Pass a --checkpoint-dir every executor can write to.") from None


def save_atomically(obj: Any, path: str) -> None:
    """`torch.save` to a temporary file beside `path`, then a rename: readers see the whole
    file or none."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tfos-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class TorchCheckpointer:
    """The state of `objects` (anything with state_dict/load_state_dict: the module, its
    optimizer, a scheduler) at a global step. `epoch` is the epochs finished, and
    `epoch_start` the step at which the current epoch began, so that a resume mid-epoch
    skips the rows that epoch already trained on."""

    def __init__(self, directory: str, is_chief: bool, notify: Notify | None = None, max_to_keep: int = 3,
                 failpoint: Any = None, **objects: Any) -> None:
        self.directory = local_dir(directory)
        self.is_chief = is_chief
        self.objects = objects
        self.max_to_keep = max_to_keep
        self._notify = notify
        self._failpoint = failpoint
        self.step = 0
        self.epoch = 0
        self.epoch_start = -1

    def restore(self) -> str | None:
        """Load the newest checkpoint that loads whole into the objects; its path, or None."""
        skipped: list[str] = []
        for step, path in reversed(checkpoints(self.directory)):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                meta = state["tfos"]
            except Exception as exc:  # noqa: BLE001 - truncated (EOFError, RuntimeError), or not ours
                skipped.append(f"{path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})")
                continue
            for name, obj in self.objects.items():
                if name not in state:
                    raise TfosError(f"The checkpoint {path} holds no {name!r}; it holds "
                                    f"{', '.join(k for k in state if k != 'tfos')}. Checkpoint the same objects "
                                    "as the run that wrote it, or pass --restart.")
                obj.load_state_dict(state[name])
            self.step, self.epoch, self.epoch_start = int(meta["step"]), int(meta["epoch"]), int(meta["epoch_start"])
            if skipped and self.is_chief:
                print(f"tfos: warning: checkpoint {skipped[0]} is incomplete or corrupt; resuming from {path}",
                      flush=True)
            return path
        if skipped and self.is_chief:
            print(f"tfos: warning: no usable checkpoint: {skipped[0]} is incomplete or corrupt and there is no "
                  "complete one before it; training starts from the beginning", flush=True)
        return None

    def save(self, step: int, epoch: int | None = None, reason: str = "schedule") -> str | None:
        """The chief writes the checkpoint of global step `step`; the others return None.
        `reason`: "schedule" (--checkpoint-every-steps), "epoch" or "stop"."""
        self.step = int(step)
        if epoch is not None:  # an epoch boundary: the next epoch begins at this step
            self.epoch, self.epoch_start = int(epoch), int(step)
        if self._failpoint is not None:
            self._failpoint.hit("checkpoint")
        if not self.is_chief:
            return None
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state["tfos"] = {"step": self.step, "epoch": self.epoch, "epoch_start": self.epoch_start}
        path = os.path.join(self.directory, f"{CHECKPOINT_PREFIX}-{self.step}.pt")
        save_atomically(state, path)
        for _, old in checkpoints(self.directory)[:-self.max_to_keep]:
            os.remove(old)
        if self._notify is not None:
            self._notify(path, self.step, self.epoch, reason)
        return path

    def close(self) -> None:
        pass
