"""The kernel's CPU cost of the live dashboard, per second of a job, in a real kernel.

A real kernel (jupyter_client) shows the dashboard, and is fed a scripted job at
1 Hz: 2 workers, each sending a `step` and a `gpu` event every second, an epoch and a
checkpoint every 60 s. Each simulated second ends with the dashboard's tick (status
plus binary appends, over ZMQ to this client, which reads and drops them); every
30 s the snapshot is synced. The kernel's own CPU time (all its threads) is read
before and after with resource.getrusage. Side by side in the same kernel:

  dashboard   events -> DashboardModel -> widget ticks and snapshots (the real path)
  model only  events -> DashboardModel, no widget (what the events cost anyway)

The ticks run back to back (no sleeping), so `--seconds` simulated seconds take less
wall time; the cost per simulated second is what a job at 1 Hz pays. Also runs
`--realtime` seconds at the true 1 Hz pace and reports the kernel's CPU % of a core.

Usage: .venv/bin/python bench/dashboard.py [--seconds 600] [--realtime 60]
"""

from __future__ import annotations

import argparse
import json
import time

from jupyter_client.manager import start_new_kernel

SETUP = r"""
import resource, time
from tfos_magic.ui.model import DashboardModel
from tfos_magic.ui.widget import DashboardObserver

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def events(second, workers=2):
    now = time.time()
    out = []
    for w in range(workers):
        out.append({"v": 1, "time": now, "kind": "step", "worker": w, "step": second * 40,
                    "metrics": {"loss": 1.0 / (1 + second), "rows_per_s": 20000.0}, "rows": second * 40 * 512})
        out.append({"v": 1, "time": now, "kind": "gpu", "worker": w, "devices": [
            {"gpu": 0, "utilization": 80.0, "memory_used": 9000.0, "memory_total": 16000.0,
             "temperature": 65.0, "power": 200.0}]})
    if second % 60 == 59:
        out.append({"v": 1, "time": now, "kind": "epoch", "worker": 0, "epoch": second // 60 + 1,
                    "step": second * 40, "metrics": {"loss": 1.0 / (1 + second), "val_loss": 1.1 / (1 + second)}})
        out.append({"v": 1, "time": now, "kind": "checkpoint", "worker": 0, "path": f"/ck/ckpt-{second * 40}",
                    "step": second * 40, "epoch": second // 60 + 1})
    return out

def run(seconds, widget, pace=0.0):
    view = DashboardObserver("bench", epochs=seconds // 60 + 1, workers=2) if widget else None
    model = view.model if view else DashboardModel("bench", workers=2, epochs=seconds // 60 + 1)
    if view:
        view.on_start({"job_group": "tfos-bench-run1-a1", "attempt": 1})
    c0, t0 = cpu(), time.time()
    for second in range(seconds):
        for e in events(second):
            (view.on_event if view else model.feed)(e)
        if view:
            view._push(force=True)
            if second % 30 == 29:
                view._sync_snapshot()
        if pace:
            time.sleep(max(0.0, t0 + (second + 1) * pace - time.time()))
    return {"cpu_s": cpu() - c0, "wall_s": time.time() - t0, "points": view.sent_points if view else 0}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--realtime", type=int, default=60)
    args = ap.parse_args()
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        def run(code: str) -> dict:
            out: list[str] = []
            kc.execute_interactive(code, timeout=3600, output_hook=lambda m: out.append(m["content"].get("text", "")))
            return json.loads("".join(out).strip().splitlines()[-1])

        kc.execute_interactive(SETUP, timeout=120)
        model = run(f"import json; print(json.dumps(run({args.seconds}, widget=False)))")
        dash = run(f"import json; print(json.dumps(run({args.seconds}, widget=True)))")
        real = run(f"import json; print(json.dumps(run({args.realtime}, widget=True, pace=1.0)))")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    per_s = (dash["cpu_s"] - model["cpu_s"]) / args.seconds
    print(f"simulated job: {args.seconds} s at 1 Hz, 2 workers (step + gpu event each a second)")
    print(f"  model only   {model['cpu_s']:.3f} CPU s   ({1000 * model['cpu_s'] / args.seconds:.3f} ms per job second)")
    print(f"  dashboard    {dash['cpu_s']:.3f} CPU s   ({1000 * dash['cpu_s'] / args.seconds:.3f} ms per job second, "
          f"{dash['points']} points sent as appends)")
    print(f"  widget's own cost: {1000 * per_s:.3f} ms per second = {100 * per_s:.3f}% of one core")
    print(f"real time: {args.realtime} s at 1 Hz: kernel CPU {real['cpu_s']:.3f} s over {real['wall_s']:.1f} s "
          f"= {100 * real['cpu_s'] / real['wall_s']:.3f}% of one core (dashboard and idle kernel together)")


if __name__ == "__main__":
    main()
