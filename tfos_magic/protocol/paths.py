"""Names of the files a job writes, and joins that work for URIs as well as local paths.

Checkpoint dirs may be hdfs://, s3:// or gs:// URIs that tf.io.gfile handles, so
joins never go through os.path.
"""

from __future__ import annotations

MODEL_FILE = "model.keras"  # written by the all-reduce path
H5_MODEL_FILE = "model.h5"  # written by the ps path (graph-mode Keras cannot write .keras)
CHECKPOINT_PREFIX = "ckpt"


def join_uri(base: str, name: str) -> str:
    """`base/name` for a local path or a URI."""
    return f"{base.rstrip('/')}/{name}"
