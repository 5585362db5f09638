"""The static summary a finished job leaves in the notebook: PNG, HTML and plain text.

It replaces the live widget in the same output (one display_id), so a saved notebook
reads without a kernel: in JupyterLab after a reload, in nbconvert's HTML and on
GitHub. The loss curve is drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from ..job.job import tensorboard_line
from .model import DashboardModel


def loss_png(model: DashboardModel, width: float = 7.0, height: float = 2.6) -> bytes | None:
    """The loss curves as a PNG, or None before the first point."""
    series = model.snapshot()
    if not series:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        if name == "val_loss":
            ax.plot(xs, ys, "o-", color="#d62728", lw=2, ms=4, label="val_loss")
        else:
            ax.plot(xs, ys, lw=1.2, label=name)
    if model.epoch_loss.x:  # each epoch's mean training loss, at the epoch's last step
        xs, ys = model.epoch_loss.decimated()
        ax.plot(xs, ys, "s", color="#333333", ms=4, label="epoch loss")
        series = {**series, "epoch loss": (xs, ys)}
    if all(y > 0 for _, ys in series.values() for y in ys):
        ax.set_yscale("log")  # losses span decades
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def headline(model: DashboardModel) -> str:
    return f"tfos job {model.job!r} {model.state} in {model.elapsed():.1f}s: {model.epoch} epoch(s)"


def notes(model: DashboardModel) -> list[str]:
    """What the user should know beyond the numbers: a resume, nothing left to do."""
    out = [model.stopped_early] if model.stopped_early else []
    if model.restored_from:
        out.append(f"resumed from step {model.initial_step} (epoch {model.initial_epoch}): {model.restored_from}")
        if model.initial_epoch >= model.epochs:
            out.append(f"--epochs {model.epochs} already reached, nothing left to train; raise --epochs to train "
                       "further, or pass --restart to start over")
    return out


def facts(model: DashboardModel) -> list[tuple[str, str]]:
    """The summary's rows, as (label, text)."""
    startup = (model.first_step_at - model.started) if model.first_step_at else None
    training = (model.elapsed() - startup) if startup is not None else None
    rows = [("note", n) for n in notes(model)]
    first = model.epoch_loss.y[0] if model.epoch_loss.y else None
    rows.append(("loss", f"final {_fmt(model.final_loss())}, best {_fmt(model.best_loss())}"
                 + (f" (first epoch {_fmt(first)})" if first is not None else "")))
    if model.val_loss.y:
        rows.append(("val_loss", f"final {_fmt(model.val_loss.y[-1])}, best {_fmt(min(model.val_loss.y))}"))
    rows += [
        ("progress", f"{model.epoch} of {model.epochs} epochs, step {model.step}"),
        ("rows/s", _fmt(model.rows_per_s)),
        ("wall time", f"{duration(model.elapsed())} (start-up {duration(startup)}, training {duration(training)})"),
        ("latest checkpoint", model.checkpoints[0].path if model.checkpoints else "none"),
    ]
    if model.model_path:
        rows.append(("model", model.model_path))
    if model.mlflow_link:
        rows.append(("MLflow", model.mlflow_link))
    if model.tensorboard_dir:
        rows.append(("TensorBoard", tensorboard_line(model.tensorboard_dir)))
    gpu = []
    for worker in range(model.workers):
        peak = model.peak_gpu.get(worker)
        if peak and "utilization" in peak:
            gpu.append(f"worker {worker}: peak {peak['utilization']:.0f}% util, "
                       f"{_fmt(peak.get('memory_used'))} / {_fmt(peak.get('memory_total'))} MB")
        elif worker in model.gpus:
            gpu.append(f"worker {worker}: no GPU")
    if gpu:
        rows.append(("GPU", "; ".join(gpu)))
    for restart in model.restarts:
        rows.append(("restart", restart))
    if model.error:
        rows.append(("error", model.error + (f" (details: {model.error_file})" if model.error_file else "")))
    return rows


def text(model: DashboardModel) -> str:
    return "\n".join([headline(model)] + [f"  {k}: {v}" for k, v in facts(model)])


def bundle(model: DashboardModel, with_png: bool = True) -> dict[str, Any]:
    """A mime bundle: text/plain always, text/html and image/png (the curve) when there is one."""
    png = loss_png(model) if with_png else None
    color = {"succeeded": "#2ca02c", "failed": "#d62728", "stopped": "#ff7f0e"}.get(model.state, "#1f77b4")
    rows = "".join(f"<tr><th style='text-align:left;padding-right:12px'>{html.escape(k)}</th>"
                   f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in facts(model))
    img = ""
    if png:
        img = (f"<img alt='loss curve of tfos job {html.escape(model.job)}' "
               f"src='data:image/png;base64,{base64.b64encode(png).decode()}'/>")
    page = (f"<div class='tfos-summary'><h4 style='color:{color}'>{html.escape(headline(model))}</h4>{img}"
            f"<table style='font-size:12px'>{rows}</table></div>")
    out: dict[str, Any] = {"text/plain": text(model), "text/html": page}
    if png:
        out["image/png"] = base64.b64encode(png).decode()
    return out
