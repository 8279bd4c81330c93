"""Acceptance: every reference fixture in ../shared/fixtures is reproduced from its checkpoint alone, to 1e-3.

dinov3_teacher/ comes from the BrainDINO DINOv3 implementation; dinov2_vits14/, dinov2_vits14_reg/ and
dinov3_vits16plus/ from Meta's own model code (see each folder's README and make_fixture.py). Compared: the CLS
token, the register/storage tokens, the final-normed patch tokens and blocks 0 and 2 after the final norm.
"""
from dataclasses import replace
from functools import lru_cache

import pytest
import torch

from BrainDINOLib import load_encoder
from BrainDINOLib.architecture import BICUBIC_ANTIALIAS
from BrainDINOLib.checkpoints import load_backbone
from BrainDINOLib.encoder import Encoder
from conftest import FIXTURES, reference_checkpoints

CHECKPOINTS = reference_checkpoints()
FOLDERS = sorted(CHECKPOINTS)
INPUTS = ("square", "wide")
TOLERANCE = 1e-3
# What each checkpoint must be read as: family, register/storage tokens, FFN, LayerNorm eps, position resizing.
ARCHITECTURES = {
    "dinov3_teacher": ("dinov3", 4, "mlp", 1e-6, "rope"),
    "dinov2_vits14": ("dinov2", 0, "mlp", 1e-6, "bicubic-offset"),
    "dinov2_vits14_reg": ("dinov2", 4, "mlp", 1e-6, "bicubic-antialias"),
    "dinov3_vits16plus": ("dinov3", 4, "swiglu", 1e-5, "rope"),
}


@lru_cache(maxsize=None)
def _encoder(folder: str) -> Encoder:
    return load_encoder(CHECKPOINTS[folder], device="cpu", precision="fp32")


def _reference(folder: str, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fixture's input and its expected outputs, all patch tensors as [B, h, w, D].

    dinov3_teacher/ stores patches as [B, h*w, D] and layers as [B, D, h, w]; the others store [B, h, w, D]."""
    images = torch.load(FIXTURES / folder / "inputs.pt", weights_only=True)[name]
    expected = dict(torch.load(FIXTURES / folder / "expected.pt", weights_only=True)[name])
    batch, dim = expected["x_norm_clstoken"].shape
    patch = _encoder(folder).patch_size
    grid = (batch, images.shape[2] // patch, images.shape[3] // patch, dim)
    out = {"cls": expected["x_norm_clstoken"], "patches": expected["x_norm_patchtokens"].reshape(grid)}
    for index in (0, 2):
        if f"layer{index}_patch_bdhw" in expected:
            out[f"layer{index}"] = expected[f"layer{index}_patch_bdhw"].permute(0, 2, 3, 1)
        else:
            out[f"layer{index}"] = expected[f"layer{index}_patch_bhwd"]
    registers = expected.get("x_storage_tokens", expected.get("x_norm_regtokens"))
    out["registers"] = registers if registers is not None else torch.empty(batch, 0, dim)
    return images, out


def _worst_errors(encoder: Encoder, images: torch.Tensor, expected: dict[str, torch.Tensor]) -> dict[str, float]:
    tokens = encoder.tokens(images, layers=[0, 2])
    got = {"cls": tokens.cls, "registers": tokens.registers, "patches": tokens.patches,
           "layer0": tokens.layers[0], "layer2": tokens.layers[2]}
    assert {k: v.shape for k, v in got.items()} == {k: expected[k].shape for k in got}
    return {key: (got[key] - expected[key]).abs().max().item() if got[key].numel() else 0.0 for key in got}


def test_every_fixture_folder_is_covered():
    assert set(FOLDERS) == set(ARCHITECTURES), "a new fixture folder needs its expected architecture here"


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("name", INPUTS)
def test_checkpoint_reproduces_the_reference_outputs(folder, name):
    images, expected = _reference(folder, name)
    worst = _worst_errors(_encoder(folder), images, expected)
    assert max(worst.values()) < TOLERANCE, worst


@pytest.mark.parametrize("folder", FOLDERS)
def test_architecture_is_read_from_the_tensors(folder):
    arch = _encoder(folder).architecture
    assert (arch.family, arch.num_register_tokens, arch.ffn, arch.norm_eps, arch.pos_embed_resize) \
        == ARCHITECTURES[folder]
    assert (arch.embed_dim, arch.depth, arch.head_dim) == ((256, 3, 64) if folder == "dinov3_teacher" else (128, 3, 64))
    if folder == "dinov3_teacher":
        assert (arch.qkv_bias, arch.rope_base, _encoder(folder).checkpoint.kind) == (False, 100.0, "braindino-teacher")
    if folder == "dinov3_vits16plus":  # SwiGLU ratio 6: int(2/3 * 6 * 128) aligned to 8
        assert (arch.ffn_hidden_dim, arch.qkv_bias, arch.rope_base) == (512, True, 100.0)


def test_timm_resizing_misses_meta_dinov2_without_registers():
    """The convention matters: resizing the no-register model's grid as timm does is far outside the tolerance."""
    checkpoint = _encoder("dinov2_vits14").checkpoint
    timm_way = replace(checkpoint, architecture=replace(checkpoint.architecture, pos_embed_resize=BICUBIC_ANTIALIAS))
    images, expected = _reference("dinov2_vits14", "wide")
    worst = _worst_errors(Encoder(load_backbone(timm_way), timm_way, torch.device("cpu"), "fp32"), images, expected)
    assert worst["patches"] > 0.1, worst
