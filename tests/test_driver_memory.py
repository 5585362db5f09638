"""Acceptance: training data never passes through the driver.

The driver (this process) samples its own RSS while one worker streams 5M rows into
tf.data; it must stay flat. As a control that the measurement can fail, the same
DataFrame through toPandas() must grow the driver by far more.
"""

import threading
import time

import psutil
import pytest
from conftest import run

from tfos_magic import api, get_job

ROWS = 5_000_000
LIMIT = 150 * 2**20

COUNT_ROWS = """%%tf_train big --workers 1 --label y --batch-size 4096
def train(ctx):
    rows = 0
    for x, y in ctx.dataset():
        rows += int(y.shape[0])
    ctx.report(epoch=1, rows=rows)
"""


class PeakRss:
    def __init__(self):
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth(self):
        return self.peak - self.base


@pytest.mark.e2e
def test_driver_rss_stays_flat_while_a_worker_streams_5m_rows(shell, spark):
    cols = "', '".join(f"rand({i}) as f{i}" for i in range(8))
    _, err = run(shell, f"%%spark_etl big\nspark.range({ROWS}, numPartitions=2).selectExpr('{cols}', 'rand(99) as y')\n")
    assert err is None, err
    df = api._FRAMES["big"]
    with PeakRss() as streamed:
        _, err = run(shell, COUNT_ROWS)
    assert err is None, err
    assert get_job("big").history == [{"epoch": 1, "rows": ROWS}]
    print(f"driver RSS growth while streaming {ROWS} rows: {streamed.growth / 2**20:.0f} MiB")
    assert streamed.growth < LIMIT

    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    with PeakRss() as collected:
        pdf = df.toPandas()
        assert len(pdf) == ROWS
        time.sleep(0.2)
    del pdf
    print(f"driver RSS growth with toPandas(): {collected.growth / 2**20:.0f} MiB")
    assert collected.growth > LIMIT, "the control must show what passing through the driver costs"
