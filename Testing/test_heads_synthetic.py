"""The case generator: reproducible per case, distinct between cases, targets computed from the content."""
from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest

from BrainDINOLib import BrainDINOError
from BrainDINOLib.synthetic import CaseConfig, LOBES, generate_case, make_cases

COARSE = replace(CaseConfig(), spacing_mm=4.0)


def test_cases_are_reproducible_and_distinct():
    first, again = generate_case("lesion", 3, seed=5, config=COARSE), generate_case("lesion", 3, seed=5, config=COARSE)
    other = generate_case("lesion", 4, seed=5, config=COARSE)
    assert np.array_equal(first.images["FLAIR"].array, again.images["FLAIR"].array)
    assert not np.array_equal(first.images["FLAIR"].array, other.images["FLAIR"].array)
    labels = first.labels.array
    assert set(np.unique(labels)) == {0, 1, 2}  # oedema and core
    assert first.targets["lesion_ml"] == pytest.approx((labels > 0).sum() * 4.0 ** 3 / 1000, abs=1e-3)
    # the lesion is bright on FLAIR: its mean exceeds that of the rest of the brain
    image = first.images["FLAIR"].array
    assert image[labels == 1].mean() > image[(labels == 0) & (image > 100)].mean()


def test_tasks_have_their_targets():
    lobes = generate_case("lobes", 0, config=COARSE)
    assert set(np.unique(lobes.labels.array)) <= set(range(len(LOBES) + 1))
    multi = generate_case("survival", 0, config=COARSE, sequences=("T1", "FLAIR"))
    assert set(multi.images) == {"T1", "FLAIR"} and multi.targets["event"] in (0, 1) and multi.targets["time"] > 0
    t1, t2 = (generate_case("sequence", i, config=COARSE) for i in (0, 1))
    assert (t1.targets["sequence"], t2.targets["sequence"]) == ("T1", "T2")
    assert 0 <= generate_case("atrophy", 0, config=COARSE).targets["atrophy"] <= 0.8
    with pytest.raises(BrainDINOError, match="unknown case task"):
        generate_case("tumour", 0)


def test_make_cases_writes_disjoint_train_and_test_with_a_manifest(tmp_path):
    manifest = make_cases("tissue", tmp_path, 2, 1, seed=2, config=COARSE)
    rows = list(csv.DictReader(manifest.open()))
    assert [r["split"] for r in rows] == ["train", "train", "test"]
    assert len({r["case"] for r in rows}) == 3
    assert all((tmp_path / r["image"]).exists() and (tmp_path / r["label"]).exists() for r in rows)
    assert (tmp_path / "classes.txt").read_text().split("\n")[:4] == ["background", "CSF", "grey matter",
                                                                      "white matter"]
