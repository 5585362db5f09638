"""MovieLens ratings for the examples: read the real data, or generate data shaped like it.

The examples need ratings that a recommender can learn from, on any machine, with no
download. `load()` reads a real MovieLens folder when the user has one (`MOVIELENS_DIR`)
and otherwise generates synthetic ratings with latent structure into a cache folder.
Either way the data goes through one reader, so the examples see one schema:

    ratings: user_id int, movie_id int, rating float, timestamp long
    movies:  movie_id int, title string, year int (null if unknown), genres array<string>

The reader uses Spark's own CSV reader, so the executors read the files (the path must
be readable by them: a shared or distributed file system on a cluster) and the driver
never holds the data. Layouts and the generator's model: docs/movielens.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from ..errors import TfosError
from ..job.store import default_home

Layout = Literal["ml-latest-small", "ml-100k"]

ENV_DIR = "MOVIELENS_DIR"
# The files that identify each layout, in the order the reader tries them.
LAYOUT_FILES: dict[str, tuple[str, str]] = {
    "ml-latest-small": ("ratings.csv", "movies.csv"),
    "ml-100k": ("u.data", "u.item"),
}
# ml-100k's genre flags, in the order of u.item's last 19 columns.
ML_100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                  "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                  "Romance", "Sci-Fi", "Thriller", "War", "Western")
# ml-latest-small's spelling of the one genre ml-100k names differently.
_GENRE_NAMES = {"Children's": "Children"}
# What each layout says for "no genre"; the normalised form is an empty array.
_NO_GENRE = {"ml-latest-small": "(no genres listed)", "ml-100k": "unknown"}

# The genres the generator assigns: the 18 that both layouts know, in ml-latest-small's
# spelling, ordered roughly by how common they are in the real data (the generator's
# popularity ranks).
GENRES = ("Drama", "Comedy", "Thriller", "Action", "Romance", "Adventure", "Crime", "Sci-Fi", "Horror",
          "Fantasy", "Children", "Animation", "Mystery", "Documentary", "War", "Musical", "Western",
          "Film-Noir")
# Part of the cache folder's name: a change to the generator's model must not reuse old data.
GENERATOR_VERSION = 1
SIZE_DEFAULTS = {"users": 1000, "movies": 800, "ratings": 100_000}

_RATINGS_SCHEMA = "user_id INT, movie_id INT, rating FLOAT, timestamp LONG"
# A title's trailing "(1995)", or the start of a range such as "(1975-1979)" (TV series).
_TITLE_YEAR = r"\((\d{4})(?:-\d{0,4})?\)\s*$"


# --- reader -------------------------------------------------------------------------


def load(spark: SparkSession, path: str | os.PathLike | None = None, seed: int = 0,
         **size: int) -> tuple[DataFrame, DataFrame]:
    """(ratings, movies) for an example: from `path`, else `$MOVIELENS_DIR`, else synthetic.

    Synthetic data (`seed`, and `users`, `movies`, `ratings` as in `generate`) is written
    once to `$TFOS_HOME/data/` and reused, so re-running a notebook reads the same files.
    """
    unknown = set(size) - set(SIZE_DEFAULTS)
    if unknown:
        raise TfosError(f"movielens.load() got {', '.join(sorted(unknown))}; the sizes of synthetic data "
                        f"are {', '.join(SIZE_DEFAULTS)}, for example load(spark, users=200, ratings=10_000).")
    source = path if path is not None else os.environ.get(ENV_DIR) or None
    if source is None:
        source = _cached_synthetic(seed, {**SIZE_DEFAULTS, **size})
    return read(spark, source)


def read(spark: SparkSession, path: str | os.PathLike) -> tuple[DataFrame, DataFrame]:
    """(ratings, movies) from an ml-latest-small or ml-100k folder, in the normalised schema.

    The layout is told by the files present. Nothing is read on the driver: the
    DataFrames are lazy, and the executors parse the files when a job runs.
    """
    root = _qualify(path)
    layout = detect_layout(spark, root)
    ratings_file, movies_file = (f"{root.rstrip('/')}/{name}" for name in LAYOUT_FILES[layout])
    if layout == "ml-100k":
        return _read_100k(spark, ratings_file, movies_file)
    return _read_latest(spark, ratings_file, movies_file)


def detect_layout(spark: SparkSession, path: str | os.PathLike) -> Layout:
    """The layout whose two files are both in `path`, through the file system Spark reads with."""
    root = _qualify(path)
    for layout, names in LAYOUT_FILES.items():
        if all(_exists(spark, f"{root.rstrip('/')}/{name}") for name in names):
            return layout  # type: ignore[return-value]
    looked = " or ".join(f"{' + '.join(names)} ({layout})" for layout, names in LAYOUT_FILES.items())
    raise TfosError(
        f"No MovieLens data in {root}: looked for {looked} and found neither pair. Point {ENV_DIR} "
        "(or the path) at an unzipped ml-latest-small or ml-100k folder from grouplens.org, or leave "
        f"{ENV_DIR} unset to use synthetic ratings."
    )


def _qualify(path: str | os.PathLike) -> str:
    """A local path made absolute (with ~ expanded); a URI such as hdfs://... as given."""
    text = os.fspath(path)
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


def _exists(spark: SparkSession, path: str) -> bool:
    """Whether Hadoop's file system for `path` has it: the same resolution spark.read uses,
    so a folder on HDFS or object storage is detected as well as a local one."""
    sc = spark.sparkContext
    hadoop_path = sc._jvm.org.apache.hadoop.fs.Path(path)  # type: ignore[union-attr]
    file_system = hadoop_path.getFileSystem(sc._jsc.hadoopConfiguration())  # type: ignore[union-attr]
    return bool(file_system.exists(hadoop_path))


def _read_latest(spark: SparkSession, ratings_file: str, movies_file: str) -> tuple[DataFrame, DataFrame]:
    """ml-latest-small: RFC 4180 CSV with a header, UTF-8, quotes doubled inside quoted titles."""
    options = {"header": True, "quote": '"', "escape": '"', "encoding": "UTF-8", "mode": "PERMISSIVE"}
    ratings = spark.read.csv(ratings_file, schema="userId INT, movieId INT, rating FLOAT, timestamp LONG",
                             **options)
    ratings = ratings.toDF(*_column_names(_RATINGS_SCHEMA))
    raw = spark.read.csv(movies_file, schema="movieId INT, title STRING, genres STRING", **options)
    genres = F.array_remove(F.split(F.coalesce(F.col("genres"), F.lit("")), r"\|"), "")
    genres = F.array_remove(genres, _NO_GENRE["ml-latest-small"])
    movies = raw.select(F.col("movieId").alias("movie_id"), F.trim("title").alias("title"),
                        _year(F.col("title")).alias("year"), genres.alias("genres"))
    return ratings, movies


def _read_100k(spark: SparkSession, ratings_file: str, movies_file: str) -> tuple[DataFrame, DataFrame]:
    """ml-100k: u.data tab separated, u.item pipe separated in latin-1; neither has a header
    or quoting (a quote character is part of a title there)."""
    ratings = spark.read.csv(ratings_file, schema=_RATINGS_SCHEMA, sep="\t", header=False, quote="")
    flags = [f"g{i}" for i in range(len(ML_100K_GENRES))]
    schema = ("movie_id INT, title STRING, release_date STRING, video_release_date STRING, imdb_url STRING, "
              + ", ".join(f"{flag} INT" for flag in flags))
    raw = spark.read.csv(movies_file, schema=schema, sep="|", header=False, quote="", encoding="ISO-8859-1")
    named = [F.when(F.col(flag) == 1, F.lit(_GENRE_NAMES.get(name, name)))
             for flag, name in zip(flags, ML_100K_GENRES) if name != _NO_GENRE["ml-100k"]]
    date_year = _nonempty(F.regexp_extract(F.col("release_date"), r"(\d{4})\s*$", 1))
    movies = raw.select("movie_id", F.trim("title").alias("title"),
                        F.coalesce(_year(F.col("title")), date_year.cast("int")).alias("year"),
                        F.array_compact(F.array(*named)).alias("genres"))
    return ratings, movies


def _year(title: Column) -> Column:
    """The year at the end of a title, or null (never an error under ANSI casts)."""
    return _nonempty(F.regexp_extract(title, _TITLE_YEAR, 1)).cast("int")


def _nonempty(text: Column) -> Column:
    """regexp_extract's "" for no match becomes null, so a cast yields null instead of failing."""
    return F.nullif(text, F.lit(""))


def _column_names(ddl: str) -> list[str]:
    return [field.strip().split()[0] for field in ddl.split(",")]


# --- synthetic data ------------------------------------------------------------------


def _cached_synthetic(seed: int, size: dict[str, int]) -> Path:
    """The folder of synthetic data for `seed` and `size`, generated on first use.

    Generated into a temporary sibling and renamed into place, so a reader (or a second
    kernel generating the same data) never sees a half-written folder.
    """
    name = (f"movielens-synthetic-{seed}-{size['users']}u-{size['movies']}m-{size['ratings']}r"
            f"-v{GENERATOR_VERSION}")
    target = default_home() / "data" / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        generate(tmp, seed=seed, **size)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # not another process winning the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def generate(out_dir: str | os.PathLike, users: int = 1000, movies: int = 800, ratings: int = 100_000,
             seed: int = 0, layout: Layout = "ml-latest-small") -> Path:
    """Write synthetic ratings in a real MovieLens layout; the same seed writes the same bytes.

    Each rating is a global mean, plus user and movie biases, plus a dot product of
    8-dimensional user and movie factors (a movie's factors lean towards its genres'),
    plus genre and release-year effects and noise, rounded to half stars (whole stars for
    ml-100k, as there) and clipped to the scale. Movies are chosen by a Zipf-like
    popularity and each user rates a skewed number of distinct movies, so a factorization
    model has structure to find and a global mean does not fit.
    """
    if layout not in LAYOUT_FILES:
        raise TfosError(f"Unknown MovieLens layout {layout!r}; use one of {', '.join(LAYOUT_FILES)}.")
    if min(users, movies, ratings) < 1 or ratings > users * movies:
        raise TfosError(f"Cannot generate {ratings} ratings of {movies} movies by {users} users: each user rates "
                        "a movie at most once, so 1 <= ratings <= users * movies.")
    rng = np.random.default_rng(seed)
    catalogue = _catalogue(rng, movies)
    table = _ratings(rng, users, catalogue, ratings, whole_stars=layout == "ml-100k")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if layout == "ml-100k":
        _write_100k(out, table, catalogue)
    else:
        _write_latest(out, table, catalogue)
    return out


def _catalogue(rng: np.random.Generator, movies: int) -> pd.DataFrame:
    """Movies with a release year (1930-2018, mostly recent) and 1-3 genres, common genres
    more often."""
    years = 1930 + np.rint(88 * rng.beta(4.0, 1.3, movies)).astype(int)
    genre_weights = 1.0 / np.arange(1, len(GENRES) + 1) ** 0.9
    genre_weights /= genre_weights.sum()
    counts = rng.choice([1, 2, 3], size=movies, p=[0.4, 0.4, 0.2])
    genres = [tuple(sorted(rng.choice(len(GENRES), size=k, replace=False, p=genre_weights))) for k in counts]
    return pd.DataFrame({"movie_id": np.arange(1, movies + 1), "year": years, "genres": genres})


def _ratings(rng: np.random.Generator, users: int, catalogue: pd.DataFrame, total: int,
             whole_stars: bool) -> pd.DataFrame:
    """`total` (user, movie, rating, timestamp) rows, one per pair, sorted by user and movie."""
    movies, dim = len(catalogue), 8
    # Latent model. Scales: biases and the factor term each move a rating by about half a star.
    user_bias = rng.normal(0.0, 0.4, users)
    movie_bias = rng.normal(0.0, 0.5, movies)
    genre_effect = rng.normal(0.0, 0.25, len(GENRES))
    genre_factors = rng.normal(0.0, 0.45, (len(GENRES), dim))
    user_factors = rng.normal(0.0, 0.45, (users, dim))
    movie_factors = np.stack([genre_factors[list(g)].mean(axis=0) for g in catalogue["genres"]])
    movie_factors = 0.6 * movie_factors + rng.normal(0.0, 0.35, (movies, dim))
    movie_effect = movie_bias + np.array([genre_effect[list(g)].mean() for g in catalogue["genres"]])
    # Older films that are still rated tend to be the good ones.
    movie_effect += 0.3 * (2000 - catalogue["year"].to_numpy()) / 70

    # Who rates what: skewed activity per user, Zipf-like popularity per movie.
    per_user = _ratings_per_user(rng, users, movies, total)
    log_popularity = -0.9 * np.log(rng.permutation(movies) + 1.0)
    user_idx = np.repeat(np.arange(users), per_user)
    movie_idx = np.concatenate([_weighted_sample(rng, log_popularity, n) for n in per_user])

    score = (3.5 + user_bias[user_idx] + movie_effect[movie_idx]
             + np.einsum("ij,ij->i", user_factors[user_idx], movie_factors[movie_idx])
             + rng.normal(0.0, 0.5, total))
    step, low = (1.0, 1.0) if whole_stars else (0.5, 0.5)
    rating = np.clip(np.rint(score / step) * step, low, 5.0)
    table = pd.DataFrame({"user_id": user_idx + 1, "movie_id": movie_idx + 1, "rating": rating,
                          "timestamp": _timestamps(rng, users, user_idx, catalogue["year"].to_numpy()[movie_idx])})
    return table.sort_values(["user_id", "movie_id"], kind="stable", ignore_index=True)


def _ratings_per_user(rng: np.random.Generator, users: int, movies: int, total: int) -> np.ndarray:
    """How many movies each user rates: at least a few (MovieLens keeps users with 20+),
    the rest log-normally skewed, never more than there are movies."""
    floor = min(20, total // users, movies)
    per_user = floor + rng.multinomial(total - floor * users, _normalised(rng.lognormal(0.0, 1.0, users)))
    while (excess := int(np.clip(per_user - movies, 0, None).sum())) > 0:
        per_user = np.minimum(per_user, movies)
        per_user += rng.multinomial(excess, _normalised((movies - per_user).astype(float)))
    return per_user


def _weighted_sample(rng: np.random.Generator, log_weights: np.ndarray, n: int) -> np.ndarray:
    """`n` distinct indices drawn with probability ~ exp(log_weights), without replacement
    (the Gumbel top-k trick), sorted."""
    if n >= len(log_weights):
        return np.arange(len(log_weights))
    keys = log_weights + rng.gumbel(size=len(log_weights))
    return np.sort(np.argpartition(-keys, n - 1)[:n])


def _normalised(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


_FIRST_RATING = 828_316_800  # 1996-04-01, about when MovieLens began
_LAST_RATING = 1_537_747_200  # 2018-09-24, the end of ml-latest-small


def _timestamps(rng: np.random.Generator, users: int, user_idx: np.ndarray, years: np.ndarray) -> np.ndarray:
    """Seconds since the epoch: each user is active from a start date for a skewed span,
    and no movie is rated before the year it came out."""
    start = rng.integers(_FIRST_RATING, _LAST_RATING, users)
    span = rng.lognormal(np.log(60 * 86_400), 1.5, users)
    released = (years - 1970) * 31_557_600  # Jan 1 of the release year, near enough
    first = np.maximum(start[user_idx], released)
    # Wrapped into [first, last] rather than clipped, so no date collects the overflow.
    offset = np.fmod(rng.exponential(span[user_idx]), np.maximum(_LAST_RATING - first, 1))
    return (first + offset).astype(np.int64)


def _title(movie_id: int, year: int) -> str:
    return f"Movie {movie_id} ({year})"


def _write_latest(out: Path, table: pd.DataFrame, catalogue: pd.DataFrame) -> None:
    """ratings.csv and movies.csv exactly as ml-latest-small has them (ratings like 4.0)."""
    table.rename(columns={"user_id": "userId", "movie_id": "movieId"}).to_csv(
        out / "ratings.csv", index=False, float_format="%.1f", lineterminator="\n")
    movies = pd.DataFrame({
        "movieId": catalogue["movie_id"],
        "title": [_title(m, y) for m, y in zip(catalogue["movie_id"], catalogue["year"])],
        "genres": ["|".join(sorted(GENRES[i] for i in g)) for g in catalogue["genres"]],
    })
    movies.to_csv(out / "movies.csv", index=False, lineterminator="\n")


def _write_100k(out: Path, table: pd.DataFrame, catalogue: pd.DataFrame) -> None:
    """u.data (tab separated, whole-star ratings) and u.item (pipe separated, latin-1, a
    date like 01-Jan-1995 and 19 genre flags), with no header, as ml-100k has them."""
    table.astype({"rating": int}).to_csv(out / "u.data", sep="\t", header=False, index=False, lineterminator="\n")
    spelled = [_GENRE_NAMES.get(name, name) for name in ML_100K_GENRES]
    item = pd.DataFrame({
        "movie_id": catalogue["movie_id"],
        "title": [_title(m, y) for m, y in zip(catalogue["movie_id"], catalogue["year"])],
        "release_date": [f"01-Jan-{y}" for y in catalogue["year"]],
        "video_release_date": "",
        "imdb_url": "",
    })
    for column, name in zip(ML_100K_GENRES, spelled):
        index = GENRES.index(name) if name in GENRES else -1
        item[column] = [int(index in g) for g in catalogue["genres"]]
    item.to_csv(out / "u.item", sep="|", header=False, index=False, encoding="latin-1", lineterminator="\n")
