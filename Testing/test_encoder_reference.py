"""Acceptance: the BrainDINO/DINOv3 teacher fixture is reproduced from the checkpoint alone."""
import pytest
import torch

from conftest import TEACHER_FIXTURE


@pytest.mark.parametrize("name", ["square", "wide"])
def test_teacher_checkpoint_reproduces_reference_outputs(fixture_encoder, name):
    images = torch.load(TEACHER_FIXTURE / "inputs.pt", weights_only=True)[name]
    expected = torch.load(TEACHER_FIXTURE / "expected.pt", weights_only=True)[name]
    tokens = fixture_encoder.tokens(images, layers=[0, 2])
    batch, dim = expected["x_norm_clstoken"].shape
    h, w = images.shape[2] // 16, images.shape[3] // 16

    assert tokens.patches.shape == (batch, h, w, dim)
    assert tokens.registers.shape == (batch, 4, dim)
    errors = {
        "x_norm_clstoken": tokens.cls - expected["x_norm_clstoken"],
        "x_storage_tokens": tokens.registers - expected["x_storage_tokens"],
        "x_norm_patchtokens": tokens.patches.reshape(batch, h * w, dim) - expected["x_norm_patchtokens"],
        "layer0": tokens.layers[0].permute(0, 3, 1, 2) - expected["layer0_patch_bdhw"],
        "layer2": tokens.layers[2].permute(0, 3, 1, 2) - expected["layer2_patch_bdhw"],
    }
    worst = {key: err.abs().max().item() for key, err in errors.items()}
    assert max(worst.values()) < 1e-3, worst


def test_architecture_is_read_from_the_tensors(fixture_encoder):
    arch = fixture_encoder.architecture
    assert (arch.family, arch.embed_dim, arch.depth, arch.num_heads, arch.patch_size,
            arch.num_register_tokens, arch.qkv_bias, arch.rope_base) == ("dinov3", 256, 3, 4, 16, 4, False, 100.0)
    assert fixture_encoder.checkpoint.kind == "braindino-teacher"
