"""The maps on real MRI: exact input geometry (NIfTI, a sagittal DICOM series and an oblique NIfTI; NIfTI and
NRRD out), similarity equal to the cosine of the features interpolated between slices and highest around the
seed, deterministic PCA colours whose signs follow the rule, and cluster labels on the head only."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from maps_helpers import DICOM_ORIENTATION, small_features, small_session, stored_geometry, write_small_inputs

from BrainDINOLib import BrainDINOError, read_volume, write_volume
from BrainDINOLib.maps import SimilarityIndex, attention_map, cluster_map, pca_map, similarity_map
from BrainDINOLib.volume import ras_to_lps

LEFT_PUTAMEN_RAS = (-24.0, 4.0, 2.0)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_small_inputs(tmp_path_factory.mktemp("maps_inputs"))


@pytest.fixture(scope="module")
def cases(inputs, fixture_encoder):
    """(volume, features) of the 2-mm sample stored as NIfTI, as a sagittal DICOM series and oblique."""
    return {kind: small_features(path, fixture_encoder) for kind, path in inputs.items()}


def assert_same_geometry(written, reference) -> None:
    size, spacing, origin, direction = stored_geometry(written)
    ref_size, ref_spacing, ref_origin, ref_direction = reference
    assert size == ref_size
    np.testing.assert_allclose(spacing, ref_spacing, rtol=0, atol=1e-5)
    np.testing.assert_allclose(origin, ref_origin, rtol=0, atol=1e-4)
    np.testing.assert_allclose(direction, ref_direction, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["nifti", "dicom", "oblique"])
def test_every_map_has_the_input_geometry(kind, inputs, cases, fixture_encoder, tmp_path):
    volume, features = cases[kind]
    if kind == "dicom":
        assert volume.stored.orientation == DICOM_ORIENTATION  # really stored as sagittal slices
    if kind == "oblique":
        assert not np.allclose(np.abs(volume.stored.direction), np.round(np.abs(volume.stored.direction)))
    pca = pca_map(features, components=4)
    maps = {
        "pca_rgb": pca.rgb,
        "pca_components": pca.components,
        "similarity": similarity_map(features, ras_to_lps(LEFT_PUTAMEN_RAS)),
        "clusters": cluster_map(features, k=4),
        "attention": attention_map(small_session(fixture_encoder), volume).heads,
    }
    reference = stored_geometry(inputs[kind])
    for name, result in maps.items():
        assert result.shape == volume.shape, name
        for suffix in (".nii.gz", ".nrrd"):
            assert_same_geometry(write_volume(result, tmp_path / f"{name}{suffix}"), reference)
    assert maps["pca_rgb"].array.shape[-1] == 3 and maps["attention"].array.shape[-1] == 4
    # The values land back on the same voxels: reading a written map gives the canonical array again.
    np.testing.assert_array_equal(read_volume(tmp_path / "clusters.nrrd").array, maps["clusters"].array)


def test_the_same_anatomy_gives_the_same_maps_whatever_the_storage(cases):
    (_, nifti), (_, dicom) = cases["nifti"], cases["dicom"]
    point = ras_to_lps(LEFT_PUTAMEN_RAS)
    # DICOM stores int16, the NIfTI uint8 of the same values: the canonical volumes and maps agree.
    np.testing.assert_allclose(similarity_map(dicom, point).array, similarity_map(nifti, point).array, atol=1e-2)


# ---- similarity --------------------------------------------------------------------------------------------

def test_similarity_peaks_around_the_seed(cases):
    volume, features = cases["nifti"]
    index = SimilarityIndex(features)
    centre = np.array(volume.shape) // 2
    for offset in ([0, 0, 0], [5, -10, 8], [-12, 6, -15]):
        kji = centre + offset
        similarity = index.map(volume.geometry.index_to_lps(kji[None])[0]).array
        assert similarity.dtype == np.float32 and -1.0 <= similarity.min() and similarity.max() <= 1.0
        k, j, i = kji
        near = similarity[k - 2:k + 3, j - 2:j + 3, i - 2:i + 3]  # within 4 mm of the seed
        head = similarity[features.foreground]
        # Measured with the random-weight fixture model and 16-mm patches: near the seed the map exceeds the
        # head's 99th percentile, and at most 1 % of the head is more similar.
        assert near.max() > np.percentile(head, 99)
        assert (head > near.max()).mean() < 0.02  # a peak, not a flat map


def test_similarity_is_the_cosine_of_the_features_between_slices(cases):
    """Direct check on the grid cells of voxel slices between embedded ones: interpolate the tokens
    explicitly, take cosines; the voxel map is those cells upsampled."""
    volume, features = cases["nifti"]
    index = SimilarityIndex(features)
    query = index.query(volume.geometry.index_to_lps(np.array([[46, 50, 40]]))[0])
    assert float(query.norm()) == pytest.approx(1.0, abs=1e-6)
    embedded = features.slices.slice_indices
    between = [embedded[1], embedded[1] + 1, (embedded[1] + embedded[2]) // 2, embedded[2] - 1]
    cells = index.cosine_cells(query, between)
    expected = torch.nn.functional.cosine_similarity(features.tokens_at(between), query[None, None, None], dim=-1)
    torch.testing.assert_close(cells[:, 0], expected, atol=1e-5, rtol=1e-5)
    voxels = features.mapping.upsampler()(cells, between)
    similarity = index.map_query(query).array
    _, _, volume_rows, volume_cols = features.slices.window()
    np.testing.assert_allclose(similarity[between][:, volume_rows, volume_cols], voxels[:, 0].numpy(), atol=1e-6)


def test_similarity_to_another_volume_and_bad_points(cases):
    volume, features = cases["nifti"]
    point = ras_to_lps(LEFT_PUTAMEN_RAS)
    same = similarity_map(features, point, target=features).array
    np.testing.assert_allclose(same, similarity_map(features, point).array, atol=1e-6)
    _, dicom_features = cases["dicom"]
    other = similarity_map(features, point, target=dicom_features)
    assert other.shape == dicom_features.slices.volume_shape and -1.0 <= other.array.min() <= other.array.max() <= 1.0
    with pytest.raises(BrainDINOError, match="outside the volume"):
        similarity_map(features, (500.0, 0.0, 0.0))
    with pytest.raises(BrainDINOError, match="not a finite point"):
        similarity_map(features, (float("nan"), 0.0, 0.0))
    with pytest.raises(BrainDINOError, match="do not compare"):
        similarity_map(features, point, target=dataclasses.replace(dicom_features, model_id="another-model"))


# ---- PCA ---------------------------------------------------------------------------------------------------

def test_pca_is_deterministic_and_its_signs_follow_the_rule(cases):
    _, features = cases["nifti"]
    first, second = pca_map(features), pca_map(features)
    assert first.rgb.array.dtype == np.uint8 and first.rgb.array.shape == (*features.slices.volume_shape, 3)
    np.testing.assert_array_equal(first.rgb.array, second.rgb.array)
    np.testing.assert_array_equal(first.components.array, second.components.array)
    # Negating every token flips each principal direction; the sign rule flips them back: same colours.
    negated = pca_map(dataclasses.replace(features, patches=-features.patches))
    assert np.abs(negated.rgb.array.astype(int) - first.rgb.array.astype(int)).max() <= 1
    assert not first.rgb.array[~features.foreground].any()  # background removed
    assert first.rgb.array[features.foreground].any(axis=-1).mean() > 0.9
    ratios = first.explained_variance_ratio
    assert ratios.shape == (3,) and np.all(np.diff(ratios) <= 0) and 0 < ratios.sum() <= 1


# ---- clusters ----------------------------------------------------------------------------------------------

def test_clusters_cover_the_foreground_only(cases):
    _, features = cases["nifti"]
    labels = cluster_map(features, k=5).array
    assert labels.dtype == np.uint8
    assert not labels[~features.foreground].any()
    covered = np.zeros_like(features.foreground)
    covered[list(features.covered)] = True
    assert (labels[features.foreground & covered] > 0).all()
    assert set(np.unique(labels)) == set(range(6))
    np.testing.assert_array_equal(labels, cluster_map(features, k=5).array)
