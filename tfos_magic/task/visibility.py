"""Runs in Spark tasks: whether this executor sees a file the kernel wrote.

Before a job starts on a cluster, the kernel writes a marker file into the checkpoint
dir and runs `probe` once on every task slot: an executor that cannot see the marker
would write its checkpoints where no other host (and not the kernel) can read them.
Each training task checks again before it starts its TF process.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Callable


def probe(marker: str) -> Callable[[], str]:
    """The function for one barrier task: its executor's address and whether it sees `marker`."""

    def run() -> str:
        from pyspark import BarrierTaskContext

        task = BarrierTaskContext.get()
        address = task.getTaskInfos()[task.partitionId()].address.rsplit(":", 1)[0]
        return json.dumps({"executor": address, "host": socket.gethostname(), "sees": os.path.exists(marker)})

    return run
