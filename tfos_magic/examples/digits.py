"""Handwritten digits as PNG files, for the image examples: real data, with no download.

scikit-learn ships the UCI digits (1,797 scans of 8x8 pixels, 16 grey levels) inside its
package. `write_pngs` writes each as an 8-bit greyscale PNG under a folder per label
(`DIR/<label>/<index>.png`), the layout image folders usually have, so that the
examples read them the way images are read in Spark: `spark.read.format("binaryFile")`
gives each file's bytes in `content`, and the label comes from the path.
"""

from __future__ import annotations

import io
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

LABEL_FROM_PATH = r"/(\d)/[^/]+\.png$"


def write_pngs(folder: str | Path) -> int:
    """Write every digit as a PNG; returns how many. Idempotent: files already there are kept."""
    from PIL import Image  # Pillow, which matplotlib (a dependency) brings
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(folder)
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        path = root / str(int(label)) / f"{index:04d}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray((pixels * 255 / 16).round().astype("uint8"), mode="L").save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
    return len(digits.target)


def read_pngs(spark: SparkSession, folder: str | Path) -> DataFrame:
    """The PNG files as rows: `png` (the file's bytes), `label` (from its folder), `path`."""
    files = (spark.read.format("binaryFile").option("pathGlobFilter", "*.png")
             .option("recursiveFileLookup", "true").load(str(folder)))
    return files.select(F.col("content").alias("png"),
                        F.regexp_extract("path", LABEL_FROM_PATH, 1).cast("int").alias("label"), "path")
