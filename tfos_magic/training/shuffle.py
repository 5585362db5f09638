"""Shuffling the feed without holding it in memory: a buffer of rows over a stream of
Arrow batches, and a new order of spill blocks every epoch.

DataFrames often arrive in order (by date, by key after a join, by label when files are
laid out that way), and a model fed a long run of one label learns little. Keras'
`fit` shuffles by default and tf.data users shuffle with a buffer; per-row shuffling in
tf.data would cost a pass per element, so rows are mixed here a window at a time with
Arrow's `take`.
"""

from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np
import pyarrow as pa

# Rows the spill is cut into: later epochs read these blocks in a new order each time.
SPILL_BLOCK_ROWS = 1024


def rng_for(job: str, run: int, worker: int, epoch: int) -> np.random.Generator:
    """The same order for the same job, run, worker and epoch: a run resumed mid-epoch
    skips exactly the rows its earlier attempt trained on."""
    return np.random.default_rng(zlib.crc32(f"{job}:{run}:{worker}:{epoch}".encode()))


def shuffled(batches: Iterator[pa.RecordBatch], buffer_rows: int, rng: np.random.Generator
             ) -> Iterator[pa.RecordBatch]:
    """`batches` with their rows mixed a window of about `buffer_rows` rows at a time: the
    batches pool until they hold that many rows, and the pool goes out permuted. Each row
    is copied once; a window that slid row by row (tf.data's shuffle) would copy each row
    about twice for mixing that the next epochs' new block order gives anyway."""
    pool: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        pool.append(batch)
        held += batch.num_rows
        if held >= buffer_rows:
            yield from _permuted(pool, held, rng).to_batches()
            pool, held = [], 0
    if held:
        yield from _permuted(pool, held, rng).to_batches()


def _permuted(pool: list[pa.RecordBatch], rows: int, rng: np.random.Generator) -> pa.Table:
    # One contiguous copy first: `take` over a single chunk is faster than over the pool's
    # many (Arrow looks up each index's chunk).
    return pa.Table.from_batches(pool).combine_chunks().take(pa.array(rng.permutation(rows)))
