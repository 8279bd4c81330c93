"""Continued pretraining (`model.init_from`) from every reference checkpoint (DINOv2 with and without registers,
DINOv3 ViT-S+ with SwiGLU, a BrainDINO teacher): the student starts as exactly the engine's encoder, a real run
trains it, and its exports read back as the trained teacher."""
from __future__ import annotations

import math

import pytest
import torch
from training_helpers import MICRO_CONFIG, micro_shards, single_thread  # noqa: F401

from BrainDINOLib import load_encoder
from BrainDINOLib.training import load_config, pretrain
from BrainDINOLib.training.model import backbone_tokens, build_network
from BrainDINOLib.training.trainer import CHECKPOINT_NAME
from conftest import reference_checkpoints

CHECKPOINTS = reference_checkpoints()


def _config(folder: str, *overrides: str):
    patch = load_encoder(CHECKPOINTS[folder], device="cpu", precision="fp32").patch_size
    return load_config(MICRO_CONFIG, [f"model.init_from={CHECKPOINTS[folder]}", f"crops.global_size={4 * patch}",
                                      f"crops.local_size={2 * patch}", *overrides])


@pytest.mark.parametrize("folder", sorted(CHECKPOINTS))
def test_the_student_starts_as_the_engines_encoder(folder):
    encoder = load_encoder(CHECKPOINTS[folder], device="cpu", precision="fp32")
    config = _config(folder)
    network = build_network(config.model, config.loss).eval()
    assert network.architecture == encoder.architecture
    images = torch.randn(2, 3, 5 * encoder.patch_size, 7 * encoder.patch_size)  # a grid the position table lacks
    with torch.no_grad():
        tokens = backbone_tokens(network.backbone, images)
    expected = encoder.tokens(images)
    torch.testing.assert_close(tokens[:, 0], expected.cls, rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens[:, network.prefix_tokens:], expected.patches.flatten(1, 2), rtol=0, atol=1e-6)
    mask_token = encoder.checkpoint.state_dict["mask_token"].reshape(1, -1)
    torch.testing.assert_close(network.mask_token.detach(), mask_token, rtol=0, atol=0)


@pytest.mark.parametrize("folder", sorted(CHECKPOINTS))
def test_a_continued_run_exports_what_it_trained(folder, tmp_path, tmp_path_factory):
    config = _config(folder, f"data.shards={micro_shards(tmp_path_factory)}", f"run.output_dir={tmp_path}",
                     "optim.steps=2")
    result = pretrain(config, device="cpu")
    assert math.isfinite(result.final_loss) and result.final_loss > 0
    teacher = build_network(config.model, config.loss).eval()
    teacher.load_state_dict(torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["teacher_network"])
    patch = teacher.architecture.patch_size
    images = torch.randn(2, 3, 6 * patch, 4 * patch)
    with torch.no_grad():
        expected = backbone_tokens(teacher.backbone, images)
    for kind, tolerance in (("teacher", 0.0), ("safetensors", 2e-2)):  # float32 / float16 files
        encoder = load_encoder(result.exported[kind], device="cpu", precision="fp32")
        assert encoder.architecture == teacher.architecture  # eps and position resizing included
        tokens = encoder.tokens(images)
        torch.testing.assert_close(tokens.cls, expected[:, 0], rtol=0, atol=tolerance)
        torch.testing.assert_close(tokens.patches.flatten(1, 2), expected[:, teacher.prefix_tokens:],
                                   rtol=0, atol=tolerance)
