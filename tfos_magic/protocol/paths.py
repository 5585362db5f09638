"""Names of the files a job writes, and joins that work for URIs as well as local paths.

Checkpoint dirs may be hdfs://, s3:// or gs:// URIs that tf.io.gfile handles, so
joins never go through os.path.
"""

from __future__ import annotations

MODEL_FILE = "model.keras"  # written by the all-reduce path
H5_MODEL_FILE = "model.h5"  # written by the ps path (graph-mode Keras cannot write .keras)
TORCH_MODEL_FILE = "model.pt"  # written by the PyTorch runner: the module's state and how to build it
CHECKPOINT_PREFIX = "ckpt"


def join_uri(base: str, name: str) -> str:
    """`base/name` for a local path or a URI."""
    return f"{base.rstrip('/')}/{name}"


def local_path(path: str) -> str | None:
    """The filesystem path of a plain path or a file:// URI; None for any other URI
    (hdfs://, s3a://, gs://, ...), which only tf.io.gfile can reach."""
    if "://" not in path:
        return path
    scheme, _, rest = path.partition("://")
    return rest if scheme == "file" else None


def unshared_checkpoint_dir(path: str, who: str) -> str:
    """The one message every side gives when a checkpoint dir is not where everyone sees it."""
    where = "a folder on the kernel's host" if local_path(path) is not None else "storage it cannot read"
    return (f"The checkpoint dir {path!r} is not visible to {who}: to it, that is {where}. On a cluster every TF "
            "worker writes and restores checkpoints there, and the kernel loads the trained model from it, so it "
            "must be storage that the kernel and every executor share. Pass --checkpoint-dir with an hdfs://, "
            "s3a:// or gs:// URI or a path on a shared mount (NFS), or set TFOS_CHECKPOINT_ROOT once for the "
            "cluster (each job then gets its own folder under it).")
