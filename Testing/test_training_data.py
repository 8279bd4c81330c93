"""Slice shards from real MRI, the YAML config, the per-step batches (multi-crop views and iBOT masks), and
bad input to the pretraining commands and scripts."""
from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from training_helpers import (MICRO_CONFIG, REPO, environment, micro_shards, single_thread,  # noqa: F401
                              two_mm_brain)

from BrainDINOLib import BrainDINOError, SliceStack, load_encoder, read_volume
from BrainDINOLib.resolution import ResolutionPolicy
from BrainDINOLib.training import SliceShards, load_config, prepare_slices
from BrainDINOLib.training.augment import adjust_gamma, gaussian_blur, hashed_normal, scale_contrast
from BrainDINOLib.training.batches import StepBatches, StepSlices
from BrainDINOLib.training.config import SyntheticConfig
from BrainDINOLib.training.synthbrain import SyntheticBrains


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return SliceShards(micro_shards(tmp_path_factory))


def test_shards_hold_the_engines_own_model_input(shards, tmp_path_factory):
    stack = SliceStack.from_volume(read_volume(two_mm_brain(tmp_path_factory)), 16,
                                   policy=ResolutionPolicy(image_size=64, upsampling="bilinear"))
    assert len(shards) == len(stack) > 50
    assert shards.image_size == 64 and len(shards.index["shards"]) == -(-len(stack) // 32)
    for i in (0, 40, len(stack) - 1):
        assert shards[i].shape == (1, 64, 64) and shards[i].dtype == torch.float32
        np.testing.assert_allclose(shards[i].numpy(), stack.images[i].numpy(), atol=0.01, rtol=0.002)


def test_prepare_slices_skips_unreadable_volumes_by_name(tmp_path, tmp_path_factory, caplog):
    broken = tmp_path / "inputs" / "broken.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"not a nifti file")
    listing = tmp_path / "inputs" / "list.csv"
    listing.write_text(f"path\nbroken.nii.gz\n{two_mm_brain(tmp_path_factory)}\n")
    with caplog.at_level(logging.WARNING):
        summary = prepare_slices([listing], tmp_path / "out", image_size=32)
    assert summary.volumes == 1 and summary.skipped == [str(broken)]
    assert summary.slices == len(SliceShards(tmp_path / "out")) and summary.bytes > summary.slices * 32 * 32 * 2
    assert str(broken) in caplog.text
    assert broken.read_bytes() == b"not a nifti file"  # inputs are only read
    with pytest.raises(BrainDINOError, match="none of the 1 input volume"):
        prepare_slices([broken], tmp_path / "out2")


def test_config_reads_yaml_applies_overrides_and_names_unknown_keys(tmp_path):
    config = load_config(MICRO_CONFIG, ["optim.steps=17", "crops.global_scale=[0.5, 1.0]"])
    assert config.model.embed_dim == 64 and config.optim.steps == 17 and config.crops.global_scale == (0.5, 1.0)
    assert load_config(None).model.family == "dinov3"
    with pytest.raises(BrainDINOError, match=r"unknown key\(s\) in config.optim: stepz"):
        load_config(MICRO_CONFIG, ["optim.stepz=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(BrainDINOError, match="bad.yaml"):
        load_config(bad)


def test_step_batches_are_a_pure_function_of_seed_step_and_rank(shards):
    config = load_config(MICRO_CONFIG)
    make = lambda rank: StepBatches(shards, config.crops, config.loss, 4, 16, 1, seed=5, rank=rank, world_size=2)
    first, again, other_rank = make(0)[3], make(0)[3], make(1)[3]
    assert first.global_crops.shape == (8, 1, 64, 64) and first.local_crops.shape == (8, 1, 32, 32)
    assert first.masks.shape == (8, 16) and int(first.masks.any(dim=1).sum()) == 4
    for name in ("global_crops", "local_crops", "masks", "indices"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not set(first.indices.tolist()) & set(other_rank.indices.tolist())  # ranks split the epoch
    assert not torch.equal(first.global_crops[:4], first.global_crops[4:])  # two different views
    # The crops are slices, not noise: each view keeps both background and brain.
    assert float(first.global_crops.amax()) > 1.0 and float(first.global_crops.amin()) < -0.5


DEVICES = ["cpu"] + [name for name, available in (("cuda", torch.cuda.is_available()),
                                                   ("mps", torch.backends.mps.is_available())) if available]


@pytest.mark.parametrize("device", DEVICES)
def test_crops_rendered_on_the_training_device_equal_the_loaders(shards, device):
    """The device path (the loader hands over slices + parameters, the trainer renders) gives the CPU path's
    crops (rendered in the loader) up to float rounding, with every augmentation switched on; on this machine
    the device is the CPU, on a GPU machine the same test runs on CUDA too."""
    config = load_config(MICRO_CONFIG)
    crops = replace(config.crops, gamma_probability=1.0, bias_field_probability=1.0, contrast_probability=1.0,
                    blur_probability=1.0, noise_probability=1.0)
    make = lambda in_loader: StepBatches(shards, crops, config.loss, 4, 16, 1, seed=1, render_in_loader=in_loader)
    loaded, reference = make(False)[2], make(True)[2]
    assert isinstance(loaded, StepSlices) and loaded.slices.shape == (4, 1, 64, 64)
    rendered = make(False).render(loaded.to(device))
    torch.testing.assert_close(rendered.global_crops.cpu(), reference.global_crops, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rendered.local_crops.cpu(), reference.local_crops, atol=1e-4, rtol=1e-4)
    assert torch.equal(rendered.masks.cpu(), reference.masks)


def test_batched_augmentations_match_their_reference_definitions():
    """Each batched op against the per-crop transform it replaces: gamma and contrast as MONAI defines them,
    blur as scipy's Gaussian filter (edges replicated), noise standard normal and a pure function of its key."""
    from monai.transforms import AdjustContrast, ScaleIntensityFixedMean
    from scipy import ndimage

    crops = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 4
    gamma, factor, sigma = torch.tensor([0.7, 1.0, 1.5]), torch.tensor([0.8, 1.0, 1.2]), torch.tensor([0.3, 0.6, 1.0])
    gammas, scaled, blurred = adjust_gamma(crops, gamma), scale_contrast(crops, factor), gaussian_blur(crops, sigma, 3)
    for i in range(3):
        torch.testing.assert_close(gammas[i], torch.as_tensor(AdjustContrast(float(gamma[i]))(crops[i])), atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(scaled[i], torch.as_tensor(ScaleIntensityFixedMean(float(factor[i]) - 1)(crops[i])),
                                   atol=1e-5, rtol=1e-5)
        expected = ndimage.gaussian_filter(crops[i, 0].numpy(), float(sigma[i]), mode="nearest",
                                           truncate=3 / float(sigma[i]))
        np.testing.assert_allclose(blurred[i, 0].numpy(), expected, atol=1e-5)
    noise = hashed_normal(torch.tensor([7, 8, 2**61 + 5]), 128)
    assert torch.equal(noise, hashed_normal(torch.tensor([7, 8, 2**61 + 5]), 128))
    assert abs(float(noise.mean())) < 0.02 and abs(float(noise.std()) - 1) < 0.02
    assert abs(float(torch.corrcoef(noise.flatten(1))[0, 1])) < 0.02  # different keys, independent noise
    assert float((noise.abs() > 3).float().mean()) == pytest.approx(0.0027, abs=0.001)  # normal tails


def test_mixed_sources_fill_each_step_by_weight_from_seed_step_and_rank(shards):
    config = load_config(MICRO_CONFIG)
    synthetic = SyntheticBrains(SyntheticConfig(spacing_mm=2.0), shards.image_size)
    make = lambda: StepBatches(shards, config.crops, config.loss, 4, 16, 1, seed=5, synthetic=synthetic,
                               synthetic_slices=2)
    first, again = make()[1], make()[1]
    assert first.indices[2:].tolist() == [-1, -1] and (first.indices[:2] >= 0).all()
    assert torch.equal(first.global_crops, again.global_crops) and torch.equal(first.local_crops, again.local_crops)
    assert not torch.equal(make()[2].global_crops, first.global_crops)


def test_a_synthetic_only_run_needs_no_shards(tmp_path):
    from BrainDINOLib.training import pretrain

    config = load_config(MICRO_CONFIG, ["data.shards_weight=0", "data.synthetic_weight=1", "synthetic.spacing_mm=2",
                                        "synthetic.image_size=64", "optim.steps=1", f"run.output_dir={tmp_path}"])
    result = pretrain(config, device="cpu")
    card = load_encoder(result.exported["safetensors"], device="cpu").card
    assert card.provenance["slice_size"] == 64 and card.provenance["synthetic_slices_per_step"] == 4
    assert card.provenance["slices"] == 0 and not (tmp_path / "shards").exists()


def test_cli_prepares_slices_and_names_bad_pretraining_input(tmp_path, tmp_path_factory, capsys):
    from BrainDINOLib.cli import main

    assert main(["prepare-slices", str(two_mm_brain(tmp_path_factory)), "--output", str(tmp_path / "s"),
                 "--image-size", "32"]) == 0
    assert "1 volumes" in capsys.readouterr().out and (tmp_path / "s" / "index.json").exists()
    assert main(["pretrain", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(MICRO_CONFIG), "--set", f"data.shards={tmp_path}"]) == 2
    assert "not a slice-shard folder" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(MICRO_CONFIG), "--set", "data.shards_weight=0"]) == 2
    assert "not both 0" in capsys.readouterr().err


@pytest.mark.parametrize("script, arguments", [
    ("export_model.py", ["missing/checkpoint.pth", "out", "--name", "x"]),
    ("probe_tissue.py", ["--model", "missing/checkpoint.pth"]),
])
def test_training_scripts_name_bad_input_in_one_line(tmp_path, script, arguments):
    result = subprocess.run([sys.executable, str(REPO / "Training" / script), *arguments], cwd=tmp_path,
                            env=environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "missing/checkpoint.pth" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


