"""MovieLens for the examples: both real layouts read into one schema by Spark, a clear error
for a folder in neither, and synthetic data that is deterministic and learnable."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tfos_magic.errors import TfosError
from tfos_magic.examples import movielens

RATINGS_SCHEMA = [("user_id", "int"), ("movie_id", "int"), ("rating", "float"), ("timestamp", "bigint")]
MOVIES_SCHEMA = [("movie_id", "int"), ("title", "string"), ("year", "int"), ("genres", "array<string>")]


def _schema(df) -> list[tuple[str, str]]:
    return [(f.name, f.dataType.simpleString()) for f in df.schema.fields]


def _rows(df, key: str) -> list[tuple]:
    return sorted((tuple(r) for r in df.collect()), key=lambda row: row[df.columns.index(key)])


def _ml_latest_small(folder):
    folder.mkdir()
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                        "1,1,4.0,964982703\n1,3,4.5,964981247\n2,11,0.5,1445714835\n",
                                        encoding="utf-8")
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        '3,"Misérables, Les (1998)",Crime|Drama\n'
        "4,Beasts of the Deep (2018),(no genres listed)\n"
        '5,"Quote ""Unquote"" Story",Documentary\n'
        "6,Fawlty Towers (1975-1979),Comedy\n",
        encoding="utf-8")
    return folder


def _ml_100k(folder):
    folder.mkdir()
    (folder / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t1\t891717742\n", encoding="latin-1")
    flags = {"Animation": 3, "Children's": 4, "Comedy": 5, "Drama": 8}

    def item(movie_id: int, title: str, date: str, *genres: str) -> str:
        bits = ["0"] * 19
        for genre in genres:
            bits[flags[genre]] = "1"
        return "|".join([str(movie_id), title, date, "", "http://us.imdb.com/M/x"] + bits) + "\n"

    unknown = "267|unknown||||" + "|".join(["1"] + ["0"] * 18) + "\n"
    text = (item(1, "Toy Story (1995)", "01-Jan-1995", "Animation", "Children's", "Comedy")
            + item(242, "Misérables, Les (1995)", "01-Jan-1995", "Drama")
            + item(302, "Heat", "15-Dec-1995", "Drama")
            + unknown)
    (folder / "u.item").write_bytes(text.encode("latin-1"))
    return folder


def test_ml_latest_small_is_read_into_the_normalised_schema(spark, tmp_path):
    ratings, movies = movielens.read(spark, _ml_latest_small(tmp_path / "ml-latest-small"))
    assert _schema(ratings) == RATINGS_SCHEMA and _schema(movies) == MOVIES_SCHEMA
    assert _rows(ratings, "timestamp") == [(1, 3, 4.5, 964981247), (1, 1, 4.0, 964982703),
                                           (2, 11, 0.5, 1445714835)]
    assert _rows(movies, "movie_id") == [
        (1, "Toy Story (1995)", 1995, ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]),
        (3, "Misérables, Les (1998)", 1998, ["Crime", "Drama"]),
        (4, "Beasts of the Deep (2018)", 2018, []),
        (5, 'Quote "Unquote" Story', None, ["Documentary"]),
        (6, "Fawlty Towers (1975-1979)", 1975, ["Comedy"]),
        (11, "American President, The (1995)", 1995, ["Comedy", "Drama", "Romance"]),
    ]


def test_ml_100k_is_read_into_the_same_schema_with_latin1_titles_and_date_years(spark, tmp_path):
    ratings, movies = movielens.read(spark, str(_ml_100k(tmp_path / "ml-100k")))
    assert _schema(ratings) == RATINGS_SCHEMA and _schema(movies) == MOVIES_SCHEMA
    assert _rows(ratings, "user_id") == [(186, 302, 1.0, 891717742), (196, 242, 3.0, 881250949)]
    assert _rows(movies, "movie_id") == [
        (1, "Toy Story (1995)", 1995, ["Animation", "Children", "Comedy"]),  # ml-latest's spelling
        (242, "Misérables, Les (1995)", 1995, ["Drama"]),
        (267, "unknown", None, []),  # no release date, genre "unknown"
        (302, "Heat", 1995, ["Drama"]),  # no year in the title: the release date's
    ]


def test_a_folder_in_neither_layout_names_the_files_looked_for(spark, tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")  # one file of a pair
    with pytest.raises(TfosError) as error:
        movielens.read(spark, tmp_path)
    message = str(error.value)
    for name in ("ratings.csv", "movies.csv", "u.data", "u.item", "MOVIELENS_DIR", str(tmp_path)):
        assert name in message, message


def test_generated_data_is_deterministic_and_in_the_layout_the_reader_reads(spark, tmp_path):
    size = {"users": 40, "movies": 30, "ratings": 600}
    first, again, other = (movielens.generate(tmp_path / name, seed=seed, **size)
                           for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    for name in ("ratings.csv", "movies.csv"):
        assert (first / name).read_bytes() == (again / name).read_bytes()
    assert (first / "ratings.csv").read_bytes() != (other / "ratings.csv").read_bytes()
    assert (first / "movies.csv").read_text().startswith("movieId,title,genres\n1,Movie 1 (")

    hundred_k = movielens.generate(tmp_path / "100k", seed=7, layout="ml-100k", **size)
    assert movielens.detect_layout(spark, hundred_k) == "ml-100k"
    for folder, steps in ((first, 0.5), (hundred_k, 1.0)):
        ratings, movies = movielens.read(spark, folder)
        r = ratings.toPandas()
        m = movies.toPandas()
        assert len(r) == size["ratings"] and not r.duplicated(["user_id", "movie_id"]).any()
        assert r["user_id"].between(1, size["users"]).all() and set(r["movie_id"]) <= set(m["movie_id"])
        assert ((r["rating"] / steps) % 1 == 0).all() and r["rating"].between(steps, 5.0).all()
        assert r["timestamp"].between(820_000_000, 1_540_000_000).all()
        assert len(m) == size["movies"] and m["year"].between(1930, 2018).all()
        assert m["genres"].map(len).between(1, 3).all()
        assert set(np.concatenate(m["genres"].to_list())) <= set(movielens.GENRES)


def test_synthetic_ratings_have_structure_beyond_the_global_mean(tmp_path):
    folder = movielens.generate(tmp_path / "data", users=200, movies=150, ratings=8000, seed=3)
    ratings = pd.read_csv(folder / "ratings.csv")
    test = ratings.sample(frac=0.2, random_state=0)
    train = ratings.drop(test.index)
    mean = train["rating"].mean()
    shrink = 5  # damped means: a movie with few ratings stays near the global mean
    movie_bias = (train["rating"] - mean).groupby(train["movieId"]).agg(lambda x: x.sum() / (len(x) + shrink))
    residual = train["rating"] - mean - train["movieId"].map(movie_bias)
    user_bias = residual.groupby(train["userId"]).agg(lambda x: x.sum() / (len(x) + shrink))
    predicted = mean + test["movieId"].map(movie_bias).fillna(0) + test["userId"].map(user_bias).fillna(0)
    baseline = np.sqrt(((test["rating"] - mean) ** 2).mean())
    biased = np.sqrt(((test["rating"] - predicted) ** 2).mean())
    assert biased < 0.95 * baseline, (biased, baseline)


def test_load_takes_the_path_then_movielens_dir_then_cached_synthetic_data(spark, tmp_path, tfos_home,
                                                                           monkeypatch):
    real = _ml_100k(tmp_path / "ml-100k")
    monkeypatch.setenv("MOVIELENS_DIR", str(_ml_latest_small(tmp_path / "ml-latest-small")))
    assert movielens.load(spark, path=real)[0].count() == 2
    assert movielens.load(spark)[0].count() == 3

    monkeypatch.delenv("MOVIELENS_DIR")
    ratings, movies = movielens.load(spark, seed=1, users=30, movies=20, ratings=300)
    assert ratings.count() == 300 and _schema(movies) == MOVIES_SCHEMA
    cached = list((tfos_home / "data").iterdir())
    assert [p.name for p in cached] == ["movielens-synthetic-1-30u-20m-300r-v1"]  # no temp folder left

    def fail(*args, **kwargs):
        raise AssertionError("generated again instead of reusing the cache")

    monkeypatch.setattr(movielens, "generate", fail)
    assert movielens.load(spark, seed=1, users=30, movies=20, ratings=300)[0].count() == 300
    with pytest.raises(TfosError, match="users, movies, ratings"):
        movielens.load(spark, user=30)
