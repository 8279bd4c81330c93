"""Checkpoints: every supported kind is detected from its tensors and loads strictly; unsafe files are refused."""
import json

import pytest
import timm
import torch

from BrainDINOLib import (Architecture, BrainDINOError, ModelCard, checkpoints, load_encoder, memory,
                          read_checkpoint)
from BrainDINOLib.architecture import parameter_count
from BrainDINOLib.checkpoints import save_safetensors, save_teacher_checkpoint
from BrainDINOLib.preprocessing import PreprocessConfig
from BrainDINOLib.cli import main
from conftest import reference_checkpoints

SPLUS_FIXTURE = reference_checkpoints()["dinov3_vits16plus"]
DINOV2_FIXTURE = reference_checkpoints()["dinov2_vits14"]


@pytest.fixture(scope="module")
def teacher_state(teacher_checkpoint):
    return torch.load(teacher_checkpoint, weights_only=True)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 96)


def _backbone(state):
    return {k[len("backbone."):]: v for k, v in state["teacher"].items() if k.startswith("backbone.")}


def test_plain_dinov3_state_dict(tmp_path, teacher_state, fixture_encoder, images):
    path = tmp_path / "dinov3_vit.pth"
    torch.save(_backbone(teacher_state), path)
    encoder = load_encoder(path, device="cpu", precision="fp32")
    assert encoder.checkpoint.kind == "dinov3-state-dict"
    assert encoder.architecture.embed_dim == 256 and encoder.architecture.num_heads == 4
    # Only LayerNorm eps differs (1e-5 for Meta's DINOv3 release, 1e-6 for BrainDINO teachers).
    same = encoder.tokens(images).patches - fixture_encoder.tokens(images).patches
    assert same.abs().max() < 0.05


def test_timm_state_dict_and_wrapped_state_dicts(tmp_path, fixture_encoder, images):
    state = fixture_encoder.model.state_dict()
    for name, payload in {"timm.pth": state, "wrapped.pth": {"model": state},
                          "ddp.pth": {f"module.{k}": v for k, v in state.items()}}.items():
        torch.save(payload, tmp_path / name)
        checkpoint = read_checkpoint(tmp_path / name)
        assert checkpoint.kind == "timm-state-dict"
        assert checkpoint.architecture.depth == 3
        assert any("num_heads=4 assumed" in note for note in checkpoint.notes)
        load_encoder(tmp_path / name, device="cpu", precision="fp32")


def test_safetensors_with_model_card_round_trips_exactly(tmp_path, fixture_encoder, images):
    card = ModelCard("fixture", fixture_encoder.architecture, PreprocessConfig(margin_mm=6.0), {"from": "test"},
                     "a test model")
    path = save_safetensors(fixture_encoder.model, card, tmp_path / "fixture.safetensors", dtype=torch.float32)
    assert json.loads((tmp_path / "fixture.json").read_text())["name"] == "fixture"
    encoder = load_encoder(path, device="cpu", precision="fp32")
    assert encoder.checkpoint.kind == "braindino-safetensors"
    assert encoder.architecture == fixture_encoder.architecture
    assert encoder.card.preprocessing == PreprocessConfig(margin_mm=6.0)
    assert encoder.model_id.startswith("fixture-")
    torch.testing.assert_close(encoder.tokens(images).patches, fixture_encoder.tokens(images).patches,
                               rtol=0, atol=0)


def test_teacher_export_round_trips(tmp_path, fixture_encoder, images):
    path = save_teacher_checkpoint(fixture_encoder.model, fixture_encoder.architecture, tmp_path / "teacher.pth",
                                   extra={"dino_head.mlp.0.weight": torch.zeros(8, 256)}, iteration=7)
    encoder = load_encoder(path, device="cpu", precision="fp32")
    assert encoder.checkpoint.kind == "braindino-teacher"
    assert encoder.architecture == fixture_encoder.architecture
    torch.testing.assert_close(encoder.tokens(images).cls, fixture_encoder.tokens(images).cls, rtol=0, atol=0)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_state_dicts(tmp_path, images, registers):
    arch = Architecture(family="dinov2", embed_dim=128, depth=2, num_heads=2, patch_size=16,
                        num_register_tokens=registers, qkv_bias=True, pos_embed_grid=4)
    torch.manual_seed(1)
    model = arch.build().eval()
    timm_path = tmp_path / "timm.pth"
    torch.save(model.state_dict(), timm_path)
    timm_encoder = load_encoder(timm_path, device="cpu", precision="fp32")
    assert timm_encoder.checkpoint.kind == "timm-state-dict"
    assert timm_encoder.architecture.num_register_tokens == registers
    expected = timm_encoder.tokens(images)
    if registers == 0:  # Meta's DINOv2 naming = timm's plus the mask token
        meta = dict(model.state_dict(), mask_token=torch.zeros(1, 128))
        torch.save(meta, tmp_path / "dinov2.pth")
        meta_encoder = load_encoder(tmp_path / "dinov2.pth", device="cpu", precision="fp32")
        assert meta_encoder.checkpoint.kind == "dinov2-state-dict"
        torch.testing.assert_close(meta_encoder.tokens(images).patches, expected.patches)
    assert expected.patches.shape == (2, 4, 6, 128)
    assert expected.registers.shape == (2, registers, 128)


def test_large_checkpoints_are_memory_mapped(monkeypatch, teacher_checkpoint, fixture_encoder, images):
    mapped = []
    load = torch.load

    def recording_load(*args, **kwargs):
        mapped.append(kwargs.get("mmap"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setattr(checkpoints, "MMAP_FROM_BYTES", 1 << 20)  # the 10 MB fixture counts as large
    encoder = load_encoder(teacher_checkpoint, device="cpu", precision="fp32")
    assert mapped == [True]
    torch.testing.assert_close(encoder.tokens(images).patches, fixture_encoder.tokens(images).patches, rtol=0, atol=0)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"backbone.x": Payload()}}, path)
    with pytest.raises(BrainDINOError, match="refused: the checkpoint holds pickled objects") as error:
        read_checkpoint(path)
    assert str(error.value).startswith(str(path))


def _teacher_variant(tmp_path, teacher_state, change):
    teacher = dict(teacher_state["teacher"])
    change(teacher)
    path = tmp_path / "variant.pth"
    torch.save({"teacher": teacher}, path)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("backbone.blocks.1.attn.proj.bias"), "missing tensor(s) blocks.1.attn.proj.bias"),
    (lambda t: t.update({"backbone.blocks.0.attn.extra": torch.zeros(3)}), "unexpected tensor(s) blocks.0.attn.extra"),
    (lambda t: t.update({"backbone.blocks.2.mlp.fc2.weight": torch.zeros(256, 512)}),
     "tensor blocks.2.mlp.fc2.weight has shape (256, 512), expected (256, 1024)"),
])
def test_strict_loading_names_the_tensor(tmp_path, teacher_state, change, message):
    path = _teacher_variant(tmp_path, teacher_state, change)
    with pytest.raises(BrainDINOError) as error:
        load_encoder(path, device="cpu", precision="fp32")
    assert message in str(error.value)


def test_unknown_and_broken_checkpoints(tmp_path, teacher_checkpoint):
    torch.save({"weight": torch.zeros(3), "bias": torch.zeros(3)}, tmp_path / "linear.pth")
    with pytest.raises(BrainDINOError, match="unknown checkpoint kind.*first keys: weight, bias"):
        read_checkpoint(tmp_path / "linear.pth")
    (tmp_path / "cut.pth").write_bytes(teacher_checkpoint.read_bytes()[:50000])
    with pytest.raises(BrainDINOError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(BrainDINOError, match="not a readable safetensors file"):
        read_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(BrainDINOError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "absent.pth")


def test_info_command(capsys, teacher_checkpoint):
    assert main(["info", str(teacher_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kind"], info["embed_dim"], info["depth"], info["num_heads"], info["patch_size"],
            info["num_register_tokens"], info["parameters"]) == ("braindino-teacher", 256, 3, 4, 16, 4, 2_567_168)
    assert main(["info", str(teacher_checkpoint)]) == 0
    assert "braindino-teacher" in capsys.readouterr().out


@pytest.mark.parametrize("path, expected", [
    (DINOV2_FIXTURE, {"family": "dinov2", "variant": "custom ViT/14", "num_register_tokens": 0, "ffn": "mlp",
                      "ffn_hidden_dim": 512, "norm_eps": 1e-6, "pos_embed_resize": "bicubic-offset"}),
    (SPLUS_FIXTURE, {"family": "dinov3", "num_register_tokens": 4, "ffn": "swiglu", "ffn_hidden_dim": 512,
                     "norm_eps": 1e-5, "pos_embed_resize": "rope", "parameters": 892_672}),
])
def test_info_lists_what_decides_the_features(capsys, path, expected):
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {key: info[key] for key in expected} == expected
    assert any("LayerNorm eps" in note for note in info["notes"])
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    if expected["family"] == "dinov2":
        assert "bicubic-offset: bicubic, antialias off, scale factor (n + 0.1) / grid" in text
    else:
        assert "swiglu: SwiGLU with separate gate and value projections" in text
    assert "(register/storage tokens)" in text and "norm_eps" in text


# Meta's public SwiGLU and giant releases at full size, on the meta device (no memory): the architecture we
# build has exactly the tensors and parameter count of timm's own port of each.
FULL_SIZE = [
    ("vit_small_patch14_dinov2", "ViT-S/14",
     Architecture("dinov2", 384, 12, 6, 14, num_register_tokens=0, qkv_bias=True, pos_embed_grid=37)),
    ("vit_giant_patch14_dinov2", "ViT-g/14",
     Architecture("dinov2", 1536, 40, 24, 14, num_register_tokens=0, qkv_bias=True, pos_embed_grid=37,
                  ffn="swiglu-packed", mlp_ratio=4096 / 1536)),
    ("vit_giant_patch14_reg4_dinov2", "ViT-g/14",
     Architecture("dinov2", 1536, 40, 24, 14, num_register_tokens=4, qkv_bias=True, pos_embed_grid=37,
                  ffn="swiglu-packed", mlp_ratio=4096 / 1536)),
    ("vit_small_plus_patch16_dinov3_qkvb", "ViT-S+/16",
     Architecture("dinov3", 384, 12, 6, 16, qkv_bias=True, ffn="swiglu", norm_eps=1e-5)),
    ("vit_huge_plus_patch16_dinov3_qkvb", "ViT-H+/16",
     Architecture("dinov3", 1280, 32, 20, 16, qkv_bias=True, ffn="swiglu", norm_eps=1e-5)),
    ("vit_7b_patch16_dinov3", "ViT-7B/16",
     Architecture("dinov3", 4096, 40, 32, 16, qkv_bias=False, ffn="swiglu", mlp_ratio=2.0, norm_eps=1e-5)),
]


@pytest.mark.parametrize("timm_name, variant, arch", FULL_SIZE, ids=[case[0] for case in FULL_SIZE])
def test_public_variants_build_exactly_timms_tensors(timm_name, variant, arch):
    with torch.device("meta"):
        ours, theirs = arch.build(), timm.create_model(timm_name, num_classes=0)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert parameter_count(ours) == parameter_count(theirs)
    assert ours.blocks[0].norm1.eps == theirs.blocks[0].norm1.eps == arch.norm_eps
    assert arch.variant == variant


def test_a_7b_model_is_refused_in_one_line_when_memory_is_short():
    arch = FULL_SIZE[-1][2]
    with torch.device("meta"):
        parameters = parameter_count(arch.build())
    assert parameters == 6_716_030_976
    with pytest.raises(BrainDINOError) as error:
        memory.ensure_fits("dinov3_vit7b16.pth", arch.variant, parameters, torch.device("cpu"), available=16 << 30)
    assert str(error.value) == ("dinov3_vit7b16.pth: ViT-7B/16 has 6.72 B parameters and needs about 27.5 GiB in "
                                "float32 on cpu, but only 16.0 GiB is available there; use a device with more free "
                                "memory or a smaller model")
    memory.ensure_fits("dinov3_vit7b16.pth", arch.variant, parameters, torch.device("cpu"), available=28 << 30)


def test_memory_is_checked_before_any_weight_is_allocated(monkeypatch, teacher_checkpoint):
    built_on = []
    build = Architecture.build

    def recording_build(self, *args, **kwargs):
        built_on.append(torch.empty(0).device.type)
        return build(self, *args, **kwargs)

    monkeypatch.setattr(Architecture, "build", recording_build)
    monkeypatch.setattr(memory, "available_memory", lambda device: 64 << 20)
    with pytest.raises(BrainDINOError, match=r"has 2.6 M parameters and needs about 0.3 GiB .* only 0.1 GiB") as error:
        load_encoder(teacher_checkpoint, device="cpu", precision="fp32")
    assert str(error.value).startswith(str(teacher_checkpoint)) and "\n" not in str(error.value)
    assert built_on == ["meta"]  # shapes only: nothing was materialised


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values everywhere (timm's init sets LayerScale to 1e-5, which would hide every block)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("gamma", "gamma_1", "gamma_2")) or ("norm" in name and name.endswith("weight")):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def _assert_same_tokens(encoder, reference: torch.nn.Module, images: torch.Tensor) -> None:
    """The encoder's CLS and patch tokens are the timm reference model's (prefix: CLS + registers)."""
    with torch.no_grad():
        expected = reference.forward_features(images)
    tokens = encoder.tokens(images)
    torch.testing.assert_close(tokens.cls, expected[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(tokens.patches.flatten(1, 2), expected[:, reference.num_prefix_tokens:],
                               rtol=0, atol=1e-5)


def test_dinov3_7b_layout_loads_as_timm_defines_it(tmp_path):
    """A reduced ViT-7B (timm's own definition: SwiGLU aligned to 64, no qkv bias, eps 1e-5) in Meta's naming,
    with the training-only local_cls_norm of the 7B release."""
    reference = _randomised(timm.create_model("vit_7b_patch16_dinov3", embed_dim=128, depth=2, num_heads=2,
                                              num_classes=0, global_pool="token"), seed=7)
    names = {"mlp.fc1_g": "mlp.w1", "mlp.fc1_x": "mlp.w2", "mlp.fc2": "mlp.w3", "gamma_1": "ls1.gamma",
             "gamma_2": "ls2.gamma", "reg_token": "storage_tokens"}
    meta = {}
    for key, value in reference.state_dict().items():
        for old, new in names.items():
            key = key.replace(old, new)
        meta[key] = value
    meta.update({"rope_embed.periods": 100.0 ** (2 * torch.arange(16) / 32), "mask_token": torch.zeros(1, 128),
                 "local_cls_norm.weight": torch.ones(128), "local_cls_norm.bias": torch.zeros(128)})
    torch.save(meta, tmp_path / "dinov3_vit7b16_pretrain_lvd1689m.pth")
    encoder = load_encoder(tmp_path / "dinov3_vit7b16_pretrain_lvd1689m.pth", device="cpu", precision="fp32")
    arch = encoder.architecture
    assert (arch.ffn, arch.ffn_hidden_dim, arch.qkv_bias, arch.num_heads, arch.norm_eps) == \
        ("swiglu", 256, False, 2, 1e-5)
    assert any("local_cls_norm" in note for note in encoder.checkpoint.notes)
    _assert_same_tokens(encoder, reference, torch.randn(2, 3, 64, 96))


def test_dinov2_g_layout_loads_as_timm_defines_it(tmp_path):
    """A reduced ViT-g/14 (timm's own definition: packed SwiGLU) in Meta's naming (w12, w3, mask token), at its
    native 6x6 grid, where no position resizing is involved."""
    reference = _randomised(timm.create_model("vit_giant_patch14_dinov2", embed_dim=128, depth=2, num_heads=2,
                                              mlp_ratio=688 / 128, img_size=84, num_classes=0), seed=14)
    meta = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v for k, v in reference.state_dict().items()}
    torch.save(dict(meta, mask_token=torch.zeros(1, 128)), tmp_path / "dinov2_vitg14_pretrain.pth")
    encoder = load_encoder(tmp_path / "dinov2_vitg14_pretrain.pth", device="cpu", precision="fp32")
    arch = encoder.architecture
    assert (encoder.checkpoint.kind, arch.ffn, arch.ffn_hidden_dim, arch.pos_embed_grid) == \
        ("dinov2-state-dict", "swiglu-packed", 344, 6)
    _assert_same_tokens(encoder, reference, torch.randn(2, 3, 84, 84))


def test_an_unmasked_dinov3_k_bias_is_refused(tmp_path):
    state = {k: v for k, v in torch.load(SPLUS_FIXTURE, weights_only=True).items() if not k.endswith("bias_mask")}
    torch.save(state, tmp_path / "unmasked.pth")
    with pytest.raises(BrainDINOError, match="blocks.0.attn.qkv.bias has a non-zero k bias that is not masked"):
        read_checkpoint(tmp_path / "unmasked.pth")


def test_architectures_recorded_before_ffn_and_position_fields_read_with_the_family_convention():
    old = {"family": "dinov2", "embed_dim": 64, "depth": 2, "num_heads": 1, "patch_size": 14, "in_chans": 3,
           "num_register_tokens": 0, "mlp_ratio": 4.0, "qkv_bias": True, "layer_scale": True, "norm_eps": 1e-6,
           "rope_base": 100.0, "pos_embed_grid": 37}
    assert (Architecture.from_dict(old).ffn, Architecture.from_dict(old).pos_embed_resize) == ("mlp", "bicubic-offset")
    assert Architecture.from_dict(dict(old, num_register_tokens=4)).pos_embed_resize == "bicubic-antialias"
    with pytest.raises(ValueError, match="'bicubic-offset' is the convention of DINOv2 models without registers"):
        Architecture.from_dict(dict(old, num_register_tokens=4, pos_embed_resize="bicubic-offset"))
    with pytest.raises(ValueError, match="FFN 'swiglu' is not supported"):
        Architecture.from_dict(dict(old, ffn="swiglu"))
