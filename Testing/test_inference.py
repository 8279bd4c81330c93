"""Encoder precisions: what "auto" means per device, int8 tokens faithful to fp32 on real slices, the fp32 model
left as loaded, and the feature cache keeping precisions apart."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from BrainDINOLib import (BrainDINOError, FeatureCache, FeatureSession, ResolutionPolicy, SliceStack, Volume,
                          load_encoder)
from BrainDINOLib.inference import int8_kernels_available, resolve_precision
from BrainDINOLib.resolution import LEGACY
from conftest import SAMPLE_T1
from volume_factories import downsampled


needs_int8 = pytest.mark.skipif(not int8_kernels_available(), reason="int8 CPU kernels need an x86-64 CPU")


@pytest.fixture(scope="module")
def demo_encoders():
    return {name: load_encoder("demo", device="cpu", precision=name) for name in ("fp32", "int8")}


@pytest.fixture(scope="module")
def colin27_slices(sample_volume):
    stack = SliceStack.from_volume(sample_volume, patch_size=16, policy=LEGACY)  # 224 px, 14 x 14 patches
    picks = torch.linspace(0.2 * len(stack), 0.8 * len(stack), 6).long().tolist()
    return torch.cat([stack.batch(k, k + 1, 1) for k in picks])


def test_auto_precision_per_device():
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == ("int8" if int8_kernels_available() else "fp32")
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"


@pytest.mark.parametrize("precision, device, problem", [
    ("int8", "cuda", "int8: is not available on cuda; choose one of fp32, bf16"),
    ("fp16", "cpu", "fp16: is not a precision; choose one of auto, fp32, int8, bf16"),
])
def test_unavailable_precision_is_a_one_line_error(precision, device, problem):
    with pytest.raises(BrainDINOError) as error:
        resolve_precision(precision, torch.device(device))
    assert str(error.value) == problem


@needs_int8
def test_int8_tokens_are_faithful_to_fp32_on_real_slices(demo_encoders, colin27_slices):
    fp32, int8 = demo_encoders["fp32"], demo_encoders["int8"]
    layers = [0, 2, 3, 5]
    reference, tokens = fp32.tokens(colin27_slices, layers), int8.tokens(colin27_slices, layers)
    assert tokens.patches.shape == reference.patches.shape == (6, 14, 14, 192)
    assert tokens.patches.dtype == torch.float32
    for ours, theirs in [(tokens.patches, reference.patches), (tokens.cls, reference.cls),
                         *((tokens.layers[i], reference.layers[i]) for i in layers)]:
        cosine = F.cosine_similarity(ours, theirs, dim=-1)
        assert cosine.mean() > 0.999 and cosine.min() > 0.99
    assert not torch.equal(tokens.patches, reference.patches)  # really a different computation


@needs_int8
def test_int8_leaves_the_loaded_fp32_model_alone(demo_encoders):
    int8 = demo_encoders["int8"]
    assert isinstance(int8.runner.blocks[0].attn.qkv, torch.ao.nn.quantized.dynamic.Linear)
    assert type(int8.model.blocks[0].attn.qkv) is nn.Linear
    assert torch.equal(int8.model.state_dict()["blocks.0.attn.qkv.weight"],
                       demo_encoders["fp32"].model.state_dict()["blocks.0.attn.qkv.weight"])


def test_bf16_is_autocast_and_faithful_on_the_cpu(demo_encoders, colin27_slices):
    bf16 = load_encoder("demo", device="cpu", precision="bf16")
    tokens = bf16.tokens(colin27_slices[:1]).patches  # slow on CPUs without bf16 instructions: one slice
    reference = demo_encoders["fp32"].tokens(colin27_slices[:1]).patches
    assert not torch.equal(tokens.float(), reference)  # computed in bf16 (the final LayerNorm returns fp32)
    assert F.cosine_similarity(tokens.float(), reference, dim=-1).mean() > 0.99


@needs_int8
def test_cache_keeps_precisions_apart_and_heads_see_one_model(demo_encoders, tmp_path):
    fp32, int8 = demo_encoders["fp32"], demo_encoders["int8"]
    assert fp32.model_id == int8.model_id and fp32.feature_id != int8.feature_id
    volume = Volume.from_image(downsampled(SAMPLE_T1, 4.0), "colin27 at 4 mm")
    cache, policy = FeatureCache(tmp_path), ResolutionPolicy(patch_mm=16.0)

    def features(encoder):  # a new session each time: no memory cache in front of the disk one
        return FeatureSession.for_encoder(encoder, policy, cache).features(volume)

    first, second = features(fp32), features(int8)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2
    assert second.model_id == first.model_id
    assert not torch.equal(first.patches, second.patches)
    assert torch.equal(features(fp32).patches, first.patches)


@needs_int8
def test_int8_tokens_of_a_slice_do_not_depend_on_its_batch(demo_encoders, colin27_slices):
    """Activations are quantised with one scale per forward pass; each slice runs alone so that features do not
    change with the batch size (which follows free memory)."""
    int8 = demo_encoders["int8"]
    together = int8.tokens(colin27_slices[:3], [0, 3])
    alone = int8.tokens(colin27_slices[1:2], [0, 3])
    assert torch.equal(together.patches[1], alone.patches[0]) and torch.equal(together.layers[3][1], alone.layers[3][0])
