"""SliceStack, embed_volume, VolumeFeatures and the feature cache on the real sample volume."""
import numpy as np
import pytest
import torch

from BrainDINOLib import (BrainDINOError, CancelledError, FeatureCache, PreprocessConfig, SliceStack, Volume,
                          VolumeFeatures, embed_volume, read_volume)
from conftest import SAMPLE_T1
from volume_factories import downsampled

SMALL = PreprocessConfig(image_size=112)


@pytest.fixture(scope="module")
def small_volume(tmp_path_factory):
    import SimpleITK as sitk
    path = tmp_path_factory.mktemp("small") / "colin_2mm.nii.gz"
    sitk.WriteImage(downsampled(SAMPLE_T1, 2.0), str(path))
    return read_volume(path)


@pytest.fixture(scope="module")
def small_features(small_volume, fixture_encoder):
    return embed_volume(small_volume, fixture_encoder, SMALL, layers=[0, 2], batch_size=16)


def test_slice_stack_normalises_crops_and_skips_empty_slices(sample_volume):
    stack = SliceStack.from_volume(sample_volume, patch_size=16)
    geometry = stack.geometry
    assert stack.images.shape == (len(geometry.slice_indices), 1, 224, 224)
    assert geometry.grid == (14, 14)
    # Slices with (almost) no head, above the vertex, are skipped; the kept ones are contiguous.
    area = stack.foreground.sum(axis=(1, 2))
    skipped = sorted(set(range(sample_volume.shape[0])) - set(geometry.slice_indices))
    assert skipped and skipped[0] > geometry.slice_indices[-1]
    assert (area[skipped] < 0.05 * area.max()).all() and (area[list(geometry.slice_indices)] >= 0.05 * area.max()).all()
    assert list(geometry.slice_indices) == list(range(geometry.slice_indices[0], geometry.slice_indices[-1] + 1))
    # The square box holds all the foreground of the kept slices.
    row0, col0, rows, cols = geometry.box
    kept = stack.foreground[list(geometry.slice_indices)]
    assert rows == cols and kept[:, max(row0, 0):row0 + rows, max(col0, 0):col0 + cols].sum() == kept.sum()
    # z-scored inside the foreground (before the resize): mean ~ 0, std ~ 1.
    from BrainDINOLib.slices import normalise_intensity
    normalised = normalise_intensity(sample_volume.array, stack.foreground, (0.5, 99.5))
    assert abs(normalised[stack.foreground].mean()) < 1e-4
    assert abs(normalised[stack.foreground].std() - 1) < 1e-3


def test_upsample_maps_patches_to_the_voxels_they_cover(sample_volume):
    stack = SliceStack.from_volume(sample_volume, patch_size=16)
    geometry = stack.geometry
    rows_grid, cols_grid = geometry.grid
    # A per-patch map whose value is the patch row: after upsampling, voxel row j holds the (continuous)
    # patch row of its position in the box.
    per_patch = np.broadcast_to(np.arange(rows_grid, dtype=np.float32)[None, :, None],
                                (len(geometry.slice_indices), rows_grid, cols_grid))
    up = geometry.upsample(per_patch)
    row0, col0, box_rows, _ = geometry.box
    k = geometry.slice_indices[len(geometry.slice_indices) // 2]
    for j in range(max(row0, 0) + 20, min(row0 + box_rows, sample_volume.shape[1]) - 20, 17):
        expected = (j - row0 + 0.5) * rows_grid / box_rows - 0.5
        assert up[k, j, 100] == pytest.approx(expected, abs=1e-4)
    skipped = sorted(set(range(sample_volume.shape[0])) - set(geometry.slice_indices))
    assert (up[skipped] == 0).all()


def test_embed_volume_matches_the_encoder_slice_by_slice(small_volume, small_features, fixture_encoder):
    features = small_features
    stack = SliceStack.from_volume(small_volume, 16, SMALL)
    assert features.patches.shape == (len(stack), 7, 7, 256) and features.patches.dtype == torch.float16
    assert features.cls.shape == (len(stack), 256)
    assert set(features.layers) == {0, 2}
    one = fixture_encoder.tokens(stack.batch(5, 6, 3), layers=[0])
    torch.testing.assert_close(features.patches[5].float(), one.patches[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(features.layers[0][5].float(), one.layers[0][0], atol=2e-2, rtol=1e-2)
    # Batch size does not change the result.
    again = embed_volume(small_volume, fixture_encoder, SMALL, batch_size=5)
    assert torch.equal(again.cls, features.cls)


def test_features_save_load_and_map_back(tmp_path, small_volume, small_features):
    path = small_features.save(tmp_path / "features.safetensors")
    loaded = VolumeFeatures.load(path)
    assert torch.equal(loaded.patches, small_features.patches)
    assert torch.equal(loaded.layers[2], small_features.layers[2])
    assert loaded.slices == small_features.slices and loaded.model_id == small_features.model_id
    assert loaded.geometry == small_volume.geometry and loaded.stored == small_volume.stored
    np.testing.assert_array_equal(loaded.foreground, small_features.foreground)
    inside = loaded.patch_foreground()
    mapped = loaded.to_volume(inside)
    assert isinstance(mapped, Volume) and mapped.shape == small_volume.shape
    assert mapped.geometry == small_volume.geometry
    # Patch-level foreground, upsampled, agrees with the voxel mask (16 mm patches vs 2 mm voxels).
    agreement = ((mapped.array > 0.5) == loaded.foreground).mean()
    assert agreement > 0.8  # measured 0.82 at 7x7 patches of ~30 mm


def test_cache_hit_costs_one_read(tmp_path, small_volume, fixture_encoder, small_features):
    cache = FeatureCache(tmp_path / "cache")
    first = embed_volume(small_volume, fixture_encoder, SMALL, layers=[0, 2], cache=cache)
    entries = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 1
    # A cancel flag that is always set proves no slice is embedded on the second call.
    second = embed_volume(small_volume, fixture_encoder, SMALL, layers=[0, 2], cache=cache, cancel=lambda: True)
    assert torch.equal(second.patches, first.patches)
    # Other preprocessing or other layers are other entries.
    embed_volume(small_volume, fixture_encoder, SMALL, layers=[2], cache=cache)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    # A damaged entry is a miss, recomputed and replaced.
    entries[0].write_bytes(b"damaged")
    third = embed_volume(small_volume, fixture_encoder, SMALL, layers=[0, 2], cache=cache)
    assert torch.equal(third.patches, first.patches)


def test_progress_and_cancel(small_volume, fixture_encoder):
    seen = []
    features = embed_volume(small_volume, fixture_encoder, SMALL, batch_size=20,
                            progress=lambda done, total: seen.append((done, total)))
    total = features.num_slices
    assert seen == [(min(total, s), total) for s in range(20, total + 20, 20)]
    calls = []

    def cancel_after_two_batches() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        embed_volume(small_volume, fixture_encoder, SMALL, batch_size=20, cancel=cancel_after_two_batches)


def test_volume_without_a_head_is_refused(fixture_encoder, small_volume):
    speck = np.zeros(small_volume.shape, np.float32)
    speck[40, 50, 45] = 1000.0
    with pytest.raises(BrainDINOError, match="no usable foreground: only 1 voxels"):
        embed_volume(small_volume.with_array(speck), fixture_encoder, SMALL)
