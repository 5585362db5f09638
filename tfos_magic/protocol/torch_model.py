"""A PyTorch job's saved model, in any process: the chief's check, the kernel
(`Job.load_model`), a Spark task (`Job.predict`).

The file holds the module's `state_dict` and how to build the module again: the train
cell's `build_model()` (its first value is the module), or, for a `train(ctx)` cell, the
module's class, made with no arguments. The cell's definitions come from the job's
stored source (cell_definitions.py), so no pickled code is ever loaded
(`weights_only=True`), and the same file serves every process that has the cell.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

from ..errors import TfosError
from .cell_definitions import CellDefinitions

FORMAT = "tfos-torch-1"


class TorchModelNotLoadable(TfosError):
    """A saved PyTorch model that cannot be built again or take its saved weights."""


@contextlib.contextmanager
def triton_kept_out() -> Iterator[None]:
    """Building a module may build its optimizer too (build_model() returns both), and a
    torch optimizer's first use imports torch._dynamo, which imports Triton when it is
    installed. Triton's LLVM and TensorFlow's clash: in a process that loaded TensorFlow
    (a kernel that ran a TF job, a Spark worker that served a Keras model) that import is
    a segmentation fault. There Triton reads as not installed, which it cannot be used
    beside TensorFlow anyway; torch remembers the answer for the process's life."""
    if "tensorflow" not in sys.modules or "triton" in sys.modules:
        yield
        return
    sys.modules["triton"] = None  # type: ignore[assignment] - `import triton` raises ImportError
    try:
        yield
    finally:
        if sys.modules.get("triton", 0) is None:
            del sys.modules["triton"]


def module_of(built: Any) -> Any:
    """The module of what build_model() returns: (model, optimizer, loss_fn), or the model."""
    return built[0] if isinstance(built, (tuple, list)) else built


def describe(module: Any) -> dict[str, Any]:
    """How the module is built again, saved beside its weights."""
    cls = type(module)
    return {"class": f"{cls.__module__}.{cls.__qualname__}"}


def load(path: str, source: str | None, job: str, builder: str | None = None) -> Any:
    """The module saved at `path`, built from the cell `source` and given its saved weights,
    in eval mode, on the CPU."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TorchModelNotLoadable(f"No saved model at {path}.") from None
    except Exception as exc:  # noqa: BLE001 - truncated, or not a file of ours
        raise TorchModelNotLoadable(f"The model file {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise TorchModelNotLoadable(f"{path} is not a model file a %%torch_train job saved.")
    if not source:
        raise TorchModelNotLoadable(f"The model at {path} needs the job's train cell to be built again, and the job "
                                    "has none stored.")
    definitions = CellDefinitions(source, job)
    with definitions.installed(), triton_kept_out():
        module = _build(definitions, saved, path)
        try:
            module.load_state_dict(saved["state_dict"])
        except (RuntimeError, KeyError) as exc:
            raise TorchModelNotLoadable(
                f"The model saved at {path} does not fit the module the cell builds now: {str(exc).splitlines()[0]}. "
                "The cell changed since the job trained: run the job again, or build the module as it was.") from exc
    return module.eval()


def _build(definitions: CellDefinitions, saved: dict[str, Any], path: str) -> Any:
    names = definitions.module.__dict__
    skipped = f" (definitions of the cell that failed to run here: {'; '.join(definitions.skipped)})" \
        if definitions.skipped else ""
    if saved.get("builder") == "build_model":
        if not callable(names.get("build_model")):
            raise TorchModelNotLoadable(f"The model at {path} was built by build_model(), which the cell no longer "
                                        f"defines at its top level{skipped}.")
        return module_of(names["build_model"]())
    qualified = saved.get("class", "")
    name = qualified.rsplit(".", 1)[-1]
    cls = names.get(name)
    if cls is None:
        raise TorchModelNotLoadable(
            f"The model at {path} is a {qualified}, which the train cell does not define at its top level"
            f"{skipped}. Define the module's class at the top level of the %%torch_train cell.")
    try:
        return cls()
    except TypeError as exc:
        raise TorchModelNotLoadable(
            f"The model at {path} is a {name}, and {name}() failed ({exc}): train(ctx) returned it, so tfos builds "
            f"it again with no arguments. Give {name}.__init__ defaults for every argument, or use build_model(), "
            "which tfos calls to build the module again.") from exc


def predict_on_batch(module: Any, x: Any) -> Any:
    """The module's outputs for one batch of numpy inputs (a matrix, or a dict of arrays),
    as numpy, without gradients."""
    import torch

    inputs = {k: torch.from_numpy(v) for k, v in x.items()} if isinstance(x, dict) else torch.from_numpy(x)
    with torch.no_grad():
        out = module(inputs)
    return out.detach().cpu().numpy()
