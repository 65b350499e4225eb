"""ML-1M implicit pairs -> CTR with sampled negatives: hand-made files (always) and the
real files in ../shared/data/ml-1m (skipped when absent)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SHARED

from embtables.datasets.ml1m import carve_valid, convert_ml1m
from embtables.datasets.schema import load_schema

ML1M = SHARED / "data" / "ml-1m"


def table(root, split):
    return pq.read_table(load_schema(root).files(root, split)).to_pandas()


def write_small(src):
    src.mkdir()
    (src / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n")
    (src / "movies.dat").write_text(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n"
        "2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
        "3::Heat (1995)::Action|Crime|Thriller\n4::Unrated (2000)::Drama\n"
        "5::Casino (1995)::Drama|Thriller\n6::Sabrina (1995)::Comedy|Romance\n"
        "7::Clueless (1995)::Comedy\n"
    )
    # ids in the pair files are the original ids - 1; movie 4 is rated by nobody
    (src / "train.txt").write_text("0 0 1 2 4\n1 0 1 2\n2 5 2 6\n")
    (src / "test.txt").write_text("0 5\n1 4\n")


def test_small_files_features_negatives_and_valid_carve(tmp_path):
    write_small(tmp_path / "src")
    schema = convert_ml1m(tmp_path / "src", tmp_path / "out", valid_frac=0.4, seed=1)
    assert [c.name for c in schema.categorical] == [
        "user_id",
        "gender",
        "age",
        "occupation",
        "zip",
        "movie_id",
        "genre",
        "year",
    ]
    tr, va, te = (table(tmp_path / "out", s) for s in ("train", "valid", "test"))
    rated = {(1, 1), (1, 2), (1, 3), (1, 5), (1, 6), (2, 1), (2, 2), (2, 3), (2, 5), (3, 6), (3, 3), (3, 7)}
    pos = {(u, m) for t in (tr, va) for u, m, y in zip(t.user_id, t.movie_id, t.label, strict=True) if y == 1}
    assert pos == {(1, 1), (1, 2), (1, 3), (1, 5), (2, 1), (2, 2), (2, 3), (3, 6), (3, 3), (3, 7)}
    # 40% of each user's train pairs, rounded: 2 of 4, 1 of 3, 1 of 3
    assert va[va.label == 1].groupby("user_id").size().to_dict() == {1: 2, 2: 1, 3: 1}
    assert set(zip(te.user_id[te.label == 1], te.movie_id[te.label == 1], strict=True)) == {(1, 6), (2, 5)}
    for t in (tr, va, te):
        assert (t.label == 0).sum() == (t.label == 1).sum()
        for u, m in zip(t.user_id[t.label == 0], t.movie_id[t.label == 0], strict=True):
            assert (u, m) not in rated and m != 4  # movie 4 was rated by nobody
    row = te[(te.label == 1) & (te.user_id == 2)].iloc[0]
    # vocabulary ids 1..n of sorted values: gender M -> 2, age 56 -> 3 ('1' < '25' < '56'), Drama first
    assert (row.gender, row.age, row.movie_id) == (2, 3, 5)
    genres = sorted({"Animation", "Adventure", "Action", "Drama", "Comedy"})
    assert row.genre == genres.index("Drama") + 1


def test_carve_valid_is_a_per_user_share():
    rng = np.random.default_rng(0)
    user = np.repeat(np.arange(50), 20)
    mask = carve_valid(user, 0.1, rng)
    assert np.bincount(user[mask]).tolist() == [2] * 50
    assert not carve_valid(np.array([5]), 0.5, rng).any()  # a one-pair user keeps it for training


def test_unknown_movie_is_an_error(tmp_path):
    write_small(tmp_path / "src")
    (tmp_path / "src" / "test.txt").write_text("0 99\n")
    with pytest.raises(ValueError, match="movie id"):
        convert_ml1m(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(
    not all((ML1M / f).exists() for f in ("train.txt", "test.txt", "users.dat", "movies.dat")),
    reason=f"ML-1M files not found in {ML1M} (GroupLens terms: not shipped; see docs/real-data.md)",
)
def test_real_ml1m_counts(tmp_path):
    s = convert_ml1m(ML1M, tmp_path / "ml1m")
    pos = s.extra["positives"]
    assert pos["train"] + pos["valid"] == 800_167 and pos["test"] == 200_042
    assert 0.09 < pos["valid"] / 800_167 < 0.11
    assert s.rows == {k: 2 * v for k, v in pos.items()}
    card = {c.name: c.cardinality for c in s.categorical}
    assert card["user_id"] == 6040 and card["movie_id"] == 3883 and card["gender"] == 2 and card["age"] == 7
