"""Last-block attention recomputed from the block's own modules: it must reproduce the block's output."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SAMPLE_T1
from volume_factories import downsampled

from BrainDINOLib import Architecture, CancelledError, Volume
from BrainDINOLib.maps import attention_map, last_block_attention
from BrainDINOLib.resolution import ResolutionPolicy
from BrainDINOLib.session import FeatureSession


def attention_output(block, weights, values):
    """What the block's attention module returns, from explicit weights: (weights @ v) -> norm -> proj."""
    batch, _, tokens, _ = weights.shape
    mixed = (weights @ values).transpose(1, 2).reshape(batch, tokens, -1)
    return block.attn.proj(block.attn.norm(mixed))


def tiny_dinov2():
    model = Architecture(family="dinov2", embed_dim=64, depth=2, num_heads=2, patch_size=16,
                         pos_embed_grid=4).build().eval()
    return SimpleNamespace(model=model, device=torch.device("cpu"))


@pytest.mark.parametrize("family", ["dinov3", "dinov2"])
def test_explicit_attention_reproduces_the_blocks_output(family, fixture_encoder):
    encoder = fixture_encoder if family == "dinov3" else tiny_dinov2()
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))  # non-square: RoPE per axis
    result = last_block_attention(encoder, images)
    block = encoder.model.blocks[-1]
    tokens = encoder.model.num_prefix_tokens + 4 * 6
    assert result.weights.shape == (2, block.attn.num_heads, tokens, tokens)
    torch.testing.assert_close(result.weights.sum(-1), torch.ones(2, block.attn.num_heads, tokens))
    with torch.inference_mode():
        if family == "dinov3":
            assert result.rope is not None
            reference = block.attn(block.norm1(result.inputs), rope=result.rope)
        else:
            reference = block.attn(block.norm1(result.inputs))
        mine = attention_output(block, result.weights, result.values)
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def volume_4mm():
    return Volume.from_image(sitk.Cast(downsampled(SAMPLE_T1, 4.0), sitk.sitkFloat32), source="colin27_4mm")


def test_attention_map_shapes_progress_and_cancel(volume_4mm, fixture_encoder):
    calls = []
    session = FeatureSession.for_encoder(fixture_encoder, ResolutionPolicy(patch_mm=16.0), batch_size=4)
    result = attention_map(session, volume_4mm, progress=lambda done, total: calls.append((done, total)))
    heads = fixture_encoder.architecture.num_heads
    assert result.mean.shape == volume_4mm.shape and result.heads.array.shape == (*volume_4mm.shape, heads)
    np.testing.assert_allclose(result.mean.array, result.heads.array.mean(-1), atol=1e-6)
    # Probabilities: a share of the CLS token's attention, the rest going to CLS and register tokens.
    assert result.heads.array.min() >= 0 and result.heads.array.max() < 1
    assert calls[-1][0] == calls[-1][1] and len(calls) > 1
    with pytest.raises(CancelledError):
        attention_map(session, volume_4mm, cancel=lambda: True)


def test_shift_ensemble_attention_interleaves_the_windows(volume_4mm, fixture_encoder):
    """With 2 x 2 shifts the grid is twice as fine, and cell (2r + a, 2c + b) is window (a, b)'s patch (r, c)."""
    session = FeatureSession.for_encoder(fixture_encoder, ResolutionPolicy(patch_mm=16.0, shifts=2))
    plain = FeatureSession.for_encoder(fixture_encoder, ResolutionPolicy(patch_mm=16.0))
    stack, plain_stack = session.slice_stack(volume_4mm), plain.slice_stack(volume_4mm)
    assert stack.geometry.grid == tuple(2 * side for side in plain_stack.geometry.grid)
    windows = stack.batch(3, 4, 3)
    assert windows.shape == (4, 3, *plain_stack.images.shape[-2:])
    # Window (0, 0) is the unshifted input.
    torch.testing.assert_close(windows[0], plain_stack.batch(3, 4, 3)[0])
    tokens = fixture_encoder.tokens(windows).patches  # [4, h, w, D]
    grid = stack.interleave(tokens)[0]
    for a in range(2):
        for b in range(2):
            torch.testing.assert_close(grid[a::2, b::2], tokens[2 * a + b])
